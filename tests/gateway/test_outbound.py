"""The outbound writer alone, with a send we control (a unit test, not an end-to-end one)."""

from __future__ import annotations

import asyncio

import pytest

import protocol
from gateway.outbound import COALESCE_AFTER, MAX_PENDING_STEPS, Outbound, SlowConsumer
from gateway.output_queue import OutputQueue
from gateway.pipeline import StepRecord
from protocol import (
    CancelReason,
    Codec,
    Response,
    ResponseStatus,
    Sender,
    Step,
    StepState,
    Usage,
)


class GatedSend:
    """Records frames; the first send blocks until released (a reader that stopped reading)."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.first_started = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, frame: bytes) -> None:
        self.frames.append(frame)  # written to the transport: it is on the wire
        if len(self.frames) == 1:
            self.first_started.set()
            await self.release.wait()  # the drain that a slow reader blocks

    def messages(self) -> list[protocol.Message]:
        out: list[protocol.Message] = []
        for frame in self.frames:
            for item in protocol.decode(frame, Codec.JSON, Sender.GATEWAY):
                assert not isinstance(item, protocol.RemoteProtocolError)
                out.append(item)
        return out


@pytest.mark.parametrize("batch_bytes", [0, 1 << 22], ids=["unbatched", "over-max-frame"])
async def test_chunks_packed_before_a_cancel_are_not_written_after_it(batch_bytes: int) -> None:
    """G2: while the writer waits on a slow reader with more frames packed, a cancel drops the
    request's packed chunks; only what was already written precedes its response."""
    send = GatedSend()
    outbound = Outbound(send, Codec.JSON, max_batch_bytes=batch_bytes)
    stream = OutputQueue(outbound.scheduler, "r1", stream=True)
    outbound.attach_stream(stream)
    # Over 1 MiB in total, so even batching needs several frames.
    for _ in range(3):
        stream.push("x" * 400_000)
    writer = outbound.start_writer()
    await send.first_started.wait()

    stream.machine.on_cancel()
    response = Response(
        request_id="r1",
        status=ResponseStatus.CANCELLED,
        reason=CancelReason.CLIENT,
        usage=Usage(final=False),
    )
    outbound.cancel_stream(stream, response)
    send.release.set()
    await outbound.flushed()
    outbound.close()
    await writer

    messages = send.messages()
    assert messages[-1] == response
    written_before = protocol.decode(send.frames[0], Codec.JSON, Sender.GATEWAY)
    chunks = [m for m in messages if isinstance(m, protocol.Chunk)]
    assert chunks == written_before, "only chunks written before the cancel was read"
    assert len(chunks) < 3


class Socket:
    """A socket the test fills and drains: ``write`` while it takes data, else ``send``."""

    def __init__(self) -> None:
        self.taking = True
        self.written: list[tuple[str, bytes]] = []  # ("write" | "send", frame)
        self.send_started = asyncio.Event()
        self.drained = asyncio.Event()

    def writable(self) -> bool:
        return self.taking

    def write(self, frame: bytes) -> None:
        assert self.taking, "a synchronous write while the socket is full"
        self.written.append(("write", frame))

    async def send(self, frame: bytes) -> None:
        self.written.append(("send", frame))
        self.send_started.set()
        await self.drained.wait()

    def messages(self) -> list[tuple[str, protocol.Message]]:
        out: list[tuple[str, protocol.Message]] = []
        for how, frame in self.written:
            for item in protocol.decode(frame, Codec.JSON, Sender.GATEWAY):
                assert not isinstance(item, protocol.RemoteProtocolError)
                out.append((how, item))
        return out


def cancelled(request_id: str) -> Response:
    return Response(
        request_id=request_id,
        status=ResponseStatus.CANCELLED,
        reason=CancelReason.CLIENT,
        usage=Usage(final=False),
    )


