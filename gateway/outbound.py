"""The outbound path of one connection: per-request pending text, a control queue, one writer.

Why this shape (SPEC.md §2.4, §6 G1-G3):

- **G2 by construction.** A pipeline's text waits here *unencoded*, per request. A chunk is
  encoded (once) only when the writer takes it for a frame. Cancelling a request drops its pending
  text in the same synchronous step that queues the cancelled response, so nothing of it can be
  sent afterwards; the frame already handed to the socket is the only thing that was "sent".
- **Terminal responses never wait behind another request's backlog.** Control messages (errors,
  pongs, cancelled responses, cancel results) go first in every frame; then streams that are
  finishing (their last chunk + response); then one turn for every other stream.
- **Fairness.** Each stream gets one chunk per frame, round robin; a stream's turn takes all its
  pending text as one chunk. That is also the backpressure coalescing: when the reader is slow,
  text accumulates and goes out in fewer, larger chunks (``seq`` stays contiguous).
- **Batching without latency.** The writer never waits to fill a frame: it packs what is pending
  when it runs, up to ``max_batch_bytes``, and sends.
- **No task switch per frame.** While the socket takes data, a loop callback (scheduled once per
  loop iteration by the first producer) packs and writes synchronously: everything produced in
  one iteration goes out in the next, with no await per frame. Only when the socket is full (the
  client is behind) does the writer task take over and await the drain; once it has caught up,
  writing is synchronous again.
- **Bounded memory.** A stream holding more than ``max_pending_chars`` makes its producer wait at
  its next emit; a writer stuck in ``send`` longer than ``slow_consumer_timeout`` ends the
  connection (close 4008). Control messages are answers to the client's own messages: past half
  of ``max_control`` queued, the connection's reader stops taking messages until they are
  written (``control_room``), and past ``max_control`` (a client that does not read at all)
  the connection ends at once (4008), on every path.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import protocol
from protocol import (
    Codec,
    ErrorInfo,
    GatewayMessage,
    RequestStateMachine,
    Response,
    ResponseStatus,
    Sender,
    Step,
    StepState,
    Usage,
)

if TYPE_CHECKING:
    from .pipeline import StepRecord

__all__ = ["ContentTooLarge", "Outbound", "SlowConsumer", "Stream"]


MAX_FRAME = protocol.limits.MAX_FRAME_BYTES

#: Pending texts of one request beyond which a writer turn coalesces them into one chunk.
COALESCE_AFTER = 16
#: Step messages of one request waiting unwritten beyond which its pipeline waits (as for text).
MAX_PENDING_STEPS = 64


class SlowConsumer(Exception):
    """The peer did not read for longer than the configured limit."""


class ContentTooLarge(Exception):
    """A pipeline emitted more than the gateway's ``max_content_chars`` for one answer."""


