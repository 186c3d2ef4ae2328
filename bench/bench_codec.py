"""Codec micro-benchmark: ns per chunk message, encode and decode, JSON vs msgpack.

    python bench/bench_codec.py [--seconds 0.5] [--json-out bench/results/codec.json]

Prints one line per (codec, operation) and optionally writes the figures as JSON. A benchmark,
not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable

import protocol
from protocol import Chunk, Codec, Sender

REQUEST_ID = "req_0123456789abcdef"
TEXT = " token"  # a typical token-sized chunk


def _ns_per_call(fn: Callable[[], object], seconds: float) -> float:
    """Best of 5 runs of a loop long enough to last ``seconds`` / 5."""
    n = 1000
    while True:  # calibrate
        start = time.perf_counter_ns()
        for _ in range(n):
            fn()
        elapsed = time.perf_counter_ns() - start
        if elapsed > seconds * 1e9 / 5 or n >= 10_000_000:
            break
        n *= 4
    best = elapsed / n
    for _ in range(4):
        start = time.perf_counter_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter_ns() - start) / n)
    return best


def run(seconds: float) -> list[dict[str, object]]:
    results: list[dict[str, object]] = []
    chunk = Chunk(request_id=REQUEST_ID, seq=123, text=TEXT)
    for codec in Codec:
        encoded = protocol.encode(chunk, codec)
        frame: bytes | str = encoded.decode() if codec.is_text else encoded
        batch = protocol.join_batch([encoded] * 8, codec)
        batch_frame: bytes | str = batch.decode() if codec.is_text else batch
        prefix = protocol.chunk_prefix(REQUEST_ID, codec)
        cases: dict[str, Callable[[], object]] = {
            # The gateway's hot path: the request's prefix is encoded once, at its start.
            "encode_chunk_from(prefix) (hot path)": lambda c=codec, p=prefix: (
                protocol.encode_chunk_from(p, 123, TEXT, c)
            ),
            "encode_chunk (one-off)": lambda c=codec: protocol.encode_chunk(
                REQUEST_ID, 123, TEXT, c
            ),
            "encode(Chunk) (generic)": lambda c=codec: protocol.encode(chunk, c),
            "decode chunk": lambda c=codec, f=frame: protocol.decode(f, c, Sender.GATEWAY),
            "decode batch of 8, per message": lambda c=codec, f=batch_frame: protocol.decode(
                f, c, Sender.GATEWAY
            ),
        }
        for name, fn in cases.items():
            ns = _ns_per_call(fn, seconds)
            if "batch of 8" in name:
                ns /= 8
            results.append(
                {
                    "codec": codec.name.lower(),
                    "case": name,
                    "ns": round(ns, 1),
                    "bytes": len(encoded),
                }
            )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="time per case")
    parser.add_argument("--json-out", help="write results as JSON here")
    args = parser.parse_args()
    results = run(args.seconds)
    print(f"# codec micro-benchmark  python {platform.python_version()}  {platform.machine()}")
    print(f"{'codec':8} {'case':34} {'ns/msg':>9} {'bytes':>6}")
    for r in results:
        print(f"{r['codec']:8} {r['case']:34} {r['ns']:>9} {r['bytes']:>6}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"python": sys.version, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