async def test_writes_synchronously_until_the_socket_is_full_then_the_writer_awaits_the_drain() -> (
    None
):
    sock = Socket()
    outbound = Outbound(sock.send, Codec.JSON, write=sock.write, writable=sock.writable)
    writer = outbound.start_writer()
    first, second = (
        OutputQueue(outbound.scheduler, "a", stream=True),
        OutputQueue(outbound.scheduler, "b", stream=True),
    )
    outbound.attach_stream(first)
    outbound.attach_stream(second)

    # Socket taking data: everything pushed in one loop turn goes out in one synchronous write.
    first.push("one")
    second.push("two")
    await outbound.flushed()
    assert [how for how, _ in sock.written] == ["write"]
    assert len(sock.messages()) == 2

    # Socket full: nothing is written synchronously; the writer task sends and awaits the drain.
    sock.taking = False
    first.push("three")
    await sock.send_started.wait()
    assert sock.written[-1][0] == "send"
    # A cancel read meanwhile: its response follows what was already handed over, in order.
    second.machine.on_cancel()
    outbound.cancel_stream(second, cancelled("b"))
    second_text_after_cancel = second.push("never sent")
    assert second_text_after_cancel is False
    sock.taking = True
    sock.drained.set()
    await outbound.flushed()
    hows = [how for how, _ in sock.written]
    assert hows[:2] == ["write", "send"]
    messages = [m for _, m in sock.messages()]
    assert messages[-1] == cancelled("b")
    assert not any(isinstance(m, protocol.Chunk) and m.text == "never sent" for m in messages)

    # Drained and caught up: synchronous writes again.
    before = len(sock.written)
    first.push("four")
    await outbound.flushed()
    assert [how for how, _ in sock.written[before:]] == ["write"]
    outbound.close()
    await writer


async def test_control_overflow_in_a_synchronous_flush_ends_the_writer_as_a_slow_consumer() -> None:
    sock = Socket()
    outbound = Outbound(
        sock.send, Codec.JSON, write=sock.write, writable=sock.writable, max_control=3
    )
    writer = outbound.start_writer()
    for n in range(5):  # all queued before the flush callback runs
        outbound.send_control(protocol.Pong(id=n))
    with pytest.raises(SlowConsumer):
        await writer
    assert sock.written == []


async def test_write_now_writes_the_cancelled_response_before_returning() -> None:
    """The cancel path: the response is on the socket when the cancel handler returns, not at
    the next loop turn (one turn less of cancel latency)."""
    sock = Socket()
    outbound = Outbound(sock.send, Codec.JSON, write=sock.write, writable=sock.writable)
    writer = outbound.start_writer()
    stream = OutputQueue(outbound.scheduler, "r1", stream=True)
    outbound.attach_stream(stream)
    stream.push("pending text of the cancelled request")
    stream.machine.on_cancel()
    outbound.cancel_stream(stream, cancelled("r1"))
    outbound.write_now()
    assert [m for _, m in sock.messages()] == [cancelled("r1")]
    outbound.close()
    await writer


@pytest.mark.parametrize("codec", list(Codec), ids=lambda c: c.name.lower())
async def test_a_lone_surrogate_is_sent_replaced_not_dropped(codec: Codec) -> None:
    """A backend emitting text that is not valid Unicode still gets its chunk out, with the
    bad code point replaced; the stream goes on."""
    frames: list[bytes] = []

    async def send(frame: bytes) -> None:
        frames.append(frame)

    outbound = Outbound(send, codec)
    writer = outbound.start_writer()
    stream = OutputQueue(outbound.scheduler, "r1", stream=True)
    outbound.attach_stream(stream)
    stream.push("a\ud800b")
    await outbound.flushed()
    stream.push("c")
    await outbound.flushed()
    for text in ("d", "e\udfff", "f"):  # a burst, taken (and encoded) in one turn
        stream.push(text)
    await outbound.flushed()
    chunks = [m for f in frames for m in protocol.decode(f, codec, Sender.GATEWAY)]
    assert [(c.seq, c.text) for c in chunks if isinstance(c, protocol.Chunk)] == [
        (0, "a?b"),
        (1, "c"),
        (2, "d"),
        (3, "e?"),
        (4, "f"),
    ]
    outbound.close()
    await writer


async def test_control_overflow_ends_a_writer_blocked_in_a_send() -> None:
    """The bound on queued control messages holds while the writer waits on a client that
    stopped reading: the overflow ends the connection then, not when that send returns (the
    slow-consumer timeout later) while pongs and errors pile up meanwhile."""
    send = GatedSend()  # the first send blocks until released: it never is here
    outbound = Outbound(send, Codec.JSON, max_control=3)
    writer = outbound.start_writer()
    outbound.send_control(protocol.Pong(id=0))
    await send.first_started.wait()
    for n in range(1, 5):
        outbound.send_control(protocol.Pong(id=n))
    async with asyncio.timeout(2):
        with pytest.raises(SlowConsumer, match="control queue full"):
            await writer


async def test_control_overflow_ends_an_idle_synchronous_writer_at_once() -> None:
    """Issue 12: the bound holds on every path. Writing synchronously, the writer task waits
    for work, not in a send: the overflow still ends it at once, before any flush runs, and
    nothing queued after the overflow is kept."""
    sock = Socket()
    outbound = Outbound(
        sock.send, Codec.JSON, write=sock.write, writable=sock.writable, max_control=8
    )
    writer = outbound.start_writer()
    await asyncio.sleep(0)  # the writer waits for work
    for n in range(100):  # one loop turn: the flush callback has not run
        outbound.send_control(protocol.Pong(id=n))
    assert len(outbound._control) == 9, "nothing is queued past the overflow"
    async with asyncio.timeout(2):
        with pytest.raises(SlowConsumer, match="control queue full"):
            await writer
    assert sock.written == []


