"""Unit tests of the built-in backends and of backend selection.

The backend runs against a real :class:`RequestContext` and :class:`CancelToken`; only the sink is
an in-test list collector (the end-to-end path through sockets is tested elsewhere).
Synchronisation is by events, never by sleeping.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import sys
import textwrap
import zlib
from collections.abc import AsyncIterator, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import pytest

import gateway.backends
from gateway.backends import (
    BACKENDS,
    DEFAULT_BACKEND,
    ENTRY_POINT_GROUP,
    EchoBackend,
    SimulatedBackend,
    available_backends,
    load_backend,
)
from gateway.backends.simulated import (
    METADATA_KEYS,
    ZERO_DELAY_BURST,
    SimulationSettings,
    WordStream,
    estimate_tokens,
    prompt_topic,
)
from gateway.cancellation import CancelToken, PipelineHalted
from gateway.pipeline import (
    Backend,
    BackendFailure,
    InvalidRequest,
    RequestContext,
    UsageMeter,
)
from protocol import CancelReason, ChatMessage, Role

PROMPT = "Write a very long story about dragons"
FAST = {"token_delay_ms": 0, "plan_ms": 0, "tool_ms": 0, "agent_ms": 0}


class ListSink:
    """Collects emitted text; sets ``reached`` once ``notify_at`` chunks were pushed."""

    def __init__(self, notify_at: int | None = None, log: list[tuple[str, str]] | None = None):
        self.items: list[str] = []
        self.notify_at = notify_at
        self.reached = asyncio.Event()
        self.log = log
        self.label = ""

    def push(self, text: str) -> bool:
        self.items.append(text)
        if self.log is not None:
            self.log.append((self.label, text))
        if len(self.items) == self.notify_at:
            self.reached.set()
        return False  # never over its cap

    def push_many(self, texts: list[str]) -> bool:
        for text in texts:
            self.push(text)
        return False

    async def drained(self) -> None:
        return None

    @property
    def text(self) -> str:
        return "".join(self.items)


def make_ctx(
    prompt: str = PROMPT,
    metadata: dict[str, Any] | None = None,
    sink: ListSink | None = None,
    messages: list[ChatMessage] | None = None,
) -> RequestContext:
    if messages is None:
        messages = [ChatMessage(role=Role.USER, content=prompt)]
    token, sink = CancelToken(), sink if sink is not None else ListSink()
    ctx = RequestContext(
        request_id="req-1",
        user_id="user-1",
        messages=messages,
        metadata=metadata or {},
        deadline=None,
        token=token,
        sink=sink,
    )
    # The test plays the gateway: it keeps what a backend cannot reach (the sink, the token).
    _GATEWAY_SIDE[ctx] = (token, sink)
    return ctx


_GATEWAY_SIDE: dict[RequestContext, tuple[CancelToken, ListSink]] = {}


def token_of(ctx: RequestContext) -> CancelToken:
    return _GATEWAY_SIDE[ctx][0]


def kinds(ctx: RequestContext) -> list[str]:
    return [step.kind for step in ctx.steps]


def sink_of(ctx: RequestContext) -> ListSink:
    return _GATEWAY_SIDE[ctx][1]


class Instrumented(SimulatedBackend):
    """Signals when each non-abortable simulated operation starts and when it finished."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.started = {kind: asyncio.Event() for kind in ("plan", "tool", "agent")}
        self.finished: list[str] = []

    async def simulate_plan(self, settings: SimulationSettings) -> str:
        self.started["plan"].set()
        result = await super().simulate_plan(settings)
        self.finished.append("plan")
        return result

    async def simulate_tool(self, ctx: RequestContext, settings: SimulationSettings) -> str:
        self.started["tool"].set()
        result = await super().simulate_tool(ctx, settings)
        self.finished.append("tool")
        return result

    async def simulate_agent(self, ctx: RequestContext, settings: SimulationSettings) -> str:
        self.started["agent"].set()
        result = await super().simulate_agent(ctx, settings)
        self.finished.append("agent")
        return result


async def run_text(backend: Backend, **kwargs: Any) -> tuple[str, RequestContext]:
    ctx = make_ctx(**kwargs)
    await backend.run(ctx)
    return sink_of(ctx).text, ctx


# -- text -------------------------------------------------------------------------------------


async def test_same_prompt_and_settings_give_identical_text() -> None:
    backend = SimulatedBackend(tokens=80, **FAST)
    first, _ = await run_text(backend)
    second, _ = await run_text(SimulatedBackend(tokens=80, **FAST))
    assert first == second
    assert first.strip()


async def test_seed_defaults_to_the_crc32_of_the_prompt_and_metadata_overrides_it() -> None:
    backend = SimulatedBackend(tokens=40, **FAST)
    default, ctx = await run_text(backend)
    assert backend.settings_for(ctx).seed == zlib.crc32(PROMPT.encode())
    explicit, _ = await run_text(backend, metadata={"seed": zlib.crc32(PROMPT.encode())})
    other, _ = await run_text(backend, metadata={"seed": 12345})
    assert explicit == default
    assert other != default


