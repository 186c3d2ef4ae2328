"""The least a request's own task costs per chunk: the floor under the gateway's CPU per chunk.

    python bench/task_floor.py [--streams 128] [--burst 8] [--turns 3000]

The gateway runs each request's pipeline in its own asyncio task (a cancel must reach one
request's code at its checkpoints, never another's). At zero token delay that task wakes once
per burst of ``ZERO_DELAY_BURST`` tokens: one loop turn, one resume of the pipeline's read and of
the backend's token generator. This measures only that, under uvloop, with the tokens already
made (nothing encoded, nothing written): ``--streams`` tasks, each reading ``--turns`` bursts from
an async generator. The bare batched loop (``bench/batched_server.py``) has no such cost: one
task per connection makes every stream's chunks. So the gateway's CPU per chunk can approach the
batched loop's plus this floor, never the batched loop's alone.

Prints one JSON line: CPU-µs per token and per burst (best of ``--repeat`` runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator
from itertools import cycle, islice

try:
    from gateway.backends.simulated import ZERO_DELAY_BURST as BURST
except ImportError:  # pragma: no cover - the bench runs from the repository
    BURST = 8


async def _bursts(burst: int) -> AsyncIterator[list[str]]:
    words = cycle((" token",) * 16)
    while True:
        await asyncio.sleep(0)  # the backend's one loop turn per burst
        yield list(islice(words, burst))


async def _read(turns: int, burst: int, out: list[str]) -> None:
    reads = 0
    async for piece in _bursts(burst):  # the pipeline's read (gateway/pipeline.py)
        out += piece
        reads += 1
        if reads == turns:
            return


async def _run(streams: int, turns: int, burst: int) -> float:
    outs: list[list[str]] = [[] for _ in range(streams)]
    started = time.process_time()
    await asyncio.gather(*(_read(turns, burst, out) for out in outs))
    return time.process_time() - started


def measure(
    streams: int = 128, turns: int = 3000, burst: int = BURST, repeat: int = 3
) -> dict[str, object]:
    try:
        import uvloop

        run = uvloop.run
        loop = "uvloop"
    except ImportError:  # pragma: no cover - uvloop is a default dependency
        run = asyncio.run
        loop = "asyncio"
    best = min(run(_run(streams, turns, burst)) for _ in range(repeat))
    tokens = streams * turns * burst
    return {
        "loop": loop,
        "streams": streams,
        "burst": burst,
        "cpu_us_per_token": round(best / tokens * 1e6, 3),
        "cpu_us_per_burst": round(best / (streams * turns) * 1e6, 3),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=128)
    p.add_argument("--turns", type=int, default=3000)
    p.add_argument("--burst", type=int, default=BURST)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    print(json.dumps(measure(a.streams, a.turns, a.burst, a.repeat)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
