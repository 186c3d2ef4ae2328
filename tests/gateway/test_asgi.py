"""The ASGI adapter (gateway/asgi.py): the gateway mounted in a FastAPI app under uvicorn, the
adapter alone under uvicorn (lifespan) and under hypercorn, and its channel's flow control.

The conformance suites run over the adapter too (``make test-asgi``: the same tests with
``MUXGATE_TEST_TRANSPORT=asgi``); these are what only the adapter has: a mount point, lifespan,
refusals through the ``websocket.http.response`` extension, and what a disconnect leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway import AsyncClient
from gateway.asgi import AsgiGateway, AsgiWebSocket, asgi_app
from gateway.config import Config
from gateway.registry import RequestKey, RequestStatus
from gateway.server import Gateway
from gateway.transport import HttpRequest
from protocol import CancelReason, CancelStatus, Codec, ResponseStatus

from .conftest import FAST, asgi_server, settled
from .http_client import http
from .wire import WireClient

#: Runs until cancelled (simulated backend metadata).
ENDLESS = {"tokens": 100_000, "token_delay_ms": 2, "plan_ms": 0, "tool_ms": 0}
HOST = "127.0.0.1"


def adapter_tasks() -> set[asyncio.Task[Any]]:
    """The adapter's own tasks (a connection's sender and reader) still running."""
    return {
        t for t in asyncio.all_tasks() if t.get_name().startswith("muxgate-asgi") and not t.done()
    }


async def no_connection_left(gw: Gateway, timeout: float = 5.0) -> None:
    """G7 over ASGI: every connection ended, nothing of it running (pipelines, the writer, the
    adapter's tasks)."""
    async with asyncio.timeout(timeout):
        while True:  # a bounded poll: the connection's end is the server's, in its own time
            if not gw.connections and not adapter_tasks():
                break
            await asyncio.sleep(0.01)
    await settled(gw)
    assert not gw.registry.active()


def fastapi_app(gw: Gateway) -> Any:
    """A FastAPI app of its own with the gateway mounted at /muxgate (README: "Mounting in an
    ASGI app")."""
    from fastapi import FastAPI

    muxgate = asgi_app(gw)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with muxgate.running():  # mounted apps get no lifespan events of their own
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    app.mount("/muxgate", muxgate)
    return app


@contextlib.asynccontextmanager
async def mounted(**settings: Any) -> AsyncIterator[tuple[Gateway, str]]:
    """A gateway mounted in a FastAPI app under uvicorn: (gateway, its base URL)."""
    gw = Gateway(Config(port=0, backend_options=FAST, **settings))
    async with asgi_server(
        fastapi_app(gw), HOST, lifespan="on", ws="websockets-sansio", ws_per_message_deflate=False
    ) as port:
        assert gw.started  # by the host app's lifespan
        yield gw, f"http://{HOST}:{port}/muxgate"
    assert gw.draining  # and drained by it


async def test_fastapi_mount_streams_cancels_and_serves_the_http_routes() -> None:
    async with mounted() as (gw, base):
        async with AsyncClient(base) as client:
            response = await client.chat("hello there")
            assert response.status == "completed"
            assert response.content
            # A streamed answer, cancelled in-band while it streams.
            stream = client.chat_stream("go on", request_id="s-1", metadata=ENDLESS)
            chunks = 0
            async for _chunk in stream:
                chunks += 1
                if chunks == 3:
                    break
            cancelled = await stream.cancel()
            assert cancelled is not None
            assert (cancelled.status, cancelled.reason) == ("cancelled", "client")
            # Cancel by id over HTTP, through the mount point.
            task = client.chat_async("again", request_id="h-1", metadata=ENDLESS)
            await _active(gw, "h-1")
            result = await AsyncClient(base).cancel_request("h-1")
            assert result.status == "cancelled"
            assert (await task).reason == "api"
        # The gateway's HTTP routes below the mount point; the host app's own routes beside it.
        assert (await http("GET", f"{base}/healthz")).json() == {"status": "ok"}
        assert (await http("GET", f"{base}/v1/requests/nobody")).status == 404
        assert (await http("GET", f"{base}/v1/ws")).status == 426
        root = base.removesuffix("/muxgate")
        assert (await http("GET", f"{root}/hello")).json() == {"hello": "world"}
        assert (await http("GET", f"{root}/healthz")).status == 404  # not the gateway's
        await no_connection_left(gw)


@pytest.mark.parametrize("codec", [Codec.JSON, Codec.MSGPACK], ids=["json", "msgpack"])
async def test_in_band_cancel_over_the_mount(codec: Codec) -> None:
    async with mounted() as (gw, base):
        ws_url = base.replace("http://", "ws://") + "/v1/ws"
        async with WireClient.open(ws_url, codec) as client:
            track = await client.chat("r1", metadata=ENDLESS)
            await client.chunks("r1", 3)
            await client.cancel("r1")
            response = await client.response("r1")
            assert (response.status, response.reason) == (
                ResponseStatus.CANCELLED,
                CancelReason.CLIENT,
            )
            assert (await client.cancel_result("r1")).status is CancelStatus.CANCELLED
            assert track.chunks
        await no_connection_left(gw)


async def test_a_disconnect_cancels_the_requests_and_leaves_no_task() -> None:
    """G7: the client's TCP connection drops mid-stream (no close frame): every request of the
    connection is cancelled with reason disconnect, and nothing of it is left running."""
    async with mounted() as (gw, base):
        ws_url = base.replace("http://", "ws://") + "/v1/ws"
        with contextlib.suppress(ConnectionClosed):
            async with WireClient.open(ws_url) as client:
                for n in range(3):
                    await client.chat(f"d{n}", metadata=ENDLESS)
                for n in range(3):
                    await client.chunks(f"d{n}", 2)
                assert len(gw.connections) == 1
                assert adapter_tasks()
                client.ws.transport.abort()  # the network drops
        for n in range(3):
            record = await _record(gw, f"d{n}", statuses=(RequestStatus.CANCELLED,))
            assert record.reason == CancelReason.DISCONNECT
        await no_connection_left(gw)


async def test_refusals_before_the_handshake_are_http_answers() -> None:
    """Refused handshakes get the gateway's own HTTP answers through the server's
    ``websocket.http.response`` extension: an unknown subprotocol (400), a draining gateway
    (503); a WebSocket to a path the gateway does not serve gets what HTTP would (404)."""
    async with mounted() as (gw, base):
        ws_base = base.replace("http://", "ws://")
        with pytest.raises(InvalidStatus) as refused:
            await connect(ws_base + "/v1/ws", subprotocols=["nope"])  # type: ignore[list-item]
        assert refused.value.response.status_code == 400
        with pytest.raises(InvalidStatus) as refused:
            await connect(ws_base + "/healthz")
        assert refused.value.response.status_code == 200  # not a WebSocket: its HTTP answer
        with pytest.raises(InvalidStatus) as refused:
            await connect(ws_base + "/nowhere")
        assert refused.value.response.status_code == 404
        gw.draining = True
        with pytest.raises(InvalidStatus) as refused:
            await connect(ws_base + "/v1/ws")
        assert refused.value.response.status_code == 503
        gw.draining = False


async def test_oversized_message_closes_1009() -> None:
    """The server reads up to its own limit; the gateway's is smaller: 1009 all the same."""
    async with mounted(max_frame_bytes=4096) as (gw, base):
        ws_url = base.replace("http://", "ws://") + "/v1/ws"
        async with connect(ws_url, subprotocols=["muxgate.v1.json"]) as ws:  # type: ignore[list-item]
            await ws.send('{"type":"ping","id":"' + "x" * 5000 + '"}')
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            assert ws.close_code == 1009
        await no_connection_left(gw)


async def test_shutdown_cancels_with_reason_shutdown_closes_1001_then_refuses() -> None:
    gw = Gateway(Config(port=0, backend_options=FAST))
    await gw.start(listen=False)
    async with asgi_server(asgi_app(gw), HOST, ws="websockets-sansio") as port:
        gw.served_port = port
        async with WireClient.open(gw.url) as client:
            await client.chat("r1", metadata=ENDLESS)
            await client.chunks("r1", 1)
            await gw.shutdown(grace=0.05)
            response = await client.response("r1")
            assert (response.status, response.reason) == (
                ResponseStatus.CANCELLED,
                CancelReason.SHUTDOWN,
            )
            await client.wait_for(lambda: client.ws.close_code is not None)
            assert client.ws.close_code == 1001
        with pytest.raises(InvalidStatus) as refused:
            await connect(gw.url)
        assert refused.value.response.status_code == 503
        assert (await http("GET", f"{gw.http_url}/healthz")).status == 503


async def test_top_level_app_starts_and_drains_the_core_with_lifespan() -> None:
    gw = Gateway(Config(port=0, backend_options=FAST))
    app = asgi_app(gw)
    async with asgi_server(app, HOST, lifespan="on") as port:
        assert gw.started
        gw.served_port = port
        async with AsyncClient(gw.url) as client:
            assert (await client.chat("hi")).status == "completed"
    assert gw.draining


async def test_a_core_not_started_is_refused_with_503() -> None:
    gw = Gateway(Config(port=0, backend_options=FAST))
    async with asgi_server(asgi_app(gw), HOST) as port:  # lifespan off: nobody starts it
        answer = await http("GET", f"http://{HOST}:{port}/healthz")
        assert answer.status == 503
        assert b"not started" in answer.body
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"ws://{HOST}:{port}/v1/ws")
        assert refused.value.response.status_code == 503


