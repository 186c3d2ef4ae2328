"""A2A agent calls in a pipeline: ask a remote agent through ``a2a-sdk``, cancel it in A2A's own
protocol.

A backend builds one :class:`A2AAgents` from the ``agents`` setting and asks an agent by name::

    agents = A2AAgents.from_config(config.agents)   # at start-up; astart()/aclose() with it
    result = await agents.ask(ctx, "researcher", ctx.prompt)
    await ctx.emit(result.text)

Each :meth:`A2AAgents.ask` is one pipeline step, ``ctx.agent_call(name=<agent>,
abortable=<the agent's abortable>)`` (kind ``agent`` in the ``step`` messages), around one A2A
``SendStreamingMessage`` (``streaming = true``: the task's updates are read as they come) or
``SendMessage`` (``streaming = false``: the final task is awaited). Every call carries a fresh
``contextId``, so its remote task can be found (``ListTasks``) before the answer names it.

**Cancel, agent marked abortable.** The gateway cancels the step's task at once; the call then,
inside its ``except CancelledError`` and within ``cancel_timeout_s``, sends A2A ``CancelTask``
(``tasks/cancel``) for the remote task, reads the task's final state from the answer (normally
``canceled``; a task that ended first keeps its own state), records it (:class:`CancelOutcome`,
in :attr:`A2AAgents.cancellations` and the log line ``agent.cancel``) and re-raises: the step
halts. A cancel that races the start of the call is never lost: when the request may have left
(the send started) but no task id has arrived yet, the call keeps the send alive and waits for
the id — the stream's first event, or, for a blocking send, a ``ListTasks`` lookup by the
call's ``contextId`` — then cancels that task. When the send had not started, nothing is sent.

**Not abortable** (the default, the seed's behaviour): a cancel waits for the call's end, then
the pipeline halts at the checkpoint after it.

**Failures** are :class:`AgentFailure` (a :class:`~gateway.pipeline.BackendFailure`): the
request fails with ``agent_error`` (the remote task failed, was rejected, wants input the
pipeline cannot give, or the agent refused the request), ``agent_timeout`` (no end within
``timeout_s``; the remote task is then cancelled as on a request cancel, whatever
``abortable`` says) or ``agent_unavailable`` (connection refused or dropped, connect timeout,
HTTP 5xx). Messages name the agent, never its URL.

**Pool.** One ``httpx.AsyncClient`` (and one ``a2a`` client over it) per agent, created on
:meth:`A2AAgents.astart` or on first use, reused by every request, closed by
:meth:`A2AAgents.aclose`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import structlog

try:
    import httpx
    from a2a.client import (
        A2AClientError,
        A2AClientTimeoutError,
        Client,
        ClientConfig,
        ClientFactory,
    )
    from a2a.types.a2a_pb2 import (
        AgentCapabilities,
        AgentCard,
        AgentInterface,
        CancelTaskRequest,
        GetTaskRequest,
        ListTasksRequest,
        Message,
        Part,
        Role,
        SendMessageRequest,
        StreamResponse,
        Task,
        TaskState,
    )
    from a2a.utils.errors import A2AError, TaskNotCancelableError
except ModuleNotFoundError as exc:  # the optional extra is not installed
    raise ModuleNotFoundError(
        "muxgate's A2A agent calls need a2a-sdk, which comes with muxgate's 'agents' extra: "
        "pip install 'muxgate[agents]'",
        name=exc.name,
    ) from exc

from protocol import ErrorCode

from ..pipeline import BackendFailure, RequestContext
from .settings import AgentSettings, parse_agents

__all__ = [
    "AGENT_ERROR",
    "AGENT_TIMEOUT",
    "AGENT_UNAVAILABLE",
    "A2AAgents",
    "AgentFailure",
    "AgentResult",
    "CancelOutcome",
]

log = structlog.get_logger("muxgate.agents")

AGENT_ERROR: Final = ErrorCode.AGENT_ERROR
AGENT_TIMEOUT: Final = ErrorCode.AGENT_TIMEOUT
AGENT_UNAVAILABLE: Final = ErrorCode.AGENT_UNAVAILABLE

#: How many cancel outcomes :attr:`A2AAgents.cancellations` keeps (the most recent).
MAX_OUTCOMES: Final = 1000
#: How much of an agent's own status message a failure's message quotes.
EXCERPT_CHARS: Final = 200
#: A blocking send's task is looked up by its context id at these growing intervals (seconds).
_LOOKUP_FIRST_S: Final = 0.005
_LOOKUP_MAX_S: Final = 0.1

_TERMINAL: Final = frozenset(
    {
        TaskState.TASK_STATE_COMPLETED,
        TaskState.TASK_STATE_FAILED,
        TaskState.TASK_STATE_CANCELED,
        TaskState.TASK_STATE_REJECTED,
    }
)
#: States where the task waits for the client: a pipeline cannot answer, so the call ends there.
_INTERRUPTED: Final = frozenset(
    {TaskState.TASK_STATE_INPUT_REQUIRED, TaskState.TASK_STATE_AUTH_REQUIRED}
)


def state_name(state: int) -> str:
    """``TASK_STATE_CANCELED`` -> ``"canceled"`` (A2A's own word, lower case)."""
    try:
        name = str(TaskState.Name(state))
    except ValueError:
        return "unknown"
    return name.removeprefix("TASK_STATE_").lower()


class AgentFailure(BackendFailure):
    """A failed agent call: ``code`` is ``agent_error``, ``agent_timeout`` or
    ``agent_unavailable``; ``state`` the remote task's last known state, if any."""

    def __init__(self, code: str, message: str, *, state: str | None = None) -> None:
        super().__init__(code, message)
        self.state = state


@dataclass(frozen=True, slots=True)
class AgentResult:
    """A finished agent call: the remote task's id (``None`` when the agent answered with a
    message and made no task), its final ``state`` (``completed``) and its text (the text parts
    of its artifacts, else of its final status message, else of the agent's message)."""

    agent: str
    task_id: str | None
    state: str
    text: str


@dataclass(frozen=True, slots=True)
class CancelOutcome:
    """What a cancel of an agent call did (a request cancel of an abortable agent, or a call
    past its ``timeout_s``).

    ``sent``: the message had left (or may have); ``task_id``: the remote task, once known;
    ``delivered``: the agent answered ``CancelTask``; ``final_state``: the remote task's state
    after it (``canceled``; or the state it ended in first); ``error``: why the cancel could not
    be delivered (``None`` when it was, or when there was nothing to cancel). Times are
    ``time.perf_counter()`` seconds.
    """

    request_id: str
    agent: str
    why: str  # "cancel" | "timeout"
    sent: bool
    task_id: str | None
    delivered: bool
    final_state: str | None
    started_at: float
    ended_at: float
    error: str | None = None

    @property
    def elapsed_s(self) -> float:
        return self.ended_at - self.started_at


@dataclass(slots=True)
class _Call:
    """One agent call in flight: what the send learned so far."""

    context_id: str
    sending: bool = False
    task_id: str | None = None
    id_known: asyncio.Event = field(default_factory=asyncio.Event)
    state: int = TaskState.TASK_STATE_UNSPECIFIED
    parts: list[str] = field(default_factory=list)
    status_text: str = ""
    message_text: str | None = None

    def learn(self, task_id: str) -> None:
        if task_id and self.task_id is None:
            self.task_id = task_id
            self.id_known.set()


def _text(parts: Iterable[Part]) -> str:
    return "".join(part.text for part in parts if part.HasField("text"))


def _excerpt(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 1] + "…"


class _Agent:
    """One configured agent: its settings and, once created, its pooled client."""

    __slots__ = ("client", "http", "loop", "settings")

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.http: httpx.AsyncClient | None = None
        self.client: Client | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def ensure(self) -> Client:
        loop = asyncio.get_running_loop()
        if self.client is None or self.loop is not loop:
            settings = self.settings
            # No read timeout: a task may be quiet for long; timeout_s bounds the whole call.
            self.http = httpx.AsyncClient(
                timeout=httpx.Timeout(None, connect=settings.connect_timeout_s),
                limits=httpx.Limits(max_keepalive_connections=32),
            )
            card = AgentCard(
                name=settings.name,
                supported_interfaces=[
                    AgentInterface(
                        url=settings.url, protocol_binding="JSONRPC", protocol_version="1.0"
                    )
                ],
                capabilities=AgentCapabilities(streaming=settings.streaming),
            )
            config = ClientConfig(streaming=settings.streaming, httpx_client=self.http)
            self.client = ClientFactory(config).create(card)
            self.loop = loop
        return self.client

    async def aclose(self) -> None:
        http, self.http, self.client, self.loop = self.http, None, None, None
        if http is not None:
            await http.aclose()


class A2AAgents:
    """The configured remote A2A agents, by name, and the step that asks one."""

    def __init__(self, agents: Mapping[str, AgentSettings]) -> None:
        self._agents = {name: _Agent(settings) for name, settings in agents.items()}
        self._outcomes: collections.deque[CancelOutcome] = collections.deque(maxlen=MAX_OUTCOMES)

    @classmethod
    def from_config(cls, agents: Mapping[str, Any]) -> A2AAgents:
        """From the ``agents`` setting (``Config.agents``, or the raw ``[agents.NAME]``
        tables: validated here, raising :class:`~gateway.config.ConfigError`)."""
        return cls(parse_agents(agents))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._agents)

    def settings(self, agent: str) -> AgentSettings:
        return self._get(agent).settings

    @property
    def cancellations(self) -> Sequence[CancelOutcome]:
        """The most recent cancels of agent calls, oldest first."""
        return tuple(self._outcomes)

    def cancellations_for(self, request_id: str) -> list[CancelOutcome]:
        return [outcome for outcome in self._outcomes if outcome.request_id == request_id]

    async def astart(self) -> None:
        """Create the pooled clients (no network: an agent down at start-up fails only the
        requests that ask it, ``agent_unavailable``)."""
        for agent in self._agents.values():
            agent.ensure()

    async def aclose(self) -> None:
        for agent in self._agents.values():
            await agent.aclose()

    def _get(self, agent: str) -> _Agent:
        try:
            return self._agents[agent]
        except KeyError:
            raise ValueError(f"no agent named {agent!r} in the agents setting") from None

    async def ask(self, ctx: RequestContext, agent: str, text: str) -> AgentResult:
        """Send ``text`` to ``agent`` as one pipeline step and return its answer.

        Raises :class:`AgentFailure` on a typed failure, and halts the pipeline
        (:class:`~gateway.pipeline.PipelineHalted`) on a cancel: at once when the agent is
        abortable (after ``tasks/cancel``), after the call's end otherwise.
        """
        target = self._get(agent)
        settings = target.settings
        # The step's own bound is a backstop: the call ends itself at timeout_s (agent_timeout),
        # plus the time its cancel may take.
        backstop = settings.timeout_s + settings.cancel_timeout_s + 1.0
        return await ctx.agent_call(
            lambda: self._call(ctx, target, text),
            name=agent,
            give_up_after=backstop,
            abortable=settings.abortable,
        )

    # -- one call ----------------------------------------------------------------------------

    async def _call(self, ctx: RequestContext, agent: _Agent, text: str) -> AgentResult:
        client = agent.ensure()
        call = _Call(context_id=uuid.uuid4().hex)
        request = SendMessageRequest(
            message=Message(
                message_id=uuid.uuid4().hex,
                context_id=call.context_id,
                role=Role.ROLE_USER,
                parts=[Part(text=text)],
            )
        )
        # The send runs in a task of its own: a cancel of this call must not cut it before the
        # remote task's id is known (the cancel needs it).
        reader = asyncio.ensure_future(self._read(agent, client, call, request))
        try:
            async with asyncio.timeout(agent.settings.timeout_s):
                await asyncio.shield(reader)
        except TimeoutError:
            if reader.done():
                raise  # the send's own TimeoutError (not expected: it maps its failures)
            await self._cancel(ctx, agent, client, call, reader, "timeout")
            raise AgentFailure(
                AGENT_TIMEOUT,
                f"agent {agent.settings.name!r} did not finish within "
                f"{agent.settings.timeout_s:g} s",
                state=state_name(call.state) if call.task_id else None,
            ) from None
        except asyncio.CancelledError:
            await self._cancel(ctx, agent, client, call, reader, "cancel")
            raise
        return self._result(agent.settings.name, call)

    async def _read(
        self, agent: _Agent, client: Client, call: _Call, request: SendMessageRequest
    ) -> None:
        """Send the message and read the answer (a stream of events, or one final task)."""
        call.sending = True
        name = agent.settings.name
        try:
            stream = client.send_message(request)
            async for event in stream:
                self._on_event(call, event)
                if call.message_text is not None or call.state in _TERMINAL | _INTERRUPTED:
                    break
        except A2AClientTimeoutError:
            raise AgentFailure(
                AGENT_UNAVAILABLE, f"agent {name!r} could not be reached (connect timeout)"
            ) from None
        except A2AClientError as exc:
            raise _client_failure(name, exc) from None
        except A2AError as exc:  # the agent answered with a JSON-RPC error
            raise AgentFailure(
                AGENT_ERROR, f"agent {name!r} refused the request ({type(exc).__name__})"
            ) from None

    @staticmethod
    def _on_event(call: _Call, event: StreamResponse) -> None:
        kind = event.WhichOneof("payload")
        if kind == "task":
            task: Task = event.task
            call.learn(task.id)
            call.state = task.status.state
            if task.status.HasField("message"):
                call.status_text = _text(task.status.message.parts)
            if not call.parts:  # a blocking send's final task carries its artifacts
                call.parts.extend(_text(artifact.parts) for artifact in task.artifacts)
        elif kind == "status_update":
            call.learn(event.status_update.task_id)
            status = event.status_update.status
            call.state = status.state
            if status.HasField("message"):
                call.status_text = _text(status.message.parts)
        elif kind == "artifact_update":
            call.learn(event.artifact_update.task_id)
            call.parts.append(_text(event.artifact_update.artifact.parts))
        elif kind == "message":
            call.learn(event.message.task_id)
            call.message_text = _text(event.message.parts)

    @staticmethod
    def _result(name: str, call: _Call) -> AgentResult:
        if call.message_text is not None and call.state not in _TERMINAL | _INTERRUPTED:
            return AgentResult(name, call.task_id, "completed", call.message_text)  # no task
        state = state_name(call.state)
        if call.state == TaskState.TASK_STATE_COMPLETED:
            text = "".join(call.parts) or call.status_text or (call.message_text or "")
            return AgentResult(name, call.task_id, state, text)
        if call.state in _TERMINAL or call.state in _INTERRUPTED:
            why = f": {_excerpt(call.status_text)}" if call.status_text.strip() else ""
            raise AgentFailure(AGENT_ERROR, f"agent {name!r}: task {state}{why}", state=state)
        raise AgentFailure(
            AGENT_ERROR,
            f"agent {name!r}: the answer ended before the task did (state {state})",
            state=state,
        )

    # -- cancel ------------------------------------------------------------------------------

    async def _cancel(
        self,
        ctx: RequestContext,
        agent: _Agent,
        client: Client,
        call: _Call,
        reader: asyncio.Future[None],
        why: str,
    ) -> CancelOutcome:
        """Tell the agent, in A2A's protocol, within ``cancel_timeout_s``: ``CancelTask`` for
        the remote task, once its id is known. Never raises (but a cancel of the task running it
        during the wait, which it passes on)."""
        started = time.perf_counter()
        sent = call.sending
        delivered = False
        final: int | None = None
        error: str | None = None
        try:
            if not sent:
                reader.cancel()  # the send never started: nothing left, nothing to cancel
            else:
                async with asyncio.timeout(agent.settings.cancel_timeout_s):
                    task_id = await self._task_id(agent, client, call, reader)
                    if task_id is not None and call.state in _TERMINAL:
                        final = call.state  # it ended first: nothing to cancel
                    elif task_id is not None:
                        try:
                            task = await client.cancel_task(CancelTaskRequest(id=task_id))
                            delivered = True
                        except TaskNotCancelableError:  # it ended in the meantime
                            task = await client.get_task(GetTaskRequest(id=task_id))
                        final = task.status.state
        except TimeoutError:
            error = f"no answer within cancel_timeout_s ({agent.settings.cancel_timeout_s:g} s)"
        except (A2AError, httpx.HTTPError) as exc:
            error = type(exc).__name__
        finally:
            if not reader.done():
                reader.cancel()  # closes the stream (the task goes on only if not cancelled)
            with contextlib.suppress(BaseException):
                await reader
        outcome = CancelOutcome(
            request_id=ctx.request_id,
            agent=agent.settings.name,
            why=why,
            sent=sent,
            task_id=call.task_id,
            delivered=delivered,
            final_state=state_name(final) if final is not None else None,
            started_at=started,
            ended_at=time.perf_counter(),
            error=error,
        )
        self._outcomes.append(outcome)
        (log.warning if error else log.info)(
            "agent.cancel",
            request_id=outcome.request_id,
            agent=outcome.agent,
            why=why,
            task_id=outcome.task_id,
            delivered=delivered,
            final_state=outcome.final_state,
            cancel_ms=round(outcome.elapsed_s * 1000, 2),
            error=error,
        )
        return outcome

    async def _task_id(
        self, agent: _Agent, client: Client, call: _Call, reader: asyncio.Future[None]
    ) -> str | None:
        """The remote task's id: known, or the first the send learns (a stream's first event),
        or — a blocking send tells nothing before its end — found by the call's context id.
        ``None`` when the send ended without a task (an error, or a message answer)."""
        if call.task_id is not None or reader.done():
            return call.task_id
        known = asyncio.ensure_future(call.id_known.wait())
        waiters: set[asyncio.Future[Any]] = {known, reader}
        delay = _LOOKUP_FIRST_S
        try:
            while call.task_id is None and not reader.done():
                wait = None if agent.settings.streaming else delay
                await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if call.task_id is None and not reader.done() and not agent.settings.streaming:
                    found = await client.list_tasks(ListTasksRequest(context_id=call.context_id))
                    if found.tasks:
                        call.learn(found.tasks[0].id)
                    delay = min(delay * 2, _LOOKUP_MAX_S)
        finally:
            known.cancel()
        return call.task_id


def _client_failure(name: str, exc: A2AClientError) -> AgentFailure:
    """An a2a client error (HTTP and transport failures) as a typed failure."""
    cause = exc.__cause__
    if isinstance(cause, httpx.HTTPStatusError):
        status = cause.response.status_code
        if status >= 500:
            return AgentFailure(AGENT_UNAVAILABLE, f"agent {name!r} answered HTTP {status}")
        return AgentFailure(AGENT_ERROR, f"agent {name!r} refused the request (HTTP {status})")
    if isinstance(cause, httpx.ConnectError | httpx.ConnectTimeout):
        return AgentFailure(AGENT_UNAVAILABLE, f"agent {name!r} could not be reached")
    if isinstance(cause, httpx.RequestError):
        return AgentFailure(AGENT_UNAVAILABLE, f"the connection to agent {name!r} dropped")
    return AgentFailure(AGENT_ERROR, f"agent {name!r} sent an answer that could not be read")
