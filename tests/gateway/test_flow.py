"""Backend ``flow``: a pipeline from the settings, checked at start-up, run over a real socket."""

from __future__ import annotations

import random
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Config, ConfigError
from gateway.server import Gateway
from protocol import Chunk, ResponseStatus, Step, StepState

from .conftest import process_with_port, running_gateway
from .fake_upstream import FakeUpstream, Plan
from .wire import WireClient

README_TEXT = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
FAST_LLM = {"tokens": 12, "token_delay_ms": 1, "plan_ms": 0, "tool_ms": 0}


def flow(*steps: dict[str, Any], **options: Any) -> dict[str, Any]:
    return {"llm": "simulated", "llm_options": FAST_LLM, "steps": list(steps), **options}


PLAN_THEN_ANSWER = flow(
    {"kind": "plan", "prompt": "List the steps to answer: {prompt}"},
    {"kind": "answer", "prompt": "{prompt}\n\nFollow this plan: {plan}"},
)


async def test_plan_then_answer_streams_only_the_answer() -> None:
    async with (
        running_gateway(backend="flow", backend_options=PLAN_THEN_ANSWER) as gw,
        WireClient.open(gw.url) as client,
    ):
        track = await client.chat("f1", "Why do cancels save money?", steps=True)
        response = await client.response("f1")
    assert response.status is ResponseStatus.COMPLETED
    started = [(s.kind, s.name) for s in track.steps if s.state is StepState.STARTED]
    assert started == [("llm_stream", "plan"), ("llm_stream", "answer")]
    # The plan's 12 words were not streamed: the chunks are the answer's alone.
    assert len(response.content.split()) == FAST_LLM["tokens"]
    assert response.usage.output_tokens == 2 * FAST_LLM["tokens"]


