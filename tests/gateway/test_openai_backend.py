"""Backend ``openai`` against a fake OpenAI-compatible upstream (tests/gateway/fake_upstream.py).

A real gateway on an ephemeral port, the strict WireClient over a real socket, and the fake
upstream speaking HTTP/1.1 on another real socket: streamed answers and their usage, a cancel
that closes the upstream connection at once (measured from the client's cancel to the fake's
EOF), each failure with its code, retries before the first token only, the concurrency line,
metadata, the API key, the options; a stream cut before its usage, counted with the upstream's
tokenizer (the fake's: one token per character) after the cut, or left at the estimates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from websockets.asyncio.client import connect

from gateway.backends import load_backend
from gateway.backends.openai import OpenAIBackend
from gateway.backends.simulated import estimate_tokens
from gateway.config import Config, ConfigError, load_config
from gateway.pipeline import RequestContext, StepRecord
from gateway.server import Gateway
from protocol import CancelReason, CancelStatus, Chat, ChatMessage, Codec, ResponseStatus, Usage

from .conftest import running_gateway, settled
from .fake_upstream import (
    FakeUpstream,
    Plan,
    Seen,
    chat_template,
    prompt_tokens,
    text_tokens,
    unused_port,
)
from .http_client import http
from .wire import Track, WireClient

REPO = Path(__file__).resolve().parents[2]
KEY_ENV = "MUXGATE_TEST_UPSTREAM_KEY"
#: An answer that goes on until the gateway hangs up, a token every 2 ms.
ENDLESS = Plan(tokens=None, token_delay=0.002)
CANCEL_RUNS = 20
#: Between the client sending its cancel and the fake upstream reading the gateway's EOF.
CANCEL_TO_UPSTREAM_CLOSE_S = 0.05


@pytest.fixture(autouse=True)
def _no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)


def upstream_options(base_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "base_url": base_url,
        "model": "test-model",
        "api_key_env": KEY_ENV,
        "stall_timeout_s": 5,
        "connect_timeout_s": 2,
        "retry_backoff_s": 0.01,
        **extra,
    }


@contextlib.asynccontextmanager
async def openai_gateway(
    base_url: str, *, backend: OpenAIBackend | None = None, **extra: Any
) -> AsyncIterator[tuple[Gateway, WireClient]]:
    """A gateway configured like ``muxgate serve --backend openai --backend-option ...``
    (or running ``backend``), and a strict client connected to it."""
    settings: dict[str, Any] = {}
    if backend is None:
        settings = {"backend": "openai", "backend_options": upstream_options(base_url, **extra)}
    async with (
        running_gateway(backend_impl=backend, **settings) as gw,
        WireClient.open(gw.url) as client,
    ):
        yield gw, client


class Recording(OpenAIBackend):
    """The real backend, keeping each request's context (for its step trace and usage) and
    telling when each request entered ``run``."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.contexts: dict[str, RequestContext] = {}
        self.entered: dict[str, asyncio.Event] = {}

    def entered_event(self, request_id: str) -> asyncio.Event:
        return self.entered.setdefault(request_id, asyncio.Event())

    async def run(self, ctx: RequestContext) -> None:
        self.contexts[ctx.request_id] = ctx
        self.entered_event(ctx.request_id).set()
        await super().run(ctx)


def steps(backend: Recording, request_id: str) -> list[StepRecord]:
    return list(backend.contexts[request_id].steps)


# -- a normal answer --------------------------------------------------------------------------


