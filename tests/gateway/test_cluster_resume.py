"""Resume across nodes (issue 17): a client whose connection dropped reconnects to another node
(a round-robin load balancer) and resumes there; the node that runs the request relays its
stream (gateway/relay.py). A real ``nats-server`` and three gateways over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest

from gateway.server import Gateway
from protocol import (
    CancelReason,
    CancelStatus,
    Codec,
    ErrorCode,
    ResponseStatus,
    ResumeStatus,
)
from tests.gateway.conftest import running_gateway
from tests.gateway.http_client import http
from tests.gateway.test_cluster import (
    NATS_SERVER,
    beside_a_process,
    cluster,
    nats_server,
    nodes_on,
)
from tests.gateway.test_resume import Requests, detached, drop, joined, kept, last_seq
from tests.gateway.wire import Track, WireClient

#: A stream that runs until it is cancelled (or its test ends).
ENDLESS = {"tokens": 100_000, "token_delay_ms": 5, "plan_ms": 0, "tool_ms": 0}
#: Long enough to outlive a broker restart (3 s).
LONG = {"tokens": 600, "token_delay_ms": 5, "plan_ms": 0, "tool_ms": 0}
#: Quick, but not done before the first chunks are read.
QUICK_RESUMABLE = {"tokens": 30, "token_delay_ms": 1, "plan_ms": 0, "tool_ms": 0}

pytestmark = pytest.mark.skipif(
    NATS_SERVER is None, reason="nats-server not installed (extra 'cluster')"
)


async def detached_again(owner: Gateway) -> None:
    """Until the owner detached its relayed request (the relay's client left)."""
    assert owner.relays is not None
    async with asyncio.timeout(5):
        while owner.relays.senders:
            await next(iter(owner.relays.senders)).wait_closed()
    assert owner.resumables.detached == 1


def max_seq(tracks: list[Track]) -> int | None:
    """The last ``seq`` a client kept over these tracks (what it resumes after)."""
    seqs = [c.seq for c in kept(tracks)]
    return max(seqs) if seqs else None


@pytest.mark.parametrize("codec", [Codec.JSON, Codec.MSGPACK])
async def test_a_request_resumes_on_another_node_without_gap_or_duplicate(codec: Codec) -> None:
    async with cluster() as (a, b, _):
        before = await detached(a, chunks=5)
        assert before.resumable is not None
        async with WireClient.open(b.url, codec) as second:
            after = await second.resume("r1", before.resumable.epoch, last_seq(before))
            assert (await second.resume_result("r1")).status is ResumeStatus.RESUMED
            response = await second.response("r1")
        assert response.status is ResponseStatus.COMPLETED
        assert joined(before, after) == response.content
        assert after.chunks[0].seq == len(before.chunks)


async def test_an_ended_request_is_replayed_from_another_node() -> None:
    async with cluster() as (a, _, c):
        before = await detached(a, chunks=3, metadata=QUICK_RESUMABLE)
        assert before.resumable is not None
        async with WireClient.open(c.url) as second:
            after = await second.resume("r1", before.resumable.epoch, last_seq(before))
            response = await second.response("r1")
        assert response.status is ResponseStatus.COMPLETED
        assert joined(before, after) == response.content


async def test_a_cancel_frame_on_the_resuming_node_stops_the_relayed_stream_at_once() -> None:
    async with cluster() as (a, b, _):
        before = await detached(a, chunks=2, metadata=ENDLESS)
        assert before.resumable is not None
        async with WireClient.open(b.url) as second:
            after = await second.resume("r1", before.resumable.epoch, last_seq(before))
            await second.chunks("r1", 3)
            await second.cancel("r1")
            result = await second.cancel_result("r1")
            response = await second.response("r1")
            await second.final_usage("r1")
            again = await http("DELETE", f"{a.http_url}/v1/requests/r1")  # idempotent (G4)
        assert result.status is CancelStatus.CANCELLED
        assert (response.status, response.reason) == (ResponseStatus.CANCELLED, CancelReason.CLIENT)
        assert after.chunks_after_cancel_sent == 0  # held back from the moment it was read
        assert again.json()["status"] == "already_cancelled"


async def test_an_http_cancel_on_a_third_node_reaches_a_relayed_stream() -> None:
    async with cluster() as (a, b, c):
        before = await detached(a, chunks=2, metadata=ENDLESS)
        assert before.resumable is not None
        async with WireClient.open(b.url) as second:
            await second.resume("r1", before.resumable.epoch, last_seq(before))
            await second.chunks("r1", 2)
            sending = (await http("GET", f"{a.http_url}/metrics")).body.decode()
            receiving = (await http("GET", f"{b.http_url}/metrics")).body.decode()
            assert 'muxgate_cluster_relays{direction="sending"} 1.0' in sending
            assert 'muxgate_cluster_relays{direction="receiving"} 1.0' in receiving
            assert "muxgate_cluster_relayed 1.0" in sending
            answer = await http("DELETE", f"{c.http_url}/v1/requests/r1")
            response = await second.response("r1")
        assert answer.json()["status"] == "cancelled"
        assert response.reason is CancelReason.API


async def test_a_relayed_request_moves_on_to_a_third_node_and_back_home() -> None:
    """Resumed on B, then on C while B's connection is open (B's client is told ``moved``),
    then on A where it runs (a local connection again): one stream, no gap, one end."""
    async with cluster() as (a, b, c):
        first = await detached(a, chunks=2)
        assert first.resumable is not None
        epoch = first.resumable.epoch
        tracks = [first]
        async with WireClient.open(b.url) as on_b, WireClient.open(c.url) as on_c:
            tracks.append(await on_b.resume("r1", epoch, last_seq(first)))
            await on_b.chunks("r1", 2)
            tracks.append(await on_c.resume("r1", epoch, max_seq(tracks)))
            await on_c.resume_result("r1")
            await on_b.wait_for(lambda: tracks[1].moved)
            await on_c.chunks("r1", 1)
            async with WireClient.open(a.url) as home:
                tracks.append(await home.resume("r1", epoch, max_seq(tracks)))
                response = await home.response("r1")
                await on_c.wait_for(lambda: tracks[2].moved)
        assert response.status is ResponseStatus.COMPLETED
        assert joined(*tracks) == response.content


async def test_a_dropped_relay_client_leaves_the_request_resumable_anywhere() -> None:
    async with cluster() as (a, b, c):
        first = await detached(a, chunks=2)
        assert first.resumable is not None
        epoch = first.resumable.epoch
        async with WireClient.open(b.url) as on_b:
            second = await on_b.resume("r1", epoch, last_seq(first))
            await on_b.chunks("r1", 2)
            await drop(b, on_b)
        await detached_again(a)
        assert b.relays is not None
        assert not b.relays.receivers
        async with WireClient.open(c.url) as on_c:
            third = await on_c.resume("r1", epoch, max_seq([first, second]))
            response = await on_c.response("r1")
        assert joined(first, second, third) == response.content


async def test_misses_and_refusals_across_nodes_answer_as_on_one_node() -> None:
    headers = {"X-Muxi-Client-Key": "k1"}
    async with cluster(client_keys=("k1",)) as (a, b, _):
        async with WireClient.open(a.url, headers=headers) as first:
            track = await first.chat("r1", user_id="alice", resumable=True, metadata=ENDLESS)
            await first.chunks("r1", 2)
            await drop(a, first)
        assert track.resumable is not None
        epoch = track.resumable.epoch
        async with WireClient.open(b.url, headers=headers) as other:
            misses = (("r1", "bob", epoch), ("r1", "alice", "x.1"), ("nope", "alice", epoch))
            for rid, user, e in misses:
                await other.resume(rid, e, user_id=user)
                assert (await other.resume_result(rid)).status is ResumeStatus.NOT_FOUND
                other.tracks.pop(rid)
            beyond = await other.resume("r1", epoch, 10_000, user_id="alice")
            await other.wait_for(lambda: bool(beyond.errors))
            assert beyond.errors[0].code == ErrorCode.INVALID_FIELD
        async with WireClient.open(b.url, headers=headers) as full:
            for i in range(b.config.max_streams):
                await full.chat(f"busy{i}", user_id="alice", metadata=ENDLESS)
            refused = await full.resume("r1", epoch, user_id="alice")
            await full.wait_for(lambda: bool(refused.errors))
            assert refused.errors[0].code == ErrorCode.TOO_MANY_STREAMS
        assert a.resumables.detached == 1  # nothing moved


# -- node loss ----------------------------------------------------------------------------------


async def test_the_owner_killed_mid_relay_ends_the_stream_failed_node_lost() -> None:
    async with beside_a_process("b", "a") as (b, node_a, a_url):
        assert b.cluster is not None
        async with WireClient.open(a_url) as first, WireClient.open(b.url) as second:
            track = await first.chat("r1", resumable=True, metadata=ENDLESS)
            await first.chunks("r1", 2)
            epoch = (await first.resumable("r1")).epoch
            relayed = await second.resume("r1", epoch, last_seq(track))  # moves it to b
            await second.chunks("r1", 2)
            await second.cancel("r1")  # never answered by the owner: it dies first
            first.aborted = True
            node_a.kill()
            await node_a.wait()
            response = await second.response("r1", timeout=10)
            result = await second.cancel_result("r1")
        assert response.status is ResponseStatus.FAILED
        assert response.error is not None
        assert response.error.code == "node_lost"
        assert result.status in (CancelStatus.CANCELLED, CancelStatus.ALREADY_COMPLETED)
        assert relayed.chunks_after_cancel_sent == 0
        assert b.relays is not None
        assert not b.relays.receivers


async def test_a_resume_after_the_owner_died_answers_failed_node_lost() -> None:
    async with beside_a_process("b", "a") as (b, node_a, a_url):
        assert b.cluster is not None
        async with WireClient.open(a_url) as first:
            track = await first.chat("r1", resumable=True, metadata=ENDLESS)
            await first.chunks("r1", 2)
            epoch = (await first.resumable("r1")).epoch
            first.aborted = True
            node_a.kill()
            await node_a.wait()
        async with WireClient.open(b.url) as second:  # at once: a still counts as live
            await second.resume("r1", epoch, last_seq(track))
            assert (await second.resume_result("r1")).status is ResumeStatus.RESUMED
            response = await second.response("r1")
        assert response.error is not None
        assert response.error.code == "node_lost"


async def test_the_resuming_node_killed_leaves_the_request_resumable_on_the_owner() -> None:
    async with beside_a_process("a", "b") as (a, node_b, b_url):
        assert a.cluster is not None
        first = await detached(a, chunks=2, metadata=LONG)
        assert first.resumable is not None
        epoch = first.resumable.epoch
        async with WireClient.open(b_url) as on_b:
            second = await on_b.resume("r1", epoch, last_seq(first))
            await on_b.chunks("r1", 2)
            on_b.aborted = True
            node_b.kill()
            await node_b.wait()
        await detached_again(a)  # b fell silent: a detached it
        async with WireClient.open(a.url) as home:
            third = await home.resume("r1", epoch, max_seq([first, second]))
            response = await home.response("r1")
        assert response.status is ResponseStatus.COMPLETED
        assert joined(first, second, third) == response.content


async def test_nats_restarted_mid_relay_the_stream_goes_on_whole() -> None:
    """The broker restarts under a relayed stream: the resuming node resumes it again from the
    last chunk it wrote once the link is back; its client sees one stream, no gap, one end."""
    async with nats_server() as server, nodes_on(server.url, "a", "b") as (a, b):
        assert a.cluster is not None
        assert b.cluster is not None
        first = await detached(a, chunks=2, metadata=LONG)
        assert first.resumable is not None
        async with WireClient.open(b.url) as on_b:
            second = await on_b.resume("r1", first.resumable.epoch, last_seq(first))
            await on_b.chunks("r1", 3)
            await server.stop()
            async with asyncio.timeout(10):
                await b.cluster.wait_connected(False)
            await server.start()
            response = await on_b.response("r1", timeout=30)
        assert response.status is ResponseStatus.COMPLETED
        assert joined(first, second) == response.content


# -- randomized ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [5, 6])
async def test_random_drops_resumes_and_cancels_over_three_nodes_keep_every_stream_whole(
    seed: int,
) -> None:
    """24 resumable requests started on random nodes; six times, at random moments, some are
    stopped (a cancel frame on the client's current node, or a DELETE on a random node), the
    client opens a new connection to a random node (a round-robin front), cuts or keeps the
    old one, and resumes every request from its last ``seq`` there — most of them on a node
    that does not run them (relayed). Every request ends with exactly one response (the strict
    client refuses a second, a chunk after it, a gap, a repeat, a wrong content); completed
    ones join to their content over all connections; cancelled ones were Stopped (G1-G5)."""
    rng = random.Random(seed)
    rids = [f"r{i}" for i in range(24)]
    requests = Requests(rids, rng)
    metadata = {"tokens": 80, "token_delay_ms": 2, "plan_ms": 0, "tool_ms": 0}
    async with cluster(max_streams=64) as nodes, contextlib.AsyncExitStack() as stack:
        opened: list[tuple[int, WireClient]] = []

        async def connect() -> WireClient:
            home = rng.randrange(3)
            client = await stack.enter_async_context(WireClient.open(nodes[home].url))
            opened.append((home, client))
            return client

        starters = [await connect() for _ in range(3)]
        for rid in rids:
            starter = rng.choice(starters)
            requests.tracks[rid].append(await starter.chat(rid, resumable=True, metadata=metadata))
        for starter in starters:
            for rid in [r for r in rids if r in starter.tracks]:
                requests.epochs[rid] = (await starter.resumable(rid)).epoch
        client = starters[0]
        for round_ in range(6):
            await requests.some_progress(client, 30 * (round_ + 1))
            await requests.stop_some(rng.choice(nodes), client, 3)
            old = list(opened)
            client = await connect()
            if rng.random() < 0.5:
                for home, previous in old:
                    if not previous.aborted:
                        await drop(nodes[home], previous)  # cut: everything detaches
            # else: the old connections stay open; each resume below moves a request away
            await requests.resume_all(client)
        await requests.check(client)
        relayed = sum(node.relays.relayed for node in nodes if node.relays is not None)
        assert relayed >= 24  # most resumes landed on a node that does not run the request
        for node in nodes:  # nothing left behind: every relay ended on both sides
            assert node.relays is not None
            async with asyncio.timeout(5):
                while node.relays.senders:
                    await next(iter(node.relays.senders)).wait_closed()
            assert not node.relays.receivers


async def test_the_owner_losing_its_nats_link_alone_costs_the_relayed_stream_nothing() -> None:
    """Only the owner's link to NATS drops (cut under it; it reconnects by itself): what it
    relayed meanwhile may be lost, so once back it tells the resuming node, which resumes the
    request again from the last chunk it wrote: one stream, no gap, one end."""
    from tests.client.test_resume import CutProxy

    async with nats_server() as server, CutProxy.to_ports(server.port) as link:
        heartbeats = {"cluster_heartbeat_ms": 500}  # (a reconnects within three beats)
        async with (
            running_gateway(nats_url=f"nats://127.0.0.1:{link.port}", node_id="a", **heartbeats)
            as a,
            running_gateway(nats_url=server.url, node_id="b", **heartbeats) as b,
        ):  # fmt: skip
            assert a.cluster is not None
            assert b.cluster is not None
            async with asyncio.timeout(10):
                await b.cluster.wait_for_peers(1)
            first = await detached(a, chunks=2, metadata=LONG)
            assert first.resumable is not None
            async with WireClient.open(b.url) as on_b:
                second = await on_b.resume("r1", first.resumable.epoch, last_seq(first))
                await on_b.chunks("r1", 3)
                link.cut()
                async with asyncio.timeout(10):
                    await a.cluster.wait_connected(False)
                    await a.cluster.wait_connected(True)
                response = await on_b.response("r1", timeout=30)
            assert a.relays is not None
            assert a.relays.relayed == 2  # resumed again after the owner's link came back
        assert response.status is ResponseStatus.COMPLETED
        assert joined(first, second) == response.content
