"""Gateway configuration: defaults < TOML file < environment (``MUXGATE_*``) < command-line flags.

Every setting is a field of :class:`Config`; its environment variable is ``MUXGATE_`` plus the
field name in capitals (``MUXGATE_MAX_STREAMS=128``), its flag ``--`` plus the name with dashes
(``--max-streams 128``), its TOML key the name itself. ``client_keys`` takes a comma-separated
list in the environment and repeated flags. ``backend_options`` is a TOML table, a JSON object
in ``MUXGATE_BACKEND_OPTIONS`` and a repeated ``--backend-option KEY=VALUE`` (VALUE read as
JSON when it parses as JSON, else as a string); its sources merge key by key, with the same
precedence. ``tools`` (MCP tool servers by name, see :mod:`gateway.tools.settings`) and
``agents`` (remote A2A agents by name, see :mod:`gateway.agents.settings`) are TOML tables of
``[tools.NAME]`` / ``[agents.NAME]`` tables, or a JSON object in ``MUXGATE_TOOLS`` /
``MUXGATE_AGENTS`` (or ``--tools`` / ``--agents``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import protocol
from protocol import limits

__all__ = ["Config", "ConfigError", "load_config"]


class ConfigError(ValueError):
    """A setting has a bad value; the message names the setting and where it came from."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    host: str = "127.0.0.1"
    port: int = protocol.DEFAULT_PORT
    #: Backend name: "simulated" (default), "echo", an entry point of group "muxgate.backends",
    #: or "package.module:attribute".
    backend: str = "simulated"
    backend_options: Mapping[str, Any] = field(default_factory=dict)
    #: MCP tool servers by name (``[tools.NAME]`` tables; env ``MUXGATE_TOOLS``, a JSON
    #: object): validated into :class:`gateway.tools.ServerSettings` at start-up.
    tools: Mapping[str, Any] = field(default_factory=dict)
    #: Remote A2A agents by name (``[agents.NAME]`` tables; env ``MUXGATE_AGENTS``, a JSON
    #: object): validated into :class:`gateway.agents.AgentSettings` at start-up.
    agents: Mapping[str, Any] = field(default_factory=dict)

    #: Server-side callers' secrets; with none and no jwt_secret the gateway runs without auth.
    client_keys: tuple[str, ...] = ()
    #: HS256 secret for user tokens (JWT with sub and exp).
    jwt_secret: str | None = None
    jwt_audience: str | None = None

    max_streams: int = limits.DEFAULT_MAX_STREAMS
    max_connections: int = 20_000
    max_frame_bytes: int = limits.MAX_FRAME_BYTES
    #: Outbound batching: most bytes packed into one frame; 0 disables batching (one message
    #: per frame, for benchmarks).
    max_batch_bytes: int = limits.DEFAULT_BATCH_BYTES
    #: Per request: pending characters before its pipeline waits at its next emit.
    max_pending_chars: int = 65_536
    #: Per request: the whole answer, in characters. The completed response carries it in one
    #: message, so 4 bytes per character plus framing must fit MAX_FRAME_BYTES.
    max_content_chars: int = 250_000
    #: Per connection: queued control messages before the client counts as not reading.
    max_control_messages: int = 4096
    #: A writer blocked this long on a client that does not read closes it (4008).
    slow_consumer_timeout: float = 30.0
    #: Server maximum for a request's lifetime; a chat's timeout_ms is capped to it.
    max_timeout_ms: int = 600_000
    #: Seconds a connection without credentials has to send its hello.
    hello_timeout: float = 10.0
    #: Connections that have not authenticated yet (no credentials in the handshake, hello
    #: not yet welcomed), counted apart so that they can never fill ``max_connections``:
    #: at most this many in all (default: a tenth of max_connections) and per client address
    #: (0: no per-address limit; behind a proxy every client has the proxy's address).
    max_unauthenticated_connections: int | None = None
    max_unauthenticated_per_address: int = 64
    #: Inbound messages per second per connection (token bucket) and the burst allowed.
    rate_limit: float = 500.0
    rate_burst: int = 1000
    #: Seconds a connection may keep sending above the rate (refused messages with no quiet
    #: second between them) before it is closed with 4029 (SPEC.md §7.1).
    rate_close_after: float = 5.0
    #: Finished requests remembered for late cancels and GET.
    retention_seconds: float = 300.0
    retention_count: int = 100_000
    #: Resumable requests (SPEC.md §5.8): the grace a chat gets without ``grace_ms`` and the
    #: most it may ask for, in seconds; how many ended ones keep their text for a resume; how
    #: many may run detached at once (past it, a closed connection cancels them, G7).
    resume_grace_seconds: float = 30.0
    resume_max_grace_seconds: float = 300.0
    resume_retention_count: int = 1000
    max_detached: int = 10_000
    #: A cancel that finds no request leaves a tombstone this long (SPEC.md §5.3): a chat with
    #: that id and user arriving meanwhile ends cancelled at once. 0 turns it off.
    tombstone_seconds: float = 10.0
    tombstone_count: int = 10_000
    #: A cluster of nodes (gateway/cluster.py; extra "cluster"): the NATS server to join, this
    #: node's id in logs and answers (default: host-pid-random), and the cluster's name (nodes
    #: of one cluster share it; several clusters may share a NATS server).
    nats_url: str | None = None
    node_id: str | None = None
    cluster_name: str = "default"
    #: Heartbeats between nodes: a node unheard for three intervals is gone, and the requests
    #: it ran answer ``failed`` (``node_lost``) from the others.
    cluster_heartbeat_ms: int = 1000
    #: Traces (gateway/tracing.py; extra "tracing"): the OTLP/HTTP collector to export to
    #: (``http://collector:4318``; a URL with a path is the traces endpoint itself). None:
    #: tracing off, and nothing of OpenTelemetry is imported. The service name of the spans.
    otlp_endpoint: str | None = None
    otlp_service_name: str = "muxgate"
    #: On SIGTERM/SIGINT: seconds in-flight requests get to finish before they are cancelled.
    shutdown_grace: float = 10.0
    #: "auto": uvloop when installed (a C event loop: less CPU per wake-up, shorter loop turns,
    #: so lower cancel latency under load), else asyncio's; or "asyncio" / "uvloop".
    event_loop: str = "auto"
    #: ``muxgate serve``: net new objects between young-generation garbage collections
    #: (Python's default: 700). At 700 a collection comes every few tens of milliseconds and
    #: scans every waiting stream's per-token objects (a future, its wake-up), which then get
    #: scanned again in older generations: pauses a cancel waits behind. Higher, most of them
    #: die (by reference count) before any collection sees them. Cycles wait longer: at most
    #: this many objects' worth.
    gc_young_threshold: int = 20_000
    #: The event loop's lag is sampled every this many milliseconds (gateway/loop_lag.py); a
    #: lag of at least ``loop_stall_ms`` is a stall: counted, and logged (a warning).
    loop_lag_interval_ms: int = 100
    loop_stall_ms: int = 100
    #: Every this many seconds, memory the allocator keeps freed goes back to the system
    #: (glibc's ``malloc_trim``, gateway/memory.py): RSS comes down after a burst. 0: off.
    memory_trim_seconds: float = 30.0
    #: The browser demo at ``/`` and ``/dashboard`` (files built into gateway/webui/).
    webui: bool = True
    #: The dashboard feed (``/v1/stats``): one snapshot per interval, to at most this many.
    stats_interval_ms: int = 500
    max_stats_subscribers: int = 100
    #: With auth on and this false, /metrics and /v1/stats (snapshot and feed) need a client key.
    stats_public: bool = True
    #: Feed slots kept for subscribers presenting a valid client key (beyond the anonymous ones).
    max_operator_stats_subscribers: int = 8
    log_format: str = "auto"  # "auto" (console on a terminal, else JSON), "json", "console"
    log_level: str = "info"

    def __post_init__(self) -> None:
        _positive = (
            "max_streams",
            "max_connections",
            "max_pending_chars",
            "max_content_chars",
            "max_control_messages",
            "max_timeout_ms",
            "rate_burst",
            "retention_count",
            "resume_retention_count",
            "max_detached",
            "tombstone_count",
            "cluster_heartbeat_ms",
            "stats_interval_ms",
            "max_stats_subscribers",
            "gc_young_threshold",
            "max_operator_stats_subscribers",
            "loop_lag_interval_ms",
            "loop_stall_ms",
        )
        for name in _positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.memory_trim_seconds < 0:
            raise ConfigError("memory_trim_seconds must be at least 0")
        if not 0 <= self.port <= 65535:
            raise ConfigError("port must be in 0..65535")
        if not 1024 <= self.max_frame_bytes <= limits.MAX_FRAME_BYTES:
            raise ConfigError(f"max_frame_bytes must be in 1024..{limits.MAX_FRAME_BYTES}")
        if self.max_batch_bytes < 0:
            raise ConfigError("max_batch_bytes must be >= 0 (0 disables batching)")
        if self.max_timeout_ms > limits.MAX_TIMEOUT_MS:
            raise ConfigError(f"max_timeout_ms must be at most {limits.MAX_TIMEOUT_MS}")
        if self.max_unauthenticated_connections is not None and not (
            1 <= self.max_unauthenticated_connections <= self.max_connections
        ):
            raise ConfigError("max_unauthenticated_connections must be in 1..max_connections")
        if self.max_unauthenticated_per_address < 0:
            raise ConfigError("max_unauthenticated_per_address must be >= 0 (0: no limit)")
        for name in (
            "slow_consumer_timeout",
            "hello_timeout",
            "rate_limit",
            "rate_close_after",
            "shutdown_grace",
            "resume_grace_seconds",
            "resume_max_grace_seconds",
        ):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:  # "nan" would switch the check off
                raise ConfigError(f"{name} must be a positive finite number")
        if not math.isfinite(self.tombstone_seconds) or self.tombstone_seconds < 0:
            raise ConfigError("tombstone_seconds must be a finite number >= 0 (0: off)")
        if self.resume_max_grace_seconds * 1000 > limits.MAX_GRACE_MS:
            raise ConfigError(
                f"resume_max_grace_seconds must be at most {limits.MAX_GRACE_MS // 1000}"
            )
        if self.resume_grace_seconds > self.resume_max_grace_seconds:
            raise ConfigError("resume_grace_seconds must not exceed resume_max_grace_seconds")
        if self.event_loop not in ("auto", "asyncio", "uvloop"):
            raise ConfigError("event_loop must be auto, asyncio or uvloop")
        if self.log_format not in ("auto", "json", "console"):
            raise ConfigError("log_format must be auto, json or console")
        if any(not key for key in self.client_keys):
            raise ConfigError("client_keys must not contain empty keys")
        if self.otlp_endpoint is not None and not self.otlp_endpoint.startswith(
            ("http://", "https://")
        ):
            raise ConfigError("otlp_endpoint must be an http:// or https:// URL")
        if not self.otlp_service_name:
            raise ConfigError("otlp_service_name must not be empty")
        if self.jwt_secret == "":
            raise ConfigError("jwt_secret must not be empty")
        if self.max_content_chars * 4 + 4096 > limits.MAX_FRAME_BYTES:
            # A completed response carries the whole answer; it must fit one frame.
            raise ConfigError(
                f"max_content_chars must be at most {limits.MAX_FRAME_BYTES // 4 - 1024}"
            )
        if self.max_pending_chars > self.max_content_chars:
            raise ConfigError("max_pending_chars must not exceed max_content_chars")
        from .tools.settings import parse_tools  # standard library only: no extra needed

        try:
            object.__setattr__(self, "tools", parse_tools(self.tools))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        from .agents.settings import parse_agents  # standard library only: no extra needed

        object.__setattr__(self, "agents", parse_agents(self.agents))

    @property
    def unauthenticated_limit(self) -> int:
        """``max_unauthenticated_connections``, or its default."""
        limit = self.max_unauthenticated_connections
        return limit if limit is not None else max(1, self.max_connections // 10)

    @property
    def auth_required(self) -> bool:
        return bool(self.client_keys) or self.jwt_secret is not None


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)


