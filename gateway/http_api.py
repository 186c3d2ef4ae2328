"""HTTP on the WebSocket port (SPEC.md §8): cancel and status by id, health, metrics, live
stats, and the web demo's files.

websockets parses every request line and hands it to ``process_request`` before the WebSocket
handshake; body-less ``DELETE`` and ``GET`` are accepted (it refuses only bodies), so the seed's
``curl -X DELETE`` works against the same port. Returning a response ends the exchange; returning
``None`` lets the WebSocket handshake go on (``GET /v1/ws`` only).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import TYPE_CHECKING, cast
from urllib.parse import unquote

import orjson
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

import protocol
from protocol import CancelReason, CancelStatus, ErrorCode

from .auth import AuthError
from .pipeline import BackendInfo
from .registry import RequestKey
from .stats import STATS_PATH

if TYPE_CHECKING:
    from .server import Gateway

__all__ = ["answer_early", "process_request"]

_REQUESTS_PREFIX = "/v1/requests/"

_CANCEL_HTTP_STATUS = {
    CancelStatus.CANCELLED: HTTPStatus.OK,
    CancelStatus.ALREADY_CANCELLED: HTTPStatus.OK,
    CancelStatus.ALREADY_COMPLETED: HTTPStatus.CONFLICT,
    CancelStatus.NOT_FOUND: HTTPStatus.NOT_FOUND,
}


def _with_content_type(response: Response, content_type: str) -> Response:
    # ``respond`` already set text/plain, and ``Headers`` is a multidict whose ``[]=`` *adds* a
    # value: replace it, or clients see two Content-Types and most read the first.
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = content_type
    return response


def _json(conn: ServerConnection, status: HTTPStatus, body: object) -> Response:
    response = conn.respond(status, orjson.dumps(body).decode())
    return _with_content_type(response, "application/json")


def _error(conn: ServerConnection, status: HTTPStatus, code: ErrorCode, message: str) -> Response:
    return _json(conn, status, {"error": {"code": code.value, "message": message}})


def _not_allowed(conn: ServerConnection, allow: str) -> Response:
    response = _error(
        conn, HTTPStatus.METHOD_NOT_ALLOWED, ErrorCode.INVALID_FIELD, "method not allowed"
    )
    response.headers["Allow"] = allow
    return response


def _backend_info(gateway: Gateway) -> object:
    """``GET /v1/backend`` (SPEC.md §8.3): the backend's name, model and chat settings."""
    describe = getattr(gateway.backend, "describe", None)
    info = describe() if describe is not None else None
    if not isinstance(info, BackendInfo):  # a backend that does not say: its name only
        name = gateway.config.backend if gateway.backend_configured else "custom"
        info = BackendInfo(name=name)
    return info.as_json()


def answer_early(gateway: Gateway, conn: ServerConnection, request: Request) -> Response | None:
    """``DELETE /v1/requests/{id}`` answered in the loop turn that read the request, not the
    handler task's next one (see connection.EagerServerConnection); None for anything else."""
    if request.method != "DELETE":
        return None
    path = request.path.partition("?")[0]
    if not path.startswith(_REQUESTS_PREFIX):
        return None
    request_id = unquote(path[len(_REQUESTS_PREFIX) :])
    key = _request_key(gateway, conn, request, request_id)
    if isinstance(key, Response):
        return key
    return _cancelled(conn, request_id, gateway.registry.cancel_now(key, CancelReason.API))


