"""What the bare ``websockets`` peers share (bench/ceiling_server.py, bench/batched_server.py):
serving a handler on the muxgate subprotocols until SIGTERM/SIGINT, on the event loop the gateway
picks ("auto": uvloop when installed), so each peer is the same server minus muxgate; and reading
(and dropping) what a client sends, so close handshakes work."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

import protocol


async def drain_inbound(ws: ServerConnection) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for _ in ws:
            pass


def run_peer(handler: Callable[[ServerConnection], Awaitable[None]], host: str, port: int) -> int:
    """Serve ``handler``; print ``ready`` once listening; return 0 after SIGTERM/SIGINT."""

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with serve(
            handler,
            host,
            port,
            subprotocols=[Subprotocol(s) for s in protocol.SUBPROTOCOLS],
            compression=None,
        ):
            print("ready", flush=True)
            await stop.wait()

    try:
        import uvloop
    except ImportError:
        asyncio.run(run())
    else:
        uvloop.run(run())
    return 0
