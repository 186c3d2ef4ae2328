"""MCP tool calls (gateway/tools/): real MCP servers (the bundled example server, written with
the ``mcp`` SDK) started by the tests on stdio and on streamable HTTP, a real gateway over a real
WebSocket, and a small backend that calls the tools through :class:`MCPTools`.

The server records what happened to each call (finished, or cancelled mid-way) and every
``notifications/cancelled`` it received, with ``time.monotonic()`` (one clock for all processes
on Linux), so a test can tell when the server learned of a cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp")

from gateway.pipeline import RequestContext
from gateway.tools import MCPTools
from gateway.tools.example_server import EVENTS_ENV
from protocol import ResponseStatus, StepState

from .conftest import running_gateway
from .wire import Track, WireClient

ROOT = Path(__file__).resolve().parents[2]
SERVER = [sys.executable, "-m", "gateway.tools.example_server"]


class ToolBackend:
    """Calls one tool (``metadata``: ``server``, ``tool``, ``args``), then makes an "LLM call"
    (a plan step) and answers with the tool's text; records what a test needs as evidence."""

    def __init__(self, tools: MCPTools) -> None:
        self.tools = tools
        #: request_id -> loop time at which the gateway cancelled it (read the cancel).
        self.cancelled_at: dict[str, float] = {}
        #: request_id -> steps started after the tool call (must stay empty after a cancel).
        self.after_tool: dict[str, list[str]] = {}

    async def astart(self) -> None:
        await self.tools.astart()

    async def aclose(self) -> None:
        await self.tools.aclose()

    async def run(self, ctx: RequestContext) -> None:
        rid = ctx.request_id
        ctx.token.on_cancel(lambda: self.cancelled_at.setdefault(rid, time.monotonic()))
        server = ctx.metadata.get("server")
        text = "no tool"
        if server is not None:
            tool = str(ctx.metadata["tool"])
            result = await self.tools.call(ctx, str(server), tool, ctx.metadata.get("args") or {})
            text = result.text

        async def answer() -> str:
            self.after_tool.setdefault(rid, []).append("llm")
            return f"the tool said: {text}"

        await ctx.emit(await ctx.llm_call(answer, name="answer"))


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition on another process's records (a file cannot be awaited)."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - another process's file: nothing to await
            await asyncio.sleep(0.005)


def events_of(path: Path, event: str, **match: Any) -> list[dict[str, Any]]:
    return [
        e
        for e in read_events(path)
        if e["event"] == event and all(e.get(k) == v for k, v in match.items())
    ]


def has(path: Path, event: str, request_id: str) -> bool:
    return bool(events_of(path, event, request_id=request_id))


async def nth_call(path: Path, n: int) -> dict[str, Any]:
    """The server's record of its n-th slow_search call (0-based), once it has it."""
    await until(lambda: len(events_of(path, "call", tool="slow_search")) > n)
    return events_of(path, "call", tool="slow_search")[n]


def started(track: Track, name: str) -> bool:
    return any(s.name == name and s.state is StepState.STARTED for s in track.steps)


def ws_url(gw: Any) -> str:
    return f"ws://127.0.0.1:{gw.port}/v1/ws"


def stdio_tools(events: Path, **options: Any) -> dict[str, Any]:
    return {
        "ex": {
            "command": SERVER,
            "cwd": str(ROOT),
            "env": {EVENTS_ENV: str(events)},
            "restart_backoff_s": 0.05,
            "restart_backoff_max_s": 0.5,
            **options,
        }
    }


@contextlib.asynccontextmanager
async def tool_gateway(tools: dict[str, Any]) -> AsyncIterator[tuple[Any, ToolBackend]]:
    backend = ToolBackend(MCPTools.from_config(tools))
    async with running_gateway(backend_impl=backend) as gw:
        yield gw, backend


