"""The gateway process: one event loop, one port for WebSockets and HTTP (gateway.transport).

:class:`Gateway` owns what is shared by connections (config, backend, auth, request registry,
metrics) and the shutdown sequence (SPEC.md §5.5, issue: SIGTERM/SIGINT): stop accepting, let
in-flight requests finish within the grace period, cancel the rest with reason "shutdown", close
connections with 1001.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from collections.abc import Awaitable, Sequence
from typing import Any, Protocol

import structlog
from websockets.exceptions import NegotiationError
from websockets.typing import Subprotocol

import protocol
from protocol import CancelReason, CloseCode, Codec

from .auth import Authenticator
from .backends import load_backend
from .cluster import Cluster, ClusterRegistry, default_node_id
from .config import Config, ConfigError
from .connection import Channel, Connection, ConnectionServices
from .http_api import HttpServices, respond, upgrade_refusal
from .loop_lag import LoopLagMonitor
from .memory import MemoryTrimmer
from .multiplexer import MultiplexerServices
from .observability import GatewayObserver, configure_logging
from .pipeline import Backend, BackendInfo
from .registry import InMemoryRegistry, RequestRegistry
from .relay import RelayHub
from .resume import Resumables
from .stats import STATS_PATH, FeedSocket, LiveStats, StatsFeed
from .tracing import Tracing
from .tracing import from_config as tracing_from_config
from .transport import HttpConnection, HttpRequest, HttpResponse, WebSocketHandler, serve
from .webui import WebUI

__all__ = ["Gateway", "run"]

#: What ``muxgate_held{kind}`` reports (Gateway._held).
HELD_KINDS = (
    "retained_records",
    "tombstones",
    "resumable_requests",
    "detached_requests",
    "asyncio_tasks",
)

log = structlog.get_logger("muxgate")


#: The transport's high-water mark for one connection's unsent bytes: above it, frames wait
#: for the drain (in the connection's writer task) instead of being written at once.
WRITE_LIMIT = 32_768
#: An HTTP connection with no request in progress is closed after this long (keep-alive); it
#: is also the time a client has to send a whole request head.
HTTP_KEEPALIVE = 10.0
#: Every WebSocket is pinged when it has been silent this long, and dropped (1011) when the
#: ping is not answered (nor anything else received) within PING_TIMEOUT.
PING_INTERVAL = 20.0
PING_TIMEOUT = 20.0
_SUBPROTOCOLS = [Subprotocol(s) for s in protocol.SUBPROTOCOLS]


class Socket(Channel, FeedSocket, Protocol):
    """What :meth:`Gateway.opened` uses of an open WebSocket: the transport's
    :class:`~gateway.transport.WebSocket`, or the ASGI adapter's channel (gateway.asgi)."""

    @property
    def subprotocol(self) -> Subprotocol | None: ...


class _Refused:
    """The handler of a WebSocket closed as soon as it opened (limits): ignores everything."""

    __slots__ = ()

    def message(self, data: bytes, text: bool) -> None:
        pass

    def lost(self) -> None:
        pass