async def process_request(
    gateway: Gateway, conn: ServerConnection, request: Request
) -> Response | None:
    early = getattr(conn, "early_response", None)
    if early is not None:
        return cast(Response, early)
    path = request.path.partition("?")[0]
    method = request.method
    if path == protocol.WS_PATH:
        if method != "GET":
            return _not_allowed(conn, "GET")
        if gateway.draining:
            return _error(
                conn, HTTPStatus.SERVICE_UNAVAILABLE, ErrorCode.UNAVAILABLE, "shutting down"
            )
        return None  # the WebSocket handshake goes on
    if path == STATS_PATH:
        if method != "GET":
            return _not_allowed(conn, "GET")
        refused = _stats_refused(gateway, conn, request)
        if refused is not None:
            return refused  # the feed too: refused before the handshake
        # get_all, not get: Headers.get raises MultipleValuesError on a repeated header (a 500
        # and a logged traceback for a client's mistake). websockets' handshake answers a
        # malformed upgrade itself (400).
        if any("websocket" in value.lower() for value in request.headers.get_all("Upgrade")):
            return None  # the dashboard feed: a WebSocket (gateway.stats.StatsFeed)
        return _json(conn, HTTPStatus.OK, gateway.stats.snapshot())
    if path.startswith(_REQUESTS_PREFIX):
        return await _request_by_id(gateway, conn, request, unquote(path[len(_REQUESTS_PREFIX) :]))
    if path == "/v1/backend":
        if method != "GET":
            return _not_allowed(conn, "GET")
        return _json(conn, HTTPStatus.OK, _backend_info(gateway))
    if path == "/healthz":
        if method != "GET":
            return _not_allowed(conn, "GET")
        if gateway.draining:
            return _json(conn, HTTPStatus.SERVICE_UNAVAILABLE, {"status": "draining"})
        return _json(conn, HTTPStatus.OK, {"status": "ok"})
    if path == "/metrics":
        if method != "GET":
            return _not_allowed(conn, "GET")
        refused = _stats_refused(gateway, conn, request)
        if refused is not None:
            return refused
        response = conn.respond(HTTPStatus.OK, gateway.observer.render().decode())
        return _with_content_type(response, "text/plain; version=0.0.4; charset=utf-8")
    webui = gateway.webui
    if webui is not None and webui.owns(path):
        if method != "GET":
            return _not_allowed(conn, "GET")
        page = webui.respond(path)
        if page is not None:
            return page
        return _error(
            conn,
            HTTPStatus.NOT_FOUND,
            ErrorCode.INVALID_FIELD,
            "the web demo is not built: cd web-demo && npm ci && npm run build",
        )
    return _error(conn, HTTPStatus.NOT_FOUND, ErrorCode.INVALID_FIELD, "no such endpoint")


def _stats_refused(gateway: Gateway, conn: ServerConnection, request: Request) -> Response | None:
    """``/metrics`` and ``/v1/stats`` (snapshot and feed), SPEC.md §8.3: open to anyone unless
    auth is on and ``stats_public`` is false; then only a valid client key (an operator; a
    user's token is not one) gets in. None: go on; else the refusal (401, or 400 for a
    malformed X-Muxi-User-Id)."""
    if gateway.config.stats_public or not gateway.auth.required:
        return None
    try:
        principal = gateway.auth.from_http_headers(request.headers)
    except AuthError as exc:
        return _error(conn, HTTPStatus(exc.http_status), ErrorCode(exc.code), exc.message)
    if principal.kind != "client_key":
        return _error(
            conn, HTTPStatus.UNAUTHORIZED, ErrorCode.UNAUTHORIZED, "the stats need a client key"
        )
    return None


async def _request_by_id(
    gateway: Gateway, conn: ServerConnection, request: Request, request_id: str
) -> Response:
    key = _request_key(gateway, conn, request, request_id)
    if isinstance(key, Response):
        return key
    if request.method == "DELETE":
        return _cancelled(conn, request_id, await gateway.registry.cancel(key, CancelReason.API))
    record = await gateway.registry.lookup(key)
    if record is None:
        return _json(
            conn,
            HTTPStatus.NOT_FOUND,
            {"request_id": request_id, "status": CancelStatus.NOT_FOUND.value},
        )
    return _json(conn, HTTPStatus.OK, record.to_json())


def _cancelled(conn: ServerConnection, request_id: str, status: CancelStatus) -> Response:
    return _json(
        conn, _CANCEL_HTTP_STATUS[status], {"request_id": request_id, "status": status.value}
    )


def _request_key(
    gateway: Gateway, conn: ServerConnection, request: Request, request_id: str
) -> RequestKey | Response:
    """The caller's key for ``request_id``, or the error response (method, id, credentials)."""
    if request.method not in ("GET", "DELETE"):
        return _not_allowed(conn, "GET, DELETE")
    if not protocol.limits.REQUEST_ID_PATTERN.fullmatch(request_id):
        return _error(
            conn,
            HTTPStatus.BAD_REQUEST,
            ErrorCode.INVALID_FIELD,
            "request_id must be 1-128 characters of [A-Za-z0-9._:-]",
        )
    try:
        user = gateway.auth.from_http_headers(request.headers).user_for(None)
    except AuthError as exc:
        return _error(conn, HTTPStatus(exc.http_status), ErrorCode(exc.code), exc.message)
    return RequestKey(user, request_id)
