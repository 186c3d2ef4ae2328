"""The gateway's own transport (gateway/transport.py) over real sockets: HTTP/1.1 keep-alive and
pipelining with h11, refusals of malformed or oversized requests, the WebSocket upgrade on the
same port (also after HTTP requests on the same connection, and with frames in the handshake's
TCP write), fragments, invalid UTF-8, the input limit before authentication, keep-alive pings.

Responses are parsed with h11's client side: an answer the gateway framed wrongly (a wrong
Content-Length, a body on HEAD) fails the parse, not just a string comparison.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import h11
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.uri import parse_uri

import gateway.server
from gateway.server import Gateway
from protocol import CloseCode

from .conftest import native_transport, running_gateway, settled

#: This module tests the gateway's own transport: under the ASGI adapter the server is uvicorn.
pytestmark = native_transport

JSON = ["muxgate.v1.json"]


class RawHttp:
    """One TCP connection speaking HTTP/1.1 through h11's client side."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, gw: Gateway) -> AsyncIterator[RawHttp]:
        reader, writer = await asyncio.open_connection(gw.config.host, gw.port)
        try:
            yield cls(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def request_bytes(self, method: str, target: str, headers: list[tuple[str, str]] = []) -> bytes:  # noqa: B006
        data = self.h11.send(
            h11.Request(method=method, target=target, headers=[("Host", "gw"), *headers])
        )
        return (data or b"") + (self.h11.send(h11.EndOfMessage()) or b"")

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        """The next whole response (then ready for the next request on the same connection)."""
        status, headers, body = 0, {}, b""
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                data = await asyncio.wait_for(self.reader.read(65536), 10)
                self.h11.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                    self.h11.start_next_cycle()
                return status, headers, body
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("closed before a response")

    async def closed_by_server(self) -> bool:
        """True once the server has closed the connection (EOF), awaiting it."""
        return await asyncio.wait_for(self.reader.read(65536), 10) == b""


async def test_keep_alive_serves_many_requests_on_one_connection(gateway: Gateway) -> None:
    async with RawHttp.open(gateway) as conn:
        for _ in range(3):
            conn.writer.write(conn.request_bytes("GET", "/healthz"))
            status, headers, body = await conn.response()
            assert (status, orjson.loads(body)) == (200, {"status": "ok"})
            assert headers["server"] == "muxgate"
        conn.writer.write(conn.request_bytes("DELETE", "/v1/requests/nobody"))
        status, _, body = await conn.response()
        assert (status, orjson.loads(body)["status"]) == (404, "not_found")
    assert len(gateway.transports) <= 1  # the test's own connection, until its close is seen


async def test_pipelined_requests_are_answered_in_order(gateway: Gateway) -> None:
    """Three requests in one write, the middle one answered asynchronously (GET by id asks the
    registry): the answers come back in request order."""
    async with RawHttp.open(gateway) as conn:
        conn.writer.write(
            b"DELETE /v1/requests/a HTTP/1.1\r\nHost: gw\r\n\r\n"
            b"GET /v1/requests/b HTTP/1.1\r\nHost: gw\r\n\r\n"
            b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n"
        )
        answers = [await _read_response(conn.reader) for _ in range(3)]
    assert answers == [
        (404, {"request_id": "a", "status": "not_found"}),
        (404, {"request_id": "b", "status": "not_found"}),
        (200, {"status": "ok"}),
    ]


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, Any]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode().split("\r\n")
    length = next(
        int(v) for k, _, v in (h.partition(": ") for h in lines[1:]) if k == "Content-Length"
    )
    body = await asyncio.wait_for(reader.readexactly(length), 10)
    return int(lines[0].split()[1]), orjson.loads(body)


async def test_head_gets_headers_without_a_body(gateway: Gateway) -> None:
    async with RawHttp.open(gateway) as conn:
        conn.writer.write(conn.request_bytes("HEAD", "/healthz"))
        status, headers, body = await conn.response()
        assert status == 405
        assert body == b""  # h11 would fail on a body after a HEAD response
        assert int(headers["content-length"]) > 0


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        # Larger than one read: h11 bounds what it buffers of an incomplete request head.
        (b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 600_000 + b"\r\n\r\n", 431),
        (
            b"POST /healthz HTTP/1.1\r\nHost: gw\r\nContent-Length: 100000\r\n\r\n"
            + b"x" * 100_000,
            413,
        ),
        # A control byte in a header value (found by tests/fuzz/http.py): h11 takes it.
        (b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-A: a\x01b\r\n\r\n", 400),
        # A handshake within h11's limits but over websockets' parser's (fuzzer finding too).
        (
            b"GET /v1/ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            + b"Origin: http://a\r\n" * 129
            + b"\r\n",
            431,
        ),
    ],
    ids=["malformed", "head-too-large", "body-too-large", "control-byte", "handshake-too-large"],
)
async def test_bad_requests_get_a_status_and_a_close(
    gateway: Gateway, data: bytes, status: int
) -> None:
    async with RawHttp.open(gateway) as conn:
        conn.writer.write(data)
        with contextlib.suppress(ConnectionError):
            await conn.writer.drain()
        received = b""
        while chunk := await asyncio.wait_for(conn.reader.read(65536), 10):
            received += chunk
        assert received.startswith(b"HTTP/1.1 %d " % status), received[:200]
        # Served meanwhile: another connection is unaffected.
        async with RawHttp.open(gateway) as other:
            other.writer.write(other.request_bytes("GET", "/healthz"))
            assert (await other.response())[0] == 200