async def test_control_room_holds_the_reader_until_answers_are_written() -> None:
    """Inbound backpressure: past half of max_control queued answers the reader should wait
    (control_backlog); control_room returns once the writer brought the queue down to a
    quarter, and at once when the outbound closes."""
    send = GatedSend()  # the first send blocks: the client is not reading
    outbound = Outbound(send, Codec.JSON, max_control=16)
    writer = outbound.start_writer()
    outbound.send_control(protocol.Pong(id=0))
    await send.first_started.wait()
    for n in range(1, 9):
        outbound.send_control(protocol.Pong(id=n))
    assert outbound.control_backlog
    room = asyncio.create_task(outbound.control_room())
    await asyncio.sleep(0)
    assert not room.done()
    send.release.set()  # the client reads again: the writer catches up
    async with asyncio.timeout(2):
        await room
    assert not outbound.control_backlog
    for n in range(9, 17):
        outbound.send_control(protocol.Pong(id=n))
    await outbound.flushed()
    assert [m.id for m in send.messages() if isinstance(m, protocol.Pong)] == list(range(17))

    # A closed outbound never holds the reader.
    stuck = GatedSend()
    closing = Outbound(stuck, Codec.JSON, max_control=16)
    closing_writer = closing.start_writer()
    closing.send_control(protocol.Pong(id=0))
    await stuck.first_started.wait()
    for n in range(1, 9):
        closing.send_control(protocol.Pong(id=n))
    waiting = asyncio.create_task(closing.control_room())
    await asyncio.sleep(0)
    assert not waiting.done()
    closing.close()
    async with asyncio.timeout(2):
        await waiting
    closing_writer.cancel()
    outbound.close()
    await writer


# --- step messages (SPEC.md §3.12) ---------------------------------------------------------------


async def test_steps_keep_their_place_among_chunks_and_wait_like_text() -> None:
    """A step message goes out after the text pushed before it and before the text after,
    even when the texts are coalesced; more than MAX_PENDING_STEPS unwritten steps make the
    producer wait, as text does; a cancel drops the queued steps with the text."""
    send = GatedSend()
    outbound = Outbound(send, Codec.JSON)
    stream = OutputQueue(outbound.scheduler, "r1", stream=True)
    outbound.attach_stream(stream)
    tool = StepRecord(kind="tool", name="search", index=0)
    for n in range(COALESCE_AFTER + 3):  # enough to be coalesced
        stream.push(f"a{n} ")
    stream.push_step(tool, StepState.STARTED)
    stream.push_step(tool, StepState.ENDED)
    stream.push("b")
    writer = outbound.start_writer()
    await send.first_started.wait()
    send.release.set()
    await outbound.flushed()
    kinds = [
        (type(m).__name__, getattr(m, "text", None) or getattr(m, "state", None))
        for m in send.messages()
    ]
    assert kinds == [
        ("Chunk", "".join(f"a{n} " for n in range(COALESCE_AFTER + 3))),
        ("Step", StepState.STARTED),
        ("Step", StepState.ENDED),
        ("Chunk", "b"),
    ]

    # Backpressure: steps nobody writes (the socket is blocked) make the producer wait.
    blocked = GatedSend()
    slow = Outbound(blocked, Codec.JSON)
    other = OutputQueue(slow.scheduler, "r2", stream=True)
    slow.attach_stream(other)
    slow_writer = slow.start_writer()
    other.push("x")
    await blocked.first_started.wait()  # the writer now waits on a reader that does not read
    for index in range(MAX_PENDING_STEPS + 1):
        other.push_step(StepRecord(kind="tool", name="t", index=index), StepState.STARTED)
    assert other.over_cap
    waiting = asyncio.create_task(other.drained())
    await asyncio.sleep(0)
    assert not waiting.done()
    other.machine.on_cancel()
    response = Response(
        request_id="r2",
        status=ResponseStatus.CANCELLED,
        reason=CancelReason.CLIENT,
        usage=Usage(final=False),
    )
    slow.cancel_stream(other, response)
    await waiting  # the cancel closed the stream: the producer goes on, to its checkpoint
    blocked.release.set()
    await slow.flushed()
    assert not any(isinstance(m, Step) for m in blocked.messages())
    for out, task in ((outbound, writer), (slow, slow_writer)):
        out.close()
        await task
