"""Every Python snippet of the seed page, run against a live gateway.

The snippets are copied here verbatim from the seed page (the product page "Request
Cancellation", not part of the repository: no test reads it), with its "Cancelled Response"
example. Before running, exactly two kinds of lines change:
the import (``from muxi import Muxi`` becomes ``from gateway import Client as Muxi`` or
``AsyncClient as Muxi``; the timeout snippet also gets the ``import uuid`` it forgot) and the
construction (``Muxi()`` gets the test gateway's URL). The gateway's own records then show what
each snippet did.
"""

from __future__ import annotations

import ast
import difflib
from typing import Any

import pytest

from gateway import CancelStatus, Response
from gateway.registry import RequestStatus

from ..gateway.conftest import running_gateway
from .conftest import ENDLESS, ThreadedGateway, wait_record

SEED_QUICK_START = """\
from muxi import Muxi

client = Muxi()

# Start a request
request_id = "my-request-123"
task = client.chat_async(
    message="Write a very long story...",
    request_id=request_id,
    user_id="user123"
)

# Cancel it
client.cancel_request(request_id, user_id="user123")
"""

SEED_TIMEOUT = """\
from muxi import Muxi
import asyncio

client = Muxi()

async def chat_with_timeout(message: str, timeout_seconds: int = 30):
    request_id = f"req_{uuid.uuid4()}"
    
    try:
        response = await asyncio.wait_for(
            client.chat_async(message, request_id=request_id),
            timeout=timeout_seconds
        )
        return response
    except asyncio.TimeoutError:
        # Timeout - cancel the request
        await client.cancel_request(request_id)
        raise TimeoutError(f"Request timed out after {timeout_seconds}s")
"""  # noqa: W293 - the seed's blank line holds four spaces

SEED_STREAMING = """\
from muxi import Muxi

client = Muxi()

request_id = "streaming-123"
chunks_received = 0

for chunk in client.chat_stream(message="Write a long essay...", request_id=request_id):
    print(chunk.text, end="")
    chunks_received += 1
    
    # Cancel after receiving 10 chunks
    if chunks_received >= 10:
        client.cancel_request(request_id)
        print("\\n[Cancelled]")
        break
"""  # noqa: W293

SEED_SNIPPETS = [SEED_QUICK_START, SEED_TIMEOUT, SEED_STREAMING]

#: The seed's "Cancelled Response" (Response Behavior): empty content, no partial results.
SEED_CANCELLED_RESPONSE = {"content": "", "status": "cancelled", "request_id": "req_123"}


