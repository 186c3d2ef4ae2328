"""MCP tool calls for backends: pooled sessions to the configured tool servers, typed
failures, and a cancel that reaches the tool server in MCP's own way.

A backend holds one :class:`MCPTools` (``MCPTools.from_config(config.tools)``), starts it in
its ``astart()`` and closes it in its ``aclose()``, and calls a tool inside a request::

    result = await tools.call(ctx, "search", "slow_search", {"query": ctx.prompt})
    await ctx.emit(result.text)

**One session per server, shared.** Each configured server gets one long-lived MCP session
(the SDK's :class:`mcp.Client`), owned by a supervisor task; every request's calls go over it
at once (MCP multiplexes requests on a session by JSON-RPC id). A stdio server is the process
the supervisor started; a streamable HTTP server is a URL. When the session ends (the process
exited, the HTTP server went away) the supervisor starts or connects again after a pause
(``restart_backoff_s``, doubled up to ``restart_backoff_max_s``); calls in flight fail
``tool_unavailable``, and so do calls made while it is down — they never wait for it.

**Lifecycle.** :meth:`MCPTools.astart` starts every server and waits until each has answered
its handshake (``connect_timeout_s``); one that cannot start stops the gateway's start with
:class:`ToolServerError`. :meth:`MCPTools.aclose` ends the sessions, stops the processes (the
SDK closes stdin, waits 2 s, then kills the process group) and leaves no task behind.

**A call is a step** (``ctx.tool_call``, kind ``tool``, named after the tool). Non-abortable by
default: a cancel lets the call finish, then the pipeline halts at the checkpoint after it. A
tool configured ``abortable`` is cancelled at once: the gateway cancels the call's task, and
the SDK (``mcp`` 2.3) tells the server before the task ends — on stdio, and on streamable HTTP
under the 2025-11-25 protocol, with ``notifications/cancelled`` naming the call's JSON-RPC
request id; on streamable HTTP under 2026-07-28 (the current spec: "closing the SSE response
stream is the cancellation signal") by aborting the request's POST. Its reason is rewritten to
say why (``"muxgate: request cancelled (client)"``); should an SDK not send the notification,
this module sends it itself.

**Failures** are :class:`ToolFailure` (a :class:`BackendFailure`), the request ends ``failed``:
``tool_error`` (an ``isError`` result, a JSON-RPC error such as an unknown tool, a result that
does not parse), ``tool_timeout`` (no answer within the tool's ``timeout_s``: the server is
told to cancel the call, as for an abortable cancel) and ``tool_unavailable`` (the server is
down, restarting, or went away mid-call). Messages name the server and the tool and quote at
most a short, single-line excerpt of the tool's own error text.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self

import anyio
import mcp_types as types
import structlog
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage
from pydantic import ValidationError

from protocol import ErrorCode

from ..pipeline import BackendFailure, RequestContext
from .settings import ServerSettings, ToolSettings, parse_tools

__all__ = [
    "ERROR_CODES",
    "MCPTools",
    "ToolFailure",
    "ToolResult",
    "ToolServer",
    "ToolServerError",
]

log = structlog.get_logger("muxgate.tools")

TOOL_ERROR: Final = ErrorCode.TOOL_ERROR
TOOL_TIMEOUT: Final = ErrorCode.TOOL_TIMEOUT
TOOL_UNAVAILABLE: Final = ErrorCode.TOOL_UNAVAILABLE

#: The codes of a request a tool call fails, and when.
ERROR_CODES: Final[Mapping[str, str]] = {
    TOOL_ERROR: "the tool reported an error (isError), the server answered a JSON-RPC error "
    "(e.g. an unknown tool), or its result did not parse",
    TOOL_TIMEOUT: "no answer within the tool's timeout_s (the server is told to cancel the call)",
    TOOL_UNAVAILABLE: "the tool server is down or restarting, or went away during the call",
}

#: How long telling a server of a cancel may take before the step ends anyway.
CANCEL_WRITE_TIMEOUT_S: Final = 1.0
#: Beyond a call's own timeout: the pipeline's last-resort bound on the step.
STEP_GRACE_S: Final = 2.0
#: Longest excerpt of a tool's own error text in a failure message.
EXCERPT_CHARS: Final = 200

_CONNECTION_CLOSED: Final = types.CONNECTION_CLOSED


class ToolFailure(BackendFailure):
    """A tool call's failure: the request ends ``failed`` with its code (SPEC.md §7.2)."""


class ToolServerError(RuntimeError):
    """A tool server could not be started or reached at start-up."""


