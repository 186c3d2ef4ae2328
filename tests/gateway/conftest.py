"""Fixtures: a real gateway on an ephemeral port, in this event loop, spoken to over sockets."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from gateway.config import Config
from gateway.pipeline import Backend
from gateway.server import Gateway

#: Fast simulated backend for tests: short plan/tool steps, a few ms per token.
FAST = {"tokens": 20, "token_delay_ms": 2, "plan_ms": 5, "tool_ms": 5}


@contextlib.asynccontextmanager
async def running_gateway(
    *, backend_impl: Backend | None = None, **settings: Any
) -> AsyncIterator[Gateway]:
    """A started gateway; ``settings`` are :class:`Config` fields, ``backend_impl`` a backend
    object to run instead of the configured one (e.g. a recording backend). The simulated
    backend (the default) runs with :data:`FAST` under its ``backend_options``."""
    fast = FAST if settings.get("backend", "simulated") == "simulated" else {}
    options = {**fast, **settings.pop("backend_options", {})}
    config = Config(port=0, backend_options=options, **settings)
    gateway = Gateway(config, backend=backend_impl)
    await gateway.start()
    try:
        yield gateway
    finally:
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
