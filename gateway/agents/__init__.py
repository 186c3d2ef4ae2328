"""Remote A2A agents as pipeline steps (``[agents.NAME]`` settings, :class:`A2AAgents`).

:mod:`gateway.agents.settings` (the setting's validation) needs only the standard library; the
client, :mod:`gateway.agents.a2a`, needs ``a2a-sdk`` (``pip install 'muxgate[agents]'``) and is
imported on first use of its names here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .settings import AGENT_OPTIONS, AgentSettings, parse_agents

if TYPE_CHECKING:
    from .a2a import A2AAgents, AgentFailure, AgentResult, CancelOutcome

__all__ = [
    "AGENT_OPTIONS",
    "A2AAgents",
    "AgentFailure",
    "AgentResult",
    "AgentSettings",
    "CancelOutcome",
    "parse_agents",
]

_CLIENT_NAMES = frozenset({"A2AAgents", "AgentFailure", "AgentResult", "CancelOutcome"})


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        from . import a2a

        return getattr(a2a, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