@dataclass(frozen=True, slots=True)
class ToolResult:
    """What a tool answered (never an error: those raise :class:`ToolFailure`)."""

    server: str
    tool: str
    #: The MCP content blocks as the server sent them (text, images, resources...).
    content: tuple[types.ContentBlock, ...]
    #: ``structuredContent``, when the tool declares an output schema.
    structured: dict[str, Any] | None = None
    #: The JSON-RPC id the call had on its session (for logs and tests).
    request_id: types.RequestId | None = None

    @property
    def text(self) -> str:
        """The text blocks, joined by newlines."""
        return "\n".join(
            block.text for block in self.content if isinstance(block, types.TextContent)
        )


# -- one call's view of the wire -------------------------------------------------------------


@dataclass(slots=True)
class _CallSlot:
    """What the write tap learns of one call, in the call's own task (a context variable)."""

    reason: Callable[[], str]
    request_id: types.RequestId | None = None
    cancel_sent: bool = False


_CALL: contextvars.ContextVar[_CallSlot | None] = contextvars.ContextVar(
    "muxgate_mcp_call", default=None
)


class _StreamWrapper:
    """A stream of the SDK's, wrapped: closing and its context go to the inner stream."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> Self:
        await self._inner.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool | None:
        result: bool | None = await self._inner.__aexit__(exc_type, exc_val, exc_tb)
        return result


class _TappedWrite(_StreamWrapper):
    """The session's write stream, seen by the calling task: it learns the request id of its
    ``tools/call`` and whether a ``notifications/cancelled`` for it went out (with our reason).
    The SDK writes both from the caller's task, so the call's context variable is set."""

    async def send(self, item: SessionMessage, /) -> None:
        slot = _CALL.get()
        if slot is not None:
            message = item.message
            if isinstance(message, types.JSONRPCRequest) and message.method == "tools/call":
                slot.request_id = message.id
            elif (
                isinstance(message, types.JSONRPCNotification)
                and message.method == "notifications/cancelled"
                and message.params is not None
                and slot.request_id is not None
                and str(message.params.get("requestId")) == str(slot.request_id)
            ):
                slot.cancel_sent = True
                params = {**message.params, "reason": slot.reason()}
                item = SessionMessage(
                    message=message.model_copy(update={"params": params}), metadata=item.metadata
                )
        await self._inner.send(item)


class _WatchedRead(_StreamWrapper):
    """The session's read stream: its end (the server's stdout closed, the HTTP transport
    gave up) wakes the supervisor at once."""

    def __init__(self, inner: Any, on_end: Callable[[], None]) -> None:
        super().__init__(inner)
        self._on_end = on_end

    @property
    def last_context(self) -> contextvars.Context | None:
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> SessionMessage | Exception:
        try:
            item: SessionMessage | Exception = await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._on_end()
            raise
        return item

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None


class _Transport:
    """The SDK's stdio or streamable HTTP transport, with the tap and the watch."""

    def __init__(self, settings: ServerSettings, on_end: Callable[[], None]) -> None:
        if settings.command is not None:
            params = StdioServerParameters(
                command=settings.command[0],
                args=list(settings.command[1:]),
                env=dict(settings.env) or None,
                cwd=settings.cwd,
            )
            self._inner: contextlib.AbstractAsyncContextManager[Any] = stdio_client(params)
        else:
            assert settings.url is not None
            self._inner = streamable_http_client(settings.url)
        self._on_end = on_end

    async def __aenter__(self) -> tuple[Any, Any]:
        read, write = await self._inner.__aenter__()
        return _WatchedRead(read, self._on_end), _TappedWrite(write)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool | None:
        return await self._inner.__aexit__(exc_type, exc_val, exc_tb)


# -- one server ------------------------------------------------------------------------------


