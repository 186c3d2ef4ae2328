"""The SDK's exceptions: one small tree, mapped from foreign exceptions at the I/O edge.

::

    MuxgateError                  .code: the wire error code when there is one (SPEC.md §7)
     ├── InvalidRequest           our own bad input, refused before anything is sent
     │                            (also a ValueError: a bad request_id, a too long message)
     ├── TransportError           the network, not the request
     │    ├── ConnectError        could not open the WebSocket / HTTP connection
     │    └── ConnectionLost      the WebSocket closed while requests were in flight
     │         │                  (.close_code, .close_reason); the next call reconnects
     │         ├── GatewayShuttingDown   closed with 1001: the gateway is draining
     │         └── ResumeFailed   a resumable request could not go on after its connection
     │              │             dropped: reconnecting gave up (.request_id; ``__cause__``
     │              │             is the last attempt's error)
     │              └── ResumeNotFound   the gateway no longer had it (``resume_result``
     │                            ``not_found``: its grace period ended, or a restart)
     ├── ProtocolViolation        the gateway broke the protocol (SPEC.md §5.1, G1-G3)
     ├── Unauthorized             credentials missing or invalid (error/close 4001, HTTP 401)
     ├── RequestRefused           an ``error`` refused a chat or cancel (.request_id), e.g.
     │    │                       too_many_streams, duplicate_request_id, rate_limited,
     │    │                       unavailable; HTTP 429/5xx
     │    └── Forbidden           valid credentials that may not act for that user (HTTP 403)
     ├── RequestFailed            the request ended with status ``failed`` (.response)
     └── RequestMoved             another client resumed the request (``moved``, SPEC.md
                                  §5.8): it goes on there, not here (.request_id)

A *cancelled* request is not an error: ``chat`` returns its :class:`Response` with status
``cancelled`` (the seed page's behaviour). Python's own cancellation (``task.cancel()``, a
timeout, Ctrl-C) raises ``CancelledError`` / ``TimeoutError`` / ``KeyboardInterrupt`` as usual,
after the SDK has sent the ``cancel`` frame.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidStatus,
    InvalidURI,
)

from protocol import CloseCode, ErrorCode, LocalProtocolError, RemoteProtocolError

if TYPE_CHECKING:
    from ._models import Response

__all__ = [
    "ConnectError",
    "ConnectionLost",
    "Forbidden",
    "GatewayShuttingDown",
    "InvalidRequest",
    "MuxgateError",
    "ProtocolViolation",
    "RequestFailed",
    "RequestMoved",
    "RequestRefused",
    "ResumeFailed",
    "ResumeNotFound",
    "TransportError",
    "Unauthorized",
]


class MuxgateError(Exception):
    """Root of every error the SDK raises. ``code`` is the wire error code, if any."""

    code: str | None

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class InvalidRequest(MuxgateError, ValueError):
    """The call's arguments break the protocol's limits; nothing was sent."""


class TransportError(MuxgateError):
    """The network failed, not the request."""


class ConnectError(TransportError):
    """The WebSocket (or HTTP) connection could not be opened."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        #: The HTTP status of a refused handshake (e.g. 503 while the gateway drains).
        self.status = status


class ConnectionLost(TransportError):
    """The connection closed while this request was in flight (SPEC.md G7: the gateway
    cancels it with reason ``disconnect``). The client reconnects on its next call."""

    def __init__(
        self, message: str, *, close_code: int | None = None, close_reason: str = ""
    ) -> None:
        super().__init__(message)
        self.close_code = close_code
        self.close_reason = close_reason


class GatewayShuttingDown(ConnectionLost):
    """The gateway closed the connection with 1001: it is shutting down (SPEC.md §5.7)."""


class ResumeFailed(ConnectionLost):
    """A resumable request could not go on after its connection dropped (SPEC.md §5.8): the
    client gave up reconnecting (after ``reconnect_timeout``, or at once when the gateway
    refused the credentials); ``__cause__`` is the last attempt's error. ``close_code`` and
    ``close_reason`` are those of the drop. The request may still run on the gateway until its
    grace period ends; the SDK has sent, or tried over HTTP, any cancel asked for meanwhile."""

    def __init__(
        self,
        message: str,
        *,
        request_id: str,
        close_code: int | None = None,
        close_reason: str = "",
    ) -> None:
        super().__init__(message, close_code=close_code, close_reason=close_reason)
        self.request_id = request_id