async def test_a_streamed_answer_relays_every_delta_and_the_reported_usage() -> None:
    async with FakeUpstream() as fake, openai_gateway(fake.base_url) as (gw, client):
        await client.chat("r1", "Say hello")
        response = await client.response("r1")
        track = client.tracks["r1"]
        assert response.status is ResponseStatus.COMPLETED
        assert [chunk.text for chunk in track.chunks] == ["Hello", ",", " world", "!"]
        assert response.content == "Hello, world!"
        # The upstream's figures, not the estimates (4 deltas, a 3-token prompt).
        assert (response.usage.input_tokens, response.usage.output_tokens) == (21, 9)
        assert response.usage.final
        assert response.usage.estimated == ()  # both reported, nothing saved (SPEC.md §3.8)
        (seen,) = fake.requests
        assert (seen.method, seen.path) == ("POST", "/v1/chat/completions")
        assert seen.body == {
            "model": "test-model",
            "messages": [{"role": "user", "content": "Say hello"}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": 1024,
        }
        assert seen.headers["accept"] == "text/event-stream"
        assert "authorization" not in seen.headers  # no key in the environment: no header
        await settled(gw)
    assert fake.unexpected == []


async def test_the_wire_says_the_reported_usage_is_not_estimated() -> None:
    """The canonical JSON frame itself carries ``usage.estimated`` (SPEC.md §3.8)."""
    async with (
        FakeUpstream() as fake,
        running_gateway(backend="openai", backend_options=upstream_options(fake.base_url)) as gw,
    ):
        async with connect(gw.url, subprotocols=[Codec.JSON.subprotocol]) as ws:  # type: ignore[list-item]
            await ws.send('{"type":"chat","request_id":"r1","message":"Say hello"}')
            lines: list[str] = []
            while not any('"type":"response"' in line for line in lines):
                frame = await asyncio.wait_for(ws.recv(), 10)
                assert isinstance(frame, str)
                lines.extend(frame.split("\n"))
        (response,) = [line for line in lines if '"type":"response"' in line]
        assert response.endswith(
            ',"usage":{"input_tokens":21,"output_tokens":9,"saved_tokens":0,"final":true,'
            '"estimated":[]}}'
        ), response
        await settled(gw)


async def test_backend_endpoint_names_the_model_and_its_bounds_never_the_url_or_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``GET /v1/backend`` with the openai backend: the model and the settings a chat may set,
    with the operator's bounds; a value outside them fails the chat with ``invalid_field``."""
    monkeypatch.setenv("MUXGATE_TEST_UPSTREAM_KEY", "sk-secret-never-shown")
    options = {
        **upstream_options("http://127.0.0.1:9/v1"),
        "api_key_env": "MUXGATE_TEST_UPSTREAM_KEY",
        "max_tokens": 300,
        "max_temperature": 1.5,
    }
    async with running_gateway(backend="openai", backend_options=options) as gw:
        answer = await http("GET", f"{gw.http_url}/v1/backend")
        async with WireClient.open(gw.url) as client:
            await client.chat("too-hot", "hi", metadata={"temperature": 1.6})
            refused = await client.response("too-hot")
    assert answer.status == 200
    assert b"sk-secret" not in answer.body
    assert b"127.0.0.1" not in answer.body
    body = answer.json()
    assert body["backend"] == "openai"
    assert body["model"] == options["model"]
    settings = {s["name"]: s for s in body["settings"]}
    assert (settings["max_tokens"]["min"], settings["max_tokens"]["max"]) == (1, 300)
    assert settings["temperature"]["max"] == 1.5
    assert refused.error is not None
    assert refused.error.code == "invalid_field"


async def test_an_answer_without_usage_keeps_the_estimates_and_says_so() -> None:
    plan = Plan(usage=None)
    async with (
        FakeUpstream({"Say hello": plan}) as fake,
        openai_gateway(fake.base_url) as (
            gw,
            client,
        ),
    ):
        await client.chat("r1", "Say hello")
        response = await client.response("r1")
        assert response.status is ResponseStatus.COMPLETED
        # The prompt estimate and one token per delta, both listed as estimates.
        assert response.usage.input_tokens == estimate_tokens("Say hello")
        assert response.usage.output_tokens == 4
        assert response.usage.estimated == ("input_tokens", "output_tokens")
        await settled(gw)


async def test_metadata_sets_max_tokens_and_temperature_and_messages_go_as_they_are() -> None:
    async with FakeUpstream() as fake, openai_gateway(fake.base_url, max_tokens=64) as (_, client):
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Say hello"},
        ]
        metadata = {"max_tokens": 5, "temperature": 0.25, "tokens": "ignored"}
        track = client.track("r1")
        chat = Chat(
            request_id="r1",
            messages=tuple(ChatMessage(**m) for m in messages),
            metadata=metadata,
        )
        await client.send(chat)
        response = await client.response("r1")
        assert response.status is ResponseStatus.COMPLETED, response.error
        assert track.response is response
        (seen,) = fake.requests
        assert seen.body["messages"] == messages
        assert (seen.body["max_tokens"], seen.body["temperature"]) == (5, 0.25)


async def test_a_connection_is_reused_for_complete_answers_and_closed_at_shutdown() -> None:
    async with FakeUpstream() as fake:
        async with openai_gateway(fake.base_url) as (_, client):
            for n in range(3):
                await client.chat(f"r{n}", "Say hello")
                assert (await client.response(f"r{n}")).status is ResponseStatus.COMPLETED
            assert fake.connections == 1  # one pooled connection carried all three
            assert [seen.connection for seen in fake.requests] == [1, 1, 1]
        # Gateway.shutdown closed the backend's pool: the fake saw its idle connection go.
        await fake.wait_idle()


async def test_an_answer_without_done_but_with_its_finish_reason_completes() -> None:
    async with (
        FakeUpstream(default=Plan(then="no_done")) as fake,
        openai_gateway(fake.base_url) as (_, client),
    ):
        await client.chat("r1", "Say hello")
        response = await client.response("r1")
        assert response.status is ResponseStatus.COMPLETED
        assert response.content == "Hello, world!"


# -- cancel -----------------------------------------------------------------------------------


async def _cancel_once(
    gw: Gateway, client: WireClient, fake: FakeUpstream, request_id: str, how: str
) -> tuple[float, Seen, Track]:
    """Start an endless answer, cancel it after 3 chunks; the time from the cancel leaving the
    client to the fake upstream reading the gateway's EOF."""
    track = await client.chat(request_id, "Write an endless story")
    await client.chunks(request_id, 3)
    seen = fake.requests[-1]
    assert track.response is None
    if how == "frame":
        await client.cancel(request_id)
        assert track.cancel_sent_at is not None
        sent = track.cancel_sent_at
    else:
        sent = time.monotonic()
        answer = await http("DELETE", f"{gw.http_url}/v1/requests/{request_id}")
        assert (answer.status, answer.json()["status"]) == (200, "cancelled")
    response = await client.response(request_id)
    assert response.status is ResponseStatus.CANCELLED
    await asyncio.wait_for(seen.closed.wait(), 5)
    assert seen.closed_at is not None
    # A real server stops generating when it sees the disconnect: this one did.
    assert seen.tokens_after(sent) <= 3, seen.tokens_after(sent)
    usage = await client.final_usage(request_id)
    # Cut before the usage chunk: the prompt estimate, one token per delta read.
    assert usage.input_tokens == estimate_tokens("Write an endless story")
    assert len(track.chunks) <= usage.output_tokens <= len(seen.token_times)
    assert usage.saved_tokens == 1024 - usage.output_tokens
    # ... so all three are the gateway's estimates, in the response already and at the end.
    assert response.usage.estimated == ("input_tokens", "output_tokens", "saved_tokens")
    assert usage.estimated == ("input_tokens", "output_tokens", "saved_tokens")
    return seen.closed_at - sent, seen, track


