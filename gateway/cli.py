"""The ``muxgate`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.resources import files

import protocol


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="muxgate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=protocol.DEFAULT_PORT)
    sub.add_parser("spec", help="print the wire protocol specification")
    args = parser.parse_args(argv)
    if args.command == "spec":
        sys.stdout.write(files("protocol").joinpath("SPEC.md").read_text(encoding="utf-8"))
        return 0
    print(
        f"muxgate {protocol.PROTOCOL_VERSION}: the gateway server is not built yet "
        f"(it will listen on ws://{args.host}:{args.port}{protocol.WS_PATH}). "
        "See protocol/SPEC.md for the wire protocol.",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