async def test_an_idle_keep_alive_connection_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway.server, "HTTP_KEEPALIVE", 0.2)
    async with running_gateway(slow_consumer_timeout=0.4) as gw, RawHttp.open(gw) as conn:
        conn.writer.write(conn.request_bytes("GET", "/healthz"))
        assert (await conn.response())[0] == 200
        assert await conn.closed_by_server()
        # A request head that never completes is dropped too (slowloris).
        async with RawHttp.open(gw) as slow:
            slow.writer.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n")
            assert await slow.closed_by_server()
        # And a body that stops half-way (found by tests/fuzz/http.py).
        async with RawHttp.open(gw) as slow:
            slow.writer.write(
                b"POST /healthz HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\nabc"
            )
            assert await slow.closed_by_server()


async def test_upgrade_after_http_requests_on_the_same_connection(gateway: Gateway) -> None:
    """A client may reuse a keep-alive connection for its WebSocket handshake."""
    async with RawHttp.open(gateway) as conn:
        conn.writer.write(conn.request_bytes("GET", "/healthz"))
        assert (await conn.response())[0] == 200
        client = ClientProtocol(parse_uri(gateway.url), subprotocols=JSON)  # type: ignore[arg-type]
        client.send_request(client.connect())
        ping = Frame(Opcode.TEXT, orjson.dumps({"type": "ping", "id": 7}))
        # The handshake and a frame in one TCP write: the frame is not lost in the switch.
        conn.writer.write(
            b"".join(client.data_to_send()) + ping.serialize(mask=True, extensions=[])
        )
        texts = await _frames(conn.reader, client, 2)  # welcome, pong
        assert [orjson.loads(t)["type"] for t in texts] == ["welcome", "pong"]


async def _frames(reader: asyncio.StreamReader, client: ClientProtocol, n: int) -> list[bytes]:
    texts: list[bytes] = []
    while len(texts) < n:
        data = await asyncio.wait_for(reader.read(65536), 10)
        if not data:
            client.receive_eof()
        else:
            client.receive_data(data)
        for event in client.events_received():
            if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                texts.extend(bytes(event.data).split(b"\n"))
        if not data:
            break
    return texts


async def test_a_fragmented_message_is_joined(gateway: Gateway) -> None:
    async with connect(gateway.url, subprotocols=JSON) as ws:  # type: ignore[arg-type]
        message = orjson.dumps({"type": "chat", "request_id": "f", "message": "hello there"})
        await ws.send([message[:5].decode(), message[5:20].decode(), message[20:].decode()])
        types = []
        while "response" not in types:
            frame = await asyncio.wait_for(ws.recv(decode=False), 10)
            types.extend(orjson.loads(line)["type"] for line in frame.split(b"\n"))
        assert types[0] == "welcome"
        assert "chunk" in types
    await settled(gateway)


async def test_a_text_frame_that_is_not_utf8_closes_1007(gateway: Gateway) -> None:
    async with RawHttp.open(gateway) as conn:
        client = ClientProtocol(parse_uri(gateway.url), subprotocols=JSON)  # type: ignore[arg-type]
        client.send_request(client.connect())
        bad = Frame(Opcode.TEXT, b'{"type":"ping","id":1}\xff')
        conn.writer.write(b"".join(client.data_to_send()) + bad.serialize(mask=True, extensions=[]))
        await _frames(conn.reader, client, 99)  # until the close
        assert client.close_code == 1007


async def test_before_authentication_input_is_bounded_even_in_small_writes() -> None:
    """With auth on and no credentials in the handshake, a frame larger than a hello may hold is
    refused (1009) as its bytes arrive, however slowly they trickle in."""
    async with (
        running_gateway(client_keys=("k" * 24,)) as gw,
        connect(gw.url, subprotocols=JSON, max_size=None) as ws,  # type: ignore[arg-type]
    ):
        if True:
            frame = Frame(Opcode.TEXT, b" " * 200_000)  # declared size over the limit
            data = frame.serialize(mask=True, extensions=[])
            for i in range(0, 40_000, 4_000):  # only a part of it, in small writes
                ws.transport.write(data[i : i + 4_000])
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == CloseCode.MESSAGE_TOO_BIG


