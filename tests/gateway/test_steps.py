"""Pipeline steps on the wire (SPEC.md §3.12): ``step`` messages in order with the chunks, and
the ``halt`` objects of a cancelled request — against a real gateway over real sockets.

Every frame goes through the strict :class:`WireClient`, whose per-request state machine refuses
a step index out of order, an end without a start, and any step after the response.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from gateway.pipeline import RequestContext
from protocol import (
    CancelResult,
    Chunk,
    Codec,
    HaltState,
    Response,
    ResponseStatus,
    Step,
    StepInfo,
    StepState,
    UsageReport,
)
from protocol.limits import MAX_STEP_NAME_CHARS

from .conftest import running_gateway
from .wire import Track, WireClient

CODECS = pytest.mark.parametrize("codec", list(Codec), ids=lambda c: c.name.lower())


def ws_url(gw: Any) -> str:
    return f"ws://127.0.0.1:{gw.port}/v1/ws"


def steps_of(track: Track) -> list[tuple[int, str, str, str]]:
    return [(s.index, s.kind, s.name, s.state.value) for s in track.steps]


def started(track: Track, name: str) -> bool:
    return any(s.name == name and s.state is StepState.STARTED for s in track.steps)


@CODECS
async def test_steps_arrive_in_order_with_the_chunks(codec: Codec) -> None:
    async with running_gateway() as gw, WireClient.open(ws_url(gw), codec) as client:
        track = await client.chat("s1", "tell me about gateways", steps=True)
        response = await client.response("s1")
    assert response.status is ResponseStatus.COMPLETED
    assert response.halt is None
    assert steps_of(track) == [
        (0, "plan", "plan", "started"),
        (0, "plan", "plan", "ended"),
        (1, "llm_stream", "answer", "started"),
        (1, "llm_stream", "answer", "ended"),
        (2, "tool", "search", "started"),
        (2, "tool", "search", "ended"),
        (3, "llm_stream", "answer-continued", "started"),
        (3, "llm_stream", "answer-continued", "ended"),
    ]
    # Interleaved as emitted: the first half of the text inside step 1, the rest inside step 3.
    log = [m for m in track.log if isinstance(m, Chunk | Step)]
    position = {(m.index, m.state): i for i, m in enumerate(log) if isinstance(m, Step)}
    chunk_positions = [i for i, m in enumerate(log) if isinstance(m, Chunk)]
    first = [i for i in chunk_positions if i < position[(2, StepState.STARTED)]]
    rest = [i for i in chunk_positions if i > position[(2, StepState.ENDED)]]
    assert first
    assert rest
    assert len(first) + len(rest) == len(chunk_positions)
    assert all(position[(1, StepState.STARTED)] < i < position[(1, StepState.ENDED)] for i in first)
    assert all(position[(3, StepState.STARTED)] < i < position[(3, StepState.ENDED)] for i in rest)
    assert isinstance(track.log[-1], Response)


async def test_no_steps_unless_asked() -> None:
    async with running_gateway() as gw, WireClient.open(ws_url(gw)) as client:
        track = await client.chat("plain", "hello")
        await client.response("plain")
        cancelled = await client.chat("plain-cancelled", "hello", metadata={"tool_ms": 2000})
        await client.wait_for(lambda: len(cancelled.chunks) >= 1)
        await client.cancel("plain-cancelled")
        response = await client.response("plain-cancelled")
        await client.final_usage("plain-cancelled")
    assert track.steps == []
    assert cancelled.steps == []
    assert response.halt is None
    assert cancelled.usage_report is not None
    assert cancelled.usage_report.halt is None


async def test_steps_without_streaming() -> None:
    async with running_gateway() as gw, WireClient.open(ws_url(gw)) as client:
        track = await client.chat("ns", "hello", stream=False, steps=True)
        response = await client.response("ns")
    assert response.status is ResponseStatus.COMPLETED
    assert response.content
    assert track.chunks == []
    assert [s.name for s in track.steps if s.state is StepState.ENDED] == [
        "plan",
        "answer",
        "search",
        "answer-continued",
    ]


@CODECS
async def test_cancel_during_a_tool_call_halts_after_it(codec: Codec) -> None:
    """The tool call is non-abortable: the response says the halt waits for it; the final usage
    says the pipeline halted after it, and no LLM call started afterwards (G5)."""
    async with running_gateway() as gw, WireClient.open(ws_url(gw), codec) as client:
        track = await client.chat("t1", "hello", steps=True, metadata={"tool_ms": 300})
        await client.wait_for(lambda: started(track, "search"))
        await client.cancel("t1")
        response = await client.response("t1")
        await client.final_usage("t1")
    tool = StepInfo(index=2, kind="tool", name="search")
    assert response.status is ResponseStatus.CANCELLED
    assert response.halt is not None
    assert (response.halt.state, response.halt.step, response.halt.aborted) == (
        HaltState.PENDING,
        tool,
        False,
    )
    assert track.usage_report is not None
    assert track.usage_report.halt is not None
    halt = track.usage_report.halt
    assert (halt.state, halt.step, halt.aborted) == (HaltState.HALTED, tool, False)
    assert not started(track, "answer-continued")
    after = track.log[track.log.index(response) + 1 :]
    assert all(isinstance(m, UsageReport | CancelResult) for m in after)  # no chunk, no step


@CODECS
async def test_cancel_while_the_answer_streams_stops_inside_the_step(codec: Codec) -> None:
    async with running_gateway() as gw, WireClient.open(ws_url(gw), codec) as client:
        track = await client.chat(
            "m1", "hello", steps=True, metadata={"tokens": 400, "token_delay_ms": 5}
        )
        await client.chunks("m1", 3)
        await client.cancel("m1")
        response = await client.response("m1")
        await client.final_usage("m1")
    assert response.halt is not None
    assert (response.halt.state, response.halt.step) == (HaltState.PENDING, None)
    assert track.usage_report is not None
    assert track.usage_report.halt is not None
    halt = track.usage_report.halt
    assert halt.state is HaltState.HALTED
    assert halt.step == StepInfo(index=1, kind="llm_stream", name="answer")
    assert halt.aborted is True
    assert (1, "llm_stream", "answer", "ended") not in steps_of(track)


async def test_cancel_during_planning_waits_for_the_plan() -> None:
    async with running_gateway() as gw, WireClient.open(ws_url(gw)) as client:
        track = await client.chat("p1", "hello", steps=True, metadata={"plan_ms": 300})
        await client.wait_for(lambda: started(track, "plan"))
        await client.cancel("p1")
        response = await client.response("p1")
        await client.final_usage("p1")
    plan = StepInfo(index=0, kind="plan", name="plan")
    assert response.halt is not None
    assert response.halt.step == plan
    assert track.usage_report is not None
    assert track.usage_report.halt is not None
    assert track.usage_report.halt.step == plan
    assert not track.usage_report.halt.aborted
    assert track.chunks == []


class Gated:
    """A backend that waits for the test before its first step, then names its steps oddly."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.waiting = asyncio.Event()

    async def run(self, ctx: RequestContext) -> None:
        self.waiting.set()
        await self.go.wait()
        ctx.checkpoint("gate")
        await ctx.tool_call(lambda: asyncio.sleep(0), name="")  # empty: named by its kind
        await ctx.tool_call(lambda: asyncio.sleep(0), name="é" * 500)  # too long: shortened
        await ctx.emit("done")


