"""The ``muxgate`` command line: ``muxgate serve`` runs the gateway; ``muxgate spec`` prints the
wire protocol specification; ``muxgate chat`` and ``muxgate cancel`` are the SDK on the terminal
(``gateway/chat_cli.py``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from importlib.resources import files

from . import chat_cli
from .config import Config, ConfigError, load_config

__all__ = ["main"]


def serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway. Every flag also reads from MUXGATE_<NAME> and a TOML file.",
    )
    serve.add_argument("--config", help="TOML file of settings (also MUXGATE_CONFIG)")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "backend_options":
            serve.add_argument(
                "--backend-option",
                dest="backend_options",
                action="append",
                metavar="KEY=VALUE",
                help="an option of the backend (repeat for several; VALUE is read as JSON when "
                "it parses as JSON, else as a string; env MUXGATE_BACKEND_OPTIONS, a JSON object)",
            )
            continue
        if f.name == "client_keys":
            serve.add_argument(
                "--client-key",
                dest="client_keys",
                action="append",
                help="a client key (repeat for several; env MUXGATE_CLIENT_KEYS, comma-separated)",
            )
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        flags = (flag, "--nats") if f.name == "nats_url" else (flag,)  # --nats: the short form
        serve.add_argument(
            *flags,
            dest=f.name,
            default=None,
            help=f"(default: {default}; env MUXGATE_{f.name.upper()})",
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="muxgate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser(sub)
    sub.add_parser("spec", help="print the wire protocol specification (protocol/SPEC.md)")
    chat_cli.add_subcommands(sub)
    args = parser.parse_args(argv)
    if args.command in ("chat", "cancel"):
        return chat_cli.run(args)
    if args.command == "spec":
        sys.stdout.write(files("protocol").joinpath("SPEC.md").read_text(encoding="utf-8"))
        return 0
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}
    try:
        config = load_config(flags=flags, toml_path=args.config)
    except ConfigError as exc:
        parser.exit(2, f"muxgate: {exc}\n")
    from .server import run  # imported late: `muxgate spec` needs no server

    try:
        run(config)
    except ConfigError as exc:  # found at start-up: e.g. a backend option
        parser.exit(2, f"muxgate: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
