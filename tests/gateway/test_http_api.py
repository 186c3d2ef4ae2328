"""End-to-end: the HTTP API on the WebSocket port (SPEC.md §8), and the seed's cURL line.

Real gateway on an ephemeral port (the seed test: the real ``muxgate serve`` on port 8001), real
sockets, HTTP through the stdlib. A request is driven over a WebSocket with the strict
:class:`WireClient` (which fails the test on any chunk after a response, a seq gap, a second
response...), and cancelled or read over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.auth import make_token
from gateway.pipeline import RequestContext
from gateway.server import Gateway
from protocol import (
    CancelReason,
    CancelStatus,
    Codec,
    ErrorCode,
    Ping,
    Pong,
    Response,
    ResponseStatus,
    UsageReport,
)

from .conftest import native_transport, running_gateway, settled
from .http_client import HttpAnswer, http
from .wire import Track, WireClient

REPO = Path(__file__).resolve().parents[2]

#: A request that runs for seconds unless cancelled (2000 tokens, 5 ms each).
SLOW = {"tokens": 2000, "token_delay_ms": 5}
SECRET = "http-test-secret-" + "0123456789abcdef" * 4
KEY = "k1-http-test-key"

_ping_ids = itertools.count(1)


# --- helpers ---------------------------------------------------------------------------------


def expect_json(answer: HttpAnswer, status: int) -> Any:
    """``answer`` has ``status`` and exactly one Content-Type, application/json (SPEC.md §8)."""
    assert answer.status == status, (answer.status, answer.body)
    assert answer.content_types == ["application/json"], answer.content_types
    return answer.json()


def usage_json(response: Response | UsageReport) -> dict[str, Any]:
    u = response.usage
    body: dict[str, Any] = {
        "input_tokens": u.input_tokens,
        "output_tokens": u.output_tokens,
        "saved_tokens": u.saved_tokens,
        "final": u.final,
    }
    if u.estimated is not None:  # GET carries the same usage object as the wire
        body["estimated"] = list(u.estimated)
    return body


async def roundtrip(client: WireClient) -> None:
    """Ping and wait for the pong: everything the gateway queued before is now received."""
    ping_id = f"rt-{next(_ping_ids)}"
    await client.send(Ping(id=ping_id))
    await client.wait_for(
        lambda: any(isinstance(m, Pong) and m.id == ping_id for m in client.others)
    )


def after_response(track: Track) -> list[str]:
    """Kinds of the messages about a request that came after its response."""
    kinds = [type(m).__name__ for m in track.log]
    return kinds[kinds.index("Response") + 1 :]


class GatedBackend:
    """Emits one chunk, then runs one non-abortable LLM call that waits for ``gate``.

    So the test decides when the pipeline halts: a cancel read during the call leaves the
    request ``cancelling`` (usage not final) until the gate opens (SPEC.md §8.2).
    """

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.in_call = asyncio.Event()

    async def run(self, ctx: RequestContext) -> None:
        ctx.usage.expect(100)
        await ctx.emit("before the call")

        async def call() -> str:
            self.in_call.set()
            await self.gate.wait()
            ctx.usage.add(input_tokens=7, output_tokens=11)  # consumed after the cancel
            return "done"

        await ctx.llm_call(call)
        await ctx.emit(" after the call")


@contextlib.asynccontextmanager
async def gated_gateway() -> AsyncIterator[tuple[Gateway, GatedBackend]]:
    backend = GatedBackend()
    async with running_gateway(backend_impl=backend) as gw:
        try:
            yield gw, backend
        finally:
            backend.gate.set()  # never leave the pipeline waiting


# --- DELETE ----------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", [pytest.param(c, id=c.name.lower()) for c in Codec])
async def test_delete_active_cancels_with_reason_api(gateway: Gateway, codec: Codec) -> None:
    url = f"{gateway.http_url}/v1/requests/r1"
    async with WireClient.open(gateway.url, codec) as client:
        track = await client.chat("r1", "a long story", metadata=SLOW)
        await client.chunks("r1", 1)
        assert track.response is None

        answer = await http("DELETE", url)
        assert expect_json(answer, 200) == {"request_id": "r1", "status": "cancelled"}

        response = await client.response("r1")
        assert response.status is ResponseStatus.CANCELLED
        assert response.reason is CancelReason.API
        assert response.content == ""
        usage = await client.final_usage("r1")
        assert usage.output_tokens >= len(track.chunks)
        assert usage.saved_tokens > 0

        # Idempotent (SPEC.md §8.1): the second DELETE finds it cancelled.
        answer = await http("DELETE", url)
        assert expect_json(answer, 200) == {"request_id": "r1", "status": "already_cancelled"}

        # Nothing more about r1 on the wire but (at most) its one usage report: no chunk, no
        # second response (the strict client would already have failed), no cancel_result
        # (an HTTP cancel is answered over HTTP only).
        await roundtrip(client)
        assert after_response(track) in ([], ["UsageReport"])
        assert not track.cancel_results
        assert not track.errors
    await settled(gateway)
    assert not gateway.registry.active()


async def test_delete_twice_while_cancelling_and_after_halt() -> None:
    async with gated_gateway() as (gw, backend), WireClient.open(gw.url) as client:
        url = f"{gw.http_url}/v1/requests/r1"
        track = await client.chat("r1")
        await client.chunks("r1", 1)
        await asyncio.wait_for(backend.in_call.wait(), 5)

        assert expect_json(await http("DELETE", url), 200)["status"] == "cancelled"
        # The pipeline is inside its non-abortable call: CANCELLING.
        assert expect_json(await http("DELETE", url), 200) == {
            "request_id": "r1",
            "status": "already_cancelled",
        }
        response = await client.response("r1")
        assert response.reason is CancelReason.API
        assert response.usage.final is False

        backend.gate.set()
        await client.final_usage("r1")
        await settled(gw)
        # CANCELLED and remembered (SPEC.md §5.6).
        assert expect_json(await http("DELETE", url), 200) == {
            "request_id": "r1",
            "status": "already_cancelled",
        }
        # An in-band cancel agrees with HTTP.
        await client.cancel("r1")
        result = await client.cancel_result("r1")
        assert result.status is CancelStatus.ALREADY_CANCELLED
        assert [c.text for c in track.chunks] == ["before the call"]


async def test_delete_completed_is_409(gateway: Gateway) -> None:
    async with WireClient.open(gateway.url) as client:
        await client.chat("done-1")
        response = await client.response("done-1")
        assert response.status is ResponseStatus.COMPLETED
        answer = await http("DELETE", f"{gateway.http_url}/v1/requests/done-1")
        assert expect_json(answer, 409) == {"request_id": "done-1", "status": "already_completed"}
        # The DELETE did not touch the finished request.
        answer = await http("GET", f"{gateway.http_url}/v1/requests/done-1")
        assert expect_json(answer, 200)["status"] == "completed"


async def test_delete_failed_is_409(gateway: Gateway) -> None:
    async with WireClient.open(gateway.url) as client:
        await client.chat("bad-1", metadata={"fail_at_token": 2})
        response = await client.response("bad-1")
        assert response.status is ResponseStatus.FAILED
        answer = await http("DELETE", f"{gateway.http_url}/v1/requests/bad-1")
        assert expect_json(answer, 409) == {"request_id": "bad-1", "status": "already_completed"}


async def test_delete_unknown_is_404(gateway: Gateway) -> None:
    answer = await http("DELETE", f"{gateway.http_url}/v1/requests/never-seen")
    assert expect_json(answer, 404) == {"request_id": "never-seen", "status": "not_found"}


@pytest.mark.parametrize("method", ["DELETE", "GET"])
@pytest.mark.parametrize(
    "segment",
    [
        pytest.param("bad%20id", id="space"),
        pytest.param("a" * 129, id="129-chars"),
        pytest.param("r1%2Fx", id="encoded-slash"),
        pytest.param("caf%C3%A9", id="non-ascii"),
        pytest.param("r1%00", id="nul"),
    ],
)
async def test_invalid_request_id_is_400(gateway: Gateway, method: str, segment: str) -> None:
    answer = await http(method, f"{gateway.http_url}/v1/requests/{segment}")
    body = expect_json(answer, 400)
    assert body["error"]["code"] == ErrorCode.INVALID_FIELD.value
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]


async def test_request_id_boundaries_and_percent_decoding(gateway: Gateway) -> None:
    longest = "a" * 128  # the longest valid id is valid, merely unknown
    answer = await http("GET", f"{gateway.http_url}/v1/requests/{longest}")
    assert expect_json(answer, 404) == {"request_id": longest, "status": "not_found"}
    # The path segment is matched after percent-decoding (SPEC.md §8): %2D is "-".
    async with WireClient.open(gateway.url) as client:
        await client.chat("my-request", metadata=SLOW)
        await client.chunks("my-request", 1)
        answer = await http("DELETE", f"{gateway.http_url}/v1/requests/my%2Drequest")
        assert expect_json(answer, 200) == {"request_id": "my-request", "status": "cancelled"}
        response = await client.response("my-request")
        assert response.reason is CancelReason.API


# --- GET -------------------------------------------------------------------------------------


async def test_get_active_reports_usage_so_far(gateway: Gateway) -> None:
    async with WireClient.open(gateway.url) as client:
        await client.chat("live-1", "the usage so far", metadata=SLOW)
        await client.chunks("live-1", 2)
        body = expect_json(await http("GET", f"{gateway.http_url}/v1/requests/live-1"), 200)
        assert body["request_id"] == "live-1"
        assert body["status"] == "active"
        assert "reason" not in body
        assert "error" not in body
        assert "content" not in body  # no partial results over HTTP (SPEC.md §8.2)
        usage = body["usage"]
        assert set(usage) >= {"input_tokens", "output_tokens", "saved_tokens", "final"}
        assert usage["input_tokens"] > 0  # the plan step's LLM call
        assert usage["output_tokens"] >= 2
        assert usage["saved_tokens"] == 0
        assert usage["final"] is False
        await client.cancel("live-1")
        await client.final_usage("live-1")


async def test_get_after_cancel_cancelling_then_cancelled() -> None:
    async with gated_gateway() as (gw, backend), WireClient.open(gw.url) as client:
        url = f"{gw.http_url}/v1/requests/r1"
        await client.chat("r1")
        await client.chunks("r1", 1)
        await asyncio.wait_for(backend.in_call.wait(), 5)
        assert expect_json(await http("DELETE", url), 200)["status"] == "cancelled"

        body = expect_json(await http("GET", url), 200)
        assert body["status"] == "cancelling"
        assert body["reason"] == "api"
        assert body["usage"]["final"] is False
        assert "content" not in body
        response = await client.response("r1")
        assert body["usage"] == usage_json(response)  # nothing consumed since the cancel

        backend.gate.set()  # the non-abortable call finishes; the checkpoint halts the pipeline
        final = await client.final_usage("r1")
        await settled(gw)
        body = expect_json(await http("GET", url), 200)
        assert body["status"] == "cancelled"
        assert body["reason"] == "api"
        assert body["usage"]["final"] is True
        # Honest usage (SPEC.md §5.4): the call that finished after the cancel is counted.
        assert body["usage"]["input_tokens"] == 7
        assert body["usage"]["output_tokens"] == 11
        assert body["usage"]["saved_tokens"] == 100 - 18
        track = client.tracks["r1"]
        assert track.usage_report is not None
        assert body["usage"] == usage_json(track.usage_report)
        assert final.final


async def test_get_after_inband_cancel_has_reason_client(gateway: Gateway) -> None:
    async with WireClient.open(gateway.url) as client:
        await client.chat("r1", metadata=SLOW)
        await client.chunks("r1", 1)
        await client.cancel("r1")
        await client.final_usage("r1")
        await settled(gateway)
        body = expect_json(await http("GET", f"{gateway.http_url}/v1/requests/r1"), 200)
        assert body["status"] == "cancelled"
        assert body["reason"] == "client"
        assert body["usage"]["final"] is True
        assert body["usage"]["saved_tokens"] > 0


async def test_get_completed(gateway: Gateway) -> None:
    async with WireClient.open(gateway.url) as client:
        await client.chat("done-1", "finish this")
        response = await client.response("done-1")
        assert response.status is ResponseStatus.COMPLETED
        body = expect_json(await http("GET", f"{gateway.http_url}/v1/requests/done-1"), 200)
        assert body["request_id"] == "done-1"
        assert body["status"] == "completed"
        assert "reason" not in body
        assert "error" not in body
        assert "content" not in body
        assert body["usage"] == usage_json(response)
        assert body["usage"]["final"] is True


async def test_get_failed_carries_error(gateway: Gateway) -> None:
    async with WireClient.open(gateway.url) as client:
        await client.chat("bad-1", metadata={"fail_at_token": 2})
        response = await client.response("bad-1")
        assert response.status is ResponseStatus.FAILED
        assert response.error is not None
        body = expect_json(await http("GET", f"{gateway.http_url}/v1/requests/bad-1"), 200)
        assert body["status"] == "failed"
        assert body["usage"]["final"] is True
        assert body["error"] == {"code": response.error.code, "message": response.error.message}


async def test_get_unknown_is_404(gateway: Gateway) -> None:
    answer = await http("GET", f"{gateway.http_url}/v1/requests/nope")
    assert expect_json(answer, 404) == {"request_id": "nope", "status": "not_found"}


async def test_query_string_is_not_part_of_the_id(gateway: Gateway) -> None:
    answer = await http("GET", f"{gateway.http_url}/v1/requests/nope?verbose=1")
    assert expect_json(answer, 404) == {"request_id": "nope", "status": "not_found"}


# --- methods, paths, health, metrics ---------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
async def test_other_methods_on_requests_are_405_with_allow(gateway: Gateway, method: str) -> None:
    answer = await http(method, f"{gateway.http_url}/v1/requests/r1")
    body = expect_json(answer, 405)
    assert "error" in body
    allow = {m.strip() for m in (answer.headers["Allow"] or "").split(",")}
    assert allow == {"GET", "DELETE"}


@pytest.mark.parametrize("path", ["/healthz", "/metrics", "/v1/backend"])
async def test_post_to_read_only_endpoints_is_405(gateway: Gateway, path: str) -> None:
    answer = await http("POST", f"{gateway.http_url}{path}")
    assert answer.status == 405
    assert answer.headers["Allow"] == "GET"


@pytest.mark.parametrize("path", ["/nope", "/v1/requests", "/v2/requests/r1", "/healthz/x"])
async def test_unknown_path_is_404_json(gateway: Gateway, path: str) -> None:
    answer = await http("GET", f"{gateway.http_url}{path}")
    body = expect_json(answer, 404)
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}


async def test_ws_path_without_upgrade_is_426(gateway: Gateway) -> None:
    answer = await http("GET", gateway.url.replace("ws://", "http://"))
    assert answer.status == 426


async def test_backend_describes_its_settings_and_they_bound_the_chat(gateway: Gateway) -> None:
    """``GET /v1/backend``: the simulated backend's settings with the server's bounds; a value
    below a bound fails the chat with ``invalid_field`` (the simulated backend clamps a value
    above its maximum instead, as it documents)."""
    body = expect_json(await http("GET", f"{gateway.http_url}/v1/backend"), 200)
    assert body["backend"] == "simulated"
    assert body["model"] is None
    settings = {s["name"]: s for s in body["settings"]}
    assert set(settings) == {"tokens", "token_delay_ms", "plan_ms", "tool_ms", "agent_ms"}
    tokens = settings["tokens"]
    assert (tokens["type"], tokens["min"], tokens["default"]) == ("integer", 0, 20)  # FAST
    async with WireClient.open(gateway.url) as client:
        await client.chat("under", "hi", metadata={"tokens": tokens["min"] - 1})
        response = await client.response("under")
    assert response.error is not None
    assert response.error.code == "invalid_field"


async def test_backend_passed_in_code_is_custom() -> None:
    class Quiet:
        async def run(self, ctx: RequestContext) -> None:
            return None

    async with running_gateway(backend_impl=Quiet()) as gw:
        body = expect_json(await http("GET", f"{gw.http_url}/v1/backend"), 200)
    assert body == {"backend": "custom", "model": None, "settings": []}


async def test_healthz(gateway: Gateway) -> None:
    answer = await http("GET", f"{gateway.http_url}/healthz")
    assert expect_json(answer, 200) == {"status": "ok"}


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def _scrape(gw: Gateway) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    answer = await http("GET", f"{gw.http_url}/metrics")
    assert answer.status == 200
    assert answer.content_types == ["text/plain; version=0.0.4; charset=utf-8"]
    return _samples(answer.body.decode())


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_prometheus_text(gateway: Gateway) -> None:
    samples = await _scrape(gateway)
    assert _value(samples, "muxgate_connections") == 0
    assert _value(samples, "muxgate_active_requests") == 0

    async with WireClient.open(gateway.url) as client:
        await client.chat("slow-1", metadata=SLOW)
        await client.chat("slow-2", metadata=SLOW)
        await client.chat("fast-1")
        await client.response("fast-1")
        await client.chunks("slow-1", 1)
        await client.chunks("slow-2", 1)
        samples = await _scrape(gateway)
        assert _value(samples, "muxgate_connections") == 1
        assert _value(samples, "muxgate_active_requests") == 2

        await client.cancel("slow-1")  # in-band: reason client
        await client.cancel_result("slow-1")
        answer = await http("DELETE", f"{gateway.http_url}/v1/requests/slow-2")
        assert answer.status == 200
        await client.final_usage("slow-1")
        await client.final_usage("slow-2")
        await roundtrip(client)  # the writer has run its post-send hooks for earlier frames
        await settled(gateway)

        samples = await _scrape(gateway)
        assert _value(samples, "muxgate_active_requests") == 0
        completed = _value(samples, "muxgate_responses_total", status="completed", reason="")
        assert completed == 1
        by_client = _value(samples, "muxgate_responses_total", status="cancelled", reason="client")
        assert by_client == 1
        by_api = _value(samples, "muxgate_responses_total", status="cancelled", reason="api")
        assert by_api == 1
        assert _value(samples, "muxgate_cancel_latency_seconds_count") >= 1
        assert _value(samples, "muxgate_cancel_latency_seconds_bucket", le="+Inf") >= 1
        chunks = sum(len(t.chunks) for t in client.tracks.values())
        assert _value(samples, "muxgate_chunks_sent_total") == chunks > 0
        assert _value(samples, "muxgate_tokens_total", kind="input") > 0
        assert _value(samples, "muxgate_tokens_total", kind="output") >= chunks
        assert _value(samples, "muxgate_saved_tokens_total") > 0

    # The closed connection is counted down; its chunks stay counted.
    samples = await _scrape(gateway)
    assert _value(samples, "muxgate_connections") == 0
    assert _value(samples, "muxgate_chunks_sent_total") == chunks


# --- authentication on HTTP (SPEC.md §8) -----------------------------------------------------


@contextlib.asynccontextmanager
async def alice_request() -> AsyncIterator[tuple[Gateway, WireClient, str]]:
    """An authenticated gateway where alice (by token) runs a slow request ``r1``."""
    async with running_gateway(client_keys=(KEY,), jwt_secret=SECRET) as gw:
        alice = make_token(SECRET, "alice", 600)
        headers = {"Authorization": f"Bearer {alice}"}
        async with WireClient.open(gw.url, headers=headers) as client:
            await client.chat("r1", metadata=SLOW)
            await client.chunks("r1", 1)
            yield gw, client, f"{gw.http_url}/v1/requests/r1"
            if client.tracks["r1"].response is None:
                await client.cancel("r1")
            await client.final_usage("r1")


@pytest.mark.parametrize("method", ["DELETE", "GET"])
@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-credentials"),
        pytest.param({"X-Muxi-User-Id": "alice"}, id="user-header-only"),
        pytest.param({"X-Muxi-Client-Key": "wrong-key"}, id="wrong-key"),
        pytest.param({"X-Muxi-Client-Key": ""}, id="empty-key"),
        pytest.param({"Authorization": "Bearer not.a.token"}, id="garbage-token"),
        pytest.param({"Authorization": "Bearer"}, id="bearer-without-token"),
        pytest.param(
            {"Authorization": f"Bearer {make_token('another-secret-' + 'x' * 64, 'alice')}"},
            id="token-signed-with-another-secret",
        ),
        pytest.param(
            {"Authorization": f"Bearer {make_token(SECRET, 'alice', -60)}"}, id="expired-token"
        ),
        pytest.param(
            {"X-Muxi-Client-Key": KEY, "Authorization": f"Bearer {make_token(SECRET, 'alice')}"},
            id="key-and-token",
        ),
    ],
)
async def test_http_without_valid_credentials_is_401(method: str, headers: dict[str, str]) -> None:
    async with alice_request() as (_, client, url):
        answer = await http(method, url, headers)
        body = expect_json(answer, 401)
        assert body["error"]["code"] == "unauthorized"
        assert "r1" not in answer.body.decode()  # says nothing about the request
        await roundtrip(client)
        assert client.tracks["r1"].response is None  # untouched


async def test_http_with_token_acts_for_its_user() -> None:
    async with alice_request() as (_, client, url):
        alice = {"Authorization": f"Bearer {make_token(SECRET, 'alice')}"}
        body = expect_json(await http("GET", url, alice), 200)
        assert body["status"] == "active"
        # X-Muxi-User-Id equal to sub is redundant and allowed.
        redundant = {**alice, "X-Muxi-User-Id": "alice"}
        assert expect_json(await http("GET", url, redundant), 200)["status"] == "active"

        # A token of alice naming bob: 403, and r1 runs on.
        forbidden = {**alice, "X-Muxi-User-Id": "bob"}
        for method in ("DELETE", "GET"):
            body = expect_json(await http(method, url, forbidden), 403)
            assert body["error"]["code"] == "forbidden"
        await roundtrip(client)
        assert client.tracks["r1"].response is None

        answer = await http("DELETE", url, alice)
        assert expect_json(answer, 200) == {"request_id": "r1", "status": "cancelled"}
        response = await client.response("r1")
        assert response.status is ResponseStatus.CANCELLED
        assert response.reason is CancelReason.API


async def test_http_with_client_key_acts_for_the_named_user() -> None:
    async with alice_request() as (_, client, url):
        as_alice = {"X-Muxi-Client-Key": KEY, "X-Muxi-User-Id": "alice"}
        assert expect_json(await http("GET", url, as_alice), 200)["status"] == "active"
        # Without X-Muxi-User-Id the key acts for the anonymous user, who has no r1.
        anonymous = {"X-Muxi-Client-Key": KEY}
        assert expect_json(await http("GET", url, anonymous), 404)["status"] == "not_found"
        answer = await http("DELETE", url, as_alice)
        assert expect_json(answer, 200)["status"] == "cancelled"
        assert (await client.response("r1")).reason is CancelReason.API


@pytest.mark.parametrize("user", ["bad user", "a" * 129, "bob/../alice"])
async def test_http_invalid_user_header_is_400(user: str) -> None:
    async with alice_request() as (_, _client, url):
        answer = await http("GET", url, {"X-Muxi-Client-Key": KEY, "X-Muxi-User-Id": user})
        assert expect_json(answer, 400)["error"]["code"] == "invalid_field"


# --- the seed's cURL line, verbatim, against the real `muxgate serve` ------------------------

#: Copied verbatim from the seed (Request Cancellation, Quick Start, tab cURL).
SEED_CURL = """curl -X DELETE 'http://localhost:8001/v1/requests/my-request-123' \\
  -H 'X-Muxi-Client-Key: YOUR_CLIENT_KEY' \\
  -H 'X-Muxi-User-Id: user123'"""

SEED_PORT = 8001
SERVE_CONFIG = """\
shutdown_grace = 3.0
log_format = "json"

