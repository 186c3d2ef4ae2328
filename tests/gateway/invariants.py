"""Randomized invariants at scale (issue 18, item 2): many requests, every kind of cancel,
dropped connections and resumes, over one node or several — and every request's end checked.

Requests run in *sessions*: a connection to a random node carrying ``batch`` requests at once.
Each request gets a random plan: run to its end, or be stopped — by a ``cancel`` frame on its
own connection, by a ``DELETE`` on a random node, by a ``cancel`` frame on another connection
(of another node), twice, or before its chat was sent (a tombstone). Some are resumable. Some
sessions lose their connection mid-way (a TCP abort): the resumable requests are resumed on a
new connection to a random node (relayed when it does not run them), the others are cancelled
by the gateway (reason ``disconnect``). The checks, for every request:

- exactly one terminal response across all its connections, and nothing about it after that
  (the strict client's state machines refuse anything else: a second response, a chunk after
  it, a gap or a repeat in ``seq``);
- a completed answer's chunks join to its content, across resumes;
- every cancel's answer is the true outcome: ``cancelled`` for the first that took effect,
  ``already_cancelled`` after it, ``already_completed`` for a request that completed first,
  ``not_found`` before the chat (which then ends cancelled at once, without a chunk);
- a dropped request that was not resumable ends ``cancelled`` with reason ``disconnect`` (or
  as it had ended before the drop), as ``GET`` on any node tells.

Run at scale: ``python3 -m tests.gateway.invariants --requests 100000 --nodes 3`` (prints one
JSON line of figures); the test suite runs 10,000 (tests/gateway/test_invariants.py).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.server import Gateway
from protocol import CancelReason, ResponseStatus

from .http_client import http
from .test_resume import counted, drop, joined
from .wire import Track, WireClient

KINDS = ("complete", "frame", "http", "other", "twice", "early")


@dataclass(frozen=True)
class RemoteNode:
    """A gateway in another process (bench/soak.py): its URLs only."""

    url: str
    http_url: str


Node = Gateway | RemoteNode


@dataclass
class Plan:
    rid: str
    kind: str
    resumable: bool
    tokens: int
    #: Stopped before (1) or after (2) a drop of the session's connection.
    phase: int
    tracks: list[Track] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    epoch: str | None = None
    #: Not resumable, on a connection that was cut: its end is asked with GET.
    lost: bool = False


@dataclass
class Figures:
    requests: int = 0
    sessions: int = 0
    drops: int = 0
    resumed: int = 0
    ends: collections.Counter[str] = field(default_factory=collections.Counter)
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    cancel_answers: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Cancels from another connection (or HTTP) that the gateway read before the chat.
    overtaken: int = 0
    #: ... of which the request completed before the tombstone reached its node (a cluster).
    overtaken_completed: int = 0


class Campaign:
    """Sessions of requests over ``nodes``, ``parallel`` sessions at a time."""

    def __init__(
        self, nodes: Sequence[Node], seed: int, *, batch: int = 20, prefix: str = "i"
    ) -> None:
        self.nodes = nodes
        #: Request ids are ``<prefix><n>``: campaigns at once on one gateway (the same user)
        #: need prefixes of their own.
        self.prefix = prefix
        self.rng = random.Random(seed)
        self.batch = batch
        self.figures = Figures()
        self._serial = 0

    async def run(self, requests: int, parallel: int) -> Figures:
        sessions = -(-requests // self.batch)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(sessions):
            queue.put_nowait(n)

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                await self.session()

        async with asyncio.TaskGroup() as group:
            for _ in range(parallel):
                group.create_task(worker())
        return self.figures

    def _node(self) -> Node:
        return self.rng.choice(self.nodes)

    @contextlib.asynccontextmanager
    async def _client(self, node: Node) -> AsyncIterator[WireClient]:
        async with WireClient.open(node.url) as client:
            yield client

    async def session(self) -> None:
        rng = self.rng
        plans = []
        for _ in range(self.batch):
            self._serial += 1
            kind = rng.choice(KINDS)
            plans.append(
                Plan(
                    rid=f"{self.prefix}{self._serial}",
                    kind=kind,
                    resumable=rng.random() < 0.5,
                    tokens=rng.randint(5, 150),
                    phase=rng.choice((1, 2)),
                )
            )
        self.figures.sessions += 1
        self.figures.requests += len(plans)
        self.figures.kinds.update(p.kind for p in plans)
        home = self._node()
        async with (
            contextlib.AsyncExitStack() as stack,
            self._client(self._node()) as other,
        ):
            client = await stack.enter_async_context(self._client(home))
            for plan in plans:
                if plan.kind == "early":
                    plan.answers.append(await self._delete(plan.rid))
                meta = {"tokens": plan.tokens, "token_delay_ms": rng.choice((0, 1, 2, 3)),
                        "plan_ms": 0, "tool_ms": 0}  # fmt: skip
                plan.tracks.append(
                    await client.chat(plan.rid, resumable=plan.resumable, metadata=meta)
                )
            for plan in plans:
                if plan.resumable:
                    plan.epoch = (await client.resumable(plan.rid)).epoch
            await self._progress(client, plans)
            await self._stop(client, other, [p for p in plans if p.phase == 1])
            if rng.random() < 0.3:  # the connection drops: resume what can be resumed
                self.figures.drops += 1
                if isinstance(home, Gateway):
                    await drop(home, client)  # and wait until the gateway saw it
                else:
                    client.abort()  # (its requests' records are awaited in _check_lost)
                client = await stack.enter_async_context(self._client(self._node()))
                for plan in plans:
                    if counted(plan.tracks):
                        continue  # its end arrived before the drop
                    if not plan.resumable:
                        plan.lost = True
                        continue
                    assert plan.epoch is not None
                    after = _last_kept(plan.tracks)
                    plan.tracks.append(await client.resume(plan.rid, plan.epoch, after))
                    self.figures.resumed += 1
            await self._stop(client, other, [p for p in plans if p.phase == 2 and not p.lost])
            for plan in plans:
                if not plan.lost and not counted(plan.tracks):
                    await client.response(plan.rid, timeout=60)
            await self._check(plans, other)

    async def _progress(self, client: WireClient, plans: list[Plan]) -> None:
        """Until a random number of chunks arrived in all (or every request ended)."""
        goal = self.rng.randint(0, sum(p.tokens for p in plans) // 4)

        def reached() -> bool:
            got = sum(len(t.chunks) for p in plans for t in p.tracks)
            return got >= goal or all(counted(p.tracks) for p in plans)

        await client.wait_for(reached, timeout=60)

    async def _delete(self, rid: str) -> str:
        answer = await http("DELETE", f"{self._node().http_url}/v1/requests/{rid}")
        return str(answer.json()["status"])

    async def _stop(self, client: WireClient, other: WireClient, plans: list[Plan]) -> None:
        for plan in self.rng.sample(plans, len(plans)):
            for _ in range(2 if plan.kind == "twice" else 1):
                if plan.kind in ("frame", "twice"):
                    plan.answers.append(await _cancel_frame(client, plan.rid))
                elif plan.kind == "http":
                    plan.answers.append(await self._delete(plan.rid))
                elif plan.kind == "other":
                    plan.answers.append(await _cancel_frame(other, plan.rid))

    async def _check(self, plans: list[Plan], other: WireClient) -> None:
        for plan in plans:
            self.figures.cancel_answers.update(plan.answers)
            if plan.lost:
                await self._check_lost(plan)
                continue
            (response,) = counted(plan.tracks)  # exactly one end (the machines refused more)
            status = response.status
            self.figures.ends[status.value] += 1
            said = plan.answers
            if plan.kind == "early":  # the DELETE answered before the chat was sent
                assert said == ["not_found"], (plan.rid, said)
                assert status is ResponseStatus.CANCELLED, (plan.rid, said)
                assert all(not t.chunks for t in plan.tracks), plan.rid
            elif said[:1] == ["not_found"]:
                # From another connection (or HTTP) before the gateway read the chat: nothing
                # orders two connections. Its tombstone cancels it — at once, or, behind
                # several nodes, when it reaches the node that read the chat meanwhile, unless
                # it completed in that instant (SPEC.md §5.3).
                self.figures.overtaken += 1
                if status is ResponseStatus.COMPLETED:
                    assert len(self.nodes) > 1, (plan.rid, plan.kind, said)
                    self.figures.overtaken_completed += 1
                    assert set(said[1:]) <= {"already_completed"}, (plan.rid, said)
                else:
                    assert status is ResponseStatus.CANCELLED, (plan.rid, plan.kind, said)
                    assert set(said[1:]) <= {"already_cancelled"}, (plan.rid, said)
            elif status is ResponseStatus.COMPLETED:
                assert set(said) <= {"already_completed"}, (plan.rid, plan.kind, said)
                assert joined(*plan.tracks) == response.content, plan.rid
            elif status is ResponseStatus.CANCELLED:
                assert said, (plan.rid, plan.kind, "cancelled, but nobody cancelled it")
                assert said[0] == "cancelled", (plan.rid, plan.kind, said)
                assert set(said[1:]) <= {"already_cancelled"}, (plan.rid, plan.kind, said)
                assert response.reason in (CancelReason.CLIENT, CancelReason.API), plan.rid
            else:
                raise AssertionError(f"{plan.rid} ended {status.value}: {response}")
        assert not other.violations

    async def _check_lost(self, plan: Plan) -> None:
        """A request cut with its connection, not resumable: cancelled for the disconnect,
        unless a cancel or its end came first (as GET on any node says, at once)."""
        url = f"{self._node().http_url}/v1/requests/{plan.rid}"
        record = (await http("GET", url)).json()
        if not all(isinstance(n, Gateway) for n in self.nodes):  # another process: it sees
            async with asyncio.timeout(10):  # the cut when it sees it; no event to await here
                while record["status"] == "active":
                    await asyncio.sleep(0.01)
                    record = (await http("GET", url)).json()
        status, reason = record["status"], record.get("reason")
        self.figures.ends[f"{status}/{reason}" if reason else status] += 1
        if status == "not_found":  # cut before the gateway read its chat: it never was
            assert not any(t.log for t in plan.tracks), (plan.rid, record)
            return
        if plan.kind == "early":  # its tombstone ended it at once
            assert (status, reason) == ("cancelled", "api"), (plan.rid, record)
        elif plan.answers and plan.answers[0] in ("cancelled", "not_found"):
            assert status in ("cancelling", "cancelled"), (plan.rid, record)
            assert reason in ("client", "api"), (plan.rid, record)
        elif status != "completed":
            assert status in ("cancelling", "cancelled"), (plan.rid, record)
            assert reason == "disconnect", (plan.rid, record)


async def _cancel_frame(client: WireClient, rid: str) -> str:
    """A ``cancel`` frame on ``client``, and its ``cancel_result``'s status: with the request's
    track when the request is (or was) on this connection, else among the others."""
    track = client.tracks.get(rid)
    results: list[Any] = track.cancel_results if track is not None else client.others
    seen = len(results)
    await client.cancel(rid)
    await client.wait_for(lambda: len(results) > seen, timeout=30)
    return str(results[seen].status.value)


def _last_kept(tracks: list[Track]) -> int | None:
    from .test_resume import kept

    seqs = [c.seq for c in kept(tracks)]
    return max(seqs) if seqs else None


async def campaign(requests: int, nodes: int, seed: int, parallel: int) -> tuple[Figures, float]:
    """Run a campaign over ``nodes`` gateways (one: no NATS; more: a cluster)."""
    from .conftest import running_gateway
    from .test_cluster import cluster

    settings: dict[str, Any] = {"max_streams": 256, "tombstone_count": 100_000}
    started = time.perf_counter()
    if nodes == 1:
        async with running_gateway(**settings) as gw:
            figures = await Campaign([gw], seed).run(requests, parallel)
    else:
        async with cluster(nodes, **settings) as gws:
            figures = await Campaign(gws, seed).run(requests, parallel)
    return figures, time.perf_counter() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--seed", type=int, default=18)
    p.add_argument("--parallel", type=int, default=8, help="sessions at a time")
    a = p.parse_args()
    figures, seconds = asyncio.run(campaign(a.requests, a.nodes, a.seed, a.parallel))
    print(json.dumps({
        "requests": figures.requests, "nodes": a.nodes, "seed": a.seed,
        "sessions": figures.sessions, "drops": figures.drops, "resumed": figures.resumed,
        "kinds": dict(figures.kinds),
        "ends": dict(figures.ends), "cancel_answers": dict(figures.cancel_answers),
        "overtaken": figures.overtaken, "overtaken_completed": figures.overtaken_completed,
        "violations": 0, "seconds": round(seconds, 1),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
