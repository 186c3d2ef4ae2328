"""Live statistics for the dashboard: plain counters updated once per request event (never per
chunk), a snapshot as JSON, and a feed that pushes a snapshot to every subscriber of
``/v1/stats`` (a WebSocket without subprotocol) every ``stats_interval_ms``.

The feed is a broadcast of one encoded frame to all subscribers: stats are snapshots, each
supersedes the last, so a subscriber whose socket buffer is still full simply misses a tick
instead of growing a queue (bounded memory whatever the subscriber does).

Subscribers come in two pools: anonymous ones, at most ``max_stats_subscribers``, and operators
(a valid client key in the handshake's ``X-Muxi-Client-Key``), at most
``max_operator_stats_subscribers``, so anonymous subscribers can never lock the operator's
dashboard out. Whether a caller may subscribe at all (``stats_public``) is decided before the
handshake, in :mod:`gateway.http_api`. A subscriber leaving without a close handshake (a reset
TCP connection) is its own business: nothing is logged.

The snapshot (:meth:`LiveStats.snapshot`, ``GET /v1/stats`` and every feed frame) has the keys of
SPEC.md §8 (``type`` … ``tokens``), then three about where and how cancelled pipelines stopped,
each taken once per cancelled request, when its pipeline halts:

``cancels_by_step``
    Cancelled requests by the kind of the last step their pipeline had started when it halted
    (where the cancel landed): ``plan``, ``llm``, ``tool``, ``agent``, ``llm_stream`` (the kinds
    of :class:`~gateway.pipeline.StepRecord`), ``none`` when no step had started yet, ``other``
    for a kind a backend made up. Counts since the start.
``halt_latency_ms``
    From reading the cancel to the pipeline halting (the model stopped; a non-abortable step
    runs to its end first), in milliseconds: ``count``, ``p50``, ``p90``, ``p99`` and ``max``
    over the last 1,000 cancelled requests (null before the first), ``recent`` the samples
    since the previous frame (at most 500), like ``cancel_latency_ms``.
``tokens_after_cancel``
    Tokens an abortable stream produced after the cancel flag was set: ``total`` since the
    start, ``histogram`` the cancelled requests by that number (``"0"``, ``"1"``, ``"2"``,
    ``"3+"``; since the start), and ``count``, ``p99`` and ``max`` over the last 1,000 cancelled
    requests (null before the first).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Final, Protocol, TypeVar

import orjson
from websockets.exceptions import ConnectionClosed

from protocol import CancelReason, CloseCode, ResponseStatus

from .auth import Authenticator, AuthError

__all__ = ["STATS_PATH", "LiveStats", "StatsFeed", "is_operator"]

STATS_PATH: Final = "/v1/stats"

#: Cancel latencies kept for the percentiles; "recent" samples kept between two ticks.
LATENCY_WINDOW: Final = 1000
RECENT_MAX: Final = 500
#: The step kinds of :class:`~gateway.pipeline.StepRecord`, and "none" (no step had started);
#: any other kind is counted as "other" (the keys stay bounded whatever a backend names).
STEP_KINDS: Final = ("none", "plan", "llm", "tool", "agent", "llm_stream")
OTHER_STEP: Final = "other"
#: Buckets of the tokens-after-cancel histogram: 0, 1, 2, then everything above.
LATE_TOKEN_BUCKETS: Final = ("0", "1", "2", "3+")
#: A subscriber with more than this many bytes not yet written misses the tick.
SUBSCRIBER_BUFFER_LIMIT: Final = 64 * 1024


_Number = TypeVar("_Number", int, float)


def _percentile(sorted_values: Sequence[_Number], q: float) -> _Number:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def _latency_summary(
    window: deque[float], recent: deque[float], quantiles: tuple[tuple[str, float], ...]
) -> dict[str, object]:
    """``count``, the ``quantiles`` and ``max`` of ``window`` (null when empty), and
    ``recent``, all in milliseconds rounded to the microsecond."""
    values = sorted(window)
    summary: dict[str, object] = {"count": len(values)}
    for name, q in quantiles:
        summary[name] = round(_percentile(values, q), 3) if values else None
    summary["max"] = round(values[-1], 3) if values else None
    summary["recent"] = [round(ms, 3) for ms in recent]
    return summary


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
        self.cancels_by_step = dict.fromkeys((*STEP_KINDS, OTHER_STEP), 0)
        self._halts: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._recent_halts: deque[float] = deque(maxlen=RECENT_MAX)
        self.tokens_after_cancel_total = 0
        self.tokens_after_cancel_histogram = dict.fromkeys(LATE_TOKEN_BUCKETS, 0)
        self._late_tokens: deque[int] = deque(maxlen=LATENCY_WINDOW)
        self._tick_at = self.started
        self._tick_requests = 0
        self._summary_at = self.started
        self._summary_requests = 0
        #: In a cluster: the per-node and cluster view (the snapshot's ``cluster`` key), made
        #: from this node's :meth:`summary` and its peers' (gateway/cluster.py).
        self.cluster_view: Callable[[], dict[str, object]] | None = None
        #: The event loop's lag (gateway/loop_lag.py): the snapshot's ``loop_lag_ms``.
        self.loop_lag: Callable[[], dict[str, object]] | None = None

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

    def cancel_halted(self, step: str | None, seconds: float, tokens_after_cancel: int) -> None:
        """A cancelled request's pipeline halted: ``step`` is the kind of the last step it had
        started (None: none had), ``seconds`` the time from reading the cancel to the halt,
        ``tokens_after_cancel`` the tokens its stream produced after the flag was set."""
        kind = "none" if step is None else step
        if kind not in self.cancels_by_step:
            kind = OTHER_STEP
        self.cancels_by_step[kind] += 1
        ms = max(0.0, seconds) * 1000.0
        self._halts.append(ms)
        self._recent_halts.append(ms)
        late = max(0, tokens_after_cancel)
        self.tokens_after_cancel_total += late
        self.tokens_after_cancel_histogram[LATE_TOKEN_BUCKETS[min(late, 3)]] += 1
        self._late_tokens.append(late)

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
        late = sorted(self._late_tokens)
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
            "cancel_latency_ms": _latency_summary(
                self._latencies, self._recent, (("p50", 0.50), ("p99", 0.99))
            ),
            "tokens": dict(self.tokens),
            # Not (yet) in SPEC.md §8: see the module docstring.
            "cancels_by_step": dict(self.cancels_by_step),
            "halt_latency_ms": _latency_summary(
                self._halts, self._recent_halts, (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))
            ),
            "tokens_after_cancel": {
                "total": self.tokens_after_cancel_total,
                "histogram": dict(self.tokens_after_cancel_histogram),
                "count": len(late),
                "p99": _percentile(late, 0.99) if late else None,
                "max": late[-1] if late else None,
            },
            **({"loop_lag_ms": self.loop_lag()} if self.loop_lag is not None else {}),
            **({"cluster": self.cluster_view()} if self.cluster_view is not None else {}),
        }

    def summary(self) -> dict[str, object]:
        """This node's figures for the others' cluster view (sent with each heartbeat, about
        half a kilobyte): counts, and the rate since the previous summary."""
        now = self._clock()
        elapsed = now - self._summary_at
        rate = (self.requests_total - self._summary_requests) / elapsed if elapsed > 0 else 0.0
        self._summary_at, self._summary_requests = now, self.requests_total
        latencies = sorted(self._latencies)
        return {
            "connections": self._connections(),
            "active_requests": self.requests_total - sum(self.responses.values()),
            "requests_total": self.requests_total,
            "requests_per_second": round(rate, 3),
            "responses": dict(self.responses),
            "cancellations": dict(self.cancellations),
            "cancel_latency_ms": {
                "count": len(latencies),
                "p50": round(_percentile(latencies, 0.50), 3) if latencies else None,
                "p99": round(_percentile(latencies, 0.99), 3) if latencies else None,
            },
            "tokens": dict(self.tokens),
        }

    def tick(self) -> bytes:
        """The snapshot for one feed frame, encoded; starts a new interval for the rate and
        the recent samples."""
        frame = orjson.dumps(self.snapshot())
        self._tick_at = self._clock()
        self._tick_requests = self.requests_total
        self._recent.clear()
        self._recent_halts.clear()
        return frame


def is_operator(auth: Authenticator | None, headers: Mapping[str, str]) -> bool:
    """True when ``headers`` carry a valid client key (a JWT user is not an operator).

    Missing, invalid or ambiguous credentials are just "not an operator" here; refusing them is
    the HTTP layer's decision (``stats_public``). The key is checked in constant time by
    :class:`~gateway.auth.Authenticator`.
    """
    if auth is None or not auth.required:
        return False  # dev mode: no client key exists, so nobody is an operator
    try:
        principal = auth.from_headers(headers)
    except AuthError:
        return False
    return principal is not None and principal.kind == "client_key"


class FeedSocket(Protocol):
    """What the feed needs of a subscriber's WebSocket (see gateway.transport.WebSocket)."""

    @property
    def buffered(self) -> int:
        """Bytes written and not yet taken by the peer's TCP stack."""

    @property
    def open(self) -> bool: ...

    def write(self, data: bytes, text: bool) -> None: ...

    async def close(self, code: int, reason: str, close_timeout: float) -> None: ...


