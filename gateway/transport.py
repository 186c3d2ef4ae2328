"""The gateway's own I/O: one :class:`asyncio.Protocol` per TCP connection.

A connection starts as HTTP/1.1, parsed by ``h11`` (keep-alive, pipelining in order); a
request carrying ``Upgrade: websocket`` for a path the application serves as a WebSocket is
handed to ``websockets``' sans-I/O :class:`~websockets.server.ServerProtocol` (its documented
flow: ``receive_data`` the request, ``accept``, ``send_response``), and from then on its
frames go straight from ``data_received`` to the application's handler.

Why own it (issue 15): the gateway decides when it reads and writes. A cancel in the bytes just
received is acted on in that very callback, with no task between the socket and the request;
frames the outbound path packs for many requests go out in one ``transport.write``; flow
control is the transport's own ``pause_writing``/``resume_writing``. Everything used of
``h11`` and ``websockets`` is their public, documented API.

Nothing here knows the muxgate protocol: the :class:`Application` answers HTTP requests, decides
whether an upgrade may proceed, and gives each WebSocket a :class:`WebSocketHandler`.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Protocol, cast

import h11
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidHeader
from websockets.frames import Frame, Opcode
from websockets.http11 import Request as HandshakeRequest
from websockets.protocol import Event, State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

__all__ = [
    "Application",
    "HttpConnection",
    "HttpRequest",
    "HttpResponse",
    "WebSocket",
    "WebSocketHandler",
]

log = logging.getLogger("muxgate.transport")

#: A request's body is not used by any route; it is read and dropped up to this size (413 above).
MAX_REQUEST_BODY = 65_536
#: After refusing a request: how long and how much of what the client still sends is read and
#: dropped before the connection is closed (so that the refusal is not lost to a reset).
LINGERING_SECONDS = 2.0
MAX_LINGERING_BYTES = 1 << 20
#: An HTTP connection whose answers wait unread (the write buffer over its high-water mark) is
#: closed after this many keep-alive periods without the client reading.
WRITE_STALL_FACTOR = 3
#: Request head limit: a larger one is a 431. h11's incomplete-event limit bounds a head still
#: arriving; one that arrives whole in a read is measured once parsed (_head_size).
MAX_REQUEST_HEAD = 16_384


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One HTTP request (or WebSocket handshake) as the application sees it."""

    method: str
    #: The request target: path and query, as sent.
    target: str
    headers: Headers
    #: The client's IP address.
    peer: str

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def wants_websocket(self) -> bool:
        return any("websocket" in v.lower() for v in self.headers.get_all("Upgrade"))


@dataclass(slots=True)
class HttpResponse:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


class WebSocketHandler(Protocol):
    """What runs over one open WebSocket (a muxgate connection, a stats subscriber)."""

    def message(self, data: bytes, text: bool) -> None:
        """One complete message (fragments joined), in the callback that read its last byte."""

    def lost(self) -> None:
        """The TCP connection is gone: nothing more is read or written."""


