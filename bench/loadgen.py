"""Load generator for the muxgate benchmarks: ``websockets`` clients on uvloop (when installed,
else asyncio), in its own process.

    python bench/loadgen.py throughput  --url WS --codec json --conns 8 --streams 16 ...
    python bench/loadgen.py cancel      --url WS --conns 10 --streams 1000 --via frame ...
    python bench/loadgen.py connections --url WS --count 2500   (driven over stdin, see below)
    python bench/loadgen.py http-canceller --base http://127.0.0.1:PORT [--keep-alive]
                                           (spawned by `cancel --via http [--keep-alive]`)

The load generator is the measuring instrument: every millisecond its own loop is late is
counted as server latency, so it runs on the faster loop (measured under the cancel load:
client CPU 0.39-0.47 -> 0.29 of a core, client-observed p99 2.3-3.1 -> 1.4-1.9 ms for the
same server). Every server is measured with the same load generator.

Each mode prints one JSON object on stdout (``connections`` prints one per stage). ``bench/run.py``
starts the servers and these processes and assembles the results; nothing here asserts a speed.

Counting is cheap on purpose: in ``throughput`` a frame's chunks are counted by occurrences of
the chunk marker (``"type":"chunk"``, or its msgpack bytes) without decoding, so the client
spends its CPU on receiving, not parsing; correctness is checked once per run on a sample that
is fully decoded (seq contiguous, chunks join to ``content``, marker count == decoded count).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import random
import resource
import select
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack
import orjson
from procstat import busy_cpu_seconds, cpu_seconds, raise_nofile
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

import protocol
from protocol import Cancel, Chat, Chunk, Codec, Ping, RemoteProtocolError, Response, Sender

monotonic = time.monotonic  # CLOCK_MONOTONIC: comparable across processes on one machine

MARKS = {
    Codec.JSON: (b'"type":"chunk"', b'"type":"response"'),
    Codec.MSGPACK: (b"\xa4type\xa5chunk", b"\xa4type\xa8response"),
}


def _subprotocol(codec: Codec) -> str:
    return "muxgate.v1.json" if codec is Codec.JSON else "muxgate.v1.msgpack"


async def _connect(url: str, codec: Codec, **kw: Any) -> ClientConnection:
    return await connect(
        url,
        subprotocols=[_subprotocol(codec)],  # type: ignore[list-item]
        compression=None,
        max_size=1 << 24,
        **kw,
    )


def _meta(tokens: int, delay_ms: int) -> dict[str, int]:
    return {"tokens": tokens, "token_delay_ms": delay_ms, "plan_ms": 0, "tool_ms": 0}


def _chat(rid: str, meta: dict[str, int], codec: Codec) -> bytes:
    return protocol.encode(
        Chat(request_id=rid, message="Benchmark the gateway", metadata=meta), codec
    )


def _emit(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _summary_ms(values: list[float]) -> dict[str, Any]:
    ms = [v * 1000 for v in values]
    return {
        "count": len(ms),
        "p50_ms": _pct(ms, 0.50),
        "p90_ms": _pct(ms, 0.90),
        "p99_ms": _pct(ms, 0.99),
        "max_ms": max(ms) if ms else None,
        "mean_ms": sum(ms) / len(ms) if ms else None,
    }


async def http_get(base: str, path: str) -> bytes:
    """A minimal HTTP/1.1 GET on a fresh connection (``base``: http://host:port); the body."""
    host, _, port = base.removeprefix("http://").rstrip("/").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    length = None
    await reader.readline()
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await (reader.readexactly(length) if length is not None else reader.read())
    writer.close()
    return body


def parse_metrics(text: bytes) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value} (samples only)."""
    out: dict[str, float] = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def histogram_delta(m0: dict[str, float], m1: dict[str, float], name: str) -> dict[str, Any]:
    """Count, mean and bucket-bound quantiles of a Prometheus histogram between two scrapes."""
    prefix = name + '_bucket{le="'
    buckets = []
    for key, v1 in m1.items():
        if key.startswith(prefix):
            le = key[len(prefix) : -2]
            buckets.append((float(le), v1 - m0.get(key, 0.0)))
    buckets.sort()
    count = m1.get(name + "_count", 0.0) - m0.get(name + "_count", 0.0)
    total = m1.get(name + "_sum", 0.0) - m0.get(name + "_sum", 0.0)

    def bound(q: float) -> float | None:
        for le, n in buckets:
            if n >= q * count:
                return le * 1000
        return None

    return {
        "count": int(count),
        "mean_ms": total / count * 1000 if count else None,
        "p50_le_ms": bound(0.5) if count else None,
        "p99_le_ms": bound(0.99) if count else None,
        "buckets_ms": {f"{le * 1000:g}": int(n) for le, n in buckets},
    }


def _responses(frame: bytes, codec: Codec) -> list[dict[str, Any]]:
    """The ``response`` messages of a frame (decoded only when the frame holds one)."""
    out = []
    if codec is Codec.JSON:
        for line in frame.split(b"\n"):
            if b'"type":"response"' in line:
                out.append(orjson.loads(line))
    else:
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(frame)
        out = [m for m in unpacker if isinstance(m, dict) and m.get("type") == "response"]
    return out


# -- verification on a sample --------------------------------------------------------------------


async def verify_sample(
    url: str, codec: Codec, streams: int = 4, tokens: int = 300
) -> dict[str, Any]:
    """Fully decode a small run: seq contiguous from 0 (G3), chunks join to ``content``, nothing
    after the response (G1), and the cheap marker count equals the decoded chunk count."""
    chunk_mark = MARKS[codec][0]
    errors: list[str] = []
    texts: dict[str, list[str]] = {}
    done: set[str] = set()
    cheap = decoded = 0
    chunk_bytes = 0
    async with await _connect(url, codec) as ws:
        for i in range(streams):
            rid = f"verify-{i}"
            texts[rid] = []
            await ws.send(_chat(rid, _meta(tokens, 0), codec), text=codec.is_text)
        try:
            async with asyncio.timeout(20):
                while len(done) < streams:
                    frame = await ws.recv(decode=False)
                    assert isinstance(frame, bytes)
                    cheap += frame.count(chunk_mark)
                    data: str | bytes = frame.decode() if codec.is_text else frame
                    for m in protocol.decode(data, codec, Sender.GATEWAY):
                        if isinstance(m, RemoteProtocolError):
                            errors.append(f"undecodable message: {m.code}")
                        elif isinstance(m, Chunk):
                            decoded += 1
                            chunk_bytes += len(protocol.encode(m, codec))
                            parts = texts.get(m.request_id)
                            if parts is None or m.request_id in done:
                                errors.append(f"chunk for {m.request_id} after its response")
                            elif m.seq != len(parts):
                                errors.append(f"{m.request_id}: seq {m.seq}, want {len(parts)}")
                            else:
                                parts.append(m.text)
                        elif isinstance(m, Response):
                            if m.status != "completed":
                                errors.append(f"{m.request_id}: status {m.status}")
                            elif m.content != "".join(texts.get(m.request_id, ())):
                                errors.append(f"{m.request_id}: content != joined chunks")
                            done.add(m.request_id)
        except TimeoutError:
            errors.append(f"timeout: {len(done)}/{streams} responses")
    if cheap != decoded:
        errors.append(f"marker count {cheap} != decoded chunks {decoded}")
    return {
        "ok": not errors,
        "requests": len(done),
        "chunks": decoded,
        "tokens": streams * tokens,
        "marker_count": cheap,
        "mean_chunk_message_bytes": round(chunk_bytes / decoded, 1) if decoded else None,
        "errors": errors[:10],
    }


# -- throughput ----------------------------------------------------------------------------------


@dataclass
class Counters:
    chunks: int = 0
    frames: int = 0
    spaces: int = 0  # ~ tokens: each token has one leading space (response content subtracted)
    responses: int = 0
    not_completed: int = 0
    errors: list[str] = field(default_factory=list)

    def snapshot(self) -> tuple[int, int, int, int]:
        return self.chunks, self.frames, self.spaces, self.responses


async def _tp_reader(
    ws: ClientConnection, idx: int, codec: Codec, a: argparse.Namespace, c: Counters
) -> None:
    text = codec.is_text
    chunk_mark, resp_mark = MARKS[codec]
    meta = _meta(a.tokens, 0)
    serial = 0

    async def new_chat() -> None:
        nonlocal serial
        serial += 1
        await ws.send(_chat(f"c{idx}-{serial}", meta, codec), text=text)

    for _ in range(a.streams):
        await new_chat()
    recv = ws.recv
    try:
        while True:
            frame = await recv(decode=False)
            c.frames += 1
            c.chunks += frame.count(chunk_mark)
            c.spaces += frame.count(b" ")
            if resp_mark in frame:
                for r in _responses(frame, codec):  # type: ignore[arg-type]
                    c.responses += 1
                    c.spaces -= r.get("content", "").count(" ")
                    if r.get("status") != "completed":
                        c.not_completed += 1
                    await new_chat()
    except ConnectionClosed:
        pass
    except Exception as exc:  # counted, not hidden: a dead reader would skew the figures
        c.errors.append(repr(exc))


async def run_throughput(a: argparse.Namespace) -> dict[str, Any]:
    codec = Codec.JSON if a.codec == "json" else Codec.MSGPACK
    verify = await verify_sample(a.url, codec) if a.verify else None
    conns = [await _connect(a.url, codec) for _ in range(a.conns)]
    c = Counters()
    readers = [asyncio.create_task(_tp_reader(ws, i, codec, a, c)) for i, ws in enumerate(conns)]
    await asyncio.sleep(a.warmup)
    s0, cpu0, ru0, t0 = c.snapshot(), cpu_seconds(a.server_pid), resource.getrusage(0), monotonic()
    busy0 = busy_cpu_seconds()
    await asyncio.sleep(a.duration)
    s1, cpu1, ru1, t1 = c.snapshot(), cpu_seconds(a.server_pid), resource.getrusage(0), monotonic()
    busy1 = busy_cpu_seconds()
    for t in readers:
        t.cancel()
    for ws in conns:
        ws.transport.abort()
    elapsed = t1 - t0
    chunks, frames, spaces, responses = (b - x for b, x in zip(s1, s0, strict=True))
    server_cpu = cpu1 - cpu0
    client_cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    return {
        "codec": a.codec,
        "conns": a.conns,
        "streams_per_conn": a.streams,
        "seconds": round(elapsed, 3),
        "chunks": chunks,
        "frames": frames,
        "chunks_per_s": round(chunks / elapsed),
        "chunks_per_frame": round(chunks / frames, 2) if frames else None,
        "tokens_per_chunk": round(spaces / chunks, 3) if chunks else None,
        "responses": responses,
        "not_completed": c.not_completed,
        "reader_errors": c.errors[:5],
        "server_cpu_s": round(server_cpu, 3),
        "server_cpu_util": round(server_cpu / elapsed, 3),
        "server_cpu_s_per_million_chunks": round(server_cpu / chunks * 1e6, 2) if chunks else None,
        "chunks_per_server_cpu_s": round(chunks / server_cpu) if server_cpu > 0 else None,
        "client_cpu_util": round(client_cpu / elapsed, 3),
        # Everything else on the machine (kernel networking included): high means interference.
        "rest_of_machine_cpu_util": round((busy1 - busy0 - server_cpu - client_cpu) / elapsed, 3),
        "verify": verify,
    }


# -- cancel under load ---------------------------------------------------------------------------

PENDING, STREAMING, CANCEL_SENT, DONE = range(4)
CHUNK_PREFIX = b'{"type":"chunk","request_id":"'  # compact JSON, protocol field order
PREFIX_LEN = len(CHUNK_PREFIX)


@dataclass(eq=False)
class _Stream:
    rid: str
    conn: _Conn
    state: int = PENDING
    idx: int = -1
    cancel_at: float = 0.0
    between: int = 0
    after: int = 0
    post_cancel: list[float] = field(default_factory=list)


@dataclass(eq=False)
class _Conn:
    ws: ClientConnection
    idx: int
    serial: int = 0


class CancelRun:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.meta = _meta(a.tokens, a.token_delay_ms)
        self.streams: dict[bytes, _Stream] = {}
        self.candidates: list[_Stream] = []
        self.latencies: dict[str, float] = {}  # rid -> seconds (frame mode)
        self.terminal_at: dict[str, float] = {}
        self.cancelled: list[_Stream] = []
        self.chunks = 0
        self.frames = 0
        self.after_terminal = 0
        self.unexpected: dict[str, int] = {}
        self.cancel_results: dict[str, int] = {}
        self.skipped = 0
        self.rng = random.Random(a.seed)
        self.replenish = True
        self.pings: dict[int, float] = {}
        self.ping_rtts: list[float] = []
        self.lags: list[float] = []

    def _cand_add(self, st: _Stream) -> None:
        st.idx = len(self.candidates)
        self.candidates.append(st)

    def _cand_remove(self, st: _Stream) -> None:
        last = self.candidates.pop()
        if last is not st:
            self.candidates[st.idx] = last
            last.idx = st.idx
        st.idx = -1

    async def start_stream(self, conn: _Conn) -> None:
        conn.serial += 1
        rid = f"k{conn.idx}-{conn.serial}"
        self.streams[rid.encode()] = _Stream(rid, conn)
        await conn.ws.send(_chat(rid, self.meta, Codec.JSON), text=True)

    def _unexpected(self, what: str) -> None:
        self.unexpected[what] = self.unexpected.get(what, 0) + 1

    async def reader(self, conn: _Conn) -> None:
        try:
            await self._read(conn)
        except ConnectionClosed:
            pass
        except Exception as exc:  # counted, not hidden: a dead reader would skew the figures
            self._unexpected(f"reader crashed: {exc!r}")

    async def _read(self, conn: _Conn) -> None:
        streams = self.streams
        loads = orjson.loads
        while True:
            frame = await conn.ws.recv(decode=False)
            now = monotonic()
            self.frames += 1
            for line in frame.split(b"\n"):  # type: ignore[union-attr]
                if not line:
                    continue
                # Chunks (nearly all lines) are attributed by slicing out the request id,
                # without decoding: the client's CPU and loop lag stay low.
                if line.startswith(CHUNK_PREFIX):
                    kind, rid = "chunk", line[PREFIX_LEN : line.find(b'"', PREFIX_LEN)]
                else:
                    m = loads(line)
                    kind, rid = m["type"], m.get("request_id", "").encode()
                if kind == "chunk":
                    self.chunks += 1
                    st = streams.get(rid)
                    if st is None:
                        self._unexpected("chunk for unknown request")
                    elif st.state == STREAMING:
                        pass
                    elif st.state == PENDING:
                        st.state = STREAMING
                        self._cand_add(st)
                    elif st.state == CANCEL_SENT:
                        st.between += 1
                        st.post_cancel.append(now)
                    else:
                        st.after += 1
                        self.after_terminal += 1
                elif kind == "response":
                    st = streams.get(rid)
                    if st is None:
                        self._unexpected("response for unknown request")
                        continue
                    if st.state == CANCEL_SENT:
                        self.terminal_at[st.rid] = now
                        self.latencies[st.rid] = now - st.cancel_at
                    else:
                        self._unexpected(f"response {m['status']} without our cancel")
                        if st.state == STREAMING:
                            self._cand_remove(st)
                    if m["status"] != "cancelled":
                        self._unexpected(f"response status {m['status']}")
                    st.state = DONE
                    if self.replenish:
                        await self.start_stream(conn)
                elif kind == "pong":
                    sent = self.pings.pop(m.get("id"), None)
                    if sent is not None:
                        self.ping_rtts.append(now - sent)
                elif kind == "cancel_result":
                    status = m["status"]
                    self.cancel_results[status] = self.cancel_results.get(status, 0) + 1
                elif kind == "error":
                    self._unexpected(f"error {m['code']}")

    async def lag_monitor(self) -> None:
        """The load generator's own event-loop lag: how late a 1 ms sleep wakes up."""
        while True:
            t = monotonic()
            await asyncio.sleep(0.001)
            self.lags.append(monotonic() - t - 0.001)

    async def pinger(self, conns: list[_Conn], end: float) -> None:
        """An application ``ping`` every ``interval``, half an interval after each cancel: its
        round trip is how fast the server answers any control message under this load."""
        interval = self.a.interval_ms / 1000
        await asyncio.sleep(interval / 2)
        n = 0
        next_t = monotonic()
        while next_t + interval < end:
            next_t += interval
            delay = next_t - monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            n += 1
            self.pings[n] = monotonic()
            await conns[n % len(conns)].ws.send(protocol.encode(Ping(id=n), Codec.JSON), text=True)

    async def run(self) -> dict[str, Any]:
        a = self.a
        conns = [_Conn(await _connect(a.url, Codec.JSON), i) for i in range(a.conns)]
        readers = [asyncio.create_task(self.reader(c)) for c in conns]
        canceller = None
        if a.via == "http":
            canceller = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "http-canceller",
                "--base",
                a.http_base,
                *(["--keep-alive"] if a.keep_alive else []),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            assert canceller.stdout is not None
            await canceller.stdout.readline()  # "ready"
        # Ramp up over ~1 s so the streams' token timers are spread over the token period.
        ramp = max(a.ramp, 0.001)
        t_ramp = monotonic()
        for i in range(a.streams):
            await self.start_stream(conns[i % len(conns)])
            lag = t_ramp + ramp * (i + 1) / a.streams - monotonic()
            if lag > 0:
                await asyncio.sleep(lag)
        await asyncio.sleep(a.settle)
        streaming_at_start = len(self.candidates)
        # The load generator is the measuring instrument: its own collector pauses would be
        # counted as server latency. It creates little cyclic garbage in a run of seconds, so
        # the collector is off during the measured window (the same for every server measured).
        gc.collect()
        gc.freeze()
        gc.disable()
        metrics0 = parse_metrics(await http_get(a.metrics, "/metrics")) if a.metrics else None
        cpu0, t0, ru0 = cpu_seconds(a.server_pid), monotonic(), resource.getrusage(0)
        busy0 = busy_cpu_seconds()
        chunks0, frames0 = self.chunks, self.frames
        interval = a.interval_ms / 1000
        end = t0 + a.duration
        lag_task = asyncio.create_task(self.lag_monitor())
        ping_task = asyncio.create_task(self.pinger(conns, end)) if a.ping else None
        cancels = 0
        for i in range(1, round(a.duration / interval) + 1):
            next_t = t0 + i * interval
            delay = next_t - monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if not self.candidates:
                self.skipped += 1
                continue
            st = self.candidates[self.rng.randrange(len(self.candidates))]
            self._cand_remove(st)
            st.state = CANCEL_SENT
            st.cancel_at = monotonic()
            self.cancelled.append(st)
            cancels += 1
            if canceller is not None:
                assert canceller.stdin is not None
                canceller.stdin.write(st.rid.encode() + b"\n")
            else:
                await st.conn.ws.send(
                    protocol.encode(Cancel(request_id=st.rid), Codec.JSON), text=True
                )
        cpu1, t1, ru1 = cpu_seconds(a.server_pid), monotonic(), resource.getrusage(0)
        busy1 = busy_cpu_seconds()
        lag_task.cancel()
        if ping_task is not None:
            ping_task.cancel()
        client_cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
        window_chunks, window_frames = self.chunks - chunks0, self.frames - frames0
        active_at_end = sum(1 for s in self.streams.values() if s.state in (PENDING, STREAMING))
        await asyncio.sleep(a.drain)  # late terminals, and any chunk that would follow them
        gc.enable()
        self.replenish = False
        server_side = None
        if a.metrics:
            metrics1 = parse_metrics(await http_get(a.metrics, "/metrics"))
            assert metrics0 is not None
            server_side = histogram_delta(metrics0, metrics1, "muxgate_cancel_latency_seconds")
        http: dict[str, Any] | None = None
        latencies: list[float]
        between: list[int]
        if canceller is not None:
            assert canceller.stdin is not None
            assert canceller.stdout is not None
            canceller.stdin.close()
            out = (await canceller.stdout.read()).splitlines()
            await canceller.wait()
            sent = {
                rid: (t_sent, t_done, status) for rid, t_sent, t_done, status in json.loads(out[-1])
            }
            latencies, between, rtts = [], [], []
            statuses: dict[str, int] = {}
            for st in self.cancelled:
                t_sent, t_done, status = sent.get(st.rid, (None, None, None))
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                if t_sent is None:
                    continue
                rtts.append(t_done - t_sent)
                between.append(sum(1 for t in st.post_cancel if t >= t_sent))
                if st.rid in self.terminal_at:
                    latencies.append(self.terminal_at[st.rid] - t_sent)
            http = {
                "http_status": statuses,
                "http_round_trip": _summary_ms(rtts),
                "keep_alive": a.keep_alive,
                # TCP connections the canceller opened: one per DELETE, or (keep-alive) one
                # plus a new one each time the gateway had closed it.
                "connections_opened": json.loads(out[-2])["connections"],
            }
        else:
            latencies = [self.latencies[s.rid] for s in self.cancelled if s.rid in self.latencies]
            between = [s.between for s in self.cancelled]
        for t in readers:
            t.cancel()
        for c in conns:
            c.ws.transport.abort()
        missing = sum(1 for s in self.cancelled if s.rid not in self.terminal_at)
        return {
            "via": a.via,
            "keep_alive": a.via == "http" and a.keep_alive,
            "conns": a.conns,
            "streams": a.streams,
            "token_delay_ms": a.token_delay_ms,
            "interval_ms": a.interval_ms,
            "seconds": round(t1 - t0, 3),
            "streaming_at_start": streaming_at_start,
            "active_at_end": active_at_end,
            "cancels": cancels,
            "skipped_no_candidate": self.skipped,
            "terminal_missing": missing,
            "latency": _summary_ms(latencies),
            "chunks_after_terminal": self.after_terminal,
            "chunks_between_cancel_and_terminal": {
                "total": sum(between),
                "mean": round(sum(between) / len(between), 3) if between else None,
                "max": max(between) if between else None,
                "cancels_with_any": sum(1 for b in between if b),
            },
            "chunks_received": self.chunks,
            "server_cpu_util": round((cpu1 - cpu0) / (t1 - t0), 3),
            "chunks_per_s": round(window_chunks / (t1 - t0)),
            "chunks_per_frame": round(window_chunks / window_frames, 2) if window_frames else None,
            "server_cpu_us_per_chunk": round((cpu1 - cpu0) / window_chunks * 1e6, 2)
            if window_chunks
            else None,
            "client_cpu_util": round(client_cpu / (t1 - t0), 3),
            # Everything else (kernel networking, the HTTP canceller, other processes).
            "rest_of_machine_cpu_util": round(
                (busy1 - busy0 - (cpu1 - cpu0) - client_cpu) / (t1 - t0), 3
            ),
            "client_loop_lag": _summary_ms(self.lags),
            "ping_rtt": _summary_ms(self.ping_rtts),
            "gateway_cancel_latency_read_to_written": server_side,
            "cancel_results": self.cancel_results,
            "unexpected": self.unexpected,
            "http": http,
            "latencies_ms": [round(x * 1000, 4) for x in latencies],
        }


