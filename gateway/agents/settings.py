"""The ``agents`` setting: remote A2A agents by name, validated at start-up.

Standard library only, so that the gateway's configuration can be checked without the
``agents`` extra installed. One table per agent::

    [agents.researcher]
    url = "http://127.0.0.1:9999/"   # the agent's JSON-RPC endpoint (its card's JSONRPC url)
    abortable = true                  # a cancel sends tasks/cancel at once (default false)
    timeout_s = 120                   # the longest the call may take (default 60)
    streaming = true                  # SendStreamingMessage (default) or a blocking SendMessage
    cancel_timeout_s = 5              # the longest the cancel path may take (default 5)
    connect_timeout_s = 5             # TCP (and TLS) connect timeout (default 5)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from ..config import ConfigError

__all__ = ["AGENT_OPTIONS", "AgentSettings", "parse_agents"]

#: The keys of an ``[agents.NAME]`` table and what they mean.
AGENT_OPTIONS: Final[Mapping[str, str]] = {
    "url": "required: the agent's A2A JSON-RPC endpoint, e.g. http://127.0.0.1:9999/",
    "abortable": "true: a cancel stops the call at once and sends tasks/cancel for the remote "
    "task; false (default): the call finishes, then the pipeline halts",
    "timeout_s": "the longest the call may take, in seconds, then agent_timeout (default 60)",
    "streaming": "true (default): stream the task's updates; false: await the final task",
    "cancel_timeout_s": "the longest a cancel may take to reach the agent, in seconds (default 5)",
    "connect_timeout_s": "TCP (and TLS) connect timeout, in seconds (default 5)",
}

#: An agent's name: it names the pipeline step (``step.name``) and the log fields.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
_MAX_SECONDS: Final = 86_400.0


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentSettings:
    """One remote A2A agent, as configured."""

    name: str
    url: str
    abortable: bool = False
    timeout_s: float = 60.0
    streaming: bool = True
    cancel_timeout_s: float = 5.0
    connect_timeout_s: float = 5.0


def _bad(where: str, what: str, value: object) -> ConfigError:
    shown = repr(value) if type(value) in (bool, int, float) or value is None else None
    got = shown if shown is not None else f"a {type(value).__name__}"
    return ConfigError(f"{where} must be {what}, got {got}")


def _seconds(where: str, value: object) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):  # type: ignore[arg-type]
        raise _bad(where, f"a number of seconds > 0 and <= {_MAX_SECONDS:g}", value)
    seconds = float(value)  # type: ignore[arg-type]
    if not 0 < seconds <= _MAX_SECONDS:
        raise _bad(where, f"a number of seconds > 0 and <= {_MAX_SECONDS:g}", value)
    return seconds


def _url(where: str, value: object) -> str:
    if type(value) is not str or not value.strip():
        raise _bad(where, "a URL such as http://127.0.0.1:9999/", value)
    try:
        parts = urlsplit(value.strip())
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"{where} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ConfigError(f"{where} must be an http:// or https:// URL with a host")
    if parts.fragment:
        raise ConfigError(f"{where} must have no fragment")
    return value.strip()


def _agent(name: object, table: object, source: str) -> AgentSettings:
    if type(name) is not str or not _NAME.fullmatch(name):
        raise ConfigError(
            f"agents ({source}): agent name {name!r} must be 1-64 letters, digits, '_', '.' or "
            "'-', starting with a letter or digit"
        )
    where = f"agents.{name} ({source})"
    if isinstance(table, AgentSettings):
        if table.name != name:
            raise ConfigError(f"{where}: configured under another name ({table.name!r})")
        return table
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: must be a table of options ({', '.join(AGENT_OPTIONS)})")
    unknown = sorted(str(key) for key in table if key not in AGENT_OPTIONS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown option {unknown[0]!r} (known: {', '.join(AGENT_OPTIONS)})"
        )
    if "url" not in table:
        raise ConfigError(f"{where}: option 'url' is required ({AGENT_OPTIONS['url']})")
    values: dict[str, Any] = {"name": name, "url": _url(f"{where} option 'url'", table["url"])}
    for key in ("abortable", "streaming"):
        if key in table:
            if type(table[key]) is not bool:
                raise _bad(f"{where} option {key!r}", "true or false", table[key])
            values[key] = table[key]
    for key in ("timeout_s", "cancel_timeout_s", "connect_timeout_s"):
        if key in table:
            values[key] = _seconds(f"{where} option {key!r}", table[key])
    return AgentSettings(**values)


def parse_agents(raw: object, source: str = "settings") -> dict[str, AgentSettings]:
    """Validate the ``agents`` setting: a table of ``[agents.NAME]`` tables (or already
    validated :class:`AgentSettings`). Raises :class:`ConfigError` naming the agent, the option
    and the source; never shows a URL or a string value."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"agents ({source}): must be a table of [agents.NAME] tables")
    return {name: _agent(name, table, source) for name, table in raw.items()}