def adapt(snippet: str, sdk_class: str, *, extra_imports: tuple[str, ...] = ()) -> str:
    """Change only the import and the client-construction lines."""
    lines = []
    for line in snippet.splitlines():
        if line == "from muxi import Muxi":
            lines.append(f"from gateway import {sdk_class} as Muxi")
            lines.extend(extra_imports)
        elif line == "client = Muxi()":
            lines.append("client = Muxi(GATEWAY_URL)")
        else:
            lines.append(line)
    original = snippet.splitlines()
    matcher = difflib.SequenceMatcher(a=original, b=lines, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag != "equal":
            for line in original[i1:i2] + lines[j1:j2]:
                assert "import" in line or "Muxi(" in line, f"changed a line: {line!r}"
    return "\n".join(lines) + "\n"


def run(code: str, name: str, url: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"GATEWAY_URL": url, "__name__": f"seed_{name}"}
    exec(compile(code, f"<seed {name}>", "exec"), namespace)
    return namespace


def client_calls(snippet: str) -> list[tuple[str, list[str], list[str]]]:
    """The snippet's ``client.<method>(...)`` calls: method, positional and keyword arguments."""
    calls = []
    for node in ast.walk(ast.parse(snippet)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "client"
        ):
            args = [ast.unparse(arg) for arg in node.args]
            calls.append((node.func.attr, args, [kw.arg or "**" for kw in node.keywords]))
    return sorted(calls)


def test_snippets_make_the_seed_pages_calls() -> None:
    """A guard on the copies: the calls the tests below run are the seed page's."""
    assert [client_calls(snippet) for snippet in SEED_SNIPPETS] == [
        [
            ("cancel_request", ["request_id"], ["user_id"]),
            ("chat_async", [], ["message", "request_id", "user_id"]),
        ],
        [("cancel_request", ["request_id"], []), ("chat_async", ["message"], ["request_id"])],
        [("cancel_request", ["request_id"], []), ("chat_stream", [], ["message", "request_id"])],
    ]


def test_quick_start_cancels_in_band_on_the_gateway() -> None:
    with ThreadedGateway(backend_options=ENDLESS) as gw:
        ns = run(adapt(SEED_QUICK_START, "Client"), "quick-start", gw.url)
        client = ns["client"]
        try:
            response = ns["task"].result(timeout=10)
            assert isinstance(response, Response)
            # The seed's "Cancelled Response": empty content, no partial results.
            body = response.to_dict()
            assert {key: body[key] for key in SEED_CANCELLED_RESPONSE} == {
                **SEED_CANCELLED_RESPONSE,
                "request_id": "my-request-123",
            }
            assert response.status == "cancelled"
            assert response.reason == "client"
            record = gw.record("my-request-123", user="user123")
            assert record.reason == "client"
            # Idempotent: the second cancel says so (SPEC.md G4).
            again = client.cancel_request("my-request-123", user_id="user123")
            assert again.status is CancelStatus.ALREADY_CANCELLED
        finally:
            client.close()


async def test_cancel_after_timeout_cancels_and_raises() -> None:
    async with running_gateway(backend_options=ENDLESS) as gw:
        ns = run(adapt(SEED_TIMEOUT, "AsyncClient", extra_imports=("import uuid",)), "t", gw.url)
        client = ns["client"]
        # Instrumentation only: see which id the snippet cancelled and what the gateway said.
        seen: list[Any] = []
        cancel = client.cancel_request

        async def spy(request_id: str, **kwargs: Any) -> Any:
            result = await cancel(request_id, **kwargs)
            seen.append(result)
            return result

        client.cancel_request = spy
        try:
            with pytest.raises(TimeoutError, match=r"timed out after 0\.3s"):
                await ns["chat_with_timeout"]("Write a very long story...", timeout_seconds=0.3)
            (result,) = seen
            # wait_for's expiry already cancelled the task, which sent the cancel frame: the
            # snippet's own cancel_request finds it cancelled.
            assert result.status is CancelStatus.ALREADY_CANCELLED
            record = await wait_record(gw, result.request_id, statuses=(RequestStatus.CANCELLED,))
            assert record.reason == "client"
            assert not gw.registry.active()
            # The connection is still good for the next request.
            assert (await client.chat("hi", metadata={"tokens": 3})).status == "completed"
        finally:
            await client.aclose()


async def test_cancel_after_timeout_returns_the_response_in_time() -> None:
    async with running_gateway() as gw:
        ns = run(adapt(SEED_TIMEOUT, "AsyncClient", extra_imports=("import uuid",)), "t", gw.url)
        try:
            response = await ns["chat_with_timeout"]("Say hello", timeout_seconds=30)
            assert response.status == "completed"
            assert response.content
            assert response.request_id.startswith("req_")
        finally:
            await ns["client"].aclose()


def test_cancel_streaming_request(capsys: pytest.CaptureFixture[str]) -> None:
    with ThreadedGateway(backend_options=ENDLESS) as gw:
        ns = run(adapt(SEED_STREAMING, "Client"), "streaming", gw.url)
        client = ns["client"]
        try:
            assert ns["chunks_received"] == 10
            out = capsys.readouterr().out
            assert out.endswith("\n[Cancelled]\n")
            assert len(out) > len("\n[Cancelled]\n") + 10  # the streamed text was printed
            record = gw.record("streaming-123", statuses=(RequestStatus.CANCELLED,))
            assert record.reason == "client"
            assert client.chat("and now?", metadata={"tokens": 3}).status == "completed"
            assert gw.connections() == 1
        finally:
            client.close()
