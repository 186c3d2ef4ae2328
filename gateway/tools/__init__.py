"""Tool calls in pipelines: MCP tool servers configured by name (``[tools.NAME]``).

:mod:`gateway.tools.settings` checks the ``tools`` setting (standard library only);
:mod:`gateway.tools.mcp` calls the tools through the official ``mcp`` SDK (the ``tools``
extra) and is imported on first use of :class:`MCPTools`;
:mod:`gateway.tools.example_server` is a small MCP server to try it with.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .settings import ServerSettings, ToolSettings, parse_tools

if TYPE_CHECKING:
    from .mcp import MCPTools, ToolFailure, ToolResult, ToolServer, ToolServerError

__all__ = [
    "MCPTools",
    "ServerSettings",
    "ToolFailure",
    "ToolResult",
    "ToolServer",
    "ToolServerError",
    "ToolSettings",
    "parse_tools",
]


def __getattr__(name: str) -> Any:
    if name in ("MCPTools", "ToolFailure", "ToolResult", "ToolServer", "ToolServerError"):
        from . import mcp

        return getattr(mcp, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
