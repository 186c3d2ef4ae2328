"""Run ``muxgate serve`` with probes: garbage-collector pauses and event-loop iteration times.

    python bench/gcprobe.py --gc default|off|tuned --report FILE -- serve --port 8001 ...

A diagnostic, not a benchmark figure: it tells *why* a latency tail looks the way it does.
``gc.callbacks`` time every collection by generation; a wrapped ``_run_once`` times each event
loop iteration without the time spent waiting in ``select``. On exit (SIGTERM) it writes the
summary as JSON to ``--report``. ``--gc off`` disables the cyclic collector (only safe for a
short run: reference cycles then leak); ``--gc tuned`` is a candidate setting for the gateway:
``gc.freeze()`` after start-up plus a higher first threshold (fewer, not longer, pauses).
"""

from __future__ import annotations

import argparse
import asyncio.base_events
import gc
import json
import sys
import time
from typing import Any

_GC_STARTED = 0.0
_pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
_busy: list[float] = []


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    global _GC_STARTED
    if phase == "start":
        _GC_STARTED = time.perf_counter()
    else:
        _pauses[info["generation"]].append((time.perf_counter() - _GC_STARTED) * 1000)


def _wrap_loop() -> None:
    loop_cls: Any = asyncio.base_events.BaseEventLoop
    original = loop_cls._run_once

    def run_once(self: Any) -> None:
        selector = self._selector
        if not getattr(selector, "_probe", False):
            inner = selector.select

            def select(timeout: float | None = None) -> Any:
                t = time.perf_counter()
                try:
                    return inner(timeout)
                finally:
                    self._probe_wait += time.perf_counter() - t

            selector.select = select
            selector._probe = True
        self._probe_wait = 0.0
        t0 = time.perf_counter()
        original(self)
        _busy.append((time.perf_counter() - t0 - self._probe_wait) * 1000)

    loop_cls._run_once = run_once


def _summary(values: list[float]) -> dict[str, Any]:
    v = sorted(values)
    n = len(v)
    if not n:
        return {"count": 0}
    return {
        "count": n,
        "total_ms": round(sum(v), 1),
        "p50_ms": round(v[n // 2], 3),
        "p99_ms": round(v[min(n - 1, int(n * 0.99))], 3),
        "max_ms": round(v[-1], 3),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gc", choices=["default", "off", "tuned"], default="default")
    p.add_argument("--report", required=True)
    p.add_argument("serve_args", nargs=argparse.REMAINDER)
    a = p.parse_args()
    args = [x for x in a.serve_args if x != "--"]
    gc.callbacks.append(_on_gc)
    _wrap_loop()
    from gateway.cli import main as gateway_main  # imported before freeze: it is long-lived

    if a.gc == "off":
        gc.disable()
    elif a.gc == "tuned":
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
    try:
        return gateway_main(args)
    finally:
        busy = sorted(_busy)
        report = {
            "gc_mode": a.gc,
            "gc_pauses_by_generation": {str(g): _summary(v) for g, v in _pauses.items()},
            "loop_iterations_busy": {
                **_summary(busy),
                "over_2ms": sum(1 for x in busy if x > 2),
                "over_5ms": sum(1 for x in busy if x > 5),
            },
        }
        with open(a.report, "w") as f:
            json.dump(report, f, indent=1)
        print(json.dumps(report), file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
