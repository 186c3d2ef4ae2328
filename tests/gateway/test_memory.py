"""The process's memory (issue 18, gateway/memory.py): what is live, read apart from RSS; and
freed memory given back to the system — glibc keeps what a burst freed unless asked, and the
gateway asks every ``memory_trim_seconds``."""

from __future__ import annotations

import asyncio

import pytest

from gateway.config import Config, ConfigError
from gateway.memory import MemoryTrimmer, in_use, malloc_trim

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
def test_live_memory_counts_what_is_allocated_not_what_is_resident() -> None:
    before = in_use()
    held = [bytearray(100_000) for _ in range(100)]  # ~10 MB live
    during = in_use()
    del held
    after = in_use()
    assert during["malloc_bytes"] - before["malloc_bytes"] >= 9_000_000
    assert after["malloc_bytes"] - before["malloc_bytes"] < 1_000_000  # freed: not counted
    assert during["python_blocks"] > 0


@glibc
async def test_the_gateway_trims_on_its_interval_and_says_so_in_metrics() -> None:
    async with running_gateway(memory_trim_seconds=0.05) as gw:
        assert gw.memory_trim.enabled
        async with asyncio.timeout(10):
            await gw.memory_trim.trimmed(2)
        metrics = (await http("GET", f"{gw.http_url}/metrics")).body.decode()
    assert _metric(metrics, "muxgate_memory_trims") >= 2
    assert _metric(metrics, "muxgate_memory_returned_bytes") >= 0
    assert _metric(metrics, "muxgate_memory_malloc_bytes") > 0  # what is live, not RSS
    assert _metric(metrics, "muxgate_memory_python_blocks") > 0


async def test_zero_turns_trimming_off_and_a_negative_interval_is_refused() -> None:
    async with running_gateway(memory_trim_seconds=0) as gw:
        assert not gw.memory_trim.enabled
        metrics = (await http("GET", f"{gw.http_url}/metrics")).body.decode()
    assert _metric(metrics, "muxgate_memory_trims") == 0
    with pytest.raises(ConfigError, match="memory_trim_seconds"):
        Config(memory_trim_seconds=-1)