def _report(label: str, latencies: list[float]) -> str:
    ms = sorted(x * 1000 for x in latencies)
    return (
        f"{label} -> upstream EOF, {len(ms)} runs: min {ms[0]:.2f} / p50 "
        f"{statistics.median(ms):.2f} / p90 {ms[int(len(ms) * 0.9) - 1]:.2f} / max {ms[-1]:.2f} ms"
    )


async def test_a_cancel_frame_closes_the_upstream_connection_at_once() -> None:
    async with (
        FakeUpstream(default=ENDLESS) as fake,
        openai_gateway(fake.base_url) as (gw, client),
    ):
        latencies = []
        for n in range(CANCEL_RUNS):
            latency, _, _ = await _cancel_once(gw, client, fake, f"c{n}", "frame")
            latencies.append(latency)
        print("\n" + _report("cancel frame", latencies))
        assert max(latencies) < CANCEL_TO_UPSTREAM_CLOSE_S, _report("cancel frame", latencies)
        # Every cut connection left the pool: each answer had a connection of its own.
        assert fake.connections == CANCEL_RUNS
        await settled(gw)  # every pipeline halted: no task left behind
    assert fake.unexpected == []


async def test_an_http_delete_closes_the_upstream_connection_at_once() -> None:
    async with (
        FakeUpstream(default=ENDLESS) as fake,
        openai_gateway(fake.base_url) as (gw, client),
    ):
        latencies = []
        for n in range(5):
            latency, _, _ = await _cancel_once(gw, client, fake, f"d{n}", "delete")
            latencies.append(latency)
        print("\n" + _report("HTTP DELETE", latencies))
        assert max(latencies) < CANCEL_TO_UPSTREAM_CLOSE_S, _report("HTTP DELETE", latencies)
        await settled(gw)


async def _cut_before_cancel_returns() -> None:
    async with (
        FakeUpstream(default=ENDLESS) as fake,
        openai_gateway(fake.base_url) as (gw, client),
    ):
        for n in range(5):
            request_id = f"s{n}"
            await client.chat(request_id, "Write an endless story")
            await client.chunks(request_id, 3)
            seen = fake.requests[-1]
            (request,) = [r for r in gw.registry.active() if r.key.request_id == request_id]
            assert not seen.peer_hung_up()
            # What the gateway runs in the loop turn that reads a cancel frame or a DELETE.
            assert request.cancel(CancelReason.API) is CancelStatus.CANCELLED
            assert seen.peer_hung_up()  # no await since: the FIN left within cancel()
            assert (await client.response(request_id)).status is ResponseStatus.CANCELLED
        await settled(gw)


async def test_the_upstream_socket_is_shut_down_before_the_cancel_returns() -> None:
    """The same loop turn, not the next: the FIN has reached the upstream's socket when the
    gateway's (synchronous) cancel returns, before any other callback or task runs."""
    await _cut_before_cancel_returns()


