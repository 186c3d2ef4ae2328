"""The embedded default backend: a simulated agent pipeline that needs no keys and no services.

Each request runs the same readable pipeline, every step through the :class:`RequestContext`
helpers so that checkpoints, the step trace and usage are exactly those of a real backend::

    step              helper          what it simulates
    plan              ctx.plan        a short non-abortable "LLM call" that decomposes the task
    answer            ctx.stream_llm  the first half of the answer; every token a checkpoint
    search            ctx.tool_call   an MCP tool call, non-abortable
    fact-check        ctx.agent_call  an A2A agent call, only when ``agent_ms`` > 0
    answer-continued  ctx.stream_llm  the rest of the answer

A cancel therefore visibly lands at each kind of checkpoint: during the plan (the plan finishes,
then the pipeline halts), mid-stream (at once, at the next token), during the tool or agent call
(the call finishes, then the pipeline halts, and no further LLM call starts).

The text is deterministic: words drawn by a seeded generator from a small English grammar, one
word per token, each with a leading space (``" the"``, ``" gateway"``). The seed is the request's
``metadata["seed"]`` or, by default, the CRC-32 of the prompt, so the same prompt and settings
always give the same text, on every Python version and platform.

Per-request settings come from ``ctx.metadata`` (see :data:`METADATA_KEYS`), each an integer
>= 0 (not a bool, not 1.0), clamped to the server's maxima; anything else fails the request with
:class:`~gateway.pipeline.InvalidRequest` (``invalid_field``, naming the key and what it must be)
before any step starts. ``fail_at_token`` fails it on purpose with
:class:`~gateway.pipeline.BackendFailure` (``backend_error``): both are failures explained to the
client, not bugs, so neither logs a traceback.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, Final

from protocol import ChatMessage, ErrorCode

from ..pipeline import BackendFailure, BackendInfo, InvalidRequest, RequestContext, Setting
from .token_clock import TokenClock

__all__ = [
    "METADATA_KEYS",
    "SYSTEM_PROMPT",
    "SimulatedBackend",
    "SimulationSettings",
    "TokenBudget",
    "WordStream",
    "estimate_tokens",
    "prompt_topic",
    "word_stream",
]

#: The system prompt the simulated LLM calls are "sent"; it counts towards their input tokens.
#: With token_delay_ms 0, tokens come in bursts of this many between event-loop turns.
ZERO_DELAY_BURST: Final = 8

SYSTEM_PROMPT: Final = (
    "You are the muxgate simulated assistant. Plan the task, call tools when they help, "
    "and answer in plain sentences."
)

#: The ``metadata`` keys a request may set, and what they mean.
METADATA_KEYS: Final[Mapping[str, str]] = {
    "tokens": "answer length in tokens (clamped to max_tokens)",
    "token_delay_ms": "delay before each answer token; 0 = no sleep (clamped to max_delay_ms)",
    "plan_ms": "duration of the planning LLM call (clamped to max_delay_ms)",
    "tool_ms": "duration of the tool call (clamped to max_delay_ms)",
    "agent_ms": "duration of the agent call; 0 = no agent call (clamped to max_delay_ms)",
    "seed": "seed of the text generator (default: CRC-32 of the prompt)",
    "fail_at_token": "fail (backend_error) once this many answer tokens were produced",
}

_MASK64: Final = (1 << 64) - 1


def estimate_tokens(text: str) -> int:
    """A rough token count: about four characters a token (the usual rule of thumb)."""
    return (len(text) + 3) // 4


def _conversation_tokens(messages: Sequence[ChatMessage]) -> int:
    return sum(estimate_tokens(turn.content) for turn in messages)


#: JSON's names for the types a decoded value may have (messages speak the client's language).
_JSON_TYPES: Final[Mapping[type, str]] = {
    bool: "a boolean",
    str: "a string",
    float: "a number with a fraction part",
    type(None): "null",
    list: "an array",
    dict: "an object",
}


def _check_count(where: str, key: str, value: object) -> int:
    """``value`` as a non-negative int, or a ValueError that names ``key`` (server options)."""
    if type(value) is not int:  # refuses bool (a subclass of int) and 1.0 alike
        raise ValueError(
            f"{where} {key!r} must be an integer >= 0, got {type(value).__name__} {value!r}"
        )
    if value < 0:
        raise ValueError(f"{where} {key!r} must be an integer >= 0, got {value}")
    return value


def _metadata_count(key: str, value: object) -> int:
    """A chat's ``metadata[key]`` as a non-negative int, or :class:`InvalidRequest`.

    The message names the key and what it must be, and says what it got only as a JSON type
    or a (bounded) integer: never the value itself, which may be 16 KiB of anything.
    """
    if type(value) is int and value >= 0:  # bool is a subclass of int: not accepted
        return value
    got = str(value) if type(value) is int else _JSON_TYPES.get(type(value), "another type")
    raise InvalidRequest(
        ErrorCode.INVALID_FIELD, f"metadata {key!r} must be an integer >= 0, got {got}"
    )


@dataclass(frozen=True, slots=True)
class SimulationSettings:
    """The effective settings of one request: server defaults, overridden by metadata, clamped."""

    tokens: int
    token_delay_ms: int
    plan_ms: int
    tool_ms: int
    agent_ms: int
    seed: int
    #: Fail (BackendFailure) once this many answer tokens were produced (None: never).
    fail_at_token: int | None = None

    @property
    def first_half(self) -> int:
        """Answer tokens streamed before the tool call (the rest come after it)."""
        return (self.tokens + 1) // 2


@dataclass(frozen=True, slots=True)
class TokenBudget:
    """The tokens a request takes when it runs to the end: what ``usage.expect`` is told."""

    plan_input: int
    plan_output: int
    #: Input of the first answer call: system prompt, conversation and plan.
    answer_input: int
    #: Input of the second answer call: the above plus the first half, the tool and agent results.
    resume_input: int
    answer_output: int

    @property
    def total(self) -> int:
        return (
            self.plan_input
            + self.plan_output
            + self.answer_input
            + self.resume_input
            + self.answer_output
        )


# -- deterministic text ----------------------------------------------------------------------


class _SplitMix64:
    """A tiny PRNG with a fixed algorithm, so the text never changes across Python versions."""

    __slots__ = ("_state",)

    def __init__(self, seed: int) -> None:
        self._state = seed & _MASK64

    def next(self) -> int:
        self._state = (self._state + 0x9E3779B97F4A7C15) & _MASK64
        z = self._state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def pick(self, words: Sequence[str]) -> str:
        return words[self.next() % len(words)]


_NOUNS: Final = (
    "gateway", "planner", "stream", "token", "request", "client", "agent", "tool", "answer",
    "message", "checkpoint", "server", "reader", "writer", "pipeline", "budget", "queue",
    "model", "socket", "connection", "plan", "result", "user", "deadline", "signal", "story",
)  # fmt: skip
_ADJECTIVES: Final = (
    "quiet", "quick", "small", "steady", "careful", "patient", "bright", "simple", "honest",
    "early", "whole", "fresh", "final", "busy", "calm", "clear", "short", "long", "gentle",
)  # fmt: skip
_VERBS: Final = (
    "streams", "checks", "plans", "answers", "reads", "sends", "measures", "carries", "holds",
    "drops", "routes", "records", "counts", "returns", "follows", "shapes", "watches", "builds",
    "opens", "closes", "trusts", "explains",
)  # fmt: skip
_INTRANSITIVE: Final = (
    "waits", "halts", "returns", "finishes", "listens", "pauses", "arrives", "settles",
    "moves", "resumes", "begins", "rests",
)  # fmt: skip
_PREPOSITIONS: Final = ("to", "for", "with", "from", "behind", "after", "before", "near", "into")
_ADVERBS: Final = (
    "Meanwhile", "Later", "Then", "Often", "Usually", "Still", "Afterwards", "Quietly", "Soon",
)  # fmt: skip
_CONNECTIVES: Final = ("and", "but", "so", "while")
_STOPWORDS: Final = frozenset((
    "about", "above", "after", "again", "also", "because", "been", "before", "being", "could",
    "describe", "does", "doing", "each", "explain", "from", "have", "having", "here", "into",
    "just", "like", "more", "most", "much", "only", "other", "over", "please", "some", "such",
    "tell", "than", "that", "their", "them", "then", "there", "these", "they", "this", "those",
    "through", "very", "what", "when", "where", "which", "while", "will", "with", "would",
    "write", "your",
))  # fmt: skip


def prompt_topic(prompt: str) -> str | None:
    """The prompt's topic for the answer's opening: its longest content word, lower case."""
    best = ""
    for raw in prompt.split():
        word = "".join(ch for ch in raw if ch.isalpha()).lower()
        if len(word) >= 4 and word not in _STOPWORDS and len(word) > len(best):
            best = word
    return best[:24] or None


def _noun_phrase(rng: _SplitMix64, det: str = "the") -> list[str]:
    words = [det]
    if rng.next() % 2:
        words.append(rng.pick(_ADJECTIVES))
    words.append(rng.pick(_NOUNS))
    if det == "a" and (words[1][0] in "aeio" or words[1] == "honest"):
        words[0] = "an"
    return words


def _sentence(rng: _SplitMix64) -> list[str]:
    shape = rng.next() % 4
    words: list[str]
    if shape == 0:  # The quiet planner reads the token before the queue.
        words = [*_noun_phrase(rng), rng.pick(_VERBS), *_noun_phrase(rng)]
        if rng.next() % 2:
            words += [rng.pick(_PREPOSITIONS), *_noun_phrase(rng)]
    elif shape == 1:  # Meanwhile, the agent holds a clear answer.
        words = [rng.pick(_ADVERBS) + ",", *_noun_phrase(rng), rng.pick(_VERBS)]
        words += _noun_phrase(rng, "a")
    elif shape == 2:  # When the socket waits, the gateway counts the budget.
        clause = [*_noun_phrase(rng), rng.pick(_INTRANSITIVE)]
        clause[-1] += ","
        words = ["when", *clause, *_noun_phrase(rng), rng.pick(_VERBS), *_noun_phrase(rng)]
    else:  # The reader pauses, and the writer sends the message.
        first = [*_noun_phrase(rng), rng.pick(_INTRANSITIVE)]
        first[-1] += ","
        words = [*first, rng.pick(_CONNECTIVES), *_noun_phrase(rng), rng.pick(_VERBS)]
        words += _noun_phrase(rng)
    words[0] = words[0][:1].upper() + words[0][1:]
    words[-1] += "."
    return words


#: Sentences (as tokens with their leading space) the answers are drawn from. Building a
#: sentence costs ~15 random draws; drawing one from a pool costs one, so at zero delay the
#: simulated LLM costs the gateway little beside the real work (benchmarks measure the gateway).
_POOL_SIZE: Final = 512
_pool: list[tuple[str, ...]] = []


def _sentence_pool() -> list[tuple[str, ...]]:
    if not _pool:
        rng = _SplitMix64(0x6D7578)
        _pool.extend(tuple(" " + word for word in _sentence(rng)) for _ in range(_POOL_SIZE))
    return _pool


class WordStream:
    """An endless, deterministic stream of tokens: words with a leading space. Iterate it, or
    :meth:`take` several at once (a burst: one slice of a buffer of whole sentences, refilled
    a few sentences at a time, not a call per word)."""

    __slots__ = ("_at", "_buffer", "_pool", "_rng")

    def __init__(self, seed: int, topic: str | None = None) -> None:
        self._rng = rng = _SplitMix64(seed)
        self._pool = _sentence_pool()
        self._buffer: list[str] = []
        self._at = 0
        if topic:
            opening = [*_noun_phrase(rng), rng.pick(_VERBS), *_noun_phrase(rng)]
            opening[-1] += "."
            self._buffer = [" " + word for word in ["On", topic + ",", *opening]]

    def __iter__(self) -> WordStream:
        return self

    def __next__(self) -> str:
        if self._at == len(self._buffer):
            self._refill(1)
        word = self._buffer[self._at]
        self._at += 1
        return word

    def take(self, n: int) -> list[str]:
        """The next ``n`` tokens."""
        at = self._at
        if at + n > len(self._buffer):
            self._refill(n)
            at = 0
        self._at = at + n
        return self._buffer[at : at + n]

    def _refill(self, n: int) -> None:
        """Keep the words not yet taken and add whole sentences until ``n`` are there."""
        buffer = self._buffer[self._at :]
        pool, rng = self._pool, self._rng
        while len(buffer) < max(n, _REFILL_WORDS):
            buffer += pool[rng.next() % _POOL_SIZE]
        self._buffer, self._at = buffer, 0


#: Words buffered per refill of a :class:`WordStream` (a few sentences).
_REFILL_WORDS: Final = 64


def word_stream(seed: int, topic: str | None = None) -> WordStream:
    """An endless, deterministic stream of tokens: words with a leading space."""
    return WordStream(seed, topic)


# -- the backend ------------------------------------------------------------------------------


def _simulated_failure(tokens: int) -> BackendFailure:
    """What ``fail_at_token`` raises: a failure the client asked for, explained to it."""
    return BackendFailure(ErrorCode.BACKEND_ERROR, f"simulated LLM failure after {tokens} tokens")


class SimulatedBackend:
    """A deterministic, readable agent pipeline: plan, stream, tool call, stream.

    Constructor arguments are the server defaults and limits (ValueError unless each is an int
    >= 0; defaults above a limit are clamped to it); each request may override the defaults
    through ``metadata`` (:data:`METADATA_KEYS`), clamped to ``max_tokens`` and
    ``max_delay_ms``. The ``simulate_*`` methods are the simulated operations themselves;
    subclasses may override them (tests do, to observe or shape a step).
    """

    name: Final = "simulated"

    def __init__(
        self,
        *,
        tokens: int = 60,
        token_delay_ms: int = 30,
        plan_ms: int = 150,
        tool_ms: int = 300,
        agent_ms: int = 0,
        max_tokens: int = 100_000,
        max_delay_ms: int = 10_000,
    ) -> None:
        where = "simulated backend option"
        self.max_tokens = _check_count(where, "max_tokens", max_tokens)
        self.max_delay_ms = _check_count(where, "max_delay_ms", max_delay_ms)
        # Defaults above a maximum are clamped to it, so lowering a limit alone just works.
        self.tokens = min(_check_count(where, "tokens", tokens), self.max_tokens)
        self.token_delay_ms = min(
            _check_count(where, "token_delay_ms", token_delay_ms), self.max_delay_ms
        )
        self.plan_ms = min(_check_count(where, "plan_ms", plan_ms), self.max_delay_ms)
        self.tool_ms = min(_check_count(where, "tool_ms", tool_ms), self.max_delay_ms)
        self.agent_ms = min(_check_count(where, "agent_ms", agent_ms), self.max_delay_ms)
        self._clock: TokenClock | None = None

    def __repr__(self) -> str:
        return (
            f"SimulatedBackend(tokens={self.tokens}, token_delay_ms={self.token_delay_ms}, "
            f"plan_ms={self.plan_ms}, tool_ms={self.tool_ms}, agent_ms={self.agent_ms}, "
            f"max_tokens={self.max_tokens}, max_delay_ms={self.max_delay_ms})"
        )

    def describe(self) -> BackendInfo:
        """``GET /v1/backend``: the per-request settings, with their server bounds."""
        maxima = {"tokens": self.max_tokens}
        settings = tuple(
            Setting(
                name=key,
                type="integer",
                min=0,
                max=maxima.get(key, self.max_delay_ms),
                default=getattr(self, key),
                description=METADATA_KEYS[key],
            )
            for key in ("tokens", "token_delay_ms", "plan_ms", "tool_ms", "agent_ms")
        )
        return BackendInfo(name=self.name, settings=settings)

    # -- settings and budget -------------------------------------------------------------------

    def settings_for(self, ctx: RequestContext) -> SimulationSettings:
        """This request's settings; :class:`InvalidRequest` (a ValueError) for an invalid
        metadata value. Every key of :data:`METADATA_KEYS` is checked here, before any step."""
        meta: Mapping[str, Any] = ctx.metadata or {}

        def count(key: str, default: int, limit: int) -> int:
            if key not in meta:
                return default
            return min(_metadata_count(key, meta[key]), limit)

        limit = self.max_delay_ms
        if "seed" in meta:
            seed = _metadata_count("seed", meta["seed"]) & _MASK64
        else:
            seed = zlib.crc32(ctx.prompt.encode("utf-8", "surrogatepass"))
        fail_at = None
        if "fail_at_token" in meta:
            fail_at = _metadata_count("fail_at_token", meta["fail_at_token"])
        return SimulationSettings(
            tokens=count("tokens", self.tokens, self.max_tokens),
            token_delay_ms=count("token_delay_ms", self.token_delay_ms, limit),
            plan_ms=count("plan_ms", self.plan_ms, limit),
            tool_ms=count("tool_ms", self.tool_ms, limit),
            agent_ms=count("agent_ms", self.agent_ms, limit),
            seed=seed,
            fail_at_token=fail_at,
        )

    def budget(self, ctx: RequestContext, settings: SimulationSettings) -> TokenBudget:
        """The tokens of the whole pipeline, computed up front for ``usage.expect``."""
        context = estimate_tokens(SYSTEM_PROMPT) + _conversation_tokens(ctx.messages)
        plan_output = estimate_tokens(self.plan_text(settings))
        answer_input = context + plan_output
        resume_input = answer_input + settings.first_half
        resume_input += estimate_tokens(self.tool_result(ctx))
        if settings.agent_ms > 0:
            resume_input += estimate_tokens(self.agent_result(ctx))
        return TokenBudget(
            plan_input=context,
            plan_output=plan_output,
            answer_input=answer_input,
            resume_input=resume_input,
            answer_output=settings.tokens,
        )

    # -- the simulated operations -------------------------------------------------------------

    def plan_text(self, settings: SimulationSettings) -> str:
        steps = ["1. Read the question.", "2. Search for context."]
        if settings.agent_ms > 0:
            steps.append("3. Ask the fact-check agent.")
        steps.append(f"{len(steps) + 1}. Write the answer.")
        return " ".join(steps)

    def tool_result(self, ctx: RequestContext) -> str:
        topic = prompt_topic(ctx.prompt) or "the question"
        return f"search: 3 documents about {topic}"

    def agent_result(self, ctx: RequestContext) -> str:
        return "fact-check: the draft is consistent"

    async def simulate_plan(self, settings: SimulationSettings) -> str:
        """The planning LLM call itself: takes ``plan_ms``, returns the plan."""
        await asyncio.sleep(settings.plan_ms / 1000)
        return self.plan_text(settings)

    async def simulate_tool(self, ctx: RequestContext, settings: SimulationSettings) -> str:
        """The MCP tool call itself: takes ``tool_ms``, returns its result."""
        await asyncio.sleep(settings.tool_ms / 1000)
        return self.tool_result(ctx)

    async def simulate_agent(self, ctx: RequestContext, settings: SimulationSettings) -> str:
        """The A2A agent call itself: takes ``agent_ms``, returns its reply."""
        await asyncio.sleep(settings.agent_ms / 1000)
        return self.agent_result(ctx)

    def simulate_tokens(
        self, words: Iterator[str], settings: SimulationSettings, start: int, stop: int
    ) -> AsyncIterator[str | list[str]]:
        """The simulated LLM's answer tokens ``start`` to ``stop`` (of ``settings.tokens``).

        Sleeps ``token_delay_ms`` before each token (on the backend's shared
        :class:`TokenClock`, each deadline counted from the previous one, so the pace holds
        however late the loop runs) and yields it. With 0 it yields a list of up to
        ``ZERO_DELAY_BURST`` tokens per turn of the event loop, as a provider's network read
        of several tokens arrives: other streams get their turns between bursts.
        """
        if not settings.token_delay_ms:
            return self._token_bursts(words, settings, start, stop)
        return self._paced_tokens(words, settings, start, stop)

    async def _paced_tokens(
        self, words: Iterator[str], settings: SimulationSettings, start: int, stop: int
    ) -> AsyncIterator[str]:
        """One token per ``token_delay_ms``."""
        delay = settings.token_delay_ms / 1000
        schedule = self._token_clock().schedule
        due: float | None = None  # each token's deadline counts from the last one's
        for index in range(start, stop):
            if index == settings.fail_at_token:
                raise _simulated_failure(index)
            due, wake = schedule(delay, due)
            if wake is not None:
                await wake
            word = next(words)
            if index == settings.tokens - 1:  # the answer ends with a full stop
                word = word.rstrip(".,") + "."
            yield word
        if stop == settings.tokens and settings.fail_at_token == settings.tokens:
            raise _simulated_failure(stop)

    async def _token_bursts(
        self, words: Iterator[str], settings: SimulationSettings, start: int, stop: int
    ) -> AsyncIterator[list[str]]:
        """Zero delay (benchmarks): tokens ``start`` to ``stop`` in lists, a turn of the event
        loop before each list that starts at a multiple of ``ZERO_DELAY_BURST``. Yielding every
        token alone would measure the event loop and the generator protocol, not the gateway."""
        take = words.take if isinstance(words, WordStream) else None
        last = settings.tokens - 1
        fail_at = settings.fail_at_token if settings.fail_at_token is not None else -1
        index = start
        while index < stop:
            if index % ZERO_DELAY_BURST == 0:
                await asyncio.sleep(0)
            end = min(stop, index - index % ZERO_DELAY_BURST + ZERO_DELAY_BURST)
            failing = index <= fail_at < end
            if failing:
                end = fail_at
            burst = take(end - index) if take is not None else list(islice(words, end - index))
            if end - 1 == last and burst:  # the answer ends with a full stop
                burst[-1] = burst[-1].rstrip(".,") + "."
            if burst:
                yield burst
            if failing:
                raise _simulated_failure(fail_at)
            index = end
        if stop == settings.tokens and fail_at == settings.tokens:
            raise _simulated_failure(stop)

    def _token_clock(self) -> TokenClock:
        """The clock of the running loop (a backend object may outlive a loop in tests)."""
        loop = asyncio.get_running_loop()
        clock = self._clock
        if clock is None or clock.loop is not loop:
            clock = self._clock = TokenClock(loop)
        return clock

    async def complete(
        self,
        ctx: RequestContext,
        turns: Sequence[ChatMessage],
        *,
        name: str = "completion",
        emit: bool = True,
    ) -> str:
        """One simulated LLM completion of ``turns`` (``tokens`` words at ``token_delay_ms``,
        seeded by the request's seed and the last turn): an abortable ``stream_llm`` step, emitted
        unless ``emit`` is false. What a flow's LLM steps run on without a model."""
        settings = self.settings_for(ctx)
        last = turns[-1].content if turns else ""
        seed = settings.seed ^ zlib.crc32(last.encode("utf-8", "replace"))
        words = word_stream(seed, prompt_topic(last))
        input_tokens = estimate_tokens(SYSTEM_PROMPT) + sum(
            estimate_tokens(turn.content) for turn in turns
        )
        tokens = self.simulate_tokens(words, settings, 0, settings.tokens)
        return await ctx.stream_llm(tokens, input_tokens=input_tokens, name=name, emit=emit)

    # -- the pipeline -------------------------------------------------------------------------

    async def run(self, ctx: RequestContext) -> None:
        settings = self.settings_for(ctx)
        budget = self.budget(ctx, settings)
        ctx.usage.expect(budget.total)
        words = word_stream(settings.seed, prompt_topic(ctx.prompt))
        half = settings.first_half

        async def planning() -> str:
            plan = await self.simulate_plan(settings)
            ctx.usage.add(input_tokens=budget.plan_input, output_tokens=budget.plan_output)
            return plan

        await ctx.plan(planning, name="plan")
        await ctx.stream_llm(
            self.simulate_tokens(words, settings, 0, half),
            input_tokens=budget.answer_input,
            name="answer",
        )
        await ctx.tool_call(lambda: self.simulate_tool(ctx, settings), name="search")
        if settings.agent_ms > 0:
            await ctx.agent_call(lambda: self.simulate_agent(ctx, settings), name="fact-check")
        await ctx.stream_llm(
            self.simulate_tokens(words, settings, half, settings.tokens),
            input_tokens=budget.resume_input,
            name="answer-continued",
        )
