"""Load generator of the resume scenario (issue 16): how fast a dropped connection's streams come
back, and what a detached request costs the gateway.

    python bench/resume_load.py --url ws://127.0.0.1:8001/v1/ws --server-pid PID

1. **Reconnect to first replayed chunk.** ``--conns`` connections each run ``--streams``
   resumable streams at ``--token-delay-ms``. ``--drops`` times, one connection (round robin) is
   cut (TCP abort, no close frame); at once a new connection is opened (TCP and WebSocket
   handshakes) and every stream of the cut one is resumed after the last ``seq`` it received.
   The last ``--lost`` chunks each stream received count as lost in flight (a real drop loses
   what was on the wire), so the resume asks for them again. Measured per stream: from the cut
   to the ``resume_result``, and to the first replayed chunk. Every chunk's ``seq`` must be the
   previous one + 1 across the cuts (counted: ``gaps``, ``repeats``).
   With ``--resume-url`` (another node of a cluster), the new connections go there: the
   streams are resumed on a node that does not run them, which relays them (issue 17).
2. **Memory per detached request.** ``--detach`` resumable streams are opened on fresh
   connections and the connections cut: the gateway's RSS with them detached, against the same
   number of plain streams opened, cancelled and their connections closed before (so that both
   figures include the allocator's warm-up), divided by their number.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from procstat import rss_bytes
from websockets.asyncio.client import ClientConnection, connect

SUBPROTOCOL = "muxgate.v1.json"


def _summary_ms(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    values = sorted(values)

    def pct(q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 3)

    return {"count": len(values), "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": pct(1.0)}


@dataclass(eq=False)
class Stream:
    rid: str
    epoch: str = ""
    last: int = -1
    #: set when resumed: the time of the cut it recovers from
    cut_at: float | None = None
    resumed: bool = False


@dataclass(eq=False)
class Conn:
    ws: ClientConnection
    streams: dict[str, Stream] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None


class ResumeLoad:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.meta = {"tokens": 100_000, "token_delay_ms": a.token_delay_ms, "plan_ms": 0,
                     "tool_ms": 0}  # fmt: skip
        self.to_result: list[float] = []
        self.to_chunk: list[float] = []
        self.gaps = 0
        self.repeats = 0
        self.not_found = 0
        self.errors: list[str] = []
        #: Set by the readers after every frame (what _wait waits on).
        self.changed = asyncio.Event()
        self.serial = 0

    async def _connect(self, url: str | None = None) -> ClientConnection:
        return await connect(url or self.a.url, subprotocols=[SUBPROTOCOL], compression=None,  # type: ignore[list-item]
                             max_size=2**20, open_timeout=10)  # fmt: skip

    async def _read(self, conn: Conn) -> None:
        with contextlib.suppress(Exception):
            async for frame in conn.ws:
                now = time.perf_counter()
                for line in frame.splitlines() if isinstance(frame, str) else []:
                    self._on(conn, orjson.loads(line), now)
                self.changed.set()

    def _on(self, conn: Conn, m: dict[str, Any], now: float) -> None:
        kind = m["type"]
        st = conn.streams.get(m.get("request_id", ""))
        if st is None:
            return
        if kind == "chunk":
            seq = m["seq"]
            if seq <= st.last:
                self.repeats += 1
                return
            if seq != st.last + 1:
                self.gaps += 1
            st.last = seq
            if st.cut_at is not None and st.resumed:
                self.to_chunk.append(now - st.cut_at)
                st.cut_at = None
        elif kind == "resumable":
            st.epoch = m["epoch"]
        elif kind == "resume_result":
            if m["status"] != "resumed":
                self.not_found += 1
            elif st.cut_at is not None:
                self.to_result.append(now - st.cut_at)
                st.resumed = True
        elif kind == "error":
            self.errors.append(m.get("code", "?"))

    async def _open(self, n: int, *, resumable: bool) -> Conn:
        conn = Conn(await self._connect())
        lines = []
        for _ in range(n):
            self.serial += 1
            rid = f"s{self.serial}"
            conn.streams[rid] = Stream(rid)
            chat: dict[str, Any] = {"type": "chat", "request_id": rid, "message": "x",
                                    "metadata": self.meta}  # fmt: skip
            if resumable:
                chat["resumable"] = True
            lines.append(orjson.dumps(chat))
        conn.reader = asyncio.create_task(self._read(conn))
        await conn.ws.send(b"\n".join(lines).decode())
        return conn

    async def _wait(self, predicate: Any) -> None:
        """Until ``predicate()`` holds on what the readers recorded (at most 30 s)."""
        async with asyncio.timeout(30):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    @staticmethod
    def _cut(conn: Conn) -> None:
        conn.ws.transport.abort()
        if conn.reader is not None:
            conn.reader.cancel()

    async def reconnects(self) -> None:
        a = self.a
        conns = [await self._open(a.streams, resumable=True) for _ in range(a.conns)]
        await self._wait(
            lambda: all(s.epoch and s.last >= 0 for c in conns for s in c.streams.values())
        )
        rng = random.Random(a.seed)
        for drop in range(a.drops):
            await asyncio.sleep(rng.uniform(0.5, 1.5) * a.interval)
            i = drop % len(conns)
            old = conns[i]
            cut_at = time.perf_counter()
            self._cut(old)
            new = Conn(await self._connect(a.resume_url))
            new.reader = asyncio.create_task(self._read(new))
            lines = []
            for st in old.streams.values():
                st.cut_at, st.resumed = cut_at, False
                new.streams[st.rid] = st
                # The last chunks were in flight when the connection died: lost, so replayed.
                st.last = max(-1, st.last - a.lost)
                resume: dict[str, Any] = {"type": "resume", "request_id": st.rid, "epoch": st.epoch}
                if st.last >= 0:
                    resume["after_seq"] = st.last
                lines.append(orjson.dumps(resume))
            await new.ws.send(b"\n".join(lines).decode())
            conns[i] = new
        await self._wait(lambda: all(s.cut_at is None for c in conns for s in c.streams.values()))
        for conn in conns:
            await conn.ws.send(b"\n".join(
                orjson.dumps({"type": "cancel", "request_id": rid}) for rid in conn.streams
            ).decode())  # fmt: skip
            await conn.ws.close()

    async def detached_memory(self) -> dict[str, Any]:
        a = self.a
        per_conn = 50
        n_conns = max(1, a.detach // per_conn)
        # Warm-up and baseline: the same streams, plain, cancelled with their connections.
        plain = [await self._open(per_conn, resumable=False) for _ in range(n_conns)]
        await self._wait(lambda: all(s.last >= 0 for c in plain for s in c.streams.values()))
        for conn in plain:
            await conn.ws.close()
        await asyncio.sleep(1.0)  # the cancelled pipelines halt (a bench pause, not a sync)
        base = rss_bytes(a.server_pid) / 1024
        kept = [await self._open(per_conn, resumable=True) for _ in range(n_conns)]
        await self._wait(lambda: all(s.last >= 0 for c in kept for s in c.streams.values()))
        for conn in kept:
            self._cut(conn)
        await asyncio.sleep(1.0)  # the gateway sees the cuts and detaches
        detached = rss_bytes(a.server_pid) / 1024
        count = n_conns * per_conn
        return {
            "detached": count,
            "rss_base_mib": round(base / 1024, 1),
            "rss_detached_mib": round(detached / 1024, 1),
            "kib_per_detached_request": round((detached - base) / count, 2),
        }

    async def run(self) -> dict[str, Any]:
        await self.reconnects()
        memory = await self.detached_memory() if self.a.detach else {}
        return {
            "conns": self.a.conns,
            "streams_per_conn": self.a.streams,
            "token_delay_ms": self.a.token_delay_ms,
            "drops": self.a.drops,
            "lost_per_cut_stream": self.a.lost,
            "resumed_streams": len(self.to_result),
            "cut_to_resume_result": _summary_ms(self.to_result),
            "cut_to_first_chunk": _summary_ms(self.to_chunk),
            "gaps": self.gaps,
            "repeats": self.repeats,
            "not_found": self.not_found,
            "errors": sorted(set(self.errors)),
            "memory": memory,
        }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--server-pid", type=int, required=True)
    p.add_argument("--conns", type=int, default=4)
    p.add_argument("--streams", type=int, default=50)
    p.add_argument("--token-delay-ms", type=int, default=50)
    p.add_argument("--drops", type=int, default=40)
    p.add_argument("--interval", type=float, default=0.2, help="mean seconds between cuts")
    p.add_argument("--lost", type=int, default=3, help="chunks lost in flight per cut stream")
    p.add_argument("--detach", type=int, default=2000)
    p.add_argument("--seed", type=int, default=16)
    p.add_argument("--resume-url", help="resume on this node instead (a cluster's other node)")
    a = p.parse_args()
    try:
        import uvloop

        result = uvloop.run(ResumeLoad(a).run())
    except ImportError:  # pragma: no cover
        result = asyncio.run(ResumeLoad(a).run())
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
