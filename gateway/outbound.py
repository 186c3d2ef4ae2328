"""The outbound path of one connection: the asyncio shell around :mod:`gateway.output_queue`.

What goes into each frame (control first, finishing requests next, one fair turn per request,
G2's dropping of a cancelled request's text, the bounds) is decided by the sans-I/O
:class:`~gateway.output_queue.FrameScheduler`, tested without an event loop. This module only
decides *when* and *how* frames are written, and waits:

- **No task switch per frame.** While the socket takes data, a loop callback (scheduled once per
  loop iteration by the first producer) packs and writes synchronously: everything produced in
  one iteration goes out in the next, with no await per frame. Only when the socket is full (the
  client is behind) does the writer task take over and await the drain; once it has caught up,
  writing is synchronous again.
- **A packed frame is written at once.** Nothing packed waits while a cancel could be read (G2);
  when a batch needs several frames and the writer awaits a drain between them, the scheduler
  builds them lazily and drops chunks of requests cancelled meanwhile.
- **Bounded memory.** A producer whose queue is over its cap waits here (``drained``) until the
  writer took its text; a writer stuck in ``send`` longer than ``slow_consumer_timeout`` ends the
  connection (close 4008). Control messages are answers to the client's own messages: past half
  of ``max_control`` queued, the connection's reader stops taking messages until they are
  written (``control_room``), and past ``max_control`` (a client that does not read at all)
  the connection ends at once (4008), on every path.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import protocol
from protocol import CancelResult, CancelStatus, Codec, GatewayMessage, Response

from .output_queue import (
    COALESCE_AFTER,
    MAX_PENDING_STEPS,
    Batch,
    ContentTooLarge,
    FrameScheduler,
    OutputQueue,
)

__all__ = [
    "COALESCE_AFTER",
    "MAX_PENDING_STEPS",
    "ContentTooLarge",
    "Outbound",
    "OutputQueue",
    "SlowConsumer",
]


async def _never_sent(frame: bytes) -> None:  # pragma: no cover - see its two uses
    """The send of a void outbound (whose ``writable()`` is always true) and of a closed one
    (whose writer stops before its next frame)."""


def _weakly(method: Callable[[], None]) -> Callable[[], None]:
    """``method``, called while its object lives (and nothing after)."""
    ref = weakref.WeakMethod(method)

    def call() -> None:
        bound = ref()
        if bound is not None:
            bound()

    return call


def _discard(frame: bytes) -> None:
    pass


def _always() -> bool:
    return True


class SlowConsumer(Exception):
    """The peer did not read for longer than the configured limit."""


async def _wait_for_room(queue: OutputQueue) -> None:
    """A producer over its cap waits here until the scheduler took its text, or the queue
    closed (both call ``queue.on_room``); ``OutputQueue.drained`` checks again. A function, not
    a method: the scheduler holds it, and a bound method would be a reference cycle."""
    room = queue.on_room
    if not isinstance(room, _Room):
        room = queue.on_room = _Room()
    room.event.clear()
    await room.event.wait()


class _Room:
    """What a queue calls when its producers may go on (``OutputQueue.on_room``). One per queue,
    made at its first wait and kept: all its waiters share it (a pipeline's concurrent steps
    may wait on the same queue), as they shared one event before the scheduler was split out."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def __call__(self) -> None:
        self.event.set()


