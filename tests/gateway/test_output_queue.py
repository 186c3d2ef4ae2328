"""The frame scheduler alone: what goes into each frame, decided without an event loop.

These tests drive :mod:`gateway.output_queue` directly (no asyncio, no socket): producers push,
the test asks for the next batch, and decodes what would be written.
"""

from __future__ import annotations

import pytest

import protocol
from gateway.output_queue import (
    COALESCE_AFTER,
    MAX_FRAME,
    MAX_PENDING_STEPS,
    ContentTooLarge,
    FrameScheduler,
    OutputQueue,
)
from gateway.pipeline import StepRecord
from protocol import (
    CancelReason,
    Chunk,
    Codec,
    Pong,
    Response,
    ResponseStatus,
    Sender,
    Step,
    StepState,
    Usage,
)


def scheduler(**settings: int) -> FrameScheduler:
    return FrameScheduler(Codec.JSON, **settings)


def opened(sched: FrameScheduler, request_id: str, *, stream: bool = True) -> OutputQueue:
    queue = OutputQueue(sched, request_id, stream=stream)
    sched.attach(queue)
    return queue


def decoded(parts: list[bytes]) -> list[protocol.Message]:
    out: list[protocol.Message] = []
    for part in parts:
        for item in protocol.decode(part, Codec.JSON, Sender.GATEWAY):
            assert not isinstance(item, protocol.RemoteProtocolError)
            out.append(item)
    return out


def batch_messages(sched: FrameScheduler) -> list[protocol.Message]:
    parts, _, _ = sched.next_batch()
    return decoded(parts)


def batch_messages_of(sched: FrameScheduler, queue: OutputQueue, texts: list[str]) -> list[Chunk]:
    """Push ``texts`` to ``queue``, then the chunks of the next batch."""
    for text in texts:
        queue.push(text)
    return [m for m in batch_messages(sched) if isinstance(m, Chunk)]


def labels(messages: list[protocol.Message]) -> list[str]:
    """A compact view: ``rid:text`` for chunks, ``rid:status`` for responses, etc."""
    out = []
    for m in messages:
        if isinstance(m, Chunk):
            out.append(f"{m.request_id}:{m.text}")
        elif isinstance(m, Response):
            out.append(f"{m.request_id}:{m.status.value}")
        elif isinstance(m, Step):
            out.append(f"{m.request_id}:step-{m.state.value}")
        elif isinstance(m, Pong):
            out.append(f"pong-{m.id}")
        else:
            out.append(type(m).__name__)
    return out


def cancelled(request_id: str) -> Response:
    return Response(
        request_id=request_id,
        status=ResponseStatus.CANCELLED,
        reason=CancelReason.CLIENT,
        usage=Usage(final=False),
    )


def test_nothing_pending_is_an_empty_batch() -> None:
    sched = scheduler()
    opened(sched, "a")
    assert sched.next_batch() == ([], [], [])


def test_a_batch_is_packed_up_to_max_batch_bytes_and_the_rest_waits_its_turn() -> None:
    sched = scheduler(max_batch_bytes=100)
    queues = [opened(sched, f"r{n}") for n in range(5)]
    for queue in queues:
        queue.push("x" * 20)  # one chunk of ~60 bytes each
    sizes = []
    seen: list[str] = []
    while True:
        parts, owners, _ = sched.next_batch()
        if not parts:
            break
        sizes.append(sum(map(len, parts)))
        assert len(parts) == len(owners)
        seen.extend(labels(decoded(parts)))
        # Packing stops at the first turn that reaches the cap: never two turns past it.
        assert sum(map(len, parts[:-1])) < 100
    assert len(sizes) == 3, "two turns per frame of 100 bytes, then the last one"
    assert seen == [f"r{n}:{'x' * 20}" for n in range(5)], "each chunk once, in turn order"


def test_a_message_over_the_cap_still_goes_out_alone() -> None:
    sched = scheduler(max_batch_bytes=10)
    a, b = opened(sched, "a"), opened(sched, "b")
    a.push("long text " * 10)
    b.push("b")
    assert labels(batch_messages(sched)) == ["a:" + "long text " * 10]
    assert labels(batch_messages(sched)) == ["b:b"]
    # Batching off (max_batch_bytes 0): every batch still holds one message, control or text.
    unbatched = scheduler(max_batch_bytes=0)
    c = opened(unbatched, "c")
    c.push("c")
    unbatched.add_control(Pong(id=1))
    unbatched.add_control(Pong(id=2))
    assert labels(batch_messages(unbatched)) == ["pong-1"]
    assert labels(batch_messages(unbatched)) == ["pong-2"]
    assert labels(batch_messages(unbatched)) == ["c:c"]


