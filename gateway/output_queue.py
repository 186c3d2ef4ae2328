"""What one connection sends next: per-request output queues and the frame scheduler (sans-I/O).

This module decides *what* goes into the next frame; it never writes, waits or reads a clock.
:mod:`gateway.outbound` is the asyncio shell around it (the writer task, synchronous writes,
drain waits, the slow-consumer watchdog). Kept apart so that the rules below are unit-tested
without an event loop (tests/gateway/test_output_queue.py), and so that a change to how frames
are written cannot silently change what is written.

Why this shape (SPEC.md §2.4, §6 G1-G3):

- **G2 by construction.** A pipeline's text waits here *unencoded*, per request. A chunk is
  encoded (once) only when the scheduler takes it for a frame. Cancelling a request drops its
  pending text in the same synchronous step that queues the cancelled response, so nothing of it
  can be sent afterwards; the frame already handed to the socket is the only thing that was
  "sent". Frames built after an await are built lazily (:meth:`FrameScheduler.frames`) and skip
  chunks of requests cancelled meanwhile.
- **Terminal responses never wait behind another request's backlog.** Control messages (errors,
  pongs, cancelled responses, cancel results) go first in every frame; then queues that are
  finishing (their last chunk + response); then one turn for every other queue.
- **Fairness.** Each queue gets one turn per frame, round robin; a turn takes all its pending
  text. While the reader keeps up, each emitted text is its own chunk; once more than
  ``COALESCE_AFTER`` texts wait (the reader is behind), they go out as one chunk: that is the
  backpressure coalescing (``seq`` stays contiguous).
- **Batching without latency.** The scheduler packs what is pending when asked, up to
  ``max_batch_bytes`` (at least one message), and never holds anything back to fill a frame.
- **Bounded memory.** A queue holding more than ``max_pending_chars`` (or ``MAX_PENDING_STEPS``
  step messages) tells its producer to wait (:attr:`OutputQueue.over_cap`); the waiting is the
  shell's, which this module only tells when the producer may go on (``OutputQueue.on_room``).
  Control messages are bounded by ``max_control``: :meth:`FrameScheduler.add_control` reports
  the overflow and the shell ends the connection.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, TypeAlias

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

__all__ = [
    "COALESCE_AFTER",
    "MAX_FRAME",
    "MAX_PENDING_STEPS",
    "Batch",
    "ContentTooLarge",
    "FrameScheduler",
    "OutputQueue",
]


MAX_FRAME = protocol.limits.MAX_FRAME_BYTES
#: Most messages in one frame (SPEC.md §2.5: a receiver refuses more).
MAX_MESSAGES = protocol.limits.MAX_BATCH_MESSAGES

#: Pending texts of one request beyond which a turn coalesces them into one chunk.
COALESCE_AFTER = 16
#: Step messages of one request waiting unwritten beyond which its pipeline waits (as for text).
MAX_PENDING_STEPS = 64

#: One frame's worth: encoded messages, the queue each belongs to (None: a control message), and
#: the callbacks to run once they are written. A plain tuple: one is built per frame.
Batch: TypeAlias = tuple[list[bytes], list["OutputQueue | None"], list[Callable[[], object]]]


class ContentTooLarge(Exception):
    """A pipeline emitted more than the gateway's ``max_content_chars`` for one answer."""