class Gateway:
    """A running muxgate gateway. Use as ``async with Gateway(config) as gw:``."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        backend: Backend | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.config = config = config or Config()
        #: Traces (gateway/tracing.py): ``tracing`` if given (tests pass one with their own
        #: exporter), else from ``otlp_endpoint`` (None: the no-op NO_TRACING, nothing imported).
        self.tracing = tracing if tracing is not None else tracing_from_config(config)
        self._owns_tracing = tracing is None
        options = dict(config.backend_options)
        if config.backend == "flow":  # its steps call the tool servers and agents configured
            options.setdefault("tools", config.tools)
            options.setdefault("agents", config.agents)
        self.backend: Backend = backend or load_backend(config.backend, **options)
        #: False when the caller passed its own backend object (config.backend does not name it).
        self.backend_configured = backend is None
        self.auth = Authenticator(
            client_keys=config.client_keys,
            jwt_secret=config.jwt_secret,
            jwt_audience=config.jwt_audience,
        )
        self.auth_mode = self.auth.mode
        local = InMemoryRegistry(
            retention_seconds=config.retention_seconds,
            retention_count=config.retention_count,
            tombstone_seconds=config.tombstone_seconds,
            tombstone_count=config.tombstone_count,
        )
        #: With ``nats_url``, one node of a cluster (gateway/cluster.py): the others' requests
        #: are asked over NATS; without, this process alone, as ever.
        self.cluster: Cluster | None = None
        self.registry: RequestRegistry = local
        if config.nats_url is not None:
            self.cluster = Cluster(
                config.nats_url,
                node_id=config.node_id or default_node_id(),
                name=config.cluster_name,
                heartbeat_interval=config.cluster_heartbeat_ms / 1000,
                ownership_ttl=config.retention_seconds + 30,
                tracing=self.tracing,
            )
            self.tracing.set_node(self.cluster.node_id)
            self.registry = ClusterRegistry(local, self.cluster)
        self.resumables = Resumables(
            default_grace=config.resume_grace_seconds,
            max_grace=config.resume_max_grace_seconds,
            max_ended=config.resume_retention_count,
            max_detached=config.max_detached,
        )
        #: In a cluster, resumes across nodes (gateway/relay.py).
        self.relays = (
            RelayHub(
                self.cluster,
                self.resumables,
                max_senders=config.max_detached,
                stall_timeout=config.slow_consumer_timeout + 10,
            )
            if self.cluster is not None
            else None
        )
        self.stats = LiveStats(lambda: len(self.connections), time.monotonic)
        self.observer = GatewayObserver(self._totals, self.stats)
        if self.cluster is not None:
            self.observer.watch_cluster(self.cluster)
            self.cluster.summary = self._node_summary
            if self.relays is not None:
                self.observer.watch_relays(self.relays)
            self.stats.cluster_view = lambda: self._cluster_view()
        self.loop_lag = LoopLagMonitor(
            interval=config.loop_lag_interval_ms / 1000,
            stall_threshold=config.loop_stall_ms / 1000,
        )
        self.observer.watch_loop(self.loop_lag)
        self.memory_trim = MemoryTrimmer(config.memory_trim_seconds)
        self.observer.watch_memory(self.memory_trim)
        self.observer.watch_held(HELD_KINDS, lambda: self._held(local))
        self.stats.loop_lag = self.loop_lag.summary
        self.stats_feed = StatsFeed(
            self.stats,
            config.stats_interval_ms / 1000,
            config.max_stats_subscribers,
            max_operator_subscribers=config.max_operator_stats_subscribers,
            auth=self.auth,
        )
        self.webui = WebUI() if config.webui else None
        self.connections: set[Connection] = set()
        #: Every open TCP connection (HTTP keep-alive, WebSockets): the watchdog's rounds.
        self.transports: set[HttpConnection] = set()
        #: Connections that have not authenticated yet, by client address (see _admit).
        self._unauthenticated: dict[str, int] = {}
        self._unauthenticated_total = 0
        self.draining = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._refusals: set[asyncio.Future[None]] = set()
        self._server: asyncio.Server | None = None
        #: Set by start(). With ``start(listen=False)`` another server serves the gateway (an
        #: ASGI server, gateway.asgi); ``port``/``url`` report ``served_port`` then, if set.
        self.started = False
        self.served_port: int | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._closed_totals = [0, 0]
        #: What each connection's multiplexer uses of the gateway (a narrow seam, not self).
        self.multiplexer_services = MultiplexerServices(
            backend=self.backend,
            registry=self.registry,
            observer=self.observer,
            track=self.track,
            draining=lambda: self.draining,
            max_streams=config.max_streams,
            max_timeout_ms=config.max_timeout_ms,
            max_content_chars=config.max_content_chars,
            resumables=self.resumables,
            tracing=self.tracing,
            relays=self.relays,
        )
        self.connection_services = ConnectionServices(
            config=config,
            auth=self.auth,
            observer=self.observer,
            multiplexer=self.multiplexer_services,
            authenticated=self.connection_authenticated,
            finished=self._connection_finished,
        )
        self.http_services = HttpServices(
            auth=self.auth,
            registry=self.registry,
            observer=self.observer,
            stats=self.stats,
            webui=lambda: self.webui,
            backend_info=self._backend_info,
            draining=lambda: self.draining,
            stats_public=config.stats_public,
            cluster_health=self.cluster.health if self.cluster is not None else None,
            tracing=self.tracing,
        )
        # What the transport asks of the application (gateway.transport.Application).
        self.max_message_bytes = config.max_frame_bytes
        self.subprotocols = _SUBPROTOCOLS

    # -- bookkeeping -------------------------------------------------------------------------

    def _held(self, local: InMemoryRegistry) -> dict[str, int]:
        return {
            "retained_records": local.retained,
            "tombstones": local.tombstones,
            "resumable_requests": len(self.resumables),
            "detached_requests": self.resumables.detached,
            "asyncio_tasks": len(asyncio.all_tasks()) if self.started else 0,
        }

    def _node_summary(self) -> dict[str, Any]:
        """This node's figures for the cluster view (gateway/cluster.py)."""
        relays = self.relays
        return {
            **self.stats.summary(),
            "relays": {
                "sending": len(relays.senders) if relays is not None else 0,
                "receiving": len(relays.receivers) if relays is not None else 0,
            },
        }

    def _cluster_view(self) -> dict[str, object]:
        assert self.cluster is not None
        return self.cluster.view(self._node_summary())

    def track(self, task: asyncio.Future[Any]) -> None:
        """Keep a reference to a background task until it ends (and let shutdown await it)."""
        if isinstance(task, asyncio.Task):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @property
    def tasks(self) -> set[asyncio.Task[Any]]:
        """Pipeline and housekeeping tasks still running (empty when idle: nothing leaks)."""
        return {t for t in self._tasks if not t.done()}

    def _totals(self) -> tuple[int, int]:
        chunks, frames = self._closed_totals
        for conn in self.connections:
            chunks += conn.outbound.chunks_sent
            frames += conn.outbound.frames_sent
        return chunks, frames

    @property
    def port(self) -> int:
        if self._server is None and self.served_port is not None:
            return self.served_port
        assert self._server is not None, "not started"
        sockname = self._server.sockets[0].getsockname()
        return int(sockname[1])

    @property
    def url(self) -> str:
        return f"ws://{self.config.host}:{self.port}{protocol.WS_PATH}"

    @property
    def http_url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    # -- serving -----------------------------------------------------------------------------

    async def start(self, *, listen: bool = True) -> None:
        """Start the backend, the listener (unless ``listen`` is false: an ASGI server serves
        the gateway, see gateway.asgi) and the watchdog."""
        # A backend with a process or a connection to set up first (e.g. ``llama`` starts its
        # model server): a failure stops the start before the port opens.
        astart = getattr(self.backend, "astart", None)
        if astart is not None:
            await astart()
        try:
            if self.cluster is not None:  # joined before the port opens: no cancel is lost
                await self.cluster.start()
            if listen:
                self._server = await self._serve()
        except BaseException:
            close = getattr(self.backend, "aclose", None)
            if astart is not None and close is not None:
                await close()  # e.g. stop the model server it started
            raise
        self.started = True
        self._watchdog = asyncio.create_task(self._watch_writers(), name="muxgate-watchdog")
        self.loop_lag.start()
        self.memory_trim.start()

    async def _serve(self) -> asyncio.Server:
        config = self.config
        return await serve(
            self, config.host, config.port, write_limit=WRITE_LIMIT, keepalive=HTTP_KEEPALIVE
        )

    async def _watch_writers(self) -> None:
        """One timer for the whole gateway instead of one per frame, connection or ping: a
        writer blocked in one send longer than ``slow_consumer_timeout`` has a client that
        stopped reading; an idle HTTP keep-alive connection is closed; a silent WebSocket is
        pinged, and dropped if it stays silent."""
        limit = self.config.slow_consumer_timeout
        period = min(1.0, limit / 4)
        loop = asyncio.get_running_loop()
        next_ping_round = loop.time() + period
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            for conn in self.connections:
                if conn.outbound.stuck_for(now) > limit:
                    conn.outbound.abort_slow()
            for tcp in list(self.transports):
                deadline = tcp.deadline
                if deadline is not None and now > deadline:
                    tcp.close()
            if now >= next_ping_round:
                next_ping_round = now + min(PING_INTERVAL, PING_TIMEOUT) / 4
                self._keepalive(now)

    def _keepalive(self, now: float) -> None:
        for tcp in self.transports:
            ws = tcp.websocket
            if ws is None or not ws.open:
                continue
            if ws.ping_sent_at is not None:
                if now - ws.ping_sent_at > PING_TIMEOUT:
                    ws.fail(1011, "keepalive ping timeout")
            elif now - ws.last_received > PING_INTERVAL:
                ws.ping_sent_at = now
                ws.ping()

    # -- gateway.transport.Application ---------------------------------------------------------

    def select_subprotocol(self, offered: Sequence[Subprotocol]) -> Subprotocol | None:
        """SPEC.md §2.2: msgpack if offered, else JSON; none offered means JSON; only unknown
        ones offered: HTTP 400."""
        for name in _SUBPROTOCOLS:
            if name in offered:
                return name
        if offered:
            raise NegotiationError(
                f"unsupported subprotocols; offer one of {protocol.SUBPROTOCOLS}"
            )
        return None

    def http(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        return respond(self.http_services, request)

    def is_websocket(self, request: HttpRequest) -> bool:
        return request.path in (protocol.WS_PATH, STATS_PATH)

    def upgrade(self, request: HttpRequest) -> HttpResponse | None:
        return upgrade_refusal(self.http_services, request)

    def connection_made(self, conn: HttpConnection) -> None:
        self.transports.add(conn)

    def connection_lost(self, conn: HttpConnection) -> None:
        self.transports.discard(conn)

    def opened(self, request: HttpRequest, socket: Socket) -> WebSocketHandler:
        if request.path == STATS_PATH:
            subscriber = self.stats_feed.subscribe(socket, request.headers)
            if subscriber is not None:
                return subscriber
            return self._refuse_open(socket, "too many stats subscribers")
        if len(self.connections) >= self.config.max_connections:
            return self._refuse_open(socket, "connection limit reached")
        conn = Connection(
            self.connection_services,
            socket,
            codec=Codec.from_subprotocol(socket.subprotocol),
            headers=request.headers,
            address=request.peer,
        )
        if not conn.authenticated:
            refusal = self._unauthenticated_refusal(conn.address)
            if refusal is not None:
                return self._refuse_open(socket, refusal)
            self._unauthenticated[conn.address] = self._unauthenticated.get(conn.address, 0) + 1
            self._unauthenticated_total += 1
        self.connections.add(conn)
        self.observer.connections.inc()
        conn.start()
        return conn

    def _refuse_open(self, socket: Socket, reason: str) -> WebSocketHandler:
        closing = asyncio.ensure_future(socket.close(CloseCode.TRY_AGAIN_LATER, reason, 10.0))
        self._refusals.add(closing)  # referenced until closed; not a pipeline (see tasks)
        closing.add_done_callback(self._refusals.discard)
        return _Refused()

    def _connection_finished(self, conn: Connection) -> None:
        if not conn.authenticated:
            self._release_unauthenticated(conn.address)
        self.connections.discard(conn)
        self.observer.connections.dec()
        self._closed_totals[0] += conn.outbound.chunks_sent
        self._closed_totals[1] += conn.outbound.frames_sent

    def _backend_info(self) -> BackendInfo:
        """``GET /v1/backend`` (SPEC.md §8.3): the backend's name, model and chat settings."""
        describe = getattr(self.backend, "describe", None)
        info = describe() if describe is not None else None
        if not isinstance(info, BackendInfo):  # a backend that does not say: its name only
            info = BackendInfo(name=self.config.backend if self.backend_configured else "custom")
        return info

    def _unauthenticated_refusal(self, address: str) -> str | None:
        """Why a connection without credentials is refused now (None: admitted).

        Connections that have not authenticated have a budget of their own, well under
        ``max_connections``, so that sockets which never authenticate (reopened whenever the
        hello timeout drops them) cannot keep authenticated clients out."""
        config = self.config
        if self._unauthenticated_total >= config.unauthenticated_limit:
            return "too many unauthenticated connections"
        per_address = config.max_unauthenticated_per_address
        if per_address and self._unauthenticated.get(address, 0) >= per_address:
            return "too many unauthenticated connections from this address"
        return None

    def connection_authenticated(self, conn: Connection) -> None:
        """``conn`` was welcomed after a hello: it leaves the unauthenticated budget."""
        self._release_unauthenticated(conn.address)

    def _release_unauthenticated(self, address: str) -> None:
        self._unauthenticated_total -= 1
        left = self._unauthenticated.get(address, 0) - 1
        if left > 0:
            self._unauthenticated[address] = left
        else:
            self._unauthenticated.pop(address, None)

    async def shutdown(self, grace: float | None = None) -> None:
        """Drain: no new connections or chats; wait up to ``grace`` s; cancel the rest; close."""
        if not self.started:
            return
        grace = self.config.shutdown_grace if grace is None else grace
        # From now on WebSocket handshakes get 503 and chats `unavailable`, while the HTTP API
        # keeps working during the grace period and /healthz says "draining" (SPEC.md §5.7):
        # the listener stays open until the connections are closed.
        self.draining = True
        running = self.tasks
        if running:
            await asyncio.wait(running, timeout=grace)
        for request in self.registry.active():
            request.cancel(CancelReason.SHUTDOWN)
        # Pipelines halt at their next checkpoint; give them the grace again, then (last
        # resort) cancel the task: step helpers shield non-abortable operations even then.
        running = self.tasks
        if running:
            _, pending = await asyncio.wait(running, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                # A non-abortable step (a tool call, say) finishes before its task ends: bounded
                # too, since a step that never returns must not hold the process forever.
                _, stuck = await asyncio.wait(pending, timeout=max(grace, 1.0))
                if stuck:
                    log.warning(
                        "gateway.shutdown_abandoned",
                        tasks=len(stuck),
                        detail="non-abortable steps still running after the grace period",
                    )
        close = getattr(self.backend, "aclose", None)  # e.g. the openai backend's connections
        if close is not None:
            await close()
        if self._server is not None:
            self._server.close()  # stop accepting
        await self.stats_feed.close()
        closes = [self._close_going_away(conn, max(grace, 1.0)) for conn in self.connections]
        if closes:
            await asyncio.gather(*closes, return_exceptions=True)
        for tcp in list(self.transports):  # HTTP keep-alive connections, refused sockets
            tcp.close()
        if self._server is not None:
            await self._server.wait_closed()
        if self.relays is not None:  # relayed requests' last messages (cancelled: shutdown)
            await self.relays.close(grace=max(grace, 1.0))
        self.resumables.close()  # detached requests were cancelled with the others: timers
        if self.cluster is not None:
            await self.cluster.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.loop_lag.stop()
        await self.memory_trim.stop()
        if self._owns_tracing and self.tracing.enabled:  # the last spans, exported (blocking)
            await asyncio.to_thread(self.tracing.shutdown)

    @staticmethod
    async def _close_going_away(conn: Connection, flush_timeout: float) -> None:
        """Send what is queued (the cancelled responses), then close with 1001. A client that
        does not take its last frames in time cannot take a close frame either: drop it."""
        try:
            async with asyncio.timeout(flush_timeout):
                await conn.outbound.flushed()
        except TimeoutError:
            conn.channel.abort()
            return
        await conn.close(CloseCode.GOING_AWAY, "server shutdown")

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown(grace=0.0 if exc_info[0] is not None else None)


def run(config: Config) -> None:
    """Serve until SIGTERM/SIGINT, then drain (the ``muxgate serve`` command)."""
    configure_logging(config.log_format, config.log_level)
    loop_name = _event_loop(config.event_loop)
    if loop_name == "uvloop":
        import uvloop

        uvloop.run(_serve_forever(config, loop_name))
    else:
        asyncio.run(_serve_forever(config, loop_name))


def _event_loop(setting: str) -> str:
    if setting == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if setting == "uvloop":
            raise ConfigError("event_loop = uvloop, but uvloop is not installed") from None
        return "asyncio"
    return "uvloop"


async def _serve_forever(config: Config, loop_name: str = "asyncio") -> None:
    gateway = Gateway(config)
    await gateway.start()
    # Before "gateway.started": whoever waits for that line may send SIGTERM right after it.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Everything alive now (modules, classes, the config) lives as long as the process: move it
    # out of the collector's sight, so each full collection scans only per-connection and
    # per-request objects. Full collections are the longest pauses a cancel can wait behind.
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(config.gc_young_threshold, older, oldest)
    if not config.auth_required:
        log.warning(
            "auth.disabled",
            detail="no client keys and no JWT secret configured: anyone who can reach this port "
            "may act as any user (dev mode). Set MUXGATE_CLIENT_KEYS or MUXGATE_JWT_SECRET.",
        )
    log.info(
        "gateway.started",
        url=gateway.url,
        http=gateway.http_url,
        backend=config.backend,
        event_loop=loop_name,
        auth="client_keys+jwt"
        if config.client_keys and config.jwt_secret
        else "client_keys"
        if config.client_keys
        else "jwt"
        if config.jwt_secret
        else "none (dev mode)",
        max_streams=config.max_streams,
        gc_threshold=gc.get_threshold(),
    )
    await stop.wait()
    log.info("gateway.draining", grace_seconds=config.shutdown_grace)
    await gateway.shutdown()
    log.info("gateway.stopped")