def test_frames_join_a_batch_into_one_frame_or_one_message_each_without_batching() -> None:
    for batch_bytes, expected_frames in ((65_536, 1), (0, 3)):
        sched = scheduler(max_batch_bytes=batch_bytes)
        a = opened(sched, "a")
        for text in ("one", "two", "three"):
            a.push(text)
        parts, owners, _ = sched.next_batch()
        assert len(parts) == 3, "batching off still packs one turn: a frame per message"
        frames = list(sched.frames(parts, owners))
        assert len(frames) == expected_frames
        assert labels(decoded(frames)) == ["a:one", "a:two", "a:three"]


def test_a_batch_over_max_frame_is_split_into_frames_under_it() -> None:
    sched = scheduler(max_batch_bytes=1 << 22)
    queues = [opened(sched, f"r{n}") for n in range(3)]
    for queue in queues:
        queue.push("y" * (MAX_FRAME // 2))
    parts, owners, _ = sched.next_batch()
    assert len(parts) == 3
    frames = list(sched.frames(parts, owners))
    assert len(frames) == 3
    assert all(len(frame) <= MAX_FRAME for frame in frames)


def test_a_batch_of_more_messages_than_a_frame_may_carry_is_split_by_count() -> None:
    """SPEC.md §2.5: a receiver refuses a frame of more than MAX_BATCH_MESSAGES messages, however
    small (a resume's replay is one turn of many chunks)."""
    limit = protocol.limits.MAX_BATCH_MESSAGES
    sched = scheduler(max_batch_bytes=1 << 22)
    queues = [opened(sched, f"r{n}") for n in range(limit // COALESCE_AFTER + 2)]
    for queue in queues:
        for _ in range(COALESCE_AFTER):
            queue.push("x")
    parts, owners, _ = sched.next_batch()
    assert len(parts) > limit
    frames = list(sched.frames(parts, owners))
    assert len(frames) == 2
    for frame in frames:
        assert len(decoded([frame])) <= limit
    assert len(decoded(frames)) == len(parts)


def test_round_robin_one_turn_per_queue_per_frame() -> None:
    """A queue that produces again after its turn goes behind the others: a busy request never
    starves a quiet one."""
    sched = scheduler(max_batch_bytes=1)  # one turn per frame
    a, b, c = opened(sched, "a"), opened(sched, "b"), opened(sched, "c")
    a.push("a1")
    b.push("b1")
    c.push("c1")
    assert labels(batch_messages(sched)) == ["a:a1"]
    a.push("a2")  # a had its turn: it queues behind b and c
    assert labels(batch_messages(sched)) == ["b:b1"]
    assert labels(batch_messages(sched)) == ["c:c1"]
    assert labels(batch_messages(sched)) == ["a:a2"]
    assert batch_messages(sched) == []


def test_a_turn_takes_all_pending_text_of_its_queue_once_per_frame() -> None:
    sched = scheduler()
    a, b = opened(sched, "a"), opened(sched, "b")
    a.push("a1")
    b.push("b1")
    a.push("a2")  # already scheduled: same turn, not a second one
    assert labels(batch_messages(sched)) == ["a:a1", "a:a2", "b:b1"]
    assert [m.seq for m in batch_messages_of(sched, a, ["a3", "a4"])] == [2, 3]


def test_control_messages_go_first_in_every_frame() -> None:
    sched = scheduler()
    a = opened(sched, "a")
    a.push("text")
    assert sched.add_control(Pong(id=1))
    assert sched.add_control(Pong(id=2))
    assert labels(batch_messages(sched)) == ["pong-1", "pong-2", "a:text"]


def test_control_on_sent_hook_comes_with_the_batch_holding_its_message() -> None:
    sched = scheduler(max_batch_bytes=1)  # one control message per frame
    calls: list[int] = []
    sched.add_control(Pong(id=1))
    sched.add_control(Pong(id=2), on_sent=lambda: calls.append(2))
    parts, owners, hooks = sched.next_batch()
    assert labels(decoded(parts)) == ["pong-1"]
    assert owners == [None]
    assert hooks == []
    parts, _, hooks = sched.next_batch()
    assert labels(decoded(parts)) == ["pong-2"]
    for hook in hooks:
        hook()
    assert calls == [2]


def test_a_finishing_queue_goes_before_the_others_with_its_text_then_its_response() -> None:
    sched = scheduler(max_batch_bytes=1)  # one turn per frame: the order is the schedule's
    a, b = opened(sched, "a"), opened(sched, "b")
    a.push("a1")
    b.push("b1")
    b.finish(ResponseStatus.COMPLETED, Usage())
    assert labels(batch_messages(sched)) == ["b:b1", "b:completed"]
    assert labels(batch_messages(sched)) == ["a:a1"]
    assert "b" not in sched.queues, "a queue whose response is out is closed"


def test_the_completed_response_carries_the_streamed_text() -> None:
    sched = scheduler()
    a = opened(sched, "a")
    a.push("hello ")
    a.push("world")
    a.finish(ResponseStatus.COMPLETED, Usage())
    response = batch_messages(sched)[-1]
    assert isinstance(response, Response)
    assert response.content == "hello world"


def test_stream_false_sends_no_chunk_only_the_content() -> None:
    wakes: list[None] = []
    sched = FrameScheduler(Codec.JSON, wake=lambda: wakes.append(None))
    a = opened(sched, "a", stream=False)
    assert a.push("all ") is False
    a.push("at once")
    assert wakes == [], "no turn to write before the response"
    assert sched.next_batch() == ([], [], [])
    a.finish(ResponseStatus.COMPLETED, Usage())
    messages = batch_messages(sched)
    assert labels(messages) == ["a:completed"]
    assert isinstance(messages[0], Response)
    assert messages[0].content == "all at once"


def test_a_cancel_drops_pending_text_and_nothing_of_it_is_packed_afterwards() -> None:
    sched = scheduler()
    a, b = opened(sched, "a"), opened(sched, "b")
    a.push("a1")
    b.push("b1")
    a.machine.on_cancel()
    a.cancel(cancelled("a"))
    sched.add_control(cancelled("a"))
    a.push("after the cancel")  # a pipeline that has not reached its checkpoint yet
    assert labels(batch_messages(sched)) == ["a:cancelled", "b:b1"]
    assert batch_messages(sched) == []
    assert "a" not in sched.queues


def test_a_cancel_between_frames_of_one_batch_drops_the_cancelled_chunks_still_unwritten() -> None:
    """G2 when a batch needs several frames (the shell awaits a drain between them): the frames
    are built lazily, and chunks of a request cancelled meanwhile are not in the later ones."""
    sched = scheduler(max_batch_bytes=0)  # one message per frame
    a, b = opened(sched, "a"), opened(sched, "b")
    for text in ("a1", "a2", "a3"):
        a.push(text)
    b.push("b1")
    parts, owners, _ = sched.next_batch()
    assert len(parts) == 3, "a's turn: three chunks, three frames"
    frames = iter(sched.frames(parts, owners))
    written = [next(frames)]  # "a1" is on the socket; a cancel is read during the drain
    a.machine.on_cancel()
    a.cancel(cancelled("a"))
    written.extend(frames)
    assert labels(decoded(written)) == ["a:a1"]
    assert labels(batch_messages(sched)) == ["b:b1"], "other requests are not touched"


def test_steps_go_out_in_order_among_the_texts() -> None:
    sched = scheduler()
    a = opened(sched, "a")
    tool = StepRecord(kind="tool", name="search", index=0)
    a.push("before")
    a.push_step(tool, StepState.STARTED)
    a.push("during")
    a.push_step(tool, StepState.ENDED)
    a.push("after")
    assert labels(batch_messages(sched)) == [
        "a:before",
        "a:step-started",
        "a:during",
        "a:step-ended",
        "a:after",
    ]


def test_steps_keep_their_place_when_the_texts_around_them_are_coalesced() -> None:
    sched = scheduler()
    a = opened(sched, "a")
    before = [f"t{n} " for n in range(COALESCE_AFTER + 1)]
    for text in before:
        a.push(text)
    a.push_step(StepRecord(kind="tool", name="t", index=0), StepState.STARTED)
    a.push("after")
    assert labels(batch_messages(sched)) == ["a:" + "".join(before), "a:step-started", "a:after"]


def test_texts_are_coalesced_into_one_chunk_past_coalesce_after() -> None:
    sched = scheduler()
    a = opened(sched, "a")
    texts = [f"{n}," for n in range(COALESCE_AFTER)]
    chunks = batch_messages_of(sched, a, texts)
    assert [c.text for c in chunks] == texts, "up to COALESCE_AFTER: a chunk per text"
    more = [f"{n}," for n in range(COALESCE_AFTER + 1)]
    chunks = batch_messages_of(sched, a, more)
    assert [c.text for c in chunks] == ["".join(more)], "the reader is behind: one chunk"
    assert chunks[0].seq == COALESCE_AFTER, "seq stays contiguous"
    assert sched.chunks_sent == COALESCE_AFTER + 1


def test_the_control_queue_is_bounded_by_max_control() -> None:
    sched = scheduler(max_control=8)
    for n in range(3):
        assert sched.add_control(Pong(id=n))
    assert not sched.control_backlog
    assert sched.add_control(Pong(id=3))
    assert sched.control_backlog, "half of max_control: the reader should wait"
    for n in range(4, 8):
        assert sched.add_control(Pong(id=n))
    assert not sched.control_overflow
    assert not sched.add_control(Pong(id=8)), "past max_control: the client is not reading"
    assert sched.control_overflow
    assert not sched.control_has_room


def test_the_reader_gets_room_back_once_the_control_queue_is_down_to_a_quarter() -> None:
    sched = scheduler(max_control=8, max_batch_bytes=1)  # one control message per frame
    for n in range(6):
        sched.add_control(Pong(id=n))
    assert not sched.control_has_room
    for _ in range(3):
        sched.next_batch()
    assert sched.control_backlog is False
    assert not sched.control_has_room, "3 left: over a quarter (2)"
    sched.next_batch()
    assert sched.control_has_room


def test_pending_text_over_max_pending_chars_makes_the_producer_wait_until_taken() -> None:
    sched = scheduler(max_pending_chars=10)
    a = opened(sched, "a")
    rooms: list[str] = []
    a.on_room = lambda: rooms.append("room")  # what the shell sets while a producer waits
    assert a.push("12345") is False
    assert a.push("67890") is False, "at the cap, not over it"
    assert a.push("!") is True
    assert a.over_cap
    assert a.must_wait
    sched.next_batch()
    assert not a.over_cap
    assert rooms == ["room"], "the waiting producer is told it may go on"


def test_unwritten_steps_over_max_pending_steps_make_the_producer_wait() -> None:
    sched = scheduler()
    a = opened(sched, "a")
    for index in range(MAX_PENDING_STEPS):
        a.push_step(StepRecord(kind="tool", name="t", index=index), StepState.STARTED)
    assert not a.over_cap
    a.push_step(StepRecord(kind="tool", name="t", index=MAX_PENDING_STEPS), StepState.STARTED)
    assert a.over_cap
    sched.next_batch()
    assert not a.over_cap


def test_a_closed_queue_never_makes_its_producer_wait() -> None:
    sched = scheduler(max_pending_chars=1)
    a = opened(sched, "a")
    rooms: list[str] = []
    a.on_room = lambda: rooms.append("room")
    a.push("over the cap")
    assert a.must_wait
    a.machine.on_cancel()
    a.cancel(cancelled("a"))
    assert not a.must_wait
    assert rooms == ["room"], "a producer waiting when the cancel came goes on"
    assert a.push("more") is False


def test_the_answer_is_bounded_by_max_content_chars() -> None:
    sched = scheduler()
    a = opened(sched, "a")
    a.max_content_chars = 5
    a.push("12345")
    with pytest.raises(ContentTooLarge):
        a.push("6")


def test_the_shell_is_woken_once_per_turn_not_per_push() -> None:
    wakes: list[None] = []
    sched = FrameScheduler(Codec.JSON, wake=lambda: wakes.append(None))
    a = opened(sched, "a")
    a.push("1")
    a.push("2")
    assert len(wakes) == 1
    sched.next_batch()
    a.push("3")
    assert len(wakes) == 2


def test_closing_discards_everything_and_releases_producers() -> None:
    sched = scheduler(max_pending_chars=1)
    a, b = opened(sched, "a"), opened(sched, "b")
    rooms: list[str] = []
    a.on_room = lambda: rooms.append("a")
    a.push("pending")
    b.push("pending")
    sched.add_control(Pong(id=0))
    sched.close()
    assert sched.next_batch() == ([], [], [])
    assert sched.queues == {}
    assert rooms == ["a"]


def test_a_request_id_is_attached_once() -> None:
    sched = scheduler()
    opened(sched, "a")
    with pytest.raises(ValueError, match="already open"):
        opened(sched, "a")