class Outbound:
    """Owns everything this connection will send.

    ``send(frame)`` writes a frame and awaits the drain. With ``write``/``writable``, frames are
    written synchronously (``write``) while ``writable()`` says the socket takes data (its
    buffer is below the high-water mark); without, every frame goes through the writer task.
    """

    def __init__(
        self,
        send: Callable[[bytes], Awaitable[None]],
        codec: Codec,
        *,
        write: Callable[[bytes], None] | None = None,
        writable: Callable[[], bool] | None = None,
        max_batch_bytes: int = protocol.limits.DEFAULT_BATCH_BYTES,
        max_pending_chars: int = 65_536,
        max_control: int = 4096,
        slow_consumer_timeout: float = 30.0,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._send = send
        #: Called when the writer task ends with an exception (SlowConsumer, a closed socket).
        self._on_failure = on_failure
        self._write = write
        self._writable = writable
        self.codec = codec
        self.scheduler = scheduler = FrameScheduler(
            codec,
            max_batch_bytes=max_batch_bytes,
            max_pending_chars=max_pending_chars,
            max_control=max_control,
            wake=self._wake,
            wait_for_room=_wait_for_room,
        )
        #: The scheduler's control queue (the same deque): its length is the backpressure input.
        self._control = scheduler.control
        self._room: asyncio.Event | None = None
        self.slow_consumer_timeout = slow_consumer_timeout
        #: Wakes the writer task (made with the first one: an idle connection has neither).
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_scheduled = False
        self._flushing = False  # a sent hook may cancel a request, which flushes: not twice
        #: True while the writer task owns writing: the socket was full, or a failure is pending.
        self._writer_owns = write is None or writable is None
        self._failure: BaseException | None = None
        #: Event-loop time the current send began (None when not sending): the watchdog's input.
        self.send_started: float | None = None
        self._task: asyncio.Task[Any] | None = None
        #: Why the writer task was cancelled (SlowConsumer's message), if it was.
        self._slow: str | None = None
        #: Nothing is pending. An event only once someone awaits flushed() (rare: closes).
        self._is_idle = True
        self._idle: asyncio.Event | None = None
        self._closed = False
        #: Frames written: a figure for metrics and benchmarks (chunks_sent: the scheduler's).
        self.frames_sent = 0

    @classmethod
    def void(cls, codec: Codec) -> Outbound:
        """Where a detached request's output goes (SPEC.md §5.8): written nowhere, at once, so
        its chunks are numbered and recorded (and its response kept) as if sent, in order, with
        no producer ever waiting. One per detached request: ids of different users may match.

        Never closed (it is dropped with its request, or when the request is resumed), so its
        scheduler wakes it through a weak reference: a bound method would be a reference cycle
        (outbound -> scheduler -> method -> outbound) left to the cycle collector."""
        void = cls(_never_sent, codec, write=_discard, writable=_always)
        void.scheduler.wake = _weakly(void._wake)
        return void

    @property
    def streams(self) -> dict[str, OutputQueue]:
        """The open output queues, by request id."""
        return self.scheduler.queues

    @property
    def chunks_sent(self) -> int:
        return self.scheduler.chunks_sent

    # -- producers (all synchronous: no await between decision and effect) --------------------

    def attach_stream(self, stream: OutputQueue) -> None:
        self.scheduler.attach(stream)

    def send_control(
        self, *messages: GatewayMessage | bytes, on_sent: Callable[[], object] | None = None
    ) -> None:
        """Queue messages ahead of all chunks; ``on_sent`` runs once they are on the socket.

        Never raises: past ``max_control`` queued messages the client is not reading, and the
        writer ends the connection (:class:`SlowConsumer`), so producers need no error path.
        """
        if self._closed or self._slow is not None:
            return  # gone, or going: nothing queued now would be written
        if not self.scheduler.add_control(*messages, on_sent=on_sent):
            # The bound holds on every path, at once: whether the writer waits in a send on a
            # client that does not read, or writes synchronously and has not had its turn.
            # The reader stops taking messages well before this (control_room), so only a
            # client that does not read gets here.
            self._abort("control queue full: the client is not reading")
            return
        self._wake()

    def cancel_stream(
        self,
        stream: OutputQueue,
        response: Response,
        *,
        on_sent: Callable[[], object] | None = None,
    ) -> None:
        """G2: drop the queue's pending text and queue its cancelled response, in one step.

        The caller has already fed the cancel to the queue's state machine.
        """
        stream.cancel(response)
        self.send_control(response, on_sent=on_sent)

    def send_after(self, stream: OutputQueue, message: GatewayMessage) -> None:
        """Queue ``message`` after ``stream``'s response (sent now if the response is out)."""
        if stream.closed:
            self.send_control(message)
        else:
            stream.trailer.append(protocol.encode(message, self.codec))

    def answer_cancel(self, request_id: str, status: CancelStatus) -> None:
        """Queue a cancel's ``cancel_result``: after the request's response when the request
        lost the race to its completion (its response is still to be written, G1), else now."""
        result = CancelResult(request_id=request_id, status=status)
        stream = self.streams.get(request_id)
        if stream is not None and stream.finishing:
            self.send_after(stream, result)
        else:
            self.send_control(result)

    def _wake(self) -> None:
        self._is_idle = False
        if self._writer_owns:
            self._signal_writer()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._flush)

    # -- synchronous writing (the socket takes data) -----------------------------------------

    def write_now(self) -> None:
        """Write what is pending now, before returning, if the socket takes data (the cancel
        path: the cancelled response goes out before any bookkeeping, one loop turn earlier
        than the scheduled flush). Otherwise the writer task owns writing and sends it in
        order; the caller never awaits a send itself (a reader blocked in a send would be
        invisible to the slow-consumer watchdog, which watches the writer)."""
        if not self._writer_owns and not self._flushing:
            self._flush()

    def _flush(self) -> None:
        """Pack and write everything pending, without awaiting (a loop callback).

        A packed frame is always written at once (at most one batch over the socket's
        high-water mark): nothing packed waits while a cancel could be read (G2)."""
        self._flush_scheduled = False
        if self._closed or self._writer_owns or self._flushing:
            return
        self._flushing = True
        try:
            self._write_pending()
        finally:
            self._flushing = False

    def _write_pending(self) -> None:
        write, writable = self._write, self._writable  # set: see _writer_owns
        assert write is not None
        assert writable is not None
        frames_of = self.scheduler.frames
        try:
            while True:
                if not writable():  # the client is behind: the writer task awaits the drain
                    self._hand_over()
                    return
                parts, owners, sent_hooks = self._next_batch()
                if not parts:
                    self._set_idle()
                    return
                for frame in frames_of(parts, owners):
                    write(frame)
                    self.frames_sent += 1
                for hook in sent_hooks:
                    hook()
        except Exception as exc:  # raised by the writer task, which ends the connection
            self._hand_over(failure=exc)

    def _hand_over(self, *, failure: BaseException | None = None) -> None:
        self._writer_owns = True
        self._failure = failure
        self._signal_writer()

    def _signal_writer(self) -> None:
        wakeup = self._wakeup
        if wakeup is None:
            wakeup = self._wakeup = asyncio.Event()
        wakeup.set()
        self._ensure_writer()

    def _set_idle(self) -> None:
        self._is_idle = True
        if self._idle is not None:
            self._idle.set()

    def _ensure_writer(self) -> None:
        """Start the writer task if none runs. It exists only while it has work: a connection
        whose socket takes data has none (most of them, most of the time: no task's memory
        per idle connection); it ends once it has caught up and writing is synchronous again."""
        task = self._task
        if (task is None or task.done()) and not self._closed:
            if self._wakeup is None:
                self._wakeup = asyncio.Event()
            self._task = task = asyncio.get_running_loop().create_task(
                self._run(), name="muxgate-writer"
            )
            task.add_done_callback(self._writer_done)

    def start_writer(self) -> asyncio.Task[None]:
        """The writer task, started now if none runs (it starts by itself when it has work:
        this is for tests that hold a reference to it)."""
        self._ensure_writer()
        assert self._task is not None
        return self._task

    def _writer_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self._on_failure is not None:
            self._on_failure(exc)

    # -- the writer --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the writer; pending output is discarded (the connection is gone)."""
        self._closed = True
        self.scheduler.close()  # waiting producers go on (to their checkpoint)
        if self._wakeup is not None:
            self._wakeup.set()
        task = self._task
        if (
            task is not None
            and self.send_started is not None
            and task is not asyncio.current_task()
        ):
            task.cancel()  # blocked in a send to a connection that is gone
        self._set_idle()  # nothing will be sent any more: whoever awaits flushed() may go on
        if self._room is not None:
            self._room.set()
        # The callbacks into the connection and its socket are their bound methods: reference
        # cycles (connection -> outbound -> method -> connection) that would keep a closed
        # connection's objects and buffers until the next full collection, which comes rarer
        # the more the process holds. Dropped, a closed connection is freed when its last
        # reference goes. Nothing is written from now on (_flush and _run check _closed; a
        # send the writer is in the middle of goes on with the frame it has).
        self._send = _never_sent
        self._write = self._writable = None
        self._on_failure = None

    @property
    def closed(self) -> bool:
        """Nothing more will be written (the connection is ending)."""
        return self._closed

    def stuck_for(self, now: float) -> float:
        """Seconds the writer has been blocked in one send (0 when not sending)."""
        started = self.send_started
        return 0.0 if started is None else now - started

    def abort_slow(self) -> None:
        """The watchdog's verdict: the client stopped reading; the writer ends with
        :class:`SlowConsumer` and the connection closes (4008)."""
        self._abort(f"no progress writing for {self.slow_consumer_timeout:g} s")

    def _abort(self, reason: str) -> None:
        """End the writer with :class:`SlowConsumer` (the connection closes with 4008)."""
        if self._slow is not None or self._closed:
            return
        self._slow = reason
        task = self._task
        if self.send_started is not None and task is not None and not task.done():
            task.cancel()  # blocked in a send: _send_frames turns this into SlowConsumer
        else:  # waiting for work (or not started): it raises the failure when it wakes
            self._hand_over(failure=SlowConsumer(reason))

    async def flushed(self) -> None:
        """Return once everything queued so far has been handed to the socket."""
        while not self._is_idle:
            idle = self._idle
            if idle is None:
                idle = self._idle = asyncio.Event()
            idle.clear()
            await idle.wait()

    async def _run(self) -> None:
        """The writer task: it writes whenever the socket is full (awaiting the drain), and
        every frame when there is no ``write``; it ends once writing is synchronous again.

        Raises :class:`SlowConsumer` when the client stops reading; the connection closes.
        """
        frames_of = self.scheduler.frames
        wakeup = self._wakeup
        assert wakeup is not None  # made with the task (_ensure_writer)
        while not self._closed:
            await wakeup.wait()
            wakeup.clear()
            if self._failure is not None:
                raise self._failure
            while not self._closed:
                parts, owners, sent_hooks = self._next_batch()
                if not parts:
                    self._set_idle()
                    break
                await self._send_frames(frames_of(parts, owners))
                for hook in sent_hooks:
                    hook()
            if self._write is not None and self._writable is not None:
                self._writer_owns = False  # caught up: synchronous writes again
                return

    def _next_batch(self) -> Batch:
        """The scheduler's next frame's worth; the reader may go on once answers went out."""
        scheduler = self.scheduler
        if scheduler.control_overflow:
            raise SlowConsumer("control queue full: the client is not reading")
        batch = scheduler.next_batch()
        room = self._room
        if room is not None and scheduler.control_has_room:
            room.set()
        return batch

    async def _send_frames(self, frames: Iterable[bytes]) -> None:
        loop = asyncio.get_running_loop()
        for frame in frames:
            # No timer per send (a Timeout and a heap entry per frame): the gateway's
            # watchdog reads send_started and calls abort_slow() (see stuck_for).
            self.send_started = loop.time()
            try:
                await self._send(frame)
            except asyncio.CancelledError:
                if self._slow is not None:
                    raise SlowConsumer(self._slow) from None
                raise
            self.send_started = None
            self.frames_sent += 1

    # -- inbound backpressure ----------------------------------------------------------------

    @property
    def control_backlog(self) -> bool:
        """Whether the reader should stop taking messages: answers (errors, pongs, cancel
        results) wait unwritten up to the high-water mark, half of ``max_control``."""
        return self.scheduler.control_backlog

    async def control_room(self) -> None:
        """Return once the control queue is down to a quarter of ``max_control`` (or the
        outbound closed). The reader awaits this before taking the next message while
        :attr:`control_backlog` holds: every message may queue an answer, so a client that
        sends faster than it reads is slowed to its own reading pace (its frames wait in
        websockets' bounded queue, then in the kernel: TCP backpressure), instead of the queue
        growing to ``max_control`` and the connection ending."""
        scheduler = self.scheduler
        while not scheduler.control_has_room and not self._closed:
            room = self._room
            if room is None:
                room = self._room = asyncio.Event()
            room.clear()
            await room.wait()