class StatsFeed:
    """Subscribers of ``/v1/stats`` and the one task that ticks while there is any.

    ``max_subscribers`` bounds the anonymous subscribers; ``max_operator_subscribers`` those
    presenting a valid client key (checked with ``auth``; without ``auth`` nobody is one).
    """

    def __init__(
        self,
        stats: LiveStats,
        interval: float,
        max_subscribers: int,
        *,
        max_operator_subscribers: int = 8,
        auth: Authenticator | None = None,
    ) -> None:
        self._stats = stats
        self._interval = interval
        self._max = max_subscribers
        self._max_operators = max_operator_subscribers
        self._auth = auth
        #: Every subscriber (what the ticker broadcasts to); the operators are also in
        #: ``_operators``.
        self._subscribers: set[FeedSocket] = set()
        self._operators: set[FeedSocket] = set()
        self._ticker: asyncio.Task[None] | None = None

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    @property
    def operator_subscribers(self) -> int:
        return len(self._operators)

    def subscribe(self, socket: FeedSocket, headers: Mapping[str, str]) -> _Subscriber | None:
        """Add a subscriber and send it its first snapshot; None if the feed is full (the
        caller closes it with 1013). What the subscriber sends is read and ignored."""
        operator = is_operator(self._auth, headers)
        if operator:
            full = len(self._operators) >= self._max_operators
        else:
            full = len(self._subscribers) - len(self._operators) >= self._max
        if full:
            return None
        self._subscribers.add(socket)
        if operator:
            self._operators.add(socket)
        # The first frame is a snapshot of its own (it must not reset the shared interval),
        # written now, so no tick can come before it.
        with contextlib.suppress(ConnectionClosed):
            socket.write(orjson.dumps(self._stats.snapshot()), True)
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.create_task(self._tick(), name="muxgate-stats")
        return _Subscriber(self, socket)

    def _unsubscribe(self, socket: FeedSocket) -> None:
        self._subscribers.discard(socket)
        self._operators.discard(socket)

    async def _tick(self) -> None:
        while self._subscribers:
            await asyncio.sleep(self._interval)
            frame = self._stats.tick()
            for socket in list(self._subscribers):
                # A subscriber whose socket is not draining misses ticks (bounded buffer).
                if socket.open and socket.buffered <= SUBSCRIBER_BUFFER_LIMIT:
                    with contextlib.suppress(ConnectionClosed):  # going: lost() removes it
                        socket.write(frame, True)

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
                *(s.close(CloseCode.GOING_AWAY, "server shutdown", 1.0) for s in subscribers),
                return_exceptions=True,
            )


class _Subscriber:
    """A feed subscriber's WebSocket handler: ignores what it is sent, leaves when lost."""

    __slots__ = ("_feed", "_socket")

    def __init__(self, feed: StatsFeed, socket: FeedSocket) -> None:
        self._feed = feed
        self._socket = socket

    def message(self, data: bytes, text: bool) -> None:
        pass  # nothing to say to the feed

    def lost(self) -> None:
        self._feed._unsubscribe(self._socket)