def http_canceller(a: argparse.Namespace) -> None:
    """Reads request ids on stdin; for each, ``DELETE /v1/requests/{id}``; on EOF prints
    ``{"connections": n}`` (TCP connections opened) and then ``[[rid, t_sent, t_done, status],
    ...]``, one line each.

    Without ``--keep-alive``, each ``DELETE`` on a new connection (as ``curl`` would); with it,
    every ``DELETE`` on one persistent HTTP/1.1 connection (as ``requests.Session`` or
    ``httpx.Client`` would), opened before ``ready``. A connection the server closed (the
    gateway closes one idle for 10 s; or a ``Connection: close`` answer) is replaced: checked
    before reuse, and should a request still fail on a reused connection before any byte of
    its answer, it is sent once more on a new one (``t_sent`` stays the first attempt's).

    Plain blocking sockets, one cancel at a time (one per 10 ms is the load): the instrument
    adds no event loop of its own between deciding to cancel and the request's bytes leaving.
    """
    base = a.base.removeprefix("http://").rstrip("/")
    host, _, port = base.partition(":")
    address = (host, int(port))
    results: list[tuple[str, float, float, int]] = []
    client = _KeepAliveClient(address) if a.keep_alive else None
    connections = 0
    if client is not None:
        with contextlib.suppress(OSError):
            client.connect()
    _emit("ready")
    while line := sys.stdin.buffer.readline():
        rid = line.strip().decode()
        request = (
            f"DELETE /v1/requests/{rid} HTTP/1.1\r\nHost: {base}\r\n"
            "User-Agent: muxgate-bench\r\nAccept: */*\r\n\r\n".encode()
        )
        t_sent = monotonic()
        status = -1
        try:
            if client is not None:
                status = client.request(request)
            else:
                connections += 1
                with socket.create_connection(address) as sock:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.sendall(request)
                    status = _read_http_status(sock)
        except (OSError, ValueError, IndexError):
            if client is not None:
                client.close()
        results.append((rid, t_sent, monotonic(), status))
    if client is not None:
        connections = client.connections
        client.close()
    _emit({"connections": connections})
    _emit(results)