[backend_options]
tokens = 2000
token_delay_ms = 50
plan_ms = 20
tool_ms = 20
"""
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def _require_port_free(port: int) -> None:
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                pytest.fail(
                    f"port {port} is taken on {host}: the seed's cURL line targets "
                    f"localhost:{port}, so this test needs that port free"
                )
            # no IPv6 loopback here, etc.: nothing can listen there either


def _log(path: Path) -> str:
    return path.read_text(errors="replace")


@contextlib.contextmanager
def _muxgate_serve(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """The real ``muxgate serve`` (default port 8001), with the seed's key from the
    environment and a slow simulated backend from a TOML file; killed if still running."""
    config = tmp_path / "muxgate.toml"
    config.write_text(SERVE_CONFIG, encoding="utf-8")
    log_path = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUXGATE_")}
    env["MUXGATE_CLIENT_KEYS"] = "YOUR_CLIENT_KEY"
    env["PYTHONUNBUFFERED"] = "1"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc, log_path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def _wait_healthy(proc: subprocess.Popen[bytes], log_path: Path, deadline: float) -> None:
    """Poll /healthz until it answers (a bounded loop: the only wait for an external process)."""
    while True:
        if proc.poll() is not None:
            pytest.fail(
                f"muxgate serve exited with {proc.returncode} before answering /healthz:\n"
                + _log(log_path)
            )
        with contextlib.suppress(OSError):
            answer = await http("GET", f"http://127.0.0.1:{SEED_PORT}/healthz")
            if answer.status == 200 and answer.json() == {"status": "ok"}:
                return
        if time.monotonic() > deadline:
            pytest.fail("muxgate serve did not answer /healthz in time:\n" + _log(log_path))
        await asyncio.sleep(0.05)


@native_transport  # the real `muxgate serve`: the gateway's own transport
async def test_seed_curl_line_verbatim(tmp_path: Path) -> None:
    # The line is the one the spec promises to honour (SPEC.md §8.1).
    assert SEED_CURL in (REPO / "protocol" / "SPEC.md").read_text(encoding="utf-8")
    if shutil.which("curl") is None:
        pytest.fail(
            "curl is not installed: this test runs the seed's cURL line (apt-get install curl)"
        )
    _require_port_free(SEED_PORT)

    with _muxgate_serve(tmp_path) as (proc, log_path):
        await _wait_healthy(proc, log_path, deadline=time.monotonic() + 20)
        headers = {"X-Muxi-Client-Key": "YOUR_CLIENT_KEY", "X-Muxi-User-Id": "user123"}
        url = f"ws://127.0.0.1:{SEED_PORT}/v1/ws"
        async with WireClient.open(url, headers=headers) as client:
            track = await client.chat("my-request-123", "Write a very long story...")
            await client.chunks("my-request-123", 1)
            assert client.welcome is not None
            assert client.welcome.user_id == "user123"
            assert track.response is None

            curl_env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
            curl_env["NO_PROXY"] = curl_env["no_proxy"] = "localhost,127.0.0.1,::1"
            curl = await asyncio.create_subprocess_exec(
                "bash",
                "-c",
                SEED_CURL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=curl_env,
            )
            out, err = await asyncio.wait_for(curl.communicate(), 30)
            assert curl.returncode == 0, err.decode(errors="replace")
            assert json.loads(out) == {"request_id": "my-request-123", "status": "cancelled"}

            response = await client.response("my-request-123")
            assert response.status is ResponseStatus.CANCELLED
            assert response.reason is CancelReason.API
            assert response.content == ""
            usage = await client.final_usage("my-request-123")
            assert usage.output_tokens >= len(track.chunks) > 0

            # SIGTERM: drain, close the connection with 1001, exit 0 (SPEC.md §5.7).
            proc.send_signal(signal.SIGTERM)
            returncode = await asyncio.wait_for(asyncio.to_thread(proc.wait), 10)
            assert returncode == 0, _log(log_path)
            await client.wait_for(lambda: client.ws.close_code is not None)
            assert client.ws.close_code == 1001
        log_text = _log(log_path)
    assert "gateway.started" in log_text, log_text
    assert "gateway.stopped" in log_text, log_text