class OutputQueue:
    """Pending output of one request on one connection. Implements :class:`pipeline.ChunkSink`
    and :class:`pipeline.StepSink`."""

    __slots__ = (
        "_prefix",
        "_scheduler",
        "_terminal",
        "cancelled",
        "closed",
        "emitted_chars",
        "events",
        "machine",
        "max_content_chars",
        "on_room",
        "pending",
        "pending_chars",
        "replay",
        "request_id",
        "scheduled",
        "sent_response",
        "tail",
        "trailer",
    )

    def __init__(
        self,
        scheduler: FrameScheduler,
        request_id: str,
        *,
        stream: bool,
        resumable: bool = False,
        machine: RequestStateMachine | None = None,
    ) -> None:
        self._scheduler = scheduler
        self.request_id = request_id
        self._prefix = protocol.chunk_prefix(request_id, scheduler.codec)  # once per request
        if machine is None:
            machine = RequestStateMachine(
                request_id, Sender.GATEWAY, stream=stream, resumable=resumable
            )
        self.machine = machine
        #: The terminal response as it was sent (content filled in): what a resume replays
        #: after the chunks once the request has ended (SPEC.md §5.8).
        self.sent_response: Response | None = None
        #: Resume (SPEC.md §5.8): texts of chunks sent before, with the ``seq`` of the first,
        #: to send again ahead of anything pending; and encoded messages after them (a replayed
        #: response and usage report), after which the queue closes.
        self.replay: tuple[int, list[str]] | None = None
        self.tail: list[bytes] = []
        self.pending: list[str] = []
        self.pending_chars = 0
        #: The completed or failed response to send once the pending text is flushed (its
        #: ``content`` is filled in then). Cancelled responses bypass this: control queue.
        self._terminal: Response | None = None
        #: Encoded messages to send right after the response (e.g. a late ``cancel_result``).
        self.trailer: list[bytes] = []
        #: In the scheduler's ready queue (its next turn will take the pending text).
        self.scheduled = False
        self.closed = False
        #: Set by a cancel: chunks packed but not yet written are dropped (FrameScheduler.frames).
        self.cancelled = False
        self.emitted_chars = 0
        self.max_content_chars = 1 << 62
        #: Called when a waiting producer may go on (text taken, or the queue closed). Set by the
        #: shell only while a producer waits: the wait itself is I/O, not this module's.
        self.on_room: Callable[[], object] | None = None
        #: Encoded ``step`` messages (SPEC.md §3.12) not yet taken, each with the number of
        #: pending texts before it: steps go out in order with the chunks. Rare (a few per
        #: request, only for chats with ``steps: true``), so the text path stays as it was.
        self.events: list[tuple[int, bytes]] = []

    # -- ChunkSink ---------------------------------------------------------------------------

    def push(self, text: str) -> bool:
        """Queue ``text``; True when the producer should wait (:meth:`drained`)."""
        if self.closed or self._terminal is not None:
            return False  # the request ended; the pipeline halts at its next checkpoint
        self.emitted_chars += len(text)
        if self.emitted_chars > self.max_content_chars:
            raise ContentTooLarge(f"the answer exceeds {self.max_content_chars} characters")
        self.pending.append(text)
        self.pending_chars += len(text)
        if not self.machine.stream:  # stream=false: kept for the final content only
            return False
        scheduler = self._scheduler
        if not self.scheduled:  # already queued for the next turn: nothing to wake
            scheduler.schedule(self)
        return self.pending_chars > scheduler.max_pending_chars

    def push_many(self, texts: list[str]) -> bool:
        """:meth:`push` each of ``texts`` (a read of several tokens), checked and scheduled once."""
        if self.closed or self._terminal is not None:
            return False
        size = sum(map(len, texts))
        self.emitted_chars += size
        if self.emitted_chars > self.max_content_chars:
            raise ContentTooLarge(f"the answer exceeds {self.max_content_chars} characters")
        self.pending.extend(texts)
        self.pending_chars += size
        if not self.machine.stream:
            return False
        scheduler = self._scheduler
        if not self.scheduled:
            scheduler.schedule(self)
        return self.pending_chars > scheduler.max_pending_chars

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
        self.events.append((position, protocol.encode(message, self._scheduler.codec)))
        if not self.scheduled:
            self._scheduler.schedule(self)

    @property
    def over_cap(self) -> bool:
        """Whether the producer should wait: too much text, or too many steps, not yet taken."""
        return (
            self.pending_chars > self._scheduler.max_pending_chars
            or len(self.events) > MAX_PENDING_STEPS
        )

    @property
    def must_wait(self) -> bool:
        """Whether a producer checking in now waits: over the cap, and the request still open."""
        return not self.closed and self._terminal is None and self.over_cap

    async def drained(self) -> None:
        """Return once the producer may go on: below the caps, or the request ended.

        The waiting is the shell's (``FrameScheduler.wait_for_room``, which returns once
        :attr:`on_room` was called); this module awaits nothing else."""
        while self.must_wait:
            await self._scheduler.wait_for_room(self)

    # -- ending ------------------------------------------------------------------------------

    def finish(self, status: ResponseStatus, usage: Usage, error: ErrorInfo | None = None) -> None:
        """Queue the completed or failed response after this queue's pending text. This commits
        it (the machine's :meth:`~protocol.RequestStateMachine.on_commit`): the request is decided
        now, although the response goes out after that text."""
        self.machine.on_commit(status)
        self._terminal = Response(
            request_id=self.request_id, status=status, error=error, usage=usage
        )
        self._scheduler.schedule(self, urgent=True)

    @property
    def finishing(self) -> bool:
        return self._terminal is not None

    def cancel(self, response: Response) -> None:
        """G2: drop everything pending, now. The caller queues ``response`` (cancelled) as a
        control message in the same synchronous step, and has fed the cancel to the machine."""
        self.machine.on_response(response)  # refuses anything but a cancelled response now
        self.sent_response = response
        self.cancelled = True
        self.replay = None  # chunks sent before the cancel: the replay was of those, dropped
        self.tail.clear()
        self.close()

    # -- resume (SPEC.md §5.8) ---------------------------------------------------------------

    def move_to(self, scheduler: FrameScheduler, *, replay_after: int | None = None) -> None:
        """Leave this queue's scheduler for ``scheduler`` (a detach, or a resume on another
        connection), keeping the text not taken yet and a committed response; with
        ``replay_after`` (a resume: the last ``seq`` the client has, or -1 for none), the chunks
        sent after it go out again first. Step messages not taken yet are dropped (a resume does
        not replay steps); ``trailer`` messages belong to the old connection: the caller sends
        them there first. Unlike :meth:`close`, a waiting producer is not released."""
        old = self._scheduler
        if old.queues.get(self.request_id) is self:
            del old.queues[self.request_id]
        self.events.clear()
        self.trailer.clear()
        self._scheduler = scheduler
        self._prefix = protocol.chunk_prefix(self.request_id, scheduler.codec)
        self.scheduled = False  # the old scheduler's ready queue skips it (next_batch)
        scheduler.attach(self)
        if replay_after is not None:
            self.set_replay(replay_after)
        if self.replay is not None or self._terminal is not None:
            scheduler.schedule(self, urgent=self._terminal is not None)
        elif self.pending:
            scheduler.schedule(self)

    def set_replay(self, after_seq: int) -> None:
        """Send the chunks after ``after_seq`` (-1: all) again, ahead of the pending text."""
        texts = self.machine.chunks_after(None if after_seq < 0 else after_seq)
        self.replay = (after_seq + 1, texts) if texts else None

    def replay_ended(self, after_seq: int, response: Response, *after: GatewayMessage) -> None:
        """A resume of a request that has ended: its chunks after ``after_seq`` (-1: all), its
        response and ``after`` (a usage report), then this queue closes. The chunks come from
        ``self.machine``, the one of the ended request (given at construction)."""
        self.set_replay(after_seq)
        codec = self._scheduler.codec
        self.tail = [protocol.encode(m, codec) for m in (response, *after)]
        self._scheduler.schedule(self, urgent=True)

    def close(self) -> None:
        """Nothing more of this request will be taken; a waiting producer goes on."""
        self.closed = True
        self.events.clear()
        self.pending.clear()
        self.pending_chars = 0
        on_room = self.on_room
        if on_room is not None:
            on_room()
        queues = self._scheduler.queues
        if queues.get(self.request_id) is self:
            del queues[self.request_id]

    # -- the scheduler's turn ----------------------------------------------------------------

    def take(self, codec: Codec) -> list[bytes]:
        """This queue's turn: its pending text as chunks (+ its response), encoded."""
        out: list[bytes] = []
        machine = self.machine
        pending = self.pending
        if self.replay is not None:  # a resume: the chunks sent before, again, first
            first, texts = self.replay
            self.replay = None
            out.extend(protocol.encode_chunks_from(self._prefix, first, texts, codec))
        if self.tail:  # a resume of a request that had ended: its response (and usage)
            out.extend(self.tail)
            self.tail = []
            self.close()
            return out
        if self.events:
            self._take_with_steps(codec, out)
        elif pending and machine.stream:
            self._chunks(pending, codec, out)
            pending.clear()  # (its texts are encoded, or joined into a new list: done with)
            self.pending_chars = 0
            on_room = self.on_room
            if on_room is not None:
                on_room()
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
            self.sent_response = terminal
            out.append(protocol.encode(terminal, codec))
            out.extend(self.trailer)
            self.trailer.clear()
            self.close()
        return out

    def _chunks(self, texts: list[str], codec: Codec, out: list[bytes]) -> None:
        """Encode ``texts`` as the next chunks. Each emitted text is its own chunk while the
        reader keeps up; once more than COALESCE_AFTER texts wait (the reader is behind), they
        go out as one chunk."""
        if len(texts) > COALESCE_AFTER:
            texts = ["".join(texts)]
        machine = self.machine
        first = machine.next_seq
        try:
            encoded = protocol.encode_chunks_from(self._prefix, first, texts, codec)
        except (TypeError, ValueError):  # a backend emitted a lone surrogate: replace it
            texts = [text.encode("utf-8", "replace").decode("utf-8") for text in texts]
            encoded = protocol.encode_chunks_from(self._prefix, first, texts, codec)
        machine.on_chunks(first, texts)  # checked before any of them is handed out
        out.extend(encoded)
        self._scheduler.chunks_sent += len(texts)

    def _take_with_steps(self, codec: Codec, out: list[bytes]) -> None:
        """The turn of a queue with step messages waiting: texts and steps in their order."""
        events, self.events = self.events, []
        pending = self.pending
        if self.machine.stream:
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
        else:  # no chunks: the text waits for the response's content
            out.extend(encoded for _, encoded in events)
        on_room = self.on_room
        if on_room is not None:
            on_room()


