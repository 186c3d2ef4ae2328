"""The gateway core as an ASGI 3 application: mount it in any ASGI app, serve it with any ASGI
server (uvicorn, hypercorn), for teams that already run a Python web app.

    gateway = Gateway(load_config())
    muxgate = asgi_app(gateway)
    app.mount("/muxgate", muxgate)  # clients connect to http://host:port/muxgate

The same :class:`~gateway.server.Gateway` serves both transports: the same protocol, routes and
limits. Nothing here imports a web framework; it speaks the ASGI spec only.

Paths are the gateway's own below the mount point (``scope["root_path"]``): ``/v1/ws`` and
``/v1/stats`` as WebSockets, ``/v1/requests/{id}``, ``/healthz``, ``/metrics``... over HTTP,
exactly as on the gateway's own port. The SDK takes the mount URL as its gateway URL.

Lifespan: a top-level app starts the core at ``lifespan.startup`` and drains it at
``lifespan.shutdown``. Frameworks do not pass lifespan events to mounted apps: there, enter
:meth:`AsgiGateway.running` in the host app's own lifespan. A core started by its owner
(``await gateway.start(listen=False)``) is served as it is and left to that owner.

What differs from the gateway's own transport (gateway.transport), all of it the ASGI
server's: a message reaches the gateway one loop turn after the server read it (the server's
task, then ours), not in the read callback; the largest message and the bytes read before
authentication are bounded by the server's own limit first (uvicorn ``--ws-max-size``; the
gateway then closes 1009 above ``max_frame_bytes``); HTTP keep-alive, pings and TCP aborts are
the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any, Final
from urllib.parse import quote, unquote

import structlog
from websockets.datastructures import Headers
from websockets.exceptions import (
    ConnectionClosed,
    ConnectionClosedError,
    InvalidHeader,
    NegotiationError,
)
from websockets.frames import Close
from websockets.typing import Subprotocol

from .server import WRITE_LIMIT, Gateway
from .transport import MAX_REQUEST_BODY, HttpRequest, HttpResponse, WebSocketHandler

__all__ = ["AsgiGateway", "AsgiWebSocket", "Receive", "Scope", "Send", "asgi_app"]

log = structlog.get_logger("muxgate.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: The ASGI extension that lets an app answer a WebSocket handshake with an HTTP response.
_HTTP_RESPONSE_EXTENSION: Final = "websocket.http.response"
_OPEN, _CLOSING, _CLOSED = 0, 1, 2
#: RFC 6455: a frame from a client carries 2 bytes of header and 4 of mask, plus 2 or 8 for a
#: payload of 126 bytes or more (counted against the pre-authentication budget, see limit_input).
_CLIENT_FRAME_HEADER = 6


def asgi_app(gateway: Gateway) -> AsgiGateway:
    """The ASGI 3 application serving ``gateway`` (see :class:`AsgiGateway`)."""
    return AsgiGateway(gateway)


class AsgiGateway:
    """An ASGI 3 application over a :class:`Gateway` core: ``lifespan``, ``http``,
    ``websocket`` scopes."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        #: Whether this app started the core (so its lifespan shutdown drains it).
        self._owns_core = False

    # -- the core's life -----------------------------------------------------------------------

    async def startup(self) -> None:
        """Start the core without a listener of its own, unless its owner already did."""
        if self.gateway.started:
            return
        await self.gateway.start(listen=False)
        self._owns_core = True

    async def shutdown(self) -> None:
        """Drain the core (SPEC.md §5.7) if :meth:`startup` started it."""
        if self._owns_core:
            self._owns_core = False
            await self.gateway.shutdown()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Gateway]:
        """The core started for as long as the block runs: use it in the lifespan of the app
        this one is mounted in (frameworks do not pass lifespan events to mounted apps)."""
        await self.startup()
        try:
            yield self.gateway
        finally:
            await self.shutdown()

    # -- ASGI ----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            raise ValueError(f"unsupported ASGI scope type {kind!r}")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("asgi.startup_failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self.shutdown()
                except Exception as exc:
                    log.exception("asgi.shutdown_failed")
                    await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        # No route reads a body: it is read and dropped, up to the transport's bound.
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > MAX_REQUEST_BODY:
                await _respond(send, scope["method"], _plain(413, "request body too large"))
                return
            if not message.get("more_body", False):
                break
        request = _request(scope)
        if request is None:
            await _respond(send, scope["method"], _plain(400, "invalid header value"))
            return
        await _respond(send, request.method, await self._answer(request))

    async def _answer(self, request: HttpRequest) -> HttpResponse:
        """The gateway's answer to a plain HTTP request (as its own transport gives it)."""
        if not self.gateway.started:
            log.error("asgi.not_started", detail=_NOT_STARTED)
            return _plain(HTTPStatus.SERVICE_UNAVAILABLE, _NOT_STARTED)
        try:
            answer = self.gateway.http(request)
            if not isinstance(answer, HttpResponse):
                answer = await answer
        except Exception:
            log.exception("http.handler_failed")
            return _plain(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")
        return answer

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return  # the client left before the handshake
        gateway = self.gateway
        request = _request(scope)
        if request is None:
            await _deny(scope, send, _plain(400, "invalid header value"))
            return
        if not gateway.started or not gateway.is_websocket(request):
            # A path the gateway does not serve as a WebSocket: what an HTTP request gets.
            await _deny(scope, send, await self._answer(request))
            return
        refusal = gateway.upgrade(request)
        if refusal is not None:
            await _deny(scope, send, refusal)
            return
        offered = [Subprotocol(name) for name in scope.get("subprotocols") or ()]
        try:
            subprotocol = gateway.select_subprotocol(offered)
        except NegotiationError as exc:  # what websockets answers the gateway's own transport
            await _deny(
                scope, send, _plain(400, f"Failed to open a WebSocket connection: {exc}.\n")
            )
            return
        await send({"type": "websocket.accept", "subprotocol": subprotocol})
        socket = AsgiWebSocket(
            send, request, subprotocol, max_message_bytes=gateway.max_message_bytes
        )
        await socket.serve(lambda: gateway.opened(request, socket), receive)


_NOT_STARTED = (
    "the muxgate gateway is not started: serve the ASGI app with lifespan events, or enter "
    "AsgiGateway.running() in the lifespan of the app it is mounted in"
)


class AsgiWebSocket:
    """One accepted WebSocket over ASGI: the gateway's channel (gateway.connection.Channel)
    and stats feed socket (gateway.stats.FeedSocket).

    The ASGI ``send`` is a coroutine; the gateway writes synchronously. Frames go to a bounded
    queue that one sender task hands to the server, in order. The queue plays the transport's
    write buffer: above ``high`` bytes ``writable()`` is false and ``send`` waits until it is
    down to ``low``, so the outbound path writes synchronously while the client keeps up, and
    waits (watched by the gateway's slow-consumer watchdog) when it does not.

    Reading: a receive loop hands each message to the handler; ``pause_reading`` stops it
    calling ``receive()`` (the server then stops reading the socket: TCP backpressure).
    """

    __slots__ = (
        "_close_code",
        "_ended",
        "_handler",
        "_high",
        "_input_budget",
        "_low",
        "_max_message_bytes",
        "_paused",
        "_queue",
        "_queued",
        "_reading",
        "_room",
        "_send",
        "_sender",
        "_state",
        "_wakeup",
        "request",
        "subprotocol",
    )

    def __init__(
        self,
        send: Send,
        request: HttpRequest,
        subprotocol: Subprotocol | None,
        *,
        max_message_bytes: int,
        high: int = WRITE_LIMIT,
    ) -> None:
        self.request = request
        self.subprotocol = subprotocol
        self._send = send
        self._max_message_bytes = max_message_bytes
        self._high = high
        self._low = high // 4  # asyncio's default low-water mark for a high one
        #: Messages not handed to the server yet, then the close frame (code, reason) if any.
        self._queue: deque[tuple[bytes, bool] | Close] = deque()
        self._queued = 0
        #: Over the high-water mark, until down to the low one (the transport's flow control).
        self._paused = False
        self._room: asyncio.Future[None] | None = None
        self._wakeup = asyncio.Event()
        self._state = _OPEN
        self._close_code: int | None = None
        self._reading = asyncio.Event()
        self._reading.set()
        self._input_budget: int | None = None
        #: Set once the connection is over (the client left, or it was aborted).
        self._ended = asyncio.Event()
        self._handler: WebSocketHandler | None = None
        self._sender: asyncio.Task[None] | None = None

    # -- state ---------------------------------------------------------------------------------

    @property
    def open(self) -> bool:
        return self._state == _OPEN

    @property
    def close_code(self) -> int | None:
        """The code the server reported when the connection ended (None while it lasts)."""
        return self._close_code

    @property
    def buffered(self) -> int:
        """Bytes written and not yet taken by the ASGI server."""
        return self._queued

    def writable(self) -> bool:
        """Open, and the queue under its high-water mark."""
        return self._state == _OPEN and not self._paused

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def limit_input(self, limit: int | None) -> None:
        """Close 1009 once more than ``limit`` bytes arrive before the limit is lifted. Best
        effort: the server has read the whole message by then (its own size limit bounds it)."""
        self._input_budget = limit

    # -- writing -------------------------------------------------------------------------------

    def write(self, data: bytes, text: bool) -> None:
        """Queue one message (one frame). Raises ConnectionClosed once closing."""
        if self._state != _OPEN:
            raise self._closed_exc()
        self._queue.append((data, text))
        self._queued += len(data)
        if self._queued > self._high:
            self._paused = True
        self._wakeup.set()

    async def send(self, data: bytes, text: bool) -> None:
        """Queue one message once the queue is down to its low-water mark."""
        while self._state == _OPEN and self._paused:
            room = self._room
            if room is None:
                room = self._room = asyncio.get_running_loop().create_future()
            await asyncio.shield(room)
        self.write(data, text)

    def fail(self, code: int, reason: str) -> None:
        """Close now: the close frame follows what was written, nothing more is accepted."""
        if self._state == _OPEN:
            self._state = _CLOSING
            self._queue.append(Close(code, reason))
            self._wakeup.set()
            self._free_room()

    async def close(self, code: int, reason: str, close_timeout: float = 10.0) -> None:
        """Send the close frame after what was written; drop the connection if the server has
        not finished with it within ``close_timeout`` (a client that does not read)."""
        self.fail(code, reason)
        try:
            async with asyncio.timeout(close_timeout):
                await self._ended.wait()
        except TimeoutError:
            self.abort()

    def abort(self) -> None:
        """End the connection now: nothing more is sent, the handler is told it is lost and
        the ASGI app returns (the server closes the TCP connection)."""
        self._end(1006)

    def _closed_exc(self) -> ConnectionClosed:
        code = self._close_code
        return ConnectionClosedError(None, Close(code, "") if code is not None else None)

    def _free_room(self) -> None:
        room, self._room = self._room, None
        if room is not None and not room.done():
            room.set_result(None)

    def _end(self, code: int) -> None:
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        if self._close_code is None:
            self._close_code = code
        self._queue.clear()
        self._queued = 0
        self._paused = False
        self._free_room()  # a sender waiting for room finds the connection closed
        self._reading.set()
        self._ended.set()

    async def _sender_loop(self) -> None:
        queue, send = self._queue, self._send
        try:
            while True:
                if not queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                item = queue.popleft()
                if isinstance(item, Close):
                    await send(
                        {"type": "websocket.close", "code": item.code, "reason": item.reason}
                    )
                    return
                data, text = item
                if text:
                    await send({"type": "websocket.send", "text": data.decode()})
                else:
                    await send({"type": "websocket.send", "bytes": data})
                self._queued -= len(data)
                if self._paused and self._queued <= self._low:
                    self._paused = False
                    self._free_room()
        except Exception:  # the server refuses to send (the client left): the connection ends
            self._end(1006)

    # -- the connection ------------------------------------------------------------------------

    async def serve(self, opened: Callable[[], WebSocketHandler], receive: Receive) -> None:
        """Run the accepted connection: ``opened()`` gives its handler; messages go to it until
        the client leaves or the connection is aborted; then it is told it is lost (G7:
        everything of the connection stops) and nothing of it is left running."""
        self._sender = asyncio.create_task(self._sender_loop(), name="muxgate-asgi-sender")
        reader: asyncio.Task[None] | None = None
        try:
            self._handler = opened()
            reader = asyncio.create_task(self._receive_loop(receive), name="muxgate-asgi-reader")
            await self._ended.wait()
        finally:
            self._end(1006)
            for task in (reader, self._sender):
                if task is not None and not task.done():
                    task.cancel()
            handler, self._handler = self._handler, None
            if handler is not None:
                handler.lost()
            await asyncio.gather(
                *(t for t in (reader, self._sender) if t is not None), return_exceptions=True
            )
            # A cancelled task keeps its CancelledError, whose traceback holds the task's frame,
            # which holds this socket: a reference cycle while the socket holds the task.
            self._sender = None

    async def _receive_loop(self, receive: Receive) -> None:
        reading = self._reading
        try:
            while True:
                await reading.wait()
                message = await receive()
                kind = message["type"]
                if kind == "websocket.receive":
                    await reading.wait()  # paused while this one was awaited: it waits too
                    data = message.get("bytes")
                    if data is not None:
                        self._received(data, False)
                    else:
                        self._received(message.get("text", "").encode(), True)
                elif kind == "websocket.disconnect":
                    self._end(int(message.get("code", 1005)))
                    return
        except Exception:
            log.exception("asgi.receive_failed")
            self._end(1011)

    def _received(self, data: bytes, text: bool) -> None:
        handler = self._handler
        if self._state != _OPEN or handler is None:
            return  # closing: what the client still sends is read and dropped
        size = len(data)
        if size > self._max_message_bytes:
            self.fail(1009, "message too big")
            return
        budget = self._input_budget
        if budget is not None:
            size += _CLIENT_FRAME_HEADER + (2 if size >= 126 else 0) + (6 if size >= 65_536 else 0)
            if size > budget:
                self.fail(1009, "frame too large before authentication")
                return
        try:
            handler.message(data, text)
        except Exception:
            log.exception("asgi.handler_failed")
            self.fail(1011, "internal error")
            return
        if self._input_budget is not None:  # still limited after the message was handled
            self._input_budget -= size


# -- scope to request, response to messages ------------------------------------------------------


def _request(scope: Scope) -> HttpRequest | None:
    """The request as the gateway's own transport gives it, its path below the mount point;
    None when a header value holds a control byte (servers may pass them; websockets' headers
    do not take them: the request is refused with 400, as by the gateway's own transport)."""
    query = scope.get("query_string", b"")
    target = _route(scope) + ("?" + query.decode("latin-1") if query else "")
    client = scope.get("client")
    try:
        headers = Headers(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in scope["headers"]
        )
    except InvalidHeader:
        return None
    return HttpRequest(
        method=scope.get("method", "GET"),
        target=target,
        headers=headers,
        peer=str(client[0]) if client else "",
    )


def _route(scope: Scope) -> str:
    """The request's path below ``root_path``, percent-encoded as sent where the server says
    (``raw_path``): the gateway decodes its path segments itself."""
    root: str = scope.get("root_path") or ""
    path: str = scope["path"]
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        path = path[len(root) :]  # servers and frameworks put the mount point in path...
    raw: bytes | None = scope.get("raw_path")
    if raw:
        sent = raw.decode("latin-1").partition("?")[0]
        encoded_root = quote(root)
        if root and sent.startswith(encoded_root):
            sent = sent[len(encoded_root) :]
        if unquote(sent) == path:  # ...not always in raw_path, which they may not set at all
            return sent or "/"
    return quote(path) or "/"


def _plain(status: int, text: str) -> HttpResponse:
    return HttpResponse(status, [("Content-Type", "text/plain; charset=utf-8")], text.encode())


def _headers(response: HttpResponse) -> list[tuple[bytes, bytes]]:
    headers = [
        (name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in response.headers
    ]
    headers.append((b"content-length", str(len(response.body)).encode()))
    return headers


async def _respond(send: Send, method: str, response: HttpResponse) -> None:
    await send(
        {"type": "http.response.start", "status": response.status, "headers": _headers(response)}
    )
    await send({"type": "http.response.body", "body": b"" if method == "HEAD" else response.body})


async def _deny(scope: Scope, send: Send, response: HttpResponse) -> None:
    """Refuse a WebSocket handshake with ``response`` where the server can say it (the
    ``websocket.http.response`` extension); elsewhere the server answers 403."""
    if _HTTP_RESPONSE_EXTENSION in (scope.get("extensions") or {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": response.status,
                "headers": _headers(response),
            }
        )
        await send({"type": "websocket.http.response.body", "body": response.body})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": ""})
