"""Backend ``openai``: a real model behind the gateway, through any OpenAI-compatible server
(vLLM, llama.cpp's llama-server, Ollama, OpenAI), and a cancel that stops its generation.

Each chat becomes one ``POST {base_url}/chat/completions`` with ``"stream": true`` and
``"stream_options": {"include_usage": true}``; the answer's server-sent events
(``data: {json}`` lines, then ``data: [DONE]``) are parsed as they arrive and every
``choices[0].delta.content`` piece goes through :meth:`RequestContext.stream_llm`, so every
token is a checkpoint.

**Why a cancel reaches the model server at once.** A model server stops generating when it sees
its client disconnect, so a cancel must close the upstream connection, and close it in the loop
turn that reads the cancel: under load a loop turn is a millisecond of tokens generated and paid
for. With httpx the streamed response exposes its connection (``response.extensions
["network_stream"]``, then ``.get_extra_info("socket")``), and the cancel token's callback
(:meth:`CancelSignal.on_cancel`, run synchronously inside the gateway's cancel) shuts that socket
down with ``shutdown(SHUT_RDWR)``: the FIN leaves before any await, before the cancelled response
is even written. On httpx's default transport (httpcore on anyio, on the asyncio or uvloop loop)
the socket is the transport's own: asyncio's ``TransportSocket`` accepts ``shutdown``; uvloop's
``PseudoSocket`` refuses it, so the shutdown goes through a duplicate of its descriptor
(``shutdown`` acts on the connection, not on the descriptor). The ``openai`` package hides the
connection behind its own iterator: closing it needs ``await stream.close()``, i.e. a later loop
turn, after the reader task has been woken with its cancellation. Before the response headers
arrive the connection is not reachable through httpx's API; a cancel then cancels the read and
httpcore closes the connection when the reading task next runs (a loop turn later).

**The pool.** One ``httpx.AsyncClient`` per backend (and event loop), created on first use, HTTP/1.1
only (on HTTP/2 one socket carries many requests: cutting it would cut them all), at most
``max_concurrency`` connections. A response whose body was cut never goes back to the pool: the
cut happens only while the body is unread (the callback checks ``response.is_closed``, which httpx
sets before it hands a connection back), and httpcore closes a connection whose response was
closed before its end; an idle pooled connection whose socket reads EOF counts as expired too.

**Bounded concurrency.** A FIFO line of ``max_concurrency`` upstream calls per backend. A request
waits for its turn at most until just before its deadline (``ctx.deadline``; then it fails
``upstream_busy``); a cancel while it waits ends the wait at once, and nothing is sent upstream.
The upstream call itself is a ``stream_llm`` step: it is recorded in ``ctx.steps`` only when it
really starts, never after the cancel flag (G5).

**Failures** are :class:`UpstreamFailure` (a :class:`BackendFailure`): the request fails with
one of the codes below and a message safe to show (no key, no upstream body beyond a short
sanitized excerpt of its error message); the other requests never notice. A call that failed
``upstream_unavailable``, ``upstream_rate_limited`` or ``upstream_error`` before its first token
is made again up to ``retries`` times, after a short backoff (doubling each time); never after a
first token (the client would get the text twice).

**Usage.** Until the provider says otherwise: the prompt estimate (about four characters a
token, :func:`estimate_tokens`) as input, one output token per content delta (llama.cpp sends
one token per delta). The final usage chunk's ``prompt_tokens`` and ``completion_tokens``
replace those estimates (:meth:`UsageMeter.report`). A call the upstream refused (no connection,
an HTTP error status) consumed nothing. ``expect`` is the prompt estimate plus ``max_tokens``.
``usage.estimated`` (SPEC.md §3.8) lists ``input_tokens`` and ``output_tokens`` unless every
call's usage chunk arrived (a stream cut by a cancel, or an upstream that sends no usage, leaves
them estimated), and ``saved_tokens`` whenever it is non-zero.

**A cut stream, counted with the model's tokenizer** (option ``tokenize``). A call cut (by a
cancel, or by a failure mid-answer) after its first content piece but before its usage chunk
never gets the provider's figures. When the upstream offers its tokenizer over HTTP, the call is
then counted with it instead of the estimates:

- ``tokenize=llama.cpp`` (llama-server; backend ``llama`` sets it). The prompt: ``POST
  /apply-template {"messages"}`` (the server's own chat template), then ``POST /tokenize
  {"content", "add_special": true, "parse_special": true}``: what llama-server feeds the model
  for the chat, its BOS included (measured: its own ``prompt_tokens`` for 22 chats out of 22,
  system and earlier turns included, where the 4-characters estimate was off by -20 to +53
  tokens, e.g. 5 for 14). The output stays the pieces received:
  llama-server streams one token per content delta (a token that ends mid-character goes with
  the next), so that is already the count of the tokens received, and a better one than the
  tokenizer's count of their text, which splits text its canonical way, not the way the model
  sampled it (measured on 54 answers of 60-100 tokens: the pieces equalled the server's
  ``completion_tokens`` 54 times; the text's tokens 51 times, and were off by +3, -5 and +17).
- ``tokenize=vllm``: the prompt is ``POST /tokenize {"model", "messages",
  "add_generation_prompt": true}`` (vLLM renders a chat's prompt so); the output is ``POST
  /tokenize {"model", "prompt", "add_special_tokens": false}`` of the text received, at least the
  pieces received: vLLM may send several tokens in one delta (``--stream-interval``, speculative
  decoding), and every delta carries at least one.
- ``tokenize=off``, the default: the estimates stay. OpenAI's API has no tokenizer endpoint, and
  the two dialects differ, so nothing is probed: the endpoints are used only when named.

The endpoints are at the server's root: ``base_url`` without a trailing ``/v1``. The prompt's
count is exact (the tokens the model was fed, under its chat template): ``input_tokens`` is then
no longer listed in ``usage.estimated`` for that call. The output stays listed as an estimate,
whichever way it was counted: the model may have generated a token or two that never arrived (in
flight when the connection was cut, or control tokens that render as no text). A call cut
before its first piece is left at the estimates: nothing proves the prompt was processed (a
server stops mid-prompt when it sees the disconnect), and nothing was received.

The count runs once per cut call, after the cut, off the streaming path: the cancelled
``response`` has gone out already (its figures ``final: false``), and the count's figures go out
in the ``usage`` message that follows it once the pipeline halts (a failed call's count is in
its ``failed`` response). Its requests go one after the other on one connection (the cut one
has left the pool, and the call keeps its place in the line until the count is done, so the
pool always has room for it) and take at most ``tokenize_timeout_s`` (1 s) in all: on any error,
an unexpected answer or the timeout, the estimates stay as they were and the gateway logs it (a
warning the first time, debug after).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib
import logging
import math
import os
import re
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, cast

import orjson
import structlog

try:
    import httpx
except ModuleNotFoundError as exc:  # the optional extra is not installed
    raise ModuleNotFoundError(
        "muxgate backend 'openai' needs httpx, which comes with muxgate's 'upstream' extra: "
        "pip install 'muxgate[upstream]'",
        name=exc.name,
    ) from exc

from protocol import ChatMessage, ErrorCode

from ..cancellation import CancelSignal
from ..config import ConfigError
from ..pipeline import (
    BackendFailure,
    BackendInfo,
    InvalidRequest,
    PipelineHalted,
    RequestContext,
    Setting,
    UsageMeter,
)
from .simulated import estimate_tokens

__all__ = ["ERROR_CODES", "OPTIONS", "TOKENIZERS", "OpenAIBackend", "UpstreamFailure"]

log = structlog.get_logger("muxgate.openai")

UPSTREAM_UNAVAILABLE: Final = ErrorCode.UPSTREAM_UNAVAILABLE
UPSTREAM_RATE_LIMITED: Final = ErrorCode.UPSTREAM_RATE_LIMITED
UPSTREAM_REJECTED: Final = ErrorCode.UPSTREAM_REJECTED
UPSTREAM_ERROR: Final = ErrorCode.UPSTREAM_ERROR
UPSTREAM_TIMEOUT: Final = ErrorCode.UPSTREAM_TIMEOUT
UPSTREAM_BAD_RESPONSE: Final = ErrorCode.UPSTREAM_BAD_RESPONSE
UPSTREAM_DISCONNECTED: Final = ErrorCode.UPSTREAM_DISCONNECTED
UPSTREAM_BUSY: Final = ErrorCode.UPSTREAM_BUSY

#: The codes of a request this backend fails, and when.
ERROR_CODES: Final[Mapping[str, str]] = {
    UPSTREAM_UNAVAILABLE: "no connection to the upstream (refused, unreachable, connect timeout), "
    "or it closed the connection without answering",
    UPSTREAM_RATE_LIMITED: "the upstream answered HTTP 429",
    UPSTREAM_REJECTED: "the upstream answered another 4xx (the message says which)",
    UPSTREAM_ERROR: "the upstream answered 5xx, or reported an error in its stream",
    UPSTREAM_TIMEOUT: "no token from the upstream for stall_timeout_s",
    UPSTREAM_BAD_RESPONSE: "a stream line that is not server-sent events of chat completion chunks",
    UPSTREAM_DISCONNECTED: "the connection dropped mid-answer (before [DONE] or a finish reason)",
    UPSTREAM_BUSY: "all max_concurrency upstream calls stayed busy until the request's deadline",
}

#: The backend's options (``--backend-option KEY=VALUE``, ``[backend_options]``, or
#: ``MUXGATE_BACKEND_OPTIONS``) and what they mean.
OPTIONS: Final[Mapping[str, str]] = {
    "base_url": "required: the server's OpenAI API root, e.g. http://127.0.0.1:8080/v1",
    "model": "required: the model name sent in each request",
    "api_key_env": "the NAME of the environment variable holding the API key "
    "(default OPENAI_API_KEY; unset or empty: no Authorization header)",
    "max_concurrency": "upstream calls at once; more wait in line (default 8)",
    "stall_timeout_s": "no token for this long fails the request upstream_timeout (default 30)",
    "connect_timeout_s": "TCP (and TLS) connect timeout (default 5)",
    "retries": "new attempts of a call that failed before its first token (default 1)",
    "retry_backoff_s": "pause before the first retry, doubled each time (default 0.25)",
    "max_tokens": "the largest max_tokens a chat may ask for, and the default (default 1024)",
    "min_temperature": "the lowest temperature a chat may ask for (default 0)",
    "max_temperature": "the highest temperature a chat may ask for (default 2)",
    "tokenize": "count a stream cut before its usage arrived with the upstream's tokenizer: "
    "off (default), llama.cpp (POST /apply-template and /tokenize) or vllm (POST /tokenize), "
    "at base_url's root (without a trailing /v1)",
    "tokenize_timeout_s": "the longest that count may take, in all; past it, or on any error, "
    "the estimates stay (default 1)",
}

#: The values of option ``tokenize``: no count, or the dialect of the upstream's tokenizer.
TOKENIZERS: Final = ("off", "llama.cpp", "vllm")

#: A request still waiting for its turn this long before its deadline gives up (upstream_busy):
#: a call started then would only be cut by the timeout, and the request's own timeout must not
#: win the race (it would answer ``cancelled``/``timeout`` instead of saying why).
BUSY_MARGIN_S: Final = 0.05
#: After ``data: [DONE]``: how long to wait for the end of the body, so that the connection can
#: go back to the pool (it normally comes with [DONE]); past that the connection is closed.
DRAIN_S: Final = 0.5
#: The longest stream line accepted (a chunk is a few hundred bytes).
MAX_LINE_BYTES: Final = 1 << 20
#: Most tool calls the model may ask for in one answer.
MAX_TOOL_CALLS: Final = 16
#: How much of an error answer's body is read for its message, and how much of that is shown.
ERROR_BODY_BYTES: Final = 4096
EXCERPT_CHARS: Final = 200

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: Things that look like credentials in an upstream's error message (OpenAI quotes a masked key).
_KEY_LIKE = re.compile(r"(?i)\b(?:sk|pk|rk|key)-[A-Za-z0-9_*.\-]{4,}|\bbearer\s+\S+")
_SSE_FIELDS = (b"event", b"id", b"retry")

# httpx logs every request at info ("HTTP Request: POST ..."): the gateway logs one line per
# request already. Left alone when someone configured that logger.
_httpx_log = logging.getLogger("httpx")
if _httpx_log.level == logging.NOTSET:
    _httpx_log.setLevel(logging.WARNING)


def _preload() -> ssl.SSLContext:
    """Load now what httpx, httpcore and anyio would load on the first request, inside the
    event loop: modules imported lazily (httpcore ~70 ms, anyio's asyncio backend ~30 ms) and
    the TLS context's CA bundle (~25 ms). At start-up the pause stalls no stream; on the first
    request it would stall every stream's tokens and cancels (measured: ~110 ms, ~1 ms after)."""
    importlib.import_module("httpcore")
    with contextlib.suppress(ImportError):  # a private module: best effort
        importlib.import_module("anyio._backends._asyncio")
    return httpx.create_ssl_context()


class UpstreamFailure(BackendFailure):
    """A failure of the upstream call: ``code`` is one of :data:`ERROR_CODES`; ``retryable``
    when the same call may be made again (only before its first token)."""

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(code, message)
        self.retryable = retryable


# -- options ----------------------------------------------------------------------------------

_JSON_NAMES: Final[dict[type, str]] = {str: "a string", list: "an array", dict: "an object"}


def _shown(value: object) -> str:
    """A value as an error message may show it: numbers and booleans, else only the type."""
    if type(value) is bool or value is None:
        return repr(value)
    if type(value) is int:
        return str(value) if abs(value) < 10**15 else "a larger integer"
    if type(value) is float:
        return repr(value)
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _bad_option(name: str, what: str, value: object) -> ConfigError:
    return ConfigError(f"backend 'openai' option {name!r} must be {what}, got {_shown(value)}")


def _int_option(name: str, value: object, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:  # bool is not an int here
        raise _bad_option(name, f"an integer in {low}..{high}", value)
    return value


def _number_option(name: str, value: object, *, low: float, high: float, positive: bool) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):  # type: ignore[arg-type]
        raise _bad_option(name, "a number", value)
    number = float(value)  # type: ignore[arg-type]
    if not low <= number <= high or (positive and number <= 0):
        rule = f"a number > 0 and <= {high:g}" if positive else f"a number in {low:g}..{high:g}"
        raise _bad_option(name, rule, value)
    return number


def _base_url(value: object) -> str:
    if type(value) is not str or not value.strip():
        raise _bad_option("base_url", "a URL such as http://127.0.0.1:8080/v1", value)
    try:
        url = httpx.URL(value.strip())
    except (httpx.InvalidURL, TypeError, ValueError):
        raise ConfigError("backend 'openai' option 'base_url' is not a valid URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(
            "backend 'openai' option 'base_url' must be an http:// or https:// URL with a host, "
            "such as http://127.0.0.1:8080/v1"
        )
    if url.query or url.fragment:
        raise ConfigError("backend 'openai' option 'base_url' must have no query or fragment")
    return str(url).rstrip("/")


# -- metadata ---------------------------------------------------------------------------------


def _metadata_shown(value: object) -> str:
    """What a refused metadata value was, in JSON's words (never the value of a string)."""
    if type(value) is bool:
        return "a boolean"
    if value is None:
        return "null"
    if type(value) in (int, float):
        return _shown(value)
    return _JSON_NAMES.get(type(value), "another type")


# -- the line of waiting requests -------------------------------------------------------------

_GRANTED: Final = "granted"
_CANCELLED: Final = "cancelled"
_EXPIRED: Final = "expired"


class _Gate:
    """At most ``size`` upstream calls at once; the others wait in line, first come first
    served. A wait ends at once on a cancel or at its deadline. Only pending waiters are ever in
    the line, so a free slot with an empty line is taken without waiting."""

    __slots__ = ("_free", "_waiters")

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiters: collections.deque[asyncio.Future[str]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, token: CancelSignal, give_up_at: float | None) -> str:
        """``"granted"`` (a slot is held: :meth:`release` it), ``"cancelled"`` or ``"expired"``."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return _GRANTED
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[str] = loop.create_future()
        self._waiters.append(waiter)
        unregister = token.on_cancel(partial(self._resolve, waiter, _CANCELLED))
        timer = None
        if give_up_at is not None:
            timer = loop.call_at(give_up_at, self._resolve, waiter, _EXPIRED)
        try:
            return await waiter
        except asyncio.CancelledError:  # the task itself was cancelled (shutdown, last resort)
            if waiter.cancelled():
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            elif waiter.result() == _GRANTED:
                self.release()
            raise
        finally:
            unregister()
            if timer is not None:
                timer.cancel()

    def _resolve(self, waiter: asyncio.Future[str], outcome: str) -> None:
        if not waiter.done():
            waiter.set_result(outcome)
            self._waiters.remove(waiter)

    def release(self) -> None:
        """Give the slot to the first in line, or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(_GRANTED)
                return
        self._free += 1


async def _pause(token: CancelSignal, delay: float) -> None:
    """Sleep ``delay`` seconds; a cancel ends the sleep at once."""
    loop = asyncio.get_running_loop()
    wake: asyncio.Future[None] = loop.create_future()

    def done() -> None:
        if not wake.done():
            wake.set_result(None)

    timer = loop.call_later(delay, done)
    unregister = token.on_cancel(done)
    try:
        await wake
    finally:
        timer.cancel()
        unregister()


# -- one upstream call ------------------------------------------------------------------------


def _shutdown(sock: Any) -> None:
    """``shutdown(SHUT_RDWR)`` a transport's socket now: a FIN to the peer, EOF to our reader."""
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
        return
    except OSError:
        return  # not connected any more: nothing to cut
    except (TypeError, AttributeError, NotImplementedError):
        pass  # uvloop's PseudoSocket refuses shutdown(): use a duplicate of its descriptor
    fd = os.dup(sock.fileno())
    try:
        duplicate = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        return
    with duplicate, contextlib.suppress(OSError):
        duplicate.shutdown(socket.SHUT_RDWR)


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A tool call the model asked for: its id (for the ``tool`` message that answers it), the
    function's name, and its arguments as the model wrote them (a JSON text, not checked)."""

    id: str
    name: str
    arguments: str


class _Call:
    """One upstream call: what a cancel needs to cut it, and what it produced."""

    __slots__ = ("parts", "pieces", "reported", "response", "tool_calls")

    def __init__(self) -> None:
        #: Tool calls streamed so far, by their index: [id, name, argument fragments...].
        self.tool_calls: dict[int, list[str]] | None = None
        self.response: httpx.Response | None = None
        #: Content deltas received (and passed on).
        self.pieces = 0
        #: Their text (the same strings the pipeline holds): what a cut call's count tokenizes.
        self.parts: list[str] = []
        #: Whether the provider's usage chunk arrived (then there is nothing to count).
        self.reported = False

    def add_tool_call_deltas(self, deltas: object) -> None:
        """Accumulate ``delta.tool_calls`` fragments (OpenAI streams a call's id and name first,
        then its arguments in pieces, each fragment tagged with the call's ``index``)."""
        if type(deltas) is not list:
            raise _bad("delta tool_calls that are not a list")
        calls = self.tool_calls
        if calls is None:
            calls = self.tool_calls = {}
        for delta in deltas:
            if type(delta) is not dict or type(delta.get("index", 0)) is not int:
                raise _bad("a tool call delta that is not an object with an index")
            if len(calls) >= MAX_TOOL_CALLS and delta.get("index", 0) not in calls:
                raise _bad(f"more than {MAX_TOOL_CALLS} tool calls in one answer")
            entry = calls.setdefault(delta.get("index", 0), ["", ""])
            function = delta.get("function") or {}
            if type(function) is not dict:
                raise _bad("a tool call function that is not an object")
            for slot, value in ((0, delta.get("id")), (1, function.get("name"))):
                if value is not None:
                    if type(value) is not str:
                        raise _bad("a tool call id or name that is not a string")
                    entry[slot] = entry[slot] or value
            arguments = function.get("arguments")
            if arguments is not None:
                if type(arguments) is not str:
                    raise _bad("tool call arguments that are not a string")
                entry.append(arguments)
                if sum(map(len, entry)) > MAX_LINE_BYTES:
                    raise _bad(f"tool call arguments longer than {MAX_LINE_BYTES} bytes")

    def finished_tool_calls(self) -> list[ToolCall]:
        if not self.tool_calls:
            return []
        return [
            ToolCall(id=entry[0] or f"call_{index}", name=entry[1], arguments="".join(entry[2:]))
            for index, entry in sorted(self.tool_calls.items())
        ]

    def cut(self) -> None:
        """The cancel token's callback: runs synchronously in the loop turn that reads the
        cancel. Shuts the upstream socket down unless the body was read to its end (then httpx
        has closed the response and the connection is back in the pool, or on its way)."""
        response = self.response
        if response is None or response.is_closed:
            return
        try:
            stream = response.extensions.get("network_stream")
            _shutdown(stream.get_extra_info("socket") if stream is not None else None)
        except Exception:  # never let a failed cut break the cancel; httpcore closes it anyway
            return


# -- counting a cut call with the upstream's tokenizer ------------------------------------------


class _NoCount(Exception):
    """The tokenizer endpoint gave no usable count (an error status, an unexpected body)."""


async def _post_json(
    client: httpx.AsyncClient, root: str, path: str, body: Mapping[str, Any]
) -> dict[str, Any]:
    """POST ``body`` to ``root + path``; the JSON object answered, else :class:`_NoCount`
    (whose message names the path, never the URL: it may carry credentials). Sent again once if
    the connection failed without a timeout: a pooled keep-alive connection may have been closed
    by the server as it was reused (seen with llama-server), and counting changes nothing."""
    content = orjson.dumps(body)
    headers = {"Accept": "application/json"}
    try:
        response = await client.post(root + path, content=content, headers=headers)
    except httpx.TimeoutException:
        raise
    except httpx.TransportError:
        response = await client.post(root + path, content=content, headers=headers)
    if response.status_code != 200:
        raise _NoCount(f"HTTP {response.status_code} from {path}")
    try:
        answer = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        raise _NoCount(f"not JSON from {path}") from None
    if type(answer) is not dict:
        raise _NoCount(f"not a JSON object from {path}")
    return cast(dict[str, Any], answer)


class _Tokenizer:
    """The upstream's tokenizer endpoints, in one of the dialects of :data:`TOKENIZERS`."""

    __slots__ = ("dialect", "model", "root")

    def __init__(self, dialect: str, base_url: str, model: str) -> None:
        self.dialect = dialect
        self.model = model
        self.root = base_url.removesuffix("/v1")

    async def prompt(self, client: httpx.AsyncClient, messages: list[dict[str, str]]) -> int:
        """The tokens the model is fed for ``messages`` under the server's chat template."""
        if self.dialect == "vllm":
            return await self._vllm(client, {"messages": messages, "add_generation_prompt": True})
        prompt = await _post_json(client, self.root, "/apply-template", {"messages": messages})
        if type(prompt.get("prompt")) is not str:
            raise _NoCount("no prompt from /apply-template")
        # As llama-server tokenizes a chat's prompt: its BOS, and special tokens parsed.
        body = {"content": prompt["prompt"], "add_special": True, "parse_special": True}
        return await self._llama(client, body)

    async def output(self, client: httpx.AsyncClient, call: _Call) -> int | None:
        """The output tokens of a cut call, or None to keep the pieces received (llama.cpp: one
        token per delta)."""
        if self.dialect != "vllm":
            return None
        body = {"prompt": "".join(call.parts), "add_special_tokens": False}
        return max(call.pieces, await self._vllm(client, body))

    async def _llama(self, client: httpx.AsyncClient, body: Mapping[str, Any]) -> int:
        tokens = (await _post_json(client, self.root, "/tokenize", body)).get("tokens")
        if type(tokens) is not list:
            raise _NoCount("no token list from /tokenize")
        return len(tokens)

    async def _vllm(self, client: httpx.AsyncClient, body: Mapping[str, Any]) -> int:
        answer = await _post_json(client, self.root, "/tokenize", {"model": self.model, **body})
        count = answer.get("count")
        if type(count) is not int or count < 0:
            raise _NoCount("no count from /tokenize")
        return count


def _recount(usage: UsageMeter, *, input_tokens: int, output_tokens: int | None) -> None:
    """Put the tokenizer's counts of the latest (cut) call in place of its estimates: the prompt
    as an exact figure, the output (None or 0: left as it is) still an estimate (see the module).
    """
    usage.report(input_tokens=input_tokens)
    if output_tokens:
        usage.report(output_tokens=output_tokens, output_estimated=True)


def _sanitize(text: str, secret: str | None) -> str:
    if secret:
        text = text.replace(secret, "[redacted]")
    text = _KEY_LIKE.sub("[redacted]", text)
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    if len(text) > EXCERPT_CHARS:
        text = text[: EXCERPT_CHARS - 1] + "…"
    return text


def _error_message(body: bytes) -> str | None:
    """The message of an OpenAI-style error body (``{"error": {"message": ...}}`` and the usual
    variants), or None: an HTML page or anything else is never quoted."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    error = data.get("error", data)
    if isinstance(error, str):
        return error
    if isinstance(error, dict):
        for key in ("message", "detail", "error"):
            value = error.get(key)
            if isinstance(value, str):
                return value
    return None


def _bad(what: str) -> UpstreamFailure:
    return UpstreamFailure(UPSTREAM_BAD_RESPONSE, f"the upstream sent {what}")


# -- the backend ------------------------------------------------------------------------------


class OpenAIBackend:
    """Streams each chat from an OpenAI-compatible ``/chat/completions`` endpoint.

    Options (:data:`OPTIONS`) are checked here: an unknown name or a bad value raises
    :class:`ConfigError` naming it, at start-up. The API key is read once from the environment
    variable named by ``api_key_env``; it goes nowhere but the Authorization header.
    """

    name: Final = "openai"

    def __init__(
        self,
        *,
        base_url: object = None,
        model: object = None,
        api_key_env: object = "OPENAI_API_KEY",
        max_concurrency: object = 8,
        stall_timeout_s: object = 30.0,
        connect_timeout_s: object = 5.0,
        retries: object = 1,
        retry_backoff_s: object = 0.25,
        max_tokens: object = 1024,
        min_temperature: object = 0.0,
        max_temperature: object = 2.0,
        tokenize: object = "off",
        tokenize_timeout_s: object = 1.0,
        **unknown: object,
    ) -> None:
        if unknown:
            names = ", ".join(repr(name) for name in sorted(unknown))
            hint = ""
            if any("key" in name.lower() for name in unknown):
                hint = (
                    "; the API key never goes in the options: put it in an environment variable "
                    "and name that variable in 'api_key_env'"
                )
            raise ConfigError(
                f"backend 'openai' has no option {names}{hint}; its options: " + ", ".join(OPTIONS)
            )
        if base_url is None:
            raise ConfigError(
                "backend 'openai' needs option 'base_url' (e.g. http://127.0.0.1:8080/v1)"
            )
        self.base_url = _base_url(base_url)
        if model is None:
            raise ConfigError("backend 'openai' needs option 'model' (the model to ask)")
        if type(model) is not str or not model.strip():
            raise _bad_option("model", "a non-empty string", model)
        self.model = model.strip()
        if type(api_key_env) is not str or not _ENV_NAME.fullmatch(api_key_env):
            # Never echo it: someone may have put the key itself here.
            raise ConfigError(
                "backend 'openai' option 'api_key_env' must be the NAME of an environment "
                "variable (letters, digits and _), not the key itself"
            )
        self.api_key_env = api_key_env
        self.max_concurrency = _int_option("max_concurrency", max_concurrency, 1, 10_000)
        self.stall_timeout_s = _number_option(
            "stall_timeout_s", stall_timeout_s, low=0, high=3600, positive=True
        )
        self.connect_timeout_s = _number_option(
            "connect_timeout_s", connect_timeout_s, low=0, high=600, positive=True
        )
        self.retries = _int_option("retries", retries, 0, 10)
        self.retry_backoff_s = _number_option(
            "retry_backoff_s", retry_backoff_s, low=0, high=60, positive=False
        )
        self.max_tokens = _int_option("max_tokens", max_tokens, 1, 10_000_000)
        self.min_temperature = _number_option(
            "min_temperature", min_temperature, low=0, high=100, positive=False
        )
        self.max_temperature = _number_option(
            "max_temperature", max_temperature, low=0, high=100, positive=False
        )
        if self.min_temperature > self.max_temperature:
            raise ConfigError(
                "backend 'openai' option 'min_temperature' must not exceed 'max_temperature'"
            )
        if type(tokenize) is not str or tokenize not in TOKENIZERS:
            raise _bad_option("tokenize", "one of " + ", ".join(TOKENIZERS), tokenize)
        self.tokenize = tokenize
        self.tokenize_timeout_s = _number_option(
            "tokenize_timeout_s", tokenize_timeout_s, low=0, high=60, positive=True
        )
        self._tokenizer = (
            None if tokenize == "off" else _Tokenizer(tokenize, self.base_url, self.model)
        )
        #: Whether a failed count was logged as a warning already (then debug).
        self._count_failed = False
        self._url = self.base_url + "/chat/completions"
        key = os.environ.get(api_key_env) or None
        self._secret = key
        self._headers = {
            "Accept": "text/event-stream",
            # A compressed event stream is buffered by whoever compresses it: tokens in clumps.
            "Accept-Encoding": "identity",
            "Content-Type": "application/json",
            "User-Agent": "muxgate",
        }
        if key is not None:
            self._headers["Authorization"] = f"Bearer {key}"
        self._ssl_context = _preload()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx.AsyncClient | None = None
        self._gate = _Gate(self.max_concurrency)

    def __repr__(self) -> str:  # never the key
        key = "set" if self._secret else "unset"
        return (
            f"OpenAIBackend(base_url={self.base_url!r}, model={self.model!r}, "
            f"api_key_env={self.api_key_env!r} ({key}), max_concurrency={self.max_concurrency}, "
            f"stall_timeout_s={self.stall_timeout_s:g}, connect_timeout_s="
            f"{self.connect_timeout_s:g}, retries={self.retries}, max_tokens={self.max_tokens}, "
            f"tokenize={self.tokenize!r})"
        )

    def describe(self, name: str = "openai") -> BackendInfo:
        """``GET /v1/backend``: the model, and the ``metadata`` a chat may set with its bounds
        (:meth:`settings_for` refuses anything outside them). Never the URL or the key."""
        settings = (
            Setting(
                name="max_tokens",
                type="integer",
                min=1,
                max=self.max_tokens,
                default=self.max_tokens,
                description="most tokens the model may generate for the answer",
            ),
            Setting(
                name="temperature",
                type="number",
                min=self.min_temperature,
                max=self.max_temperature,
                description="sampling temperature (absent: the model server's default)",
            ),
        )
        return BackendInfo(name=name, model=self.model, settings=settings)

    # -- lifecycle -----------------------------------------------------------------------------

    def _pool(self) -> tuple[httpx.AsyncClient, _Gate]:
        """This event loop's client and line (a backend object may outlive a loop in tests)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._client = None
            self._gate = _Gate(self.max_concurrency)
        if self._client is None:
            n = self.max_concurrency
            self._client = httpx.AsyncClient(
                headers=self._headers,
                # read: the longest wait for the next bytes, response headers included.
                timeout=httpx.Timeout(
                    self.stall_timeout_s,
                    connect=self.connect_timeout_s,
                    write=self.connect_timeout_s,
                    pool=self.connect_timeout_s,
                ),
                limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
                http1=True,
                http2=False,
                follow_redirects=False,
                verify=self._ssl_context,
            )
        return self._client, self._gate

    async def aclose(self) -> None:
        """Close the pooled connections (the gateway calls this at shutdown)."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # -- the request ---------------------------------------------------------------------------

    def settings_for(self, metadata: Mapping[str, Any]) -> tuple[int, float | None]:
        """``max_tokens`` and ``temperature`` of a chat: :class:`InvalidRequest` naming the key
        for a value of the wrong type or out of bounds. Other keys are ignored."""
        max_tokens = self.max_tokens
        if "max_tokens" in metadata:
            value = metadata["max_tokens"]
            if type(value) is not int or not 1 <= value <= self.max_tokens:
                raise InvalidRequest(
                    ErrorCode.INVALID_FIELD,
                    f"metadata 'max_tokens' must be an integer in 1..{self.max_tokens}, "
                    f"got {_metadata_shown(value)}",
                )
            max_tokens = value
        temperature = None
        if "temperature" in metadata:
            value = metadata["temperature"]
            low, high = self.min_temperature, self.max_temperature
            if (
                type(value) not in (int, float)
                or not math.isfinite(value)
                or not low <= value <= high
            ):
                raise InvalidRequest(
                    ErrorCode.INVALID_FIELD,
                    f"metadata 'temperature' must be a number in {low:g}..{high:g}, "
                    f"got {_metadata_shown(value)}",
                )
            temperature = float(value)
        return max_tokens, temperature

    async def run(self, ctx: RequestContext) -> None:
        max_tokens, _ = self.settings_for(ctx.metadata or {})
        prompt_tokens = sum(estimate_tokens(turn.content) for turn in ctx.messages)
        ctx.usage.expect(prompt_tokens + max_tokens)
        await self.complete(ctx, ctx.messages)

    async def complete(
        self,
        ctx: RequestContext,
        turns: Sequence[ChatMessage],
        *,
        name: str = "completion",
        emit: bool = True,
    ) -> str:
        """One streamed chat completion of ``turns`` as an abortable ``stream_llm`` step named
        ``name`` (retries: ``name-retry-N``), emitted to the client unless ``emit`` is false;
        returns its text. The chat's ``metadata`` settings apply. A flow calls it once per LLM
        step (a plan, then the answer); :meth:`run` once, for the chat itself."""
        messages = [{"role": turn.role.value, "content": turn.content} for turn in turns]
        text, _ = await self._completion(ctx, messages, name=name, emit=emit)
        return text

    async def complete_with_tools(
        self,
        ctx: RequestContext,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]],
        *,
        name: str = "completion",
        emit: bool = True,
    ) -> tuple[str, list[ToolCall]]:
        """One completion that may call tools: ``messages`` in the upstream's own format (so a
        flow can add the assistant's ``tool_calls`` and the ``tool`` results of a round) and
        ``tools`` as OpenAI function definitions. Returns the text and the tool calls the
        model asked for (empty: it answered)."""
        return await self._completion(ctx, messages, name=name, emit=emit, tools=tools)

    async def _completion(
        self,
        ctx: RequestContext,
        messages: Sequence[Mapping[str, Any]],
        *,
        name: str,
        emit: bool,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> tuple[str, list[ToolCall]]:
        max_tokens, temperature = self.settings_for(ctx.metadata or {})
        prompt_tokens = sum(estimate_tokens(str(m.get("content") or "")) for m in messages)
        body: dict[str, Any] = {
            "model": self.model,
            "messages": list(messages),
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": max_tokens,
        }
        if temperature is not None:
            body["temperature"] = temperature
        if tools:
            body["tools"] = list(tools)
        payload = orjson.dumps(body)

        ctx.checkpoint("upstream-queue")
        client, gate = self._pool()
        give_up_at = None if ctx.deadline is None else ctx.deadline - BUSY_MARGIN_S
        outcome = await gate.acquire(ctx.token, give_up_at)
        if outcome != _GRANTED:
            ctx.checkpoint("upstream-queue")  # cancelled while waiting: halts here
            raise UpstreamFailure(
                UPSTREAM_BUSY,
                "the upstream is busy: the request could not start before its deadline",
            )
        counted = [
            {"role": str(m.get("role")), "content": str(m.get("content") or "")} for m in messages
        ]
        try:
            attempt = 0
            while True:
                step = name if attempt == 0 else f"{name}-retry-{attempt}"
                call = _Call()
                try:
                    text = await ctx.stream_llm(
                        self._stream(ctx, client, call, payload),
                        input_tokens=prompt_tokens,
                        name=step,
                        emit=emit,
                    )
                    return text, call.finished_tool_calls()
                except PipelineHalted:  # cancelled: the cancelled response is out already
                    await self._count_cut(ctx, call, counted)
                    raise
                except UpstreamFailure as failure:
                    await self._count_cut(ctx, call, counted)
                    if (
                        not failure.retryable
                        or call.pieces
                        or call.tool_calls
                        or attempt >= self.retries
                    ):
                        raise
                attempt += 1
                await _pause(ctx.token, self.retry_backoff_s * 2 ** (attempt - 1))
                ctx.checkpoint(step)  # no new call after a cancel (G5)
        finally:
            gate.release()

    async def _count_cut(
        self, ctx: RequestContext, call: _Call, messages: list[dict[str, str]]
    ) -> None:
        """Count a call cut before its usage arrived with the upstream's tokenizer, when
        ``tokenize`` names one and the call received text; at most ``tokenize_timeout_s``, and
        the estimates stay on any failure (see the module's docstring)."""
        tokenizer, client = self._tokenizer, self._client
        if tokenizer is None or client is None or call.reported or not call.pieces:
            return  # (no client: the backend was closed meanwhile; a new one would leak)
        try:
            async with asyncio.timeout(self.tokenize_timeout_s):
                input_tokens = await tokenizer.prompt(client, messages)
                output_tokens = await tokenizer.output(client, call)
        except Exception as exc:  # the estimates stay: whatever went wrong, never worse
            if isinstance(exc, TimeoutError):
                why = f"no answer within {self.tokenize_timeout_s:g} s (tokenize_timeout_s)"
            elif isinstance(exc, _NoCount):
                why = str(exc)
            else:
                why = type(exc).__name__
            emit = log.debug if self._count_failed else log.warning
            self._count_failed = True
            emit("openai.tokenize_failed", request_id=ctx.request_id, reason=why)
            return
        _recount(ctx.usage, input_tokens=input_tokens, output_tokens=output_tokens)

    async def _stream(
        self, ctx: RequestContext, client: httpx.AsyncClient, call: _Call, payload: bytes
    ) -> AsyncIterator[str]:
        """The answer's content pieces, one per delta; raises :class:`UpstreamFailure`."""
        request = client.build_request("POST", self._url, content=payload)
        try:
            response = await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            failure = self._send_failure(exc)
            if failure.code != UPSTREAM_TIMEOUT:  # a timed-out request may be in the works
                ctx.usage.report(input_tokens=0, output_tokens=0)  # nothing was processed
            raise failure from None
        call.response = response
        # Registered after stream_llm's reader.cancel: both run in the loop turn of the cancel.
        unregister = ctx.token.on_cancel(call.cut)
        try:
            if response.status_code != 200:
                ctx.usage.report(input_tokens=0, output_tokens=0)  # refused: nothing processed
                raise await self._status_failure(response)
            async with contextlib.aclosing(self._pieces(ctx, call, response)) as pieces:
                async for piece in pieces:
                    yield piece
        finally:
            unregister()
            await response.aclose()

    def _send_failure(self, exc: httpx.HTTPError) -> UpstreamFailure:
        """The failure of a call that got no response (headers) at all."""
        if isinstance(exc, httpx.ConnectTimeout):
            return UpstreamFailure(
                UPSTREAM_UNAVAILABLE,
                f"could not connect to the upstream within {self.connect_timeout_s:g} s",
                retryable=True,
            )
        if isinstance(exc, httpx.ConnectError):
            return UpstreamFailure(
                UPSTREAM_UNAVAILABLE,
                "could not connect to the upstream (refused or unreachable)",
                retryable=True,
            )
        if isinstance(exc, httpx.ReadTimeout):
            return UpstreamFailure(
                UPSTREAM_TIMEOUT, f"no answer from the upstream for {self.stall_timeout_s:g} s"
            )
        if isinstance(exc, httpx.PoolTimeout):
            return UpstreamFailure(UPSTREAM_BUSY, "the upstream is busy: no connection free")
        if isinstance(exc, httpx.TransportError):  # closed before answering, write failed...
            return UpstreamFailure(
                UPSTREAM_UNAVAILABLE,
                "the upstream closed the connection without answering",
                retryable=True,
            )
        return UpstreamFailure(UPSTREAM_UNAVAILABLE, "the upstream request failed")

    async def _status_failure(self, response: httpx.Response) -> UpstreamFailure:
        """The failure of an answer other than 200, with its error message if it has one."""
        status = response.status_code
        body = b""
        with contextlib.suppress(httpx.HTTPError):
            raw = cast(AsyncGenerator[bytes, None], response.aiter_bytes())
            async with contextlib.aclosing(raw) as chunks:
                async for data in chunks:
                    body += data
                    if len(body) >= ERROR_BODY_BYTES:
                        break
        message = _error_message(body[:ERROR_BODY_BYTES])
        detail = f": {_sanitize(message, self._secret)}" if message else ""
        if status == 429:
            return UpstreamFailure(
                UPSTREAM_RATE_LIMITED,
                f"the upstream is rate limiting requests (HTTP 429){detail}",
                retryable=True,
            )
        if 400 <= status < 500:
            return UpstreamFailure(
                UPSTREAM_REJECTED, f"the upstream rejected the request (HTTP {status}){detail}"
            )
        if status >= 500:
            return UpstreamFailure(
                UPSTREAM_ERROR, f"the upstream failed (HTTP {status}){detail}", retryable=True
            )
        return _bad(f"HTTP {status} instead of an event stream")

    async def _pieces(
        self, ctx: RequestContext, call: _Call, response: httpx.Response
    ) -> AsyncGenerator[str, None]:
        """Parse the event stream: ``data: {chunk}`` lines, then ``data: [DONE]``."""
        clock = asyncio.get_running_loop().time
        stall = self.stall_timeout_s
        last_data = clock()
        finished = False  # a choice had its finish_reason
        pending = b""
        chunks = cast(AsyncGenerator[bytes, None], response.aiter_bytes())
        try:
            async for data in chunks:
                if pending:
                    data = pending + data
                lines = data.split(b"\n")
                pending = lines.pop()
                if len(pending) > MAX_LINE_BYTES:
                    raise _bad(f"a line longer than {MAX_LINE_BYTES} bytes")
                for line in lines:
                    if line.endswith(b"\r"):
                        line = line[:-1]
                    if not line or line.startswith(b":"):  # event end, or a comment (keep-alive)
                        if clock() - last_data > stall:  # comments are no tokens
                            raise self._stalled()
                        continue
                    if not line.startswith(b"data:"):
                        if line.partition(b":")[0] in _SSE_FIELDS:
                            continue
                        raise _bad("a line that is not a server-sent event")
                    value = line[5:].strip()
                    if value == b"[DONE]":
                        await self._drain(chunks)
                        return
                    last_data = clock()
                    text, usage, finish = self._chunk(value, call)
                    if text:
                        call.pieces += 1
                        call.parts.append(text)
                        yield text
                    if usage is not None:  # the provider's figures replace the estimates
                        call.reported = True
                        ctx.usage.report(input_tokens=usage[0], output_tokens=usage[1])
                    finished = finished or finish
        except httpx.ReadTimeout:
            raise self._stalled() from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.DecodingError) as exc:
            if isinstance(exc, httpx.DecodingError):
                raise _bad("a body it could not decode") from None
            raise UpstreamFailure(
                UPSTREAM_DISCONNECTED, "the upstream dropped the connection mid-answer"
            ) from None
        finally:
            await chunks.aclose()
        if not finished:  # the body ended cleanly, without [DONE] or a finish reason
            raise UpstreamFailure(
                UPSTREAM_DISCONNECTED, "the upstream ended the answer before it was finished"
            )

    @staticmethod
    async def _drain(chunks: AsyncIterator[bytes]) -> None:
        """Read what follows ``[DONE]`` (normally just the end of the body) so the connection
        returns to the pool; an upstream that keeps it open has it closed instead."""
        with contextlib.suppress(TimeoutError, httpx.HTTPError):
            async with asyncio.timeout(DRAIN_S):
                async for _ in chunks:
                    pass

    def _stalled(self) -> UpstreamFailure:
        return UpstreamFailure(
            UPSTREAM_TIMEOUT, f"no token from the upstream for {self.stall_timeout_s:g} s"
        )

    def _chunk(self, value: bytes, call: _Call) -> tuple[str | None, tuple[int, int] | None, bool]:
        """One ``chat.completion.chunk``: its content piece, usage figures, and whether its
        choice finished."""
        try:
            chunk = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise _bad("a data line that is not JSON") from None
        if type(chunk) is not dict:
            raise _bad("a data line that is not a JSON object")
        error = chunk.get("error")
        if error is not None:
            message = _error_message(orjson.dumps({"error": error}))
            detail = f": {_sanitize(message, self._secret)}" if message else ""
            raise UpstreamFailure(UPSTREAM_ERROR, f"the upstream reported an error{detail}")
        usage = chunk.get("usage")
        choices = chunk.get("choices")
        if choices is None and type(usage) is dict:
            choices = []  # a usage-only chunk
        if type(choices) is not list:
            raise _bad("a chunk without choices")
        text = None
        finish = False
        if choices:
            choice = choices[0]
            if type(choice) is not dict:
                raise _bad("a choice that is not an object")
            delta = choice.get("delta")
            if delta is not None:
                if type(delta) is not dict:
                    raise _bad("a delta that is not an object")
                text = delta.get("content")
                if text is not None and type(text) is not str:
                    raise _bad("a delta content that is not a string")
                tool_calls = delta.get("tool_calls")
                if tool_calls is not None:
                    call.add_tool_call_deltas(tool_calls)
            finish = choice.get("finish_reason") is not None
        figures = None
        if type(usage) is dict:
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if type(prompt) is int and type(completion) is int and prompt >= 0 and completion >= 0:
                figures = (prompt, completion)
        return text, figures, finish
