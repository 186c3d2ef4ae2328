"""The HTTP API (SPEC.md §8): cancel and read a request by id, from any process.

The stdlib's ``urllib`` in a worker thread: two body-less calls do not justify an HTTP client
dependency. Every status is read, never raised: 200/404/409 are cancel outcomes, the others
map to the SDK's exceptions (401 ``Unauthorized``, 403 ``Forbidden``, 400 ``InvalidRequest``).
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from protocol import CancelReason, CancelResult, CancelStatus, ErrorInfo, ProtocolError, Usage

from ._config import Settings, check_request_id
from ._errors import (
    ConnectError,
    InvalidRequest,
    MuxgateError,
    ProtocolViolation,
    error_from_code,
    mapped_errors,
)
from ._models import RequestInfo

__all__ = ["cancel_over_http", "get_over_http"]

_CANCEL_STATUSES = {200, 404, 409}


def _call(method: str, url: str, headers: Mapping[str, str], timeout: float) -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method, headers=dict(headers))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return int(answer.status), bytes(answer.read())
    except urllib.error.HTTPError as error:
        with error:
            return int(error.code), bytes(error.read())
    except urllib.error.URLError as error:
        reason = error.reason
        raise ConnectError(f"{method} {url}: {reason}") from error


async def _request(
    settings: Settings, method: str, request_id: str, user_id: str | None
) -> tuple[int, dict[str, Any]]:
    check_request_id(request_id)
    url = settings.request_url(request_id)
    headers = settings.http_headers(user_id)
    with mapped_errors(f"{method} {url}"):
        status, raw = await asyncio.to_thread(_call, method, url, headers, settings.connect_timeout)
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ProtocolViolation(f"{method} {url}: HTTP {status} without a JSON object body")
    return status, body


def _raise_for(status: int, body: Mapping[str, Any]) -> MuxgateError:
    error = body.get("error")
    code, message = "internal", f"HTTP {status}"
    if isinstance(error, dict):
        code = str(error.get("code", code))
        message = str(error.get("message", message))
    if status == 400:
        return InvalidRequest(message, code=code)
    return error_from_code(code, message)


async def cancel_over_http(
    settings: Settings, request_id: str, user_id: str | None
) -> CancelResult:
    """``DELETE /v1/requests/{id}``: cancel with reason ``api`` (SPEC.md §8.1)."""
    status, body = await _request(settings, "DELETE", request_id, user_id)
    if status not in _CANCEL_STATUSES:
        raise _raise_for(status, body)
    try:
        return CancelResult(request_id=request_id, status=CancelStatus(str(body.get("status"))))
    except (ValueError, ProtocolError) as exc:
        raise ProtocolViolation(f"DELETE: unexpected body {body!r}") from exc


def _usage(value: object) -> Usage | None:
    if not isinstance(value, dict):
        return None
    return Usage(
        input_tokens=int(value.get("input_tokens", 0)),
        output_tokens=int(value.get("output_tokens", 0)),
        saved_tokens=int(value.get("saved_tokens", 0)),
        final=bool(value.get("final", True)),
        # Absent (an older gateway, or one that does not say) stays None; a bad value is a
        # ProtocolError, which the caller reports as a ProtocolViolation.
        estimated=value.get("estimated"),
    )


async def get_over_http(settings: Settings, request_id: str, user_id: str | None) -> RequestInfo:
    """``GET /v1/requests/{id}`` (SPEC.md §8.2); 404 is status ``not_found``."""
    status, body = await _request(settings, "GET", request_id, user_id)
    if status == 404:
        return RequestInfo(request_id=request_id, status=CancelStatus.NOT_FOUND.value)
    if status != 200:
        raise _raise_for(status, body)
    try:
        reason = body.get("reason")
        error = body.get("error")
        return RequestInfo(
            request_id=request_id,
            status=str(body["status"]),
            reason=CancelReason(reason) if reason is not None else None,
            error=ErrorInfo(code=error["code"], message=error["message"])
            if isinstance(error, dict)
            else None,
            usage=_usage(body.get("usage")),
        )
    except (KeyError, ValueError, TypeError, ProtocolError) as exc:
        raise ProtocolViolation(f"GET: unexpected body {body!r}") from exc
