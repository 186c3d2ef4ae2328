"""Soak (issue 18, item 4): mixed traffic against one gateway process for a long time, its memory
and what it holds sampled all along — flat after warm-up, or a leak.

    python3 bench/soak.py --minutes 30            # the long run: bench/results/soak.{json,png}
    python3 bench/soak.py --minutes 2 --check     # CI: exit 1 if a check fails

The gateway is ``muxgate serve`` in a process of its own (its stderr in a file: scanned for
errors and tracebacks at the end). The traffic, all at once until the end:

- **campaigns** (tests/gateway/invariants.py): sessions of requests with every kind of cancel
  (own frame, ``DELETE``, another connection's frame, twice, before the chat), connections that
  drop mid-way, resumes; every request's end checked (one terminal, chunks join, true cancel
  words) — connect/disconnect churn comes with it (a connection per session);
- **slow readers**: connections whose client reads one frame every 50 ms while long streams run
  (the gateway's queues fill, its producers wait), then cancel and start again;
- **hostile clients**: connections that send garbage (random bytes, bad JSON, unknown types,
  oversized lines) and reconnect when the gateway closes them.

Sampled every ``--every`` seconds: the process's RSS and open descriptors, and from
``/metrics``: connections, active requests, ``muxgate_held`` (retained records, tombstones,
resumable and detached requests, asyncio tasks). The figures: each series after the warm-up
(the first fifth, or ``--warmup`` minutes: the allocator's arenas grow to the traffic's peak
demand, and the records of finished requests to their retention), its least-squares slope per
hour; and after the traffic stops and the
gateway settles, what is left. Checks (``--check``): no campaign violation, no error or
traceback in the gateway's log, RSS slope after warm-up under ``--max-rss-slope`` MiB/hour
(a long run: a leak of a few KiB per request would show) or, for a short run, RSS growth after
the warm-up under ``--max-rss-growth`` MiB, and, settled: no connection, no active request,
no detached request, asyncio tasks and descriptors back to their level before the traffic.

``--live`` runs the gateway under bench/live_gateway.py and, at every sample, has it run a full
collection and report what is live after it (``live_malloc_mib``, ``live_python_blocks``,
``gc_objects``) and what the collection freed: RSS alone cannot tell a leak from garbage waiting
for the cycle collector or from fragmentation. The collections change what they measure (no
garbage piles up between them): a run to find a holder, not the run whose RSS is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from procstat import rss_bytes  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

from tests.gateway.http_client import http  # noqa: E402
from tests.gateway.invariants import Campaign, RemoteNode  # noqa: E402

SUBPROTOCOL = "muxgate.v1.json"


def _spawn(log: Path, retention: float, probe: Path | None) -> subprocess.Popen[bytes]:
    """``muxgate serve`` on an ephemeral port, its log in ``log``; finished requests' records
    kept ``retention`` seconds (the default, 300 s, would make the first five minutes a
    warm-up: the records of ~100 requests a second fill it). With ``probe``, the gateway runs
    under bench/live_gateway.py: SIGUSR1 makes it collect and write what is live there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUXGATE_")}
    command = [sys.executable, "-m", "gateway.cli", "serve"]
    if probe is not None:
        command = [sys.executable, str(ROOT / "bench" / "live_gateway.py"), str(probe)]
    with log.open("wb") as stderr:
        return subprocess.Popen(
            [*command, "--port", "0",
             "--log-format", "json", "--max-streams", "256", "--slow-consumer-timeout", "10",
             "--resume-grace-seconds", "5", "--retention-seconds", str(retention)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _metrics(text: str) -> dict[str, float]:
    wanted = ("muxgate_connections", "muxgate_active_requests", "muxgate_held{",
              "muxgate_memory_malloc_bytes", "muxgate_memory_python_blocks")  # fmt: skip
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(wanted):
            name, value = line.rsplit(" ", 1)
            if name.startswith("muxgate_held{"):
                name = name.split('"')[1]
            out[name] = float(value)
    # What is live, beside RSS (gateway/memory.py): C allocator MiB, pymalloc blocks (both
    # with the garbage the cycle collector has not reached yet).
    if out.get("muxgate_memory_malloc_bytes", -1) >= 0:
        out["malloc_mib"] = round(out.pop("muxgate_memory_malloc_bytes") / 2**20, 2)
    if "muxgate_memory_python_blocks" in out:
        out["python_blocks"] = out.pop("muxgate_memory_python_blocks")
    return out


def _slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per hour."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    if var == 0:
        return None
    return sum((t - mx) * (v - my) for t, v in points) / var * 3600


class Soak:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.rng = random.Random(a.seed)
        self.stop = asyncio.Event()
        self.samples: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self.types: list[dict[str, int]] = []  # the live probe's most common types, per sample
        self.counts: dict[str, int] = {
            "campaign_requests": 0, "slow_reader_streams": 0, "hostile_frames": 0,
            "hostile_closed": 0,
        }  # fmt: skip

    # -- the gateway -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def gateway(self) -> Any:
        log = self.log_path = Path(self.a.out) / "soak-gateway.log"
        self.probe = Path(self.a.out) / "soak-live.jsonl" if self.a.live else None
        if self.probe is not None:
            self.probe.unlink(missing_ok=True)
            for old in self.probe.parent.glob(f"{self.probe.name}.*.tm"):
                old.unlink()
        proc = _spawn(log, self.a.retention, self.probe)
        try:
            url = None
            async with asyncio.timeout(30):
                while url is None:
                    await asyncio.sleep(0.05)  # the process starting: no event to await
                    for line in log.read_text(errors="replace").splitlines():
                        if '"gateway.started"' in line:
                            url = json.loads(line)["url"]
            self.pid = proc.pid
            http_url = url.replace("ws://", "http://").rsplit("/v1/ws", 1)[0]
            self.node = RemoteNode(url=url, http_url=http_url)
            yield self.node
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    async def sample(self, started: float, phase: str) -> dict[str, Any]:
        text = (await http("GET", f"{self.node.http_url}/metrics")).body.decode()
        sample = {
            "t": round(time.monotonic() - started, 1),
            "phase": phase,
            "rss_mib": round(rss_bytes(self.pid) / 2**20, 2),
            "fds": _fds(self.pid),
            **_metrics(text),
        }
        if self.probe is not None:
            sample.update(await self.live())
        self.samples.append(sample)
        return sample

    async def live(self) -> dict[str, Any]:
        """What is live after a full collection in the gateway (bench/live_gateway.py)."""
        seen = len(self.probe.read_text().splitlines()) if self.probe.exists() else 0
        os.kill(self.pid, signal.SIGUSR1)
        async with asyncio.timeout(60):
            while True:  # another process writes the line: no event to await here
                lines = self.probe.read_text().splitlines() if self.probe.exists() else []
                if len(lines) > seen and lines[-1].endswith("}"):
                    break
                await asyncio.sleep(0.05)
        line = json.loads(lines[-1])
        self.types.append(line["top_types"])
        return {
            "live_malloc_mib": round(line["malloc_bytes"] / 2**20, 3),
            "live_python_blocks": line["python_blocks"],
            "gc_objects": line["gc_objects"],
            "gc_collected": line["collected"],  # objects in cycles since the last sample
            "collect_ms": line["collect_ms"],
        }

    # -- traffic -----------------------------------------------------------------------------

    async def campaigns(self, worker: int) -> None:
        campaign = Campaign(
            [self.node], seed=self.a.seed * 100 + worker, batch=20, prefix=f"c{worker}-"
        )
        while not self.stop.is_set():
            try:
                await campaign.session()
            except Exception as exc:  # a violation: the soak fails, with what it saw
                import traceback

                where = "".join(traceback.format_exception(exc)[-6:])[-1500:]
                self.failures.append(f"campaign: {type(exc).__name__}: {str(exc)[:500]} {where}")
                self.stop.set()
                return
            self.counts["campaign_requests"] = campaign.figures.requests

    async def slow_reader(self, worker: int) -> None:
        serial = 0
        while not self.stop.is_set():
            async with connect(self.node.url, subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                               max_queue=1) as ws:  # fmt: skip
                rids = []
                for _ in range(4):
                    serial += 1
                    rid = f"slow{worker}-{serial}"
                    rids.append(rid)
                    chat = {"type": "chat", "request_id": rid, "message": "x",
                            "metadata": {"tokens": 2000, "token_delay_ms": 0}}  # fmt: skip
                    await ws.send(orjson.dumps(chat).decode())
                self.counts["slow_reader_streams"] += len(rids)
                deadline = time.monotonic() + self.rng.uniform(1, 4)
                with contextlib.suppress(Exception):
                    while time.monotonic() < deadline and not self.stop.is_set():
                        await ws.recv()
                        await asyncio.sleep(0.05)  # the slow reader itself
                    for rid in rids:
                        await ws.send(orjson.dumps({"type": "cancel", "request_id": rid}).decode())

    async def hostile(self, worker: int) -> None:
        rng = random.Random(self.a.seed * 1000 + worker)
        garbage = [
            lambda: os.urandom(rng.randint(1, 300)),
            lambda: b'{"type": "chat", "request_id": ' + os.urandom(8) + b"}",
            lambda: b'{"type":"nonsense","request_id":"x"}',
            lambda: b'{"type":"chat","request_id":"h","message":"' + b"a" * 70_000 + b'"}',
            lambda: b"[" * 200,
        ]
        while not self.stop.is_set():
            with contextlib.suppress(Exception):
                async with connect(self.node.url, subprotocols=[SUBPROTOCOL]) as ws:  # type: ignore[list-item]
                    for _ in range(rng.randint(5, 50)):
                        frame = rng.choice(garbage)()
                        await ws.send(frame.decode("utf-8", "replace"))
                        self.counts["hostile_frames"] += 1
                        await asyncio.sleep(0.01)
            self.counts["hostile_closed"] += 1

    # -- the run -----------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        a = self.a
        async with self.gateway():
            await asyncio.sleep(1.0)  # the process settles before the baseline (a measurement)
            started = time.monotonic()
            baseline = await self.sample(started, "baseline")
            tasks = [asyncio.create_task(self.campaigns(i)) for i in range(a.campaigns)]
            tasks += [asyncio.create_task(self.slow_reader(i)) for i in range(a.slow_readers)]
            tasks += [asyncio.create_task(self.hostile(i)) for i in range(a.hostile)]
            end = started + a.minutes * 60
            while time.monotonic() < end and not self.stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(a.every, max(0.0, end - time.monotonic()))):
                        await self.stop.wait()
                await self.sample(started, "traffic")
            self.stop.set()
            async with asyncio.timeout(120):
                await asyncio.gather(*tasks, return_exceptions=True)
            # Settle: resumable requests detached by the last drops wait their grace (5 s).
            await asyncio.sleep(8.0)  # a measurement pause, not a synchronisation
            settled = await self.sample(started, "settled")
        return self.report(baseline, settled)

    def report(self, baseline: dict[str, Any], settled: dict[str, Any]) -> dict[str, Any]:
        a = self.a
        warmup = a.minutes / 5 if a.warmup is None else a.warmup
        warm = [s for s in self.samples if s["phase"] == "traffic" and s["t"] >= warmup * 60]
        slopes = {
            key: _slope_per_hour([(s["t"], s.get(key, 0.0)) for s in warm])
            for key in ("rss_mib", "malloc_mib", "python_blocks", "live_malloc_mib",
                        "live_python_blocks", "gc_objects", "fds", "asyncio_tasks",
                        "retained_records", "tombstones", "resumable_requests",
                        "muxgate_connections")
            if any(key in s for s in warm)  # (the live_* ones: with --live only)
        }  # fmt: skip
        # RSS growth after the warm-up: the highest RSS since, over the highest before it.
        before = [s["rss_mib"] for s in self.samples if s["phase"] == "traffic"
                  and s["t"] < warmup * 60] or [baseline["rss_mib"]]  # fmt: skip
        growth = max(s["rss_mib"] for s in warm) - max(before) if warm else None
        log_text = self.log_path.read_text(errors="replace")
        errors = [ln for ln in log_text.splitlines() if '"level": "error"' in ln
                  or '"level": "critical"' in ln or '"level":"error"' in ln]  # fmt: skip
        tracebacks = log_text.count("Traceback (most recent call last)")
        checks = {
            "no campaign violation": not self.failures,
            "no error or traceback in the log": not errors and not tracebacks,
            **self.rss_checks(slopes["rss_mib"], growth),
            "settled: no connection": settled.get("muxgate_connections", 0) == 0,
            "settled: no active request": settled.get("muxgate_active_requests", 0) == 0,
            "settled: no detached request": settled.get("detached_requests", 0) == 0,
            "settled: tasks back to their level": (
                settled.get("asyncio_tasks", 0) <= baseline.get("asyncio_tasks", 0) + 2
            ),
            "settled: descriptors back to their level": settled["fds"] <= baseline["fds"] + 2,
        }
        second_half = [s for s in self.samples if s["phase"] == "traffic"
                       and s["t"] >= a.minutes * 30]  # fmt: skip
        result = {
            "minutes": a.minutes,
            "warmup_minutes": warmup,
            "seed": a.seed,
            "traffic": dict(self.counts),
            "baseline": baseline,
            "peak_rss_mib": max(s["rss_mib"] for s in self.samples),
            "settled": settled,
            "slopes_per_hour_after_warmup": {
                k: (round(v, 3) if v is not None else None) for k, v in slopes.items()
            },
            "rss_growth_after_warmup_mib": _round(growth),
            "rss_slope_per_hour_second_half": _round(
                _slope_per_hour([(s["t"], s["rss_mib"]) for s in second_half])
            ),
            "log_errors": len(errors),
            "tracebacks": tracebacks,
            "failures": self.failures,
            "live_types_growth_after_warmup": self.types_growth(warm),
            "checks": checks,
            "samples": self.samples,
        }
        out = Path(a.out)
        (out / "soak.json").write_text(json.dumps(result, indent=1))
        self.plot(out / "soak.png")
        return result

    def types_growth(self, warm: list[dict[str, Any]]) -> dict[str, int]:
        """The tracked types whose count grew most from the warm-up's end to the last sample
        with traffic (the live probe's; empty without ``--live``)."""
        if not self.types or len(warm) < 2:
            return {}
        first = self.types[self.samples.index(warm[0])]
        last = self.types[self.samples.index(warm[-1])]
        grown = {k: last.get(k, 0) - first.get(k, 0) for k in set(first) | set(last)}
        return dict(sorted(grown.items(), key=lambda kv: -kv[1])[:12])

    def rss_checks(self, slope: float | None, growth: float | None) -> dict[str, bool]:
        """The slope needs a long window: over the CI's minute, one step of the allocator's
        high-water mark (a MiB or two, at a peak of demand) reads as ~100 MiB/h. A short run
        bounds the growth instead (a leak of 1 KiB per request would add ~4 MiB a minute)."""
        a = self.a
        checks = {}
        if a.max_rss_slope is not None:
            checks[f"RSS slope after warm-up <= {a.max_rss_slope} MiB/h"] = (
                slope is not None and slope <= a.max_rss_slope
            )
        if a.max_rss_growth is not None:
            checks[f"RSS growth after warm-up <= {a.max_rss_growth} MiB"] = (
                growth is not None and growth <= a.max_rss_growth
            )
        return checks

    def plot(self, path: Path) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # the bench extra is not installed: the JSON has the figures
            return
        t = [s["t"] / 60 for s in self.samples]
        fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
        axes[0].plot(t, [s["rss_mib"] for s in self.samples], label="RSS (MiB)")
        if any("malloc_mib" in s for s in self.samples):
            axes[0].plot(t, [s.get("malloc_mib", 0) for s in self.samples],
                         label="C allocator, live (MiB)")  # fmt: skip
        axes[0].set_ylabel("MiB")
        axes[1].plot(t, [s["fds"] for s in self.samples], label="open descriptors")
        axes[1].plot(t, [s.get("asyncio_tasks", 0) for s in self.samples], label="asyncio tasks")
        axes[1].plot(t, [s.get("muxgate_connections", 0) for s in self.samples],
                     label="connections")  # fmt: skip
        axes[2].plot(t, [s.get("retained_records", 0) for s in self.samples],
                     label="retained records")  # fmt: skip
        axes[2].plot(t, [s.get("tombstones", 0) for s in self.samples], label="tombstones")
        axes[2].plot(t, [s.get("resumable_requests", 0) for s in self.samples],
                     label="resumable requests")  # fmt: skip
        axes[2].set_xlabel("minutes")
        for ax in axes:
            ax.legend(loc="upper left", fontsize=8)
            ax.grid(alpha=0.3)
        fig.suptitle(f"muxgate soak: {self.a.minutes} min of mixed traffic (bench/soak.py)")
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--warmup", type=float, help="minutes not in the slopes (default: a fifth)")
    p.add_argument("--campaigns", type=int, default=4, help="campaign sessions at a time")
    p.add_argument("--slow-readers", type=int, default=4)
    p.add_argument("--hostile", type=int, default=3)
    p.add_argument("--seed", type=int, default=18)
    p.add_argument(
        "--max-rss-slope",
        type=float,
        default=20.0,
        help="MiB per hour, for long runs; 0: not checked",
    )
    p.add_argument(
        "--max-rss-growth", type=float, help="MiB over the highest RSS of the warm-up (short runs)"
    )
    p.add_argument("--retention", type=float, default=20.0, help="the gateway's retention (s)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--check", action="store_true", help="exit 1 when a check fails")
    p.add_argument(
        "--live",
        action="store_true",
        help="sample live memory after a full collection (bench/live_gateway.py)",
    )
    a = p.parse_args()
    a.max_rss_slope = a.max_rss_slope or None
    Path(a.out).mkdir(parents=True, exist_ok=True)
    result = asyncio.run(Soak(a).run())
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary))
    failed = [name for name, ok in result["checks"].items() if not ok]
    if failed:
        print("soak: failed: " + "; ".join(failed), file=sys.stderr)
        for failure in result["failures"]:
            print(failure, file=sys.stderr)
    return 1 if a.check and failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