class HTTPServer:
    """The example server on streamable HTTP, in a process of its own."""

    def __init__(self, events: Path, port: int = 0) -> None:
        self.events = events
        self.process = subprocess.Popen(
            [*SERVER, "--http", "--port", str(port)],
            cwd=ROOT,
            env={**os.environ, EVENTS_ENV: str(events)},
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # "listening on URL", once it listens
        assert line.startswith("listening on "), line
        self.url = line.split()[-1]
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def http_server(tmp_path: Path) -> Any:
    servers: list[HTTPServer] = []

    def start(port: int = 0) -> HTTPServer:
        server = HTTPServer(tmp_path / "events.jsonl", port)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


# -- stdio -----------------------------------------------------------------------------------


async def test_a_tool_call_answers_and_names_its_step(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    async with tool_gateway(stdio_tools(events)) as (gw, _), WireClient.open(ws_url(gw)) as client:
        meta = {"server": "ex", "tool": "word_count", "args": {"text": "one two three"}}
        track = await client.chat("w1", "count", steps=True, metadata=meta)
        response = await client.response("w1")
    assert response.status is ResponseStatus.COMPLETED
    assert response.content == "the tool said: 3"
    assert [(s.kind, s.name, s.state.value) for s in track.steps] == [
        ("tool", "word_count", "started"),
        ("tool", "word_count", "ended"),
        ("llm", "answer", "started"),
        ("llm", "answer", "ended"),
    ]


async def test_non_abortable_tool_finishes_then_the_pipeline_halts(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    async with tool_gateway(stdio_tools(events)) as (gw, backend):
        async with WireClient.open(ws_url(gw)) as client:
            meta = {"server": "ex", "tool": "slow_search", "args": {"query": "q", "seconds": 0.4}}
            track = await client.chat("n1", "search", steps=True, metadata=meta)
            await client.wait_for(lambda: started(track, "slow_search"))
            await client.cancel("n1")
            response = await client.response("n1")
            usage = await client.final_usage("n1")
        assert response.status is ResponseStatus.CANCELLED
        assert response.halt is not None
        assert response.halt.step is not None
        assert response.halt.step.name == "slow_search"  # the halt waits for the tool
        assert usage.final
        await until(lambda: bool(events_of(events, "finished", tool="slow_search")))
    # The tool ran to its end, was never told to cancel; no step started after it (G5).
    assert events_of(events, "cancelled") == []
    assert events_of(events, "cancel_notification") == []
    assert backend.after_tool.get("n1") is None
    assert [(s.name, s.state) for s in track.steps] == [("slow_search", StepState.STARTED)]
    assert track.usage_report is not None
    assert track.usage_report.halt is not None
    assert track.usage_report.halt.step is not None
    assert track.usage_report.halt.step.name == "slow_search"  # halted after it


async def test_abortable_tool_is_cancelled_on_the_server_at_once(tmp_path: Path) -> None:
    """The server learns of the cancel within a few ms of the gateway reading it: measured over
    20 cancels (figures printed; only a generous bound is asserted)."""
    events = tmp_path / "events.jsonl"
    tools = stdio_tools(events, abortable=["slow_search"])
    notified: list[float] = []
    handler_cancelled: list[float] = []
    async with tool_gateway(tools) as (gw, backend), WireClient.open(ws_url(gw)) as client:
        for i in range(20):
            rid = f"a{i}"
            meta = {"server": "ex", "tool": "slow_search", "args": {"query": "q", "seconds": 30}}
            track = await client.chat(rid, "search", steps=True, metadata=meta)
            await client.wait_for(partial(started, track, "slow_search"))
            # The server has the call (its request id) before the cancel is sent.
            call = await nth_call(events, i)
            await client.cancel(rid)
            response = await client.response(rid)
            assert response.status is ResponseStatus.CANCELLED
            assert response.halt is None or response.halt.step is None  # nothing to wait for
            await until(partial(has, events, "cancelled", call["request_id"]))
            await until(partial(has, events, "cancel_notification", call["request_id"]))
            note = events_of(events, "cancel_notification", request_id=call["request_id"])[0]
            done = events_of(events, "cancelled", request_id=call["request_id"])[0]
            assert note["reason"] == "muxgate: request cancelled (client)"
            notified.append(note["t"] - backend.cancelled_at[rid])
            handler_cancelled.append(done["t"] - backend.cancelled_at[rid])
            assert backend.after_tool.get(rid) is None
            assert [s.state for s in track.steps] == [StepState.STARTED]  # cut mid-way
    assert events_of(events, "finished", tool="slow_search") == []
    ms = sorted(x * 1000 for x in notified)
    ms_h = sorted(x * 1000 for x in handler_cancelled)
    print(
        f"\nstdio cancel -> server notified: p50 {statistics.median(ms):.2f} ms,"
        f" max {ms[-1]:.2f} ms; -> handler cancelled: p50 {statistics.median(ms_h):.2f} ms,"
        f" max {ms_h[-1]:.2f} ms"
    )
    assert max(ms) < 500


async def test_tool_error_fails_the_request_with_tool_error(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    async with tool_gateway(stdio_tools(events)) as (gw, _), WireClient.open(ws_url(gw)) as client:
        await client.chat(
            "e1", "x", metadata={"server": "ex", "tool": "fail", "args": {"message": "no index"}}
        )
        await client.chat("e2", "x", metadata={"server": "ex", "tool": "no_such_tool"})
        failed = await client.response("e1")
        unknown = await client.response("e2")
    assert failed.status is ResponseStatus.FAILED
    assert failed.error is not None
    assert failed.error.code == "tool_error"
    assert "no index" in failed.error.message
    assert "'fail'" in failed.error.message
    assert unknown.status is ResponseStatus.FAILED
    assert unknown.error is not None
    assert unknown.error.code == "tool_error"


async def test_a_hanging_tool_fails_with_tool_timeout_and_is_cancelled(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    tools = stdio_tools(events, tool={"slow_search": {"timeout_s": 0.3}})
    async with tool_gateway(tools) as (gw, _), WireClient.open(ws_url(gw)) as client:
        meta = {"server": "ex", "tool": "slow_search", "args": {"query": "q", "seconds": 60}}
        await client.chat("h1", "x", metadata=meta)
        response = await client.response("h1")
        assert response.status is ResponseStatus.FAILED
        assert response.error is not None
        assert response.error.code == "tool_timeout"
        await until(lambda: bool(events_of(events, "cancelled", tool="slow_search")))
    (note,) = events_of(events, "cancel_notification")
    assert note["reason"] == "muxgate: no answer within 0.3 s"


async def test_a_crashed_server_fails_its_calls_and_is_restarted(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    async with tool_gateway(stdio_tools(events)) as (gw, backend):
        server = backend.tools.server("ex")
        assert server.starts == 1
        (first,) = events_of(events, "started")
        async with WireClient.open(ws_url(gw)) as client:
            meta = {"server": "ex", "tool": "slow_search", "args": {"query": "q", "seconds": 30}}
            track = await client.chat("c1", "x", steps=True, metadata=meta)
            await client.wait_for(lambda: started(track, "slow_search"))
            other = await client.chat("c2", "no tool")  # same connection, no tool server
            os.kill(first["pid"], signal.SIGKILL)
            crashed = await client.response("c1")
            assert crashed.status is ResponseStatus.FAILED
            assert crashed.error is not None
            assert crashed.error.code == "tool_unavailable"
            assert (await client.response("c2")).status is ResponseStatus.COMPLETED
            assert other.response is not None
            # Restarted with backoff; later calls work.
            async with asyncio.timeout(10):
                await server.wait_ready()
            assert server.starts == 2
            meta = {"server": "ex", "tool": "word_count", "args": {"text": "a b"}}
            await client.chat("c3", "x", metadata=meta)
            again = await client.response("c3")
        assert again.status is ResponseStatus.COMPLETED
        assert again.content == "the tool said: 2"
        assert len(events_of(events, "started")) == 2


async def test_a_call_while_the_server_is_down_fails_at_once(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    # A long backoff keeps it down after the crash.
    tools = stdio_tools(events, restart_backoff_s=30, restart_backoff_max_s=30)
    async with tool_gateway(tools) as (gw, backend):
        server = backend.tools.server("ex")
        (first,) = events_of(events, "started")
        os.kill(first["pid"], signal.SIGKILL)
        async with asyncio.timeout(10):
            await server.wait_down()
        async with WireClient.open(ws_url(gw)) as client:
            await client.chat(
                "d1", "x", metadata={"server": "ex", "tool": "word_count", "args": {"text": "a"}}
            )
            response = await client.response("d1", timeout=2)
    assert response.error is not None
    assert response.error.code == "tool_unavailable"
    assert "'ex'" in response.error.message


async def test_shutdown_stops_the_server_process(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    async with tool_gateway(stdio_tools(events)) as (_, backend):
        (first,) = events_of(events, "started")
        task = backend.tools.server("ex")._task
        assert task is not None
    assert task.done()
    with pytest.raises(ProcessLookupError):
        os.kill(first["pid"], 0)


async def test_a_server_that_cannot_start_stops_the_gateway_start(tmp_path: Path) -> None:
    from gateway.tools import ToolServerError

    tools = {
        "bad": {"command": [sys.executable, "-c", "raise SystemExit(1)"], "connect_timeout_s": 5}
    }
    backend = ToolBackend(MCPTools.from_config(tools))
    with pytest.raises(ToolServerError, match="'bad'"):
        async with running_gateway(backend_impl=backend):
            pass


# -- streamable HTTP -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_http_abortable_tool_is_cancelled_on_the_server(
    tmp_path: Path, http_server: Any, mode: str
) -> None:
    """2026-07-28 (auto): the request's stream is closed, no notification (the spec's way);
    2025-11-25 (legacy): ``notifications/cancelled`` for the call's id."""
    server = http_server()
    events = server.events
    tools = {"web": {"url": server.url, "mode": mode, "abortable": ["slow_search"]}}
    latencies = []
    async with tool_gateway(tools) as (gw, backend), WireClient.open(ws_url(gw)) as client:
        for i in range(5):
            rid = f"h{i}"
            meta = {"server": "web", "tool": "slow_search", "args": {"query": "q", "seconds": 30}}
            track = await client.chat(rid, "x", steps=True, metadata=meta)
            await client.wait_for(partial(started, track, "slow_search"))
            call = await nth_call(events, i)
            await client.cancel(rid)
            assert (await client.response(rid)).status is ResponseStatus.CANCELLED
            await until(partial(has, events, "cancelled", call["request_id"]))
            done = events_of(events, "cancelled", request_id=call["request_id"])[0]
            latencies.append((done["t"] - backend.cancelled_at[rid]) * 1000)
            notes = events_of(events, "cancel_notification", request_id=call["request_id"])
            if mode == "legacy":
                assert notes
                assert notes[0]["reason"] == "muxgate: request cancelled (client)"
            else:
                assert notes == []
    print(
        f"\nhttp ({mode}) cancel -> handler cancelled: p50 {statistics.median(latencies):.2f} ms, "
        f"max {max(latencies):.2f} ms"
    )
    assert events_of(events, "finished", tool="slow_search") == []


async def test_http_server_gone_then_back(tmp_path: Path, http_server: Any) -> None:
    server = http_server()
    tools = {"web": {"url": server.url, "restart_backoff_s": 0.05, "restart_backoff_max_s": 0.2}}
    async with tool_gateway(tools) as (gw, backend), WireClient.open(ws_url(gw)) as client:
        web = backend.tools.server("web")
        meta = {"server": "web", "tool": "slow_search", "args": {"query": "q", "seconds": 30}}
        track = await client.chat("g1", "x", steps=True, metadata=meta)
        await client.wait_for(lambda: started(track, "slow_search"))
        other = await client.chat("g2", "no tool")
        server.kill()
        gone = await client.response("g1")
        assert gone.error is not None
        assert gone.error.code == "tool_unavailable"
        await client.response("g2")
        assert other.response is not None
        assert other.response.status is ResponseStatus.COMPLETED
        async with asyncio.timeout(10):
            await web.wait_down()
        http_server(server.port)  # back, on the same port
        async with asyncio.timeout(10):
            await web.wait_ready()
        meta = {"server": "web", "tool": "word_count", "args": {"text": "a b c d"}}
        await client.chat("g3", "x", metadata=meta)
        again = await client.response("g3")
    assert again.status is ResponseStatus.COMPLETED
    assert again.content == "the tool said: 4"
    assert web.starts >= 2
