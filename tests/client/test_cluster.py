"""The SDK against several gateway nodes over NATS (issue 17): a round-robin front sends each
new connection to the next node, so a reconnecting client resumes its streams on a node that
does not run them (the owner relays them); a cancel from an SDK client on another node stops a
stream. A real ``nats-server`` and three gateways, over real sockets."""

from __future__ import annotations

import asyncio
import random

import pytest

from gateway import AsyncClient
from gateway.client import _async
from protocol import CancelReason, CancelStatus

from ..gateway.test_cluster import NATS_SERVER, cluster
from .test_resume import ENDLESS, LONG, CutProxy, Progress, Reader, until

pytestmark = pytest.mark.skipif(
    NATS_SERVER is None, reason="nats-server not installed (extra 'cluster')"
)


@pytest.mark.parametrize("seed", [1, 2])
async def test_streams_resume_whole_on_whichever_node_the_front_picks(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six resumable streams through a round-robin front to three nodes, the connection cut at
    random points: each reconnection lands on the next node, which resumes every stream (the
    node that runs it relays it). Each caller gets every chunk once, in order, one end."""
    monkeypatch.setattr(_async, "RECONNECT_STABLE_AFTER", 0.0)
    rng = random.Random(seed)
    progress = Progress()
    async with (
        cluster() as nodes,
        CutProxy.to(*nodes) as front,
        AsyncClient(front.url) as client,
    ):
        readers = [
            Reader(client.chat_stream(f"story {i}", resumable=True, metadata=LONG), progress)
            for i in range(6)
        ]
        for point in sorted(rng.sample(range(10, 900), 4)):
            assert await progress.reach(point, readers)
            before = front.accepted
            resumed = [r.stream.resumes for r in readers]
            front.cut(keep_upstream=rng.random() < 0.4)
            await front.wait_for(lambda before=before: front.accepted > before)
            await until(
                lambda resumed=resumed: all(
                    r.stream.resumes > n or r.task.done()
                    for r, n in zip(readers, resumed, strict=True)
                )
            )
        async with asyncio.timeout(30):
            await asyncio.gather(*(r.task for r in readers))
        for reader in readers:
            reader.check()
        assert sum(n.relays.relayed for n in nodes if n.relays is not None) >= 6


async def test_an_sdk_client_on_another_node_cancels_a_stream() -> None:
    async with (
        cluster() as (a, _, c),
        AsyncClient(a.url) as runner,
        AsyncClient(c.url) as other,
    ):
        stream = runner.chat_stream("a long story", request_id="r1", metadata=ENDLESS)
        chunks = 0
        async for _ in stream:
            chunks += 1
            if chunks == 3:
                result = await other.cancel_request("r1")
                assert result.status is CancelStatus.CANCELLED
        assert stream.response is not None
        assert stream.response.cancelled
        assert stream.response.reason is CancelReason.API
        again = await other.cancel_request("r1")
        assert again.status is CancelStatus.ALREADY_CANCELLED
