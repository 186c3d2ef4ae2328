"""The dashboard feed (``/v1/stats``) and the web demo's files, over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway.backends.simulated import SimulatedBackend, SimulationSettings
from gateway.pipeline import RequestContext
from gateway.server import Gateway
from gateway.stats import LiveStats
from gateway.webui import WebUI
from protocol import Cancel, Chat, Codec, ResponseStatus

from .conftest import FAST, native_transport, running_gateway, settled
from .http_client import http
from .wire import WireClient

ENDLESS = {"tokens": 100_000, "token_delay_ms": 5}


def stats_url(gw: Gateway) -> str:
    return f"ws://127.0.0.1:{gw.port}/v1/stats"


async def run_one_completed_and_one_cancelled(gw: Gateway) -> None:
    async with WireClient.open(gw.url, Codec.JSON) as client:
        await client.chat("done", metadata={"tokens": 10, "token_delay_ms": 0})
        await client.chat("stop", metadata=ENDLESS)
        await client.chunks("stop", 3)
        await client.cancel("stop")
        assert (await client.response("stop")).status is ResponseStatus.CANCELLED
        assert (await client.response("done")).status is ResponseStatus.COMPLETED
        await client.final_usage("stop")
    await settled(gw)


async def test_http_snapshot_counts_requests_cancels_and_tokens() -> None:
    async with running_gateway() as gw:
        before = (await http("GET", gw.http_url + "/v1/stats")).json()
        assert before["requests_total"] == 0
        assert before["cancel_latency_ms"] == {
            "count": 0,
            "p50": None,
            "p99": None,
            "max": None,
            "recent": [],
        }
        await run_one_completed_and_one_cancelled(gw)
        answer = await http("GET", gw.http_url + "/v1/stats")
        assert answer.status == 200
        assert answer.content_types == ["application/json"]
        stats = answer.json()
        assert stats["type"] == "stats"
        assert stats["requests_total"] == 2
        assert stats["active_requests"] == 0
        assert stats["responses"] == {"completed": 1, "cancelled": 1, "failed": 0}
        assert stats["cancellations"]["client"] == 1
        assert sum(stats["cancellations"].values()) == 1
        latency = stats["cancel_latency_ms"]
        assert latency["count"] == 1
        assert latency["p50"] == latency["p99"] == latency["max"] == latency["recent"][0] >= 0
        assert stats["tokens"]["output"] >= 10
        assert stats["tokens"]["saved"] > 0


async def test_http_snapshot_rejects_other_methods() -> None:
    async with running_gateway() as gw:
        answer = await http("DELETE", gw.http_url + "/v1/stats")
        assert answer.status == 405
        assert answer.headers["Allow"] == "GET"


async def test_feed_sends_a_snapshot_at_once_then_live_updates() -> None:
    async with running_gateway(stats_interval_ms=20) as gw, connect(stats_url(gw)) as feed:
        first = json.loads(await asyncio.wait_for(feed.recv(), 5))
        assert first["type"] == "stats"
        assert first["connections"] == 0
        await run_one_completed_and_one_cancelled(gw)
        # Frames keep coming on their own; one of them shows the two requests and the cancel.
        async with asyncio.timeout(5):
            while True:
                frame = json.loads(await feed.recv())
                if frame["requests_total"] == 2 and frame["responses"]["cancelled"] == 1:
                    break
        assert frame["cancellations"]["client"] == 1


async def test_feed_reports_open_connections_and_active_streams() -> None:
    async with running_gateway(stats_interval_ms=20) as gw:
        async with connect(stats_url(gw)) as feed, WireClient.open(gw.url) as client:
            await client.chat("a", metadata=ENDLESS)
            await client.chat("b", metadata=ENDLESS)
            await client.chunks("b", 1)
            async with asyncio.timeout(5):
                while True:
                    frame = json.loads(await feed.recv())
                    if frame["connections"] == 1 and frame["active_requests"] == 2:
                        break
            await client.cancel("a")
            await client.cancel("b")
            await client.response("b")
        await settled(gw)


async def test_recent_latencies_are_those_since_the_previous_frame() -> None:
    now = [0.0]
    stats = LiveStats(lambda: 0, lambda: now[0])
    stats.cancel_latency(0.001)
    now[0] = 1.0
    for _ in range(3):
        stats.request_started()
    first = json.loads(stats.tick())
    assert first["cancel_latency_ms"]["recent"] == [1.0]
    assert first["requests_per_second"] == 3.0
    now[0] = 3.0
    stats.request_started()
    second = json.loads(stats.tick())
    assert second["cancel_latency_ms"]["recent"] == []
    assert second["cancel_latency_ms"]["count"] == 1  # percentiles keep their window
    assert second["requests_per_second"] == 0.5


def _shape(value: object) -> object:
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items()}
    return "list" if isinstance(value, list) else "scalar"


def test_spec_example_has_the_shape_of_a_real_snapshot() -> None:
    spec = (Path(__file__).parents[2] / "protocol" / "SPEC.md").read_text(encoding="utf-8")
    example = next(
        json.loads(line) for line in spec.splitlines() if line.startswith('{"type":"stats"')
    )
    stats = LiveStats(lambda: 0, lambda: 0.0)
    stats.cancel_latency(0.001)
    stats.cancel_halted("llm_stream", 0.001, 1)
    real = stats.snapshot()
    assert list(example) == list(real)  # same keys in the same order
    assert _shape(example) == _shape(real)


def test_percentiles_over_a_bounded_window() -> None:
    stats = LiveStats(lambda: 0, lambda: 0.0)
    for ms in range(1, 2001):  # more than the window holds: the oldest fall out
        stats.cancel_latency(ms / 1000)
    latency: Any = stats.snapshot()["cancel_latency_ms"]
    assert latency["count"] == 1000
    assert latency["p50"] == 1500.0
    assert latency["p99"] == 1990.0
    assert latency["max"] == 2000.0
    assert len(latency["recent"]) <= 500


def test_cancel_landings_over_a_bounded_window() -> None:
    stats = LiveStats(lambda: 0, lambda: 0.0)
    empty: Any = stats.snapshot()
    assert empty["cancels_by_step"] == {
        "none": 0,
        "plan": 0,
        "llm": 0,
        "tool": 0,
        "agent": 0,
        "llm_stream": 0,
        "other": 0,
    }
    assert empty["halt_latency_ms"] == {
        "count": 0,
        "p50": None,
        "p90": None,
        "p99": None,
        "max": None,
        "recent": [],
    }
    assert empty["tokens_after_cancel"] == {
        "total": 0,
        "histogram": {"0": 0, "1": 0, "2": 0, "3+": 0},
        "count": 0,
        "p99": None,
        "max": None,
    }
    stats.cancel_halted(None, 0.0005, 0)
    stats.cancel_halted("a-step-kind-nobody-knows", 0.001, 0)
    stats.cancel_halted("llm_stream", 0.002, 7)  # an outlier, soon out of the window
    for ms in range(1, 1001):  # fills the window: the three above fall out of it
        stats.cancel_halted("tool", ms / 1000, ms % 3)
    snapshot: Any = stats.snapshot()
    assert snapshot["cancels_by_step"] == {
        "none": 1,
        "plan": 0,
        "llm": 0,
        "tool": 1000,
        "agent": 0,
        "llm_stream": 1,
        "other": 1,
    }
    halt = snapshot["halt_latency_ms"]
    assert (halt["count"], halt["p50"], halt["p90"], halt["p99"], halt["max"]) == (
        1000,
        500.0,
        900.0,
        990.0,
        1000.0,
    )
    assert len(halt["recent"]) == 500  # bounded between two frames too
    late = snapshot["tokens_after_cancel"]
    assert late["total"] == 7 + sum(ms % 3 for ms in range(1, 1001))  # since the start
    assert late["histogram"] == {"0": 335, "1": 334, "2": 333, "3+": 1}
    assert (late["count"], late["p99"], late["max"]) == (1000, 2, 2)  # the 7 left the window
    stats.tick()
    assert json.loads(stats.tick())["halt_latency_ms"]["recent"] == []  # per frame
    assert stats.snapshot()["halt_latency_ms"] == {**halt, "recent": []}


#: The request whose pipeline runs in this task (each pipeline task has its own context).
_REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")


class HeldBackend(SimulatedBackend):
    """The simulated backend, in which the test may hold a request in the step of a given kind
    once that step has begun, until it lets go: a cancel sent meanwhile lands in that step
    whatever the machine's speed. A held stream answers the abort of its read with one more
    token (an upstream that had a token in flight)."""

    def __init__(self) -> None:
        super().__init__(**FAST)
        self._holds: dict[str, tuple[str, asyncio.Event, asyncio.Event]] = {}

    def hold(self, request_id: str, kind: str) -> tuple[asyncio.Event, asyncio.Event]:
        """Events set when the step has begun, and to be set to let it go on."""
        began, release = asyncio.Event(), asyncio.Event()
        self._holds[request_id] = (kind, began, release)
        return began, release

    async def run(self, ctx: RequestContext) -> None:
        _REQUEST_ID.set(ctx.request_id)
        await super().run(ctx)

    async def _held(self, kind: str) -> None:
        hold = self._holds.get(_REQUEST_ID.get())
        if hold is not None and hold[0] == kind:
            hold[1].set()
            await hold[2].wait()

    async def simulate_plan(self, settings: SimulationSettings) -> str:
        await self._held("plan")
        return await super().simulate_plan(settings)

    async def simulate_tool(self, ctx: RequestContext, settings: SimulationSettings) -> str:
        await self._held("tool")
        return await super().simulate_tool(ctx, settings)

    async def simulate_agent(self, ctx: RequestContext, settings: SimulationSettings) -> str:
        await self._held("agent")
        return await super().simulate_agent(ctx, settings)

    async def simulate_tokens(
        self, words: Iterator[str], settings: SimulationSettings, start: int, stop: int
    ) -> AsyncIterator[str]:
        inner = super().simulate_tokens(words, settings, start, stop)
        tokens = cast(AsyncGenerator[str, None], inner)
        async with contextlib.aclosing(tokens):
            async for word in tokens:
                yield word
                try:
                    await self._held("llm_stream")
                except asyncio.CancelledError:
                    yield " late"  # read although the cancel aborted the read
                    return


async def test_snapshot_reports_where_cancels_landed_and_how_the_pipelines_stopped() -> None:
    """Cancels over a real socket, each landing in a step of a known kind: the snapshot counts
    them by step, times each stop (cancel read -> pipeline halted) and the tokens after it."""
    backend = HeldBackend()
    async with (
        running_gateway(backend_impl=backend) as gw,
        WireClient.open(gw.url, Codec.JSON) as client,
    ):
        # Per cancelled request, from just before its cancel left to just after its final usage
        # came: its stop latency lies within.
        bounds: list[float] = []

        # Cancelled before any step began: the chat and its cancel in one frame.
        client.track("before").machine.on_cancel()
        sent = time.perf_counter()
        await client.send(Chat(request_id="before", message="hi"), Cancel(request_id="before"))
        await client.final_usage("before")
        bounds.append(time.perf_counter() - sent)

        await client.chat("done", metadata={"tokens": 5})
        assert (await client.response("done")).status is ResponseStatus.COMPLETED

        # Cancelled while a step of each kind runs, held until the cancel was read. A plan, tool
        # or agent call runs to its end (60 ms once let go) before the pipeline halts; the
        # stream is aborted at once, one token still arriving.
        for request_id, kind, settings in (
            ("at-plan", "plan", {"plan_ms": 60}),
            ("mid-stream", "llm_stream", {}),
            ("at-tool", "tool", {"tool_ms": 60}),
            ("at-agent", "agent", {"agent_ms": 60}),
        ):
            began, release = backend.hold(request_id, kind)
            await client.chat(request_id, metadata=settings)
            await asyncio.wait_for(began.wait(), 10)
            sent = time.perf_counter()
            await client.cancel(request_id)
            response = await client.response(request_id)
            assert response.status is ResponseStatus.CANCELLED
            release.set()  # the cancel was read: the step may end
            await client.final_usage(request_id)  # sent as the pipeline halted
            bounds.append(time.perf_counter() - sent)
        await settled(gw)

        stats = (await http("GET", gw.http_url + "/v1/stats")).json()
    assert stats["responses"] == {"completed": 1, "cancelled": 5, "failed": 0}
    assert stats["cancels_by_step"] == {
        "none": 1,
        "plan": 1,
        "llm": 0,
        "tool": 1,
        "agent": 1,
        "llm_stream": 1,
        "other": 0,
    }
    halt = stats["halt_latency_ms"]
    samples = sorted(halt["recent"])  # no feed subscriber: every sample is still "recent"
    assert halt["count"] == len(samples) == 5
    assert all(0 <= ms <= max(bounds) * 1000 for ms in samples)
    # The three cancels in a 60 ms step stopped no sooner than the step's end.
    assert samples[2] >= 55
    assert halt["p50"] == samples[2]
    assert halt["p90"] == halt["p99"] == halt["max"] == samples[4]
    # Only the held stream produced a token after its cancel.
    assert stats["tokens_after_cancel"] == {
        "total": 1,
        "histogram": {"0": 4, "1": 1, "2": 0, "3+": 0},
        "count": 5,
        "p99": 1,
        "max": 1,
    }


async def test_feed_subscribers_are_bounded() -> None:
    async with running_gateway(max_stats_subscribers=1) as gw, connect(stats_url(gw)) as first:
        await first.recv()
        async with connect(stats_url(gw)) as second:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(second.recv(), 5)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1013
        assert gw.stats_feed.subscribers == 1


async def test_feed_ignores_what_a_subscriber_sends_and_forgets_it_when_it_leaves() -> None:
    async with running_gateway(stats_interval_ms=20) as gw:
        async with connect(stats_url(gw)) as feed:
            await feed.recv()
            await feed.send("hello?")
            await feed.send(b"\x00\x01")
            await feed.recv()  # still fed
        await asyncio.wait_for(gw.stats_feed.idle(), 5)  # the ticker stops with no one left
        assert gw.stats_feed.subscribers == 0


async def test_shutdown_closes_the_feed_with_going_away() -> None:
    async with running_gateway() as gw:
        feed = await connect(stats_url(gw))
        await feed.recv()
        await gw.shutdown(grace=0.1)
        await asyncio.wait_for(feed.wait_closed(), 5)
        assert feed.close_code == 1001


# -- the web demo's files ---------------------------------------------------------------------


@pytest.fixture
def built_demo(tmp_path: Path) -> Path:
    (tmp_path / "assets").mkdir()
    (tmp_path / "index.html").write_text("<!doctype html><title>chat</title>")
    (tmp_path / "dashboard.html").write_text("<!doctype html><title>dashboard</title>")
    (tmp_path / "assets" / "index-abc123.js").write_text("console.log(1)")
    (tmp_path / "assets" / "style-def456.css").write_text("body{}")
    (tmp_path / "favicon.svg").write_text("<svg/>")
    (tmp_path.parent / "secret.txt").write_text("not to be served")
    return tmp_path


@pytest.mark.parametrize(
    ("path", "body", "content_type", "cache"),
    [
        ("/", b"<!doctype html><title>chat</title>", "text/html; charset=utf-8", "no-cache"),
        ("/dashboard", b"<!doctype html><title>dashboard</title>", "text/html", "no-cache"),
        ("/index.html", b"<!doctype html><title>chat</title>", "text/html", "no-cache"),
        ("/assets/index-abc123.js", b"console.log(1)", "text/javascript", "immutable"),
        ("/assets/style-def456.css", b"body{}", "text/css", "immutable"),
        ("/favicon.svg", b"<svg/>", "image/svg+xml", "no-cache"),
    ],
)
async def test_demo_files_are_served(
    built_demo: Path, path: str, body: bytes, content_type: str, cache: str
) -> None:
    async with running_gateway() as gw:
        gw.webui = WebUI(built_demo)
        answer = await http("GET", gw.http_url + path)
        assert answer.status == 200
        assert answer.body == body
        assert len(answer.content_types) == 1
        assert answer.content_types[0].startswith(content_type)
        assert cache in answer.headers["Cache-Control"]
        assert answer.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize(
    "path",
    [
        "/../secret.txt",
        "/assets/../index.html",
        "/assets/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/assets",
        "/assets/",
        "/nope.js",
        "//index.html",
    ],
)
async def test_only_files_of_the_build_are_served(built_demo: Path, path: str) -> None:
    async with running_gateway() as gw:
        gw.webui = WebUI(built_demo)
        answer = await http("GET", gw.http_url + path)
        assert answer.status == 404
        assert answer.json()["error"]["code"] == "invalid_field"


async def test_demo_files_refuse_other_methods(built_demo: Path) -> None:
    async with running_gateway() as gw:
        gw.webui = WebUI(built_demo)
        answer = await http("DELETE", gw.http_url + "/")
        assert answer.status == 405
        assert answer.headers["Allow"] == "GET"


async def test_missing_build_says_how_to_build_it(tmp_path: Path) -> None:
    async with running_gateway() as gw:
        gw.webui = WebUI(tmp_path / "missing")
        answer = await http("GET", gw.http_url + "/")
        assert answer.status == 404
        assert "npm run build" in answer.json()["error"]["message"]


async def test_webui_can_be_switched_off() -> None:
    async with running_gateway(webui=False) as gw:
        answer = await http("GET", gw.http_url + "/")
        assert answer.status == 404
        assert answer.json()["error"]["message"] == "no such endpoint"


async def test_the_shipped_demo_is_built_and_every_asset_it_names_is_served() -> None:
    """The README's run command serves a working page: the committed build (gateway/webui/)."""
    async with running_gateway() as gw:
        assert gw.webui is not None
        assert gw.webui.built, "gateway/webui/ is missing: cd web-demo && npm ci && npm run build"
        for page in ("/", "/dashboard"):
            answer = await http("GET", gw.http_url + page)
            assert answer.status == 200
            assert answer.content_types == ["text/html; charset=utf-8"]
            html = answer.body.decode()
            assets = re.findall(r'(?:src|href)="(/assets/[^"]+)"', html)
            assert assets, html
            for asset in assets:
                loaded = await http("GET", gw.http_url + asset)
                assert loaded.status == 200, asset
                assert loaded.body


