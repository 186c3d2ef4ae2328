"""Fixtures: a real gateway on an ephemeral port, in this event loop, spoken to over sockets.

``MUXGATE_TEST_TRANSPORT`` chooses what serves it: ``native`` (default) the gateway's own
transport (gateway/transport.py); ``asgi`` the ASGI adapter (gateway/asgi.py) under an
in-process uvicorn on a socket of its own. Tests marked ``native_transport`` reach into the
gateway's own transport (or start ``muxgate serve``) and are skipped under ``asgi``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from gateway.config import Config
from gateway.pipeline import Backend
from gateway.server import Gateway
from gateway.tracing import Tracing

#: Fast simulated backend for tests: short plan/tool steps, a few ms per token.
FAST = {"tokens": 20, "token_delay_ms": 2, "plan_ms": 5, "tool_ms": 5}

#: What serves the gateways of running_gateway(): "native" or "asgi" (see the module's doc).
TRANSPORT = os.environ.get("MUXGATE_TEST_TRANSPORT", "native")
if TRANSPORT not in ("native", "asgi"):
    raise pytest.UsageError(f"MUXGATE_TEST_TRANSPORT must be native or asgi, not {TRANSPORT!r}")

#: Marks the tests (``pytestmark`` for a module) that reach into the gateway's own transport
#: (its sockets and buffers, the read callback) or start ``muxgate serve``: skipped when the
#: tests run over the ASGI adapter. A skipif, so that it needs no registration wherever used.
native_transport = pytest.mark.skipif(
    TRANSPORT == "asgi", reason="the gateway's own transport (MUXGATE_TEST_TRANSPORT=asgi)"
)


@contextlib.asynccontextmanager
async def asgi_server(app: Any, host: str, **options: Any) -> AsyncIterator[int]:
    """``app`` served by an in-process uvicorn on an ephemeral port of ``host`` (pre-bound
    here, so the port is known before it starts): yields the port."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, 0))
    port = int(sock.getsockname()[1])
    settings: dict[str, Any] = {"lifespan": "off", "log_level": "warning", "access_log": False}
    config = uvicorn.Config(app, **{**settings, "http": "h11", **options})
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]), name="test-uvicorn")
    try:
        while not server.started:
            if serving.done():
                serving.result()  # raises what stopped it
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.005)
        yield port
    finally:
        server.should_exit = True
        await serving
        sock.close()


@contextlib.asynccontextmanager
async def running_gateway(
    *, backend_impl: Backend | None = None, tracing: Tracing | None = None, **settings: Any
) -> AsyncIterator[Gateway]:
    """A started gateway; ``settings`` are :class:`Config` fields, ``backend_impl`` a backend
    object to run instead of the configured one (e.g. a recording backend), ``tracing`` a
    :class:`gateway.tracing.Tracing` (e.g. exporting to memory). The simulated
    backend (the default) runs with :data:`FAST` under its ``backend_options``."""
    fast = FAST if settings.get("backend", "simulated") == "simulated" else {}
    options = {**fast, **settings.pop("backend_options", {})}
    config = Config(port=0, backend_options=options, **settings)
    gateway = Gateway(config, backend=backend_impl, tracing=tracing)
    if TRANSPORT == "asgi":
        async with _over_asgi(gateway):
            yield gateway
        return
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.shutdown(grace=0.5)


@contextlib.asynccontextmanager
async def _over_asgi(gateway: Gateway) -> AsyncIterator[None]:
    """The gateway core started without its listener, served by uvicorn through the adapter
    (its limits as the gateway's: the largest message; no compression, as the gateway's own
    transport does not negotiate it)."""
    from gateway.asgi import asgi_app

    await gateway.start(listen=False)
    stopped = False
    try:
        async with asgi_server(
            asgi_app(gateway),
            gateway.config.host,
            ws="websockets-sansio",
            ws_max_size=gateway.max_message_bytes,
            ws_per_message_deflate=False,
        ) as port:
            gateway.served_port = port
            try:
                yield
            finally:
                stopped = True  # drained while uvicorn still serves: clients get their 1001
                await gateway.shutdown(grace=0.5)
    finally:
        if not stopped:  # uvicorn did not start: the core stops all the same
            await gateway.shutdown(grace=0.5)


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    async with running_gateway() as gw:
        yield gw


@pytest.fixture
def make_gateway() -> Callable[..., Any]:
    return running_gateway


async def settled(gateway: Gateway, timeout: float = 5.0) -> None:
    """Wait until no pipeline or housekeeping task of the gateway runs any more."""
    async with asyncio.timeout(timeout):
        while gateway.tasks:
            await asyncio.wait(gateway.tasks)


@contextlib.contextmanager
def process_with_port(command: list[str], **popen: Any) -> Iterator[int]:
    """A server process that prints ``PORT <n>`` as its first line (the example A2A agent, the
    tests' agent): yields the port, terminates it afterwards (killed if it lingers)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, **popen)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("PORT "), f"{command} did not start: {line!r}"
        yield int(line.split()[1])
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
