"""Backend ``flow``: a pipeline described in the settings file, composed without code.

A flow is a list of steps run in order for each chat; each step's result is a named value the
later steps' templates may use::

    backend = "flow"

    [backend_options]
    llm = "llama"                          # the LLM of the plan and answer steps
    llm_options = { max_tokens = 128 }     # its backend options

    [[backend_options.steps]]
    kind = "plan"                          # an LLM call whose text is not streamed
    prompt = "List the steps to answer: {prompt}"

    [[backend_options.steps]]
    kind = "tool"                          # an MCP tool call ([tools.examples] in the settings)
    server = "examples"
    tool = "word_count"
    arguments = { text = "{prompt}" }

    [[backend_options.steps]]
    kind = "agent"                         # an A2A agent ([agents.checker] in the settings)
    agent = "checker"
    message = "Check this plan: {plan}"

    [[backend_options.steps]]
    kind = "answer"                        # an LLM call streamed to the client
    prompt = "{prompt}\\n\\nPlan: {plan}\\nWords: {word_count}\\nReview: {checker}"

Step kinds: ``plan`` and ``answer`` (an abortable streaming LLM call through the ``llm``
backend's ``complete``: a cancel stops the model at the next token; ``answer`` streams its text
to the client, ``plan`` keeps it), ``tool`` (``server``, ``tool``, ``arguments``: string values
are templates, other JSON values go as they are) and ``agent`` (``agent``, ``message``). Whether
a tool or agent call is abortable, and its timeout, are settings of the tool server or agent.
Templates are Python format strings over ``{prompt}`` (the chat's last user turn) and the
values of the steps before: each step's value is named by ``name =``, by default ``plan``,
``answer``, the tool's name or the agent's name.

Everything is checked when the gateway starts, with a message naming the step: an unknown step
kind or key, a missing key, a tool server or agent the settings do not define, a template that
uses a name no earlier step defines, two steps with one name, a flow without an ``answer``; and,
once the tool servers are up, a tool its server does not list or an argument the tool's input
schema requires that the step does not give.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, runtime_checkable

from protocol import ChatMessage, Role

from ..config import ConfigError
from ..pipeline import Backend, BackendFailure, BackendInfo, RequestContext
from .simulated import estimate_tokens

__all__ = ["FlowBackend", "FlowStep"]

KINDS: Final = ("plan", "tool", "agent", "answer")
#: The most rounds of tool calls an ``answer`` step may allow the model.
MAX_ROUNDS: Final = 10
_KEYS: Final[Mapping[str, frozenset[str]]] = {
    "plan": frozenset({"kind", "name", "prompt"}),
    "answer": frozenset({"kind", "name", "prompt", "tools", "max_rounds"}),
    "tool": frozenset({"kind", "name", "server", "tool", "arguments"}),
    "agent": frozenset({"kind", "name", "agent", "message"}),
}
_REQUIRED: Final[Mapping[str, tuple[str, ...]]] = {
    "plan": ("prompt",),
    "answer": ("prompt",),
    "tool": ("server", "tool"),
    "agent": ("agent", "message"),
}


@runtime_checkable
class Completer(Protocol):
    """An LLM backend a flow can call for one completion (``simulated``, ``openai``,
    ``llama``)."""

    async def complete(
        self,
        ctx: RequestContext,
        turns: Sequence[ChatMessage],
        *,
        name: str = ...,
        emit: bool = ...,
    ) -> str: ...


@dataclass(frozen=True, slots=True)
class FlowStep:
    """One checked step of a flow."""

    kind: str
    name: str
    #: The step's templates: ``prompt`` (plan, answer), ``message`` (agent), and the tool's
    #: string arguments as ``arguments.KEY``.
    templates: Mapping[str, str] = field(default_factory=dict)
    server: str = ""
    tool: str = ""
    agent: str = ""
    #: The tool's arguments that are not templates (numbers, booleans, lists, objects).
    constants: Mapping[str, Any] = field(default_factory=dict)
    #: ``answer`` only: the (server, tool) pairs the model may call itself, and the most
    #: rounds of tool calls before it must answer.
    tools: tuple[tuple[str, str], ...] = ()
    max_rounds: int = 3


def _fields(template: str, where: str) -> set[str]:
    """The names a format template uses; ConfigError for one Python cannot format."""
    names: set[str] = set()
    try:
        for _, name, spec, _ in string.Formatter().parse(template):
            if name is None:
                continue
            if not name.isidentifier():
                raise ConfigError(f"{where}: {{{name}}} is not a value name")
            names.add(name)
            if spec and "{" in spec:
                raise ConfigError(f"{where}: nested templates are not supported")
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc} (write {{{{ and }}}} for braces)") from None
    return names


def parse_steps(
    raw: object, *, tools: Mapping[str, Any], agents: Mapping[str, Any]
) -> tuple[FlowStep, ...]:
    """Check a flow's ``steps`` against the tool servers and agents the settings define."""
    if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
        raise ConfigError("backend 'flow' option 'steps' must be a non-empty list of tables")
    defined = {"prompt"}
    steps: list[FlowStep] = []
    for n, item in enumerate(raw, 1):
        where = f"flow step {n}"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where} must be a table")
        kind = item.get("kind")
        if kind not in KINDS:
            raise ConfigError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
        where = f"flow step {n} ({kind})"
        unknown = sorted(set(item) - _KEYS[kind])
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}")
        for key in _REQUIRED[kind]:
            if not isinstance(item.get(key), str) or not item[key]:
                raise ConfigError(f"{where}: {key!r} is required (a non-empty string)")
        default_name = {"tool": item.get("tool"), "agent": item.get("agent")}.get(kind, kind)
        name = item.get("name", default_name)
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"{where}: name must be an identifier, got {name!r}")
        if name in defined:
            raise ConfigError(f"{where}: the name {name!r} is already used; set name = ...")
        templates: dict[str, str] = {}
        constants: dict[str, Any] = {}
        choosable: list[tuple[str, str]] = []
        max_rounds = 3
        if kind in ("plan", "answer"):
            templates["prompt"] = item["prompt"]
        if kind == "answer" and "tools" in item:
            listed = item["tools"]
            if not isinstance(listed, Sequence) or isinstance(listed, str) or not listed:
                raise ConfigError(f"{where}: tools must be a non-empty list of 'server.tool'")
            for entry in listed:
                server, _, tool = str(entry).partition(".")
                if not server or not tool:
                    raise ConfigError(f"{where}: tools entry {entry!r} is not 'server.tool'")
                if server not in tools:
                    raise ConfigError(f"{where}: no tool server {server!r} in [tools]")
                choosable.append((server, tool))
            max_rounds = item.get("max_rounds", 3)
            if type(max_rounds) is not int or not 1 <= max_rounds <= MAX_ROUNDS:
                raise ConfigError(f"{where}: max_rounds must be an integer in 1..{MAX_ROUNDS}")
        if kind in ("plan", "answer"):
            pass
        elif kind == "agent":
            if item["agent"] not in agents:
                raise ConfigError(f"{where}: no agent {item['agent']!r} in [agents]")
            templates["message"] = item["message"]
        else:
            if item["server"] not in tools:
                raise ConfigError(f"{where}: no tool server {item['server']!r} in [tools]")
            arguments = item.get("arguments", {})
            if not isinstance(arguments, Mapping):
                raise ConfigError(f"{where}: arguments must be a table")
            for key, value in arguments.items():
                if isinstance(value, str):
                    templates[f"arguments.{key}"] = value
                else:
                    constants[str(key)] = value
        for key, template in templates.items():
            missing = sorted(_fields(template, f"{where} {key}") - defined)
            if missing:
                raise ConfigError(
                    f"{where} {key}: {{{missing[0]}}} is not defined by an earlier step "
                    f"(defined: {', '.join(sorted(defined))})"
                )
        steps.append(
            FlowStep(
                kind=kind,
                name=name,
                templates=templates,
                server=item.get("server", ""),
                tool=item.get("tool", ""),
                agent=item.get("agent", ""),
                constants=constants,
                tools=tuple(choosable),
                max_rounds=max_rounds,
            )
        )
        defined.add(name)
    if not any(step.kind == "answer" for step in steps):
        raise ConfigError("a flow needs an 'answer' step: it is what the client receives")
    return tuple(steps)