def test_a_cancel_closes_the_upstream_connection_on_uvloop_too() -> None:
    """``muxgate serve`` runs on uvloop, whose transport sockets refuse ``shutdown()``."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> list[float]:
        async with (
            FakeUpstream(default=ENDLESS) as fake,
            openai_gateway(fake.base_url) as (gw, client),
        ):
            latencies = []
            for n in range(5):
                latency, _, _ = await _cancel_once(gw, client, fake, f"u{n}", "frame")
                latencies.append(latency)
            assert fake.connections == 5
            await settled(gw)
            return latencies

    latencies = uvloop.run(scenario())
    print("\n" + _report("cancel frame (uvloop)", latencies))
    assert max(latencies) < CANCEL_TO_UPSTREAM_CLOSE_S
    uvloop.run(_cut_before_cancel_returns())


async def test_a_cancel_before_the_response_headers_closes_the_connection_too() -> None:
    """Before the headers httpx offers no socket: the read is cancelled and httpcore closes
    the connection when the reading task runs next."""
    async with (
        FakeUpstream(default=Plan(hang=True)) as fake,
        openai_gateway(fake.base_url) as (gw, client),
    ):
        track = await client.chat("h1", "Think before answering")
        (seen,) = await fake.wait_requests(1)
        await client.cancel("h1")
        assert (await client.response("h1")).status is ResponseStatus.CANCELLED
        await asyncio.wait_for(seen.closed.wait(), 5)
        assert track.cancel_sent_at is not None
        assert seen.closed_at is not None
        assert seen.closed_at - track.cancel_sent_at < CANCEL_TO_UPSTREAM_CLOSE_S
        await settled(gw)


# -- a cut stream, counted with the upstream's tokenizer ---------------------------------------

#: Three pieces, then nothing until the gateway hangs up: a cancel after the third chunk cuts
#: the answer at a known point, before its usage chunk.
THREE_THEN_STALL = Plan(tokens=("Hello", ",", " world"), then="stall")
RECEIVED = "Hello, world"
ALL_ESTIMATED = ("input_tokens", "output_tokens", "saved_tokens")


def user(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


async def _cancel_after_three(
    client: WireClient, request_id: str, prompt: str = "Tell me"
) -> tuple[Track, Usage]:
    """Cancel a THREE_THEN_STALL answer once its three chunks arrived; the final usage. The
    cancelled response carries the per-piece estimates: it never waits for a count."""
    track = await client.chat(request_id, prompt)
    await client.chunks(request_id, 3)
    assert "".join(chunk.text for chunk in track.chunks) == RECEIVED
    await client.cancel(request_id)
    response = await client.response(request_id)
    assert response.status is ResponseStatus.CANCELLED
    assert not response.usage.final
    assert (response.usage.input_tokens, response.usage.output_tokens) == (
        estimate_tokens(prompt),
        3,
    )
    assert response.usage.estimated == ALL_ESTIMATED
    return track, await client.final_usage(request_id)


@pytest.mark.parametrize("dialect", ["llama.cpp", "vllm"])
async def test_a_cancelled_stream_is_counted_with_the_upstreams_tokenizer(dialect: str) -> None:
    async with (
        FakeUpstream({"Tell me": THREE_THEN_STALL}, tokenizer=dialect) as fake,
        openai_gateway(fake.base_url, tokenize=dialect) as (gw, client),
    ):
        # A complete answer has the provider's own figures: nothing to count.
        await client.chat("done", "Say hello")
        assert (await client.response("done")).usage.estimated == ()
        assert fake.tokenize_requests == []

        _, usage = await _cancel_after_three(client, "cut")
        # The prompt under the server's chat template: exact, so no longer an estimate.
        assert usage.input_tokens == prompt_tokens(user("Tell me"), dialect)
        if dialect == "llama.cpp":  # one token per delta: the pieces received are the count
            assert usage.output_tokens == 3
        else:  # vLLM may group tokens: the text's tokens, at least one per piece
            assert usage.output_tokens == text_tokens(RECEIVED)
        # The output may miss a token or two the model generated and never sent: an estimate.
        assert usage.estimated == ("output_tokens", "saved_tokens")
        expected = estimate_tokens("Tell me") + 1024
        assert usage.saved_tokens == expected - usage.input_tokens - usage.output_tokens

        # Counted after the cut, with the dialect's endpoints at the server's root.
        (cut,) = [seen for seen in fake.requests if seen.prompt == "Tell me"]
        await asyncio.wait_for(cut.closed.wait(), 5)
        assert cut.closed_at is not None
        assert all(seen.received_at >= cut.closed_at for seen in fake.tokenize_requests)
        asked = [(seen.method, seen.path, seen.body) for seen in fake.tokenize_requests]
        if dialect == "llama.cpp":
            assert asked == [
                ("POST", "/apply-template", {"messages": user("Tell me")}),
                (
                    "POST",
                    "/tokenize",
                    {
                        "content": chat_template(user("Tell me")),
                        "add_special": True,
                        "parse_special": True,
                    },
                ),
            ]
        else:
            assert asked == [
                (
                    "POST",
                    "/tokenize",
                    {
                        "model": "test-model",
                        "messages": user("Tell me"),
                        "add_generation_prompt": True,
                    },
                ),
                (
                    "POST",
                    "/tokenize",
                    {"model": "test-model", "prompt": RECEIVED, "add_special_tokens": False},
                ),
            ]
        assert {seen.headers["accept"] for seen in fake.tokenize_requests} == {"application/json"}
        await settled(gw)
    assert fake.unexpected == []


async def test_a_failure_mid_answer_is_counted_in_its_failed_response() -> None:
    async with (
        FakeUpstream(
            {"fail": Plan(tokens=("Hello", " world"), then="drop")}, tokenizer="vllm"
        ) as fake,
        openai_gateway(fake.base_url, tokenize="vllm") as (gw, client),
    ):
        await client.chat("r1", "fail")
        response = await client.response("r1")
        assert response.status is ResponseStatus.FAILED
        assert response.error is not None
        assert response.error.code == "upstream_disconnected"
        usage = response.usage
        assert usage.final
        assert usage.input_tokens == prompt_tokens(user("fail"), "vllm")
        assert usage.output_tokens == text_tokens("Hello world")
        assert usage.estimated == ("output_tokens",)
        assert len(fake.tokenize_requests) == 2
        await settled(gw)


async def test_a_tokenizer_that_does_not_answer_delays_only_the_final_usage_and_by_its_bound() -> (
    None
):
    bound = 0.5
    async with (
        FakeUpstream(
            {"Tell me": THREE_THEN_STALL}, tokenizer="llama.cpp", tokenize_hang=True
        ) as fake,
        openai_gateway(fake.base_url, tokenize="llama.cpp", tokenize_timeout_s=bound) as (
            gw,
            client,
        ),
    ):
        track = await client.chat("r1", "Tell me")
        await client.chunks("r1", 3)
        await client.cancel("r1")
        response = await client.response("r1")
        assert response.status is ResponseStatus.CANCELLED
        (asked,) = await fake.wait_tokenize_requests(1)
        # The cancelled response went out at once, with the estimates, while the count waits.
        assert not response.usage.final
        assert track.usage_report is None
        usage = await client.final_usage("r1")
        assert track.cancel_sent_at is not None
        elapsed = time.monotonic() - track.cancel_sent_at
        assert bound <= elapsed < bound + 2.0, elapsed
        # It gave up: the estimates stay, and say so.
        assert (usage.input_tokens, usage.output_tokens) == (estimate_tokens("Tell me"), 3)
        assert usage.estimated == ALL_ESTIMATED
        await asyncio.wait_for(asked.closed.wait(), 5)  # and hung up on the tokenizer
        await settled(gw)


@pytest.mark.parametrize(
    ("offered", "status", "configured"),
    [
        pytest.param(None, 200, "llama.cpp", id="no-tokenizer-endpoint"),
        pytest.param("llama.cpp", 500, "llama.cpp", id="tokenizer-error"),
        pytest.param("vllm", 200, "llama.cpp", id="another-dialect"),
        pytest.param("llama.cpp", 200, "vllm", id="another-dialect-reversed"),
    ],
)
async def test_a_tokenizer_that_fails_leaves_the_estimates(
    offered: str | None, status: int, configured: str
) -> None:
    async with (
        FakeUpstream(
            {"Tell me": THREE_THEN_STALL}, tokenizer=offered, tokenize_status=status
        ) as fake,
        openai_gateway(fake.base_url, tokenize=configured) as (gw, client),
    ):
        for n in range(2):  # the second time too (the first failure is logged as a warning)
            _, usage = await _cancel_after_three(client, f"r{n}")
            assert (usage.input_tokens, usage.output_tokens) == (estimate_tokens("Tell me"), 3)
            assert usage.estimated == ALL_ESTIMATED
        assert fake.tokenize_requests  # it asked
        await settled(gw)


async def test_without_option_tokenize_a_cut_stream_keeps_the_estimates_and_asks_nothing() -> None:
    async with (
        FakeUpstream({"Tell me": THREE_THEN_STALL}, tokenizer="llama.cpp") as fake,
        openai_gateway(fake.base_url) as (gw, client),
    ):
        _, usage = await _cancel_after_three(client, "r1")
        assert (usage.input_tokens, usage.output_tokens) == (estimate_tokens("Tell me"), 3)
        assert usage.estimated == ALL_ESTIMATED
        await settled(gw)
        assert fake.tokenize_requests == []


async def test_a_stream_cut_before_its_first_piece_is_not_counted() -> None:
    """Nothing received, and nothing proves the prompt was processed: the estimates stay."""
    async with (
        FakeUpstream({"Think": Plan(tokens=(), then="stall")}, tokenizer="llama.cpp") as fake,
        openai_gateway(fake.base_url, tokenize="llama.cpp") as (gw, client),
    ):
        await client.chat("r1", "Think")
        await fake.wait_requests(1)
        await client.cancel("r1")
        assert (await client.response("r1")).status is ResponseStatus.CANCELLED
        usage = await client.final_usage("r1")
        assert (usage.input_tokens, usage.output_tokens) == (estimate_tokens("Think"), 0)
        assert usage.estimated == ALL_ESTIMATED
        await settled(gw)
        assert fake.tokenize_requests == []


async def test_the_count_keeps_the_calls_place_in_line_and_needs_no_more_connections() -> None:
    """max_concurrency=1: one connection in the pool. The count uses the one the cut freed, and
    the request waiting in line starts once the count is done."""
    async with FakeUpstream({"Tell me": THREE_THEN_STALL}, tokenizer="llama.cpp") as fake:
        options = upstream_options(fake.base_url, max_concurrency=1, tokenize="llama.cpp")
        backend = Recording(**options)
        async with openai_gateway(fake.base_url, backend=backend) as (gw, client):
            await client.chat("cut", "Tell me")
            await client.chunks("cut", 3)
            await client.chat("next", "Say hello")
            await backend.entered_event("next").wait()  # waiting in line
            await client.cancel("cut")
            usage = await client.final_usage("cut")
            assert usage.input_tokens == prompt_tokens(user("Tell me"), "llama.cpp")
            assert usage.estimated == ("output_tokens", "saved_tokens")
            nxt = await client.response("next")
            assert nxt.status is ResponseStatus.COMPLETED
            assert nxt.content == "Hello, world!"
            (second,) = [seen for seen in fake.requests if seen.prompt == "Say hello"]
            assert len(fake.tokenize_requests) == 2
            for asked in fake.tokenize_requests:
                assert asked.finished_at is not None
                assert asked.finished_at <= second.received_at
            await settled(gw)


# -- failures ---------------------------------------------------------------------------------

FAILURES = [
    # plan, backend options, code, requests the upstream sees (retries=1), message contains
    pytest.param(
        Plan(status=429, error_body=b'{"error": {"message": "Rate limit reached"}}'),
        {},
        "upstream_rate_limited",
        2,
        "Rate limit reached",
        id="429",
    ),
    pytest.param(
        Plan(status=400, error_body=b'{"error": {"message": "max_tokens is too large"}}'),
        {},
        "upstream_rejected",
        1,
        "HTTP 400",
        id="400",
    ),
    pytest.param(
        Plan(status=404, error_body=b"<html><body>no such page</body></html>"),
        {},
        "upstream_rejected",
        1,
        "HTTP 404",
        id="404-html",
    ),
    pytest.param(Plan(status=500), {}, "upstream_error", 2, "HTTP 500", id="500"),
    pytest.param(Plan(status=503), {}, "upstream_error", 2, "HTTP 503", id="503"),
    pytest.param(
        Plan(tokens=("a", "b"), then="stall"),
        {"stall_timeout_s": 0.3},
        "upstream_timeout",
        1,
        "no token",
        id="stall-mid-answer",
    ),
    pytest.param(
        Plan(hang=True), {"stall_timeout_s": 0.3}, "upstream_timeout", 1, "no answer", id="hang"
    ),
    pytest.param(
        Plan(tokens=("a",), then="comments"),
        {"stall_timeout_s": 0.3},
        "upstream_timeout",
        1,
        "no token",
        id="keep-alive-comments-only",
    ),
    pytest.param(
        Plan(tokens=("a",), then="garbage"),
        {},
        "upstream_bad_response",
        1,
        "not a server-sent event",
        id="not-sse",
    ),
    pytest.param(
        Plan(tokens=("a",), then="garbage", garbage=b"data: {oops\n\n"),
        {},
        "upstream_bad_response",
        1,
        "not JSON",
        id="not-json",
    ),
    pytest.param(
        Plan(tokens=("a",), then="garbage", garbage=b'data: {"id": "x"}\n\n'),
        {},
        "upstream_bad_response",
        1,
        "without choices",
        id="no-choices",
    ),
    pytest.param(
        Plan(
            tokens=(), then="garbage", garbage=b'data: {"error": {"message": "out of memory"}}\n\n'
        ),
        {},
        "upstream_error",
        1,
        "out of memory",
        id="error-event",
    ),
    pytest.param(
        Plan(tokens=("a", "b"), then="drop"),
        {},
        "upstream_disconnected",
        1,
        "mid-answer",
        id="drop-mid-answer",
    ),
]


@pytest.mark.parametrize(("plan", "extra", "code", "requests", "says"), FAILURES)
async def test_each_failure_has_its_code_and_touches_no_other_request(
    plan: Plan, extra: dict[str, Any], code: str, requests: int, says: str
) -> None:
    async with (
        FakeUpstream({"fail": plan}, default=Plan(token_delay=0.01)) as fake,
        openai_gateway(fake.base_url, retries=1, **extra) as (gw, client),
    ):
        await client.chat("bad", "fail")
        await client.chat("good", "fine")  # same connection, same upstream, at the same time
        failed = await client.response("bad")
        assert failed.status is ResponseStatus.FAILED
        assert failed.error is not None
        assert failed.error.code == code, failed.error
        assert says in failed.error.message, failed.error.message
        assert "<" not in failed.error.message  # no HTML quoted
        assert "127.0.0.1" not in failed.error.message  # no upstream internals
        good = await client.response("good")
        assert good.status is ResponseStatus.COMPLETED
        assert good.content == "Hello, world!"
        await settled(gw)
        assert sum(1 for seen in fake.requests if seen.prompt == "fail") == requests
        usage = failed.usage
        if plan.status != 200:  # refused: the upstream processed nothing
            assert (usage.input_tokens, usage.output_tokens) == (0, 0)
            assert usage.estimated == ()  # ... and that zero is exact
        elif not plan.hang:  # cut mid-answer: the prompt estimate and the deltas read
            assert usage.input_tokens == estimate_tokens("fail")
            assert usage.output_tokens == len(plan.tokens or ())
            assert usage.estimated == ("input_tokens", "output_tokens")
        if plan.hang or plan.then in ("stall", "comments", "garbage"):
            # The gateway hung up, so a real server would stop generating.
            failing = [seen for seen in fake.requests if seen.prompt == "fail"]
            await asyncio.wait_for(failing[-1].closed.wait(), 5)


async def test_a_refused_connection_fails_upstream_unavailable() -> None:
    base_url = f"http://127.0.0.1:{unused_port()}/v1"
    async with openai_gateway(base_url, retries=2) as (gw, client):
        await client.chat("r1", "hello")
        response = await client.response("r1")
        assert response.status is ResponseStatus.FAILED
        assert response.error is not None
        assert response.error.code == "upstream_unavailable"
        assert str(base_url.split(":")[2].split("/")[0]) not in response.error.message
        assert (response.usage.input_tokens, response.usage.output_tokens) == (0, 0)
        await settled(gw)


@pytest.mark.parametrize("status", [500, 429])
async def test_a_failure_before_the_first_token_is_retried(status: int) -> None:
    async with FakeUpstream({"hello": [Plan(status=status), Plan()]}) as fake:
        backend = Recording(**upstream_options(fake.base_url, retries=1))
        async with openai_gateway(fake.base_url, backend=backend) as (gw, client):
            await client.chat("r1", "hello")
            response = await client.response("r1")
            assert response.status is ResponseStatus.COMPLETED, response.error
            assert response.content == "Hello, world!"
            # The refused attempt consumed nothing: the figures are the second call's.
            assert (response.usage.input_tokens, response.usage.output_tokens) == (21, 9)
            assert response.usage.estimated == ()  # both calls' figures are reported
            assert len(fake.requests) == 2
            assert [s.name for s in steps(backend, "r1")] == ["completion", "completion-retry-1"]
            await settled(gw)


async def test_no_retry_after_a_first_token() -> None:
    async with (
        FakeUpstream({"hello": Plan(tokens=("a", "b"), then="drop")}) as fake,
        openai_gateway(fake.base_url, retries=3) as (gw, client),
    ):
        track = await client.chat("r1", "hello")
        response = await client.response("r1")
        assert response.status is ResponseStatus.FAILED
        assert response.error is not None
        assert response.error.code == "upstream_disconnected"
        assert [chunk.text for chunk in track.chunks] == ["a", "b"]  # never twice
        assert len(fake.requests) == 1
        await settled(gw)


# -- the line of waiting requests -------------------------------------------------------------


async def test_max_concurrency_one_runs_the_second_call_after_the_first() -> None:
    async with (
        FakeUpstream(default=Plan(token_delay=0.01)) as fake,
        openai_gateway(fake.base_url, max_concurrency=1) as (gw, client),
    ):
        await client.chat("r1", "first")
        await client.chat("r2", "second")
        for request_id in ("r1", "r2"):
            assert (await client.response(request_id)).status is ResponseStatus.COMPLETED
        first, second = fake.requests
        assert (first.prompt, second.prompt) == ("first", "second")  # first come, first served
        assert first.finished_at is not None
        assert second.received_at >= first.finished_at
        assert fake.max_active == 1
        await settled(gw)


async def test_a_request_still_waiting_at_its_deadline_fails_upstream_busy() -> None:
    async with (
        FakeUpstream(default=ENDLESS) as fake,
        openai_gateway(fake.base_url, max_concurrency=1) as (gw, client),
    ):
        await client.chat("long", "Write an endless story")
        await fake.wait_requests(1)
        started = time.monotonic()
        await client.chat("late", "hello", timeout_ms=300)
        response = await client.response("late")
        assert response.status is ResponseStatus.FAILED
        assert response.error is not None
        assert response.error.code == "upstream_busy"
        assert time.monotonic() - started >= 0.2  # it waited in line until near its deadline
        assert len(fake.requests) == 1  # and nothing was sent for it
        assert client.tracks["long"].response is None  # the running one runs on
        await client.cancel("long")
        await client.response("long")
        await settled(gw)


async def test_a_cancel_while_waiting_in_line_halts_at_once_and_sends_nothing() -> None:
    async with FakeUpstream(default=ENDLESS) as fake:
        backend = Recording(**upstream_options(fake.base_url, max_concurrency=1))
        async with openai_gateway(fake.base_url, backend=backend) as (gw, client):
            await client.chat("long", "Write an endless story")
            await fake.wait_requests(1)
            await client.chat("queued", "hello")
            await backend.entered_event("queued").wait()  # in run: waiting in line
            await client.cancel("queued")
            response = await client.response("queued")
            assert response.status is ResponseStatus.CANCELLED
            usage = await client.final_usage("queued")
            assert (usage.input_tokens, usage.output_tokens) == (0, 0)
            assert steps(backend, "queued") == []  # no upstream call started (G5)
            # The slot goes on to nobody: the running answer still runs, alone.
            await client.cancel("long")
            await client.response("long")
            await settled(gw)
            assert len(fake.requests) == 1
            assert [s.kind for s in steps(backend, "long")] == ["llm_stream"]


# -- metadata, the key, the options -----------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "key"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1025}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": None}, "temperature"),
    ],
)
async def test_bad_metadata_fails_invalid_field(metadata: dict[str, Any], key: str) -> None:
    async with FakeUpstream() as fake, openai_gateway(fake.base_url) as (gw, client):
        await client.chat("r1", "hello", metadata=metadata)
        response = await client.response("r1")
        assert response.status is ResponseStatus.FAILED
        assert response.error is not None
        assert response.error.code == "invalid_field"
        assert repr(key) in response.error.message
        assert "hot" not in response.error.message  # a string's value is never echoed
        await settled(gw)
        assert fake.requests == []


@contextlib.contextmanager
def every_log_line() -> Iterator[list[str]]:
    """Every log line while the block runs, at debug level: the standard library's (httpx and
    httpcore included) and structlog's."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect(logging.DEBUG)
    loggers = [logging.getLogger(name) for name in ("", "httpx", "httpcore")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    loggers[0].addHandler(handler)
    try:
        with structlog.testing.capture_logs() as events:
            yield lines
    finally:
        loggers[0].removeHandler(handler)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        lines.extend(repr(event) for event in events)


async def test_the_api_key_is_sent_as_bearer_and_never_logged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = "sk-test-" + os.urandom(12).hex()
    monkeypatch.setenv(KEY_ENV, secret)
    refused = Plan(
        status=401,
        error_body=b'{"error": {"message": "Incorrect API key provided: %s."}}' % secret.encode(),
    )
    with every_log_line() as lines:
        async with (
            FakeUpstream({"who": refused}) as fake,
            openai_gateway(fake.base_url) as (gw, client),
        ):
            await client.chat("r1", "hello")
            assert (await client.response("r1")).status is ResponseStatus.COMPLETED
            await client.chat("r2", "who")
            failed = await client.response("r2")
            assert failed.error is not None
            assert failed.error.code == "upstream_rejected"
            assert "HTTP 401" in failed.error.message
            assert secret not in failed.error.message
            assert "[redacted]" in failed.error.message
            assert secret not in repr(gw.backend)
            await settled(gw)
        assert [seen.headers["authorization"] for seen in fake.requests] == [f"Bearer {secret}"] * 2
    assert any("request.finished" in line for line in lines)  # the capture works
    assert not [line for line in lines if secret in line]


def test_options_are_checked_at_start_up() -> None:
    base = {"base_url": "http://127.0.0.1:1/v1", "model": "m"}
    with pytest.raises(ConfigError, match="'bogus'"):
        load_backend("openai", **base, bogus=1)
    with pytest.raises(ConfigError, match="api_key_env") as info:
        load_backend("openai", **base, api_key="sk-live-123456")
    assert "sk-live" not in str(info.value)
    with pytest.raises(ConfigError, match="'api_key_env'") as info:
        load_backend("openai", **base, api_key_env="sk-live-123456")
    assert "sk-live" not in str(info.value)
    with pytest.raises(ConfigError, match="'base_url'"):
        load_backend("openai", model="m")
    with pytest.raises(ConfigError, match="'model'"):
        load_backend("openai", base_url="http://127.0.0.1:1/v1")
    with pytest.raises(ConfigError, match="'min_temperature'"):
        load_backend("openai", **base, min_temperature=1.5, max_temperature=1.0)
    backend = load_backend("openai", **base, max_concurrency=3, stall_timeout_s=1)
    assert isinstance(backend, OpenAIBackend)
    assert (backend.max_concurrency, backend.stall_timeout_s) == (3, 1.0)
    assert (backend.tokenize, backend.tokenize_timeout_s) == ("off", 1.0)
    backend = load_backend("openai", **base, tokenize="vllm", tokenize_timeout_s=0.25)
    assert isinstance(backend, OpenAIBackend)
    assert (backend.tokenize, backend.tokenize_timeout_s) == ("vllm", 0.25)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_concurrency", 0),
        ("max_concurrency", "8"),
        ("max_concurrency", True),
        ("stall_timeout_s", 0),
        ("stall_timeout_s", -1),
        ("stall_timeout_s", "30"),
        ("stall_timeout_s", float("nan")),
        ("connect_timeout_s", 0),
        ("retries", -1),
        ("retries", 1.5),
        ("retry_backoff_s", -1),
        ("max_tokens", 0),
        ("min_temperature", -1),
        ("base_url", "ftp://example.com/v1"),
        ("base_url", "not a url"),
        ("base_url", 5),
        ("model", ""),
        ("model", 5),
        ("tokenize", "auto"),
        ("tokenize", "on"),
        ("tokenize", True),
        ("tokenize", ["vllm"]),
        ("tokenize_timeout_s", 0),
        ("tokenize_timeout_s", "1"),
    ],
)
def test_a_bad_option_value_names_the_option(option: str, value: Any) -> None:
    options = {"base_url": "http://127.0.0.1:1/v1", "model": "m", option: value}
    with pytest.raises(ConfigError, match=repr(option)):
        load_backend("openai", **options)