async def test_a_cancel_during_the_plan_stops_it_and_no_answer_starts() -> None:
    options = flow(
        {"kind": "plan", "prompt": "Plan: {prompt}"},
        {"kind": "answer", "prompt": "{plan}"},
        llm_options={"tokens": 2000, "token_delay_ms": 5},
    )
    async with (
        running_gateway(backend="flow", backend_options=options) as gw,
        WireClient.open(gw.url) as client,
    ):
        track = await client.chat("f2", "hello", steps=True)
        await client.wait_for(lambda: bool(track.steps))
        await client.cancel("f2")
        response = await client.response("f2")
        await client.final_usage("f2")
    assert response.status is ResponseStatus.CANCELLED
    assert track.usage_report is not None
    halt = track.usage_report.halt
    assert halt is not None
    assert halt.step is not None
    assert (halt.step.name, halt.aborted) == ("plan", True)
    assert [s.name for s in track.steps] == ["plan"]  # the answer never started (G5)
    assert track.chunks == []
    final = track.usage_report.usage
    assert final.saved_tokens > 2000  # most of the plan, and the whole answer, not generated


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (flow(), "non-empty list"),
        (flow({"kind": "plan", "prompt": "x"}), "needs an 'answer' step"),
        (flow({"kind": "answer", "prompt": "{plan}"}), "{plan} is not defined by an earlier"),
        (flow({"kind": "search", "prompt": "x"}), "kind must be one of"),
        (flow({"kind": "answer", "prompt": "x", "temperature": 1}), "unknown key 'temperature'"),
        (flow({"kind": "tool", "server": "web", "tool": "search"}), "no tool server 'web'"),
        (flow({"kind": "agent", "agent": "checker", "message": "x"}), "no agent 'checker'"),
        (flow({"kind": "tool", "server": "web"}), "'tool' is required"),
        (flow({"kind": "answer", "prompt": "{"}), "write {{ and }} for braces"),
        (
            flow({"kind": "plan", "prompt": "x"}, {"kind": "plan", "prompt": "y"}),
            "already used",
        ),
        ({**PLAN_THEN_ANSWER, "llm": "flow"}, "cannot be 'flow'"),
    ],
)
def test_a_bad_flow_is_refused_at_start_up_naming_the_step(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Gateway(Config(port=0, backend="flow", backend_options=options))
    assert message in str(info.value)


EXAMPLE_TOOLS = {"example": {"command": [sys.executable, "-m", "gateway.tools.example_server"]}}


async def test_a_flow_calls_a_real_mcp_tool_with_arguments_from_the_prompt() -> None:
    """plan -> word_count (the bundled example MCP server, over stdio) -> answer; the tool's
    result reaches the answer's prompt, and the steps name the tool."""
    options = flow(
        {"kind": "plan", "prompt": "Plan: {prompt}"},
        {
            "kind": "tool",
            "server": "example",
            "tool": "word_count",
            "arguments": {"text": "{prompt}"},
        },
        {"kind": "answer", "prompt": "{prompt} has {word_count} words"},
        llm="echo",
        llm_options={},
    )
    async with (
        running_gateway(backend="flow", backend_options=options, tools=EXAMPLE_TOOLS) as gw,
        WireClient.open(gw.url) as client,
    ):
        track = await client.chat("t1", "one two three four", steps=True)
        response = await client.response("t1")
    assert response.status is ResponseStatus.COMPLETED
    assert response.content == "one two three four has 4 words"
    started = [(s.kind, s.name) for s in track.steps if s.state is StepState.STARTED]
    assert started == [("llm_stream", "plan"), ("tool", "word_count"), ("llm_stream", "answer")]


@pytest.fixture(scope="module")
def reviewer_url() -> Iterator[str]:
    """The bundled example A2A agent, in its own process, on an ephemeral port."""
    command = [sys.executable, "-m", "gateway.agents.example_agent", "--port", "0"]
    with process_with_port([*command, "--delay-ms", "60"]) as port:
        yield f"http://127.0.0.1:{port}/"


def full_flow(**step_options: Any) -> dict[str, Any]:
    return flow(
        {"kind": "plan", "prompt": "Plan: {prompt}"},
        {
            "kind": "tool",
            "server": "example",
            "tool": "slow_search",
            "arguments": {"query": "{prompt}", "seconds": 0.15},
            "name": "search",
        },
        {"kind": "agent", "agent": "reviewer", "message": "{prompt} / {search}"},
        {"kind": "answer", "prompt": "{prompt}. Review: {reviewer}"},
        **step_options,
    )


async def test_a_flow_with_a_tool_and_an_agent_runs_end_to_end(reviewer_url: str) -> None:
    agents = {"reviewer": {"url": reviewer_url, "abortable": True}}
    async with (
        running_gateway(
            backend="flow",
            backend_options=full_flow(llm="echo", llm_options={}),
            tools=EXAMPLE_TOOLS,
            agents=agents,
        ) as gw,
        WireClient.open(gw.url) as client,
    ):
        track = await client.chat("full", "Lisbon flights", steps=True)
        response = await client.response("full", timeout=20)
    assert response.status is ResponseStatus.COMPLETED
    assert response.content.startswith("Lisbon flights. Review: read ")
    started = [(s.kind, s.name) for s in track.steps if s.state is StepState.STARTED]
    assert started == [
        ("llm_stream", "plan"),
        ("tool", "slow_search"),
        ("agent", "reviewer"),
        ("llm_stream", "answer"),
    ]


async def test_randomized_cancels_across_every_step_kind(reviewer_url: str) -> None:
    """G1-G5 over real processes: requests cancelled at a random step of plan (abortable
    stream), a non-abortable MCP tool, an abortable A2A agent, the streamed answer. Every
    request has one response; nothing of it follows the response but its usage and cancel
    result; no step starts after the cancel; the halt is where the step's kind says."""
    rng = random.Random(2026)
    agents = {"reviewer": {"url": reviewer_url, "abortable": True}}
    llm = {"tokens": 30, "token_delay_ms": 4}
    points = ["plan", "slow_search", "reviewer", "answer"]
    async with (
        running_gateway(
            backend="flow",
            backend_options=full_flow(llm_options=llm),
            tools=EXAMPLE_TOOLS,
            agents=agents,
        ) as gw,
        WireClient.open(gw.url) as client,
    ):
        tracks = [await client.chat(f"r{n}", f"question {n}", steps=True) for n in range(16)]
        targets: dict[str, str] = {}
        for track in rng.sample(tracks, 12):
            point = rng.choice(points)
            rid = track.machine.request_id
            targets[rid] = point
            await client.wait_for(
                lambda t=track, p=point: (
                    t.response is not None or any(s.name == p for s in t.steps)
                ),
                timeout=20,
            )
            await client.cancel(rid)
        for track in tracks:
            await client.final_usage(track.machine.request_id, timeout=20)
    for track in tracks:
        response = track.response
        assert response is not None
        after = track.log[track.log.index(response) + 1 :]
        assert not any(isinstance(m, Chunk | Step) for m in after)
        if response.status is ResponseStatus.COMPLETED:
            continue
        assert response.status is ResponseStatus.CANCELLED
        assert track.usage_report is not None
        assert track.usage_report.halt is not None
        halt, pending = track.usage_report.halt, response.halt
        assert pending is not None
        starts = [s.name for s in track.steps if s.state is StepState.STARTED]
        assert halt.step is None or halt.step.name == starts[-1]  # nothing started after
        if pending.step is not None:  # waited for the non-abortable tool call
            assert pending.step.name == "slow_search"
            assert halt.step == pending.step
            assert not halt.aborted
        elif halt.step is not None and halt.aborted:
            assert halt.step.kind in ("llm_stream", "agent")  # stopped at once
    assert sum(t.response is not None and t.response.status == "cancelled" for t in tracks) >= 8


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({"tool": "no_such_tool"}, "has no tool 'no_such_tool' (it has: "),
        ({"tool": "word_count", "arguments": {}}, "needs the argument 'text'"),
    ],
)
async def test_a_tool_step_is_checked_against_the_servers_own_list(
    step: dict[str, Any], message: str
) -> None:
    options = flow(
        {"kind": "tool", "server": "example", **step},
        {"kind": "answer", "prompt": "{prompt}"},
    )
    gateway = Gateway(Config(port=0, backend="flow", backend_options=options, tools=EXAMPLE_TOOLS))
    with pytest.raises(ConfigError) as info:
        await gateway.start()
    assert message in str(info.value)
    assert not gateway.backend._tools.server("example").ready  # its process was stopped