@dataclass(eq=False)
class ToolServer:
    """One configured server: its session, the supervisor task that keeps it up."""

    settings: ServerSettings
    #: Sessions started so far (1 after the first start; more after restarts).
    starts: int = 0
    #: Why the last session ended or the last start failed (safe to show: no internals).
    last_error: str | None = None
    _client: Client | None = field(default=None, repr=False)
    _task: asyncio.Task[None] | None = field(default=None, repr=False)
    _stopping: bool = field(default=False, repr=False)
    _wake: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _up: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _down: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _attempted: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def ready(self) -> bool:
        return self._client is not None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._supervise(), name=f"muxgate-tools-{self.name}")

    async def wait_ready(self) -> None:
        """Return once a session is up (bound it with ``asyncio.timeout``)."""
        await self._up.wait()

    async def wait_down(self) -> None:
        """Return once no session is up (it ended, or the server is restarting)."""
        await self._down.wait()

    async def aclose(self) -> None:
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is None:
            return
        # The supervisor leaves its session itself (the SDK's context managers must exit in
        # the task that entered them); bounded: the stdio shutdown takes at most ~6 s.
        done, _ = await asyncio.wait({task}, timeout=10.0)
        if not done:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    def client(self) -> Client:
        client = self._client
        if client is None:
            why = f" ({self.last_error})" if self.last_error else ""
            raise ToolFailure(
                TOOL_UNAVAILABLE, f"tool server {self.name!r} is unavailable, restarting{why}"
            )
        return client

    def _ended(self) -> None:
        self._wake.set()

    async def _supervise(self) -> None:
        settings = self.settings
        failures = 0
        while not self._stopping:
            self._wake = asyncio.Event()
            up_since: float | None = None
            try:
                client = Client(
                    _Transport(settings, self._ended),
                    mode=settings.mode,
                    cache=None,
                    client_info=types.Implementation(name="muxgate", version="1"),
                )
                async with contextlib.AsyncExitStack() as stack:
                    async with asyncio.timeout(settings.connect_timeout_s):
                        await stack.enter_async_context(client)
                    self.starts += 1
                    self._client = client
                    up_since = time.monotonic()
                    self._down.clear()
                    self._up.set()
                    self._attempted.set()
                    log.info(
                        "tools.server_up",
                        server=self.name,
                        transport=settings.transport,
                        protocol=client.protocol_version,
                        starts=self.starts,
                    )
                    await self._wake.wait()
                    self._client = None
                    self._up.clear()
                    self._down.set()
                if not self._stopping:
                    self.last_error = "the session ended"
            except Exception as exc:  # a start that failed, or a session that broke
                self.last_error = _describe(exc)
            finally:
                self._client = None
                self._up.clear()
                self._down.set()
            self._attempted.set()
            if self._stopping:
                break
            if (
                up_since is not None
                and time.monotonic() - up_since >= settings.restart_backoff_max_s
            ):
                failures = 0  # it had been up a while: not a crash loop
            delay = min(settings.restart_backoff_max_s, settings.restart_backoff_s * 2**failures)
            failures += 1
            log.warning(
                "tools.server_down",
                server=self.name,
                transport=settings.transport,
                error=self.last_error,
                retry_in_s=round(delay, 3),
            )
            self._wake = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
        log.info("tools.server_closed", server=self.name)


def _describe(exc: BaseException) -> str:
    """A short, safe description of why a session failed (no URLs' credentials, no trace)."""
    if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        return _describe(exc.exceptions[0])
    if isinstance(exc, TimeoutError):
        return "no answer to the handshake in time"
    if isinstance(exc, OSError):
        return f"could not start or reach it ({type(exc).__name__})"
    return type(exc).__name__


def _excerpt(text: str) -> str:
    text = re.sub(r"\s+", " ", "".join(ch for ch in text if ch.isprintable() or ch.isspace()))
    text = text.strip()
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 1] + "…"


# -- the client backends use -----------------------------------------------------------------