@native_transport  # the server socket and its write buffer
async def test_feed_skips_a_subscriber_that_does_not_read_and_serves_the_others() -> None:
    """A subscriber whose socket is not draining misses ticks: its buffer stops growing at the
    limit, while a reading subscriber keeps getting frames."""
    import socket

    from gateway.stats import SUBSCRIBER_BUFFER_LIMIT

    async with running_gateway(stats_interval_ms=1) as gw:
        slow_sock = socket.create_connection((gw.config.host, gw.port))
        slow_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        async with connect(stats_url(gw), sock=slow_sock) as slow, connect(stats_url(gw)) as fast:
            await asyncio.wait_for(slow.recv(), 5)
            slow.transport.pause_reading()  # from now on it reads nothing
            server_side = next(
                ws
                for ws in gw.stats_feed._subscribers
                if ws.remote_address[1] == slow_sock.getsockname()[1]
            )
            # Small kernel buffers, so the gateway's own buffer is what fills.
            server_side.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
            )

            async def frames(n: int) -> None:
                for _ in range(n):
                    await fast.recv()

            async with asyncio.timeout(20):
                while server_side.transport.get_write_buffer_size() <= SUBSCRIBER_BUFFER_LIMIT:
                    await frames(1)  # the reading subscriber's frames are the clock
                reached = server_side.transport.get_write_buffer_size()
                await frames(200)  # 200 more ticks
            assert server_side.transport.get_write_buffer_size() == reached  # all skipped
            assert reached < SUBSCRIBER_BUFFER_LIMIT + 16 * 1024  # at most one frame over
            slow.transport.abort()  # a close handshake would wait behind the backlog


