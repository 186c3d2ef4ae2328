"""One muxgate connection over a WebSocket: authenticate, admit, decode, dispatch, close.

This is the protocol edge above the transport. Its :class:`Channel` (the gateway's own
transport, :mod:`gateway.transport`, or the ASGI adapter) hands it each complete message;
frames are decoded by ``protocol``; each valid message goes to the :class:`Multiplexer`, each
invalid one gets its ``error`` (G6). Everything written goes through the connection's
:class:`Outbound`. Whatever ends the connection (client close, slow consumer, flood,
shutdown), :meth:`Connection.lost` cancels its requests with reason "disconnect" (G7) and stops
the writer, so nothing of it is left running.

Messages are handled in the callback that delivered them — a cancel takes effect before the
transport reads another byte — in order, a bounded number per loop turn. While answers wait
unwritten (a client that sends faster than it reads), the connection stops reading: the
channel's ``pause_reading`` is TCP backpressure, and its queue of decoded messages is bounded by
what one read delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, cast

import structlog
from websockets.exceptions import ConnectionClosed

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

from .auth import Authenticator, AuthError, Principal
from .config import Config
from .multiplexer import Multiplexer, MultiplexerServices
from .observability import GatewayObserver
from .outbound import Outbound, SlowConsumer
from .tracing import traceparent_header

__all__ = ["Channel", "Connection", "ConnectionServices"]

log = structlog.get_logger("muxgate.connection")

#: Before authentication, a connection may send this many bytes (a ``hello`` with the largest
#: token and client key fits, SPEC.md §4.4, plus a frame header); beyond, it closes 1009 before
#: the rest of a large frame is read.
PREAUTH_MAX_FRAME_BYTES = 16_384
#: Messages handled per loop turn: other connections' callbacks run between turns.
MESSAGES_PER_TURN = 64
#: A rate excess ends (for the 4029 rule) once no message was refused for this long.
RATE_EXCESS_QUIET = 1.0
#: Rate tokens a frame refused for carrying too many messages costs: what the most messages a
#: frame may carry would have cost, plus one.
_FRAME_COST = protocol.limits.MAX_BATCH_MESSAGES + 1
#: RFC 6455: a text frame that is not UTF-8.
_INVALID_DATA = 1007
#: Close timeout: a peer that does not answer a close frame within it loses the TCP connection.
CLOSE_TIMEOUT = 10.0


class Channel(Protocol):
    """What a connection needs of its WebSocket (see gateway.transport.WebSocket)."""

    @property
    def close_code(self) -> int | None: ...

    def writable(self) -> bool:
        """Whether ``write`` may be called now (open, buffer under its high-water mark)."""

    def write(self, data: bytes, text: bool) -> None:
        """One message as one frame, now. Raises ConnectionClosed once closing."""

    async def send(self, data: bytes, text: bool) -> None:
        """One message, once the peer has taken what was written before."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def limit_input(self, limit: int | None) -> None:
        """Close 1009 once more than ``limit`` bytes arrive (None: no limit but the frame's)."""

    def fail(self, code: int, reason: str) -> None:
        """Close at once, without the closing handshake (the peer broke the protocol)."""

    async def close(self, code: int, reason: str, close_timeout: float) -> None:
        """The closing handshake, bounded by ``close_timeout`` (then the TCP connection is
        dropped)."""

    def abort(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ConnectionServices:
    """What a connection uses of the gateway, and nothing else (one bundle per gateway)."""

    config: Config
    auth: Authenticator
    observer: GatewayObserver
    multiplexer: MultiplexerServices
    #: The connection was welcomed after a hello: it leaves the unauthenticated budget.
    authenticated: Callable[[Connection], None]
    #: The connection has ended: everything of it is stopped.
    finished: Callable[[Connection], None]


class _Closing(Exception):
    """Internal: end the connection with this close code and reason."""

    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


_Inbound = protocol.Message | RemoteProtocolError


class Connection:
    """One client's connection; the channel's handler (``message``, ``lost``)."""

    def __init__(
        self,
        services: ConnectionServices,
        channel: Channel,
        *,
        codec: Codec,
        headers: Mapping[str, str],
        address: str,
    ) -> None:
        self.services = services
        self.channel = channel
        self.address = address
        self.id = secrets.token_hex(8)
        self.codec = codec
        self._text = codec.is_text
        config = services.config
        self.outbound = Outbound(
            self._send,
            codec,
            write=self._write,
            writable=channel.writable,
            max_batch_bytes=config.max_batch_bytes,
            max_pending_chars=config.max_pending_chars,
            max_control=config.max_control_messages,
            slow_consumer_timeout=config.slow_consumer_timeout,
            on_failure=self._writer_failed,
        )
        self.mux: Multiplexer | None = None
        # Token bucket for inbound messages (SPEC.md §7: rate_limited, then close 4029).
        self._tokens = float(config.rate_burst)
        self._refill_at = time.monotonic()
        self._strikes = 0
        #: Start and last refusal of the current rate excess (None: not exceeding).
        self._excess_since: float | None = None
        self._last_refusal = 0.0
        # SPEC.md §4.4: handshake credentials are checked now but decided on the first
        # message, since a hello may replace them.
        self._headers: Mapping[str, str] = headers
        #: The handshake's W3C ``traceparent``, read only when tracing is on.
        self._traceparent = (
            traceparent_header(headers) if services.multiplexer.tracing.enabled else None
        )
        self._principal: Principal | None = None
        self._auth_error: AuthError | None = None
        try:
            self._principal = services.auth.from_headers(headers)
        except AuthError as exc:
            self._auth_error = exc
        #: Counted against the gateway's budget for connections that have not authenticated
        #: until this is True (credentials in the handshake, or a welcomed hello).
        self.authenticated = self._principal is not None
        #: Decoded messages not handled yet: those of the frame at hand only. A list, reused:
        #: a deque would cost ~600 bytes per connection, and a frame's messages are few.
        self._inbox: list[_Inbound] = []
        self._next = 0
        #: Frames that arrived while messages before them still wait (reading held, or a
        #: turn's worth handled): kept undecoded, and decoded one at a time as the pump reaches
        #: them. Decoding ahead would hold every message of a read at once (64 KiB of one-byte
        #: msgpack messages: 65,536 refusals, ~27 MB; bench/frame_fuzz.py found it); the bytes
        #: are bounded by what one read delivers. Created on first use (most never wait).
        self._frames: deque[tuple[bytes, bool]] | None = None
        self._held = False
        self._closing = False
        #: Cancels answered in the callback that delivered their frame.
        self.cancels_read_early = 0
        #: True once the connection has ended: everything of it is stopped.
        self.ended = False
        self._ended_waiter: asyncio.Future[None] | None = None
        #: The connection's own short tasks (waiting for room, closing): referenced here until
        #: they end, and not the gateway's (a close handshake with a peer that does not read
        #: lasts the close timeout; the gateway's pipelines are long idle by then).
        self._background: set[asyncio.Task[Any]] = set()
        self._hello_timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Without credentials yet: the hello timeout, and the input bound."""
        config = self.services.config
        if self._principal is None:
            if config.auth_required:
                self.channel.limit_input(PREAUTH_MAX_FRAME_BYTES + 14)  # + a frame's header
            self._hello_timer = asyncio.get_running_loop().call_later(
                config.hello_timeout, self._hello_timed_out
            )

    # -- the channel's handler -----------------------------------------------------------------

    def message(self, data: bytes, text: bool) -> None:
        """One complete message from the client: decode it, then handle it now (or, while the
        connection holds its reading, after what came before it)."""
        if self._closing:
            return  # closing: whatever else the client sends is read and dropped
        if self._held or self._next < len(self._inbox) or self._frames:
            if self._frames is None:
                self._frames = deque()
            self._frames.append((data, text))  # decoded when its turn comes
            return
        # The common case: nothing waits before this frame, handle it now.
        if self._take(data, text):
            self._pump(early=True)

    def _take(self, data: bytes, text: bool) -> bool:
        """Decode a frame into the (empty) inbox; False if the frame closed the connection."""
        results = self._decode(data, text)
        if results is None:
            self._drop_inbox()
            return False
        self._inbox.extend(results)
        return True

    def _close_outbound(self) -> None:
        """Nothing more will be written. Resumable requests go on detached (SPEC.md §5.8):
        moved out first, since closing drops every queue's unwritten text."""
        if self.mux is not None:
            self.mux.detach()
        self.outbound.close()

    def lost(self) -> None:
        """The connection is gone (either side closed it, or the network did)."""
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        self._drop_inbox()
        self._closing = True
        if self.mux is not None:
            self.mux.disconnect()
        self._close_outbound()
        log.debug("connection.closed", connection_id=self.id, close_code=self.channel.close_code)
        if not self.ended:
            self.ended = True
            self.services.finished(self)
            if self._ended_waiter is not None and not self._ended_waiter.done():
                self._ended_waiter.set_result(None)

    async def wait_ended(self) -> None:
        """Return once the connection has ended (lost): everything of it is stopped."""
        if self.ended:
            return
        if self._ended_waiter is None:
            self._ended_waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._ended_waiter)

    # -- decode --------------------------------------------------------------------------------

    def _decode(self, data: bytes, text: bool) -> list[_Inbound] | None:
        """The frame's messages (and refusals); None if the frame itself closed the connection."""
        if text != self._text:
            # SPEC.md §2.2: the codec's frame type only; nothing in the frame is processed.
            message = (
                "a JSON connection takes text frames only"
                if self._text
                else "msgpack needs binary frames"
            )
            return [RemoteProtocolError(ErrorCode.BAD_FRAME, message)]
        results = protocol.decode(data, self.codec, Sender.CLIENT)
        if text and any(isinstance(r, RemoteProtocolError) for r in results):
            # RFC 6455 §8.1: a text frame that is not UTF-8 fails the connection (1007). Checked
            # only for frames already refused: a valid frame was valid UTF-8 to the decoder.
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as exc:
                self.channel.fail(_INVALID_DATA, f"invalid UTF-8 at position {exc.start}")
                return None
        return results

    # -- dispatch --------------------------------------------------------------------------------

    def _pump(self, *, early: bool = False) -> None:
        """Handle the waiting messages in order, up to a turn's worth."""
        inbox = self._inbox
        outbound = self.outbound
        handled = 0
        cancelled = False
        frames = self._frames
        try:
            while True:
                if self._next >= len(inbox):
                    if not frames:
                        break
                    inbox.clear()
                    self._next = 0
                    if not self._take(*frames.popleft()):
                        return
                    continue
                if outbound.closed:  # the writer ended it (4008, 1011): its close is under way
                    self._drop_inbox()
                    return
                # Inbound backpressure: every message may queue an answer. A client that sends
                # faster than it reads waits (its bytes unread, in the kernel) instead of growing
                # the gateway's memory. Only answers count, not stream text: that has its own
                # bound (max_pending_chars pauses the pipeline), and a client behind on its
                # streams must still be heard when it cancels them, since a cancel is what
                # shrinks its backlog.
                if outbound.control_backlog:
                    self._hold(until_room=True)
                    return
                if handled >= MESSAGES_PER_TURN:
                    self._hold(until_room=False)
                    return
                handled += 1
                result = inbox[self._next]
                self._next += 1
                if isinstance(result, Cancel):
                    cancelled = True
                    if early:
                        self.cancels_read_early += 1
                self._handle(result)
            self._drop_inbox()  # all handled
        except _Closing as closing:
            self._drop_inbox()
            self._closing = True
            self._spawn(self._flush_and_close(closing.code, closing.reason))
        finally:
            if cancelled:
                # The cancel results go out now, not at the writer's next turn.
                outbound.write_now()

    def _drop_inbox(self) -> None:
        """Forget what waits: the inbox, and the frames not decoded yet."""
        self._inbox.clear()
        self._next = 0
        self._frames = None

    def _hold(self, *, until_room: bool) -> None:
        """Stop reading until the waiting messages may be handled: in the next loop turn, or
        once the answers waiting unwritten are down to the low mark."""
        self._held = True
        self.channel.pause_reading()
        if until_room:
            self._spawn(self._resume_when_room())
        else:
            asyncio.get_running_loop().call_soon(self._resume)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _resume_when_room(self) -> None:
        await self.outbound.control_room()
        self._resume()

    def _resume(self) -> None:
        self._held = False
        if self._closing:
            return
        self._pump()
        if not self._held and not self._closing:
            self.channel.resume_reading()

    def _handle(self, result: _Inbound) -> None:
        if isinstance(result, RemoteProtocolError):
            if result.message_type == "hello" and self.mux is None:
                # SPEC.md §4.4 (5): a refused first hello closes, even in dev mode.
                self._refuse_with(result.code, result.message)
            self._first_message_seen()
            # A refused frame costs what its messages would have (SPEC.md §7.1).
            cost = _FRAME_COST if result.code is ErrorCode.FRAME_TOO_LARGE else 1
            if self._admit(result, cost):
                self._error(result.code, result.message, result.request_id)
            return
        message = cast(ClientMessage, result)  # decode(..., Sender.CLIENT) ensures it
        if not isinstance(message, Cancel) and not self._admit(message):
            return  # a cancel is never refused for rate (SPEC.md §7.1)
        if isinstance(message, Hello) and self.mux is None:
            self._hello(message)
            return
        self._first_message_seen()
        assert self.mux is not None
        self.mux.dispatch(message)

    # -- authentication ------------------------------------------------------------------------

    def _hello(self, hello: Hello) -> None:
        try:
            principal = self.services.auth.from_hello(
                hello,
                self._principal,
                headers=self._headers,
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

    def _hello_timed_out(self) -> None:
        self._hello_timer = None
        if self.mux is not None or self._closing:
            return
        self._closing = True
        self._drop_inbox()
        self._error(ErrorCode.UNAUTHORIZED, "authentication required")
        self._spawn(self._flush_and_close(CloseCode.UNAUTHORIZED, "unauthorized"))

    def _refuse(self, exc: AuthError) -> NoReturn:
        self._refuse_with(exc.code, exc.message)

    def _refuse_with(self, code: ErrorCode | str, message: str) -> NoReturn:
        self._error(code, message)
        raise _Closing(CloseCode.UNAUTHORIZED, "unauthorized")

    def _welcome(self, principal: Principal) -> None:
        services = self.services
        config = services.config
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        self.mux = Multiplexer(
            services.multiplexer, self.outbound, principal, traceparent=self._traceparent
        )
        self._headers = {}  # decided: the handshake's headers are not needed any more
        self.channel.limit_input(None)  # frames up to max_frame_bytes from now on
        if not self.authenticated:
            self.authenticated = True
            services.authenticated(self)
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

    # -- admission -----------------------------------------------------------------------------

    def _admit(self, message: ClientMessage | RemoteProtocolError | None, cost: int = 1) -> bool:
        """Token bucket: refuse (rate_limited) beyond the rate; close 4029 if it goes on.

        "Goes on" (SPEC.md §7.1) is either of: more than ``rate_burst`` refusals in a row (a
        client that ignores ``rate_limited`` entirely), or refusals for ``rate_close_after``
        seconds with no quiet second between them (a client that keeps sending above the
        rate: the bucket refills, so some of its messages pass and the count in a row
        restarts, but the excess never stops)."""
        config = self.services.config
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
        self.services.observer.errors.labels(str(code)).inc()
        self.outbound.send_control(Error(code=str(code), message=message, request_id=request_id))

    # -- writing and closing -------------------------------------------------------------------

    async def _send(self, frame: bytes) -> None:
        await self.channel.send(frame, self._text)

    def _write(self, frame: bytes) -> None:
        # A failed write raises (ConnectionClosed); the writer task then ends the connection.
        self.channel.write(frame, self._text)

    def _writer_failed(self, exc: BaseException) -> None:
        if isinstance(exc, SlowConsumer):
            log.warning("connection.slow_consumer", connection_id=self.id, detail=str(exc))
            code, reason = CloseCode.SLOW_CONSUMER, "slow consumer"
        elif isinstance(exc, ConnectionClosed):
            # The connection is gone: nothing more will be written. Close the outbound now, so
            # a reader waiting for room for its answers (control_room) goes on, finds the
            # connection closed and ends; lost() does the rest.
            self._close_outbound()
            return
        else:
            log.error("connection.writer_failed", connection_id=self.id, exc_info=exc)
            code, reason = CloseCode.INTERNAL_ERROR, "internal error"
        # Nothing more can be written: the requests stop now (G7), not when the TCP connection
        # finally dies, which for a peer that does not read may be much later.
        self._closing = True
        self._drop_inbox()
        if self.mux is not None:
            self.mux.disconnect()
        self._close_outbound()
        self._spawn(self.close(code, reason))

    async def _flush_and_close(self, code: CloseCode, reason: str) -> None:
        """Give queued messages (the error explaining the close) a moment, stop the requests,
        then close."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self.outbound.flushed()
        # Nothing more will be sent. Stop the requests now (G7), not after the close handshake,
        # which a client that does not read stretches to the close timeout while its pipelines
        # go on spending tokens. The outbound closes first: no response is written any more.
        self._close_outbound()
        if self.mux is not None:
            self.mux.disconnect()
        await self.close(code, reason)

    async def close(self, code: CloseCode, reason: str) -> None:
        """Close with ``code``; a peer that does not read cannot take the close frame either:
        the TCP connection is dropped after the close timeout."""
        self._closing = True
        self.channel.resume_reading()  # the peer's close frame must be read
        await self.channel.close(code, reason, CLOSE_TIMEOUT)