def _nothing() -> None:
    pass


async def _no_waiting(queue: OutputQueue) -> None:
    raise RuntimeError("no shell to wait in: FrameScheduler(wait_for_room=...) was not given")


class FrameScheduler:
    """The control queue and the output queues of one connection; answers "what is the next
    frame" (:meth:`next_batch`, then :meth:`frames`).

    ``wake()`` is called when there is something new to write (the shell schedules a write);
    ``wait_for_room(queue)`` is how a producer over its cap waits: it must return once
    ``queue.on_room`` was called (the shell sets that callback while it waits).
    """

    def __init__(
        self,
        codec: Codec,
        *,
        max_batch_bytes: int = protocol.limits.DEFAULT_BATCH_BYTES,
        max_pending_chars: int = 65_536,
        max_control: int = 4096,
        wake: Callable[[], object] = _nothing,
        wait_for_room: Callable[[OutputQueue], Awaitable[None]] = _no_waiting,
    ) -> None:
        self.codec = codec
        self.max_batch_bytes = max_batch_bytes
        self.max_pending_chars = max_pending_chars
        self.max_control = max_control
        #: control_backlog from the high mark; control_has_room at the low one.
        self._control_high = max(1, max_control // 2)
        self._control_low = max_control // 4
        self.wake = wake
        self.wait_for_room = wait_for_room
        self.queues: dict[str, OutputQueue] = {}
        #: Encoded control messages, in order.
        self.control: deque[bytes] = deque()
        # Callbacks keyed by the control message's absolute position (popped + index), run
        # after the frame holding it was written. Rare (cancelled responses), so a dict.
        self._on_sent: dict[int, Callable[[], object]] = {}
        self._control_popped = 0
        self._urgent: deque[OutputQueue] = deque()
        self._ready: deque[OutputQueue] = deque()
        #: Chunks encoded (taken for a frame): a figure for metrics and benchmarks.
        self.chunks_sent = 0

    # -- producers ---------------------------------------------------------------------------

    def attach(self, queue: OutputQueue) -> None:
        if queue.request_id in self.queues:
            raise ValueError(f"stream {queue.request_id!r} is already open")
        self.queues[queue.request_id] = queue

    def schedule(self, queue: OutputQueue, *, urgent: bool = False) -> None:
        """Give ``queue`` a turn in the next frame (``urgent``: before the others')."""
        if urgent:
            self._urgent.append(queue)
        elif not queue.scheduled:
            queue.scheduled = True
            self._ready.append(queue)
        self.wake()

    def add_control(
        self, *messages: GatewayMessage | bytes, on_sent: Callable[[], object] | None = None
    ) -> bool:
        """Queue messages ahead of all chunks; ``on_sent`` is handed back with the batch that
        holds the last of them. False when the queue is now over ``max_control`` (the client
        is not reading; the shell ends the connection). Does not call ``wake``."""
        control = self.control
        codec = self.codec
        for m in messages:
            control.append(m if isinstance(m, bytes) else protocol.encode(m, codec))
        if on_sent is not None:
            self._on_sent[len(control) - 1 + self._control_popped] = on_sent
        return len(control) <= self.max_control

    # -- bounds ------------------------------------------------------------------------------

    @property
    def control_overflow(self) -> bool:
        """More than ``max_control`` control messages wait: the client is not reading."""
        return len(self.control) > self.max_control

    @property
    def control_backlog(self) -> bool:
        """Whether the reader should stop taking messages: answers wait unwritten up to the
        high-water mark, half of ``max_control``."""
        return len(self.control) >= self._control_high

    @property
    def control_has_room(self) -> bool:
        """Whether the reader may take messages again: the control queue is down to a quarter
        of ``max_control`` (hysteresis, so the reader does not stop and go every message)."""
        return len(self.control) <= self._control_low

    # -- the next frame ----------------------------------------------------------------------

    def next_batch(self) -> Batch:
        """Take one frame's worth of what is pending now: control, finishing queues, then one
        fair turn per queue, up to ``max_batch_bytes`` (at least one message). Empty when
        nothing is pending. The shell writes ``frames(parts, owners)``, then runs the hooks."""
        parts: list[bytes] = []
        sent_hooks: list[Callable[[], object]] = []
        cap = self.max_batch_bytes
        size = self._take_control(parts, sent_hooks, cap)
        owners: list[OutputQueue | None] = [None] * len(parts)
        codec = self.codec
        for queue in (self._urgent, self._ready):
            for _ in range(len(queue)):
                if size >= cap and parts:
                    break
                output = queue.popleft()
                if output.closed or output._scheduler is not self:  # ended, or moved away
                    continue
                output.scheduled = False
                taken = output.take(codec)
                size += sum(map(len, taken))
                parts.extend(taken)
                owners.extend([output] * len(taken))
        return parts, owners, sent_hooks

    def _take_control(
        self, parts: list[bytes], sent_hooks: list[Callable[[], object]], cap: int
    ) -> int:
        """Move queued control messages into ``parts`` (at least one, up to ``cap`` bytes)."""
        control = self.control
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
        return size

    def frames(self, parts: list[bytes], owners: list[OutputQueue | None]) -> Iterable[bytes]:
        """The frames that carry a batch: one, or (batching off, over MAX_FRAME_BYTES or over
        MAX_BATCH_MESSAGES) several, built lazily."""
        if len(parts) == 1:
            return parts
        if (
            self.max_batch_bytes > 0
            and len(parts) <= MAX_MESSAGES
            and sum(map(len, parts)) + len(parts) <= MAX_FRAME
        ):
            return (protocol.join_batch(parts, self.codec),)
        return self._split(parts, owners, self.max_batch_bytes > 0)

    def _split(
        self, parts: list[bytes], owners: list[OutputQueue | None], batching: bool
    ) -> Iterator[bytes]:
        """Frames of at most MAX_FRAME_BYTES and MAX_BATCH_MESSAGES (one message each without
        batching), built lazily.

        The shell writes every frame after the first after an await (the previous send's
        drain), when a cancel may have been read: chunks of requests cancelled meanwhile are
        dropped here, so none is written after its cancelled response (G2)."""
        group: list[bytes] = []
        size = 0
        first = True
        for part, owner in zip(parts, owners, strict=True):
            if not first and owner is not None and owner.cancelled:
                continue
            full = size + len(part) + 1 > MAX_FRAME or len(group) == MAX_MESSAGES
            if group and (not batching or full):
                yield protocol.join_batch(group, self.codec) if len(group) > 1 else group[0]
                first = False
                group, size = [], 0
                if owner is not None and owner.cancelled:
                    continue
            group.append(part)
            size += len(part) + 1
        if group:
            yield protocol.join_batch(group, self.codec) if len(group) > 1 else group[0]

    # -- the end -----------------------------------------------------------------------------

    def close(self) -> None:
        """Discard everything pending (the connection is gone); waiting producers go on."""
        for queue in list(self.queues.values()):
            queue.close()
        self.control.clear()
        self._on_sent.clear()
        self._urgent.clear()
        self._ready.clear()
        self.wake = _nothing  # the shell's bound method (a reference cycle); nothing to wake
