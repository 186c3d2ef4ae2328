"""Several gateway nodes behind a load balancer, over NATS (issue 17): a cancel, a ``GET`` or a
cancel-before-start reaches the node that runs (or remembers) the request, whichever node it
arrives at.

What lives where: every request stays in memory on the node that accepted its chat (the
pipeline, its output, its record after the end); NATS carries only questions between nodes. A
node that cannot decide a cancel or a lookup from its own memory asks every node at once
(``muxgate.<cluster>.cancel`` / ``.lookup``, one message each, answered on an inbox) and waits
for the owner's answer, or for every live node's ``not_found`` (a node that falls silent meanwhile
is no longer waited for), at most ``ask_timeout``. A question can be lost with a NATS link (the
owner's, or the asker's, dropped while it was in flight): each heartbeat carries its node's link
count, and a node that reconnected (or an asker that did) is asked again directly, once per
reconnect; a node answers a question asked again with the answer it gave, never twice
(``_question``). Live nodes
are known from heartbeats (``.heartbeat``, every ``heartbeat_interval``; a node unheard for three
intervals is gone). A cancel that no node knows leaves a tombstone on every node (``.bury``,
once every live node said ``not_found``; SPEC.md §5.3): a chat arriving at any node just after
ends cancelled, before its pipeline starts.

Without ``--nats`` none of this exists: the gateway's registry is the in-memory one, unchanged.
The hot path never touches NATS: a chunk never crosses it, and a cancel decided locally (the
request runs on this node) never waits for it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson

from protocol import CancelReason, CancelStatus, ErrorInfo, Usage

from .observability import log
from .registry import (
    InMemoryRegistry,
    LiveRequest,
    RequestKey,
    RequestRecord,
    RequestStatus,
)
from .tracing import NO_TRACING, Tracing

if TYPE_CHECKING:  # nats-py is the optional extra "cluster"
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg

__all__ = ["Cluster", "ClusterRegistry", "default_node_id", "node_lost_record"]

#: Answers kept for questions asked again (Cluster._question), at most: ~100 bytes each.
MAX_GIVEN = 50_000


def default_node_id() -> str:
    """A node id that differs per process, readable in logs: host, pid, a random suffix."""
    host = socket.gethostname().split(".")[0][:24] or "node"
    return f"{host}-{os.getpid()}-{secrets.token_hex(2)}"


def _kv_key(key: RequestKey) -> str:
    """A KV key for (user, request id): base64url, as KV keys allow fewer characters."""
    raw = f"{key.user_id}\x00{key.request_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def node_lost_record(key: RequestKey, node: str) -> RequestRecord:
    """What ``GET`` says of a request whose node is gone: failed, ``node_lost``."""
    from protocol import RequestState

    return RequestRecord(
        request_id=key.request_id,
        status=RequestStatus.FAILED,
        state=RequestState.FAILED,
        usage=Usage(final=True, estimated=("input_tokens", "output_tokens")),
        error=ErrorInfo(code="node_lost", message=f"the node that ran it ({node}) is gone"),
    )


def record_from_json(body: dict[str, Any]) -> RequestRecord:
    """The inverse of :meth:`RequestRecord.to_json` (what a node answers a lookup with)."""
    from protocol import RequestState

    usage = body["usage"]
    error = body.get("error")
    status = RequestStatus(body["status"])
    return RequestRecord(
        request_id=body["request_id"],
        status=status,
        state=RequestState(body["state"]),
        usage=Usage(
            input_tokens=usage["input_tokens"],
            output_tokens=usage["output_tokens"],
            saved_tokens=usage["saved_tokens"],
            final=usage["final"],
            estimated=tuple(usage["estimated"]) if "estimated" in usage else None,
        ),
        reason=CancelReason(body["reason"]) if "reason" in body else None,
        error=ErrorInfo(code=error["code"], message=error["message"]) if error else None,
        created_at=body.get("created_at", 0.0),
        finished_at=body.get("finished_at"),
    )


_SUMMED = ("connections", "active_requests", "requests_total", "requests_per_second")
_SUMMED_MAPS = ("responses", "cancellations", "tokens", "relays")


def _sum_figures(nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """The cluster's totals of the nodes' figures (a peer's malformed figure counts as 0)."""

    def number(value: object) -> float:
        return value if isinstance(value, int | float) and not isinstance(value, bool) else 0

    totals: dict[str, Any] = {name: 0 for name in _SUMMED}
    maps: dict[str, dict[str, float]] = {name: {} for name in _SUMMED_MAPS}
    for figures in nodes:
        for name in _SUMMED:
            totals[name] += number(figures.get(name))
        for name in _SUMMED_MAPS:
            values = figures.get(name)
            if isinstance(values, dict):
                into = maps[name]
                for key, value in values.items():
                    into[str(key)] = into.get(str(key), 0) + number(value)
    totals["requests_per_second"] = round(totals["requests_per_second"], 3)
    return {**totals, **maps}


def _no_responders(msg: Msg) -> bool:
    """A reply made by the NATS server, not a node: nothing listened on the subject asked."""
    return bool(msg.headers) and msg.headers.get("Status") == "503"  # type: ignore[union-attr]


class Cluster:
    """This node's link to the others."""

    def __init__(
        self,
        url: str,
        *,
        node_id: str,
        name: str = "default",
        heartbeat_interval: float = 1.0,
        ask_timeout: float = 10.0,
        ownership_ttl: float = 330.0,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self.url = url
        #: Traces (gateway/tracing.py): questions carry the asker's trace context in their
        #: NATS headers; a node answering one records it as a span of that trace.
        self.tracing = tracing
        #: How long a node's claim on a request id is kept (past its retention): what tells
        #: the others, when it is gone, that the request was lost with it.
        self.ownership_ttl = ownership_ttl
        self._owners: Any = None  # the JetStream KV bucket of claims, if JetStream is there
        self._claim_subject = ""
        self._claims: asyncio.Queue[RequestKey] = asyncio.Queue(maxsize=10_000)
        self._claimer: asyncio.Task[None] | None = None
        #: Claims not written because NATS could not take them fast enough (a figure).
        self.claims_dropped = 0
        self.node_id = node_id
        self.prefix = f"muxgate.{name}"
        #: This process's own subjects (``<address>.<route>``): answers to its questions and
        #: relay traffic. One wildcard subscription, routed here by suffix, so that a question
        #: or a relay costs no subscription of its own (no SUB/UNSUB round through the server).
        self.address = f"{self.prefix}.node.{secrets.token_hex(8)}"
        self._routes: dict[str, Callable[[Msg], None]] = {}
        self._asked = itertools.count(1)
        #: Other nodes' addresses (from their heartbeats), to probe one that fell silent.
        self.addresses: dict[str, str] = {}
        self._confirming: set[str] = set()
        #: Nodes that fell silent and did not answer a probe: no longer waited for.
        self.gone: set[str] = set()
        self.heartbeat_interval = heartbeat_interval
        self.ask_timeout = ask_timeout
        #: Other nodes by id: monotonic time last heard.
        self.peers: dict[str, float] = {}
        #: This node's connections to NATS, counted (1 once started, +1 each reconnect), and
        #: each peer's last count (from its heartbeats): a count that moved while a question
        #: waited means that question may have been lost on the way (see _ask).
        self.link = 0
        self.peer_links: dict[str, int] = {}
        #: Answers given lately, by the question's reply subject (unique per question), kept
        #: 2 x ask_timeout (at most MAX_GIVEN): a question asked again gets the answer given,
        #: it is not executed twice. And the questions being answered now.
        self._given: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._giving: set[str] = set()
        #: Questions asked again after a reconnect (a figure, and for tests).
        self.asked_again = 0
        self.connected = False
        self._nc: NatsClient | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._peers_changed: asyncio.Event | None = None
        self._beat_heard: asyncio.Event | None = None
        self._answering: set[asyncio.Task[None]] = set()
        self._link_changed: asyncio.Event | None = None
        #: The handlers of other nodes' questions, set by the registry.
        self.on_cancel: Callable[[RequestKey, CancelReason], CancelStatus] | None = None
        self.on_lookup: Callable[[RequestKey], RequestRecord | None] | None = None
        self.on_bury: Callable[[RequestKey, CancelReason], None] | None = None
        #: Another node's client resumes a request: the relay hub's answer (gateway/relay.py).
        self.on_resume: Callable[[RequestKey, dict[str, Any]], Awaitable[dict[str, Any]]] | None
        self.on_resume = None
        #: Callbacks for when a node falls silent (by node), or this node's link drops.
        self._peer_watchers: dict[str, set[Callable[[], None]]] = {}
        self._link_watchers: set[Callable[[], None]] = set()
        #: This node's figures, sent with each heartbeat; the peers' last ones, by node.
        self.summary: Callable[[], dict[str, Any]] | None = None
        self.peer_summaries: dict[str, tuple[float, dict[str, Any]]] = {}

    # -- life --------------------------------------------------------------------------------

    async def start(self) -> None:
        import nats  # the optional extra "cluster"

        async def disconnected() -> None:
            self._set_connected(False)
            log.warning("cluster.disconnected", node=self.node_id)
            for watcher in list(self._link_watchers):
                watcher()

        async def reconnected() -> None:
            # Nobody could be heard while this node was away: its peers get three intervals
            # from now before they count as gone.
            now = time.monotonic()
            for node in self.peers:
                self.peers[node] = now
            self.link += 1
            self._set_connected(True)
            log.info("cluster.reconnected", node=self.node_id)

        self._nc = nc = await nats.connect(
            self.url,
            name=self.node_id,
            no_echo=True,  # a node never answers its own questions: it asked itself first
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
        )
        self.link = 1
        self._set_connected(True)
        await nc.subscribe(f"{self.prefix}.cancel", cb=self._answer_cancel)
        await nc.subscribe(f"{self.prefix}.lookup", cb=self._answer_lookup)
        await nc.subscribe(f"{self.prefix}.heartbeat", cb=self._heard)
        await nc.subscribe(f"{self.prefix}.bury", cb=self._bury)
        await nc.subscribe(f"{self.prefix}.resume", cb=self._answer_resume)
        await nc.subscribe(f"{self.address}.>", cb=self._routed)
        self.route("probe", self._probed)
        # The same questions asked of this node alone (again, after a reconnect: see _ask).
        for what, answer in self._answers().items():
            self.route(f"q.{what}", self._answering_with(answer))
        await nc.flush()
        await self._open_owners()
        self._heartbeat = asyncio.create_task(self._beat(), name="muxgate-cluster-heartbeat")
        self._claimer = asyncio.create_task(self._write_claims(), name="muxgate-cluster-claims")
        log.info("cluster.joined", node=self.node_id, url=self.url)

    async def _open_owners(self) -> None:
        """The KV bucket of claims (request -> node): JetStream when the server has it, else
        node loss goes unnoticed (said once in the log)."""
        from nats.js.api import KeyValueConfig

        assert self._nc is not None
        bucket = "muxgate_" + "".join(c if c.isalnum() else "_" for c in self.prefix[8:])
        try:
            self._owners = await self._nc.jetstream().create_key_value(
                KeyValueConfig(bucket=f"{bucket}_owners", ttl=self.ownership_ttl)
            )
            self._claim_subject = f"$KV.{bucket}_owners."
        except Exception as exc:
            log.warning("cluster.no_jetstream", node=self.node_id, detail=str(exc)[:200])
            self._owners = None

    async def close(self) -> None:
        for task in (self._heartbeat, self._claimer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
        self.connected = False

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        if self._link_changed is not None:
            self._link_changed.set()

    async def wait_connected(self, connected: bool = True) -> None:
        """Until the link to NATS is up (or down): for start-up checks and tests."""
        while self.connected is not connected:
            if self._link_changed is None:
                self._link_changed = asyncio.Event()
            self._link_changed.clear()
            await self._link_changed.wait()

    def health(self) -> dict[str, object]:
        """This node's view of the cluster, for ``/healthz``: a node without NATS still serves
        its own connections (200), and says so."""
        return {
            "node": self.node_id,
            "nats": "connected" if self.connected else "disconnected",
            "peers": sorted(self.live_peers()),
            "node_loss_detection": self._owners is not None,
        }

    @property
    def client(self) -> NatsClient:
        """The NATS connection (for the relays of gateway/relay.py)."""
        if self._nc is None:
            raise RuntimeError("the cluster link is not started")
        return self._nc

    def route(self, suffix: str, handler: Callable[[Msg], None]) -> str:
        """Deliver messages on ``<address>.<suffix>`` to ``handler`` (synchronous: it must not
        hold up the others' messages); returns that subject."""
        self._routes[suffix] = handler
        return f"{self.address}.{suffix}"

    def unroute(self, suffix: str) -> None:
        self._routes.pop(suffix, None)

    async def _routed(self, msg: Msg) -> None:
        handler = self._routes.get(msg.subject[len(self.address) + 1 :])
        if handler is not None:
            handler(msg)

    def watch_peer(self, node: str, on_lost: Callable[[], None]) -> Callable[[], None]:
        """Call ``on_lost`` once ``node`` falls silent (checked every heartbeat interval);
        returns the function that stops watching."""
        watchers = self._peer_watchers.setdefault(node, set())
        watchers.add(on_lost)

        def unwatch() -> None:
            watchers.discard(on_lost)
            if not watchers and self._peer_watchers.get(node) is watchers:
                del self._peer_watchers[node]

        return unwatch

    def watch_link(self, on_lost: Callable[[], None]) -> Callable[[], None]:
        """Call ``on_lost`` each time this node's link to NATS drops."""
        self._link_watchers.add(on_lost)
        return lambda: self._link_watchers.discard(on_lost)

    def _check_watched(self) -> None:
        """Each heartbeat interval: a node that fell silent is probed, once; gone if it does
        not answer (its watchers are told)."""
        if not self.connected:  # (away: every peer is silent)
            return
        live = self.live_peers()
        for node in [n for n in self.peers if n not in live and n not in self.gone]:
            if node not in self._confirming:
                self._confirming.add(node)
                self._spawn(self._confirm_lost(node))

    async def _confirm_lost(self, node: str) -> None:
        """A watched node fell silent: gone only if it does not answer a probe either."""
        try:
            if await self.reachable(node):
                self.peers[node] = time.monotonic()  # alive (its beats were late): watched on
                return
            self.gone.add(node)
            for on_lost in list(self._peer_watchers.pop(node, ())):
                on_lost()
        finally:
            self._confirming.discard(node)

    async def reachable(self, node: str) -> bool:
        """Whether ``node`` answers a probe sent to its address within three heartbeat
        intervals. Heartbeats alone would take a node whose event loop is busy, or whose beats
        were delayed, for dead: its requests would be declared lost while it runs them."""
        address, nc = self.addresses.get(node), self._nc
        if address is None or nc is None or not self.connected:
            return False
        answered: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def on_answer(msg: Msg) -> None:
            # NATS itself answers "no responders" (status 503) when nothing listens there.
            if not answered.done():
                answered.set_result(not _no_responders(msg))

        route = f"ask.{next(self._asked)}"
        inbox = self.route(route, on_answer)
        try:
            await nc.publish(f"{address}.probe", b"", reply=inbox)
            async with asyncio.timeout(3 * self.heartbeat_interval):
                return await answered
        except Exception:  # no answer in time (TimeoutError), or NATS away
            return False
        finally:
            self.unroute(route)

    def _answering_with(self, answer: Callable[[Msg], Awaitable[None]]) -> Callable[[Msg], None]:
        """A route's handler (synchronous) that answers in a task of its own."""
        return lambda msg: self._spawn(answer(msg))

    def _probed(self, msg: Msg) -> None:
        if msg.reply and self._nc is not None:
            self._spawn(self._nc.publish(msg.reply, b""))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    def view(self, own: dict[str, Any]) -> dict[str, Any]:
        """The cluster view of the stats snapshot: this node's figures (``own``) and each live
        peer's last ones (with their age), and their totals."""
        now = time.monotonic()
        live = self.live_peers()
        for gone in [n for n in self.peer_summaries if n not in live]:
            del self.peer_summaries[gone]
        nodes = [{"node": self.node_id, "self": True, "age_ms": 0, **own}]
        for node in sorted(self.peer_summaries):
            heard, figures = self.peer_summaries[node]
            age = round((now - heard) * 1000)
            nodes.append({"node": node, "self": False, "age_ms": age, **figures})
        return {
            "node": self.node_id,
            "nats": "connected" if self.connected else "disconnected",
            "nodes": nodes,
            "totals": {"nodes": len(nodes), **_sum_figures(nodes)},
        }

    def live_peers(self) -> set[str]:
        horizon = time.monotonic() - 3 * self.heartbeat_interval
        return {node for node, seen in self.peers.items() if seen >= horizon}

    async def _beat(self) -> None:
        while True:
            nc = self._nc
            if nc is not None and self.connected:
                beat: dict[str, Any] = {
                    "node": self.node_id, "address": self.address, "link": self.link,
                }  # fmt: skip
                if self.summary is not None:
                    beat["stats"] = self.summary()
                with contextlib.suppress(Exception):
                    await nc.publish(f"{self.prefix}.heartbeat", orjson.dumps(beat))
            await asyncio.sleep(self.heartbeat_interval)
            self._check_watched()

    async def _heard(self, msg: Msg) -> None:
        beat = orjson.loads(msg.data)
        node = beat.get("node")
        if not isinstance(node, str) or node == self.node_id:
            return
        new = node not in self.live_peers()
        self.peers[node] = now = time.monotonic()
        self.gone.discard(node)
        link = beat.get("link")
        if isinstance(link, int):
            self.peer_links[node] = link
        address = beat.get("address")
        if isinstance(address, str) and address.startswith(f"{self.prefix}.node."):
            self.addresses[node] = address
        if isinstance(beat.get("stats"), dict):
            self.peer_summaries[node] = (now, beat["stats"])
        if self._beat_heard is not None:
            self._beat_heard.set()
        if new:
            log.info("cluster.peer_seen", node=self.node_id, peer=node)
            if self._peers_changed is not None:
                self._peers_changed.set()
            # Answer a newcomer at once, so that it knows this node before the next beat.
            nc = self._nc
            if nc is not None and self.connected:
                with contextlib.suppress(Exception):
                    await nc.publish(
                        f"{self.prefix}.heartbeat",
                        orjson.dumps({"node": self.node_id, "link": self.link}),
                    )

    async def wait_for_peers(self, count: int) -> None:
        """Until at least ``count`` other nodes are live (for start-up and tests)."""
        while len(self.live_peers()) < count:
            if self._peers_changed is None:
                self._peers_changed = asyncio.Event()
            self._peers_changed.clear()
            await self._peers_changed.wait()

    # -- claims: which node runs which request (for node loss) ---------------------------------

    def claim(self, key: RequestKey) -> None:
        """This node accepted ``key``'s chat: recorded in the background (never awaited on the
        chat's path; bounded: past 10,000 waiting, claims are dropped and counted)."""
        if self._owners is None:
            return
        try:
            self._claims.put_nowait(key)
        except asyncio.QueueFull:
            self.claims_dropped += 1

    async def _write_claims(self) -> None:
        """Claims go out as plain publishes on the bucket's subjects (a KV bucket is a stream
        over ``$KV.<bucket>.<key>``): no acknowledgement awaited per chat — an awaited put
        costs the node a request-reply per chat, measured at ~10% of its CPU per chunk under
        the throughput load. A claim lost with NATS only weakens node-loss detection."""
        value = self.node_id.encode()
        nc, prefix = self._nc, self._claim_subject
        assert nc is not None
        claims = self._claims
        while True:
            key = await claims.get()
            with contextlib.suppress(Exception):  # NATS away: the claim is lost, not the chat
                await nc.publish(prefix + _kv_key(key), value)
                while not claims.empty():  # what queued meanwhile, in the same turn
                    await nc.publish(prefix + _kv_key(claims.get_nowait()), value)

    async def lost_owner(self, key: RequestKey, heard: set[str] | None = None) -> str | None:
        """The node that claimed ``key`` if it is gone (not live, not this node); else None.
        With ``heard`` (the nodes that answered a question about ``key``): a claimant still
        counted live that did not answer is waited for until it would count as gone."""
        if self._owners is None:
            return None
        try:
            entry = await self._owners.get(_kv_key(key))
        except Exception:  # not claimed (or expired), or NATS away
            return None
        owner = bytes(entry.value or b"").decode()
        if not owner or owner == self.node_id:
            return None
        # Counted live, but silent on this question: gone if it stays silent (kill -9).
        if owner in self.live_peers() and (
            heard is None or owner in heard or not await self.silence_of(owner)
        ):
            return None
        return None if await self.reachable(owner) else owner

    async def next_beats(self, nodes: set[str]) -> None:
        """Until each of ``nodes`` has sent a heartbeat after this call (its figures with it):
        for tests and operators' tools."""
        since = time.monotonic()
        while any(self.peers.get(node, 0.0) <= since for node in nodes):
            if self._beat_heard is None:
                self._beat_heard = asyncio.Event()
            self._beat_heard.clear()
            await self._beat_heard.wait()

    async def silence_of(self, node: str) -> bool:
        """Wait until ``node`` would count as gone if unheard since (three heartbeat intervals
        after its last beat); whether it is gone then. For tests and operators' tools."""
        seen = self.peers.get(node)
        if seen is not None:
            await asyncio.sleep(max(0.0, seen + 3 * self.heartbeat_interval - time.monotonic()))
            await asyncio.sleep(0.01)  # past the horizon, not on it
        return node not in self.live_peers()

    # -- asking the other nodes --------------------------------------------------------------

    async def cancel(self, key: RequestKey, reason: CancelReason) -> CancelStatus | None:
        """The owner's outcome; ``NOT_FOUND`` when every live node said so; None when no node
        could be asked (NATS unreachable)."""
        answers = await self._ask("cancel", key, {"reason": reason.value})
        if answers is None:
            return None
        for answer in answers:
            status = CancelStatus(answer["status"])
            if status is not CancelStatus.NOT_FOUND:
                return status
        return CancelStatus.NOT_FOUND

    async def bury(self, key: RequestKey, reason: CancelReason) -> None:
        """Every node leaves a tombstone for ``key``: a cancel found it nowhere (SPEC §5.3).
        Returns once every live node has (so a chat sent after the cancel's answer finds it)."""
        await self._ask("bury", key, {"reason": reason.value})

    async def lookup(self, key: RequestKey) -> RequestRecord | None:
        answers = await self._ask("lookup", key, {})
        for answer in answers or ():
            if answer.get("record") is not None:
                return record_from_json(answer["record"])
        return None

    async def resume(self, key: RequestKey, body: dict[str, Any]) -> dict[str, Any] | None:
        """The owner's answer to a resume (``resumed`` or ``error``), ``{"status":
        "not_found"}`` when every live node said so, None when no node could be asked."""
        answers = await self._ask("resume", key, body)
        if answers is None:
            return None
        for answer in answers:
            if answer.get("status", "not_found") != "not_found":
                return answer
        return {"status": "not_found", "heard": {str(a.get("node")) for a in answers}}

    async def _ask(
        self, what: str, key: RequestKey, extra: dict[str, Any]
    ) -> list[dict[str, Any]] | None:
        """Ask every node; return the answers as soon as one is not ``not_found`` (the owner)
        or every live node answered, at the latest after ``ask_timeout``.

        Every node known and not gone is waited for until it answers, or falls silent and does
        not answer a probe either (then it is gone), not for a fixed short time: an owner slow
        to answer, or whose heartbeats came late (a busy event loop), must not be taken for
        "nobody has it" — the asker would then answer ``not_found`` for a request the owner
        cancelled, or bury its id."""
        nc = self._nc
        if nc is None or not self.connected:
            return None
        expected = set(self.peers) - self.gone
        answers: list[dict[str, Any]] = []
        heard: set[str] = set()
        done = asyncio.get_running_loop().create_future()

        def on_answer(msg: Msg) -> None:
            if _no_responders(msg):  # (no node listens: the peers will be waited for)
                return
            answer = orjson.loads(msg.data)
            answers.append(answer)
            heard.add(answer.get("node", ""))
            found = answer.get("status", "not_found") != "not_found" or answer.get("record")
            if (found or pending() <= heard) and not done.done():
                done.set_result(None)

        def pending() -> set[str]:
            return expected - self.gone

        route = f"ask.{next(self._asked)}"
        inbox = self.route(route, on_answer)
        # The links (each peer's, this node's) the question went out on, by node.
        sent_on = {node: (self.peer_links.get(node), self.link) for node in expected}
        try:
            body = {"user_id": key.user_id, "request_id": key.request_id, **extra}
            data, headers = orjson.dumps(body), self.tracing.inject()  # None: no trace
            await nc.publish(f"{self.prefix}.{what}", data, reply=inbox, headers=headers)
            if expected:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.ask_timeout):
                        # Checked each heartbeat interval: who is still to be waited for.
                        while not done.done() and not pending() <= heard:
                            await asyncio.wait((done,), timeout=self.heartbeat_interval)
                            for node in pending() - heard:
                                links = (self.peer_links.get(node), self.link)
                                address = self.addresses.get(node)
                                if links == sent_on[node] or not self.connected or not address:
                                    continue
                                # It (or this node) reconnected since: the question, or its
                                # answer, may have been lost. Its answer if it had one.
                                sent_on[node] = links
                                self.asked_again += 1
                                await nc.publish(
                                    f"{address}.q.{what}", data, reply=inbox, headers=headers
                                )
        except Exception:  # NATS went away meanwhile: this node decides alone
            return None
        finally:
            self.unroute(route)
        return answers

    # -- answering them ----------------------------------------------------------------------

    def _answers(self) -> dict[str, Callable[[Msg], Awaitable[None]]]:
        """The questions this node answers, by subject suffix."""
        return {
            "cancel": self._answer_cancel,
            "lookup": self._answer_lookup,
            "bury": self._bury,
            "resume": self._answer_resume_now,
        }

    async def _question(self, msg: Msg, answer: Callable[[Msg], Awaitable[dict[str, Any]]]) -> None:
        """Answer ``msg`` once: a question asked again (same reply subject) gets the answer
        given, or nothing while it is being answered — a cancel is not cancelled twice (its
        word would change), a resume is not relayed twice."""
        reply = msg.reply
        if not reply:  # nobody to answer (not one of ours): done, and nothing said
            await answer(msg)
            return
        given = self._given.get(reply)
        if given is not None:
            await self._send(reply, given[1])
            return
        if reply in self._giving:
            return
        self._giving.add(reply)
        try:
            data = orjson.dumps(await answer(msg))
        finally:
            self._giving.discard(reply)
        now = time.monotonic()
        kept = self._given
        kept[reply] = (now + 2 * self.ask_timeout, data)
        while kept and (len(kept) > MAX_GIVEN or next(iter(kept.values()))[0] < now):
            kept.popitem(last=False)
        await self._send(reply, data)

    async def _send(self, subject: str, data: bytes) -> None:
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.publish(subject, data)

    async def _answer_cancel(self, msg: Msg) -> None:
        await self._question(msg, self._cancel_answer)

    async def _cancel_answer(self, msg: Msg) -> dict[str, Any]:
        body = orjson.loads(msg.data)
        key = RequestKey(body["user_id"], body["request_id"])
        handler = self.on_cancel
        with self.tracing.remote_span(
            "muxgate.cluster.answer_cancel",
            msg.headers,
            **{"muxgate.request_id": key.request_id, "muxgate.cancel_reason": body["reason"]},
        ) as span:
            reason = CancelReason(body["reason"])
            status = handler(key, reason) if handler else CancelStatus.NOT_FOUND
            span.set("muxgate.cancel_status", status.value)
        return {"node": self.node_id, "status": status.value}

    async def _bury(self, msg: Msg) -> None:
        await self._question(msg, self._bury_answer)

    async def _bury_answer(self, msg: Msg) -> dict[str, Any]:
        body = orjson.loads(msg.data)
        if self.on_bury is not None:
            key = RequestKey(body["user_id"], body["request_id"])
            self.on_bury(key, CancelReason(body["reason"]))
        return {"node": self.node_id, "status": "not_found"}

    async def _answer_lookup(self, msg: Msg) -> None:
        await self._question(msg, self._lookup_answer)

    async def _lookup_answer(self, msg: Msg) -> dict[str, Any]:
        body = orjson.loads(msg.data)
        key = RequestKey(body["user_id"], body["request_id"])
        with self.tracing.remote_span(
            "muxgate.cluster.answer_lookup", msg.headers, **{"muxgate.request_id": key.request_id}
        ) as span:
            record = self.on_lookup(key) if self.on_lookup else None
            span.set("muxgate.found", record is not None)
        answer: dict[str, Any] = {"node": self.node_id, "record": None}
        if record is not None:
            answer["record"] = {**record.to_json(), "state": record.state.value}
        return answer

    async def _answer_resume(self, msg: Msg) -> None:
        # Answered concurrently: a reconnecting client resumes all its streams at once, and
        # each answer awaits a subscription (NATS handles one subscription's messages in turn).
        self._spawn(self._answer_resume_now(msg))

    async def _answer_resume_now(self, msg: Msg) -> None:
        await self._question(msg, self._resume_answer)

    async def _resume_answer(self, msg: Msg) -> dict[str, Any]:
        body = orjson.loads(msg.data)
        key = RequestKey(body["user_id"], body["request_id"])
        answer: dict[str, Any] = {"node": self.node_id, "status": "not_found"}
        handler = self.on_resume
        with self.tracing.remote_span(
            "muxgate.cluster.answer_resume", msg.headers, **{"muxgate.request_id": key.request_id}
        ) as span:
            if handler is not None:
                try:
                    answer = await handler(key, body)
                except Exception:  # a malformed question: a miss, and the log says why
                    log.exception("cluster.resume_failed", node=self.node_id)
            span.set("muxgate.resume_status", str(answer.get("status")))
        return answer


class ClusterRegistry:
    """The registry of a node in a cluster: its own requests in memory (an
    :class:`InMemoryRegistry`), the others' asked over :class:`Cluster`. Implements
    :class:`registry.RequestRegistry`."""

    def __init__(self, local: InMemoryRegistry, cluster: Cluster) -> None:
        self.local = local
        self.cluster = cluster
        cluster.on_cancel = self._cancel_for_peer
        cluster.on_lookup = self._lookup_for_peer
        cluster.on_bury = self._bury_for_peer

    def __len__(self) -> int:
        return len(self.local)

    def add(self, request: LiveRequest) -> None:
        self.local.add(request)
        self.cluster.claim(request.key)

    def finished(self, request: LiveRequest) -> None:
        self.local.finished(request)

    def is_active(self, key: RequestKey) -> bool:
        return self.local.is_active(key)

    def take_tombstone(self, key: RequestKey) -> CancelReason | None:
        return self.local.take_tombstone(key)

    def active(self) -> list[LiveRequest]:
        return self.local.active()

    def cancel_local(self, key: RequestKey, reason: CancelReason) -> CancelStatus:
        return self.local.cancel_local(key, reason)

    def cancel_now(self, key: RequestKey, reason: CancelReason) -> CancelStatus | None:
        """Decided here when this node runs or remembers the request; else None (ask)."""
        if self.local.knows(key):
            return self.local.cancel_local(key, reason)
        return None

    async def cancel(self, key: RequestKey, reason: CancelReason) -> CancelStatus:
        status = self.cancel_now(key, reason)
        if status is not None:
            return status
        remote = await self.cluster.cancel(key, reason)
        if remote is not None and remote is not CancelStatus.NOT_FOUND:
            return remote
        if remote is not None and await self.cluster.lost_owner(key) is not None:
            return CancelStatus.ALREADY_COMPLETED  # it failed with its node (node_lost)
        # Nobody has it: a tombstone on every node (SPEC.md §5.3), this one first.
        status = self.local.cancel_local(key, reason)
        if remote is not None:
            await self.cluster.bury(key, reason)
        return status

    async def lookup(self, key: RequestKey) -> RequestRecord | None:
        record = await self.local.lookup(key)
        if record is not None:
            return record
        record = await self.cluster.lookup(key)
        if record is not None:
            return record
        lost = await self.cluster.lost_owner(key)
        return node_lost_record(key, lost) if lost is not None else None

    def _cancel_for_peer(self, key: RequestKey, reason: CancelReason) -> CancelStatus:
        # Unknown here: not_found, and no tombstone yet: another node may run it (the asker
        # has every node bury it once all said not_found).
        if not self.local.knows(key):
            return CancelStatus.NOT_FOUND
        return self.local.cancel_local(key, reason)

    def _bury_for_peer(self, key: RequestKey, reason: CancelReason) -> None:
        if not self.local.knows(key):
            self.local.bury(key, reason)
        else:
            # Its chat was read here after this node told the asker "not found": the cancel
            # came first (SPEC.md §5.3), so it takes effect now (on a request still running;
            # a finished one is left as it ended).
            self.local.cancel_local(key, reason)

    def _lookup_for_peer(self, key: RequestKey) -> RequestRecord | None:
        return self.local.record_now(key)
