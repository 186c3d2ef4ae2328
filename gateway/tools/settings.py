"""The ``tools`` setting: MCP tool servers by name, validated at start-up.

It needs nothing but the standard library (``gateway.config`` validates it without importing
the ``mcp`` package). One table per server in the settings file::

    [tools.search]                      # the server's name, used by backends and flows
    command = ["python3", "-m", "gateway.tools.example_server"]   # stdio: the process to start
    # url = "http://127.0.0.1:9000/mcp" # or streamable HTTP (exactly one of command / url)
    env = { SEARCH_INDEX = "/srv/index" }   # stdio: extra environment variables
    cwd = "/srv/search"                 # stdio: working directory
    mode = "auto"                       # "auto": MCP 2026-07-28 if the server speaks it, else the
                                        # 2025-11-25 handshake; "legacy": the handshake only
    abortable = ["slow_search"]         # tools a cancel aborts at once (default: none)
    timeout_s = 60                      # the longest a call may take (tool_timeout past it)
    connect_timeout_s = 10              # start (or reconnect) and handshake
    restart_backoff_s = 0.2             # first pause before a restart / reconnect, doubled
    restart_backoff_max_s = 5           # ... up to this

    [tools.search.tool.slow_search]     # per tool: abortable, timeout_s
    abortable = true
    timeout_s = 30

In the environment: ``MUXGATE_TOOLS`` holds the same as a JSON object.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "SERVER_KEYS",
    "TOOL_KEYS",
    "ServerSettings",
    "ToolSettings",
    "parse_tools",
]

#: The keys of a ``[tools.NAME]`` table and what they mean.
SERVER_KEYS: Final[Mapping[str, str]] = {
    "command": "stdio: the server's command line, a list of strings (or one string, no arguments)",
    "url": "streamable HTTP: the server's MCP endpoint, http:// or https://",
    "env": "stdio: extra environment variables (a table of strings)",
    "cwd": "stdio: the working directory",
    "mode": '"auto" (default: MCP 2026-07-28 when the server speaks it) or "legacy"',
    "abortable": "the names of the tools a cancel aborts at once (a list)",
    "timeout_s": "the longest a call may take, in seconds (default 60)",
    "connect_timeout_s": "the longest a start or reconnect (with its handshake) may take (10)",
    "restart_backoff_s": "the pause before the first restart or reconnect, doubled each time (0.2)",
    "restart_backoff_max_s": "the longest pause between restarts or reconnects (5)",
    "tool": "per-tool tables: [tools.NAME.tool.TOOL] with abortable and timeout_s",
}
#: The keys of a ``[tools.NAME.tool.TOOL]`` table.
TOOL_KEYS: Final[Mapping[str, str]] = {
    "abortable": "true: a cancel aborts the call at once (default false: the call finishes)",
    "timeout_s": "the longest a call of this tool may take, in seconds",
}

DEFAULT_TIMEOUT_S: Final = 60.0


class _Invalid(ValueError):
    """A bad ``tools`` value; ``gateway.config`` turns it into a ConfigError."""


@dataclass(frozen=True, slots=True)
class ToolSettings:
    """How one tool of a server is called."""

    abortable: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """One ``[tools.NAME]`` table, checked."""

    name: str
    command: tuple[str, ...] | None = None
    url: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    mode: Literal["auto", "legacy"] = "auto"
    timeout_s: float = DEFAULT_TIMEOUT_S
    connect_timeout_s: float = 10.0
    restart_backoff_s: float = 0.2
    restart_backoff_max_s: float = 5.0
    abortable: frozenset[str] = frozenset()
    tools: Mapping[str, ToolSettings] = field(default_factory=dict)

    @property
    def transport(self) -> Literal["stdio", "http"]:
        return "stdio" if self.command is not None else "http"

    def tool(self, name: str) -> ToolSettings:
        """The settings of tool ``name`` (configured or not: the server's defaults)."""
        found = self.tools.get(name)
        if found is not None:
            return found
        return ToolSettings(abortable=name in self.abortable, timeout_s=self.timeout_s)


def _seconds(where: str, raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise _Invalid(f"{where} must be a number of seconds")
    value = float(raw)
    if not math.isfinite(value) or value <= 0:
        raise _Invalid(f"{where} must be a positive finite number of seconds")
    return value


def _unknown(where: str, keys: Mapping[str, Any], known: Mapping[str, str]) -> None:
    for key in keys:
        if key not in known:
            raise _Invalid(f"{where}: unknown key {key!r} (known: {', '.join(known)})")


def _tool(where: str, raw: Any, server: ServerSettings) -> ToolSettings:
    if not isinstance(raw, Mapping):
        raise _Invalid(f"{where} must be a table")
    _unknown(where, raw, TOOL_KEYS)
    abortable = raw.get("abortable", False)
    if not isinstance(abortable, bool):
        raise _Invalid(f"{where}.abortable must be true or false")
    timeout = raw.get("timeout_s")
    return ToolSettings(
        abortable=abortable,
        timeout_s=server.timeout_s if timeout is None else _seconds(f"{where}.timeout_s", timeout),
    )


def _server(name: str, raw: Any) -> ServerSettings:
    where = f"tools.{name}"
    if not name or not isinstance(raw, Mapping):
        raise _Invalid(f"{where} must be a table named by the server")
    _unknown(where, raw, SERVER_KEYS)
    command, url = raw.get("command"), raw.get("url")
    if (command is None) == (url is None):
        raise _Invalid(f"{where}: give exactly one of command (stdio) and url (streamable HTTP)")
    args: tuple[str, ...] | None = None
    if command is not None:
        if isinstance(command, str):
            command = [command]
        if (
            not isinstance(command, list | tuple)
            or not command
            or not all(isinstance(part, str) and part for part in command)
        ):
            raise _Invalid(f"{where}.command must be a non-empty list of non-empty strings")
        args = tuple(command)
    if url is not None and (
        not isinstance(url, str) or not url.startswith(("http://", "https://"))
    ):
        raise _Invalid(f"{where}.url must be an http:// or https:// URL")
    env = raw.get("env", {})
    if not isinstance(env, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise _Invalid(f"{where}.env must be a table of strings")
    cwd = raw.get("cwd")
    if cwd is not None and not isinstance(cwd, str):
        raise _Invalid(f"{where}.cwd must be a string")
    if url is not None and (env or cwd is not None):
        raise _Invalid(f"{where}: env and cwd are for a stdio server (command), not a url")
    mode = raw.get("mode", "auto")
    if mode not in ("auto", "legacy"):
        raise _Invalid(f'{where}.mode must be "auto" or "legacy"')
    abortable = raw.get("abortable", [])
    if not isinstance(abortable, list | tuple) or not all(
        isinstance(tool, str) and tool for tool in abortable
    ):
        raise _Invalid(f"{where}.abortable must be a list of tool names")
    seconds: dict[str, Any] = {
        key: _seconds(f"{where}.{key}", raw[key])
        for key in ("timeout_s", "connect_timeout_s", "restart_backoff_s", "restart_backoff_max_s")
        if key in raw
    }
    server = ServerSettings(
        name=name,
        command=args,
        url=url,
        env=dict(env),
        cwd=cwd,
        mode=mode,
        abortable=frozenset(abortable),
        **seconds,
    )
    if server.restart_backoff_max_s < server.restart_backoff_s:
        raise _Invalid(f"{where}.restart_backoff_max_s must be at least restart_backoff_s")
    tables = raw.get("tool", {})
    if not isinstance(tables, Mapping):
        raise _Invalid(f"{where}.tool must be a table of per-tool tables")
    tools = {}
    for tool, table in tables.items():
        settings = _tool(f"{where}.tool.{tool}", table, server)
        if tool in server.abortable and not settings.abortable and "abortable" in table:
            raise _Invalid(f"{where}: tool {tool!r} is both abortable and not")
        if tool in server.abortable:
            settings = ToolSettings(abortable=True, timeout_s=settings.timeout_s)
        tools[tool] = settings
    return dataclasses.replace(server, tools=tools)


def parse_tools(raw: Mapping[str, Any]) -> dict[str, ServerSettings]:
    """The servers of a ``tools`` setting; ValueError naming the bad key otherwise. Values
    already checked (:class:`ServerSettings`) are kept as they are."""
    if not isinstance(raw, Mapping):
        raise _Invalid("tools must be a table of [tools.NAME] tables")
    return {
        str(name): table if isinstance(table, ServerSettings) else _server(str(name), table)
        for name, table in raw.items()
    }
