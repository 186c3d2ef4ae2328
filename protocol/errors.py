"""Errors of the muxgate wire protocol.

One small tree, so that callers catch one thing and read a machine code::

    ProtocolError                 .code (an ErrorCode, or a peer's unknown code string),
     │                            .message, .request_id
     ├── RemoteProtocolError      the peer sent something the protocol forbids; answer it with an
     │                            ``error`` message carrying ``.code`` (SPEC.md §7)
     └── LocalProtocolError       we were about to do something the protocol forbids (a bug in the
                                  caller, e.g. sending a chunk after the terminal response)

Nothing else escapes :mod:`protocol`: decoding arbitrary bytes raises (or returns) only
:class:`RemoteProtocolError`; foreign exceptions from orjson or msgpack are mapped at the edge,
``raise ... from exc``.
"""

from __future__ import annotations

import enum

__all__ = [
    "CloseCode",
    "ErrorCode",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
]


class ErrorCode(enum.StrEnum):
    """Machine-readable codes carried by ``error`` messages and failed responses (SPEC.md §7)."""

    #: The WebSocket frame could not be split into messages, or a message is not an object
    #: with a string ``type`` (bad UTF-8, bad JSON, truncated msgpack, wrong frame kind).
    BAD_FRAME = "bad_frame"
    #: ``type`` names no message this peer may send.
    UNKNOWN_TYPE = "unknown_type"
    #: A field is missing, of the wrong type, or out of range.
    INVALID_FIELD = "invalid_field"
    #: A ``chat`` reuses a ``request_id`` that is still active for this user.
    DUPLICATE_REQUEST_ID = "duplicate_request_id"
    #: A ``chat`` would exceed the connection's concurrent-stream limit.
    TOO_MANY_STREAMS = "too_many_streams"
    #: Missing or invalid credentials.
    UNAUTHORIZED = "unauthorized"
    #: Valid credentials that may not act for the ``user_id`` asked for.
    FORBIDDEN = "forbidden"
    #: The connection sends messages faster than allowed.
    RATE_LIMITED = "rate_limited"
    #: A frame exceeds ``max_frame_bytes`` or carries more than ``max_batch_messages``.
    FRAME_TOO_LARGE = "frame_too_large"
    #: A message arrived out of order (e.g. ``hello`` after another message, or a ``chunk``
    #: after the terminal response when a client checks the gateway).
    PROTOCOL_VIOLATION = "protocol_violation"
    #: The backend pipeline failed (in ``response.error`` of a failed request).
    BACKEND_ERROR = "backend_error"
    #: The gateway is shutting down and takes no new requests.
    UNAVAILABLE = "unavailable"
    #: An unexpected failure inside the gateway; details are not disclosed.
    INTERNAL = "internal"
    # In ``response.error`` of a request whose model upstream failed (SPEC.md §7.2).
    #: The upstream could not be reached (connection refused, connect timeout).
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    #: The upstream answered 429 (after the retries before a first token).
    UPSTREAM_RATE_LIMITED = "upstream_rate_limited"
    #: The upstream refused the request (another 4xx).
    UPSTREAM_REJECTED = "upstream_rejected"
    #: The upstream failed (5xx, or an error reported in its stream).
    UPSTREAM_ERROR = "upstream_error"
    #: The upstream sent no token for the configured stall time.
    UPSTREAM_TIMEOUT = "upstream_timeout"
    #: The upstream's stream could not be parsed.
    UPSTREAM_BAD_RESPONSE = "upstream_bad_response"
    #: The upstream connection dropped before the answer ended.
    UPSTREAM_DISCONNECTED = "upstream_disconnected"
    #: The request could not get a turn at the upstream before its deadline.
    UPSTREAM_BUSY = "upstream_busy"
    # In ``response.error`` of a request whose MCP tool call failed (SPEC.md §7.2).
    #: The tool reported an error, or its server answered a JSON-RPC error (e.g. unknown tool).
    TOOL_ERROR = "tool_error"
    #: The tool did not answer within its configured ``timeout_s`` (its server was told to stop).
    TOOL_TIMEOUT = "tool_timeout"
    #: The tool server is down or restarting, or went away during the call.
    TOOL_UNAVAILABLE = "tool_unavailable"
    # In ``response.error`` of a request whose remote A2A agent call failed (SPEC.md §7.2).
    #: The remote agent's task failed or was rejected, or the agent refused the request.
    AGENT_ERROR = "agent_error"
    #: The remote agent's task did not end within the agent's configured ``timeout_s``.
    AGENT_TIMEOUT = "agent_timeout"
    #: The remote agent could not be reached (connection refused, 5xx, connection dropped).
    AGENT_UNAVAILABLE = "agent_unavailable"


class CloseCode(enum.IntEnum):
    """WebSocket close codes the gateway uses (SPEC.md §2.6).

    ======  =====================  =================================================
    code    name                   when
    ======  =====================  =================================================
    1000    NORMAL                 the client closed, or the gateway finished cleanly
    1001    GOING_AWAY             gateway shutdown after the grace period
    1008    POLICY_VIOLATION       not used for auth (see 4001); reserved
    1009    MESSAGE_TOO_BIG        a frame larger than ``max_frame_bytes``
    1011    INTERNAL_ERROR         unexpected failure; details are not disclosed
    1013    TRY_AGAIN_LATER        the gateway is at its connection limit
    4001    UNAUTHORIZED           credentials missing or invalid where required
    4008    SLOW_CONSUMER          the client read too slowly for too long
    4029    RATE_LIMITED           the client kept flooding after ``rate_limited``
    ======  =====================  =================================================
    """

    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    UNAUTHORIZED = 4001
    SLOW_CONSUMER = 4008
    RATE_LIMITED = 4029


class ProtocolError(Exception):
    """Root of the protocol's errors. ``code`` is what goes on the wire."""

    code: ErrorCode | str
    message: str
    request_id: str | None
    #: The refused message's ``type`` when it had a known one (e.g. so a gateway can tell a
    #: refused ``hello`` from other bad input); not part of equality.
    message_type: str | None

    def __init__(
        self,
        code: ErrorCode | str,
        message: str,
        *,
        request_id: str | None = None,
        message_type: str | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.message_type = message_type

    def __repr__(self) -> str:
        rid = f", request_id={self.request_id!r}" if self.request_id is not None else ""
        return f"{type(self).__name__}({str(self.code)!r}, {self.message!r}{rid})"

    def __eq__(self, other: object) -> bool:
        # Errors are values in decode() results; comparing them makes tests and vectors simple.
        return (
            type(other) is type(self)
            and isinstance(other, ProtocolError)
            and (other.code, other.message, other.request_id)
            == (self.code, self.message, self.request_id)
        )

    __hash__ = Exception.__hash__


class RemoteProtocolError(ProtocolError):
    """The peer violated the protocol. Reply with an ``error`` message of this ``code``."""


class LocalProtocolError(ProtocolError):
    """This side tried to violate the protocol; a bug in the caller, never the peer's fault."""