async def test_different_prompts_give_different_text() -> None:
    backend = SimulatedBackend(tokens=40, **FAST)
    one, _ = await run_text(backend, prompt="Tell me about gateways")
    two, _ = await run_text(backend, prompt="Tell me about lighthouses")
    assert one != two


@pytest.mark.parametrize("tokens", [0, 1, 2, 7, 60, 333])
async def test_answer_has_exactly_tokens_words_with_a_leading_space(tokens: int) -> None:
    text, ctx = await run_text(SimulatedBackend(tokens=tokens, **FAST))
    items = sink_of(ctx).items
    assert len(items) == tokens
    for item in items:
        assert item.startswith(" ")
        assert len(item) > 1
        assert not any(ch.isspace() for ch in item[1:])
    if tokens:
        assert text.endswith(".")


async def test_text_is_readable_and_opens_with_the_prompt_topic() -> None:
    text, ctx = await run_text(SimulatedBackend(tokens=60, **FAST))
    assert sink_of(ctx).items[:2] == [" On", " dragons,"]
    words = text.split()
    assert all(word.strip(".,").isalpha() for word in words)
    assert "the" in words
    assert text.count(".") >= 3  # several sentences
    assert prompt_topic("what is this?") is None  # nothing to mention: no opening
    plain, _ = await run_text(SimulatedBackend(tokens=5, **FAST), prompt="what is this?")
    assert not plain.startswith(" On")


# -- settings ---------------------------------------------------------------------------------


def test_metadata_keys_are_documented() -> None:
    assert set(METADATA_KEYS) == {
        "tokens",
        "token_delay_ms",
        "plan_ms",
        "tool_ms",
        "agent_ms",
        "seed",
        "fail_at_token",
    }


def test_server_defaults_apply_without_metadata() -> None:
    backend = SimulatedBackend()
    settings = backend.settings_for(make_ctx(metadata={"trace": "abc"}))  # unknown keys ignored
    assert (settings.tokens, settings.token_delay_ms) == (60, 30)
    assert (settings.plan_ms, settings.tool_ms, settings.agent_ms) == (150, 300, 0)
    assert settings.fail_at_token is None


def test_metadata_overrides_and_is_clamped_to_server_limits() -> None:
    backend = SimulatedBackend(tokens=20, token_delay_ms=10, max_tokens=50, max_delay_ms=100)
    metadata = {
        "tokens": 1000,
        "token_delay_ms": 10**9,
        "plan_ms": 5,
        "tool_ms": 101,
        "agent_ms": 7,
        "seed": 99,
        "fail_at_token": 3,
    }
    settings = backend.settings_for(make_ctx(metadata=metadata))
    assert settings == SimulationSettings(
        tokens=50,
        token_delay_ms=100,
        plan_ms=5,
        tool_ms=100,
        agent_ms=7,
        seed=99,
        fail_at_token=3,
    )


async def test_clamped_length_is_what_runs() -> None:
    backend = SimulatedBackend(tokens=20, max_tokens=50, **FAST)
    _, ctx = await run_text(backend, metadata={"tokens": 10_000})
    assert len(sink_of(ctx).items) == 50


@pytest.mark.parametrize("key", sorted(METADATA_KEYS))
@pytest.mark.parametrize("value", ["5", -1, True, 1.5, 2.0, None, [3]], ids=repr)
async def test_invalid_metadata_fails_before_any_step(key: str, value: object) -> None:
    ctx = make_ctx(metadata={key: value})
    with pytest.raises(InvalidRequest, match=key) as refused:
        await SimulatedBackend(**FAST).run(ctx)
    # The client's mistake, explained to it: the key and what it must be, not its value.
    assert refused.value.code == "invalid_field"
    assert refused.value.message.startswith(f"metadata {key!r} must be an integer >= 0, got ")
    assert isinstance(refused.value, ValueError)
    assert ctx.steps == []
    assert sink_of(ctx).items == []
    assert (ctx.usage.input_tokens, ctx.usage.output_tokens) == (0, 0)