class Application(Protocol):
    """What the transport serves."""

    @property
    def max_message_bytes(self) -> int:
        """Largest WebSocket message accepted (websockets closes 1009 beyond it, from the
        frame's header)."""

    @property
    def subprotocols(self) -> Sequence[Subprotocol]: ...

    def select_subprotocol(self, offered: Sequence[Subprotocol]) -> Subprotocol | None: ...

    def http(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        """Answer a plain HTTP request (synchronously when it can: no task, no await)."""

    def is_websocket(self, request: HttpRequest) -> bool:
        """Whether this upgrade request is for a WebSocket the application serves."""

    def upgrade(self, request: HttpRequest) -> HttpResponse | None:
        """Refuse a WebSocket handshake before it starts (None: go on)."""

    def opened(self, request: HttpRequest, socket: WebSocket) -> WebSocketHandler:
        """A WebSocket is open: its handler (which may close it at once)."""

    def connection_made(self, conn: HttpConnection) -> None: ...

    def connection_lost(self, conn: HttpConnection) -> None: ...


class WebSocket:
    """One open WebSocket: websockets' sans-I/O protocol, written to the transport by us.

    ``write`` is synchronous (the frame is on the transport when it returns); callers check
    ``writable`` first, or ``await send``, which waits for the transport's buffer to drain.
    """

    __slots__ = (
        "_closed",
        "_drained",
        "_fragments",
        "_fragments_text",
        "_input_budget",
        "_paused",
        "handler",
        "last_received",
        "ping_sent_at",
        "protocol",
        "subprotocol",
        "transport",
    )

    def __init__(self, protocol: ServerProtocol, transport: asyncio.Transport) -> None:
        self.protocol = protocol
        self.transport = transport
        self.subprotocol = protocol.subprotocol
        self.handler: WebSocketHandler | None = None
        self._paused = False
        self._drained: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] | None = None
        #: A fragmented message being received (its size is bounded by websockets' max_size).
        self._fragments: bytearray | None = None
        self._fragments_text = False
        #: Loop time of the last bytes received / of an unanswered keep-alive ping.
        self.last_received = 0.0
        self.ping_sent_at: float | None = None
        #: Bytes that may still arrive before the handler lifts the limit (None: no limit).
        self._input_budget: int | None = None

    # -- state -------------------------------------------------------------------------------

    @property
    def open(self) -> bool:
        return self.protocol.state is State.OPEN

    @property
    def close_code(self) -> int | None:
        return self.protocol.close_code

    @property
    def remote_address(self) -> object:
        """The peer's address as the socket gives it (``(host, port)`` for TCP)."""
        return self.transport.get_extra_info("peername")

    @property
    def buffered(self) -> int:
        """Bytes written and not yet taken by the kernel."""
        return self.transport.get_write_buffer_size()

    def pause_reading(self) -> None:
        if not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def limit_input(self, limit: int | None) -> None:
        """Close 1009 once more than ``limit`` bytes arrive before the limit is lifted (e.g.
        before authentication: a large frame is refused before the rest of it is read)."""
        self._input_budget = limit

    def writable(self) -> bool:
        """Open, and the transport's buffer under its high-water mark."""
        return not self._paused and self.protocol.state is State.OPEN

    # -- writing -----------------------------------------------------------------------------

    def write(self, data: bytes, text: bool) -> None:
        """Write one message as one frame now. Raises ConnectionClosed once closing."""
        protocol = self.protocol
        if protocol.state is not State.OPEN:
            raise protocol.close_exc
        if text:
            protocol.send_text(data)
        else:
            protocol.send_binary(data)
        self.flush_output()

    async def send(self, data: bytes, text: bool) -> None:
        """Write one message once the transport's buffer has drained below its low-water mark."""
        while self._paused and self.protocol.state is State.OPEN:
            if self._drained is None:
                self._drained = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._drained)
        self.write(data, text)

    def ping(self, data: bytes = b"") -> None:
        if self.protocol.state is State.OPEN:
            self.protocol.send_ping(data)
            self.flush_output()

    def fail(self, code: int, reason: str) -> None:
        """Close at once, without waiting for the peer's close frame (a protocol violation)."""
        if self.protocol.state is State.OPEN:
            self.protocol.fail(code, reason)
            self.flush_output()

    async def close(self, code: int, reason: str, close_timeout: float = 10.0) -> None:
        """The closing handshake; a peer that does not answer within ``close_timeout`` (it may
        not be reading at all) loses the TCP connection."""
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code, reason)
            self.flush_output()
        try:
            async with asyncio.timeout(close_timeout):
                await self.wait_closed()
        except TimeoutError:
            self.transport.abort()

    async def wait_closed(self) -> None:
        if self.transport.is_closing() and self._closed is None:
            return  # connection_lost may already have run
        if self._closed is None:
            self._closed = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._closed)

    def abort(self) -> None:
        self.transport.abort()

    def flush_output(self) -> None:
        """Hand websockets' output to the transport; an empty chunk means: close the TCP
        connection (the server's side of the closing handshake, or a failure)."""
        transport = self.transport
        for data in self.protocol.data_to_send():
            if data:
                transport.write(data)
            else:
                transport.close()

    # -- events from the transport -------------------------------------------------------------

    def data_received(self, received: bytes, now: float) -> None:
        protocol = self.protocol
        self.last_received = now
        self.ping_sent_at = None  # anything received proves the peer alive
        protocol.receive_data(received)
        events = protocol.events_received()
        self.flush_output()  # pongs, close replies, failures: before anything the handler writes
        handler = self.handler
        if handler is None:
            return
        try:
            self._deliver(handler, events)
        except Exception:
            # A bug in a handler: this connection ends (1011) and says nothing more; the other
            # connections, and the loop, go on. Logged once, with the traceback.
            log.exception("websocket.handler_failed")
            self.handler = None
            self.fail(1011, "internal error")
            handler.lost()
            return
        budget = self._input_budget
        if budget is not None:  # still limited after this read's messages were handled
            budget = self._input_budget = budget - len(received)
            if budget < 0:
                self.fail(1009, "frame too large before authentication")

    def _deliver(self, handler: WebSocketHandler, events: list[Event]) -> None:
        """Each complete message (fragments joined) to the handler, in order."""
        for event in events:
            if not isinstance(event, Frame):
                continue
            opcode = event.opcode
            if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
                if event.fin:
                    data = event.data
                    handler.message(
                        data if type(data) is bytes else bytes(data), opcode is Opcode.TEXT
                    )
                else:
                    self._fragments = bytearray(event.data)
                    self._fragments_text = opcode is Opcode.TEXT
            elif opcode is Opcode.CONT and self._fragments is not None:
                self._fragments += event.data
                if event.fin:
                    whole, self._fragments = bytes(self._fragments), None
                    handler.message(whole, self._fragments_text)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def connection_lost(self) -> None:
        self.protocol.receive_eof()  # the state becomes CLOSED; close_code 1006 if abrupt
        # An abrupt end leaves websockets' parser exception (EOFError) with its traceback, whose
        # frame holds the protocol: a reference cycle keeping the connection's buffers until a
        # full collection. Only its type and message are read (close_exc's cause).
        failure = self.protocol.parser_exc
        if failure is not None:
            failure.__traceback__ = None
        self.resume_writing()  # a sender waiting for room finds the connection closed
        closed = self._closed
        if closed is None:
            closed = self._closed = asyncio.get_running_loop().create_future()
        if not closed.done():
            closed.set_result(None)
        handler, self.handler = self.handler, None
        if handler is not None:
            handler.lost()


