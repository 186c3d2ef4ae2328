"""The API for backend authors: a request context with emit, checkpoints and step helpers.

A backend is an object with ``async def run(self, ctx: RequestContext) -> None``. It streams its
answer with ``await ctx.emit(text)`` and wraps every long operation in one of the step helpers:

==========================  ==================================================================
``ctx.llm_call(fn)``        one non-abortable LLM call (seed: "Cannot cancel during active LLM
                            call"), then a checkpoint
``ctx.tool_call(fn)``       one MCP tool call, then a checkpoint
``ctx.agent_call(fn)``      one A2A agent call, then a checkpoint
``ctx.plan(fn)``            a planning / task-decomposition step, then a checkpoint
``ctx.stream_llm(tokens)``  an *abortable* streaming LLM call: every read is a checkpoint and a
                            cancel stops reading the upstream at once (beyond the seed, which
                            cannot stop a running LLM call); a read is one token, or a list of
                            the tokens that arrived together
==========================  ==================================================================

Every helper checks the cancel flag *before* it starts (no new call after the flag, G5) and
*after* it returns. A non-abortable operation runs in its own task behind ``asyncio.shield``: not
even a last-resort cancellation of the pipeline task at shutdown interrupts it mid-way.

Usage is honest: tokens are counted when consumed, including work finished after the cancel was
read, until the pipeline halts (SPEC.md §5.4).

Each helper is one *step*: recorded in ``ctx.steps`` and, when the client asked for them
(``chat.steps``, SPEC.md §3.12), sent as ``step`` messages in order with the text. After a
cancel, the running non-abortable step (if any) is the one the halt waits for; the gateway says
so in the cancelled response, and where the pipeline finally halted in the usage that follows.

What a backend cannot do, by construction: cancel its own request (``ctx.token`` is a read-only
:class:`CancelSignal`), or write to the client past a checkpoint (the outbound queue is private;
every write goes through :meth:`RequestContext.emit` or :meth:`RequestContext.stream_llm`).

Failing a request on purpose: raise :class:`InvalidRequest` for client input the backend refuses
(a ``metadata`` value of the wrong type or out of range) and :class:`BackendFailure` for any other
failure the backend expects and can explain (an upstream that answered 503). Their code and
message go to the client in ``response.error``; the gateway logs the request's one line at info
level, with the code and without a traceback. Any other exception is a bug: the client gets
``backend_error`` with a generic message and the log an error with the traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from protocol import CancelReason, ChatMessage, ErrorCode, ErrorInfo, StepState, Usage
from protocol.limits import MAX_ERROR_MESSAGE_CHARS, MAX_STEP_NAME_CHARS

from .cancellation import CancelSignal, CancelToken, PipelineHalted

__all__ = [
    "Backend",
    "BackendFailure",
    "BackendInfo",
    "CancelSignal",
    "ChunkSink",
    "InvalidRequest",
    "PipelineHalted",
    "RequestContext",
    "Setting",
    "StepRecord",
    "StepSink",
    "UsageMeter",
]

T = TypeVar("T")


class BackendFailure(Exception):
    """Raised by a backend to end its request ``failed`` with this ``code`` and ``message``
    (``response.error``, SPEC.md §3.7): a failure it expected and explains, not a bug.

    Both go to the client as they are: the message must be safe to show (no secret, no stack,
    no upstream internals) and is cut to ``MAX_ERROR_MESSAGE_CHARS``. The gateway logs the
    request's one ``request.failed`` line at info level with ``error_code`` and no traceback
    (not the message: it may quote the client's input). A ``code`` that is not a snake_case
    word (``ERROR_CODE_PATTERN``) raises ValueError here, where the mistake is.
    """

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        message = str(message)
        if len(message) > MAX_ERROR_MESSAGE_CHARS:
            message = message[: MAX_ERROR_MESSAGE_CHARS - 1] + "…"
        try:
            self.error = ErrorInfo(code=str(code), message=message)
        except Exception as exc:  # LocalProtocolError: a bug of the backend that raised this
            raise ValueError(f"not a valid response.error: {exc}") from None
        super().__init__(f"{self.error.code}: {self.error.message}")

    @property
    def code(self) -> str:
        return self.error.code

    @property
    def message(self) -> str:
        return self.error.message


class InvalidRequest(BackendFailure, ValueError):
    """The client's input refused by the backend (a ``metadata`` value of the wrong type or
    out of range): the request fails with ``code``, normally ``invalid_field``, and a message
    naming the field and what it must be. A ValueError too, for callers that catch those."""


@runtime_checkable
class Backend(Protocol):
    """What the gateway runs for each ``chat``.

    Optional methods the gateway uses when present: ``async def astart()`` (set up before
    serving, e.g. start a model server), ``async def aclose()`` (at shutdown), and
    ``def describe() -> BackendInfo`` (what ``GET /v1/backend`` tells clients).
    """

    async def run(self, ctx: RequestContext) -> None: ...


@dataclass(frozen=True, slots=True)
class Setting:
    """A chat ``metadata`` key a backend accepts, with its bounds: a client (the browser demo)
    builds its settings form from these (``GET /v1/backend``)."""

    name: str
    type: Literal["integer", "number"]
    min: float
    max: float
    default: float | None = None
    description: str = ""

    def as_json(self) -> dict[str, object]:
        body: dict[str, object] = {"name": self.name, "type": self.type}
        body.update(min=self.min, max=self.max)
        if self.default is not None:
            body["default"] = self.default
        if self.description:
            body["description"] = self.description
        return body


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """What a backend tells clients about itself: never a URL, a key or anything secret."""

    name: str
    model: str | None = None
    settings: tuple[Setting, ...] = ()

    def as_json(self) -> dict[str, object]:
        return {
            "backend": self.name,
            "model": self.model,
            "settings": [setting.as_json() for setting in self.settings],
        }


class ChunkSink(Protocol):
    """Where emitted text goes: the connection's outbound queue for this request."""

    def push(self, text: str) -> bool:
        """Queue ``text``; True when the queue is over its cap and the producer should wait."""
        ...

    def push_many(self, texts: list[str]) -> bool:
        """:meth:`push` each of ``texts`` (none empty), in one call."""
        ...

    async def drained(self) -> None:
        """Return once the queue is below its cap again (or the request ended)."""
        ...


