"""A2A agent calls (gateway/agents/): a real A2A agent written with ``a2a-sdk`` in its own process
(tests/gateway/a2a_agent_server.py), a real gateway over a real WebSocket, and a small backend
that asks the agent through :class:`A2AAgents`.

Proves: a cancel during an abortable agent's remote task cancels it in A2A's protocol
(``tasks/cancel``: the remote task ends ``canceled``), and how long that takes from the gateway's
reading of the cancel; a cancel racing the start of the remote task is still delivered once the
task's id arrives; a non-abortable agent's task completes and then the pipeline halts, with no
later step; the typed failures (``agent_error``, ``agent_unavailable``, ``agent_timeout``); other
requests on the connection carry on; ``step`` messages name the agent (kind ``agent``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.agents import parse_agents
from gateway.agents.a2a import A2AAgents, AgentResult
from gateway.config import Config, ConfigError, load_config
from gateway.pipeline import RequestContext
from protocol import HaltState, ResponseStatus, StepInfo, StepState

from .conftest import process_with_port, running_gateway
from .wire import Track, WireClient

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def agent_url() -> Iterator[str]:
    """The test agent, in its own process, on an ephemeral port."""
    command = [sys.executable, "-m", "tests.gateway.a2a_agent_server"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with process_with_port(command, cwd=ROOT, env=env) as port:
        yield f"http://127.0.0.1:{port}/"


@pytest.fixture
def closed_port_url() -> str:
    """A URL nothing listens on (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def agents_config(url: str, down_url: str = "http://127.0.0.1:9/") -> dict[str, Any]:
    return {
        "slow": {"url": url, "abortable": True},
        "blocking": {"url": url, "abortable": True, "streaming": False},
        "steady": {"url": url},
        "short": {"url": url, "abortable": False, "timeout_s": 0.5},
        "down": {"url": down_url, "abortable": True, "connect_timeout_s": 2},
    }


class AgentBackend:
    """Asks the agent named by ``metadata.agent`` with the chat's text, then makes one more
    step (``after``): it must never start after a cancel."""

    def __init__(self, agents: A2AAgents) -> None:
        self.agents = agents
        #: request id -> time.perf_counter() when the gateway's cancel flagged the request
        self.cancel_read: dict[str, float] = {}
        self.results: dict[str, AgentResult] = {}
        self.after_started: set[str] = set()

    async def astart(self) -> None:
        await self.agents.astart()

    async def aclose(self) -> None:
        await self.agents.aclose()

    async def run(self, ctx: RequestContext) -> None:
        rid = ctx.request_id
        ctx.token.on_cancel(lambda: self.cancel_read.setdefault(rid, time.perf_counter()))
        agent = str(ctx.metadata.get("agent", "slow"))
        result = await self.agents.ask(ctx, agent, ctx.prompt)
        self.results[rid] = result
        await ctx.llm_call(lambda: self._after(rid), name="after")
        await ctx.emit(result.text)

    async def _after(self, rid: str) -> None:
        self.after_started.add(rid)


async def record(url: str, tag: str, until: str | None = None, timeout: float = 10) -> Any:
    """What the test agent recorded for ``tag`` (waiting, on its side, for ``until``)."""
    params: dict[str, Any] = {"timeout": timeout}
    if until is not None:
        params["until"] = until
    async with httpx.AsyncClient(timeout=timeout + 5) as http:
        answer = await http.get(f"{url}_test/{tag}", params=params)
    answer.raise_for_status()
    return answer.json()


def ws_url(gw: Any) -> str:
    return f"ws://127.0.0.1:{gw.port}/v1/ws"


def started(track: Track, name: str) -> bool:
    return any(s.name == name and s.state is StepState.STARTED for s in track.steps)


@pytest.fixture
def backend(agent_url: str, closed_port_url: str) -> AgentBackend:
    return AgentBackend(A2AAgents.from_config(agents_config(agent_url, closed_port_url)))


# -- configuration ----------------------------------------------------------------------------


def test_agents_setting_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "muxgate.toml"
    path.write_text(
        '[agents.researcher]\nurl = "http://127.0.0.1:9999/"\nabortable = true\n'
        "timeout_s = 30\nstreaming = false\n",
        encoding="utf-8",
    )
    config = load_config(toml_path=path, environ={})
    researcher = config.agents["researcher"]
    assert (researcher.abortable, researcher.timeout_s, researcher.streaming) == (True, 30, False)
    assert load_config(environ={}).agents == {}
    from_env = load_config(environ={"MUXGATE_AGENTS": '{"a": {"url": "https://x.example/"}}'})
    assert from_env.agents["a"].abortable is False
    assert A2AAgents.from_config(config.agents).names == ("researcher",)

    bad = {
        "no url": ({"a": {}}, "option 'url' is required"),
        "unknown option": ({"a": {"url": "http://h/", "retries": 2}}, "unknown option 'retries'"),
        "not a bool": ({"a": {"url": "http://h/", "abortable": "yes"}}, "true or false"),
        "bad timeout": ({"a": {"url": "http://h/", "timeout_s": 0}}, "timeout_s"),
        "nan timeout": ({"a": {"url": "http://h/", "timeout_s": float("nan")}}, "timeout_s"),
        "scheme": ({"a": {"url": "ftp://h/"}}, "http:// or https://"),
        "name": ({"a b": {"url": "http://h/"}}, "agent name"),
        "not a table": ({"a": "http://h/"}, "must be a table"),
    }
    for case, (raw, expected) in bad.items():
        with pytest.raises(ConfigError, match=expected):
            Config(agents=raw)
        with pytest.raises(ConfigError, match=expected):
            parse_agents(raw)
        assert case
    with pytest.raises(ConfigError, match="MUXGATE_AGENTS"):
        load_config(environ={"MUXGATE_AGENTS": "not json"})
    with pytest.raises(ConfigError) as caught:
        Config(agents={"a": {"url": "ftp://secret-host.internal/"}})
    assert "secret-host" not in str(caught.value)  # a URL is never shown


# -- answers and steps ------------------------------------------------------------------------


@pytest.mark.parametrize("agent", ["slow", "blocking", "steady"])
async def test_the_agent_answers_and_the_step_names_it(backend: AgentBackend, agent: str) -> None:
    async with (
        running_gateway(backend_impl=backend) as gw,
        WireClient.open(ws_url(gw)) as client,
    ):
        track = await client.chat(
            "r1", f"slow answer-{agent} 3 10", steps=True, metadata={"agent": agent}
        )
        response = await client.response("r1")
    assert response.status is ResponseStatus.COMPLETED, response
    assert response.content == "part 0 part 1 part 2 "
    assert [(s.index, s.kind, s.name, s.state.value) for s in track.steps] == [
        (0, "agent", agent, "started"),
        (0, "agent", agent, "ended"),
        (1, "llm", "after", "started"),
        (1, "llm", "after", "ended"),
    ]
    result = backend.results["r1"]
    assert (result.agent, result.state) == (agent, "completed")
    assert result.task_id


# -- cancel: abortable --------------------------------------------------------------------------


async def cancel_during_task(
    client: WireClient, backend: AgentBackend, url: str, rid: str, agent: str
) -> tuple[Any, Track]:
    """Ask ``agent`` for a long task, cancel once the remote task works; return the agent's
    record of it (after its cancel handler ran) and the request's track."""
    track = await client.chat(rid, f"slow {rid} 100 50", steps=True, metadata={"agent": agent})
    await record(url, rid, until="working")
    await client.cancel(rid)
    await client.final_usage(rid)
    return await record(url, rid, until="cancelled"), track


@pytest.mark.parametrize("agent", ["slow", "blocking"])
async def test_abortable_cancel_cancels_the_remote_task(
    backend: AgentBackend, agent_url: str, agent: str
) -> None:
    async with (
        running_gateway(backend_impl=backend) as gw,
        WireClient.open(ws_url(gw)) as client,
    ):
        rid = f"abort-{agent}"
        remote, track = await cancel_during_task(client, backend, agent_url, rid, agent)
        assert track.response is not None
    assert remote["final_state"] == "canceled"
    assert remote["cancels"] == 1
    assert remote["updates"] < 100
    [outcome] = backend.agents.cancellations_for(rid)
    assert (outcome.why, outcome.sent, outcome.delivered) == ("cancel", True, True)
    assert outcome.final_state == "canceled"
    assert outcome.task_id == remote["task_id"]
    assert outcome.error is None
    # The step was cut at once: no "after" step; the halt names the agent step, aborted.
    response = track.response
    assert response.status is ResponseStatus.CANCELLED
    assert rid not in backend.after_started
    assert not started(track, "after")
    assert track.usage_report is not None
    assert track.usage_report.halt is not None
    halt = track.usage_report.halt
    assert (halt.state, halt.step, halt.aborted) == (
        HaltState.HALTED,
        StepInfo(index=0, kind="agent", name=agent),
        True,
    )


async def test_cancel_to_agent_latency(backend: AgentBackend, agent_url: str) -> None:
    """From the gateway's reading of the cancel to the agent's cancel handler running (same
    machine, same monotonic clock), over 20 runs; printed, never asserted beyond a sanity
    bound (speed is a benchmark's business)."""
    latencies: list[float] = []
    async with (
        running_gateway(backend_impl=backend) as gw,
        WireClient.open(ws_url(gw)) as client,
    ):
        for i in range(20):
            rid = f"lat-{i}"
            remote, _ = await cancel_during_task(client, backend, agent_url, rid, "slow")
            assert remote["final_state"] == "canceled"
            latencies.append(remote["cancel_at"] - backend.cancel_read[rid])
    assert all(0 < latency < 5 for latency in latencies), latencies
    ms = sorted(latency * 1000 for latency in latencies)
    print(
        f"\ncancel read by the gateway -> agent's cancel handler: p50 "
        f"{statistics.median(ms):.2f} ms, max {ms[-1]:.2f} ms over {len(ms)} runs"
    )


@pytest.mark.parametrize("agent", ["slow", "blocking"])
async def test_a_cancel_racing_the_start_still_cancels_the_remote_task(
    backend: AgentBackend, agent_url: str, agent: str
) -> None:
    """The agent announces its task (and so its id) 400 ms after it started: the cancel arrives
    while the gateway does not know the id yet, and is delivered once it does."""
    async with (
        running_gateway(backend_impl=backend) as gw,
        WireClient.open(ws_url(gw)) as client,
    ):
        rid = f"race-{agent}"
        track = await client.chat(
            rid, f"slowstart {rid} 20 400", steps=True, metadata={"agent": agent}
        )
        await record(agent_url, rid)  # the executor runs; its task is not announced yet
        await client.cancel(rid)
        response = await client.response(rid)
        remote = await record(agent_url, rid, until="finished")
        await client.final_usage(rid)
    assert response.status is ResponseStatus.CANCELLED
    assert remote["final_state"] == "canceled"
    assert remote["cancels"] == 1
    assert remote["updates"] == 0
    [outcome] = backend.agents.cancellations_for(rid)
    assert (outcome.sent, outcome.delivered, outcome.final_state) == (True, True, "canceled")
    assert outcome.task_id == remote["task_id"]
    assert not started(track, "after")


@pytest.mark.parametrize("agent", ["slow", "blocking"])
async def test_a_cancel_right_after_the_chat_leaves_no_remote_task_running(
    backend: AgentBackend, agent_url: str, agent: str
) -> None:
    """Cancel sent in the same frame batch as the chat: whatever the interleaving, no remote
    task is left running (none was created, or it was cancelled)."""
    async with (
        running_gateway(backend_impl=backend) as gw,
        WireClient.open(ws_url(gw)) as client,
    ):
        for i in range(5):
            rid = f"now-{agent}-{i}"
            await client.chat(rid, f"slow {rid} 40 50", metadata={"agent": agent})
            await client.cancel(rid)
            response = await client.response(rid)
            await client.final_usage(rid)
            assert response.status is ResponseStatus.CANCELLED
            outcomes = backend.agents.cancellations_for(rid)
            if outcomes and outcomes[0].sent:
                assert outcomes[0].delivered, outcomes[0]
                assert outcomes[0].final_state == "canceled"
                remote = await record(agent_url, rid, until="finished")
                assert remote["final_state"] == "canceled"
            else:  # the send never started: the agent never heard of it
                assert await record(agent_url, rid, timeout=0.2) is None


# -- cancel: not abortable --------------------------------------------------------------------


async def test_non_abortable_agent_finishes_then_the_pipeline_halts(
    backend: AgentBackend, agent_url: str
) -> None:
    async with (
        running_gateway(backend_impl=backend) as gw,
        WireClient.open(ws_url(gw)) as client,
    ):
        track = await client.chat(
            "steady-1", "slow steady-1 6 50", steps=True, metadata={"agent": "steady"}
        )
        await record(agent_url, "steady-1", until="working")
        await client.cancel("steady-1")
        response = await client.response("steady-1")
        await client.final_usage("steady-1")
        remote = await record(agent_url, "steady-1", until="finished")
    agent_step = StepInfo(index=0, kind="agent", name="steady")
    assert response.status is ResponseStatus.CANCELLED
    assert response.halt is not None
    assert (response.halt.state, response.halt.step) == (HaltState.PENDING, agent_step)
    assert track.usage_report is not None
    assert track.usage_report.halt is not None
    halt = track.usage_report.halt
    assert (halt.state, halt.step, halt.aborted) == (HaltState.HALTED, agent_step, False)
    assert (remote["final_state"], remote["cancels"], remote["updates"]) == ("completed", 0, 6)
    assert "steady-1" not in backend.results  # the checkpoint after the step halted the run
    assert "steady-1" not in backend.after_started
    assert not started(track, "after")
    # (Its "ended" step message is not sent: nothing about a request follows its cancel.)
    assert backend.agents.cancellations_for("steady-1") == []


# -- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "agent", "code", "words"),
    [
        ("fail f1", "slow", "agent_error", "task failed: cannot do f1"),
        ("fail f2", "blocking", "agent_error", "task failed: cannot do f2"),
        ("reject j1", "slow", "agent_error", "task rejected: no"),
        ("slow u1 3 10", "down", "agent_unavailable", "could not be reached"),
        ("hang h1", "short", "agent_timeout", "did not finish within 0.5 s"),
    ],
)
async def test_typed_failures(
    backend: AgentBackend, agent_url: str, text: str, agent: str, code: str, words: str
) -> None:
    async with (
        running_gateway(backend_impl=backend) as gw,
        WireClient.open(ws_url(gw)) as client,
    ):
        track = await client.chat("f", text, steps=True, metadata={"agent": agent})
        response = await client.response("f", timeout=15)
    assert response.status is ResponseStatus.FAILED
    assert response.error is not None
    assert response.error.code == code
    assert words in response.error.message
    assert f"'{agent}'" in response.error.message
    assert "127.0.0.1" not in response.error.message
    assert not started(track, "after")
    if code == "agent_timeout":  # the hung remote task is cancelled in A2A's protocol too
        remote = await record(agent_url, text.split()[1], until="cancelled")
        assert remote["final_state"] == "canceled"
        [outcome] = backend.agents.cancellations_for("f")
        assert (outcome.why, outcome.delivered, outcome.final_state) == (
            "timeout",
            True,
            "canceled",
        )