async def test_the_model_chooses_an_mcp_tool_itself_then_answers() -> None:
    """An answer step with ``tools``: the upstream (a fake OpenAI-compatible server) asks for
    word_count; the flow runs it on the real example MCP server, sends the result back as a
    ``tool`` message, and the model's second round is the answer."""
    first = Plan(tokens=(), tool_calls=[("call_7", "example__word_count", '{"text": "a b c"}')])
    second = Plan(tokens=("There", " are", " 3", " words."))
    async with FakeUpstream({"How many words in: a b c": first, "3": second}) as fake:
        options = {
            "llm": "openai",
            "llm_options": {"base_url": fake.base_url, "model": "m", "api_key_env": "NO_KEY"},
            "steps": [
                {
                    "kind": "answer",
                    "prompt": "How many words in: {prompt}",
                    "tools": ["example.word_count"],
                    "max_rounds": 2,
                }
            ],
        }
        async with (
            running_gateway(backend="flow", backend_options=options, tools=EXAMPLE_TOOLS) as gw,
            WireClient.open(gw.url) as client,
        ):
            track = await client.chat("loop", "a b c", steps=True)
            response = await client.response("loop")
        bodies = [seen.body for seen in fake.requests]
    assert response.status is ResponseStatus.COMPLETED
    assert response.content == "There are 3 words."
    started = [(s.kind, s.name) for s in track.steps if s.state is StepState.STARTED]
    assert started == [("llm_stream", "answer"), ("tool", "word_count"), ("llm_stream", "answer-2")]
    offered = bodies[0]["tools"][0]["function"]
    assert offered["name"] == "example__word_count"
    assert offered["parameters"]["required"] == ["text"]
    assert bodies[1]["messages"][-2]["tool_calls"][0]["id"] == "call_7"
    assert bodies[1]["messages"][-1] == {"role": "tool", "tool_call_id": "call_7", "content": "3"}


def test_tools_need_an_llm_that_calls_tools() -> None:
    options = flow({"kind": "answer", "prompt": "{prompt}", "tools": ["example.word_count"]})
    with pytest.raises(ConfigError) as info:
        Gateway(Config(port=0, backend="flow", backend_options=options, tools=EXAMPLE_TOOLS))
    assert "cannot call tools" in str(info.value)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ({"tools": "example.word_count"}, "non-empty list of 'server.tool'"),
        ({"tools": ["word_count"]}, "is not 'server.tool'"),
        ({"tools": ["web.search"]}, "no tool server 'web'"),
        ({"tools": ["example.word_count"], "max_rounds": 0}, "max_rounds must be an integer"),
    ],
)
def test_bad_tool_lists_are_refused(answer: dict[str, Any], message: str) -> None:
    options = flow({"kind": "answer", "prompt": "{prompt}", **answer})
    with pytest.raises(ConfigError) as info:
        Gateway(Config(port=0, backend="flow", backend_options=options, tools=EXAMPLE_TOOLS))
    assert message in str(info.value)


async def test_the_readme_flow_runs_as_written(reviewer_url: str) -> None:
    """README's flow.toml, loaded as a settings file: only the agent's URL (the test's agent on
    a free port) and the LLM (the simulated one: no model build in this test) differ."""
    block = re.search(r"^```toml\n# flow\.toml\n(.*?)^```", README_TEXT, re.M | re.S)
    assert block is not None
    settings = tomllib.loads(block.group(1))
    assert settings["backend_options"]["llm"] == "llama"
    settings["backend_options"].update(llm="simulated", llm_options=FAST_LLM)
    settings["agents"]["reviewer"]["url"] = reviewer_url
    settings["tools"]["example"]["command"] = [
        sys.executable,
        *settings["tools"]["example"]["command"][1:],
    ]
    async with (
        running_gateway(**settings) as gw,
        WireClient.open(gw.url) as client,
    ):
        track = await client.chat("readme", "How do I bake bread?", steps=True)
        response = await client.response("readme", timeout=20)
    assert response.status is ResponseStatus.COMPLETED
    assert [s.kind for s in track.steps if s.state is StepState.STARTED] == [
        "llm_stream",
        "tool",
        "agent",
        "llm_stream",
    ]
