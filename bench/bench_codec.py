"""Codec micro-benchmark: ns per chunk message, encode and decode, JSON vs msgpack; then ns per
decoded frame for ordinary client frames and for hostile ones (issue 12: a frame of half a
million lines, a line nested 1000 deep with a 20-digit integer, a frame of a million one-byte
msgpack objects), which the decoder must refuse about as fast as it reads an ordinary frame.

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
from protocol import Cancel, Chat, Chunk, Codec, Sender

REQUEST_ID = "req_0123456789abcdef"
TEXT = " token"  # a typical token-sized chunk


def _ns_per_call(fn: Callable[[], object], seconds: float, n: int = 1000) -> float:
    """Best of 5 runs of a loop long enough to last ``seconds`` / 5 (``n`` calls at least)."""
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
                    "per": "message",
                    "ns": round(ns, 1),
                    "bytes": len(encoded),
                }
            )
    for codec, name, frame in _frames():
        ns = _ns_per_call(lambda c=codec, f=frame: protocol.decode(f, c, Sender.CLIENT), seconds, 1)
        size = len(frame.encode() if isinstance(frame, str) else frame)
        results.append(
            {
                "codec": codec.name.lower(),
                "case": name,
                "per": "frame",
                "ns": round(ns),
                "bytes": size,
            }
        )
    return results


def _frames() -> list[tuple[Codec, str, bytes | str]]:
    """Whole client frames to decode: ordinary ones (the hot path) and hostile ones."""
    frames: list[tuple[Codec, str, bytes | str]] = []
    for codec in Codec:
        cancel = protocol.encode(Cancel(request_id=REQUEST_ID), codec)
        chats = protocol.encode_batch(
            [
                Chat(
                    request_id=f"req_{i}",
                    message="hello world, how are you today?",
                    metadata={"temperature": 0.5, "tags": ["a", "b"]},
                )
                for i in range(16)
            ],
            codec,
        )
        frames += [
            (codec, "decode frame: 1 cancel", cancel.decode() if codec.is_text else cancel),
            (codec, "decode frame: 16 chats", chats.decode() if codec.is_text else chats),
        ]
    deep = b"[" * 1000 + b"12345678901234567890" + b"]" * 1000
    frames += [
        (Codec.JSON, 'hostile: "x\\n" * 524287 (text)', "x\n" * 524_287),
        (Codec.JSON, 'hostile: "1\\n" * 500000 (text)', "1\n" * 500_000),
        (Codec.JSON, "hostile: 1000 deep + 20 digits", deep.decode()),
        (Codec.MSGPACK, "hostile: 1000000 fixints", b"\x00" * 1_000_000),
        (Codec.MSGPACK, "hostile: 100000 deep", b"\x91" * 100_000 + b"\x90"),
    ]
    return frames


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="time per case")
    parser.add_argument("--json-out", help="write results as JSON here")
    args = parser.parse_args()
    results = run(args.seconds)
    print(f"# codec micro-benchmark  python {platform.python_version()}  {platform.machine()}")
    print(f"{'codec':8} {'case':34} {'ns/msg':>9} {'bytes':>6}")
    for r in results:
        if r["per"] == "message":
            print(f"{r['codec']:8} {r['case']:34} {r['ns']:>9} {r['bytes']:>6}")
    print(f"{'codec':8} {'case':34} {'ns/frame':>11} {'bytes':>8}")
    for r in results:
        if r["per"] == "frame":
            print(f"{r['codec']:8} {r['case']:34} {r['ns']:>11} {r['bytes']:>8}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"python": sys.version, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
