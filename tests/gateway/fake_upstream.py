"""A fake OpenAI-compatible upstream for the ``openai`` backend's tests.

HTTP/1.1 written by hand on ``asyncio.start_server``, keep-alive included, so that what the
gateway does on the wire is what a real model server would see. Each request is answered by a
:class:`Plan` chosen by its prompt (the last message's content): a streamed answer
(``text/event-stream``, chunked, ``data: {chunk}`` events, the usage chunk, ``data: [DONE]``)
that may then stall, drop the connection, send garbage or keep-alive comments; an HTTP error
status; or no answer at all. Like a real server, the fake stops "generating" as soon as it sees
the client close the connection, and records when it saw that: while it answers, it reads the
connection for the EOF (or reset) of the gateway's cut.

It may also offer a tokenizer (``tokenizer="llama.cpp"``: ``POST /apply-template`` and ``POST
/tokenize`` as llama-server has them; ``tokenizer="vllm"``: vLLM's ``POST /tokenize``), whose
tokens are characters: :func:`text_tokens` and :func:`prompt_tokens` say what it counts. Those
requests are recorded apart (:attr:`FakeUpstream.tokenize_requests`); with ``tokenize_hang`` it
never answers them, until the gateway hangs up.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: What a stream may do once its tokens are written.
THEN = ("done", "no_done", "drop", "stall", "garbage", "comments")
#: The tokenizer dialects the fake can speak.
TOKENIZERS = ("llama.cpp", "vllm")
TOKENIZE_PATHS = ("/tokenize", "/apply-template")


def chat_template(messages: Sequence[Mapping[str, Any]]) -> str:
    """The fake's chat template: what its /apply-template renders."""
    turns = "".join(f"<{m.get('role')}>{m.get('content')}\n" for m in messages)
    return turns + "<assistant>"


def text_tokens(text: str) -> int:
    """What the fake's tokenizer counts for generated text: one token per character."""
    return len(text)


def prompt_tokens(messages: Sequence[Mapping[str, Any]], dialect: str) -> int:
    """What the fake's tokenizer counts for a chat's prompt, as the gateway asks for it: the
    template's characters, plus a BOS for llama.cpp (vLLM's chat template would carry it)."""
    return len(chat_template(messages)) + (1 if dialect == "llama.cpp" else 0)


@dataclass(frozen=True)
class Plan:
    """How the fake answers one request."""

    status: int = 200
    #: The content deltas; None: endless (" t0", " t1", ...) until the gateway hangs up.
    tokens: Sequence[str] | None = ("Hello", ",", " world", "!")
    #: Seconds before each token (the model's pace).
    token_delay: float = 0.0
    #: ``prompt_tokens`` and ``completion_tokens`` of the final usage chunk (None: no usage).
    usage: tuple[int, int] | None = (21, 9)
    #: After the tokens (see THEN): "done" (finish, usage, [DONE], end of body), "no_done" (the
    #: same without [DONE]), "drop" (close the connection mid-body), "stall" (send nothing more),
    #: "garbage" (send :attr:`garbage`, then nothing), "comments" (keep-alive comments only).
    then: str = "done"
    garbage: bytes = b"this is not an event\n\n"
    #: The body of an error status.
    error_body: bytes = b'{"error": {"message": "something went wrong", "type": "server_error"}}'
    #: Send nothing at all, not even the status line, until the gateway hangs up.
    hang: bool = False
    #: Tool calls (id, function name, arguments JSON) streamed after the tokens, as OpenAI
    #: does (id and name first, the arguments in two pieces); the finish reason is then
    #: "tool_calls".
    tool_calls: Sequence[tuple[str, str, str]] = ()

    def __post_init__(self) -> None:
        assert self.then in THEN, self.then


@dataclass(eq=False)
class Seen:
    """One request the fake received."""

    index: int
    #: Which TCP connection carried it (1 for the first the fake accepted).
    connection: int
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    received_at: float
    #: Monotonic time of each content token written.
    token_times: list[float] = field(default_factory=list)
    #: When the fake was done answering (the last byte written, or it gave up).
    finished_at: float | None = None
    #: When the fake saw the gateway close the connection (EOF or reset) while answering.
    closed_at: float | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    #: The fake's end of the TCP connection (see :meth:`peer_hung_up`).
    sock: Any = None

    def peer_hung_up(self) -> bool:
        """Whether the gateway's FIN (or reset) has reached this connection's socket, asked of
        the kernel now, without an event-loop turn: a peek at a duplicate of the descriptor."""
        peek = socket.socket(fileno=os.dup(self.sock.fileno()))
        try:
            return peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except ConnectionError:
            return True
        finally:
            peek.close()

    @property
    def prompt(self) -> str:
        messages = self.body.get("messages") or [{}]
        return str(messages[-1].get("content", ""))

    def tokens_after(self, moment: float) -> int:
        return sum(1 for t in self.token_times if t > moment)