def _convert(name: str, raw: Any, source: str) -> Any:
    """Coerce a TOML/env/flag value to the field's type."""
    hint = _HINTS[name]
    optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
    if optional:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    try:
        if name == "client_keys":
            if isinstance(raw, str):
                return tuple(k.strip() for k in raw.split(",") if k.strip())
            return tuple(str(k) for k in raw)
        if optional and raw in ("", None):
            return None
        if hint is bool:
            if isinstance(raw, bool):
                return raw
            return {"1": True, "true": True, "0": False, "false": False}[str(raw).lower()]
        if hint is int:
            if isinstance(raw, bool | float):  # int(1.5) would silently truncate
                raise TypeError("not an integer")
            return int(raw)
        if hint is float:
            if isinstance(raw, bool):
                raise TypeError("not a number")
            return float(raw)
        return str(raw)
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"{name} ({source}): invalid value {raw!r}") from exc


def _backend_options(raw: Any, source: str) -> dict[str, Any]:
    """``backend_options`` from one source: a table (TOML, or a mapping given in code), a JSON
    object (the environment), or ``KEY=VALUE`` strings (the flags; VALUE is JSON when it parses
    as JSON, else a string). The error names the setting and the source, never the value (an
    option may hold what has no place in a log)."""
    if isinstance(raw, Mapping):
        return dict(raw)
    if source.startswith("MUXGATE_") and isinstance(raw, str):
        try:
            options = json.loads(raw)
        except ValueError:
            options = None
        if not isinstance(options, dict):
            raise ConfigError(f"backend_options ({source}): must be a JSON object")
        return options
    if source.startswith("--") and isinstance(raw, list | tuple):
        options = {}
        for item in raw:
            key, equals, value = str(item).partition("=")
            key = key.strip()
            if not equals or not key:
                raise ConfigError(f"backend_options ({source}): each must be KEY=VALUE")
            try:
                options[key] = json.loads(value)
            except ValueError:
                options[key] = value
        return options
    raise ConfigError(f"backend_options ({source}): must be a table")