async def test_other_requests_carry_on(backend: AgentBackend, agent_url: str) -> None:
    async with (
        running_gateway(backend_impl=backend) as gw,
        WireClient.open(ws_url(gw)) as client,
    ):
        await client.chat("ok-1", "slow ok-1 4 30", metadata={"agent": "slow"})
        await client.chat("down", "slow d 1 1", metadata={"agent": "down"})
        await client.chat("hang", "hang mix-h", metadata={"agent": "short"})
        await client.chat("fail", "fail mix-f", metadata={"agent": "blocking"})
        await client.chat("cut", "slow mix-c 100 50", metadata={"agent": "slow"})
        await client.chat("ok-2", "slow ok-2 4 30", metadata={"agent": "blocking"})
        await record(agent_url, "mix-c", until="working")
        await client.cancel("cut")
        responses = {
            rid: await client.response(rid, timeout=15)
            for rid in ("ok-1", "down", "hang", "fail", "cut", "ok-2")
        }
    status = {
        rid: (r.status.value, r.error.code if r.error else None) for rid, r in responses.items()
    }
    assert status == {
        "ok-1": ("completed", None),
        "down": ("failed", "agent_unavailable"),
        "hang": ("failed", "agent_timeout"),
        "fail": ("failed", "agent_error"),
        "cut": ("cancelled", None),
        "ok-2": ("completed", None),
    }
    assert responses["ok-1"].content == responses["ok-2"].content == "part 0 part 1 part 2 part 3 "