class _KeepAliveClient:
    """One persistent HTTP/1.1 connection on a plain blocking socket, one request at a time;
    replaced when the server has closed it (see :func:`http_canceller`)."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.sock: socket.socket | None = None
        self.connections = 0  # opened, the first one included

    def connect(self) -> socket.socket:
        self.close()
        sock = socket.create_connection(self.address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.connections += 1
        return sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _reusable(self) -> bool:
        """Open and silent: between answers (each read whole) an open connection has nothing
        to read; one the server closed reads as EOF or an error, and unsolicited bytes would
        put it out of step: in all three cases, not reusable."""
        if self.sock is None:
            return False
        if not select.select([self.sock], [], [], 0)[0]:  # one poll, no wait
            return True
        self.close()
        return False

    def request(self, data: bytes) -> int:
        """Send ``data`` (one whole request) and read the whole answer; its status code."""
        reused = self._reusable()
        sock = self.sock if reused else self.connect()
        assert sock is not None
        try:
            status, keep = self._exchange(sock, data)
        except _NothingReceived:
            if not reused:
                raise
            # The server closed it between the check and the request: once more, on a new one.
            status, keep = self._exchange(self.connect(), data)
        if not keep:
            self.close()
        return status

    @staticmethod
    def _exchange(sock: socket.socket, data: bytes) -> tuple[int, bool]:
        """Send, then read one whole answer (headers, then Content-Length bytes): its status,
        and whether the connection stays usable. :class:`_NothingReceived` when the connection
        failed before any byte of the answer (the request may be sent again)."""
        try:
            sock.sendall(data)
            answer = sock.recv(65536)
        except OSError as exc:
            raise _NothingReceived from exc
        if not answer:
            raise _NothingReceived
        while b"\r\n\r\n" not in answer:
            more = sock.recv(65536)
            if not more:
                raise ValueError("connection closed before the headers ended")
            answer += more
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length, keep = 0, True
        for header in lines[1:]:
            name, _, value = header.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and b"close" in value.lower():
                keep = False
        while len(body) < length:
            more = sock.recv(65536)
            if not more:
                raise ValueError("connection closed in the body")
            body += more
        return int(lines[0].split()[1]), keep and len(body) == length


class _NothingReceived(ConnectionError):
    """The connection failed before any byte of the answer."""


def _read_http_status(sock: socket.socket) -> int:
    """Read one whole HTTP response (headers, then Content-Length bytes); its status code."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            raise ValueError("connection closed before the headers ended")
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = 0
    for header in lines[1:]:
        name, _, value = header.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        more = sock.recv(65536)
        if not more:
            break
        body += more
    return int(lines[0].split()[1])


