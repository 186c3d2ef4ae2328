"""Freed memory goes back to the system (issue 18, gateway/memory_trim.py): glibc keeps what a
burst freed unless asked; the gateway asks every ``memory_trim_seconds``."""

from __future__ import annotations

import asyncio

import pytest

from gateway.config import Config, ConfigError
from gateway.memory_trim import MemoryTrimmer, malloc_trim

from .conftest import running_gateway
from .http_client import http

glibc = pytest.mark.skipif(malloc_trim is None, reason="not glibc: nothing to trim")


def _metric(text: str, name: str) -> float:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
    return float(line.split()[1])


@glibc
def test_a_trim_gives_back_what_a_burst_freed() -> None:
    """Blocks under glibc's mmap threshold come from its heap; freed between survivors, they
    stay resident until trimmed."""
    burst = [bytearray(100_000) for _ in range(400)]  # ~40 MB, touched (zeroed)
    survivors = burst[::40]  # pin the heap between the holes
    del burst
    trimmer = MemoryTrimmer(interval=0)
    returned = trimmer.trim()
    assert survivors
    assert returned >= 16 << 20, f"{returned / (1 << 20):.1f} MiB given back"
    assert (trimmer.trims, trimmer.returned_bytes) == (1, returned)


@glibc
async def test_the_gateway_trims_on_its_interval_and_says_so_in_metrics() -> None:
    async with running_gateway(memory_trim_seconds=0.05) as gw:
        assert gw.memory_trim.enabled
        async with asyncio.timeout(10):
            await gw.memory_trim.trimmed(2)
        metrics = (await http("GET", f"{gw.http_url}/metrics")).body.decode()
    assert _metric(metrics, "muxgate_memory_trims") >= 2
    assert _metric(metrics, "muxgate_memory_returned_bytes") >= 0


async def test_zero_turns_trimming_off_and_a_negative_interval_is_refused() -> None:
    async with running_gateway(memory_trim_seconds=0) as gw:
        assert not gw.memory_trim.enabled
        metrics = (await http("GET", f"{gw.http_url}/metrics")).body.decode()
    assert _metric(metrics, "muxgate_memory_trims") == 0
    with pytest.raises(ConfigError, match="memory_trim_seconds"):
        Config(memory_trim_seconds=-1)