class _ServerProtocol(ServerProtocol):
    """websockets' server protocol choosing subprotocols with the application's rule. Its
    ``select_subprotocol`` argument would be bound to the protocol object it is given to (a
    reference cycle: a closed connection's protocol and buffers freed only by the next full
    collection); an override is not."""

    def __init__(
        self,
        select: Callable[[Sequence[Subprotocol]], Subprotocol | None],
        *,
        subprotocols: Sequence[Subprotocol],
        max_size: int,
        logger: logging.Logger,
    ) -> None:
        super().__init__(subprotocols=subprotocols, max_size=max_size, logger=logger)
        self._select = select

    def select_subprotocol(self, subprotocols: Sequence[Subprotocol]) -> Subprotocol | None:
        return self._select(subprotocols)


class HttpConnection(asyncio.Protocol):
    """One TCP connection: HTTP/1.1 until a WebSocket upgrade, then that WebSocket."""

    def __init__(self, app: Application, *, write_limit: int, keepalive: float) -> None:
        self.app = app
        self._write_limit = write_limit
        self._keepalive = keepalive
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self._h11: h11.Connection | None = h11.Connection(
            h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD
        )
        self._request: h11.Request | None = None
        self._body = 0
        #: Set while an asynchronous answer is being computed (requests after it wait).
        self._busy = False
        self.websocket: WebSocket | None = None
        #: Loop time after which an idle HTTP connection is closed (None: not idle).
        self.deadline: float | None = None
        #: After a refusal: bytes still read and dropped before closing (see _refuse).
        self._lingering = 0
        #: The write buffer is over its high-water mark: no more requests are taken.
        self._write_paused = False
        self._loop = asyncio.get_running_loop()

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=self._write_limit)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
        self.deadline = self._loop.time() + self._keepalive
        self.app.connection_made(self)

    def data_received(self, data: bytes) -> None:
        websocket = self.websocket
        if websocket is not None:
            websocket.data_received(data, self._loop.time())
            return
        conn = self._h11
        if conn is None:
            self._lingering -= len(data)  # refused: read and dropped (see _refuse)
            if self._lingering < 0:
                self.close()
            return
        try:
            conn.receive_data(data)
        except RuntimeError:  # data after the client closed its side: nothing to answer
            return
        self._step()

    def eof_received(self) -> bool | None:
        if self.websocket is not None:
            self.websocket.protocol.receive_eof()
            self.websocket.flush_output()
            return None  # the transport closes itself
        if self._h11 is not None:
            with contextlib.suppress(RuntimeError):
                self._h11.receive_data(b"")
            if self._busy:
                return True  # half-closed: the pending answer is still written
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._h11 = None
        websocket = self.websocket
        if websocket is not None:
            websocket.connection_lost()
        self.app.connection_lost(self)

    def pause_writing(self) -> None:
        if self.websocket is not None:
            self.websocket.pause_writing()
            return
        # HTTP: a client that pipelines requests and does not read the answers stops being
        # read (TCP backpressure) instead of its answers piling up in the write buffer.
        self._write_paused = True
        # Not idle while answers wait to be read, but a client that stops reading for good is
        # dropped: the same deadline mechanism, longer.
        self.deadline = self._loop.time() + self._keepalive * WRITE_STALL_FACTOR
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.websocket is not None:
            self.websocket.resume_writing()
            return
        self._write_paused = False
        self.deadline = self._loop.time() + self._keepalive
        if self.transport is not None and not self.transport.is_closing() and not self._busy:
            self.transport.resume_reading()
            self._step()

    # -- HTTP ----------------------------------------------------------------------------------

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _step(self) -> None:
        """Take the parsed events: one request at a time, in order."""
        conn = self._h11
        while (
            conn is not None
            and not self._busy
            and not self._write_paused
            and self.websocket is None
        ):
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._refuse(exc.error_status_hint, str(exc))
                return
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.Request):
                if _head_size(event) > MAX_REQUEST_HEAD:
                    self._refuse(
                        HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large"
                    )
                    return
                self._request = event
                self._body = 0
                # Its body must keep coming: a client that stops half-way is closed like an
                # idle one (the deadline is lifted once the request is whole, below).
                self.deadline = self._loop.time() + self._keepalive
            elif isinstance(event, h11.Data):
                self.deadline = self._loop.time() + self._keepalive
                self._body += len(event.data)
                if self._body > MAX_REQUEST_BODY:
                    self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")
                    return
            elif isinstance(event, h11.EndOfMessage):
                request, self._request = self._request, None
                assert request is not None
                self.deadline = None
                self._dispatch(conn, request)
            elif event is h11.PAUSED:
                return  # an answer is on its way, or the client is switching protocols
            elif isinstance(event, h11.ConnectionClosed):
                self.close()
                return

    def _dispatch(self, conn: h11.Connection, event: h11.Request) -> None:
        try:
            headers = Headers(
                (name.decode("latin-1"), value.decode("latin-1"))
                for name, value in event.headers.raw_items()
            )
        except InvalidHeader:  # h11 lets control bytes through in values; websockets does not
            self._refuse(HTTPStatus.BAD_REQUEST, "invalid header value")
            return
        request = HttpRequest(
            method=event.method.decode("ascii", "replace"),
            target=event.target.decode("ascii", "replace"),
            headers=headers,
            peer=self.peer,
        )
        app = self.app
        if request.wants_websocket and app.is_websocket(request):
            if event.http_version != b"1.1":  # RFC 6455 §4.1: "at least 1.1"
                self._refuse(HTTPStatus.BAD_REQUEST, "a WebSocket handshake needs HTTP/1.1")
                return
            refusal = app.upgrade(request)
            if refusal is None:
                self._upgrade(conn, request)
                return
            refusal.headers.append(("Connection", "close"))
            self._respond(conn, request, refusal)
            return
        try:
            answer = app.http(request)
        except Exception:
            log.exception("http.handler_failed")
            answer = _plain(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")
        if isinstance(answer, HttpResponse):
            self._respond(conn, request, answer)
            return
        self._busy = True
        assert self.transport is not None
        self.transport.pause_reading()  # the requests after it wait, in order (and unread)
        task = asyncio.ensure_future(answer)
        task.add_done_callback(lambda t: self._answered(conn, request, t))

    def _answered(
        self, conn: h11.Connection, request: HttpRequest, task: asyncio.Future[HttpResponse]
    ) -> None:
        self._busy = False
        if self._h11 is not conn:  # the connection is gone
            return
        if task.cancelled() or task.exception() is not None:
            if not task.cancelled():
                log.error("http.handler_failed", exc_info=task.exception())
            response = _plain(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")
        else:
            response = task.result()
        self._respond(conn, request, response)
        if self.transport is not None and not self.transport.is_closing():
            if not self._write_paused:
                self.transport.resume_reading()
            self._step()

    def _respond(self, conn: h11.Connection, request: HttpRequest, response: HttpResponse) -> None:
        headers = [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Server", "muxgate"),
            *response.headers,
            ("Content-Length", str(len(response.body))),
        ]
        try:
            parts = [
                conn.send(
                    h11.Response(
                        status_code=response.status,
                        headers=headers,
                        reason=_phrase(response.status),
                    )
                )
                or b"",
            ]
            if response.body and request.method != "HEAD":
                parts.append(conn.send(h11.Data(data=response.body)) or b"")
            parts.append(conn.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError:
            log.exception("http.response_refused")
            self.close()
            return
        assert self.transport is not None
        self.transport.write(b"".join(parts))
        if conn.our_state is h11.MUST_CLOSE:
            self.close()
        elif conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()  # keep-alive: the next request (maybe already buffered)
            if not self._write_paused:  # else pause_writing set the longer deadline
                self.deadline = self._loop.time() + self._keepalive

    def _refuse(self, status: int, message: str) -> None:
        """A request h11 could not parse (or too large): answer if still possible, close."""
        conn = self._h11
        if conn is not None and conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with contextlib.suppress(h11.LocalProtocolError):
                body = message.encode()
                data = conn.send(
                    h11.Response(
                        status_code=status,
                        reason=_phrase(status),
                        headers=[
                            ("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body))),
                            ("Connection", "close"),
                        ],
                    )
                )
                data = (data or b"") + (conn.send(h11.Data(data=body)) or b"")
                data += conn.send(h11.EndOfMessage()) or b""
                assert self.transport is not None
                self.transport.write(data)
        self._h11 = None
        # A lingering close: closing with the client's bytes unread would reset the connection
        # (RST), and the client might lose the answer. Send FIN, drop what still comes, for a
        # bounded time and amount, then close.
        transport = self.transport
        if transport is None or not transport.can_write_eof():
            self.close()
            return
        transport.write_eof()
        self._lingering = MAX_LINGERING_BYTES
        self.deadline = self._loop.time() + LINGERING_SECONDS

    # -- the WebSocket handshake ---------------------------------------------------------------

    def _upgrade(self, conn: h11.Connection, request: HttpRequest) -> None:
        """websockets' documented server flow, fed the request h11 parsed (re-serialized: the
        sans-I/O protocol parses its own handshake) and whatever the client sent after it."""
        app = self.app
        transport = self.transport
        assert transport is not None
        protocol = _ServerProtocol(
            app.select_subprotocol,
            subprotocols=app.subprotocols,
            max_size=app.max_message_bytes,
            logger=_WEBSOCKETS_LOG,
        )
        trailing, _closed = conn.trailing_data
        self._h11 = None
        # Only what the handshake reads: the request's other headers (cookies, user agent) are
        # the application's, and websockets' parser would keep a second copy of them.
        handshake_headers = Headers(
            (name, value)
            for name, value in request.headers.raw_items()
            if name.lower() in _HANDSHAKE_HEADERS
        )
        handshake = HandshakeRequest(request.target, handshake_headers, request.method)
        protocol.receive_data(handshake.serialize())
        events = protocol.events_received()
        if not events or not isinstance(events[0], HandshakeRequest):
            # Beyond websockets' own limits though within h11's (more than 128 handshake
            # headers, a line over 8 KiB): websockets prepared its refusal (431, 414...).
            for data in protocol.data_to_send():
                if data:
                    transport.write(data)
            transport.close()
            return
        response = protocol.accept(events[0])
        if response.status_code == 101:
            response.headers["Server"] = "muxgate"
        protocol.send_response(response)
        websocket = WebSocket(protocol, transport)
        websocket.last_received = self._loop.time()
        self.websocket = websocket
        self.deadline = None
        websocket.flush_output()
        if protocol.state is not State.OPEN:
            return  # refused (400/426): websockets closes after its response
        websocket.handler = app.opened(request, websocket)
        if trailing:
            websocket.data_received(trailing, self._loop.time())


def _head_size(request: h11.Request) -> int:
    """The request head's size as sent, give or take its line endings and optional spaces."""
    size = len(request.method) + len(request.target) + 12  # "GET / HTTP/1.1\r\n"
    for name, value in request.headers.raw_items():
        size += len(name) + len(value) + 4  # ": " and "\r\n"
    return size


_HANDSHAKE_HEADERS = frozenset(
    {
        "host",
        "upgrade",
        "connection",
        "origin",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-protocol",
        "sec-websocket-extensions",
    }
)


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _plain(status: int, text: str) -> HttpResponse:
    return HttpResponse(status, [("Content-Type", "text/plain; charset=utf-8")], text.encode())


#: websockets logs every handshake at INFO: one record per connection is not worth its cost.
_WEBSOCKETS_LOG = logging.getLogger("muxgate.websockets")
_WEBSOCKETS_LOG.setLevel(logging.WARNING)


async def serve(
    app: Application,
    host: str,
    port: int,
    *,
    write_limit: int,
    keepalive: float,
    backlog: int = 2048,
) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    factory: Callable[[], asyncio.Protocol] = lambda: HttpConnection(  # noqa: E731
        app, write_limit=write_limit, keepalive=keepalive
    )
    return await loop.create_server(factory, host, port, backlog=backlog)


__all__ += ["ConnectionClosed", "serve"]