# -- connections and memory ----------------------------------------------------------------------


async def run_connections(a: argparse.Namespace) -> None:
    """Stages driven by stdin lines from bench/run.py: ``connect``, ``chat``, ``close``.

    connect: open ``count`` connections (``concurrency`` handshakes at a time), each sending a
    ``ping`` and waiting for its ``pong`` (so the gateway has authenticated it and sent
    ``welcome``); chat: start one slow stream per connection (chat + ping, wait for the pong:
    the chat was accepted, else an ``error`` would have come first); close: abort them all.
    """
    nofile = raise_nofile()
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    conns: list[ClientConnection] = []
    ping = protocol.encode(Ping(id=1), Codec.JSON)
    meta = _meta(a.tokens, a.token_delay_ms)
    _emit({"event": "ready", "nofile": list(nofile)})

    async def until_pong(ws: ClientConnection) -> bool:
        while True:
            frame = await ws.recv(decode=False)
            if b'"type":"error"' in frame:  # type: ignore[operator]
                return False
            if b'"type":"pong"' in frame:  # type: ignore[operator]
                return True

    sem = asyncio.Semaphore(a.concurrency)
    while cmd := (await stdin.readline()).strip().decode():
        t0 = monotonic()
        ok = failed = 0
        first_error = None
        if cmd == "connect":

            async def one() -> None:
                nonlocal ok, failed, first_error
                async with sem:
                    try:
                        ws = await _connect(
                            a.url, Codec.JSON, open_timeout=120, ping_interval=None, max_queue=64
                        )
                        await ws.send(ping, text=True)
                        await until_pong(ws)
                        conns.append(ws)
                        ok += 1
                    except Exception as exc:
                        failed += 1
                        first_error = first_error or repr(exc)

            await asyncio.gather(*(one() for _ in range(a.count)))
        elif cmd == "chat":

            async def chat(i: int, ws: ClientConnection) -> None:
                nonlocal ok, failed, first_error
                async with sem:
                    try:
                        await ws.send(_chat(f"slow-{a.tag}-{i}", meta, Codec.JSON), text=True)
                        await ws.send(ping, text=True)
                        if await until_pong(ws):
                            ok += 1
                        else:
                            failed += 1
                            first_error = first_error or "error message"
                    except Exception as exc:
                        failed += 1
                        first_error = first_error or repr(exc)

            await asyncio.gather(*(chat(i, ws) for i, ws in enumerate(conns)))
        elif cmd == "close":
            for ws in conns:
                ws.transport.abort()
            conns.clear()
            _emit({"event": "closed"})
            return
        _emit({"event": cmd, "t0": t0, "t1": monotonic(), "ok": ok, "failed": failed,
               "first_error": first_error})  # fmt: skip


