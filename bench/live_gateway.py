"""``muxgate serve`` with a probe of what is live, for the soak (bench/soak.py ``--live``).

    python3 bench/live_gateway.py PROBE_FILE [serve flags...]

On SIGUSR1 the gateway process runs a full collection and appends one JSON line to PROBE_FILE:
what the collection freed (the types of the objects in reference cycles), its live memory after
it (gateway/memory.py ``in_use()``: the C allocator's bytes in use,
pymalloc's blocks), the number of objects the collector tracks and the most common types among
them. RSS alone cannot tell a leak from fragmentation (freed memory the allocator keeps), and
/metrics' live gauges count the garbage the collector has not reached yet: after a collection
what is left is what the gateway holds.

With ``SOAK_TRACEMALLOC=N`` set, tracemalloc records N frames per allocation from the
start and each probe also writes a snapshot beside PROBE_FILE (``PROBE_FILE.<n>.tm``): compare
two with ``Snapshot.load(...).compare_to(...)`` to find what grew. It slows the gateway down
by two to three times: for finding a holder, not for figures.

A bench tool: the collection stalls the loop for tens of milliseconds, which a gateway in
production should not do on a signal.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import signal
import sys
import time
import tracemalloc
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.cli import main  # noqa: E402
from gateway.memory import in_use  # noqa: E402


def _probe(path: Path, count: list[int]) -> None:
    started = time.perf_counter()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collection frees is kept in gc.garbage: counted
    try:
        collected = gc.collect()
        garbage = collections.Counter(type(o).__qualname__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    objects = gc.get_objects()
    types = collections.Counter(type(o).__qualname__ for o in objects)
    line = {
        "t": time.time(),
        "collected": collected,
        "collect_ms": round((time.perf_counter() - started) * 1000, 1),
        **in_use(),
        "gc_objects": len(objects),
        "top_types": dict(types.most_common(40)),
        "garbage_types": dict(garbage.most_common(25)),
    }
    del objects
    if tracemalloc.is_tracing():
        count[0] += 1
        snapshot = tracemalloc.take_snapshot()
        snapshot.dump(f"{path}.{count[0]}.tm")
        line["snapshot"] = count[0]
        line["traced_bytes"] = tracemalloc.get_traced_memory()[0]
    with path.open("a") as out:
        out.write(json.dumps(line) + "\n")


def run(argv: list[str]) -> int:
    path = Path(argv[0])
    frames = int(os.environ.get("SOAK_TRACEMALLOC", "0"))
    if frames:
        tracemalloc.start(frames)
    count = [0]

    def on_signal(signum: int, frame: FrameType | None) -> None:
        _probe(path, count)

    signal.signal(signal.SIGUSR1, on_signal)
    return main(["serve", *argv[1:]])


if __name__ == "__main__":
    raise SystemExit(run(sys.argv[1:]))
