"""The outbound writer alone, with a send we control (a unit test, not an end-to-end one)."""

from __future__ import annotations

import asyncio

import pytest

import protocol
from gateway.outbound import Outbound, Stream
from protocol import CancelReason, Codec, Response, ResponseStatus, Sender, Usage


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
    stream = Stream(outbound, "r1", stream=True)
    outbound.attach_stream(stream)
    # Over 1 MiB in total, so even batching needs several frames.
    for _ in range(3):
        stream.push("x" * 400_000)
    writer = asyncio.create_task(outbound.run())
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