def test_options_come_from_the_environment_and_flags_like_every_setting() -> None:
    config = load_config(
        environ={
            "MUXGATE_BACKEND": "openai",
            "MUXGATE_BACKEND_OPTIONS": '{"base_url": "http://127.0.0.1:1/v1", "model": "m"}',
        },
        flags={"backend_options": ["max_concurrency=2", "model=llama3"]},
    )
    backend = Gateway(config).backend
    assert isinstance(backend, OpenAIBackend)
    assert (backend.model, backend.max_concurrency) == ("llama3", 2)
    with pytest.raises(ConfigError, match="'bogus'"):
        Gateway(Config(backend="openai", backend_options={"bogus": 1}))


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUXGATE_")}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_without_httpx_the_error_names_the_extra() -> None:
    done = _python(
        "import sys\n"
        "sys.modules['httpx'] = None  # as if not installed\n"
        "try:\n"
        "    import gateway.backends.openai\n"
        "except ModuleNotFoundError as exc:\n"
        "    print('import:', exc)\n"
        "from gateway.backends import load_backend\n"
        "try:\n"
        "    load_backend('openai', base_url='http://127.0.0.1:1/v1', model='m')\n"
        "except Exception as exc:\n"
        "    print('load:', type(exc).__name__, exc)\n"
    )
    assert done.returncode == 0, done.stderr
    import_line, load_line = done.stdout.splitlines()
    assert import_line.startswith("import:") and "muxgate[upstream]" in import_line  # noqa: PT018
    assert load_line.startswith("load: ConfigError") and "muxgate[upstream]" in load_line  # noqa: PT018