class MCPTools:
    """The configured MCP tool servers, and calls to their tools as pipeline steps."""

    def __init__(self, servers: Mapping[str, ServerSettings]) -> None:
        self._servers = {name: ToolServer(settings) for name, settings in servers.items()}

    @classmethod
    def from_config(cls, tools: Mapping[str, Any]) -> MCPTools:
        """From ``Config.tools`` (checked already) or raw ``[tools.NAME]`` tables (checked
        here: ValueError naming the bad key)."""
        return cls(parse_tools(tools))

    @property
    def servers(self) -> Mapping[str, ToolServer]:
        return self._servers

    def server(self, name: str) -> ToolServer:
        try:
            return self._servers[name]
        except KeyError:
            known = ", ".join(repr(n) for n in self._servers) or "none"
            raise KeyError(f"no tool server {name!r} is configured (configured: {known})") from None

    def settings(self, server: str, tool: str) -> ToolSettings:
        return self.server(server).settings.tool(tool)

    async def astart(self) -> None:
        """Start every server; return once each has a session. A server that does not come
        up within its ``connect_timeout_s`` stops the start (ToolServerError)."""
        for server in self._servers.values():
            server.start()
        try:
            for server in self._servers.values():
                await server._attempted.wait()
                if not server.ready:
                    raise ToolServerError(
                        f"tool server {server.name!r} ({server.settings.transport}) did not "
                        f"start: {server.last_error}"
                    )
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """End every session and stop every server process; no task is left."""
        await asyncio.gather(*(server.aclose() for server in self._servers.values()))

    async def __aenter__(self) -> Self:
        await self.astart()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def call(
        self,
        ctx: RequestContext,
        server: str,
        tool: str,
        arguments: Mapping[str, Any] | None = None,
    ) -> ToolResult:
        """Call ``tool`` on ``server`` as one step of ``ctx``'s pipeline (a checkpoint before
        and after). Abortable or not, and its timeout, as configured. Raises
        :class:`ToolFailure` (``tool_error``, ``tool_timeout``, ``tool_unavailable``) or
        :class:`PipelineHalted` (cancelled: before it started, after it ended, or — abortable
        — mid-way, the server told)."""
        settings = self.settings(server, tool)
        target = self.server(server)

        def reason() -> str:
            if ctx.cancelled:
                return f"muxgate: request cancelled ({ctx.cancel_reason})"
            return f"muxgate: no answer within {settings.timeout_s:g} s"

        async def operation() -> ToolResult:
            return await self._invoke(target, tool, dict(arguments or {}), settings, reason)

        try:
            return await ctx.tool_call(
                operation,
                name=tool,
                abortable=settings.abortable,
                give_up_after=settings.timeout_s + STEP_GRACE_S,
            )
        except ToolFailure:
            raise
        except BackendFailure as exc:
            if exc.code != ErrorCode.BACKEND_ERROR:
                raise
            # The pipeline's own bound on the step (the call did not end even after its own
            # timeout told the server to cancel): a timeout of the tool all the same.
            raise ToolFailure(TOOL_TIMEOUT, _timeout_message(server, tool, settings)) from None

    async def call_tool(
        self,
        server: str,
        tool: str,
        arguments: Mapping[str, Any] | None = None,
    ) -> ToolResult:
        """The same call outside a request (no step, no cancel): for start-up checks,
        scripts and tests."""
        settings = self.settings(server, tool)
        return await self._invoke(
            self.server(server),
            tool,
            dict(arguments or {}),
            settings,
            lambda: f"muxgate: no answer within {settings.timeout_s:g} s",
        )

    async def _invoke(
        self,
        server: ToolServer,
        tool: str,
        arguments: dict[str, Any],
        settings: ToolSettings,
        reason: Callable[[], str],
    ) -> ToolResult:
        client = server.client()
        slot = _CallSlot(reason)
        token = _CALL.set(slot)
        budget = asyncio.timeout(settings.timeout_s)
        try:
            async with budget:
                result = await client.call_tool(tool, arguments)
        except asyncio.CancelledError:
            # Aborted (an abortable tool's cancel, or the timeout below): the SDK has told the
            # server already, in the caller's task, before this point; if it did not, do it.
            if slot.request_id is not None and not slot.cancel_sent and server.ready:
                await _send_cancel(client, slot)
            raise
        except TimeoutError:
            if not budget.expired():
                raise ToolFailure(TOOL_ERROR, f"tool {tool!r} on {server.name!r} failed") from None
            if slot.request_id is not None and not slot.cancel_sent and server.ready:
                await _send_cancel(client, slot)
            raise ToolFailure(TOOL_TIMEOUT, _timeout_message(server.name, tool, settings)) from None
        except MCPError as exc:
            if exc.code == _CONNECTION_CLOSED:
                raise ToolFailure(
                    TOOL_UNAVAILABLE,
                    f"tool server {server.name!r} went away during {tool!r}; it is restarting",
                ) from None
            raise ToolFailure(
                TOOL_ERROR,
                f"tool {tool!r} on {server.name!r}: error {exc.code}: {_excerpt(exc.message)}",
            ) from None
        except ValidationError:
            raise ToolFailure(
                TOOL_ERROR,
                f"tool {tool!r} on {server.name!r} answered a result that does not parse",
            ) from None
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            raise ToolFailure(
                TOOL_UNAVAILABLE, f"tool server {server.name!r} went away during {tool!r}"
            ) from None
        except RuntimeError as exc:  # e.g. an input-required answer a tool step cannot give
            raise ToolFailure(
                TOOL_ERROR, f"tool {tool!r} on {server.name!r}: {_excerpt(str(exc))}"
            ) from None
        finally:
            _CALL.reset(token)
            # The timeout holds this task: a traceback that keeps this frame (the task's own
            # CancelledError, an abortable call cancelled) would make a reference cycle of it.
            del budget
        if result.is_error:
            text = "\n".join(b.text for b in result.content if isinstance(b, types.TextContent))
            detail = f": {_excerpt(text)}" if text.strip() else ""
            raise ToolFailure(TOOL_ERROR, f"tool {tool!r} on {server.name!r} failed{detail}")
        return ToolResult(
            server=server.name,
            tool=tool,
            content=tuple(result.content),
            structured=result.structured_content,
            request_id=slot.request_id,
        )


def _timeout_message(server: str, tool: str, settings: ToolSettings) -> str:
    return f"tool {tool!r} on {server!r} did not answer within {settings.timeout_s:g} s"


async def _send_cancel(client: Client, slot: _CallSlot) -> None:
    """``notifications/cancelled`` for the call, bounded (the SDK normally sent it already)."""
    assert slot.request_id is not None
    notification = types.CancelledNotification(
        params=types.CancelledNotificationParams(request_id=slot.request_id, reason=slot.reason())
    )
    slot.cancel_sent = True
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CANCEL_WRITE_TIMEOUT_S):
            await client.session.send_notification(notification)
