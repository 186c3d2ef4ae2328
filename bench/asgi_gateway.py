"""The gateway core served through its ASGI adapter by uvicorn: the bench's ``gateway_asgi`` server.

    python bench/asgi_gateway.py --host 127.0.0.1 --port 8103 --max-streams 128 ...

Takes the flags of ``muxgate serve`` (the same parser, the same config: simulated backend and
options, limits, log format) and serves ``asgi_app(Gateway(config))`` with uvicorn on the given
port instead of the gateway's own transport (gateway.transport): as
``tests/gateway/conftest.py`` (``_over_asgi``) runs it, with uvicorn's ``websockets-sansio``
WebSocket protocol, ``ws_max_size`` = ``max_frame_bytes``, no per-message deflate (the gateway's
own transport does not negotiate it); plus uvloop (as ``muxgate serve`` picks when installed),
no access log, and lifespan on (the adapter starts the core at ``lifespan.startup`` with
``Gateway.start(listen=False)`` and drains it at ``lifespan.shutdown``).

Like ``muxgate serve`` after start-up, it freezes what is alive into the permanent GC
generation and sets the first GC threshold to ``gc_young_threshold``, so that the comparison is
of the transports, not of the collector settings. Ready when ``GET /healthz`` answers 200 (the
signal the bench polls for ``muxgate serve``; uvicorn listens once the lifespan startup is
complete). SIGTERM: uvicorn closes its connections, then the lifespan shutdown drains the core.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import sys
from typing import Any

import structlog
import uvicorn

from gateway.asgi import Receive, Scope, Send, asgi_app
from gateway.cli import serve_parser  # the same flags as `muxgate serve`
from gateway.config import Config, ConfigError, load_config
from gateway.observability import configure_logging
from gateway.server import Gateway, _event_loop

log = structlog.get_logger("muxgate.bench.asgi")


def _config(argv: list[str]) -> tuple[Config, str]:
    parser = argparse.ArgumentParser(prog="asgi_gateway.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser(sub)
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument(
        "--uvicorn-http", default="auto", help="uvicorn's HTTP protocol (auto, h11, httptools)"
    )
    mine, rest = extra.parse_known_args(argv)
    args = parser.parse_args(["serve", *rest])
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}
    try:
        return load_config(flags=flags, toml_path=args.config), mine.uvicorn_http
    except ConfigError as exc:
        parser.exit(2, f"asgi_gateway: {exc}\n")


class _Served:
    """The adapter, plus what ``muxgate serve`` does once the core has started (GC settings,
    the ``gateway.started`` line) and the port the gateway reports as its own."""

    def __init__(self, gateway: Gateway, port: int, loop_name: str, http: str) -> None:
        self.app = asgi_app(gateway)
        self.gateway = gateway
        self.port = port
        self.loop_name = loop_name
        self.http = http

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def started(message: Any) -> None:
            if message["type"] == "lifespan.startup.complete":
                self._started()
            await send(message)

        await self.app(scope, receive, started)

    def _started(self) -> None:
        gateway, config = self.gateway, self.gateway.config
        gateway.served_port = self.port
        gc.collect()
        gc.freeze()
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(config.gc_young_threshold, older, oldest)
        log.info(
            "gateway.started",
            url=gateway.url,
            http=gateway.http_url,
            backend=config.backend,
            event_loop=self.loop_name,
            transport=f"asgi (uvicorn {uvicorn.__version__}, http {self.http}, "
            "ws websockets-sansio)",
            max_streams=config.max_streams,
            gc_threshold=gc.get_threshold(),
        )


def main(argv: list[str] | None = None) -> int:
    config, http = _config(sys.argv[1:] if argv is None else argv)
    configure_logging(config.log_format, config.log_level)
    try:
        loop_name = _event_loop(config.event_loop)
    except ConfigError as exc:
        print(f"asgi_gateway: {exc}", file=sys.stderr)
        return 2
    gateway = Gateway(config)
    uvicorn.run(
        _Served(gateway, config.port, loop_name, http),
        host=config.host,
        port=config.port,
        loop="uvloop" if loop_name == "uvloop" else "asyncio",
        http=http,
        ws="websockets-sansio",
        ws_max_size=gateway.max_message_bytes,
        ws_per_message_deflate=False,
        lifespan="on",
        access_log=False,
        log_config=None,  # keep the gateway's logging (configure_logging): JSON lines on stderr
        log_level=config.log_level.lower(),
        timeout_graceful_shutdown=max(1, math.ceil(config.shutdown_grace)),  # int s
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
