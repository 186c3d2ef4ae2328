"""The dashboard feed (``/v1/stats``) and the web demo's files, over real sockets."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway.server import Gateway
from gateway.stats import LiveStats
from gateway.webui import WebUI
from protocol import Codec, ResponseStatus

from .conftest import running_gateway, settled
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
