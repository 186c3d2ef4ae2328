"""One WebSocket to the gateway, multiplexed: the SDK's I/O edge.

Theory of operation
-------------------
A :class:`Connection` owns one WebSocket and two tasks:

- the **reader** decodes every frame with ``protocol.decode`` and routes each message by
  ``request_id`` to its :class:`Exchange`, whose :class:`protocol.RequestStateMachine`
  (role client) refuses whatever SPEC.md §5.1 forbids: a chunk after the response, a seq gap,
  content that differs from the chunks (G1-G3), a ``usage`` report nobody announced, a
  ``cancel_result`` for no cancel. A violation closes the connection and fails every request on
  it with :class:`ProtocolViolation`: nothing the gateway says afterwards can be trusted.
  ``step`` messages (SPEC.md §3.12) go through the same machine (numbered from 0, an end only
  for a step started), and arrive only for a chat sent with ``steps: true``; ``halt`` objects
  likewise. A stream keeps its chunks and steps in one queue, in their wire order.
- the **writer** is the only task that sends. Everything else *enqueues* encoded messages
  synchronously (:meth:`Connection.send_nowait`), so sends are serialized, a ``cancel`` can be
  queued from a ``CancelledError`` handler or a finalizer without awaiting, and whatever is
  pending when the writer runs goes out as one batched frame (SPEC.md §2.4), within the
  ``welcome`` limits.

Opening sends a ``hello`` (carrying the default ``user_id``; credentials travel in the
handshake headers) and waits for ``welcome``, so bad credentials fail at connect time with
:class:`Unauthorized` and the limits are known before the first chat (SPEC.md §3.5, §4.4).

A request holds one of the connection's ``max_streams`` slots from its ``chat`` until it is
*finished* (SPEC.md §5.6: its response arrived, the late ``usage`` report too if one was
announced, and every cancel sent for it was answered). Callers beyond the limit wait for a slot
instead of being refused with ``too_many_streams``.

When the WebSocket closes, every unfinished exchange fails with the error the close code means
(:func:`error_from_close`): the gateway has cancelled them (G7) -- except a *resumable* one
(SPEC.md §5.8) whose ``resumable`` message (its epoch) arrived, when the close is not the
client's own (nor a protocol violation, 4001 or 1001): the gateway keeps that request running,
detached, for its grace period, so the exchange is handed to the connection's ``on_drop``
callback (the client reconnects and calls :meth:`Connection.resume` on the new connection)
instead of failing. An :class:`Exchange` therefore outlives its connection: ``exchange.conn``
is the one it runs on (``None`` while it waits for a resume), its state machine is replaced by
a resuming one (``RequestStateMachine.resuming``) from the last ``seq`` received, and its
queue of unread chunks carries over. Nothing is routed from a connection once it has ended,
so a chunk of the old connection can never follow the resume point.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

import protocol
from protocol import (
    Cancel,
    CancelResult,
    CancelStatus,
    Chat,
    Chunk,
    Codec,
    Error,
    ErrorCode,
    GatewayMessage,
    Halt,
    HaltState,
    Hello,
    Limits,
    Message,
    Moved,
    Pong,
    RemoteProtocolError,
    RequestState,
    RequestStateMachine,
    ResponseStatus,
    Resumable,
    Resume,
    ResumeResult,
    ResumeStatus,
    Sender,
    Step,
    StepState,
    Usage,
    UsageReport,
    Welcome,
)
from protocol import Response as WireResponse

from ._config import Settings
from ._errors import (
    ConnectionLost,
    GatewayShuttingDown,
    InvalidRequest,
    MuxgateError,
    ProtocolViolation,
    RequestFailed,
    RequestMoved,
    RequestRefused,
    ResumeNotFound,
    Unauthorized,
    error_from_close,
    error_from_code,
    mapped_errors,
)
from ._models import Response

__all__ = ["Connection", "DropCallback", "Exchange"]

log = logging.getLogger("muxgate.client")

# Close code a client uses when the peer broke the protocol (RFC 6455 §7.4.1).
_CLOSE_PROTOCOL_ERROR = 1002

#: Client states in which nothing more about a request arrives on this connection (SPEC.md §5.8).
_ENDED_HERE = (RequestState.MOVED, RequestState.GONE)

#: ``on_drop(connection, exchanges, error)``: the connection ended with ``error`` while these
#: resumable exchanges were unfinished; they are detached (``exchange.conn`` is None).
DropCallback = Callable[["Connection", list["Exchange"], MuxgateError], None]


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark a failed future's exception as seen: nobody may be waiting for it any more."""
    if future.done() and not future.cancelled():
        future.exception()


