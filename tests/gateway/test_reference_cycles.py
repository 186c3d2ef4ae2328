"""A finished request and a closed connection are freed when their last reference goes, not by
the cycle collector (issue 18, the soak's memory).

Objects in a reference cycle wait for a collection of the generation they are in; the oldest
one is collected only once the objects added to it since the last time reach a quarter of those
it holds, so the more a busy gateway holds, the longer a closed connection's objects and buffers
(websockets' reader, the scheduler's queues) stay — the soak measured a third more RSS from that
alone. So the gateway keeps its object graphs acyclic once they are done: these tests run real
traffic with the collector off, then collect with ``DEBUG_SAVEALL`` and look at what it found.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import os
import sys
import types
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway.server import Gateway
from protocol import CloseCode, ResponseStatus

from .conftest import running_gateway, settled
from .http_client import http
from .invariants import Campaign
from .test_cluster import NATS_SERVER, cluster
from .wire import WireClient

GATEWAY_SOURCES = str(Path(__file__).resolve().parents[2] / "gateway") + os.sep


def _ours(obj: Any) -> bool:
    """An object of the gateway's: of one of its types, or a frame or coroutine of its code."""
    if isinstance(obj, weakref.ProxyTypes):
        return False  # (its referent may be gone: anything else raises ReferenceError)
    if type(obj).__module__.startswith("gateway."):
        return True
    code = None
    if isinstance(obj, types.FrameType):
        code = obj.f_code
    elif isinstance(obj, types.CoroutineType):
        code = obj.cr_code
    elif isinstance(obj, asyncio.Task):
        coro = obj.get_coro()
        code = getattr(coro, "cr_code", None)
    return code is not None and code.co_filename.startswith(GATEWAY_SOURCES)


@contextmanager
def cycles_found() -> Iterator[collections.Counter[str]]:
    """Collector off for the block; then the gateway's objects a full collection found in
    cycles, by type (empty: everything was freed by reference counting)."""
    found: collections.Counter[str] = collections.Counter()
    gc.collect()
    gc.disable()
    try:
        yield found
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
    finally:
        gc.set_debug(0)
        gc.enable()
        found.update(type(o).__qualname__ for o in gc.garbage if _ours(o))
        gc.garbage.clear()


async def _hostile(gw: Gateway) -> None:
    """Garbage frames (typed errors), then a message over the limit (the gateway closes)."""
    async with connect(gw.url, subprotocols=["muxgate.v1.json"]) as ws:  # type: ignore[list-item]
        for frame in ("{", '{"type":"nonsense"}', '{"type":"chat"}', "[" * 200):
            await ws.send(frame)
        await ws.send('{"type":"ping","id":"p"}')
        while b'"pong"' not in await ws.recv(decode=False):
            pass
        await ws.send("x" * (gw.max_message_bytes + 1))
        await ws.wait_closed()


async def _slow_reader(gw: Gateway) -> None:
    """A client that does not read while long streams run: the gateway gives up on it (4008)."""
    async with connect(gw.url, subprotocols=["muxgate.v1.json"], max_queue=1) as ws:  # type: ignore[list-item]
        for n in range(4):
            chat = {"type": "chat", "request_id": f"slow{n}", "message": "x",
                    "metadata": {"tokens": 20_000, "token_delay_ms": 0}}  # fmt: skip
            await ws.send(orjson.dumps(chat).decode())
        async with asyncio.timeout(10):
            while not any(conn.outbound.closed for conn in gw.connections):  # noqa: ASYNC110 - no event for it
                await asyncio.sleep(0.01)
        with contextlib.suppress(ConnectionClosed):
            async for _ in ws:  # reading again: what was written, then the close
                pass
    assert ws.close_code == CloseCode.SLOW_CONSUMER


async def _quiet(gw: Gateway) -> None:
    """Until nothing of the traffic is left running: pipelines ended, and detached requests'
    grace over (they end then, cancelled)."""
    await settled(gw)
    async with asyncio.timeout(10):
        while gw.resumables.detached:  # noqa: ASYNC110 - a timer of the gateway's
            await asyncio.sleep(0.05)
    await settled(gw)


