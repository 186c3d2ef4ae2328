"""HTTP on the WebSocket port (SPEC.md §8): cancel and status by id, health, metrics, live
stats, and the web demo's files.

:func:`respond` maps one request to its response, synchronously when it can (a ``DELETE`` is
answered in the callback that read it: no task between the request and the cancel) and as an
awaitable when the registry must be asked (``GET`` by id). It knows nothing of the transport:
the gateway's own (:mod:`gateway.transport`, keep-alive) and the ASGI adapter both call it.
``upgrade_refusal`` decides, before a WebSocket handshake starts, whether it may.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import unquote

import orjson

import protocol
from protocol import CancelReason, CancelStatus, ErrorCode

from .auth import Authenticator, AuthError
from .observability import GatewayObserver
from .pipeline import BackendInfo
from .registry import RequestKey, RequestRegistry
from .stats import STATS_PATH, LiveStats
from .tracing import NO_TRACING, Tracing, traceparent_header
from .transport import HttpRequest, HttpResponse
from .webui import WebUI

__all__ = ["HttpServices", "respond", "upgrade_refusal"]


@dataclass(frozen=True, slots=True)
class HttpServices:
    """What the HTTP routes use of the gateway, and nothing else."""

    auth: Authenticator
    registry: RequestRegistry
    observer: GatewayObserver
    stats: LiveStats
    #: The web demo's files (None: not served).
    webui: Callable[[], WebUI | None]
    #: ``GET /v1/backend``: the backend's description (SPEC.md §8.3).
    backend_info: Callable[[], BackendInfo]
    #: Whether the gateway is shutting down (``/healthz`` says so; handshakes get 503).
    draining: Callable[[], bool]
    #: ``/metrics`` and ``/v1/stats`` are open to anyone (else only to a client key).
    stats_public: bool
    #: A cluster node's view of the cluster for ``/healthz`` (None: a single node).
    cluster_health: Callable[[], dict[str, object]] | None = None
    #: Traces (gateway/tracing.py; off: the no-op NO_TRACING).
    tracing: Tracing = NO_TRACING


_REQUESTS_PREFIX = "/v1/requests/"

_CANCEL_HTTP_STATUS = {
    CancelStatus.CANCELLED: HTTPStatus.OK,
    CancelStatus.ALREADY_CANCELLED: HTTPStatus.OK,
    CancelStatus.ALREADY_COMPLETED: HTTPStatus.CONFLICT,
    CancelStatus.NOT_FOUND: HTTPStatus.NOT_FOUND,
}


def _json(status: HTTPStatus, body: object) -> HttpResponse:
    return HttpResponse(status, [("Content-Type", "application/json")], orjson.dumps(body))


def _error(status: HTTPStatus, code: ErrorCode, message: str) -> HttpResponse:
    return _json(status, {"error": {"code": code.value, "message": message}})


def _not_allowed(allow: str) -> HttpResponse:
    response = _error(HTTPStatus.METHOD_NOT_ALLOWED, ErrorCode.INVALID_FIELD, "method not allowed")
    response.headers.append(("Allow", allow))
    return response


def respond(services: HttpServices, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
    """The response to ``request`` (an awaitable only for what must ask the registry)."""
    path = request.path
    method = request.method
    if path.startswith(_REQUESTS_PREFIX):
        return _request_by_id(services, request, unquote(path[len(_REQUESTS_PREFIX) :]))
    if path == protocol.WS_PATH:
        # A plain GET (no Upgrade): what a WebSocket client would have been told.
        if method != "GET":
            return _not_allowed("GET")
        return _error(
            HTTPStatus.UPGRADE_REQUIRED, ErrorCode.INVALID_FIELD, "this endpoint is a WebSocket"
        )
    if path == STATS_PATH:
        if method != "GET":
            return _not_allowed("GET")
        return _stats_refused(services, request) or _json(HTTPStatus.OK, services.stats.snapshot())
    if path == "/v1/backend":
        if method != "GET":
            return _not_allowed("GET")
        return _json(HTTPStatus.OK, services.backend_info().as_json())
    if path == "/healthz":
        if method != "GET":
            return _not_allowed("GET")
        if services.draining():
            return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "draining"})
        if services.cluster_health is not None:
            return _json(HTTPStatus.OK, {"status": "ok", "cluster": services.cluster_health()})
        return _json(HTTPStatus.OK, {"status": "ok"})
    if path == "/metrics":
        if method != "GET":
            return _not_allowed("GET")
        return _stats_refused(services, request) or HttpResponse(
            HTTPStatus.OK,
            [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")],
            services.observer.render(),
        )
    webui = services.webui()
    if webui is not None and webui.owns(path):
        if method != "GET":
            return _not_allowed("GET")
        page = webui.respond(path)
        if page is not None:
            return page
        return _error(
            HTTPStatus.NOT_FOUND,
            ErrorCode.INVALID_FIELD,
            "the web demo is not built: cd web-demo && npm ci && npm run build",
        )
    return _error(HTTPStatus.NOT_FOUND, ErrorCode.INVALID_FIELD, "no such endpoint")


def upgrade_refusal(services: HttpServices, request: HttpRequest) -> HttpResponse | None:
    """Why a WebSocket handshake (``/v1/ws`` or the stats feed) may not start (None: it may)."""
    if request.method != "GET":
        return _not_allowed("GET")
    if request.path == STATS_PATH:
        return _stats_refused(services, request)  # the feed is refused before the handshake
    if services.draining():
        return _error(HTTPStatus.SERVICE_UNAVAILABLE, ErrorCode.UNAVAILABLE, "shutting down")
    return None


def _stats_refused(services: HttpServices, request: HttpRequest) -> HttpResponse | None:
    """``/metrics`` and ``/v1/stats`` (snapshot and feed), SPEC.md §8.3: open to anyone unless
    auth is on and ``stats_public`` is false; then only a valid client key (an operator; a
    user's token is not one) gets in. None: go on; else the refusal (401, or 400 for a
    malformed X-Muxi-User-Id)."""
    if services.stats_public or not services.auth.required:
        return None
    try:
        principal = services.auth.from_http_headers(request.headers)
    except AuthError as exc:
        return _error(HTTPStatus(exc.http_status), ErrorCode(exc.code), exc.message)
    if principal.kind != "client_key":
        return _error(
            HTTPStatus.UNAUTHORIZED, ErrorCode.UNAUTHORIZED, "the stats need a client key"
        )
    return None


def _request_by_id(
    services: HttpServices, request: HttpRequest, request_id: str
) -> HttpResponse | Awaitable[HttpResponse]:
    key = _request_key(services, request, request_id)
    if isinstance(key, HttpResponse):
        return key
    if request.method == "DELETE":
        # Answered in the callback that read the request: the cancel takes effect before the
        # transport reads another byte (unless another node of a cluster must be asked).
        status = services.registry.cancel_now(key, CancelReason.API)
        if status is None:
            return _cancel_elsewhere(services, key, _traceparent(services, request))
        return _cancelled(request_id, status)
    return _status(services, key, _traceparent(services, request))


def _traceparent(services: HttpServices, request: HttpRequest) -> str | None:
    return traceparent_header(request.headers) if services.tracing.enabled else None


async def _cancel_elsewhere(
    services: HttpServices, key: RequestKey, traceparent: str | None = None
) -> HttpResponse:
    with services.tracing.span(
        "muxgate.cancel", traceparent=traceparent, **{"muxgate.request_id": key.request_id}
    ) as span:
        status = await services.registry.cancel(key, CancelReason.API)
        span.set("muxgate.cancel_status", status.value)
    return _cancelled(key.request_id, status)


async def _status(
    services: HttpServices, key: RequestKey, traceparent: str | None = None
) -> HttpResponse:
    with services.tracing.span(
        "muxgate.lookup", traceparent=traceparent, **{"muxgate.request_id": key.request_id}
    ):
        record = await services.registry.lookup(key)
    if record is None:
        return _json(
            HTTPStatus.NOT_FOUND,
            {"request_id": key.request_id, "status": CancelStatus.NOT_FOUND.value},
        )
    return _json(HTTPStatus.OK, record.to_json())


def _cancelled(request_id: str, status: CancelStatus) -> HttpResponse:
    return _json(_CANCEL_HTTP_STATUS[status], {"request_id": request_id, "status": status.value})


def _request_key(
    services: HttpServices, request: HttpRequest, request_id: str
) -> RequestKey | HttpResponse:
    """The caller's key for ``request_id``, or the error response (method, id, credentials)."""
    if request.method not in ("GET", "DELETE"):
        return _not_allowed("GET, DELETE")
    if not protocol.limits.REQUEST_ID_PATTERN.fullmatch(request_id):
        return _error(
            HTTPStatus.BAD_REQUEST,
            ErrorCode.INVALID_FIELD,
            "request_id must be 1-128 characters of [A-Za-z0-9._:-]",
        )
    try:
        user = services.auth.from_http_headers(request.headers).user_for(None)
    except AuthError as exc:
        return _error(HTTPStatus(exc.http_status), ErrorCode(exc.code), exc.message)
    return RequestKey(user, request_id)