# -- one normal client (the "attack" scenario) ------------------------------------------------


class NormalClient:
    """One well-behaved, authenticated client, while ``bench/attacks.py`` attacks the gateway.

    A cycle every ``interval``: a streaming chat, a ``cancel`` after its first chunk (latency:
    from sending the cancel to reading that request's ``response``), then a ``ping`` (its round
    trip). One cycle at a time, so a gateway that stalls for seconds shows as one long latency,
    not as a backlog. Every wait has a timeout (``op_timeout``, and never past the end plus a
    grace): an unanswered cancel or ping is counted, not waited for. A connection the gateway
    closes or refuses (1013 at its connection limit) is reopened after a pause.
    """

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.headers = {"X-Muxi-Client-Key": a.client_key} if a.client_key else None
        self.meta = _meta(a.tokens, a.token_delay_ms)
        self.waiters: dict[tuple[str, str], asyncio.Future[Any]] = {}
        self.connect_attempts = 0
        self.connect_failed: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        self.closes: dict[str, int] = {}
        self.admitted_after: float | None = None
        self.cycles = 0
        self.latencies: list[float] = []
        self.first_chunk: list[float] = []
        self.first_chunk_timeouts = 0
        self.cancel_unanswered = 0
        self.statuses: dict[str, int] = {}
        self.pings_sent = 0
        self.ping_rtts: list[float] = []
        self.errors: dict[str, int] = {}
        self.serial = 0
        self.t_start = 0.0
        self.hard_end = 0.0

    @staticmethod
    def _bump(counts: dict[str, int], key: str) -> None:
        counts[key] = counts.get(key, 0) + 1

    def _wait_s(self) -> float:
        return max(0.01, min(self.a.op_timeout, self.hard_end - monotonic()))

    def _expect(self, kind: str, key: str) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiters[(kind, key)] = fut
        return fut

    def _settle(self, kind: str, key: str, value: object) -> None:
        fut = self.waiters.pop((kind, key), None)
        if fut is not None and not fut.done():
            fut.set_result(value)

    async def _reader(self, ws: ClientConnection) -> None:
        try:
            while True:
                frame = await ws.recv(decode=False)
                now = monotonic()
                for line in frame.split(b"\n"):  # type: ignore[union-attr]
                    if not line:
                        continue
                    m = orjson.loads(line)
                    kind = m.get("type")
                    rid = str(m.get("request_id"))
                    if kind == "chunk":
                        self._settle("chunk", rid, now)
                    elif kind == "response":
                        self._settle("response", rid, (now, str(m.get("status"))))
                    elif kind == "pong":
                        self._settle("pong", str(m.get("id")), now)
                    elif kind == "error":
                        code = str(m.get("code"))
                        self._bump(self.errors, code)
                        if m.get("request_id") is not None:
                            self._settle("response", rid, (now, f"error {code}"))
        finally:
            for fut in self.waiters.values():  # the connection ended: nothing will come
                if not fut.done():
                    fut.set_exception(ConnectionError("connection closed"))
                    fut.exception()  # retrieved: a waiter that never came logs nothing
            self.waiters.clear()

    async def _send(self, ws: ClientConnection, data: bytes) -> None:
        await asyncio.wait_for(ws.send(data, text=True), self._wait_s())

    async def _open(self) -> tuple[ClientConnection, asyncio.Task[None]] | None:
        """A connection the gateway admitted (a ``ping`` answered), or None (refused, failed)."""
        self.connect_attempts += 1
        try:
            ws = await _connect(
                self.a.url,
                Codec.JSON,
                additional_headers=self.headers,
                open_timeout=self._wait_s(),
                ping_interval=None,
                close_timeout=1,
            )
        except Exception as exc:
            why = type(exc).__name__
            if isinstance(exc, TimeoutError):
                why = "handshake timeout"
            self._bump(self.connect_failed, why)
            return None
        reader = asyncio.create_task(self._reader(ws))
        pong = self._expect("pong", "admit")
        try:
            await self._send(ws, b'{"type":"ping","id":"admit"}')
            await asyncio.wait_for(pong, self._wait_s())
        except Exception as exc:
            code = ws.close_code
            if code is not None:
                why = str(code)
            elif isinstance(exc, TimeoutError):
                why = f"no pong in {self.a.op_timeout:g} s"
            else:
                why = type(exc).__name__
            self._bump(self.refused, why)
            ws.transport.abort()
            reader.cancel()
            return None
        if self.admitted_after is None:
            self.admitted_after = monotonic() - self.t_start
        return ws, reader

    async def _cycle(self, ws: ClientConnection) -> None:
        self.serial += 1
        self.cycles += 1
        rid = f"n-{self.serial}"
        chunk, response = self._expect("chunk", rid), self._expect("response", rid)
        await self._send(ws, _chat(rid, self.meta, Codec.JSON))
        t_chat = monotonic()
        try:
            self.first_chunk.append(await asyncio.wait_for(chunk, self._wait_s()) - t_chat)
        except TimeoutError:
            self.first_chunk_timeouts += 1  # cancelled all the same
        if response.done():  # refused (an error for the chat) or already over
            self._bump(self.statuses, response.result()[1])
            return
        t_cancel = monotonic()
        await self._send(ws, protocol.encode(Cancel(request_id=rid), Codec.JSON))
        try:
            t_done, status = await asyncio.wait_for(response, self._wait_s())
        except TimeoutError:
            self.cancel_unanswered += 1
            self.waiters.pop(("response", rid), None)
        else:
            self.latencies.append(t_done - t_cancel)
            self._bump(self.statuses, status)
        self.pings_sent += 1
        pong = self._expect("pong", str(self.serial))
        t_ping = monotonic()
        await self._send(ws, protocol.encode(Ping(id=self.serial), Codec.JSON))
        try:
            self.ping_rtts.append(await asyncio.wait_for(pong, self._wait_s()) - t_ping)
        except TimeoutError:
            self.waiters.pop(("pong", str(self.serial)), None)

    async def _session(self, end: float) -> None:
        opened = await self._open()
        if opened is None:
            await asyncio.sleep(max(0.0, min(self.a.reconnect_s, end - monotonic())))
            return
        ws, reader = opened
        interval = self.a.interval_ms / 1000
        next_t = monotonic()
        try:
            while monotonic() < end:
                await self._cycle(ws)
                next_t = max(next_t + interval, monotonic())
                await asyncio.sleep(max(0.0, min(next_t, end) - monotonic()))
        except (ConnectionClosed, ConnectionError):
            pass
        finally:
            code = ws.close_code
            if code is not None or reader.done():
                self._bump(self.closes, str(code))
            ws.transport.abort()
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader

    async def run(self) -> dict[str, Any]:
        a = self.a
        self.t_start = monotonic()
        end = self.t_start + a.duration
        self.hard_end = end + a.grace
        gc.collect()
        gc.freeze()
        gc.disable()  # the instrument's own pauses are not the gateway's (see CancelRun)
        try:
            async with asyncio.timeout(a.duration + a.grace + 2 * a.op_timeout):
                while monotonic() < end:
                    try:
                        await self._session(end)
                    except TimeoutError:
                        self._bump(self.connect_failed, "send timeout")
        except TimeoutError:
            self._bump(self.connect_failed, "run timeout")
        gc.enable()
        admitted = None if self.admitted_after is None else round(self.admitted_after, 3)
        return {
            "seconds": round(monotonic() - self.t_start, 3),
            "interval_ms": a.interval_ms,
            "connect_attempts": self.connect_attempts,
            "connect_failed": self.connect_failed,
            "refused": self.refused,
            "admitted_after_s": admitted,
            "closes": self.closes,
            "cycles": self.cycles,
            "cancels_answered": len(self.latencies),
            "cancel_unanswered": self.cancel_unanswered,
            "cancel_latency": _summary_ms(self.latencies),
            "first_chunk": _summary_ms(self.first_chunk),
            "first_chunk_timeouts": self.first_chunk_timeouts,
            "statuses": self.statuses,
            "pings_sent": self.pings_sent,
            "pongs": len(self.ping_rtts),
            "ping_rtt": _summary_ms(self.ping_rtts),
            "errors": self.errors,
        }