async def test_a_silent_peer_is_pinged_and_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep-alive: a WebSocket that sends nothing is pinged; one that does not answer the ping
    either (a dead network) is closed 1011, and its requests end."""
    monkeypatch.setattr(gateway.server, "PING_INTERVAL", 0.3)
    monkeypatch.setattr(gateway.server, "PING_TIMEOUT", 0.3)
    async with running_gateway(slow_consumer_timeout=0.4) as gw, RawHttp.open(gw) as conn:
        client = ClientProtocol(parse_uri(gw.url), subprotocols=JSON)  # type: ignore[arg-type]
        client.send_request(client.connect())
        conn.writer.write(b"".join(client.data_to_send()))
        pinged = False
        while True:  # read (never answer): a ping comes, then the close
            data = await asyncio.wait_for(conn.reader.read(65536), 10)
            if not data:
                break
            client.receive_data(data)
            for event in client.events_received():
                pinged |= isinstance(event, Frame) and event.opcode is Opcode.PING
            client.data_to_send()  # the pong the protocol would send: dropped, never written
        assert pinged
        client.receive_eof()
        assert client.close_code == 1011
        await _no_connections(gw)


async def _no_connections(gw: Gateway) -> None:
    async with asyncio.timeout(5):
        while gw.connections:  # noqa: ASYNC110 - the connection leaves on connection_lost
            await asyncio.sleep(0.01)


async def test_a_handler_bug_closes_that_connection_1011_and_no_other(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug while handling a message (here injected for one ping id) ends that connection with
    1011 and cancels its requests (G7); another connection on the same gateway goes on."""
    from gateway.connection import Connection
    from protocol import Ping

    handle = Connection._handle

    def failing(self: Connection, result: Any) -> None:
        if isinstance(result, Ping) and result.id == "boom":
            raise RuntimeError("injected")
        handle(self, result)

    monkeypatch.setattr(Connection, "_handle", failing)
    async with (
        connect(gateway.url, subprotocols=JSON) as victim,  # type: ignore[arg-type]
        connect(gateway.url, subprotocols=JSON) as other,  # type: ignore[arg-type]
    ):
        chat = {"type": "chat", "request_id": "long", "message": "x", "metadata": {"tokens": 10**4}}
        await victim.send(orjson.dumps(chat).decode())
        await victim.send(orjson.dumps({"type": "ping", "id": "boom"}).decode())
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.wait_for(victim.recv(), 10)
        assert victim.close_code == 1011
        await other.send(orjson.dumps({"type": "ping", "id": "fine"}).decode())
        texts: list[bytes] = []
        while not any(b'"pong"' in t for t in texts):
            texts.append(await asyncio.wait_for(other.recv(decode=False), 10))
    await settled(gateway)
    assert not gateway.registry.active()


class _FakeTransport:
    """Just enough of an asyncio transport to drive HttpConnection without a socket."""

    def __init__(self) -> None:
        self.written = b""
        self.reading = True
        self.closed = False

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else None

    def write(self, data: bytes) -> None:
        self.written += data

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


class _HealthOnly:
    """An application answering every request with a tiny 200."""

    max_message_bytes = 1 << 20
    subprotocols: tuple[Any, ...] = ()

    def http(self, request: Any) -> Any:
        from gateway.transport import HttpResponse

        return HttpResponse(200, [], request.target.encode())

    def is_websocket(self, request: Any) -> bool:
        return False

    def connection_made(self, conn: Any) -> None:
        pass

    def connection_lost(self, conn: Any) -> None:
        pass


async def test_a_full_write_buffer_stops_taking_pipelined_requests() -> None:
    """A client that pipelines requests and reads no answer: once the transport's write buffer
    is over its high-water mark (pause_writing), no further request is parsed or answered and
    reading stops (TCP backpressure); resume_writing takes the next ones, in order."""
    from gateway.transport import HttpConnection

    tcp = HttpConnection(_HealthOnly(), write_limit=1 << 15, keepalive=10.0)  # type: ignore[arg-type]
    fake = _FakeTransport()
    tcp.connection_made(fake)  # type: ignore[arg-type]
    tcp.data_received(b"GET /1 HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert fake.written.count(b"HTTP/1.1 200") == 1
    tcp.pause_writing()  # the client stopped reading
    assert not fake.reading
    tcp.data_received(b"".join(b"GET /%d HTTP/1.1\r\nHost: gw\r\n\r\n" % i for i in (2, 3, 4)))
    assert fake.written.count(b"HTTP/1.1 200") == 1  # nothing more answered meanwhile
    tcp.resume_writing()
    assert fake.reading
    assert fake.written.count(b"HTTP/1.1 200") == 4
    bodies = [part.rsplit(b"\r\n\r\n", 1)[-1] for part in fake.written.split(b"HTTP/1.1 ")[1:]]
    assert bodies == [b"/1", b"/2", b"/3", b"/4"]
    assert tcp.deadline is not None  # idle again: the keep-alive deadline applies
