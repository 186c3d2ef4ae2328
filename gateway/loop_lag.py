"""How late the event loop runs (issue 18): a backend that blocks the loop is reported, not
silently absorbed.

Everything a gateway does for its connections — writing chunks, reading a cancel, answering a
ping — runs on one event loop. A pipeline step that blocks it (a synchronous HTTP call, a
CPU-bound parse, ``time.sleep``) delays all of them at once, and nothing else shows it: the
requests still complete, only later. This monitor measures it: a timer due every ``interval``
records how late it ran (the loop's lag at that moment). Lags are kept for the last ``window``
samples (their p50/p99/max and the stalls are in ``/v1/stats`` under ``loop_lag_ms``, and in
``/healthz``); each sample feeds the histogram ``muxgate_event_loop_lag_seconds``; a lag over
``stall_threshold`` is a stall: it counts in ``muxgate_event_loop_stalls`` and logs a warning
``event_loop.stalled`` with its length — at most one line per ``log_every`` seconds (a loop
blocked often must not flood the log; the counter has them all).

Cost: one timer callback per interval (ten a second by default), nothing per request or chunk.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable

from .observability import log

__all__ = ["LoopLagMonitor"]


class LoopLagMonitor:
    """Samples the running loop's lag; ``start()`` from inside the loop, ``stop()`` to end."""

    def __init__(
        self,
        *,
        interval: float = 0.1,
        stall_threshold: float = 0.1,
        window: int = 600,
        log_every: float = 1.0,
        on_sample: Callable[[float], object] | None = None,
        on_stall: Callable[[float], object] | None = None,
    ) -> None:
        self.interval = interval
        self.stall_threshold = stall_threshold
        self.log_every = log_every
        #: Called with each sample's lag (seconds), and with each stall's.
        self.on_sample = on_sample
        self.on_stall = on_stall
        self._lags: deque[float] = deque(maxlen=window)
        self.last = 0.0
        self.stalls = 0
        #: The longest stall since the start (seconds).
        self.worst = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._logged_at = -math.inf
        self._unlogged = 0
        self._stall_seen: asyncio.Event | None = None

    def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._due = loop.time() + self.interval
        self._timer = loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        lag = max(0.0, now - self._due)
        self.last = lag
        self._lags.append(lag)
        if self.on_sample is not None:
            self.on_sample(lag)
        if lag >= self.stall_threshold:
            self._stalled(lag, now)
        self._due = now + self.interval
        self._timer = loop.call_at(self._due, self._tick)

    def _stalled(self, lag: float, now: float) -> None:
        self.stalls += 1
        self.worst = max(self.worst, lag)
        if self._stall_seen is not None:
            self._stall_seen.set()
        if self.on_stall is not None:
            self.on_stall(lag)
        if now - self._logged_at < self.log_every:
            self._unlogged += 1
            return
        log.warning(
            "event_loop.stalled",
            lag_ms=round(lag * 1000, 1),
            stalls_not_logged=self._unlogged,
            detail="something blocked the event loop (a synchronous call in a pipeline?): "
            "every connection waited",
        )
        self._logged_at = now
        self._unlogged = 0

    async def stalled(self, count: int) -> None:
        """Until at least ``count`` stalls were seen (for tests and operators' tools)."""
        while self.stalls < count:
            if self._stall_seen is None:
                self._stall_seen = asyncio.Event()
            self._stall_seen.clear()
            await self._stall_seen.wait()

    def summary(self) -> dict[str, object]:
        """For ``/v1/stats`` and ``/healthz``: the recent samples' p50, p99 and max (ms), the
        stalls and the worst one since the start."""
        lags = sorted(self._lags)

        def ms(value: float) -> float:
            return round(value * 1000, 2)

        def pct(q: float) -> float | None:
            return ms(lags[max(0, math.ceil(q * len(lags)) - 1)]) if lags else None

        return {
            "p50": pct(0.50),
            "p99": pct(0.99),
            "max": ms(lags[-1]) if lags else None,
            "stalls": self.stalls,
            "worst_stall": ms(self.worst) if self.stalls else None,
        }