async def test_requests_and_connections_of_every_kind_leave_no_reference_cycle() -> None:
    async with running_gateway(
        retention_seconds=30, resume_grace_seconds=0.2, slow_consumer_timeout=0.5
    ) as gw:
        with cycles_found() as found:
            # Every kind of cancel, dropped connections, resumes, requests ended while detached.
            figures = await Campaign([gw], seed=18, batch=20, prefix="cyc").run(400, parallel=4)
            await _hostile(gw)
            await _slow_reader(gw)
            await http("GET", f"{gw.http_url}/metrics")
            await _quiet(gw)
        assert figures.drops, figures  # the traffic had them
        assert figures.resumed, figures
    assert not found, f"objects of the gateway left to the cycle collector: {dict(found)}"


@pytest.mark.skipif(NATS_SERVER is None, reason="nats-server not installed (extra 'cluster')")
async def test_relayed_and_cross_node_requests_leave_no_reference_cycle() -> None:
    """Three nodes: cancels and lookups asked of other nodes, resumes relayed from the owner."""
    async with cluster(3, resume_grace_seconds=0.2) as nodes:
        with cycles_found() as found:
            figures = await Campaign(nodes, seed=18, batch=20, prefix="cyc").run(300, parallel=4)
            for gw in nodes:
                await _quiet(gw)
        assert figures.resumed, figures
    assert not found, f"objects of the gateway left to the cycle collector: {dict(found)}"


async def test_tool_calls_completed_and_aborted_leave_no_reference_cycle(tmp_path: Path) -> None:
    """MCP tool steps (a real stdio server): calls that answer, and abortable ones cancelled
    mid-way (the task's CancelledError keeps the tool call's frame)."""
    pytest.importorskip("mcp")
    from .test_mcp_tools import started, stdio_tools, tool_gateway, ws_url

    tools = stdio_tools(tmp_path / "events.jsonl", abortable=["slow_search"])
    async with tool_gateway(tools) as (gw, _):
        async with WireClient.open(ws_url(gw)) as client:  # the server's session starts
            await client.chat("warm", "search", metadata=_search(0.01))
            await client.response("warm")
        with cycles_found() as found:
            async with WireClient.open(ws_url(gw)) as client:
                for n in range(6):
                    rid = f"tool{n}"
                    aborted = n % 2 == 1
                    track = await client.chat(
                        rid, "search", steps=True, metadata=_search(30 if aborted else 0.01)
                    )
                    if aborted:
                        await client.wait_for(partial(started, track, "slow_search"))
                        await client.cancel(rid)
                    response = await client.response(rid)
                    expected = ResponseStatus.CANCELLED if aborted else ResponseStatus.COMPLETED
                    assert response.status is expected
            await settled(gw)
    assert not found, f"objects of the gateway left to the cycle collector: {dict(found)}"


def _search(seconds: float) -> dict[str, Any]:
    return {"server": "ex", "tool": "slow_search", "args": {"query": "q", "seconds": seconds}}


async def test_agent_calls_completed_and_aborted_leave_no_reference_cycle() -> None:
    """A2A agent steps (the test agent in its own process): answers, and tasks cancelled
    mid-way over streaming and blocking sends."""
    pytest.importorskip("a2a")
    from gateway.agents.a2a import A2AAgents

    from .conftest import process_with_port
    from .test_a2a_agents import ROOT, AgentBackend, agents_config, cancel_during_task

    command = [sys.executable, "-m", "tests.gateway.a2a_agent_server"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with process_with_port(command, cwd=ROOT, env=env) as port:
        url = f"http://127.0.0.1:{port}/"
        backend = AgentBackend(A2AAgents.from_config(agents_config(url)))
        async with running_gateway(backend_impl=backend) as gw:
            async with WireClient.open(gw.url) as client:  # the agents' clients are made
                await client.chat("warm", "hello", metadata={"agent": "steady"})
                await client.response("warm")
            with cycles_found() as found:
                async with WireClient.open(gw.url) as client:
                    for n, agent in enumerate(("slow", "blocking", "slow", "blocking")):
                        await cancel_during_task(client, backend, url, f"agent{n}", agent)
                    await client.chat("answered", "hello", metadata={"agent": "steady"})
                    response = await client.response("answered")
                    assert response.status is ResponseStatus.COMPLETED
                await settled(gw)
    assert not found, f"objects of the gateway left to the cycle collector: {dict(found)}"