async def test_hypercorn_smoke() -> None:
    """The adapter under another ASGI server: stream, cancel, disconnect, HTTP."""
    pytest.importorskip("hypercorn")
    from hypercorn.asyncio import serve
    from hypercorn.config import Config as HypercornConfig

    gw = Gateway(Config(port=0, backend_options=FAST))
    sock = socket.socket()
    sock.bind((HOST, 0))
    gw.served_port = sock.getsockname()[1]
    config = HypercornConfig()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn's from now on
    config.accesslog = None
    stop = asyncio.Event()
    serving = asyncio.create_task(serve(asgi_app(gw), config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(10):
            while True:  # hypercorn's lifespan.startup starts the core, then it listens
                answer = await _healthz(gw) if gw.started else None
                if answer is not None:
                    break
                await asyncio.sleep(0.01)
        assert answer == 200
        with contextlib.suppress(ConnectionClosed):
            async with WireClient.open(gw.url) as client:
                await client.chat("r1")
                assert (await client.response("r1")).status is ResponseStatus.COMPLETED
                await client.chat("r2", metadata=ENDLESS)
                await client.chunks("r2", 2)
                await client.cancel("r2")
                assert (await client.response("r2")).status is ResponseStatus.CANCELLED
                await client.chat("r3", metadata=ENDLESS)
                await client.chunks("r3", 1)
                client.ws.transport.abort()
        record = await _record(gw, "r3", statuses=(RequestStatus.CANCELLED,))
        assert record.reason == CancelReason.DISCONNECT
        await no_connection_left(gw)
    finally:
        stop.set()
        await serving
    assert gw.draining  # lifespan.shutdown drained the core the adapter started


# -- the channel's flow control, without a server -------------------------------------------------


async def test_channel_queue_has_high_and_low_water_marks() -> None:
    """``write`` is synchronous while the queue is under its high-water mark; above it,
    ``writable()`` is false and ``send`` waits until the server took the queue down to the low
    mark; ``close`` follows what was written; a send the server refuses ends the connection."""
    release = asyncio.Event()
    close_sent = asyncio.Event()
    sent: list[Any] = []

    async def server_send(message: Any) -> None:
        await release.wait()  # a client that does not read: the server's send blocks
        sent.append(message)
        if message["type"] == "websocket.close":
            close_sent.set()

    received: asyncio.Queue[Any] = asyncio.Queue()
    request = HttpRequest("GET", "/v1/ws", _headers(), "127.0.0.1")
    channel = AsgiWebSocket(server_send, request, None, max_message_bytes=1 << 20, high=1000)
    lost = asyncio.Event()

    class Handler:
        def message(self, data: bytes, text: bool) -> None:
            pass

        def lost(self) -> None:
            lost.set()

    serving = asyncio.create_task(channel.serve(Handler, received.get))
    await asyncio.sleep(0)
    frame = b"x" * 300
    channel.write(frame, False)
    channel.write(frame, False)
    channel.write(frame, False)
    assert channel.writable()
    channel.write(frame, False)  # 1200 bytes queued: over the mark
    assert not channel.writable()
    assert channel.buffered == 1200
    waiting = asyncio.create_task(channel.send(b"last", False))
    await asyncio.sleep(0.01)
    assert not waiting.done()  # no room until the server takes the queue down to 250
    release.set()
    await asyncio.wait_for(waiting, 5)
    closing = asyncio.create_task(channel.close(1000, "bye", 5))
    await asyncio.wait_for(close_sent.wait(), 5)
    assert [m["type"] for m in sent] == ["websocket.send"] * 5 + ["websocket.close"]
    assert not channel.open
    with pytest.raises(ConnectionClosed):
        channel.write(b"late", False)
    assert not lost.is_set()  # over only once the server says so
    await received.put({"type": "websocket.disconnect", "code": 1000})
    await asyncio.wait_for(closing, 5)
    await asyncio.wait_for(serving, 5)
    assert lost.is_set()
    assert channel.close_code == 1000
    assert not adapter_tasks()


async def test_without_the_response_extension_a_refusal_is_a_close() -> None:
    """A server without ``websocket.http.response``: a refused handshake is a close before
    accept (the server answers 403)."""
    gw = Gateway(Config(port=0))
    sent: list[Any] = []

    async def receive() -> Any:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "path": "/v1/ws",
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "subprotocols": ["nope"],
    }
    app: AsgiGateway = asgi_app(gw)
    await gw.start(listen=False)
    try:
        await app(scope, receive, send)
    finally:
        await gw.shutdown(grace=0)
    assert [m["type"] for m in sent] == ["websocket.close"]


# -- helpers -----------------------------------------------------------------------------------


def _headers() -> Any:
    from websockets.datastructures import Headers

    return Headers()


async def _healthz(gw: Gateway) -> int | None:
    with contextlib.suppress(OSError):
        return (await http("GET", f"{gw.http_url}/healthz")).status
    return None


async def _record(
    gw: Gateway,
    request_id: str,
    *,
    statuses: tuple[RequestStatus, ...] = (RequestStatus.CANCELLING, RequestStatus.CANCELLED),
) -> Any:
    async with asyncio.timeout(5):
        while True:
            record = await gw.registry.lookup(RequestKey("", request_id))
            if record is not None and record.status in statuses:
                return record
            await asyncio.sleep(0.01)


async def _active(gw: Gateway, request_id: str) -> None:
    await _record(gw, request_id, statuses=(RequestStatus.ACTIVE,))