def _default_length(backend: object) -> int:
    """The default answer length a backend announces (``max_tokens``, or the simulated
    backend's ``tokens``), or 0."""
    describe = getattr(backend, "describe", None)
    info = describe() if describe is not None else None
    if isinstance(info, BackendInfo):
        for setting in info.settings:
            if setting.name in ("max_tokens", "tokens") and setting.default is not None:
                return int(setting.default)
    return 0


class FlowBackend:
    """Runs the configured steps for every chat (see the module)."""

    def __init__(
        self,
        *,
        steps: object = (),
        llm: str = "simulated",
        llm_options: Mapping[str, Any] | None = None,
        tools: Mapping[str, Any] | None = None,
        agents: Mapping[str, Any] | None = None,
    ) -> None:
        from . import load_backend  # the LLM is a backend like any other

        tools, agents = dict(tools or {}), dict(agents or {})
        self.steps = parse_steps(steps, tools=tools, agents=agents)
        if llm == "flow":
            raise ConfigError("backend 'flow' option 'llm' cannot be 'flow'")
        backend: Backend = load_backend(llm, **dict(llm_options or {}))
        if not isinstance(backend, Completer):
            raise ConfigError(f"backend 'flow' option 'llm': backend {llm!r} has no complete()")
        self.llm_name = llm
        self.llm: Any = backend
        #: The output tokens one LLM step may take (its backend's default length), for the
        #: estimate behind ``saved_tokens``; 0 when the backend does not say.
        self._llm_step_tokens = _default_length(backend)
        self._llm_steps = sum(step.kind in ("plan", "answer") for step in self.steps)
        self._tools: Any = None
        self._agents: Any = None
        if any(step.tools for step in self.steps) and not callable(
            getattr(backend, "complete_with_tools", None)
        ):
            raise ConfigError(
                f"backend 'flow': an answer step lets the model call tools, but backend {llm!r} "
                "cannot call tools (use llm = 'openai' with a model that supports tool calling)"
            )
        #: The function definitions the model is offered, by (server, tool); filled at start.
        self._functions: dict[tuple[str, str], dict[str, Any]] = {}
        if any(step.kind == "tool" or step.tools for step in self.steps):
            from ..tools import MCPTools  # the `tools` extra: imported only when used

            self._tools = MCPTools.from_config(tools)
        if any(step.kind == "agent" for step in self.steps):
            from ..agents import A2AAgents  # the `agents` extra: imported only when used

            self._agents = A2AAgents.from_config(agents)

    def __repr__(self) -> str:
        return f"FlowBackend(llm={self.llm_name!r}, steps={[s.name for s in self.steps]})"

    def describe(self) -> BackendInfo:
        describe = getattr(self.llm, "describe", None)
        info = describe() if describe is not None else None
        if not isinstance(info, BackendInfo):
            return BackendInfo(name="flow")
        return BackendInfo(name="flow", model=info.model, settings=info.settings)

    async def astart(self) -> None:
        """Start the LLM (e.g. llama's model server), the tool servers and the agents; then
        check every tool step against its server's own list: the tool exists, and the flow
        gives each argument its input schema requires (ConfigError naming the step)."""
        try:
            for part in (self.llm, self._tools, self._agents):
                start = getattr(part, "astart", None)
                if start is not None:
                    await start()
            if self._tools is not None:
                await self._check_tools()
        except BaseException:
            await self.aclose()  # what did start (a model server, tool processes) stops
            raise

    async def _check_tools(self) -> None:
        listed: dict[str, dict[str, Any]] = {}

        async def tools_of(server: str) -> dict[str, Any]:
            if server not in listed:
                result = await self._tools.server(server).client().list_tools()
                listed[server] = {tool.name: tool for tool in result.tools}
            return listed[server]

        for n, step in enumerate(self.steps, 1):
            for server, name in step.tools:  # offered to the model: its schema goes as it is
                offered = (await tools_of(server)).get(name)
                if offered is None:
                    raise ConfigError(
                        f"flow step {n} (answer): tool server {server!r} has no tool {name!r}"
                    )
                self._functions[(server, name)] = _function(server, offered)
            if step.kind != "tool":
                continue
            tool = (await tools_of(step.server)).get(step.tool)
            where = f"flow step {n} (tool)"
            if tool is None:
                known = ", ".join(sorted(listed[step.server])) or "none"
                raise ConfigError(
                    f"{where}: tool server {step.server!r} has no tool {step.tool!r} "
                    f"(it has: {known})"
                )
            schema = tool.input_schema if isinstance(tool.input_schema, Mapping) else {}
            given = set(step.constants) | {
                key.partition(".")[2] for key in step.templates if key.startswith("arguments.")
            }
            for required in schema.get("required", ()):
                if required not in given:
                    raise ConfigError(
                        f"{where}: tool {step.tool!r} needs the argument {required!r}"
                    )

    async def aclose(self) -> None:
        for part in (self._agents, self._tools, self.llm):
            close = getattr(part, "aclose", None)
            if close is not None:
                await close()

    async def run(self, ctx: RequestContext) -> None:
        # What the whole flow would take, roughly: each LLM step reads about the prompt and
        # writes its default length (templates and earlier results make prompts longer: low).
        per_step = estimate_tokens(ctx.prompt) + self._llm_step_tokens
        ctx.usage.expect(self._llm_steps * per_step)
        values: dict[str, str] = {"prompt": ctx.prompt}
        for step in self.steps:
            values[step.name] = await self._run_step(ctx, step, values)

    async def _run_step(
        self, ctx: RequestContext, step: FlowStep, values: Mapping[str, str]
    ) -> str:
        text = {key: template.format_map(values) for key, template in step.templates.items()}
        if step.tools:
            return await self._answer_with_tools(ctx, step, text["prompt"])
        if step.kind in ("plan", "answer"):
            turns = [ChatMessage(role=Role.USER, content=text["prompt"])]
            answer = step.kind == "answer"
            completed: str = await self.llm.complete(ctx, turns, name=step.name, emit=answer)
            return completed
        if step.kind == "tool":
            arguments = dict(step.constants)
            arguments.update(
                (key.partition(".")[2], value)
                for key, value in text.items()
                if key.startswith("arguments.")
            )
            result = await self._tools.call(ctx, step.server, step.tool, arguments)
            return str(result.text)
        result = await self._agents.ask(ctx, step.agent, text["message"])
        return str(result.text)

    async def _answer_with_tools(self, ctx: RequestContext, step: FlowStep, prompt: str) -> str:
        """The model answers ``prompt`` and may call the step's tools itself: each round is an
        abortable LLM step (``answer``, ``answer-2``, ...) and each call a tool step; after
        ``max_rounds`` rounds of calls, one last round offers no tool, so it must answer."""
        functions = [self._functions[pair] for pair in step.tools]
        by_name = {
            f["function"]["name"]: pair for f, pair in zip(functions, step.tools, strict=True)
        }
        messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
        for round_ in range(step.max_rounds + 1):
            offered = functions if round_ < step.max_rounds else []
            name = step.name if round_ == 0 else f"{step.name}-{round_ + 1}"
            answer, calls = await self.llm.complete_with_tools(
                ctx, messages, offered, name=name, emit=True
            )
            if not calls:
                return str(answer)
            messages.append(
                {
                    "role": "assistant",
                    "content": answer or None,
                    "tool_calls": [
                        {
                            "id": call.id,
                            "type": "function",
                            "function": {"name": call.name, "arguments": call.arguments},
                        }
                        for call in calls
                    ],
                }
            )
            for call in calls:
                content = await self._call_chosen(ctx, by_name.get(call.name), call)
                messages.append({"role": "tool", "tool_call_id": call.id, "content": content})
        raise AssertionError("unreachable: the last round offers no tool")  # pragma: no cover

    async def _call_chosen(
        self, ctx: RequestContext, pair: tuple[str, str] | None, call: Any
    ) -> str:
        """Run a tool call the model chose; what the model got wrong (an unknown tool, bad
        arguments, the tool's own error) goes back to it as the result, so it can correct
        itself; a tool that times out or is down fails the request."""
        if pair is None:
            return f"error: there is no tool named {call.name!r}"
        try:
            arguments = json.loads(call.arguments or "{}")
        except ValueError:
            return "error: the arguments are not JSON"
        if not isinstance(arguments, dict):
            return "error: the arguments must be a JSON object"
        try:
            result = await self._tools.call(ctx, pair[0], pair[1], arguments)
        except BackendFailure as failure:
            if failure.code != "tool_error":
                raise
            return f"error: {failure.message}"
        return str(result.text)


def _function(server: str, tool: Any) -> dict[str, Any]:
    """An MCP tool as an OpenAI function definition (name ``server__tool``, within 64 of
    ``[A-Za-z0-9_-]``)."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", f"{server}__{tool.name}")[:64]
    schema = tool.input_schema if isinstance(tool.input_schema, Mapping) else {}
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": tool.description or tool.name,
            "parameters": dict(schema) or {"type": "object", "properties": {}},
        },
    }