class Stream:
    """Pending output of one request on one connection. Implements :class:`ChunkSink`."""

    __slots__ = (
        "_drained",
        "_outbound",
        "_prefix",
        "_terminal",
        "cancelled",
        "closed",
        "emitted_chars",
        "events",
        "machine",
        "max_content_chars",
        "pending",
        "pending_chars",
        "request_id",
        "scheduled",
        "trailer",
    )

    def __init__(self, outbound: Outbound, request_id: str, *, stream: bool) -> None:
        self._outbound = outbound
        self.request_id = request_id
        self._prefix = protocol.chunk_prefix(request_id, outbound.codec)  # once per request
        self.machine = RequestStateMachine(request_id, Sender.GATEWAY, stream=stream)
        self.pending: list[str] = []
        self.pending_chars = 0
        #: The completed or failed response to send once the pending text is flushed (its
        #: ``content`` is filled in then). Cancelled responses bypass this: control queue.
        self._terminal: Response | None = None
        #: Encoded messages to send right after the response (e.g. a late ``cancel_result``).
        self.trailer: list[bytes] = []
        self.scheduled = False
        self.closed = False
        #: Set by a cancel: packed chunks not yet written are dropped (see Outbound._frames).
        self.cancelled = False
        self.emitted_chars = 0
        self.max_content_chars = 1 << 62
        self._drained: asyncio.Event | None = None
        #: Encoded ``step`` messages (SPEC.md §3.12) not yet taken, each with the number of
        #: pending texts before it: steps go out in order with the chunks. Rare (a few per
        #: request, only for chats with ``steps: true``), so the text path stays as it was.
        self.events: list[tuple[int, bytes]] = []

    # -- ChunkSink ---------------------------------------------------------------------------

    def push(self, text: str) -> bool:
        if self.closed or self._terminal is not None:
            return False  # the request ended; the pipeline halts at its next checkpoint
        self.emitted_chars += len(text)
        if self.emitted_chars > self.max_content_chars:
            raise ContentTooLarge(f"the answer exceeds {self.max_content_chars} characters")
        self.pending.append(text)
        self.pending_chars += len(text)
        if not self.machine.stream:  # stream=false: kept for the final content only
            return False
        if not self.scheduled:  # already queued for the writer's next turn: nothing to wake
            self._outbound._schedule(self)
        return self.pending_chars > self._outbound.max_pending_chars

    def push_step(self, step: StepRecord, state: StepState) -> None:
        """Queue a ``step`` message after the text pushed so far (:class:`pipeline.StepSink`)."""
        if self.closed or self._terminal is not None:
            return  # after a cancel was read: the halt objects say the rest (§3.12)
        message = Step(
            request_id=self.request_id,
            index=step.index,
            kind=step.kind,
            name=step.name,
            state=state,
        )
        self.machine.on_step(message)
        position = len(self.pending) if self.machine.stream else 0
        self.events.append((position, protocol.encode(message, self._outbound.codec)))
        if not self.scheduled:
            self._outbound._schedule(self)

    @property
    def over_cap(self) -> bool:
        """Whether the producer should wait: too much text, or too many steps, not yet taken."""
        return (
            self.pending_chars > self._outbound.max_pending_chars
            or len(self.events) > MAX_PENDING_STEPS
        )

    async def drained(self) -> None:
        while not self.closed and self._terminal is None and self.over_cap:
            if self._drained is None:
                self._drained = asyncio.Event()
            self._drained.clear()
            await self._drained.wait()

    # -- ending ------------------------------------------------------------------------------

    def finish(self, status: ResponseStatus, usage: Usage, error: ErrorInfo | None = None) -> None:
        """Queue the completed or failed response after this stream's pending text."""
        self._terminal = Response(
            request_id=self.request_id, status=status, error=error, usage=usage
        )
        self._outbound._schedule(self, urgent=True)

    @property
    def finishing(self) -> bool:
        return self._terminal is not None

    def _wake_producer(self) -> None:
        drained = self._drained
        if drained is not None and not drained.is_set():
            drained.set()

    def _take(self, codec: Codec) -> list[bytes]:
        """The writer's turn: this stream's pending text as one chunk (+ its response)."""
        out: list[bytes] = []
        machine = self.machine
        pending = self.pending
        if self.events:
            self._take_with_steps(codec, out)
        elif pending and machine.stream:
            self._chunks(pending, codec, out)
            pending.clear()  # (its texts are encoded, or joined into a new list: done with)
            self.pending_chars = 0
            self._wake_producer()
        terminal = self._terminal
        if terminal is not None:
            if terminal.status is ResponseStatus.COMPLETED:
                content = machine.text if machine.stream else "".join(self.pending)
                if not machine.stream:  # never went through encode_chunk's check
                    content = content.encode("utf-8", "replace").decode("utf-8")
                terminal = Response(
                    request_id=terminal.request_id,
                    status=terminal.status,
                    content=content,
                    usage=terminal.usage,
                )
            machine.on_response(terminal)
            out.append(protocol.encode(terminal, codec))
            out.extend(self.trailer)
            self.trailer.clear()
            self._close()
        return out

    def _chunks(self, texts: list[str], codec: Codec, out: list[bytes]) -> None:
        """Encode ``texts`` as the next chunks. Each emitted text is its own chunk while the
        reader keeps up; once more than COALESCE_AFTER texts wait (the reader is behind), they
        go out as one chunk."""
        if len(texts) > COALESCE_AFTER:
            texts = ["".join(texts)]
        machine = self.machine
        prefix, encode = self._prefix, protocol.encode_chunk_from
        for text in texts:
            seq = machine.next_seq
            try:
                encoded = encode(prefix, seq, text, codec)
            except (TypeError, ValueError):  # a backend emitted a lone surrogate
                text = text.encode("utf-8", "replace").decode("utf-8")
                encoded = encode(prefix, seq, text, codec)
            machine.on_chunk(seq, text)
            out.append(encoded)
        self._outbound.chunks_sent += len(texts)

    def _take_with_steps(self, codec: Codec, out: list[bytes]) -> None:
        """The turn of a stream with step messages waiting: texts and steps in their order."""
        events, self.events = self.events, []
        pending = self.pending
        if not self.machine.stream:  # no chunks: the text waits for the response's content
            out.extend(encoded for _, encoded in events)
            self._wake_producer()
            return
        taken = 0
        for position, encoded in events:
            if position > taken:
                self._chunks(pending[taken:position], codec, out)
                taken = position
            out.append(encoded)
        if taken < len(pending):
            self._chunks(pending[taken:], codec, out)
        pending.clear()
        self.pending_chars = 0
        self._wake_producer()

    def _close(self) -> None:
        self.closed = True
        self.events.clear()
        self.pending.clear()
        self.pending_chars = 0
        self._wake_producer()
        streams = self._outbound.streams
        if streams.get(self.request_id) is self:
            del streams[self.request_id]


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
    ) -> None:
        self._send = send
        self._write = write
        self._writable = writable
        self.codec = codec
        self.max_batch_bytes = max_batch_bytes
        self.max_pending_chars = max_pending_chars
        self.max_control = max_control
        #: control_backlog from the high mark; control_room returns at the low one.
        self._control_high = max(1, max_control // 2)
        self._control_low = max_control // 4
        self._room: asyncio.Event | None = None
        self.slow_consumer_timeout = slow_consumer_timeout
        self.streams: dict[str, Stream] = {}
        self._control: deque[bytes] = deque()
        # Callbacks keyed by the control message's absolute position (popped + index), run
        # after the frame holding it was written. Rare (cancelled responses), so a dict.
        self._on_sent: dict[int, Callable[[], object]] = {}
        self._control_popped = 0
        self._urgent: deque[Stream] = deque()
        self._ready: deque[Stream] = deque()
        self._wakeup = asyncio.Event()
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
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        #: Figures for metrics and benchmarks.
        self.frames_sent = 0
        self.chunks_sent = 0

    # -- producers (all synchronous: no await between decision and effect) --------------------

    def attach_stream(self, stream: Stream) -> None:
        if stream.request_id in self.streams:
            raise ValueError(f"stream {stream.request_id!r} is already open")
        self.streams[stream.request_id] = stream

    def send_control(
        self, *messages: GatewayMessage | bytes, on_sent: Callable[[], object] | None = None
    ) -> None:
        """Queue messages ahead of all chunks; ``on_sent`` runs once they are on the socket.

        Never raises: past ``max_control`` queued messages the client is not reading, and the
        writer ends the connection (:class:`SlowConsumer`), so producers need no error path.
        """
        if self._closed or self._slow is not None:
            return  # gone, or going: nothing queued now would be written
        control = self._control
        for m in messages:
            control.append(m if isinstance(m, bytes) else protocol.encode(m, self.codec))
        if on_sent is not None:
            self._on_sent[len(control) - 1 + self._control_popped] = on_sent
        if len(control) > self.max_control:
            # The bound holds on every path, at once: whether the writer waits in a send on a
            # client that does not read, or writes synchronously and has not had its turn.
            # The reader stops taking messages well before this (control_room), so only a
            # client that does not read gets here.
            self._abort("control queue full: the client is not reading")
            return
        self._wake()

    def cancel_stream(
        self, stream: Stream, response: Response, *, on_sent: Callable[[], object] | None = None
    ) -> None:
        """G2: drop the stream's pending text and queue its cancelled response, in one step.

        The caller has already fed the cancel to the stream's state machine.
        """
        stream.machine.on_response(response)  # refuses anything but a cancelled response now
        stream.cancelled = True
        stream._close()
        self.send_control(response, on_sent=on_sent)

    def send_after(self, stream: Stream, message: GatewayMessage) -> None:
        """Queue ``message`` after ``stream``'s response (sent now if the response is out)."""
        if stream.closed:
            self.send_control(message)
        else:
            stream.trailer.append(protocol.encode(message, self.codec))

    def _schedule(self, stream: Stream, *, urgent: bool = False) -> None:
        if urgent:
            self._urgent.append(stream)
        elif not stream.scheduled:
            stream.scheduled = True
            self._ready.append(stream)
        self._wake()

    def _wake(self) -> None:
        self._idle.clear()
        if self._writer_owns:
            self._wakeup.set()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._flush)

    # -- synchronous writing (the socket takes data) -----------------------------------------

    def flush_now(self) -> None:
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
        try:
            while True:
                if not writable():  # the client is behind: the writer task awaits the drain
                    self._hand_over()
                    return
                parts, owners, sent_hooks = self._next_batch()
                if not parts:
                    self._idle.set()
                    return
                for frame in self._frames_of(parts, owners):
                    write(frame)
                    self.frames_sent += 1
                for hook in sent_hooks:
                    hook()
        except Exception as exc:  # raised by the writer task, which ends the connection
            self._hand_over(failure=exc)

    def _hand_over(self, *, failure: BaseException | None = None) -> None:
        self._writer_owns = True
        self._failure = failure
        self._wakeup.set()

    # -- the writer --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the writer; pending output is discarded (the connection is gone)."""
        self._closed = True
        for stream in list(self.streams.values()):
            stream._close()
        self._control.clear()
        self._on_sent.clear()
        self._urgent.clear()
        self._ready.clear()
        self._wakeup.set()
        self._idle.set()  # nothing will be sent any more: whoever awaits flushed() may go on
        if self._room is not None:
            self._room.set()

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
        await self._idle.wait()

    async def run(self) -> None:
        """The writer task: it writes whenever the socket is full (awaiting the drain), and
        every frame when there is no ``write``; otherwise it sleeps.

        Raises :class:`SlowConsumer` when the client stops reading; the connection closes.
        """
        self._task = asyncio.current_task()
        while not self._closed:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self._failure is not None:
                raise self._failure
            while not self._closed:
                parts, owners, sent_hooks = self._next_batch()
                if not parts:
                    self._idle.set()
                    break
                await self._send_frames(self._frames_of(parts, owners))
                for hook in sent_hooks:
                    hook()
            if self._write is not None and self._writable is not None:
                self._writer_owns = False  # caught up: synchronous writes again

    def _next_batch(self) -> tuple[list[bytes], list[Stream | None], list[Callable[[], object]]]:
        """One frame's worth of messages, their owners, and the hooks to run once written."""
        if len(self._control) > self.max_control:
            raise SlowConsumer("control queue full: the client is not reading")
        sent_hooks: list[Callable[[], object]] = []
        owners: list[Stream | None] = []
        return self._pack(sent_hooks, owners), owners, sent_hooks

    def _frames_of(self, parts: list[bytes], owners: list[Stream | None]) -> Iterable[bytes]:
        if len(parts) == 1:
            return parts
        if self.max_batch_bytes > 0 and sum(map(len, parts)) + len(parts) <= MAX_FRAME:
            return (protocol.join_batch(parts, self.codec),)
        # Several frames (batching off, or over MAX_FRAME_BYTES): see _frames.
        return self._frames(parts, owners, self.max_batch_bytes > 0)

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

    def _frames(
        self, parts: list[bytes], owners: list[Stream | None], batching: bool
    ) -> Iterator[bytes]:
        """Frames of at most MAX_FRAME_BYTES (one message each without batching), built lazily.

        Every frame after the first is written after an await (the previous send's drain),
        when a cancel may have been read: chunks of requests cancelled meanwhile are dropped
        here, so none is written after its cancelled response (G2)."""
        group: list[bytes] = []
        size = 0
        first = True
        for part, owner in zip(parts, owners, strict=True):
            if not first and owner is not None and owner.cancelled:
                continue
            if group and (not batching or size + len(part) + 1 > MAX_FRAME):
                yield protocol.join_batch(group, self.codec) if len(group) > 1 else group[0]
                first = False
                group, size = [], 0
                if owner is not None and owner.cancelled:
                    continue
            group.append(part)
            size += len(part) + 1
        if group:
            yield protocol.join_batch(group, self.codec) if len(group) > 1 else group[0]

    def _take_control(
        self, parts: list[bytes], sent_hooks: list[Callable[[], object]], cap: int
    ) -> int:
        """Move queued control messages into ``parts`` (at least one, up to ``cap`` bytes)."""
        control = self._control
        size = 0
        while control and (size < cap or not parts):
            m = control.popleft()
            if self._on_sent:
                hook = self._on_sent.pop(self._control_popped, None)
                if hook is not None:
                    sent_hooks.append(hook)
            self._control_popped += 1
            parts.append(m)
            size += len(m)
        room = self._room
        if room is not None and len(control) <= self._control_low:
            room.set()
        return size

    # -- inbound backpressure ----------------------------------------------------------------

    @property
    def control_backlog(self) -> bool:
        """Whether the reader should stop taking messages: answers (errors, pongs, cancel
        results) wait unwritten up to the high-water mark, half of ``max_control``."""
        return len(self._control) >= self._control_high

    async def control_room(self) -> None:
        """Return once the control queue is down to a quarter of ``max_control`` (or the
        outbound closed). The reader awaits this before taking the next message while
        :attr:`control_backlog` holds: every message may queue an answer, so a client that
        sends faster than it reads is slowed to its own reading pace (its frames wait in
        websockets' bounded queue, then in the kernel: TCP backpressure), instead of the queue
        growing to ``max_control`` and the connection ending."""
        while len(self._control) > self._control_low and not self._closed:
            room = self._room
            if room is None:
                room = self._room = asyncio.Event()
            room.clear()
            await room.wait()

    def _pack(
        self, sent_hooks: list[Callable[[], object]], owners: list[Stream | None]
    ) -> list[bytes]:
        """Take one frame's worth of what is pending now: control, finishing streams, then one
        fair turn per stream, up to ``max_batch_bytes`` (at least one message)."""
        parts: list[bytes] = []
        cap = self.max_batch_bytes
        size = self._take_control(parts, sent_hooks, cap)
        owners.extend([None] * len(parts))
        for queue in (self._urgent, self._ready):
            for _ in range(len(queue)):
                if size >= cap and parts:
                    break
                stream = queue.popleft()
                stream.scheduled = False
                if stream.closed:
                    continue
                taken = stream._take(self.codec)
                size += sum(map(len, taken))
                parts.extend(taken)
                owners.extend([stream] * len(taken))
        return parts