@pytest.mark.parametrize(
    ("value", "got"),
    [
        (True, "a boolean"),
        (-1, "-1"),
        ("x" * 10_000, "a string"),
        (1.5, "a number with a fraction part"),
        (None, "null"),
        ([3], "an array"),
        ({"n": 3}, "an object"),
    ],
    ids=repr,
)
def test_invalid_metadata_messages_name_the_json_type_never_the_value(
    value: object, got: str
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        SimulatedBackend().settings_for(make_ctx(metadata={"tokens": value}))
    assert refused.value.message == f"metadata 'tokens' must be an integer >= 0, got {got}"


def test_backend_failure_messages_fit_a_response() -> None:
    long = BackendFailure("backend_error", "x" * 5000)
    assert len(long.message) == 1024  # MAX_ERROR_MESSAGE_CHARS: the response stays valid
    with pytest.raises(ValueError, match=r"response\.error"):
        BackendFailure("Not A Code", "bad code")  # a bug of the backend, found where it is


@pytest.mark.parametrize(
    "options",
    [
        {"tokens": -1},
        {"tokens": True},
        {"token_delay_ms": 1.5},
        {"tool_ms": "300"},
        {"max_tokens": -5},
    ],
    ids=repr,
)
def test_invalid_server_defaults_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be an integer >= 0"):
        SimulatedBackend(**options)


def test_server_defaults_are_clamped_to_server_limits() -> None:
    backend = SimulatedBackend(max_tokens=10, max_delay_ms=100)
    assert (backend.tokens, backend.token_delay_ms, backend.plan_ms) == (10, 30, 100)
    assert (backend.tool_ms, backend.agent_ms) == (100, 0)


# -- timing -----------------------------------------------------------------------------------


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every delay requested of ``asyncio.sleep`` or of the token clock, in order; the sleep
    itself only yields (no waiting)."""
    from gateway.backends.token_clock import TokenClock

    real_sleep = asyncio.sleep
    requested: list[float] = []

    async def spy(delay: float, result: Any = None) -> Any:
        requested.append(delay)
        return await real_sleep(0, result)

    def clock_spy(
        self: TokenClock, delay: float, since: float | None = None
    ) -> tuple[float, asyncio.Future[None] | None]:
        requested.append(delay)
        wake = asyncio.get_running_loop().create_future()
        wake.set_result(None)  # awaiting it only yields
        return (since or 0.0) + delay, wake

    monkeypatch.setattr(asyncio, "sleep", spy)
    monkeypatch.setattr(TokenClock, "schedule", clock_spy)
    return requested


async def test_zero_delay_never_sleeps_but_yields_every_burst(sleeps: list[float]) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    _, ctx = await run_text(SimulatedBackend(tokens=3000, **FAST))
    assert len(sink_of(ctx).items) == 3000
    assert sleeps
    assert all(delay == 0 for delay in sleeps)
    # A turn for other streams at least every ZERO_DELAY_BURST tokens.
    assert len(sleeps) >= 3000 // ZERO_DELAY_BURST
    assert loop.time() - start < 2.0  # 3000 tokens at even 1 ms would take 3 s


async def test_zero_delay_streams_interleave(sleeps: list[float]) -> None:
    log: list[tuple[str, str]] = []
    sinks = [ListSink(log=log), ListSink(log=log)]
    sinks[0].label, sinks[1].label = "a", "b"
    backend = SimulatedBackend(tokens=50, **FAST)
    ctxs = [make_ctx(sink=sink) for sink in sinks]
    await asyncio.gather(*(backend.run(ctx) for ctx in ctxs))
    order = [label for label, _ in log]
    assert order.count("a") == order.count("b") == 50
    # Neither stream ran to its end before the other one started.
    assert order.index("b") < len(order) - 1 - order[::-1].index("a")
    assert order.index("a") < len(order) - 1 - order[::-1].index("b")


async def test_configured_durations_are_the_ones_slept(sleeps: list[float]) -> None:
    backend = SimulatedBackend(tokens=4, token_delay_ms=3, plan_ms=7, tool_ms=11, agent_ms=13)
    await run_text(backend)
    assert sleeps == [0.007, 0.003, 0.003, 0.011, 0.013, 0.003, 0.003]


async def test_real_delays_take_their_time() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    await run_text(SimulatedBackend(tokens=4, token_delay_ms=5, plan_ms=10, tool_ms=10))
    assert loop.time() - start >= 0.035


# -- steps and usage --------------------------------------------------------------------------


async def test_steps_in_order_plan_stream_tool_stream() -> None:
    _, ctx = await run_text(SimulatedBackend(tokens=10, **FAST))
    assert kinds(ctx) == ["plan", "llm_stream", "tool", "llm_stream"]
    assert [step.name for step in ctx.steps] == ["plan", "answer", "search", "answer-continued"]


async def test_agent_call_only_when_agent_ms_is_set() -> None:
    _, ctx = await run_text(SimulatedBackend(tokens=10, **FAST), metadata={"agent_ms": 1})
    assert kinds(ctx) == ["plan", "llm_stream", "tool", "agent", "llm_stream"]


async def test_tool_call_comes_after_about_half_the_tokens() -> None:
    sink = ListSink()
    tool_seen_after: list[int] = []

    class Probe(SimulatedBackend):
        async def simulate_tool(self, ctx: RequestContext, settings: SimulationSettings) -> str:
            tool_seen_after.append(len(sink.items))
            return await super().simulate_tool(ctx, settings)

    await Probe(tokens=11, **FAST).run(make_ctx(sink=sink))
    assert tool_seen_after == [6]


@pytest.mark.parametrize("agent_ms", [0, 1])
async def test_complete_run_consumes_exactly_the_expected_tokens(agent_ms: int) -> None:
    backend = SimulatedBackend(tokens=25, **FAST)
    _, ctx = await run_text(backend, metadata={"agent_ms": agent_ms})
    budget = backend.budget(ctx, backend.settings_for(ctx))
    usage = ctx.usage
    assert usage.expected_tokens == budget.total > 0
    assert usage.input_tokens + usage.output_tokens == budget.total
    assert usage.output_tokens == budget.plan_output + 25
    assert usage.input_tokens == budget.plan_input + budget.answer_input + budget.resume_input
    assert usage.saved_tokens == 0
    system_and_prompt = budget.plan_input
    assert system_and_prompt > estimate_tokens(PROMPT)  # the system prompt counts too


async def test_input_tokens_count_the_whole_conversation() -> None:
    backend = SimulatedBackend(tokens=5, **FAST)
    short = make_ctx()
    long = make_ctx(
        messages=[
            ChatMessage(role=Role.SYSTEM, content="You are terse. " * 20),
            ChatMessage(role=Role.USER, content=PROMPT),
        ]
    )
    settings = backend.settings_for(short)
    assert backend.budget(long, settings).plan_input > backend.budget(short, settings).plan_input


@pytest.mark.parametrize("fail_at", [0, 3, 5, 9, 10])
async def test_fail_at_token_raises_after_that_many_tokens(fail_at: int) -> None:
    ctx = make_ctx(metadata={"tokens": 10, "fail_at_token": fail_at})
    with pytest.raises(BackendFailure, match="simulated LLM failure") as failed:
        await SimulatedBackend(**FAST).run(ctx)
    assert failed.value.code == "backend_error"  # explained to the client: not a bug
    assert failed.value.message == f"simulated LLM failure after {fail_at} tokens"
    assert len(sink_of(ctx).items) == fail_at
    expected = ["plan", "llm_stream"] if fail_at < 5 else ["plan", "llm_stream", "tool"]
    if fail_at >= 5:
        expected.append("llm_stream")
    assert kinds(ctx) == expected
    assert ctx.usage.output_tokens >= fail_at


async def test_fail_at_token_beyond_the_answer_never_fires() -> None:
    _, ctx = await run_text(SimulatedBackend(**FAST), metadata={"tokens": 10, "fail_at_token": 11})
    assert len(sink_of(ctx).items) == 10


def test_word_stream_taken_in_bursts_equals_it_read_word_by_word() -> None:
    """The zero-delay bursts (``take``) are the same words as the paced stream (iteration)."""
    for seed, topic in ((7, "cats"), (123, None)):
        expected = list(islice(WordStream(seed, topic), 400))
        bursts, words = [1, 8, 3, 17, 2, 30], WordStream(seed, topic)
        taken: list[str] = []
        while len(taken) < 400:
            taken += words.take(bursts[len(taken) % len(bursts)])
        assert taken[:400] == expected


async def test_zero_delay_text_is_the_paced_text() -> None:
    """Bursts change how the tokens are read, never which: same seed, same chunks."""
    fast, _ = await run_text(SimulatedBackend(tokens=40, **FAST))
    paced, _ = await run_text(SimulatedBackend(tokens=40, **{**FAST, "token_delay_ms": 1}))
    assert fast == paced


# -- reads of several tokens (stream_llm) -----------------------------------------------------


async def _reads(*reads: str | list[str]) -> AsyncIterator[str | list[str]]:
    for read in reads:
        await asyncio.sleep(0)
        yield read


async def test_stream_llm_emits_each_token_of_a_list_read_as_its_own_piece() -> None:
    ctx = make_ctx()
    text = await ctx.stream_llm(_reads("a", ["b", "", "c"], [], "d", ["e"]), input_tokens=5)
    assert text == "abcde"
    assert sink_of(ctx).items == ["a", "b", "c", "d", "e"]  # no empty piece reaches the sink
    assert ctx.usage.output_tokens == 6  # every token read counts, the empty one too
    assert kinds(ctx) == ["llm_stream"]


async def test_stream_llm_a_list_read_after_the_cancel_is_dropped_whole() -> None:
    """One check per read: a list that arrives after the flag is not emitted, not even its
    first token, and all of it counts as read after the cancel (and as output tokens)."""
    ctx = make_ctx()

    async def tokens() -> AsyncIterator[str | list[str]]:
        yield ["one", "two"]
        token_of(ctx).cancel(CancelReason.CLIENT)
        yield ["three", "four", "five"]  # delivered before the read is aborted

    with pytest.raises(PipelineHalted):
        await ctx.stream_llm(tokens(), name="answer")
    assert sink_of(ctx).items == ["one", "two"]
    assert ctx.tokens_after_cancel == 3
    assert ctx.usage.output_tokens == 5


@pytest.mark.parametrize("read", [("a", "b"), b"ab", 7])
async def test_stream_llm_refuses_a_read_that_is_neither_str_nor_list(read: object) -> None:
    ctx = make_ctx()

    async def tokens() -> AsyncIterator[object]:
        yield "ok"
        yield read

    with pytest.raises(TypeError, match="expected str or list"):
        await ctx.stream_llm(tokens())  # type: ignore[arg-type]
    assert sink_of(ctx).items == ["ok"]


# -- cancellation -----------------------------------------------------------------------------


@pytest.mark.parametrize("token_delay_ms", [0, 2])
@pytest.mark.parametrize(("cancel_after", "checkpoint"), [(3, "answer"), (15, "answer-continued")])
async def test_cancel_during_the_answer_halts_at_the_next_token(
    token_delay_ms: int, cancel_after: int, checkpoint: str
) -> None:
    sink = ListSink(notify_at=cancel_after)
    ctx = make_ctx(sink=sink, metadata={"token_delay_ms": token_delay_ms})
    backend = SimulatedBackend(tokens=20, token_delay_ms=0, plan_ms=0, tool_ms=0)
    task = asyncio.create_task(backend.run(ctx))
    await sink.reached.wait()
    emitted_at_cancel = len(sink.items)
    assert token_of(ctx).cancel(CancelReason.CLIENT)
    with pytest.raises(PipelineHalted) as halted:
        await task
    assert halted.value.reason is CancelReason.CLIENT
    assert halted.value.checkpoint == checkpoint
    assert len(sink.items) == emitted_at_cancel  # nothing emitted after the cancel
    # The cancel lands when the producer yields: at once with a delay, at the end of the
    # current burst with zero delay.
    burst_end = -(-cancel_after // ZERO_DELAY_BURST) * ZERO_DELAY_BURST
    assert emitted_at_cancel == (cancel_after if token_delay_ms else burst_end)
    assert ctx.tokens_after_cancel <= 1
    if cancel_after < 10:
        assert kinds(ctx) == ["plan", "llm_stream"]
    else:
        assert kinds(ctx) == ["plan", "llm_stream", "tool", "llm_stream"]
    budget = backend.budget(ctx, backend.settings_for(ctx))
    usage = ctx.usage
    # Honest usage: every token read counts, including one read after the flag.
    assert usage.output_tokens == budget.plan_output + emitted_at_cancel + ctx.tokens_after_cancel
    assert usage.saved_tokens > 0
    assert usage.saved_tokens == budget.total - usage.input_tokens - usage.output_tokens


async def test_cancel_during_the_tool_call_lets_it_finish_then_halts() -> None:
    backend = Instrumented(tokens=10, token_delay_ms=0, plan_ms=0, tool_ms=50)
    ctx = make_ctx()
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(backend.run(ctx))
    await backend.started["tool"].wait()
    cancelled_at = loop.time()
    token_of(ctx).cancel(CancelReason.API)
    with pytest.raises(PipelineHalted) as halted:
        await task
    assert halted.value.checkpoint == "search"
    assert backend.finished == ["plan", "tool"]  # the tool call was not interrupted
    assert loop.time() - cancelled_at >= 0.04  # ... it ran its full 50 ms
    assert kinds(ctx) == ["plan", "llm_stream", "tool"]  # no llm_stream after the cancel
    assert len(sink_of(ctx).items) == 5
    assert ctx.tokens_after_cancel == 0


async def test_cancel_during_the_plan_counts_the_plan_and_starts_nothing_else() -> None:
    backend = Instrumented(tokens=10, token_delay_ms=0, plan_ms=30, tool_ms=0)
    ctx = make_ctx()
    task = asyncio.create_task(backend.run(ctx))
    await backend.started["plan"].wait()
    token_of(ctx).cancel(CancelReason.TIMEOUT)
    with pytest.raises(PipelineHalted) as halted:
        await task
    assert halted.value.checkpoint == "plan"
    assert backend.finished == ["plan"]
    assert kinds(ctx) == ["plan"]
    assert sink_of(ctx).items == []
    budget = backend.budget(ctx, backend.settings_for(ctx))
    assert ctx.usage.input_tokens == budget.plan_input  # the finished plan is billed
    assert ctx.usage.output_tokens == budget.plan_output
    assert ctx.usage.saved_tokens == budget.total - budget.plan_input - budget.plan_output


async def test_cancel_during_the_agent_call_lets_it_finish_then_halts() -> None:
    backend = Instrumented(tokens=10, token_delay_ms=0, plan_ms=0, tool_ms=0, agent_ms=30)
    ctx = make_ctx()
    task = asyncio.create_task(backend.run(ctx))
    await backend.started["agent"].wait()
    token_of(ctx).cancel(CancelReason.CLIENT)
    with pytest.raises(PipelineHalted) as halted:
        await task
    assert halted.value.checkpoint == "fact-check"
    assert backend.finished == ["plan", "tool", "agent"]
    assert kinds(ctx) == ["plan", "llm_stream", "tool", "agent"]


async def test_cancelled_before_it_starts_runs_no_step() -> None:
    ctx = make_ctx()
    token_of(ctx).cancel(CancelReason.DISCONNECT)
    with pytest.raises(PipelineHalted):
        await SimulatedBackend(**FAST).run(ctx)
    assert ctx.steps == []
    assert (ctx.usage.input_tokens, ctx.usage.output_tokens) == (0, 0)
    assert ctx.usage.expected_tokens > 0


# -- usage.estimated (SPEC.md §3.8) ----------------------------------------------------------

BOTH = ("input_tokens", "output_tokens")


async def test_a_simulated_run_estimates_every_figure() -> None:
    _, ctx = await run_text(SimulatedBackend(tokens=10, **FAST))
    usage = ctx.usage.snapshot(cancelled=False, final=True)
    assert usage.estimated == BOTH  # saved_tokens is 0: not listed
    assert usage.saved_tokens == 0


async def test_a_cancelled_simulated_run_lists_saved_tokens_too() -> None:
    sink = ListSink(notify_at=3)
    ctx = make_ctx(sink=sink, metadata={"token_delay_ms": 1})
    task = asyncio.create_task(SimulatedBackend(tokens=20, **FAST).run(ctx))
    await sink.reached.wait()
    token_of(ctx).cancel(CancelReason.CLIENT)
    with pytest.raises(PipelineHalted):
        await task
    usage = ctx.usage.snapshot(cancelled=True, final=True)
    assert usage.saved_tokens > 0
    assert usage.estimated == (*BOTH, "saved_tokens")


async def test_a_simulated_run_cancelled_before_any_step_estimates_nothing_but_saved() -> None:
    ctx = make_ctx()
    token_of(ctx).cancel(CancelReason.DISCONNECT)
    with pytest.raises(PipelineHalted):
        await SimulatedBackend(**FAST).run(ctx)
    usage = ctx.usage.snapshot(cancelled=True, final=True)
    assert (usage.input_tokens, usage.output_tokens) == (0, 0)  # exact zeros
    assert usage.estimated == ("saved_tokens",)


async def test_echo_estimates_every_figure() -> None:
    _, ctx = await run_text(EchoBackend(), prompt="hello world")
    assert ctx.usage.snapshot(cancelled=False, final=True).estimated == BOTH


def test_meter_without_steps_estimates_nothing() -> None:
    meter = UsageMeter()
    assert meter.snapshot(cancelled=False, final=True).estimated == ()
    meter.expect(100)
    assert meter.snapshot(cancelled=True, final=False).estimated == ("saved_tokens",)
    assert meter.snapshot(cancelled=False, final=True).estimated == ()  # saved is 0 then


def test_meter_add_is_an_estimate_unless_reported() -> None:
    meter = UsageMeter()
    meter.add(input_tokens=0, output_tokens=0)
    assert meter.estimated(cancelled=False) == ()  # nothing counted, nothing estimated
    meter.add(input_tokens=5, output_tokens=2, reported=True)
    assert meter.estimated(cancelled=False) == ()
    meter.add(output_tokens=1)
    assert meter.estimated(cancelled=False) == ("output_tokens",)
    meter.add(input_tokens=1)
    assert meter.estimated(cancelled=False) == BOTH


def test_meter_a_reported_stream_step_is_not_estimated() -> None:
    meter = UsageMeter()
    meter._start_stream(10)
    meter.output_tokens += 3  # three pieces, as stream_llm counts them
    assert meter.estimated(cancelled=False) == BOTH
    meter.report(input_tokens=12)
    assert meter.estimated(cancelled=False) == ("output_tokens",)
    meter.report(output_tokens=4)
    assert meter.estimated(cancelled=False) == ()
    assert (meter.input_tokens, meter.output_tokens) == (12, 4)
    meter.output_tokens += 1  # a piece after the report counts on top: an estimate again
    assert meter.estimated(cancelled=False) == ("output_tokens",)


def test_meter_a_better_output_count_can_stay_an_estimate() -> None:
    """A tokenizer's count of a cut stream replaces the per-piece figure but stays listed."""
    meter = UsageMeter()
    meter._start_stream(10)
    meter.output_tokens += 3
    meter.report(input_tokens=14, output_tokens=5, output_estimated=True)
    assert (meter.input_tokens, meter.output_tokens) == (14, 5)
    assert meter.estimated(cancelled=False) == ("output_tokens",)


def test_meter_one_reported_step_and_one_cut_step_are_estimated() -> None:
    meter = UsageMeter()
    meter._start_stream(10)
    meter.output_tokens += 2
    meter.report(input_tokens=11, output_tokens=2)
    assert meter.estimated(cancelled=False) == ()
    meter._start_stream(20)  # a second call, cut before its usage arrived
    meter.output_tokens += 5
    assert (meter.input_tokens, meter.output_tokens) == (31, 7)
    assert meter.estimated(cancelled=False) == BOTH
    # ... and the other way round: an estimated step, then a reported one
    meter = UsageMeter()
    meter._start_stream(10)
    meter.output_tokens += 2
    meter._start_stream(20)
    meter.report(input_tokens=20, output_tokens=0)
    assert meter.estimated(cancelled=False) == BOTH
    # two reported steps stay reported
    meter = UsageMeter()
    for _ in range(2):
        meter._start_stream(10)
        meter.output_tokens += 2
        meter.report(input_tokens=9, output_tokens=3)
    assert (meter.input_tokens, meter.output_tokens) == (18, 6)
    assert meter.estimated(cancelled=False) == ()


def test_meter_report_with_one_figure_leaves_the_other_estimated() -> None:
    meter = UsageMeter()
    meter._start_stream(10)
    meter.report(output_tokens=0)
    assert meter.estimated(cancelled=False) == ("input_tokens",)


# -- echo -------------------------------------------------------------------------------------


async def test_echo_streams_the_prompt_back_word_by_word() -> None:
    prompt = "hello  brave new\tworld"
    text, ctx = await run_text(EchoBackend(), prompt=prompt)
    assert text == prompt
    assert sink_of(ctx).items == ["hello", "  brave", " new", "\tworld"]
    assert kinds(ctx) == ["llm_stream"]
    assert ctx.usage.output_tokens == 4
    assert ctx.usage.input_tokens + ctx.usage.output_tokens == ctx.usage.expected_tokens


async def test_echo_echoes_the_last_user_turn() -> None:
    messages = [
        ChatMessage(role=Role.USER, content="first question"),
        ChatMessage(role=Role.ASSISTANT, content="an answer"),
        ChatMessage(role=Role.USER, content="second question"),
    ]
    text, _ = await run_text(EchoBackend(), messages=messages)
    assert text == "second question"


def test_echo_refuses_a_bad_delay() -> None:
    with pytest.raises(ValueError, match="token_delay_ms"):
        EchoBackend(token_delay_ms=-1)


# -- selection --------------------------------------------------------------------------------


def test_builtin_names() -> None:
    assert BACKENDS == ["simulated", "echo"]
    assert DEFAULT_BACKEND == "simulated"
    assert available_backends()[:2] == BACKENDS


def test_load_simulated_with_options() -> None:
    backend = load_backend("simulated", tokens=5, token_delay_ms=0)
    assert isinstance(backend, SimulatedBackend)
    assert isinstance(backend, Backend)
    assert (backend.tokens, backend.token_delay_ms) == (5, 0)
    assert isinstance(load_backend(), SimulatedBackend)


async def test_load_echo() -> None:
    backend = load_backend("echo")
    assert isinstance(backend, EchoBackend)
    text, _ = await run_text(backend, prompt="ping pong")
    assert text == "ping pong"


@pytest.mark.parametrize("name", ["nope", "", "  ", "Simulated"])
def test_unknown_name_lists_what_is_available(name: str) -> None:
    with pytest.raises(ValueError, match="unknown backend") as info:
        load_backend(name)
    assert "'simulated'" in str(info.value)
    assert "'echo'" in str(info.value)
    assert ENTRY_POINT_GROUP in str(info.value)


def test_bad_options_for_a_builtin_are_a_type_error() -> None:
    with pytest.raises(TypeError):
        load_backend("simulated", colour="blue")


MODULE = "muxgate_test_custom_backend"
CUSTOM = """
from gateway.pipeline import RequestContext


class CustomBackend:
    def __init__(self, greeting: str = "hi") -> None:
        self.greeting = greeting

    async def run(self, ctx: RequestContext) -> None:
        await ctx.emit(self.greeting)


def make(**options):
    return CustomBackend(**options)


class Holder:
    factory = CustomBackend


instance = CustomBackend("ready")
NOT_A_BACKEND = 42


def not_a_factory(**options):
    return "a string"
"""


@pytest.fixture
def custom_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    (tmp_path / f"{MODULE}.py").write_text(textwrap.dedent(CUSTOM), encoding="utf-8")
    (tmp_path / f"{MODULE}_broken.py").write_text(
        "import muxgate_no_such_dependency_xyz\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield MODULE
    for name in (MODULE, f"{MODULE}_broken"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize(
    ("attribute", "options", "greeting"),
    [
        ("CustomBackend", {}, "hi"),
        ("CustomBackend", {"greeting": "hello"}, "hello"),
        ("make", {"greeting": "made"}, "made"),
        ("Holder.factory", {}, "hi"),
        ("instance", {}, "ready"),
    ],
)
async def test_load_by_module_and_attribute(
    custom_module: str, attribute: str, options: dict[str, Any], greeting: str
) -> None:
    backend = load_backend(f"{custom_module}:{attribute}", **options)
    text, _ = await run_text(backend)
    assert text == greeting


@pytest.mark.parametrize(
    "reference",
    ["muxgate_no_such_module_xyz:Backend", f"{MODULE}:Missing", f"{MODULE}:", ":CustomBackend"],
)
def test_unresolvable_reference_is_a_value_error(custom_module: str, reference: str) -> None:
    with pytest.raises(ValueError, match="unknown backend"):
        load_backend(reference)


@pytest.mark.parametrize("attribute", ["NOT_A_BACKEND", "not_a_factory"])
def test_reference_to_something_else_is_a_type_error(custom_module: str, attribute: str) -> None:
    with pytest.raises(TypeError):
        load_backend(f"{custom_module}:{attribute}")


def test_instance_reference_takes_no_options(custom_module: str) -> None:
    with pytest.raises(TypeError, match="no options"):
        load_backend(f"{custom_module}:instance", greeting="x")


def test_a_module_with_a_missing_dependency_is_not_an_unknown_name(custom_module: str) -> None:
    with pytest.raises(ModuleNotFoundError, match="muxgate_no_such_dependency_xyz"):
        load_backend(f"{custom_module}_broken:Anything")


async def test_load_by_entry_point(custom_module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    point = importlib.metadata.EntryPoint(
        name="custom", value=f"{custom_module}:CustomBackend", group=ENTRY_POINT_GROUP
    )

    def fake_entry_points(*, group: str) -> list[importlib.metadata.EntryPoint]:
        return [point] if group == ENTRY_POINT_GROUP else []

    monkeypatch.setattr(gateway.backends, "entry_points", fake_entry_points)
    assert available_backends() == ["simulated", "echo", "custom"]
    backend = load_backend("custom", greeting="from an entry point")
    text, _ = await run_text(backend)
    assert text == "from an entry point"
    with pytest.raises(ValueError, match="'custom'"):
        load_backend("nope")


# -- the shared token clock ---------------------------------------------------------------------


async def test_token_clock_sleeps_about_the_delay_and_shares_timers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gateway.backends.token_clock import TICK, TokenClock

    loop = asyncio.get_running_loop()
    timers: list[float] = []
    call_at = loop.call_at

    def counting_call_at(when: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        timers.append(when)
        return call_at(when, callback, *args)

    monkeypatch.setattr(loop, "call_at", counting_call_at)
    clock = TokenClock(loop)
    due = loop.time() + 0.02
    # 50 streams due at the same moment (deadlines counted from the same previous one).
    wakes = [clock.schedule(0.0, due)[1] for _ in range(50)]
    assert len(timers) == 1  # 50 sleepers, one timer
    assert clock.pending_ticks == 1
    await asyncio.gather(*(w for w in wakes if w is not None))
    assert len(wakes) == 50
    assert all(w is not None and w.done() for w in wakes)
    assert loop.time() >= due - TICK  # rounded to the nearest tick, never earlier
    assert clock.pending_ticks == 0  # nothing left behind
    # The plain sleep still waits about its delay.
    start = loop.time()
    await clock.sleep(0.01)
    assert loop.time() >= start + 0.01 - TICK


async def test_token_clock_cancelling_one_waiter_leaves_the_others() -> None:
    from gateway.backends.token_clock import TokenClock

    clock = TokenClock(asyncio.get_running_loop())
    first = asyncio.create_task(clock.sleep(0.01))
    second = asyncio.create_task(clock.sleep(0.01))
    await asyncio.sleep(0)
    first.cancel()
    await second  # still woken by the shared tick
    assert first.cancelled()
    assert clock.pending_ticks == 0


async def test_token_clock_deadlines_count_from_the_last_one_not_from_a_late_wake_up() -> None:
    """A stream keeps its pace however late the loop runs (as a remote provider's tokens do):
    its next deadline counts from its last deadline, and one already past needs no wait."""
    from gateway.backends.token_clock import TokenClock

    loop = asyncio.get_running_loop()
    clock = TokenClock(loop)
    now = loop.time()
    due, wake = clock.schedule(0.05, now - 0.2)  # the loop woke this stream 0.15 s late
    assert due == pytest.approx(now - 0.15)
    assert wake is None  # already due: no timer, no future
    assert clock.pending_ticks == 0
    due, wake = clock.schedule(0.05, now + 0.02)
    assert due == pytest.approx(now + 0.07)
    assert wake is not None
    await wake
    assert loop.time() >= due - 0.001
    assert clock.pending_ticks == 0