# -- command line --------------------------------------------------------------------------------


T = TypeVar("T")


def _runner() -> Callable[[Coroutine[Any, Any, T]], T]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)

    t = sub.add_parser("throughput")
    t.add_argument("--url", required=True)
    t.add_argument("--codec", choices=["json", "msgpack"], default="json")
    t.add_argument("--conns", type=int, default=8)
    t.add_argument("--streams", type=int, default=16)
    t.add_argument("--tokens", type=int, default=2000)
    t.add_argument("--warmup", type=float, default=1.0)
    t.add_argument("--duration", type=float, default=4.0)
    t.add_argument("--server-pid", type=int, required=True)
    t.add_argument("--verify", action="store_true")

    c = sub.add_parser("cancel")
    c.add_argument("--url", required=True)
    c.add_argument("--http-base")
    c.add_argument("--via", choices=["frame", "http"], default="frame")
    c.add_argument(
        "--keep-alive",
        action="store_true",
        help="via http: every DELETE on one persistent connection (default: a new one each)",
    )
    c.add_argument("--conns", type=int, default=10)
    c.add_argument("--streams", type=int, default=1000)
    c.add_argument("--tokens", type=int, default=100_000)
    c.add_argument("--token-delay-ms", type=int, default=50)
    c.add_argument("--interval-ms", type=float, default=10.0)
    c.add_argument("--duration", type=float, default=20.0)
    c.add_argument("--ramp", type=float, default=1.0)
    c.add_argument("--settle", type=float, default=1.0)
    c.add_argument("--drain", type=float, default=1.0)
    c.add_argument("--seed", type=int, default=4)
    c.add_argument("--server-pid", type=int, required=True)
    c.add_argument("--metrics", help="http://host:port of a gateway: scrape its cancel histogram")
    c.add_argument("--no-ping", dest="ping", action="store_false")

    h = sub.add_parser("http-canceller")
    h.add_argument("--base", required=True)
    h.add_argument(
        "--keep-alive",
        action="store_true",
        help="one persistent connection for every DELETE (default: a new one each, as curl)",
    )

    n = sub.add_parser("connections")
    n.add_argument("--url", required=True)
    n.add_argument("--count", type=int, required=True)
    n.add_argument("--concurrency", type=int, default=16)
    n.add_argument("--tokens", type=int, default=1000)
    n.add_argument("--token-delay-ms", type=int, default=5000)
    n.add_argument("--tag", default="0")

    o = sub.add_parser("normal", help="one normal client, for the attack scenario")
    o.add_argument("--url", required=True)
    o.add_argument("--client-key")
    o.add_argument("--duration", type=float, default=8.0)
    o.add_argument("--interval-ms", type=float, default=10.0)
    o.add_argument("--tokens", type=int, default=1000)
    o.add_argument("--token-delay-ms", type=int, default=5)
    o.add_argument("--op-timeout", type=float, default=5.0, help="longest wait for one answer")
    o.add_argument("--grace", type=float, default=3.0, help="seconds past the end for a last cycle")
    o.add_argument("--reconnect-s", type=float, default=0.1, help="pause after a refused connect")

    a = p.parse_args()
    run = _runner()
    if a.mode == "throughput":
        _emit(run(run_throughput(a)))
    elif a.mode == "cancel":
        raise_nofile()
        _emit(run(CancelRun(a).run()))
    elif a.mode == "http-canceller":
        http_canceller(a)
    elif a.mode == "normal":
        _emit(run(NormalClient(a).run()))
    else:
        run(run_connections(a))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