class Exchange:
    """One request on one connection, as this client has seen it."""

    __slots__ = (
        "changed",
        "chat_user_id",
        "conn",
        "earlier_text",
        "epoch",
        "error",
        "final_usage",
        "grace",
        "halt",
        "items",
        "keep_chunks",
        "keep_steps",
        "machine",
        "open_steps",
        "pending_cancels",
        "refused",
        "request_id",
        "response",
        "resumable",
        "resumes",
        "stream",
        "user",
        "wants_steps",
    )

    def __init__(self, chat: Chat, user: str, conn: Connection | None = None) -> None:
        self.request_id = chat.request_id
        #: The ``user_id`` field the chat carried (``None``: the connection's default user).
        self.chat_user_id = chat.user_id
        #: The effective user (SPEC.md §4.5) as far as the client can tell ("" = anonymous).
        self.user = user
        self.stream = chat.stream
        self.machine = RequestStateMachine(
            chat.request_id, Sender.CLIENT, stream=chat.stream, resumable=chat.resumable
        )
        #: The connection the request runs on; None while it waits to be resumed (§5.8).
        self.conn = conn
        #: The chat asked to survive a dropped connection (SPEC.md §5.8); ``epoch`` and
        #: ``grace`` (seconds) come with the gateway's ``resumable`` message.
        self.resumable = chat.resumable
        self.epoch: str | None = None
        self.grace: float | None = None
        #: How many times the request was resumed on a new connection (``resumed`` answers).
        self.resumes = 0
        #: The text received on earlier connections (the machine holds what came since).
        self.earlier_text = ""
        #: Started steps not ended, as the current machine saw them (steps are not replayed
        #: by a resume: see :meth:`Connection._on_step`).
        self.open_steps: set[int] = set()
        #: Chunks and steps not yet read by the consumer, in wire order; only kept while
        #: someone streams (steps also after a cancel was sent, chunks not).
        self.items: deque[Chunk | Step] = deque()
        self.keep_chunks = chat.stream
        #: The chat asked for ``step`` messages and ``halt`` objects (SPEC.md §3.12).
        self.wants_steps = chat.steps
        self.keep_steps = chat.stream and chat.steps
        #: The latest ``halt``: the cancelled response's, then the ``usage`` message's.
        self.halt: Halt | None = None
        self.response: Response | None = None
        self.error: MuxgateError | None = None
        self.refused = False
        self.final_usage: asyncio.Future[Usage] | None = None
        #: One entry per cancel sent and not yet answered: the caller's future, or None.
        self.pending_cancels: deque[asyncio.Future[CancelStatus] | None] = deque()
        self.changed = asyncio.Event()

    def __repr__(self) -> str:
        return f"Exchange({self.request_id!r}, {self.machine.state.name})"

    @property
    def done(self) -> bool:
        """The caller has its answer: a response, or an error."""
        return self.response is not None or self.error is not None

    @property
    def cancel_sent(self) -> bool:
        return self.machine.state is RequestState.CANCEL_SENT or bool(self.pending_cancels)

    @property
    def detached(self) -> bool:
        """Unfinished, off any connection: the client is reconnecting to resume it."""
        return self.conn is None and not self.done

    @property
    def text(self) -> str:
        """Everything streamed so far, over every connection the request ran on."""
        return self.earlier_text + self.machine.text

    @property
    def last_seq(self) -> int | None:
        """The ``seq`` of the last chunk received (a resume's ``after_seq``); None: none."""
        return self.machine.next_seq - 1 if self.machine.next_seq else None

    @property
    def finished(self) -> bool:
        """SPEC.md §5.6: nothing more will arrive about this request on this connection."""
        return (
            (self.response is not None or self.refused or self.machine.state in _ENDED_HERE)
            and not self.machine.usage_pending
            and not self.pending_cancels
        )

    async def wait_done(self) -> None:
        while not self.done:
            self.changed.clear()
            await self.changed.wait()

    @property
    def pipeline_over(self) -> bool:
        """The request's pipeline runs no more: it ended, or its cancel halted it."""
        response = self.response
        if response is None:
            return self.error is not None
        return (
            not response.cancelled
            or response.usage.final
            or (self.final_usage is not None and self.final_usage.done())
            or (self.halt is not None and self.halt.state is HaltState.HALTED)
        )

    async def next_item(self) -> Chunk | Step | None:
        """The next streamed chunk or step, or ``None`` once the request has its answer and
        everything before it was read."""
        while True:
            if self.items:
                return self.items.popleft()
            if self.done:
                return None
            self.changed.clear()
            await self.changed.wait()

    def drop_chunks(self) -> None:
        """A cancel was sent: queue no more chunks, drop those not read (steps stay)."""
        self.keep_chunks = False
        if self.items:
            self.items = deque(item for item in self.items if isinstance(item, Step))

    def drop_all(self) -> None:
        """Nobody reads the stream any more."""
        self.keep_chunks = self.keep_steps = False
        self.items.clear()

    def stop(self, *, keep_steps: bool = False) -> None:
        """The caller gave up (see :meth:`Connection.stop`); while the exchange is detached,
        the cancel waits for the resume on the new connection (it goes out right after it)."""
        conn = self.conn
        if conn is not None:
            conn.stop(self, keep_steps=keep_steps)
            return
        if keep_steps:
            self.drop_chunks()
        else:
            self.drop_all()
        if self.detached and not self.cancel_sent:
            self.pending_cancels.append(None)

    def request_cancel(self) -> asyncio.Future[CancelStatus]:
        """A ``cancel`` whose ``cancel_result`` the caller waits for: sent now, or right after
        the resume if the exchange is detached (the future fails if it never goes out)."""
        conn = self.conn
        if conn is not None:
            waiter = conn.cancel_nowait(self, want_result=True)
            assert waiter is not None
            return waiter
        waiter = asyncio.get_running_loop().create_future()
        if self.detached:
            self.pending_cancels.append(waiter)
            self.drop_chunks()
        else:
            waiter.set_exception(self.error or ConnectionLost("the request is gone"))
            _retrieved(waiter)
        return waiter

    def outcome(self) -> Response:
        """The response; raises the request's error, or :class:`RequestFailed`."""
        if self.response is None:
            assert self.error is not None, "outcome() before the exchange is done"
            raise self.error
        if self.response.status == "failed":
            raise RequestFailed(self.response)
        return self.response

    def fail(self, error: MuxgateError) -> None:
        """The connection ended: whatever is still awaited gets ``error``."""
        if not self.done:
            self.error = error
        if self.final_usage is not None and not self.final_usage.done():
            self.final_usage.set_exception(error)
            _retrieved(self.final_usage)
        while self.pending_cancels:
            waiter = self.pending_cancels.popleft()
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
                _retrieved(waiter)
        self.changed.set()