@dataclass(slots=True)
class UsageMeter:
    """Tokens consumed by one request, and the backend's estimate of the whole.

    It also knows which figures are the provider's own and which are estimates (SPEC.md §3.8,
    ``usage.estimated``): tokens counted with :meth:`add` are estimates unless ``reported=True``;
    a ``stream_llm`` step's figures are estimates (its ``input_tokens`` argument, one output token
    per piece) until :meth:`report` replaces them. A figure is estimated when any step's part of
    it is, so a request with one reported step and one cut by a cancel lists it.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    #: The backend's estimate of input+output tokens for the whole request, if it ran to the end.
    expected_tokens: int = 0
    #: The figures before the latest ``stream_llm`` step: what :meth:`report` counts from.
    _stream_input_base: int = field(default=0, repr=False, compare=False)
    _stream_output_base: int = field(default=0, repr=False, compare=False)
    #: Whether some earlier step (or an :meth:`add`) counted an estimate into the figure.
    _input_estimated: bool = field(default=False, repr=False, compare=False)
    _output_estimated: bool = field(default=False, repr=False, compare=False)
    #: The latest ``stream_llm`` step, until the next one starts: whether one is open, whether
    #: the provider reported its input, and ``output_tokens`` right after the provider reported
    #: its output (``None``: not reported; a different figure now: pieces counted since).
    _stream_open: bool = field(default=False, repr=False, compare=False)
    _stream_input_reported: bool = field(default=False, repr=False, compare=False)
    _stream_output_reported_at: int | None = field(default=None, repr=False, compare=False)

    def add(self, *, input_tokens: int = 0, output_tokens: int = 0, reported: bool = False) -> None:
        """Count tokens of a step; ``reported=True`` when they are the provider's own figures,
        else they are estimates (``usage.estimated``, SPEC.md §3.8)."""
        if input_tokens < 0 or output_tokens < 0:
            raise ValueError("token counts are never negative")
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        if not reported:
            self._input_estimated |= input_tokens > 0
            self._output_estimated |= output_tokens > 0
        elif self._stream_output_reported_at is not None:
            self._stream_output_reported_at += output_tokens  # not pieces of the stream

    def report(
        self,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        output_estimated: bool = False,
    ) -> None:
        """Replace the latest ``stream_llm`` step's estimates (its ``input_tokens`` argument,
        one output token per piece) with the provider's own figures for that call, e.g. from
        the usage in its last chunk. What other steps counted stays. Call it after the call's
        last piece: pieces read after it count one output token each, on top (and make the
        output an estimate again). A figure left ``None`` stays an estimate.

        ``output_estimated=True``: a better count of the output that is still not the
        provider's (e.g. a tokenizer's count of a stream cut by a cancel: the model may have
        generated tokens that never arrived); it replaces the figure and stays listed as an
        estimate in ``usage.estimated``."""
        if (input_tokens is not None and input_tokens < 0) or (
            output_tokens is not None and output_tokens < 0
        ):
            raise ValueError("token counts are never negative")
        if input_tokens is not None:
            self.input_tokens = self._stream_input_base + input_tokens
            self._stream_input_reported = True
        if output_tokens is not None:
            self.output_tokens = self._stream_output_base + output_tokens
            self._stream_output_reported_at = None if output_estimated else self.output_tokens

    def _start_stream(self, input_tokens: int) -> None:
        """A ``stream_llm`` step starts: remember where its figures begin, count its input."""
        if input_tokens < 0:
            raise ValueError("token counts are never negative")
        self._input_estimated, self._output_estimated = self._estimates()
        self._stream_open = True
        self._stream_input_reported = False
        self._stream_output_reported_at = None
        self._stream_input_base = self.input_tokens
        self._stream_output_base = self.output_tokens
        self.input_tokens += input_tokens

    def _estimates(self) -> tuple[bool, bool]:
        """Whether ``input_tokens`` and ``output_tokens`` contain an estimate."""
        if not self._stream_open:
            return self._input_estimated, self._output_estimated
        return (
            self._input_estimated or not self._stream_input_reported,
            self._output_estimated or self._stream_output_reported_at != self.output_tokens,
        )

    def expect(self, total_tokens: int) -> None:
        """Record how many tokens the whole request would take; used for ``saved_tokens``."""
        self.expected_tokens = max(0, total_tokens)

    @property
    def saved_tokens(self) -> int:
        return max(0, self.expected_tokens - self.input_tokens - self.output_tokens)

    def estimated(self, *, cancelled: bool) -> tuple[str, ...]:
        """``usage.estimated`` (SPEC.md §3.8): the figures that contain an estimate;
        ``saved_tokens`` whenever it is non-zero (it is always an estimate)."""
        input_estimated, output_estimated = self._estimates()
        names: list[str] = []
        if input_estimated:
            names.append("input_tokens")
        if output_estimated:
            names.append("output_tokens")
        if cancelled and self.saved_tokens:
            names.append("saved_tokens")
        return tuple(names)

    def snapshot(self, *, cancelled: bool, final: bool) -> Usage:
        return Usage(
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            saved_tokens=self.saved_tokens if cancelled else 0,
            final=final,
            estimated=self.estimated(cancelled=cancelled),
        )


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One step a pipeline started (observability, and the ``step`` messages of SPEC.md §3.12).
    Recorded only after the checkpoint that guards its start passed, so no step ever starts
    after the cancel flag (G5). ``index`` counts the request's steps from 0 in start order."""

    kind: str  # "llm" | "tool" | "agent" | "plan" | "llm_stream"
    name: str
    index: int = 0
    #: A cancel stops it mid-way (an LLM stream; a tool or agent call declared abortable)
    #: rather than waiting for its end.
    abortable: bool = False