def _event(data: Any) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return _event(
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "fake",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
    )


def unused_port() -> int:
    """A local TCP port with nothing listening (connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FakeUpstream:
    """``async with FakeUpstream(plans) as fake:`` then point the backend at ``fake.base_url``.

    ``plans`` maps a prompt to the plan (or the successive plans: the last one repeats) of the
    requests with that prompt; other prompts get ``default``.
    """

    def __init__(
        self,
        plans: Mapping[str, Plan | Sequence[Plan]] | None = None,
        default: Plan | None = None,
        *,
        tokenizer: str | None = None,
        tokenize_hang: bool = False,
        tokenize_status: int = 200,
    ) -> None:
        assert tokenizer in (None, *TOKENIZERS), tokenizer
        #: The tokenizer endpoints' dialect (None: they answer 404, like OpenAI's API).
        self.tokenizer = tokenizer
        #: Never answer a tokenizer request (until the gateway hangs up).
        self.tokenize_hang = tokenize_hang
        #: The status of every tokenizer answer (not 200: an error body).
        self.tokenize_status = tokenize_status
        #: Tokenizer requests received, apart from the chat requests.
        self.tokenize_requests: list[Seen] = []
        self.plans = {
            prompt: [plan] if isinstance(plan, Plan) else list(plan)
            for prompt, plan in (plans or {}).items()
        }
        self.default = default or Plan()
        self.requests: list[Seen] = []
        #: TCP connections accepted so far.
        self.connections = 0
        self.active = 0
        #: The most answers in progress at once.
        self.max_active = 0
        #: Bytes the gateway sent while a response was in flight (there should be none).
        self.unexpected: list[bytes] = []
        self._served: dict[str, int] = {}
        self._changed = asyncio.Condition()
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def __aenter__(self) -> FakeUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        # Drop the connections still open: each handler then ends on its own (EOF, reset).
        for writer in self._writers:
            writer.transport.abort()
        if self._handlers:
            await asyncio.wait(set(self._handlers))
        await self._server.wait_closed()

    async def wait_requests(self, n: int, timeout: float = 5.0) -> list[Seen]:
        """Wait until the fake has received ``n`` requests."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.requests) >= n)
        return self.requests

    async def wait_tokenize_requests(self, n: int, timeout: float = 5.0) -> list[Seen]:
        """Wait until the fake has received ``n`` tokenizer requests."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.tokenize_requests) >= n)
        return self.tokenize_requests

    async def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until every connection the fake accepted has been closed."""
        async with asyncio.timeout(timeout):
            while self._handlers:
                await asyncio.wait(set(self._handlers))

    # -- serving -----------------------------------------------------------------------------

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        self.connections += 1
        connection = self.connections
        try:
            while True:  # one request after the other on this connection (keep-alive)
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # the client closed an idle connection
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, path, _ = request_line.split(" ", 2)
                headers = {}
                for line in header_lines:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                seen = Seen(
                    index=len(self.requests),
                    connection=connection,
                    method=method,
                    path=path,
                    headers=headers,
                    body=json.loads(body) if body else {},
                    received_at=time.monotonic(),
                    sock=writer.get_extra_info("socket"),
                )
                if path in TOKENIZE_PATHS:
                    self.tokenize_requests.append(seen)
                    await self._notify()
                    if not await self._tokenize(seen, reader, writer):
                        return
                    continue
                self.requests.append(seen)
                await self._notify()
                if not await self._answer(self._plan(seen.prompt), seen, reader, writer):
                    return
        except ConnectionError:
            return
        finally:
            writer.close()
            self._handlers.discard(task)
            self._writers.discard(writer)

    def _plan(self, prompt: str) -> Plan:
        plans = self.plans.get(prompt)
        if not plans:
            return self.default
        served = self._served.get(prompt, 0)
        self._served[prompt] = served + 1
        return plans[min(served, len(plans) - 1)]

    async def _watch(self, reader: asyncio.StreamReader, seen: Seen) -> None:
        """Read the connection while answering: EOF or a reset is the gateway hanging up."""
        try:
            data = await reader.read(65536)
        except ConnectionError:
            data = b""
        if not data:
            seen.closed_at = time.monotonic()
            seen.closed.set()
        else:  # an HTTP/1.1 client sends nothing while its response is in flight
            self.unexpected.append(data)

    async def _tokenize(
        self, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer a tokenizer request; True when the connection may carry another."""
        if self.tokenize_hang:
            await self._watch(reader, seen)
            seen.finished_at = time.monotonic()
            return False
        status, answer = self._tokenized(seen)
        if status == 200 and self.tokenize_status != 200:
            status, answer = self.tokenize_status, {"error": {"message": "tokenizer failed"}}
        body = json.dumps(answer).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        seen.finished_at = time.monotonic()
        return True

    def _tokenized(self, seen: Seen) -> tuple[int, dict[str, Any]]:
        """The status and answer of the fake's tokenizer: 404 for an endpoint it does not have,
        400 for a body it does not understand (another dialect's)."""
        body, path = seen.body, seen.path
        if self.tokenizer == "llama.cpp" and path == "/apply-template":
            if isinstance(body.get("messages"), list):
                return 200, {"prompt": chat_template(body["messages"])}
        elif self.tokenizer == "llama.cpp" and path == "/tokenize":
            if isinstance(body.get("content"), str):
                n = text_tokens(body["content"]) + (1 if body.get("add_special") else 0)
                return 200, {"tokens": list(range(n))}
        elif self.tokenizer == "vllm" and path == "/tokenize":
            if isinstance(body.get("messages"), list):
                n = len(chat_template(body["messages"]))
                n += 1 if body.get("add_special_tokens", False) else 0
            elif isinstance(body.get("prompt"), str):
                n = text_tokens(body["prompt"]) + (1 if body.get("add_special_tokens", True) else 0)
            else:
                return 400, {"error": {"message": "bad request"}}
            return 200, {"count": n, "max_model_len": 4096, "tokens": list(range(n))}
        else:
            return 404, {"error": {"message": "File Not Found", "code": 404}}
        return 400, {"error": {"message": "bad request"}}

    async def _answer(
        self, plan: Plan, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; True when the connection may carry another."""
        watch = asyncio.ensure_future(self._watch(reader, seen))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if plan.hang:
                await watch
                return False
            if plan.status != 200:
                writer.write(
                    f"HTTP/1.1 {plan.status} Oops\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(plan.error_body)}\r\n\r\n".encode()
                    + plan.error_body
                )
                await writer.drain()
                return True
            return await self._stream(plan, seen, writer, watch)
        finally:
            self.active -= 1
            seen.finished_at = time.monotonic()
            if not watch.done():
                watch.cancel()  # a pending read leaves the stream's buffer as it was
                with contextlib.suppress(asyncio.CancelledError):
                    await watch

    async def _stream(
        self, plan: Plan, seen: Seen, writer: asyncio.StreamWriter, watch: asyncio.Future[None]
    ) -> bool:
        def send(data: bytes) -> None:
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))

        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        send(_chunk({"role": "assistant", "content": ""}))
        await writer.drain()
        tokens: Iterator[str] = (
            iter(plan.tokens) if plan.tokens is not None else (f" t{i}" for i in itertools.count())
        )
        for token in tokens:
            if plan.token_delay:
                await asyncio.wait({watch}, timeout=plan.token_delay)
            if watch.done():  # the gateway hung up: stop generating
                return False
            send(_chunk({"content": token}))
            seen.token_times.append(time.monotonic())
            await writer.drain()
        for index, (call_id, function, arguments) in enumerate(plan.tool_calls):
            head = {"name": function, "arguments": ""}
            send(_chunk({"tool_calls": [{"index": index, "id": call_id, "function": head}]}))
            half = len(arguments) // 2
            for piece in (arguments[:half], arguments[half:]):
                send(_chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}))
            await writer.drain()
        if plan.then in ("done", "no_done"):
            send(_chunk({}, finish="tool_calls" if plan.tool_calls else "stop"))
            if plan.usage is not None:
                prompt, completion = plan.usage
                usage = {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                }
                send(_event({"id": "chatcmpl-fake", "choices": [], "usage": usage}))
            if plan.then == "done":
                send(b"data: [DONE]\n\n")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        if plan.then == "drop":
            writer.close()  # a FIN in the middle of the chunked body
            return False
        if plan.then == "garbage":
            send(plan.garbage)
            await writer.drain()
        if plan.then == "comments":
            while not watch.done():
                send(b": keep-alive\n\n")
                await writer.drain()
                await asyncio.wait({watch}, timeout=0.02)
        await watch  # "stall", "garbage": until the gateway hangs up
        return False