def test_the_default_backend_never_imports_httpx() -> None:
    done = _python(
        "import asyncio, sys\n"
        "from gateway.config import Config\n"
        "from gateway.server import Gateway\n"
        "async def main():\n"
        "    async with Gateway(Config(port=0)):\n"
        "        pass\n"
        "asyncio.run(main())\n"
        "print('httpx' in sys.modules)\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_tool_call_deltas_assemble_and_bad_ones_are_typed_failures() -> None:
    from gateway.backends.openai import MAX_TOOL_CALLS, ToolCall, UpstreamFailure, _Call

    call = _Call()
    call.add_tool_call_deltas(
        [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": ""}}]
    )
    call.add_tool_call_deltas([{"index": 0, "function": {"arguments": '{"a"'}}])
    call.add_tool_call_deltas([{"index": 0, "function": {"arguments": ": 1}"}}])
    call.add_tool_call_deltas([{"index": 1, "function": {"name": "g"}}])
    assert call.finished_tool_calls() == [
        ToolCall(id="c1", name="f", arguments='{"a": 1}'),
        ToolCall(id="call_1", name="g", arguments=""),
    ]
    for bad in (
        {"index": 0},  # not a list
        [{"index": "0"}],
        [{"index": 0, "function": "f"}],
        [{"index": 0, "function": {"arguments": 5}}],
        [{"index": i} for i in range(MAX_TOOL_CALLS + 1)],
    ):
        with pytest.raises(UpstreamFailure) as info:
            _Call().add_tool_call_deltas(bad)
        assert info.value.code == "upstream_bad_response"