class StepSink(Protocol):
    """Where a request's step events go when its client asked for them (``chat.steps``)."""

    def push_step(self, step: StepRecord, state: StepState) -> None: ...


class StepTrace(Protocol):
    """Where a request's step begins and ends go when it is traced (gateway/tracing.py)."""

    def step_begin(self, step: StepRecord) -> None: ...

    def step_end(self, step: StepRecord) -> None: ...


class RequestContext:
    """Everything a backend sees of one request.

    A backend reads its input (``messages``, ``metadata``, ``deadline``), streams with
    :meth:`emit` and the step helpers, and counts tokens in ``usage``. It sees the request's
    cancellation only as a read-only :class:`CancelSignal` (``ctx.token``): it can look and
    listen, never cancel — only the gateway decides a cancel. The outbound queue is private:
    every write goes through :meth:`emit` or :meth:`stream_llm`, both checkpoints, so nothing a
    backend emits after the cancel flag reaches the client (G2, G5).
    """

    __slots__ = (
        "_running",
        "_signal",
        "_sink",
        "_step_sink",
        "_steps",
        "_token",
        "_tokens_after_cancel",
        "_trace",
        "deadline",
        "messages",
        "metadata",
        "request_id",
        "usage",
        "user_id",
    )

    def __init__(
        self,
        *,
        request_id: str,
        user_id: str,
        messages: Sequence[ChatMessage],
        metadata: Mapping[str, Any],
        deadline: float | None,
        token: CancelToken,
        sink: ChunkSink,
        steps: StepSink | None = None,
    ) -> None:
        self.request_id = request_id
        self.user_id = user_id
        self.messages = messages
        self.metadata = metadata
        #: Event-loop time (``loop.time()``) after which the request is cancelled with "timeout".
        self.deadline = deadline
        self.usage = UsageMeter()
        self._token = token
        self._signal = CancelSignal(token)
        self._sink = sink
        self._step_sink = steps
        self._steps: list[StepRecord] = []
        #: Steps started and not ended (by index): a non-abortable one delays the halt.
        self._running: dict[int, StepRecord] = {}
        self._tokens_after_cancel = 0
        #: The request's trace (gateway/tracing.py), when tracing is on: told of each step's
        #: begin and end (never of a chunk).
        self._trace: StepTrace | None = None

    def trace_steps(self, trace: StepTrace | None) -> None:
        """The gateway's hook: report each step's begin and end to ``trace`` from now on."""
        self._trace = trace

    @property
    def token(self) -> CancelSignal:
        """The request's cancellation, read-only: ``cancelled``, ``reason``, ``on_cancel``."""
        return self._signal

    @property
    def cancelled(self) -> bool:
        return self._token.cancelled

    @property
    def cancel_reason(self) -> CancelReason | None:
        return self._token.reason

    @property
    def steps(self) -> Sequence[StepRecord]:
        """The steps started so far, in start order."""
        return self._steps

    @property
    def tokens_after_cancel(self) -> int:
        """Tokens an abortable stream delivered after the cancel flag was set (read, never
        emitted): 0 or 1 with one token per read, since the cancel aborts the read at once."""
        return self._tokens_after_cancel

    @property
    def prompt(self) -> str:
        """The last user turn (or the only message)."""
        for turn in reversed(self.messages):
            if turn.role == "user":
                return turn.content
        return self.messages[-1].content if self.messages else ""

    def halt_pending(self) -> StepRecord | None:
        """The non-abortable step the pipeline is finishing, if any: it halts after it."""
        for step in reversed(self._running.values()):
            if not step.abortable:
                return step
        return None

    def halted_in(self) -> tuple[StepRecord | None, bool]:
        """The last step started, and whether it was cut mid-way (never ended)."""
        if not self._steps:
            return None, False
        last = self._steps[-1]
        return last, last.index in self._running

    def checkpoint(self, where: str = "checkpoint") -> None:
        """Halt here if the request was cancelled: raises :class:`PipelineHalted`."""
        reason = self._token.reason
        if reason is not None:
            raise PipelineHalted(reason, where)

    async def emit(self, text: str) -> None:
        """Stream ``text`` to the client. A checkpoint; waits while the reader is behind."""
        self.checkpoint("emit")
        if text and self._sink.push(text):
            await self._sink.drained()

    # -- step helpers ------------------------------------------------------------------------

    async def llm_call(
        self,
        call: Callable[[], Awaitable[T]],
        *,
        name: str = "llm",
        give_up_after: float | None = None,
    ) -> T:
        """One non-abortable LLM call, then a checkpoint. Record its tokens with ``usage.add``."""
        return await self._step("llm", name, call, give_up_after)

    async def tool_call(
        self,
        call: Callable[[], Awaitable[T]],
        *,
        name: str = "tool",
        give_up_after: float | None = None,
        abortable: bool = False,
    ) -> T:
        """One tool (MCP) call, then a checkpoint. Non-abortable by default: a cancel waits
        for the call's end.

        ``abortable=True``: a cancel cancels the operation's task at once (the one place
        besides ``stream_llm`` where the gateway cancels code it runs, by the backend's own
        declaration). The operation must then tell its server in that server's protocol
        (MCP ``notifications/cancelled``, A2A ``tasks/cancel``) in its ``except
        CancelledError`` and re-raise, within a bounded time; the step then halts.
        """
        return await self._step("tool", name, call, give_up_after, abortable=abortable)

    async def agent_call(
        self,
        call: Callable[[], Awaitable[T]],
        *,
        name: str = "agent",
        give_up_after: float | None = None,
        abortable: bool = False,
    ) -> T:
        """One agent (A2A) call, then a checkpoint. Non-abortable by default: a cancel waits
        for the call's end.

        ``abortable=True``: a cancel cancels the operation's task at once (the one place
        besides ``stream_llm`` where the gateway cancels code it runs, by the backend's own
        declaration). The operation must then tell its server in that server's protocol
        (MCP ``notifications/cancelled``, A2A ``tasks/cancel``) in its ``except
        CancelledError`` and re-raise, within a bounded time; the step then halts.
        """
        return await self._step("agent", name, call, give_up_after, abortable=abortable)

    async def plan(
        self,
        call: Callable[[], Awaitable[T]],
        *,
        name: str = "plan",
        give_up_after: float | None = None,
    ) -> T:
        """A planning / task-decomposition step, then a checkpoint."""
        return await self._step("plan", name, call, give_up_after)

    async def stream_llm(
        self,
        tokens: AsyncIterable[str | list[str]],
        *,
        input_tokens: int = 0,
        name: str = "llm_stream",
        emit: bool = True,
    ) -> str:
        """Read an abortable token stream, emitting each token; returns the text read.

        Each item the stream yields is one read: a token, or a ``list`` of the tokens that
        arrived together (a network read of several, or a burst). The cancel flag is checked once
        per read: a list is emitted whole or not at all, and costs one turn of this loop, not one
        per token (the hot path at high token rates).

        Every token counts as one output token (``input_tokens`` and those estimates can be
        replaced by the provider's figures with ``usage.report``). A cancel stops the read at
        once, even between reads, and closes the upstream (``aclose``) so a real provider stops
        generating; the step then halts with :class:`PipelineHalted`.
        """
        parts: list[str] = []
        try:
            self.checkpoint(name)
            reader = asyncio.ensure_future(
                self._read_llm_stream(tokens, parts, input_tokens, name, emit)
            )
            # Abortable by declaration: the only place the gateway cancels a task it runs.
            unregister = self._token.on_cancel(reader.cancel)
            try:
                await reader
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    reader.cancel()  # this task was cancelled from outside: propagate
                    raise
                # else: the reader was aborted by the token; the checkpoint below halts
            finally:
                unregister()
        finally:
            close = getattr(tokens, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
        self.checkpoint(name)
        return "".join(parts)

    async def _read_llm_stream(
        self,
        tokens: AsyncIterable[str | list[str]],
        parts: list[str],
        input_tokens: int,
        name: str,
        emit: bool,
    ) -> None:
        # A method, not a closure: closures cost a function and a cell per free variable for
        # every active request, all scanned by the garbage collector (whose pauses delay cancels).
        # The read starts one loop turn after it is scheduled: check again (G5).
        step = self._begin("llm_stream", name, abortable=True)
        usage, token, sink = self.usage, self._token, self._sink
        usage._start_stream(input_tokens)
        # Hot path, once per token: emit() inlined (no coroutine per token); the cancel check
        # below is its checkpoint.
        async for piece in tokens:
            if isinstance(piece, str):  # one token
                usage.output_tokens += 1
                if token.reason is not None:
                    self._tokens_after_cancel += 1
                    return  # cut: the step never ends (halt.aborted)
                parts.append(piece)
                if emit and piece and sink.push(piece):
                    await sink.drained()
                continue
            burst = _burst(piece)  # the tokens of one read: one check, one push
            usage.output_tokens += len(piece)  # every token read, empty ones too (as above)
            if token.reason is not None:
                self._tokens_after_cancel += len(piece)
                return
            parts.extend(burst)
            if emit and burst and sink.push_many(burst):
                await sink.drained()
        self._end(step)

    async def _step(
        self,
        kind: str,
        name: str,
        call: Callable[[], Awaitable[T]],
        give_up_after: float | None = None,
        *,
        abortable: bool = False,
    ) -> T:
        """Run an operation between two checkpoints: shielded unless ``abortable``.

        ``give_up_after`` (seconds) bounds the wait, not the operation (a caller's own
        ``asyncio.timeout`` could not: its cancellation waits for the shielded operation, as a
        shutdown's does): past it the request fails
        (``backend_error``, naming the step) while the operation, which may not be interrupted
        mid-way, goes on to its end in the background and its result is dropped.
        """
        self.checkpoint(name)
        if self._step_sink is not None:
            await self._sink.drained()  # a client behind on step messages slows the pipeline

        async def guarded() -> T:
            # The operation starts one loop turn after it is scheduled: check again, so no call
            # starts after the flag even if the cancel arrived in between (G5).
            step = self._begin(kind, name, abortable=abortable)
            result = await call()
            self._end(step)  # a step that raised has no end (SPEC.md §3.12)
            return result

        inner = asyncio.ensure_future(guarded())
        unregister = self._token.on_cancel(inner.cancel) if abortable else None
        try:
            budget = asyncio.timeout(give_up_after)  # None: no bound
            try:
                async with budget:
                    result = await asyncio.shield(inner)
            except TimeoutError:
                if not budget.expired():
                    raise  # the operation's own TimeoutError: its failure, not ours
                _ABANDONED.add(inner)  # referenced until it ends, then forgotten
                inner.add_done_callback(_forget)
                raise BackendFailure(
                    ErrorCode.BACKEND_ERROR,
                    f"{kind} step {name!r} did not finish within {give_up_after:g} s",
                ) from None
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if abortable and inner.cancelled() and not (current and current.cancelling()):
                self.checkpoint(name)  # aborted by the cancel: halt here (PipelineHalted)
            # The pipeline task itself was cancelled (last resort at shutdown): let the
            # non-abortable operation finish, then propagate.
            if not inner.done():
                with contextlib.suppress(BaseException):
                    await inner
            raise
        finally:
            if unregister is not None:
                unregister()
            # A halt raised in the step is kept by its task with a traceback holding this
            # frame: without the task in this frame, no reference cycle (request, context and
            # task would wait for the cycle collector).
            del inner
        self.checkpoint(name)
        return result

    def _begin(self, kind: str, name: str, *, abortable: bool = False) -> StepRecord:
        # G5: no new LLM, tool or agent call starts after the flag. Called where the operation
        # really starts; tests check G5 against the backend's own evidence.
        self.checkpoint(name)
        # A name the wire cannot carry (SPEC.md §3.12: 1-128 characters) is shortened, not fatal.
        name = (name or kind)[:MAX_STEP_NAME_CHARS]
        step = StepRecord(kind=kind, name=name, index=len(self._steps), abortable=abortable)
        self._steps.append(step)
        self._running[step.index] = step
        if self._step_sink is not None:
            self._step_sink.push_step(step, StepState.STARTED)
        if self._trace is not None:
            self._trace.step_begin(step)
        return step

    def _end(self, step: StepRecord) -> None:
        del self._running[step.index]
        if self._step_sink is not None:
            self._step_sink.push_step(step, StepState.ENDED)
        if self._trace is not None:
            self._trace.step_end(step)


#: Non-abortable operations whose step timed out: they run to their end unobserved.
_ABANDONED: set[asyncio.Future[Any]] = set()


def _burst(piece: object) -> list[str]:
    """A read of several tokens (``stream_llm``): a list, without its empty strings."""
    if not isinstance(piece, list):
        raise TypeError(f"a token stream yielded {type(piece).__name__}: expected str or list[str]")
    return [text for text in piece if text] if "" in piece else piece


def _forget(operation: asyncio.Future[Any]) -> None:
    _ABANDONED.discard(operation)
    if not operation.cancelled():
        operation.exception()  # retrieved: an abandoned failure is not "never retrieved"