# -- who may read the stats (SPEC.md §8.3) ----------------------------------------------------

OPERATOR_KEY = "operator-key-0123456789"
USER_SECRET = "stats-secret-" + "0123456789abcdef" * 4


def with_key(key: str = OPERATOR_KEY) -> dict[str, str]:
    return {"X-Muxi-Client-Key": key}


def user_token() -> dict[str, str]:
    from gateway.auth import make_token

    return {"Authorization": f"Bearer {make_token(USER_SECRET, 'alice')}"}


PRIVATE: dict[str, Any] = {
    "client_keys": (OPERATOR_KEY,),
    "jwt_secret": USER_SECRET,
    "stats_public": False,
}


async def refused_feed(gw: Gateway, headers: dict[str, str] | None = None) -> Any:
    """The feed's handshake answer when it is refused before the handshake."""
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as refused:
        await connect(stats_url(gw), additional_headers=headers or {})
    return refused.value.response


@pytest.mark.parametrize(
    "headers",
    [None, with_key("not-the-key"), user_token()],
    ids=["none", "wrong-key", "user-token"],
)
async def test_private_stats_need_a_client_key(headers: dict[str, str] | None) -> None:
    async with running_gateway(**PRIVATE) as gw:
        for path in ("/metrics", "/v1/stats"):
            answer = await http("GET", gw.http_url + path, headers)
            assert answer.status == 401, path
            assert answer.content_types == ["application/json"]
            assert answer.json()["error"]["code"] == "unauthorized"
        response = await refused_feed(gw, headers)
        assert response.status_code == 401
        assert json.loads(response.body)["error"]["code"] == "unauthorized"
        assert gw.stats_feed.subscribers == 0
        # Health stays open: a load balancer has no key.
        assert (await http("GET", gw.http_url + "/healthz")).status == 200