class ResumeNotFound(ResumeFailed):
    """The gateway answered the client's ``resume`` with ``not_found``: the request's grace
    period ended before the client was back (it was then cancelled, reason ``disconnect``),
    or the gateway restarted or forgot it. Nothing more about it will come."""


class RequestMoved(MuxgateError):
    """Another client resumed this request (``moved``, SPEC.md §5.8): it goes on there and its
    response goes there; this client gets nothing more about it. Not a cancel."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"request {request_id} was resumed on another connection (moved)")
        self.request_id = request_id


class ProtocolViolation(MuxgateError):
    """The gateway sent something the protocol forbids; the SDK closed the connection."""

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message, code=ErrorCode.PROTOCOL_VIOLATION.value)
        self.request_id = request_id


class Unauthorized(MuxgateError):
    """Credentials missing or invalid (``error`` ``unauthorized`` then close 4001; HTTP 401)."""

    def __init__(self, message: str = "missing or invalid credentials") -> None:
        super().__init__(message, code=ErrorCode.UNAUTHORIZED.value)


class RequestRefused(MuxgateError):
    """The gateway refused a message with an ``error`` (no request was started)."""

    def __init__(self, code: str, message: str, *, request_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}", code=code)
        self.message = message
        self.request_id = request_id


class Forbidden(RequestRefused):
    """Valid credentials that may not act for the ``user_id`` asked for (a token's ``sub``)."""

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(ErrorCode.FORBIDDEN.value, message, request_id=request_id)


class RequestFailed(MuxgateError):
    """The request ended with status ``failed``; ``response.error`` says why."""

    def __init__(self, response: Response) -> None:
        error = response.error
        code = error.code if error is not None else ErrorCode.INTERNAL.value
        message = error.message if error is not None else "the request failed"
        super().__init__(f"request {response.request_id} failed: {code}: {message}", code=code)
        self.response = response
        self.request_id = response.request_id


def error_from_code(code: str, message: str, request_id: str | None = None) -> MuxgateError:
    """The exception for a gateway ``error`` message or an HTTP error body."""
    if code == ErrorCode.UNAUTHORIZED:
        return Unauthorized(message)
    if code == ErrorCode.FORBIDDEN:
        return Forbidden(message, request_id=request_id)
    return RequestRefused(code, message, request_id=request_id)


def error_from_close(code: int | None, reason: str) -> MuxgateError:
    """The exception for requests still in flight when the WebSocket closed (SPEC.md §2.6)."""
    shown = f"{code} {reason}".strip() if code is not None else "no close frame"
    if code == CloseCode.GOING_AWAY:
        return GatewayShuttingDown(
            f"the gateway is shutting down (close {shown})", close_code=code, close_reason=reason
        )
    if code == CloseCode.UNAUTHORIZED:
        return Unauthorized(f"the gateway refused the credentials (close {shown})")
    return ConnectionLost(f"connection lost (close {shown})", close_code=code, close_reason=reason)


@contextlib.contextmanager
def mapped_errors(what: str) -> Iterator[None]:
    """Map foreign exceptions raised by I/O and validation into the tree above."""
    try:
        yield
    except MuxgateError:
        raise
    except LocalProtocolError as exc:
        raise InvalidRequest(exc.message, code=str(exc.code)) from exc
    except RemoteProtocolError as exc:
        raise ProtocolViolation(exc.message, request_id=exc.request_id) from exc
    except InvalidStatus as exc:
        status = exc.response.status_code
        if status == 401:
            raise Unauthorized(f"{what}: HTTP 401") from exc
        detail = "the gateway is shutting down" if status == 503 else "handshake refused"
        raise ConnectError(f"{what}: {detail} (HTTP {status})", status=status) from exc
    except InvalidURI as exc:
        raise InvalidRequest(f"{what}: invalid URL: {exc}") from exc
    except InvalidHandshake as exc:
        raise ConnectError(f"{what}: handshake failed: {exc}") from exc
    except ConnectionClosed as exc:
        received = exc.rcvd
        raise error_from_close(
            received.code if received is not None else None,
            received.reason if received is not None else "",
        ) from exc
    except TimeoutError as exc:
        raise ConnectError(f"{what}: timed out") from exc
    except OSError as exc:  # refused, unreachable, DNS (gaierror), TLS (SSLError)
        raise ConnectError(f"{what}: {exc}") from exc
