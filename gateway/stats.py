"""Live statistics for the dashboard: plain counters updated once per request event (never per
chunk), a snapshot as JSON, and a feed that pushes a snapshot to every subscriber of
``/v1/stats`` (a WebSocket without subprotocol) every ``stats_interval_ms``.

The feed is a broadcast of one encoded frame to all subscribers: stats are snapshots, each
supersedes the last, so a subscriber whose socket buffer is still full simply misses a tick
instead of growing a queue (bounded memory whatever the subscriber does).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Final

import orjson
from websockets.asyncio.server import ServerConnection, broadcast

from protocol import CancelReason, CloseCode, ResponseStatus

__all__ = ["STATS_PATH", "LiveStats", "StatsFeed"]

STATS_PATH: Final = "/v1/stats"

#: Cancel latencies kept for the percentiles; "recent" samples kept between two ticks.
LATENCY_WINDOW: Final = 1000
RECENT_MAX: Final = 500
#: A subscriber with more than this many bytes not yet written misses the tick.
SUBSCRIBER_BUFFER_LIMIT: Final = 64 * 1024


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


class LiveStats:
    """Counters behind the dashboard. Every method is O(1) and runs once per request event."""

    def __init__(self, connections: Callable[[], int], clock: Callable[[], float]) -> None:
        self._connections = connections
        self._clock = clock
        self.started = clock()
        self.requests_total = 0
        self.responses = {status.value: 0 for status in ResponseStatus}
        self.cancellations = {reason.value: 0 for reason in CancelReason}
        self.tokens = {"input": 0, "output": 0, "saved": 0}
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._recent: deque[float] = deque(maxlen=RECENT_MAX)
        self._tick_at = self.started
        self._tick_requests = 0

    # -- events ------------------------------------------------------------------------------

    def request_started(self) -> None:
        self.requests_total += 1

    def request_answered(self, status: ResponseStatus, reason: CancelReason | None) -> None:
        self.responses[status.value] += 1
        if reason is not None:
            self.cancellations[reason.value] += 1

    def cancel_latency(self, seconds: float) -> None:
        ms = seconds * 1000.0
        self._latencies.append(ms)
        self._recent.append(ms)

    def tokens_used(self, input_tokens: int, output_tokens: int, saved_tokens: int) -> None:
        self.tokens["input"] += input_tokens
        self.tokens["output"] += output_tokens
        self.tokens["saved"] += saved_tokens

    # -- snapshots ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        """The current figures (SPEC.md §8, ``GET /v1/stats``); does not start a new tick."""
        now = self._clock()
        # Active = started and not yet answered (the muxgate_active_requests gauge).
        active = self.requests_total - sum(self.responses.values())
        elapsed = now - self._tick_at
        rate = (self.requests_total - self._tick_requests) / elapsed if elapsed > 0 else 0.0
        latencies = sorted(self._latencies)
        latency: dict[str, object] = {"count": len(latencies)}
        if latencies:
            latency.update(
                p50=round(_percentile(latencies, 0.50), 3),
                p99=round(_percentile(latencies, 0.99), 3),
                max=round(latencies[-1], 3),
            )
        else:
            latency.update(p50=None, p99=None, max=None)
        latency["recent"] = [round(ms, 3) for ms in self._recent]
        return {
            "type": "stats",
            "time_ms": int(time.time() * 1000),
            "uptime_s": round(now - self.started, 3),
            "connections": self._connections(),
            "active_requests": active,
            "requests_total": self.requests_total,
            "requests_per_second": round(rate, 3),
            "responses": dict(self.responses),
            "cancellations": dict(self.cancellations),
            "cancel_latency_ms": latency,
            "tokens": dict(self.tokens),
        }

    def tick(self) -> bytes:
        """The snapshot for one feed frame, encoded; starts a new interval for the rate and
        the recent samples."""
        frame = orjson.dumps(self.snapshot())
        self._tick_at = self._clock()
        self._tick_requests = self.requests_total
        self._recent.clear()
        return frame


class StatsFeed:
    """Subscribers of ``/v1/stats`` and the one task that ticks while there is any."""

    def __init__(self, stats: LiveStats, interval: float, max_subscribers: int) -> None:
        self._stats = stats
        self._interval = interval
        self._max = max_subscribers
        self._subscribers: set[ServerConnection] = set()
        self._ticker: asyncio.Task[None] | None = None

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    async def serve(self, ws: ServerConnection) -> None:
        """Run one subscriber until it leaves; messages it sends are read and ignored."""
        if len(self._subscribers) >= self._max:
            await ws.close(CloseCode.TRY_AGAIN_LATER, "too many stats subscribers")
            return
        # The first frame is a snapshot of its own (it must not reset the shared interval).
        await ws.send(orjson.dumps(self._stats.snapshot()), text=True)
        self._subscribers.add(ws)
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.create_task(self._tick(), name="muxgate-stats")
        try:
            async for _ in ws:
                pass  # nothing to say to the feed; reading keeps close handshakes working
        finally:
            self._subscribers.discard(ws)

    async def _tick(self) -> None:
        while self._subscribers:
            await asyncio.sleep(self._interval)
            ready = [
                ws
                for ws in self._subscribers
                if ws.transport.get_write_buffer_size() <= SUBSCRIBER_BUFFER_LIMIT
            ]
            broadcast(ready, self._stats.tick(), text=True)

    async def idle(self) -> None:
        """Return once no subscriber is left and the ticker has stopped."""
        if self._ticker is not None:
            await asyncio.wait([self._ticker])

    async def close(self) -> None:
        """Shutdown: close every subscriber with 1001 and stop ticking."""
        if self._ticker is not None:
            self._ticker.cancel()
        subscribers = list(self._subscribers)
        if subscribers:
            await asyncio.gather(
                *(ws.close(CloseCode.GOING_AWAY, "server shutdown") for ws in subscribers),
                return_exceptions=True,
            )
