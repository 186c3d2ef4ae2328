"""A small MCP tool server, written with the ``mcp`` SDK's server side: the bundled example
for flows and the server the tests start.

Run it on stdio (what ``[tools.NAME] command = [...]`` starts)::

    python3 -m gateway.tools.example_server

or over streamable HTTP (``[tools.NAME] url = "http://127.0.0.1:9000/mcp"``)::

    python3 -m gateway.tools.example_server --http --port 9000

Tools:

- ``word_count(text)``: the number of words, at once.
- ``slow_search(query, seconds)``: waits ``seconds`` (default 2), then answers. It records
  whether it ran to its end or was cancelled, and when.
- ``fail(message)``: always fails (an ``isError`` result carrying ``message``).
- ``crash()``: the server process exits at once (code 3), as a crashing server would.

**What it records.** With ``MUXGATE_EXAMPLE_EVENTS=/path/file.jsonl`` in its environment, the
server appends one JSON object per line to that file: ``started`` (``pid``, ``transport``,
``port``), ``call`` (``tool``, ``request_id``), ``finished`` and ``cancelled`` (``tool``,
``request_id``: the handler ran to its end, or was cancelled mid-way), and
``cancel_notification`` (``request_id``, ``reason``: a ``notifications/cancelled`` arrived).
Each carries ``t``, ``time.monotonic()`` of this process (on Linux the same clock as every
other process's ``time.monotonic()``), so a test can tell how long after its cancel the server
learned of it. The ``events`` tool returns the same records.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import anyio
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

__all__ = ["EVENTS_ENV", "build_server", "main"]

#: The environment variable naming the file the server appends its events to.
EVENTS_ENV = "MUXGATE_EXAMPLE_EVENTS"

_events: list[dict[str, Any]] = []


def record(event: str, **fields: Any) -> None:
    """Remember an event, and append it to the events file when one is configured."""
    entry = {"event": event, "t": time.monotonic(), **fields}
    _events.append(entry)
    path = os.environ.get(EVENTS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as file:
            file.write(json.dumps(entry) + "\n")


async def _observe_cancels(
    ctx: ServerRequestContext[Any, Any], call_next: CallNext
) -> HandlerResult:
    """Middleware: record every ``notifications/cancelled`` as it arrives (the dispatcher has
    already cancelled the named request's handler by then)."""
    if ctx.method == "notifications/cancelled":
        params = ctx.params or {}
        record(
            "cancel_notification",
            request_id=str(params.get("requestId")),
            reason=params.get("reason"),
        )
    return await call_next(ctx)


def build_server() -> MCPServer:
    server: MCPServer = MCPServer(
        "muxgate-example",
        instructions="Example tools for muxgate: word_count, slow_search, fail, crash.",
        middleware=[_observe_cancels],
        log_level="WARNING",
    )

    @server.tool()
    async def word_count(text: str, ctx: Context) -> int:
        """Count the words of ``text``."""
        record("call", tool="word_count", request_id=ctx.request_id)
        record("finished", tool="word_count", request_id=ctx.request_id)
        return len(text.split())

    @server.tool()
    async def slow_search(query: str, ctx: Context, seconds: float = 2.0) -> str:
        """Search slowly: answer after ``seconds``. Records whether it was cancelled."""
        record("call", tool="slow_search", request_id=ctx.request_id, seconds=seconds)
        try:
            await anyio.sleep(seconds)
        except BaseException:  # the cancellation of its request (or of the server)
            record("cancelled", tool="slow_search", request_id=ctx.request_id)
            raise
        record("finished", tool="slow_search", request_id=ctx.request_id)
        return f"3 results for {query!r}"

    @server.tool()
    async def fail(ctx: Context, message: str = "the example tool failed") -> str:
        """Always fail, with ``message``."""
        record("call", tool="fail", request_id=ctx.request_id)
        raise ToolError(message)

    @server.tool()
    async def crash(ctx: Context) -> str:
        """Exit the server process at once, as a crash would."""
        record("call", tool="crash", request_id=ctx.request_id)
        os._exit(3)

    @server.tool()
    async def events() -> list[dict[str, Any]]:
        """The events recorded so far."""
        return list(_events)

    return server


async def _serve_http(server: MCPServer, host: str, port: int) -> None:
    import uvicorn

    config = uvicorn.Config(server.streamable_http_app(), host=host, port=port, log_level="warning")
    web = uvicorn.Server(config)
    async with anyio.create_task_group() as group:
        group.start_soon(web.serve)
        while not web.started:
            if web.should_exit:  # it could not bind (the port is taken)
                return
            await anyio.sleep(0.01)
        bound = web.servers[0].sockets[0].getsockname()[1]
        record("started", pid=os.getpid(), transport="http", port=bound)
        print(f"listening on http://{host}:{bound}/mcp", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m gateway.tools.example_server")
    parser.add_argument("--http", action="store_true", help="serve streamable HTTP, not stdio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000, help="HTTP port (0: any free port)")
    args = parser.parse_args(argv)
    server = build_server()
    if args.http:
        anyio.run(_serve_http, server, args.host, args.port)
    else:
        record("started", pid=os.getpid(), transport="stdio", port=None)
        anyio.run(server.run_stdio_async)


if __name__ == "__main__":
    main()