async def test_halt_before_any_step_and_odd_step_names() -> None:
    backend = Gated()
    async with running_gateway(backend_impl=backend) as gw, WireClient.open(ws_url(gw)) as client:
        track = await client.chat("g1", "hello", steps=True)
        await backend.waiting.wait()
        await client.cancel("g1")
        response = await client.response("g1")
        backend.go.set()
        await client.final_usage("g1")
        assert response.halt is not None
        assert response.halt.step is None
        assert track.usage_report is not None
        assert track.usage_report.halt is not None
        assert track.usage_report.halt.step is None
        assert not track.usage_report.halt.aborted
        assert track.steps == []

        backend.go = asyncio.Event()
        backend.go.set()
        named = await client.chat("g2", "hello", steps=True)
        assert (await client.response("g2")).status is ResponseStatus.COMPLETED
    assert [(s.kind, s.name) for s in named.steps if s.state is StepState.STARTED] == [
        ("tool", "tool"),
        ("tool", "é" * MAX_STEP_NAME_CHARS),
    ]


class TriesToCancelItself:
    """A backend that reaches for what it must not touch: the cancel token and the sink."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def run(self, ctx: RequestContext) -> None:
        self.seen.append(type(ctx.token).__name__)
        assert not hasattr(ctx, "sink")
        ctx.token.cancel(ctx.cancel_reason)  # type: ignore[attr-defined]


async def test_a_backend_cannot_cancel_its_own_request() -> None:
    backend = TriesToCancelItself()
    async with running_gateway(backend_impl=backend) as gw, WireClient.open(ws_url(gw)) as client:
        await client.chat("self", "hello", steps=True)
        response = await client.response("self")
    assert backend.seen == ["CancelSignal"]
    assert response.status is ResponseStatus.FAILED  # the backend's bug, not a cancel
    assert response.error is not None
    assert response.error.code == "backend_error"


async def test_randomized_cancels_halt_where_the_response_said() -> None:
    """Many requests, each cancelled at a random point of its pipeline (waited for on the
    wire, not on a clock): a halt pending on a step always ends halted after that very step,
    and a halt pending on no step ends inside an LLM stream or before the next step started."""
    rng = random.Random(1307)
    settings = {"tokens": 80, "token_delay_ms": 10, "plan_ms": 40, "tool_ms": 80}
    points = ["plan", "answer", "search", "answer-continued"]
    async with running_gateway() as gw, WireClient.open(ws_url(gw)) as client:
        tracks = [
            await client.chat(f"r{n}", f"question {n}", steps=True, metadata=settings)
            for n in range(60)
        ]
        for track in rng.sample(tracks, 45):
            point, chunks = rng.choice(points), rng.randrange(3)

            def reached(track: Track = track, point: str = point, chunks: int = chunks) -> bool:
                if track.response is not None:
                    return True
                if not started(track, point):
                    return False
                begun = next(
                    i for i, m in enumerate(track.log) if isinstance(m, Step) and m.name == point
                )
                return sum(isinstance(m, Chunk) for m in track.log[begun:]) >= chunks

            await client.wait_for(reached)
            await client.cancel(track.machine.request_id)
        for track in tracks:
            await client.final_usage(track.machine.request_id)
    cancelled = 0
    for track in tracks:
        response = track.response
        assert response is not None
        if response.status is not ResponseStatus.CANCELLED:
            assert response.status is ResponseStatus.COMPLETED
            assert response.halt is None
            continue
        cancelled += 1
        assert response.halt is not None
        assert response.halt.state is HaltState.PENDING
        assert track.usage_report is not None
        assert track.usage_report.halt is not None
        final = track.usage_report.halt
        assert final.state is HaltState.HALTED
        starts = [s for s in track.steps if s.state is StepState.STARTED]
        if response.halt.step is not None:
            assert response.halt.step.kind != "llm_stream"
            assert final.step == response.halt.step
            assert not final.aborted
        elif final.aborted:
            assert final.step is not None
            assert final.step.kind == "llm_stream"
        if final.step is not None:  # the last step started on the wire, if it was sent
            assert len(starts) <= final.step.index + 1
        after = track.log[track.log.index(response) + 1 :]
        assert not any(isinstance(m, Chunk | Step) for m in after)
    assert cancelled >= 40


class AbortableTool:
    """A backend whose tool call is declared abortable: the cancel reaches the operation at
    once, which tells its server (recorded here) and re-raises."""

    def __init__(self) -> None:
        self.running = asyncio.Event()
        self.told_server = asyncio.Event()
        self.llm_calls_after = 0

    async def run(self, ctx: RequestContext) -> None:
        async def slow_tool() -> str:
            self.running.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.told_server.set()  # e.g. MCP notifications/cancelled for its request id
                raise
            return "never"

        await ctx.tool_call(slow_tool, name="crawl", abortable=True)

        async def answer() -> str:
            self.llm_calls_after += 1
            return "x"

        await ctx.llm_call(answer)


async def test_an_abortable_tool_is_stopped_at_once_and_the_halt_says_so() -> None:
    backend = AbortableTool()
    async with running_gateway(backend_impl=backend) as gw, WireClient.open(ws_url(gw)) as client:
        track = await client.chat("a1", "hello", steps=True)
        await backend.running.wait()
        await client.cancel("a1")
        response = await client.response("a1")
        async with asyncio.timeout(5):
            await backend.told_server.wait()
        await client.final_usage("a1")
    crawl = StepInfo(index=0, kind="tool", name="crawl")
    assert response.halt is not None
    assert (response.halt.state, response.halt.step) == (HaltState.PENDING, None)  # no wait
    assert track.usage_report is not None
    assert track.usage_report.halt is not None
    halt = track.usage_report.halt
    assert (halt.step, halt.aborted) == (crawl, True)
    assert backend.llm_calls_after == 0  # G5: nothing starts after the flag