async def test_private_stats_with_a_client_key() -> None:
    async with running_gateway(**PRIVATE) as gw:
        metrics = await http("GET", gw.http_url + "/metrics", with_key())
        assert metrics.status == 200
        assert b"muxgate_connections" in metrics.body
        snapshot = await http("GET", gw.http_url + "/v1/stats", with_key())
        assert snapshot.status == 200
        assert snapshot.json()["type"] == "stats"
        async with connect(stats_url(gw), additional_headers=with_key()) as feed:
            assert json.loads(await asyncio.wait_for(feed.recv(), 5))["type"] == "stats"


@pytest.mark.parametrize(
    "settings",
    [
        {"client_keys": (OPERATOR_KEY,)},  # stats_public defaults to true: today's behaviour
        {"stats_public": False},  # dev mode (no auth): nothing to check a key against
    ],
    ids=["public", "dev-mode"],
)
async def test_public_stats_need_no_credentials(settings: dict[str, Any]) -> None:
    async with running_gateway(**settings) as gw:
        assert (await http("GET", gw.http_url + "/metrics")).status == 200
        assert (await http("GET", gw.http_url + "/v1/stats")).status == 200
        async with connect(stats_url(gw)) as feed:
            assert json.loads(await asyncio.wait_for(feed.recv(), 5))["type"] == "stats"