async def test_clients_are_pooled_per_agent(backend: AgentBackend) -> None:
    async with running_gateway(backend_impl=backend) as gw, WireClient.open(ws_url(gw)) as client:
        for i in range(3):
            await client.chat(f"p{i}", f"slow pool-{i} 1 1", metadata={"agent": "slow"})
            assert (await client.response(f"p{i}")).status is ResponseStatus.COMPLETED
        first = backend.agents._agents["slow"].http
        await client.chat("p3", "slow pool-3 1 1", metadata={"agent": "slow"})
        await client.response("p3")
        assert backend.agents._agents["slow"].http is first
    assert backend.agents._agents["slow"].http is None  # closed with the gateway


@pytest.mark.parametrize("agent", ["slow", "blocking"])
async def test_an_agent_killed_mid_task_fails_its_request_and_only_that_one(
    agent: str, closed_port_url: str
) -> None:
    """The agent process dies (SIGKILL) with the task running — the task is lost with it: the
    request fails ``agent_unavailable`` (never a hang), a request that does not use the agent
    completes, and the connection goes on (issue 18, faults in every dependency)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.gateway.a2a_agent_server",
        stdout=asyncio.subprocess.PIPE, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert process.stdout is not None
        port = int((await process.stdout.readline()).split()[1])
        url = f"http://127.0.0.1:{port}/"
        backend = AgentBackend(A2AAgents.from_config(agents_config(url, closed_port_url)))
        async with (
            running_gateway(backend_impl=backend) as gw,
            WireClient.open(ws_url(gw)) as client,
        ):
            await client.chat("lost", "slow lost-1 100 50", metadata={"agent": agent})
            await record(url, "lost-1", until="working")
            process.kill()
            await process.wait()
            failed = await client.response("lost", timeout=15)
            await client.chat("after", "hello", metadata={"agent": "down"})
            after = await client.response("after", timeout=15)
        assert failed.status is ResponseStatus.FAILED
        assert failed.error is not None
        assert failed.error.code == "agent_unavailable", failed.error
        assert f"'{agent}'" in failed.error.message
        assert after.error is not None  # the connection still serves (an agent that is down)
        assert after.error.code == "agent_unavailable"
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