def load_config(
    *,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    toml_path: str | os.PathLike[str] | None = None,
) -> Config:
    """Merge the sources. ``flags`` maps field names to values (``None`` = not given)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = toml_path or environ.get("MUXGATE_CONFIG")
    if path:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc
        for key, raw in data.items():
            if key not in _FIELDS:
                raise ConfigError(f"config file {path}: unknown setting {key!r}")
            _set(values, key, raw, f"config file {path}")
    for name in _FIELDS:
        env_name = "MUXGATE_" + name.upper()
        if env_name in environ:
            _set(values, name, environ[env_name], env_name)
    for name, raw in (flags or {}).items():
        if raw is not None:
            if name not in _FIELDS:
                raise ConfigError(f"unknown setting {name!r}")
            source = "--backend-option" if name == "backend_options" else "--" + name
            _set(values, name, raw, source.replace("_", "-"))
    try:
        return Config(**values)
    except TypeError as exc:  # pragma: no cover - guarded by _FIELDS
        raise ConfigError(str(exc)) from exc


def _set(values: dict[str, Any], name: str, raw: Any, source: str) -> None:
    """Record a source's value: it replaces a lower source's, except ``backend_options``,
    whose keys replace theirs one by one."""
    if name == "backend_options":
        values[name] = {**values.get(name, {}), **_backend_options(raw, source)}
    elif name == "tools":
        values[name] = _json_table(raw, source)
    elif name == "agents":
        from .agents.settings import parse_agents  # standard library only: no extra needed

        values[name] = parse_agents(_json_table(raw, source), source)
    else:
        values[name] = _convert(name, raw, source)


def _json_table(raw: Any, source: str) -> Any:
    """A table setting given as a string (environment, flag): a JSON object."""
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        raise ConfigError(f"{source}: must be a JSON object") from None
