"""One WebSocket connection: authenticate, read and decode frames, run the writer, close.

This is the I/O edge. Frames are decoded by ``protocol``; each valid message goes to the
:class:`Multiplexer`, each invalid one gets its ``error`` (G6). Everything written goes
through the connection's :class:`Outbound` (synchronous writes while the socket takes data, a
writer task while it does not). Whatever ends the connection (client close, slow consumer,
flood, shutdown), the ``finally`` cancels its requests with reason "disconnect" (G7) and stops
the writer, so nothing of it is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, cast

import structlog
from websockets.asyncio.server import ServerConnection, broadcast
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import Event, State

import protocol
from protocol import (
    Cancel,
    ClientMessage,
    CloseCode,
    Codec,
    Error,
    ErrorCode,
    Hello,
    Limits,
    RemoteProtocolError,
    Sender,
    Welcome,
)

from .auth import AuthError, Principal
from .multiplexer import Multiplexer
from .outbound import Outbound, SlowConsumer

if TYPE_CHECKING:
    from .server import Gateway

__all__ = ["Connection", "EagerServerConnection"]

log = structlog.get_logger("muxgate.connection")


class _Closing(Exception):
    """Internal: end the connection with this close code and reason."""

    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class EagerServerConnection(ServerConnection):
    """websockets' server connection plus two hooks, so that a cancel takes effect in the loop
    turn that read it: a complete data frame may be taken by ``read_early`` instead of being
    queued for ``recv()``; an HTTP request may be answered by ``answer_early`` (the class's,
    set per gateway) before the handler task's turn, which then sends ``early_response``.

    Why: a cancel is the one message whose latency is the product. Queued, it waits for the
    reader (or handler) task's next turn, behind every callback already scheduled (under load,
    hundreds of token wake-ups). Order is kept: ``read_early`` is offered a frame only when no
    message is queued before it (``queued``: messages handed to the queue and not yet taken by
    recv()); an HTTP request is the only message of its connection. ``process_event`` is
    websockets' per-event step (ServerConnection overrides it for the handshake), not a
    documented hook: if a release stopped calling it, cancels would take the usual path again,
    and the tests that count early cancels would say so.
    """

    #: ``(connection, request) -> response or None`` (None: the usual path).
    answer_early: Callable[[ServerConnection, Request], Response | None] | None = None
    #: ``request -> bytes or None``: the largest frame this connection takes until it has
    #: authenticated (None: ``max_size``). Decided on the handshake request, before the 101
    #: is written, so no frame of the client's can be parsed under the larger limit.
    preauth_max_size: Callable[[Request], int | None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_early: Callable[[Frame], bool] | None = None
        self.queued = 0
        self.early_response: Response | None = None
        #: Bytes of frames ``read_early`` may still take in this ``data_received`` call.
        self.early_budget = 0

    def data_received(self, data: bytes) -> None:
        # One read's worth of early work is bounded (a read may hold hundreds of frames): the
        # rest goes through recv(), whose bounded queue pauses reading (TCP backpressure).
        self.early_budget = EARLY_BYTES_PER_READ
        super().data_received(data)

    def process_event(self, event: Event) -> None:
        if isinstance(event, Request) and self.request is None:
            cls = type(self)
            if cls.preauth_max_size is not None:
                limit = cls.preauth_max_size(event)
                if limit is not None:
                    self.protocol.max_message_size = limit
            answer_early = cls.answer_early
            if answer_early is not None:
                try:
                    self.early_response = answer_early(self, event)
                except Exception:  # a bug: the usual path answers (or fails) on its own
                    log.exception("connection.answer_early_failed")
        elif isinstance(event, Frame) and event.opcode in _DATA_OPCODES:
            read_early = self.read_early
            if (
                read_early is not None
                and self.queued == 0
                and event.fin
                and event.opcode is not Opcode.CONT
                and len(event.data) <= self.early_budget
                and self._try_early(read_early, event)
            ):
                return
            if event.fin:
                self.queued += 1
        super().process_event(event)

    def _try_early(self, read_early: Callable[[Frame], bool], frame: Frame) -> bool:
        self.early_budget -= len(frame.data)
        try:
            return read_early(frame)
        except Exception:  # a bug: decline, the usual path handles (or refuses) the frame
            log.exception("connection.read_early_failed")
            self.read_early = None  # once is enough: no traceback per frame
            return False


_DATA_OPCODES = (Opcode.TEXT, Opcode.BINARY, Opcode.CONT)
#: Frames answered early per read (bytes): ~350 cancels, well under a millisecond of work.
EARLY_BYTES_PER_READ = 16_384
#: Before authentication, a connection's frames are at most this large: a ``hello`` with the
#: largest token and client key fits (SPEC.md §4.4); a 1 MiB frame of junk is refused by
#: websockets from its header (1009) before its payload is read.
PREAUTH_MAX_FRAME_BYTES = 16_384
#: Messages handled before the reader yields to the loop (other connections' callbacks run).
MESSAGES_PER_TURN = 64
#: A rate excess ends (for the 4029 rule) once no message was refused for this long.
RATE_EXCESS_QUIET = 1.0
#: Only frames holding this are decoded early: chats, pings and hellos take the usual path.
_CANCEL_MARK = {Codec.JSON: b'"cancel"', Codec.MSGPACK: b"\xa6cancel"}
#: Rate tokens a frame refused for carrying too many messages costs: what the most messages a
#: frame may carry would have cost, plus one.
_FRAME_COST = protocol.limits.MAX_BATCH_MESSAGES + 1


class Connection:
    def __init__(self, gateway: Gateway, ws: ServerConnection) -> None:
        self.gateway = gateway
        self.ws = ws
        self.id = secrets.token_hex(8)
        self.codec = Codec.from_subprotocol(ws.subprotocol)
        config = gateway.config
        # The transport's high-water mark, as websockets set it (``write_limit``): above it,
        # frames wait for the drain in the writer task instead of being written at once.
        self._high_water = ws.transport.get_write_buffer_limits()[1]
        self.outbound = Outbound(
            self._send,
            self.codec,
            write=self._write,
            writable=self._writable,
            max_batch_bytes=config.max_batch_bytes,
            max_pending_chars=config.max_pending_chars,
            max_control=config.max_control_messages,
            slow_consumer_timeout=config.slow_consumer_timeout,
        )
        self.mux: Multiplexer | None = None
        self._text = self.codec.is_text
        # Token bucket for inbound messages (SPEC.md §7: rate_limited, then close 4029).
        self._tokens = float(config.rate_burst)
        self._refill_at = time.monotonic()
        self._strikes = 0
        #: Start and last refusal of the current rate excess (None: not exceeding).
        self._excess_since: float | None = None
        self._last_refusal = 0.0
        # SPEC.md §4.4: handshake credentials are checked now but decided on the first
        # message, since a hello may replace them.
        self._headers = ws.request.headers if ws.request is not None else {}
        self._principal: Principal | None = None
        self._auth_error: AuthError | None = None
        try:
            self._principal = gateway.auth.from_headers(self._headers)
        except AuthError as exc:
            self._auth_error = exc
        #: Counted against the gateway's budget for connections that have not authenticated
        #: until this is True (credentials in the handshake, or a welcomed hello).
        self.authenticated = self._principal is not None
        #: True while the reader task waits in recv() (not while it handles a message).
        self._waiting = False
        #: Cancels answered in the loop turn that read them (see EagerServerConnection).
        self.cancels_read_early = 0
        #: Set once run() has ended: everything of this connection is stopped.
        self.finished = asyncio.Event()
        #: The messages of the next frame recv() returns, decoded by _read_early and declined.
        self._predecoded: list[protocol.Message | RemoteProtocolError] | None = None
        if isinstance(ws, EagerServerConnection):
            ws.read_early = self._read_early

    async def _send(self, frame: bytes) -> None:
        await self.ws.send(frame, text=self._text)

    def _writable(self) -> bool:
        ws = self.ws
        return (
            ws.protocol.state is State.OPEN
            and ws.transport.get_write_buffer_size() <= self._high_water
        )

    def _write(self, frame: bytes) -> None:
        # websockets' public synchronous write (no await, no flow control: _writable is ours).
        # A failed write raises (ExceptionGroup); the writer task then ends the connection.
        broadcast((self.ws,), frame, text=self._text, raise_exceptions=True)

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        writer = asyncio.create_task(self.outbound.run(), name=f"muxgate-writer-{self.id}")
        writer.add_done_callback(self._writer_done)
        try:
            await self._read_loop()
        except _Closing as closing:
            await self._flush_and_close(closing.code, closing.reason)
        except ConnectionClosed:
            pass
        finally:
            if self.mux is not None:
                self.mux.disconnect()
            self.outbound.close()
            writer.cancel()
            with contextlib.suppress(BaseException):
                await writer
            log.debug("connection.closed", connection_id=self.id, close_code=self.ws.close_code)
            self.finished.set()

    async def _read_loop(self) -> None:
        headers = self._headers
        hello_timeout = None if self._principal is not None else self.gateway.config.hello_timeout
        recv = self._recv
        outbound = self.outbound
        # Messages handled since the reader last yielded: recv() returns without suspending
        # while frames are queued, so a flood would otherwise hold the loop (other clients
        # wait) for as long as it keeps the queue full.
        handled = 0
        while True:
            if outbound.closed:  # the writer ended it (4008, 1011): its close is under way
                await self._discard_until_closed()
                return
            if self.mux is None and hello_timeout is not None:
                try:
                    async with asyncio.timeout(hello_timeout):
                        data = await recv()
                except TimeoutError:
                    self._refuse(AuthError(ErrorCode.UNAUTHORIZED, "authentication required"))
            else:
                data = await recv()
            if self._text and isinstance(data, bytes):
                # SPEC.md §2.2: a binary frame on a JSON connection; nothing in it is processed.
                self._first_message_seen()
                if self._admit(None):  # bad input counts towards the rate like any message
                    self._error(ErrorCode.BAD_FRAME, "a JSON connection takes text frames only")
                continue
            results, self._predecoded = self._predecoded, None
            if results is None:
                results = protocol.decode(data, self.codec, Sender.CLIENT)
            for result in results:
                # Inbound backpressure: every message may queue an answer. A client that
                # sends faster than it reads waits here (then in websockets' bounded queue,
                # then in the kernel) instead of growing the gateway's memory. Only answers
                # count, not stream text: that has its own bound (max_pending_chars pauses the
                # pipeline), and a client behind on its streams must still be heard when it
                # cancels them, since a cancel is what shrinks its backlog.
                if outbound.control_backlog:
                    await outbound.control_room()
                    handled = 0
                elif handled >= MESSAGES_PER_TURN:
                    await asyncio.sleep(0)
                    handled = 0
                if outbound.closed:
                    break
                handled += 1
                if isinstance(result, RemoteProtocolError):
                    if result.message_type == "hello" and self.mux is None:
                        # SPEC.md §4.4 (5): a refused first hello closes, even in dev mode.
                        self._refuse_with(result.code, result.message)
                    self._first_message_seen()
                    # A refused frame costs what its messages would have (SPEC.md §7.1).
                    cost = _FRAME_COST if result.code is ErrorCode.FRAME_TOO_LARGE else 1
                    if self._admit(result, cost):
                        self._error(result.code, result.message, result.request_id)
                    continue
                message = cast(ClientMessage, result)  # decode(..., Sender.CLIENT) ensures it
                if not isinstance(message, Cancel) and not self._admit(message):
                    continue  # a cancel is never refused for rate (SPEC.md §7.1)
                if isinstance(message, Hello) and self.mux is None:
                    self._hello(message, headers)
                    continue
                self._first_message_seen()
                assert self.mux is not None
                await self.mux.dispatch(message)

    async def _recv(self) -> str | bytes:
        ws = self.ws
        self._waiting = True
        try:
            data = await ws.recv()
        finally:
            self._waiting = False
        if isinstance(ws, EagerServerConnection):
            ws.queued -= 1
        return data

    def _read_early(self, frame: Frame) -> bool:
        """Answer a frame of cancels now, in the loop turn that read it, if the reader task is
        waiting with nothing queued (so nothing read before it is still unhandled). Anything
        else — another message, a bad frame, a frame before authentication — is declined and
        takes the usual path through recv()."""
        mux = self.mux
        if (
            mux is None
            or not self._waiting
            or (frame.opcode is Opcode.TEXT) != self._text
            or self.outbound.control_backlog  # answers wait unwritten: the reader paces
        ):
            return False
        data = bytes(frame.data)
        if _CANCEL_MARK[self.codec] not in data:
            return False
        results = protocol.decode(data, self.codec, Sender.CLIENT)
        if not all(isinstance(r, Cancel) for r in results):
            # Declined: the frame is queued, and with nothing queued before it (see
            # EagerServerConnection), it is the next one recv() returns. Its messages are
            # decoded already: the reader takes them instead of decoding the frame again. (A
            # frame that is not UTF-8 never gets there: recv() closes with 1007 first.)
            self._predecoded = results
            return False
        for cancel in results:
            mux.cancel_now(cast(Cancel, cancel))
        self.cancels_read_early += len(results)
        return True

    def _hello(self, hello: Hello, headers: object) -> None:
        try:
            principal = self.gateway.auth.from_hello(
                hello,
                self._principal,
                headers=headers,  # type: ignore[arg-type]
            )
        except AuthError as exc:
            self._refuse(exc)  # SPEC.md §4.4 (5): a refused hello closes, even in dev mode
        self._welcome(principal)

    def _first_message_seen(self) -> None:
        """Anything but a hello came first: decide authentication with the handshake's."""
        if self.mux is not None:
            return
        if self._principal is None:
            self._refuse(
                self._auth_error or AuthError(ErrorCode.UNAUTHORIZED, "authentication required")
            )
        else:
            self._welcome(self._principal)

    def _refuse(self, exc: AuthError) -> NoReturn:
        self._refuse_with(exc.code, exc.message)

    def _refuse_with(self, code: ErrorCode | str, message: str) -> NoReturn:
        self._error(code, message)
        raise _Closing(CloseCode.UNAUTHORIZED, "unauthorized")

    def _welcome(self, principal: Principal) -> None:
        config = self.gateway.config
        self.mux = Multiplexer(self.gateway.multiplexer_services, self.outbound, principal)
        # Authenticated: frames up to the configured size (see PREAUTH_MAX_FRAME_BYTES), and
        # out of the budget for connections that have not authenticated.
        self.ws.protocol.max_message_size = config.max_frame_bytes
        if not self.authenticated:
            self.authenticated = True
            self.gateway.connection_authenticated(self)
        self.outbound.send_control(
            Welcome(
                connection_id=self.id,
                user_id=principal.default_user or None,
                limits=Limits(
                    max_streams=config.max_streams,
                    max_frame_bytes=config.max_frame_bytes,
                    max_batch_messages=protocol.limits.MAX_BATCH_MESSAGES,
                    max_timeout_ms=config.max_timeout_ms,
                ),
            )
        )

    def _admit(self, message: ClientMessage | RemoteProtocolError | None, cost: int = 1) -> bool:
        """Token bucket: refuse (rate_limited) beyond the rate; close 4029 if it goes on.

        "Goes on" (SPEC.md §7.1) is either of: more than ``rate_burst`` refusals in a row (a
        client that ignores ``rate_limited`` entirely), or refusals for ``rate_close_after``
        seconds with no quiet second between them (a client that keeps sending above the
        rate: the bucket refills, so some of its messages pass and the count in a row
        restarts, but the excess never stops)."""
        config = self.gateway.config
        now = time.monotonic()
        self._tokens = min(
            float(config.rate_burst), self._tokens + (now - self._refill_at) * config.rate_limit
        )
        self._refill_at = now
        cost = min(cost, config.rate_burst)  # a full bucket always admits one frame
        if self._tokens >= cost:
            self._tokens -= cost
            self._strikes = 0
            return True
        self._strikes += 1
        if self._excess_since is None or now - self._last_refusal > RATE_EXCESS_QUIET:
            self._excess_since = now
        self._last_refusal = now
        if self._strikes > config.rate_burst or now - self._excess_since >= config.rate_close_after:
            raise _Closing(CloseCode.RATE_LIMITED, "rate limit exceeded")
        self._error(
            ErrorCode.RATE_LIMITED,
            "too many messages; slow down",
            getattr(message, "request_id", None),
        )
        return False

    def _error(self, code: ErrorCode | str, message: str, request_id: str | None = None) -> None:
        self.gateway.observer.errors.labels(str(code)).inc()
        self.outbound.send_control(Error(code=str(code), message=message, request_id=request_id))

    def _writer_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, SlowConsumer):
            log.warning("connection.slow_consumer", connection_id=self.id, detail=str(exc))
            code, reason = CloseCode.SLOW_CONSUMER, "slow consumer"
        elif exc is None or isinstance(exc, ConnectionClosed):
            # The connection is gone: nothing more will be written. Close the outbound now, so
            # a reader waiting for room for its answers (control_room) goes on, finds the
            # connection closed and ends; the reader's own cleanup does the rest.
            self.outbound.close()
            return
        else:
            log.error("connection.writer_failed", connection_id=self.id, exc_info=exc)
            code, reason = CloseCode.INTERNAL_ERROR, "internal error"
        # Nothing more can be written: the requests stop now (G7), not when the TCP connection
        # finally dies, which for a peer that does not read may be much later.
        if self.mux is not None:
            self.mux.disconnect()
        self.outbound.close()
        self.gateway.track(asyncio.ensure_future(self.close(code, reason)))

    async def _flush_and_close(self, code: CloseCode, reason: str) -> None:
        """Give queued messages (the error explaining the close) a moment, stop the requests,
        then close."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self.outbound.flushed()
        # Nothing more will be sent. Stop the requests now (G7), not after the close handshake,
        # which a client that does not read stretches to the close timeout while its pipelines
        # go on spending tokens. The outbound closes first: no response is written any more.
        self.outbound.close()
        if self.mux is not None:
            self.mux.disconnect()
        discard = asyncio.create_task(self._discard_until_closed())
        try:
            await self.close(code, reason)
        finally:
            discard.cancel()

    async def _discard_until_closed(self) -> None:
        """Read and drop whatever the client still sends until its close frame arrives.

        Once the reader stops, websockets' queue of received frames fills and it stops reading
        the socket, so the client's close frame would never be read and the close handshake
        would last the whole close timeout (the connection's memory with it)."""
        ws = self.ws
        if isinstance(ws, EagerServerConnection):
            ws.read_early = None
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.recv(decode=False)

    async def close(self, code: CloseCode, reason: str) -> None:
        """Close with ``code``. A peer that does not read cannot take the close frame either
        (``close`` would wait for the socket to drain forever): drop the TCP connection after
        the close timeout."""
        try:
            async with asyncio.timeout(self.ws.close_timeout or 10.0):
                await self.ws.close(code, reason)
        except TimeoutError:
            self.ws.transport.abort()