class Connection:
    """One open WebSocket to the gateway. Create with :meth:`open`."""

    def __init__(
        self, ws: ClientConnection, settings: Settings, on_drop: DropCallback | None = None
    ) -> None:
        self.ws = ws
        self.settings = settings
        self.codec = settings.codec
        self._on_drop = on_drop
        #: When the connection was opened (loop time).
        self.opened_at = asyncio.get_running_loop().time()
        self.exchanges: dict[str, Exchange] = {}
        self.welcome: Welcome | None = None
        self.limits = Limits()
        #: Why the connection ended; set once, when it does.
        self.error: MuxgateError | None = None
        self._welcomed: asyncio.Future[Welcome] = asyncio.get_running_loop().create_future()
        self._close_error: MuxgateError | None = None  # an error message announcing the close
        self._outbox: deque[bytes] = deque()
        self._outbox_ready = asyncio.Event()
        self._flushed = asyncio.Event()
        self._flushed.set()
        self._slot_freed = asyncio.Event()
        self._closer: asyncio.Task[None] | None = None
        self._reader = asyncio.create_task(self._read(), name="muxgate-client-reader")
        self._writer = asyncio.create_task(self._write(), name="muxgate-client-writer")

    @classmethod
    async def open(cls, settings: Settings, on_drop: DropCallback | None = None) -> Connection:
        """Connect, send ``hello``, wait for ``welcome`` (``settings.connect_timeout``).
        ``on_drop`` takes the resumable exchanges of a dropped connection (else they fail)."""
        url = settings.ws_url
        with mapped_errors(f"connect to {url}"):
            async with asyncio.timeout(settings.connect_timeout):
                ws = await connect(
                    url,
                    subprotocols=[Subprotocol(settings.codec.subprotocol)],
                    additional_headers=settings.credentials(),
                    max_size=protocol.limits.MAX_FRAME_BYTES,
                    compression=None,  # chat tokens are tiny; the gateway offers none either
                    open_timeout=None,  # the timeout above covers it
                    user_agent_header="muxgate-python",
                )
        if Codec.from_subprotocol(ws.subprotocol) is not settings.codec:
            await ws.close(_CLOSE_PROTOCOL_ERROR, "wrong subprotocol")
            raise ProtocolViolation(f"the gateway chose subprotocol {ws.subprotocol!r}")
        conn = cls(ws, settings, on_drop)
        try:
            conn.send_nowait(Hello(user_id=settings.user_id))
            with mapped_errors(f"connect to {url}"):
                async with asyncio.timeout(settings.connect_timeout):
                    await asyncio.shield(conn._welcomed)
        except BaseException:
            await conn.abort()
            raise
        return conn

    # -- state -------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.error is None

    @property
    def default_user(self) -> str:
        """The connection's default user: ``welcome.user_id``, else the anonymous user."""
        if self.welcome is not None and self.welcome.user_id is not None:
            return self.welcome.user_id
        return ""

    def user_of(self, user_id: str | None) -> str:
        return user_id if user_id is not None else self.default_user

    # -- sending -----------------------------------------------------------------------------

    def send_nowait(self, message: Message) -> None:
        """Queue one message for the writer (never blocks; the writer batches)."""
        if self.error is not None:
            raise self.error
        data = protocol.encode(message, self.codec)
        if len(data) > self.limits.max_frame_bytes:
            raise InvalidRequest(
                f"{message.TYPE} message of {len(data)} bytes exceeds the gateway's "
                f"max_frame_bytes ({self.limits.max_frame_bytes})"
            )
        self._outbox.append(data)
        self._flushed.clear()
        self._outbox_ready.set()

    async def _free_slot(self) -> None:
        """Until a stream slot is free (``max_streams``); raises the connection's error."""
        while len(self.exchanges) >= self.limits.max_streams:
            if self.error is not None:
                raise self.error
            self._slot_freed.clear()
            await self._slot_freed.wait()
        if self.error is not None:
            raise self.error

    async def start(self, chat: Chat) -> Exchange:
        """Send ``chat`` once a stream slot is free; its exchange is registered when this
        returns (and not at all if it raises, e.g. when cancelled while waiting)."""
        self._check_unique(chat.request_id)
        await self._free_slot()
        self._check_unique(chat.request_id)
        exchange = Exchange(chat, self.user_of(chat.user_id), self)
        with mapped_errors("chat"):
            self.send_nowait(chat)
        self.exchanges[chat.request_id] = exchange
        return exchange

    async def resume(self, exchange: Exchange) -> None:
        """Continue the detached ``exchange`` here (SPEC.md §5.8): once a stream slot is free,
        send ``resume`` from the last ``seq`` received, then the cancels asked for meanwhile
        (and again those sent on the old connection and not answered: a cancel is idempotent).
        The exchange is registered here when this returns (and stays detached if it raises)."""
        rid, epoch = exchange.request_id, exchange.epoch
        assert epoch is not None, exchange
        assert exchange.detached, exchange
        await self._free_slot()
        if not exchange.detached:
            return  # it ended meanwhile (the client gave up, or closed)
        self._check_unique(rid)
        old = exchange.machine
        resume = Resume(
            request_id=rid, epoch=epoch, after_seq=exchange.last_seq, user_id=exchange.chat_user_id
        )
        with mapped_errors("resume"):
            self.send_nowait(resume)
        if old.state is RequestState.CANCEL_SENT and not exchange.pending_cancels:
            exchange.pending_cancels.append(None)
        machine = RequestStateMachine.resuming(rid, epoch, resume.after_seq, stream=exchange.stream)
        machine.next_step = old.next_step  # a step started before is not started again
        for _ in exchange.pending_cancels:
            self.send_nowait(Cancel(request_id=rid, user_id=exchange.chat_user_id))
            machine.on_cancel()
        exchange.earlier_text += old.text
        exchange.machine = machine
        exchange.open_steps.clear()
        exchange.conn = self
        exchange.user = self.user_of(exchange.chat_user_id)
        self.exchanges[rid] = exchange

    def _check_unique(self, request_id: str) -> None:
        # SPEC.md §5.6: unique per connection among unfinished requests. Refused here, because
        # the gateway's error would be indistinguishable from one about the running request.
        if request_id in self.exchanges:
            raise RequestRefused(
                ErrorCode.DUPLICATE_REQUEST_ID.value,
                "request_id is active on this connection",
                request_id=request_id,
            )

    def cancel_nowait(
        self, exchange: Exchange, *, want_result: bool = False
    ) -> asyncio.Future[CancelStatus] | None:
        """Queue a ``cancel`` for ``exchange``; from now on its chunks are dropped (the
        consumer asked to stop). Returns a future of the ``cancel_result`` if asked for."""
        waiter = asyncio.get_running_loop().create_future() if want_result else None
        if self.error is not None:
            if waiter is not None:
                waiter.set_exception(self.error)
            return waiter
        self.send_nowait(Cancel(request_id=exchange.request_id, user_id=exchange.chat_user_id))
        exchange.machine.on_cancel()
        exchange.pending_cancels.append(waiter)
        exchange.drop_chunks()
        return waiter

    def stop(self, exchange: Exchange, *, keep_steps: bool = False) -> None:
        """The caller gave up on ``exchange`` (task cancelled, stream closed, Ctrl-C): cancel it
        on the gateway unless it already has its answer or a cancel is on its way. With
        ``keep_steps`` its steps are still queued (the caller waits for the response)."""
        if keep_steps:
            exchange.drop_chunks()
        else:
            exchange.drop_all()
        if self.error is None and not exchange.done and not exchange.cancel_sent:
            self.cancel_nowait(exchange)

    # -- closing -----------------------------------------------------------------------------

    async def aclose(self, grace: float = 5.0) -> None:
        """Send what is queued (cancels), then close with 1000. Resumable requests still
        running are cancelled first: the gateway would keep them for a resume nobody sends."""
        if self.error is None:
            self._close_error = ConnectionLost("the client closed the connection", close_code=1000)
            for exchange in list(self.exchanges.values()):
                if exchange.resumable and not exchange.done and not exchange.cancel_sent:
                    with contextlib.suppress(MuxgateError):
                        self.cancel_nowait(exchange)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._flushed.wait()
        with contextlib.suppress(Exception):
            await self.ws.close()
        await self._stopped()

    async def abort(self) -> None:
        self._close_error = self._close_error or ConnectionLost("connection aborted")
        self.ws.transport.abort()
        await self._stopped()

    async def _stopped(self) -> None:
        for task in (self._reader, self._writer):
            if not task.done():
                if task is self._writer:
                    task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    # -- the writer --------------------------------------------------------------------------

    async def _write(self) -> None:
        text = self.codec.is_text
        outbox = self._outbox
        try:
            while True:
                await self._outbox_ready.wait()
                self._outbox_ready.clear()
                while outbox:
                    await self.ws.send(self._take_batch(), text=text)
                self._flushed.set()
        except ConnectionClosed:
            pass  # the reader sees the close and fails what is in flight

    def _take_batch(self) -> bytes:
        """Pop what is pending into one frame, within the ``welcome`` limits (SPEC.md §2.4)."""
        outbox = self._outbox
        limit_bytes = self.limits.max_frame_bytes
        limit_count = self.limits.max_batch_messages
        batch = [outbox.popleft()]
        size = len(batch[0])
        while outbox and len(batch) < limit_count and size + 1 + len(outbox[0]) <= limit_bytes:
            size += 1 + len(outbox[0])
            batch.append(outbox.popleft())
        return protocol.join_batch(batch, self.codec)

    # -- the reader --------------------------------------------------------------------------

    async def _read(self) -> None:
        error: MuxgateError | None = None
        try:
            async for data in self.ws:
                if isinstance(data, str) != self.codec.is_text:
                    raise ProtocolViolation("a frame of the wrong kind for the codec")
                for item in protocol.decode(data, self.codec, Sender.GATEWAY):
                    if isinstance(item, RemoteProtocolError):
                        if item.code == ErrorCode.UNKNOWN_TYPE:
                            continue  # SPEC.md §3.1, §10: newer gateways may send more types
                        raise item
                    self._on_message(cast(GatewayMessage, item))  # decoded as GATEWAY
        except ConnectionClosed:
            pass
        except RemoteProtocolError as exc:
            error = ProtocolViolation(exc.message, request_id=exc.request_id)
        except MuxgateError as exc:
            error = exc
        except Exception as exc:  # a bug here must not leave callers waiting forever
            log.exception("muxgate client: reader failed")
            error = ProtocolViolation(f"internal client error: {exc!r}")
        dropped = False
        if error is not None:
            with contextlib.suppress(Exception):
                await self.ws.close(_CLOSE_PROTOCOL_ERROR, "protocol violation")
        elif self._close_error is not None:
            error = self._close_error  # the client's own close, or the gateway's error
        else:
            error = error_from_close(self.ws.close_code, self.ws.close_reason or "")
            # Resumable requests detach (§5.8), except at 4001 (the credentials will fail
            # again) and 1001 (a shutdown cancelled them all before the close, §5.7).
            dropped = not isinstance(error, Unauthorized | GatewayShuttingDown)
        self._end(error, dropped=dropped)

    def _end(self, error: MuxgateError, *, dropped: bool = False) -> None:
        self.error = error
        if not self._welcomed.done():
            self._welcomed.set_exception(error)
            _retrieved(self._welcomed)
        exchanges = list(self.exchanges.values())
        self.exchanges.clear()
        detached: list[Exchange] = []
        for exchange in exchanges:
            if exchange.conn is self:
                exchange.conn = None
            if (
                dropped
                and self._on_drop is not None
                and exchange.resumable
                and exchange.epoch is not None
                and not exchange.done
            ):
                detached.append(exchange)  # the gateway keeps it for a resume
            else:
                exchange.fail(error)
        if detached:
            assert self._on_drop is not None
            self._on_drop(self, detached, error)
        self._slot_freed.set()
        self._outbox.clear()
        self._flushed.set()
        self._outbox_ready.set()
        self._writer.cancel()

    def _exchange(self, request_id: str, what: str) -> Exchange:
        exchange = self.exchanges.get(request_id)
        if exchange is None or exchange.refused:
            raise ProtocolViolation(
                f"{what} for unknown request {request_id}", request_id=request_id
            )
        return exchange

    def _on_message(self, message: GatewayMessage) -> None:
        if self.welcome is None and not isinstance(message, Welcome | Error):
            raise ProtocolViolation(f"{message.TYPE} before welcome")
        if isinstance(message, Chunk):
            exchange = self._exchange(message.request_id, "chunk")
            exchange.machine.on_chunk(message.seq, message.text)
            if exchange.keep_chunks:
                exchange.items.append(message)
                exchange.changed.set()
        elif isinstance(message, Step):
            exchange = self._exchange(message.request_id, "step")
            if not exchange.wants_steps:
                raise ProtocolViolation(
                    f"step for request {message.request_id}, whose chat did not ask for steps",
                    request_id=message.request_id,
                )
            self._on_step(exchange, message)
            if exchange.keep_steps:
                exchange.items.append(message)
                exchange.changed.set()
        elif isinstance(message, WireResponse):
            self._on_response(message)
        elif isinstance(message, UsageReport):
            exchange = self._exchange(message.request_id, "usage")
            exchange.machine.on_usage(message)
            if message.halt is not None:
                self._check_halt(exchange)
                exchange.halt = message.halt
            if exchange.final_usage is not None and not exchange.final_usage.done():
                exchange.final_usage.set_result(message.usage)
            self._maybe_finished(exchange)
        elif isinstance(message, CancelResult):
            self._on_cancel_result(message)
        elif isinstance(message, Error):
            self._on_error(message)
        elif isinstance(message, Welcome):
            if self.welcome is not None:
                raise ProtocolViolation("a second welcome")
            self.welcome = message
            self.limits = message.limits
            self._welcomed.set_result(message)
        elif isinstance(message, Resumable):
            exchange = self._exchange(message.request_id, "resumable")
            exchange.machine.on_resumable(message)  # once, asked for, before anything else
            exchange.epoch = message.epoch
            exchange.grace = message.grace_ms / 1000
        elif isinstance(message, ResumeResult):
            self._on_resume_result(message)
        elif isinstance(message, Moved):
            exchange = self._exchange(message.request_id, "moved")
            if not exchange.resumable:
                raise ProtocolViolation(
                    f"moved for request {message.request_id}, which is not resumable",
                    request_id=message.request_id,
                )
            exchange.machine.on_moved()
            self._ended_here(exchange, RequestMoved(exchange.request_id))
        elif isinstance(message, Pong):
            pass  # we send no pings; websockets keeps the connection alive at the frame level

    @staticmethod
    def _on_step(exchange: Exchange, step: Step) -> None:
        machine = exchange.machine
        if exchange.resumes and not machine.awaiting_resume:
            # A resume does not replay steps (SPEC.md §5.8): steps that started while the
            # request was detached are skipped, and a step that started before the resume may
            # end after it. Tell the fresh machine so; its other checks stay.
            if step.state is StepState.STARTED:
                machine.next_step = max(machine.next_step, step.index)
            elif step.index not in exchange.open_steps:
                after = max(machine.next_step, step.index + 1)
                machine.next_step = step.index
                machine.on_step(dataclasses.replace(step, state=StepState.STARTED))
                machine.next_step = after
                exchange.open_steps.add(step.index)
        machine.on_step(step)
        if step.state is StepState.STARTED:
            exchange.open_steps.add(step.index)
        else:
            exchange.open_steps.discard(step.index)

    def _on_resume_result(self, message: ResumeResult) -> None:
        exchange = self._exchange(message.request_id, "resume_result")
        exchange.machine.on_resume_result(message)  # answers this connection's resume
        if message.status is ResumeStatus.NOT_FOUND:
            error = ResumeNotFound(
                f"request {exchange.request_id} could not be resumed: the gateway no longer "
                "has it (its grace period ended, or the gateway restarted)",
                request_id=exchange.request_id,
            )
            self._ended_here(exchange, error)
        else:
            exchange.resumes += 1
            self._maybe_finished(exchange)

    def _ended_here(self, exchange: Exchange, error: MuxgateError) -> None:
        """Nothing more about the request comes here (``moved``, ``not_found``): the caller
        reads what was received, then gets ``error``."""
        exchange.keep_chunks = exchange.keep_steps = False
        if not exchange.done:
            exchange.error = error
        exchange.changed.set()
        self._maybe_finished(exchange)

    def _on_response(self, message: WireResponse) -> None:
        exchange = self._exchange(message.request_id, "response")
        exchange.machine.on_response(message)
        if (
            exchange.earlier_text
            and exchange.stream
            and message.status is ResponseStatus.COMPLETED
            and message.content != exchange.text
        ):
            # The machine checked the text since the resume; the whole must match too (G3).
            raise ProtocolViolation(
                "completed content differs from the chunks streamed over the connections",
                request_id=message.request_id,
            )
        if message.halt is not None:
            self._check_halt(exchange)
            exchange.halt = message.halt
        final: asyncio.Future[Usage] | None = None
        if not message.usage.final:
            final = asyncio.get_running_loop().create_future()
            exchange.final_usage = final
        response = Response.from_wire(message, final, user_id=exchange.chat_user_id)
        exchange.response = response
        exchange.changed.set()
        self._maybe_finished(exchange)

    @staticmethod
    def _check_halt(exchange: Exchange) -> None:
        if not exchange.wants_steps:
            raise ProtocolViolation(
                f"halt for request {exchange.request_id}, whose chat did not ask for steps",
                request_id=exchange.request_id,
            )

    def _on_cancel_result(self, message: CancelResult) -> None:
        exchange = self.exchanges.get(message.request_id)
        if exchange is None or not exchange.pending_cancels:
            raise ProtocolViolation(
                f"cancel_result for no cancel of {message.request_id}",
                request_id=message.request_id,
            )
        if not exchange.refused:
            exchange.machine.on_cancel_result(message)
        waiter = exchange.pending_cancels.popleft()
        if waiter is not None and not waiter.done():
            waiter.set_result(message.status)
        self._maybe_finished(exchange)

    def _on_error(self, message: Error) -> None:
        error = error_from_code(message.code, message.message, message.request_id)
        request_id = message.request_id
        exchange = self.exchanges.get(request_id) if request_id is not None else None
        if exchange is None:
            # Not about a request of ours: about the connection (unauthorized before the close
            # 4001), or a message of ours the gateway could not attribute. Either way some
            # request may never be answered: end the connection rather than hang.
            self._close_error = error
            log.warning("muxgate client: gateway error %s: %s", message.code, message.message)
            if message.code != ErrorCode.UNAUTHORIZED:
                self._closer = asyncio.get_running_loop().create_task(self._close_unexpected())
            return
        if exchange.machine.awaiting_resume and not exchange.refused:
            # The resume was refused (SPEC.md §3.4): nothing about the request comes here.
            exchange.refused = True
            exchange.keep_chunks = exchange.keep_steps = False
            if not exchange.done:
                exchange.error = error
            exchange.changed.set()
        elif exchange.response is None and not exchange.refused and exchange.machine.next_seq == 0:
            # The chat itself was refused (SPEC.md §3.3): no request exists, no response follows.
            # (A cancel's refusal is impossible here: cancels carry the chat's own user_id.)
            exchange.refused = True
            exchange.error = error
            exchange.drop_all()
            exchange.changed.set()
        elif exchange.pending_cancels:
            waiter = exchange.pending_cancels.popleft()
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
                _retrieved(waiter)
        else:
            raise ProtocolViolation(
                f"error {message.code} about request {request_id} that sent nothing to refuse",
                request_id=request_id,
            )
        self._maybe_finished(exchange)

    async def _close_unexpected(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close(1000, "unexpected gateway error")

    def _maybe_finished(self, exchange: Exchange) -> None:
        if exchange.finished and self.exchanges.get(exchange.request_id) is exchange:
            del self.exchanges[exchange.request_id]
            self._slot_freed.set()
