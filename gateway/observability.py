"""Logs and metrics: one structlog line per request event (never per chunk), Prometheus metrics.

Hot-path discipline: nothing here runs per chunk. Chunk and frame totals are plain integer
counters on each connection's :class:`Outbound`, read by a custom collector at scrape time.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from protocol import ResponseStatus

from .registry import RequestStatus
from .stats import LiveStats

if TYPE_CHECKING:
    from .cluster import Cluster
    from .loop_lag import LoopLagMonitor
    from .memory import MemoryTrimmer
    from .relay import RelayHub
    from .request import Request

__all__ = ["GatewayObserver", "configure_logging"]

log = structlog.get_logger("muxgate")

# Cancel-to-terminal latency is sub-millisecond when healthy; buckets resolve that range.
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5)


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """structlog: JSON lines, or a console renderer when attached to a terminal."""
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Records of the standard library's logging (websockets, asyncio) come out in the same
    # format, with their level: otherwise Python's last-resort handler prints them as bare
    # text, a traceback in the middle of JSON lines that no log pipeline can parse.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.getLevelNamesMapping()[level.upper()])
    # websockets logs every connection opened and closed at info: ours says what matters.
    logging.getLogger("websockets").setLevel(max(logging.WARNING, root.level))


class _TotalsCollector(Collector):
    def __init__(self, totals: Callable[[], tuple[int, int]]) -> None:
        self._totals = totals

    def collect(self) -> Iterator[CounterMetricFamily]:
        chunks, frames = self._totals()
        yield CounterMetricFamily("muxgate_chunks_sent", "Chunk messages sent.", value=chunks)
        yield CounterMetricFamily("muxgate_frames_sent", "WebSocket frames sent.", value=frames)


class GatewayObserver:
    """Implements :class:`request.RequestObserver`; owns this gateway's metrics registry."""

    def __init__(self, totals: Callable[[], tuple[int, int]], live: LiveStats) -> None:
        self.live = live
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge("muxgate_connections", "Open WebSocket connections.", registry=r)
        self.active_requests = Gauge(
            "muxgate_active_requests", "Requests without a terminal response.", registry=r
        )
        self.responses = Counter(
            "muxgate_responses",
            "Terminal responses by status and cancel reason.",
            ["status", "reason"],
            registry=r,
        )
        self.cancel_latency = Histogram(
            "muxgate_cancel_latency_seconds",
            "From reading a cancel to writing the cancelled response.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.halt_latency = Histogram(
            "muxgate_halt_latency_seconds",
            "From reading a cancel to the pipeline halting at its checkpoint.",
            registry=r,
        )
        self.tokens = Counter(
            "muxgate_tokens", "Tokens consumed, by kind (input, output).", ["kind"], registry=r
        )
        self.saved_tokens = Counter(
            "muxgate_saved_tokens", "Estimated tokens not consumed thanks to cancels.", registry=r
        )
        self.errors = Counter(
            "muxgate_errors", "Error messages sent, by code.", ["code"], registry=r
        )
        r.register(_TotalsCollector(totals))

    def watch_cluster(self, cluster: Cluster) -> None:
        """A cluster node's link to the others, read at each scrape."""
        r = self.registry
        linked = Gauge(
            "muxgate_cluster_nats_connected", "1 while this node reaches NATS.", registry=r
        )
        linked.set_function(lambda: 1.0 if cluster.connected else 0.0)
        peers = Gauge("muxgate_cluster_peers", "Other nodes heard from recently.", registry=r)
        peers.set_function(lambda: float(len(cluster.live_peers())))
        dropped = Gauge(
            "muxgate_cluster_claims_dropped",
            "Request claims not recorded (NATS too slow): node loss would miss them.",
            registry=r,
        )
        dropped.set_function(lambda: float(cluster.claims_dropped))

    def watch_held(self, kinds: tuple[str, ...], held: Callable[[], dict[str, int]]) -> None:
        """What the gateway holds in memory besides its connections and running requests,
        read at each scrape: a soak's flat lines (bench/soak.py) are these."""
        gauge = Gauge(
            "muxgate_held",
            "Objects held in memory, by kind: retained records, tombstones, resumable and "
            "detached requests, asyncio tasks.",
            ["kind"],
            registry=self.registry,
        )
        for kind in kinds:
            gauge.labels(kind).set_function(lambda kind=kind: float(held()[kind]))  # type: ignore[misc]

    def watch_loop(self, monitor: LoopLagMonitor) -> None:
        """The event loop's lag (gateway/loop_lag.py): each sample, and each stall."""
        r = self.registry
        lag = Histogram(
            "muxgate_event_loop_lag_seconds",
            "How late a timer due every loop_lag_interval_ms ran: the event loop's lag.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        stalls = Counter(
            "muxgate_event_loop_stalls",
            "Lags of at least loop_stall_ms: something blocked the event loop.",
            registry=r,
        )
        monitor.on_sample = lag.observe
        monitor.on_stall = lambda _lag: stalls.inc()

    def watch_memory(self, trimmer: MemoryTrimmer) -> None:
        """What the process holds live, and the memory given back to the system
        (gateway/memory.py), read at each scrape."""
        from .memory import in_use  # (memory.py logs through this module)

        r = self.registry
        trims = Gauge(
            "muxgate_memory_trims",
            "Times freed memory was given back to the system since start (malloc_trim).",
            registry=r,
        )
        trims.set_function(lambda: float(trimmer.trims))
        returned = Gauge(
            "muxgate_memory_returned_bytes",
            "RSS given back to the system by those trims since start, summed.",
            registry=r,
        )
        returned.set_function(lambda: float(trimmer.returned_bytes))
        malloc_bytes = Gauge(
            "muxgate_memory_malloc_bytes",
            "Bytes allocated and live in the C allocator (glibc mallinfo2; -1: unknown): unlike "
            "RSS, neither freed memory kept for reuse nor fragmentation counts.",
            registry=r,
        )
        malloc_bytes.set_function(lambda: float(in_use()["malloc_bytes"]))
        blocks = Gauge(
            "muxgate_memory_python_blocks",
            "Blocks allocated and live in Python's small-object allocator (pymalloc).",
            registry=r,
        )
        blocks.set_function(lambda: float(in_use()["python_blocks"]))

    def watch_relays(self, relays: RelayHub) -> None:
        """Resumes across nodes (gateway/relay.py), read at each scrape."""
        r = self.registry
        relayed = Gauge(
            "muxgate_cluster_relays",
            "Requests relayed between nodes now: sending (run here, client elsewhere) or "
            "receiving (client here, run elsewhere).",
            ["direction"],
            registry=r,
        )
        relayed.labels("sending").set_function(lambda: float(len(relays.senders)))
        relayed.labels("receiving").set_function(lambda: float(len(relays.receivers)))
        total = Gauge(
            "muxgate_cluster_relayed",
            "Requests this node has relayed to another node's client since it started.",
            registry=r,
        )
        total.set_function(lambda: float(relays.relayed))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- RequestObserver ---------------------------------------------------------------------

    def request_started(self, request: Request) -> None:
        self.active_requests.inc()
        self.live.request_started()

    def request_answered(self, request: Request) -> None:
        self.active_requests.dec()
        status = "cancelled" if request.reason is not None else request.status.value
        reason = request.reason.value if request.reason is not None else ""
        self.responses.labels(status, reason).inc()
        self.live.request_answered(ResponseStatus(status), request.reason)

    def cancel_sent(self, request: Request) -> None:
        if request.cancel_read_at is not None and request.cancel_sent_at is not None:
            latency = request.cancel_sent_at - request.cancel_read_at
            self.cancel_latency.observe(latency)
            self.live.cancel_latency(latency)

    def request_halted(self, request: Request) -> None:
        usage = request.ctx.usage
        self.tokens.labels("input").inc(usage.input_tokens)
        self.tokens.labels("output").inc(usage.output_tokens)
        cancelled = request.status is RequestStatus.CANCELLED
        self.live.tokens_used(
            usage.input_tokens, usage.output_tokens, usage.saved_tokens if cancelled else 0
        )
        key = request.key
        fields: dict[str, object] = {
            "request_id": key.request_id,
            "user_id": key.user_id,
            "status": request.status.value,
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "duration_ms": round((request.halted_at or 0.0) * 1000 - request.started * 1000, 3),
        }
        if request.status is RequestStatus.CANCELLED and request.cancel_read_at is not None:
            saved = usage.saved_tokens
            self.saved_tokens.inc(saved)
            halt = (request.halted_at or request.cancel_read_at) - request.cancel_read_at
            self.halt_latency.observe(halt)
            # Where the cancel landed: the last step the pipeline had started (SPEC.md G5: none
            # starts after the flag), how long it took to stop, and the tokens produced meanwhile.
            steps = request.ctx.steps
            self.live.cancel_halted(
                steps[-1].kind if steps else None, halt, request.ctx.tokens_after_cancel
            )
            if request.cancel_sent_at is not None:
                sent = request.cancel_sent_at - request.cancel_read_at
                fields["cancel_to_terminal_ms"] = round(sent * 1000, 3)
            fields.update(
                reason=request.reason.value if request.reason else None,
                halt_ms=round(halt * 1000, 3),
                saved_tokens=saved,
                tokens_after_cancel=request.ctx.tokens_after_cancel,
                steps=len(request.ctx.steps),
            )
            log.info("request.cancelled", **fields)
        elif request.status is RequestStatus.FAILED:
            if request.error is not None:
                fields["error_code"] = request.error.code
            if request.failure_expected:
                # Explained to the client (its bad input, an answer too large, a failure the
                # backend expects): one line like any request's, no traceback; a client can
                # cause these at will, so never above info.
                log.info("request.failed", **fields)
            else:  # a bug in the backend: worth a traceback
                log.error("request.failed", exc_info=request.failure, **fields)
        else:
            log.info("request.finished", **fields)
