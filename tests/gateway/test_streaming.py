"""End-to-end: streaming and in-band cancel over a real socket, both codecs."""

from __future__ import annotations

import pytest

from gateway.server import Gateway
from protocol import CancelReason, CancelStatus, Codec, ResponseStatus

from .conftest import settled
from .wire import WireClient

CODECS = [pytest.param(c, id=c.name.lower()) for c in Codec]


@pytest.mark.parametrize("codec", CODECS)
async def test_chat_streams_and_completes(gateway: Gateway, codec: Codec) -> None:
    async with WireClient.open(gateway.url, codec) as client:
        track = await client.chat("r1", "tell me about gateways")
        response = await client.response("r1")
        assert response.status is ResponseStatus.COMPLETED
        assert track.chunks, "a streaming chat sends chunks"
        # G3: seq contiguous from 0 and the chunks join to the content (also checked per frame
        # by the client's state machine).
        assert [c.seq for c in track.chunks] == list(range(len(track.chunks)))
        assert "".join(c.text for c in track.chunks) == response.content
        assert response.usage.final
        assert response.usage.output_tokens > 0
        assert client.welcome is not None
    await settled(gateway)


@pytest.mark.parametrize("codec", CODECS)
async def test_cancel_in_band(gateway: Gateway, codec: Codec) -> None:
    async with WireClient.open(gateway.url, codec) as client:
        track = await client.chat("r1", metadata={"tokens": 500, "token_delay_ms": 5})
        await client.chunks("r1", 3)
        await client.cancel("r1")
        response = await client.response("r1")
        result = await client.cancel_result("r1")
        assert response.status is ResponseStatus.CANCELLED
        assert response.reason is CancelReason.CLIENT
        assert response.content == ""
        assert result.status is CancelStatus.CANCELLED
        # Order on the wire: ... chunks, response, cancel_result (SPEC.md §5.3).
        kinds = [type(m).__name__ for m in track.log]
        assert kinds.index("Response") < kinds.index("CancelResult")
        usage = await client.final_usage("r1")
        assert usage.output_tokens >= len(track.chunks)
        assert usage.saved_tokens > 0
        await client.cancel("r1")
        await client.wait_for(lambda: len(track.cancel_results) == 2)
        assert track.cancel_results[1].status is CancelStatus.ALREADY_CANCELLED
    await settled(gateway)
    assert not gateway.registry.active()
