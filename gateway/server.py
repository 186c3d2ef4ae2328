"""The gateway process: one event loop, one websockets server, HTTP on the same port.

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
from collections.abc import Sequence
from typing import Any

import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import NegotiationError
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

import protocol
from protocol import CancelReason, CloseCode

from .auth import Authenticator, has_credentials
from .backends import load_backend
from .config import Config, ConfigError
from .connection import PREAUTH_MAX_FRAME_BYTES, Connection, EagerServerConnection
from .http_api import answer_early, process_request
from .multiplexer import MultiplexerServices
from .observability import GatewayObserver, configure_logging
from .pipeline import Backend
from .registry import InMemoryRegistry
from .stats import STATS_PATH, LiveStats, StatsFeed
from .webui import WebUI

__all__ = ["Gateway", "run"]

log = structlog.get_logger("muxgate")


def _select_subprotocol(
    conn: ServerConnection, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    """SPEC.md §2.2: msgpack if offered, else JSON; none offered means JSON; only unknown
    ones offered: HTTP 400."""
    for name in protocol.SUBPROTOCOLS:
        if name in offered:
            return Subprotocol(name)
    if offered:
        raise NegotiationError(f"unsupported subprotocols; offer one of {protocol.SUBPROTOCOLS}")
    return None


class Gateway:
    """A running muxgate gateway. Use as ``async with Gateway(config) as gw:``."""

    def __init__(self, config: Config | None = None, *, backend: Backend | None = None) -> None:
        self.config = config = config or Config()
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
        self.registry = InMemoryRegistry(
            retention_seconds=config.retention_seconds, retention_count=config.retention_count
        )
        self.stats = LiveStats(lambda: len(self.connections), time.monotonic)
        self.observer = GatewayObserver(self._totals, self.stats)
        self.stats_feed = StatsFeed(
            self.stats,
            config.stats_interval_ms / 1000,
            config.max_stats_subscribers,
            max_operator_subscribers=config.max_operator_stats_subscribers,
            auth=self.auth,
        )
        self.webui = WebUI() if config.webui else None
        self.connections: set[Connection] = set()
        #: Connections that have not authenticated yet, by client address (see _admit).
        self._unauthenticated: dict[str, int] = {}
        self._unauthenticated_total = 0
        self.draining = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: Server | None = None
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
        )

    # -- bookkeeping -------------------------------------------------------------------------

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
        assert self._server is not None, "not started"
        sockname = next(iter(self._server.sockets)).getsockname()
        return int(sockname[1])

    @property
    def url(self) -> str:
        return f"ws://{self.config.host}:{self.port}{protocol.WS_PATH}"

    @property
    def http_url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    # -- serving -----------------------------------------------------------------------------

    async def start(self) -> None:
        # A backend with a process or a connection to set up first (e.g. ``llama`` starts its
        # model server): a failure stops the start before the port opens.
        astart = getattr(self.backend, "astart", None)
        if astart is not None:
            await astart()
        try:
            self._server = await self._serve()
        except BaseException:
            close = getattr(self.backend, "aclose", None)
            if astart is not None and close is not None:
                await close()  # e.g. stop the model server it started
            raise
        self._watchdog = asyncio.create_task(self._watch_writers(), name="muxgate-watchdog")

    async def _serve(self) -> Server:
        config = self.config
        return await serve(
            self._handle,
            config.host,
            config.port,
            subprotocols=[Subprotocol(s) for s in protocol.SUBPROTOCOLS],
            select_subprotocol=_select_subprotocol,
            process_request=self._process_request,
            max_size=config.max_frame_bytes,
            # permessage-deflate costs ~100 KiB per connection and CPU per frame; chat tokens
            # are tiny, batching already amortises framing.
            compression=None,
            server_header="muxgate",
            # Frames queued for the reader before websockets stops reading the socket (TCP
            # backpressure): with frames of up to max_frame_bytes, this bounds a connection's
            # unread input. The reader drains it at once unless the client does not read.
            max_queue=4,
            # Cancels (frames and DELETEs) take effect in the loop turn that reads them.
            create_connection=self._connection_class(),
        )

    async def _watch_writers(self) -> None:
        """One timer for the whole gateway instead of one per frame sent: a writer blocked in
        one send longer than ``slow_consumer_timeout`` has a client that stopped reading."""
        limit = self.config.slow_consumer_timeout
        period = min(1.0, limit / 4)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            for conn in self.connections:
                if conn.outbound.stuck_for(now) > limit:
                    conn.outbound.abort_slow()

    def _connection_class(self) -> type[EagerServerConnection]:
        """This gateway's connections: early HTTP answers need the gateway."""
        gateway = self

        class GatewayConnection(EagerServerConnection):
            @staticmethod
            def answer_early(conn: ServerConnection, request: Request) -> Response | None:
                return answer_early(gateway, conn, request)

            @staticmethod
            def preauth_max_size(request: Request) -> int | None:
                # Without credentials in the handshake, the first frame must be a hello: a
                # small one (checked on presence only: invalid credentials are refused on
                # the first message, which then closes the connection).
                if not gateway.config.auth_required or has_credentials(request.headers):
                    return None
                return PREAUTH_MAX_FRAME_BYTES

        return GatewayConnection

    async def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        return await process_request(self, conn, request)

    async def _handle(self, ws: ServerConnection) -> None:
        if ws.request is not None and ws.request.path.partition("?")[0] == STATS_PATH:
            await self.stats_feed.serve(ws)
            return
        if len(self.connections) >= self.config.max_connections:
            await ws.close(CloseCode.TRY_AGAIN_LATER, "connection limit reached")
            return
        conn = Connection(self, ws)
        address = _address(ws)
        if not conn.authenticated:
            refusal = self._unauthenticated_refusal(address)
            if refusal is not None:
                await ws.close(CloseCode.TRY_AGAIN_LATER, refusal)
                return
            self._unauthenticated[address] = self._unauthenticated.get(address, 0) + 1
            self._unauthenticated_total += 1
        self.connections.add(conn)
        self.observer.connections.inc()
        try:
            await conn.run()
        finally:
            if not conn.authenticated:
                self._release_unauthenticated(address)
            self.connections.discard(conn)
            self.observer.connections.dec()
            self._closed_totals[0] += conn.outbound.chunks_sent
            self._closed_totals[1] += conn.outbound.frames_sent

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
        self._release_unauthenticated(_address(conn.ws))

    def _release_unauthenticated(self, address: str) -> None:
        self._unauthenticated_total -= 1
        left = self._unauthenticated.get(address, 0) - 1
        if left > 0:
            self._unauthenticated[address] = left
        else:
            self._unauthenticated.pop(address, None)

    async def shutdown(self, grace: float | None = None) -> None:
        """Drain: no new connections or chats; wait up to ``grace`` s; cancel the rest; close."""
        if self._server is None:
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
        self._server.close(close_connections=False)  # stop accepting
        await self.stats_feed.close()
        closes = [self._close_going_away(conn, max(grace, 1.0)) for conn in self.connections]
        if closes:
            await asyncio.gather(*closes, return_exceptions=True)
        await self._server.wait_closed()
        if self._watchdog is not None:
            self._watchdog.cancel()

    @staticmethod
    async def _close_going_away(conn: Connection, flush_timeout: float) -> None:
        """Send what is queued (the cancelled responses), then close with 1001. A client that
        does not take its last frames in time cannot take a close frame either: drop it."""
        try:
            async with asyncio.timeout(flush_timeout):
                await conn.outbound.flushed()
        except TimeoutError:
            conn.ws.transport.abort()
            return
        await conn.close(CloseCode.GOING_AWAY, "server shutdown")

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown(grace=0.0 if exc_info[0] is not None else None)


def _address(ws: ServerConnection) -> str:
    """The client's IP address (the peer of the TCP connection)."""
    peer = ws.remote_address
    return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)


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