async def expect_try_again_later(gw: Gateway, headers: dict[str, str] | None = None) -> None:
    async with connect(stats_url(gw), additional_headers=headers or {}) as refused:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(refused.recv(), 5)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1013


async def test_anonymous_subscribers_cannot_lock_the_operator_out() -> None:
    async with (
        running_gateway(
            client_keys=(OPERATOR_KEY,),
            jwt_secret=USER_SECRET,
            max_stats_subscribers=2,
            max_operator_stats_subscribers=1,
        ) as gw,
        connect(stats_url(gw)) as first,
        connect(stats_url(gw)) as second,
    ):
        await first.recv()
        await second.recv()
        await expect_try_again_later(gw)  # the anonymous slots are full
        await expect_try_again_later(gw, with_key("not-the-key"))  # a wrong key is anonymous
        await expect_try_again_later(gw, user_token())  # and so is a user
        async with connect(stats_url(gw), additional_headers=with_key()) as operator:
            assert json.loads(await asyncio.wait_for(operator.recv(), 5))["type"] == "stats"
            assert (gw.stats_feed.subscribers, gw.stats_feed.operator_subscribers) == (3, 1)
            await expect_try_again_later(gw, with_key())  # operators have their own bound
        # The operator's slot is free again once it leaves.
        async with connect(stats_url(gw), additional_headers=with_key()) as again:
            await asyncio.wait_for(again.recv(), 5)
