"""A backend that blocks the event loop is reported, not silently absorbed (issue 18,
gateway/loop_lag.py): the lag histogram and the stall counter in /metrics, ``loop_lag_ms`` in
/v1/stats, one warning per stall (rate-limited). Real gateway, real sockets."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog.testing

from gateway.backends.simulated import SimulatedBackend
from gateway.loop_lag import LoopLagMonitor
from gateway.pipeline import RequestContext
from protocol import ResponseStatus

from .conftest import running_gateway
from .http_client import http
from .wire import WireClient


class BlockingBackend(SimulatedBackend):
    """The simulated pipeline, after a synchronous sleep of ``block_ms`` (metadata): the
    mistake of a pipeline step that calls blocking code from the event loop."""

    async def run(self, ctx: RequestContext) -> None:
        time.sleep(ctx.metadata.get("block_ms", 0) / 1000)  # noqa: ASYNC251 - the point
        await super().run(ctx)


def _metric(text: str, name: str) -> float:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
    return float(line.split()[1])


async def test_a_backend_blocking_the_loop_shows_in_metrics_stats_and_the_log() -> None:
    meta: dict[str, Any] = {"tokens": 5, "token_delay_ms": 0, "plan_ms": 0, "tool_ms": 0}
    async with running_gateway(backend_impl=BlockingBackend(), loop_stall_ms=100) as gw:
        async with WireClient.open(gw.url) as client:
            await client.chat("calm", metadata=meta)
            assert (await client.response("calm")).status is ResponseStatus.COMPLETED
            quiet = (await http("GET", f"{gw.http_url}/v1/stats")).json()["loop_lag_ms"]
            assert quiet["stalls"] == 0
            with structlog.testing.capture_logs() as logs:
                await client.chat("blocks", metadata={**meta, "block_ms": 300})
                assert (await client.response("blocks")).status is ResponseStatus.COMPLETED
                async with asyncio.timeout(5):  # (the timer due during the block runs after it)
                    await gw.loop_lag.stalled(1)
        stalled = [e for e in logs if e["event"] == "event_loop.stalled"]
        metrics = (await http("GET", f"{gw.http_url}/metrics")).body.decode()
        stats = (await http("GET", f"{gw.http_url}/v1/stats")).json()["loop_lag_ms"]
    assert len(stalled) == 1
    assert stalled[0]["log_level"] == "warning"
    assert stalled[0]["lag_ms"] >= 300 - 100 - 10  # the block, less the sample's interval
    assert _metric(metrics, "muxgate_event_loop_stalls_total") == 1.0
    assert _metric(metrics, "muxgate_event_loop_lag_seconds_count") >= 1
    assert stats["stalls"] == 1
    assert stats["worst_stall"] >= 190
    assert stats["max"] >= 190


async def test_stalls_are_counted_each_but_logged_at_most_once_a_second() -> None:
    monitor = LoopLagMonitor(interval=0.01, stall_threshold=0.02, log_every=60.0)
    with structlog.testing.capture_logs() as logs:
        monitor.start()
        try:
            for n in range(1, 4):
                time.sleep(0.05)  # noqa: ASYNC251 - blocking the loop is the point
                async with asyncio.timeout(5):
                    await monitor.stalled(n)
        finally:
            monitor.stop()
    assert monitor.stalls == 3
    assert len([e for e in logs if e["event"] == "event_loop.stalled"]) == 1
    summary = monitor.summary()
    assert summary["stalls"] == 3
    assert isinstance(summary["worst_stall"], float)
    assert summary["worst_stall"] >= 50 - 10 - 5
