"""Hostile clients (issue 12): floods, oversized and many-line frames, slot hogging, a client that
keeps sending above the rate. Each test fails on the gateway as it was before the fix it covers.

The measure is what the *other* clients get and what the gateway keeps: a normal client's pings
answered during the attack, the gateway process's memory during and after it, the attacker's
answers last. Attacks that need the gateway's memory run it as a real process (``muxgate serve``)
on an ephemeral port; the others run it in this event loop, as the rest of the suite does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

import protocol
from gateway.server import Gateway
from protocol import CloseCode, ErrorCode, Ping, ResponseStatus

from .conftest import running_gateway
from .wire import WireClient

KEY = "k1"
AUTH = {"X-Muxi-Client-Key": KEY}
JSON = [protocol.Codec.JSON.subprotocol]
#: A request long enough to be in flight for the whole test.
LONG = {"tokens": 5000, "token_delay_ms": 5, "plan_ms": 0, "tool_ms": 0}
QUICK = {"tokens": 5, "token_delay_ms": 0, "plan_ms": 0, "tool_ms": 0}
MIB = 1 << 20
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@dataclass
class GatewayProcess:
    port: int
    pid: int
    log: list[bytes] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{protocol.WS_PATH}"

    def rss(self) -> float:
        return _rss_mib(self.pid)


@contextlib.asynccontextmanager
async def gateway_process(*flags: str) -> AsyncIterator[GatewayProcess]:
    """``muxgate serve`` with a client key, on an ephemeral port, until the block ends."""
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "serve",
        "--port",
        str(port),
        "--client-key",
        KEY,
        "--log-format",
        "json",
        *flags,
        cwd=REPO,
        # Settings come from the flags only: none from the environment the tests run in.
        env={k: v for k, v in os.environ.items() if not k.startswith("MUXGATE_")},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    gw = GatewayProcess(port, proc.pid)
    started = asyncio.Event()

    async def read_log(stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            gw.log.append(line)
            if b'"gateway.started"' in line:
                started.set()

    reader = asyncio.create_task(read_log(proc.stderr))
    try:
        async with asyncio.timeout(20):
            await asyncio.wait(
                [asyncio.ensure_future(started.wait()), reader],
                return_when=asyncio.FIRST_COMPLETED,
            )
        assert started.is_set(), b"".join(gw.log).decode(errors="replace")
        yield gw
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(reader, 5)


class Pinger:
    """A normal client: one ping at a time, every ``interval`` s, recording each round trip."""

    def __init__(self, ws: ClientConnection, interval: float = 0.01) -> None:
        self.ws = ws
        self.interval = interval
        self.round_trips: list[float] = []
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        n = 0
        while True:
            n += 1
            started = time.monotonic()
            await self.ws.send(orjson.dumps({"type": "ping", "id": n}).decode())
            tag = b'"id":%d}' % n
            while tag not in await self.ws.recv(decode=False):
                pass
            self.round_trips.append(time.monotonic() - started)
            await asyncio.sleep(self.interval)

    async def stop(self) -> float:
        """The longest round trip seen (or how long the last one has been waiting)."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        assert self.round_trips, "no ping was answered during the attack"
        return max(self.round_trips)


# --- 1. cancel flood ------------------------------------------------------------------------------


async def test_cancel_flood_is_paced_by_the_client_reading_and_memory_stays_bounded() -> None:
    """One connection sending frames of 1,000 cancels of unknown ids as fast as it can, while
    reading: every cancel is answered (none dropped, the connection stays open), the gateway's
    memory stays near its baseline during and after, and another client's pings are answered
    meanwhile. Before: the control queue grew past ``max_control_messages`` in the early-cancel
    path (1-2 GB in seconds), other clients stalled for seconds, the flooder got 4008."""
    frames, per_frame = 60, 1000
    frame = "\n".join(
        orjson.dumps({"type": "cancel", "request_id": f"nope-{i}"}).decode()
        for i in range(per_frame)
    )
    async with gateway_process() as gw:
        async with (
            connect(gw.url, subprotocols=JSON, additional_headers=AUTH) as normal,
            connect(gw.url, subprotocols=JSON, additional_headers=AUTH, max_queue=None) as flood,
        ):
            baseline = gw.rss()
            pinger = Pinger(normal)
            answered = 0
            peak = baseline

            async def read_answers() -> None:
                nonlocal answered, peak
                while answered < frames * per_frame:
                    data = await flood.recv(decode=False)
                    answered += data.count(b'"status":"not_found"')
                    peak = max(peak, gw.rss())

            reader = asyncio.create_task(read_answers())
            for _ in range(frames):
                await flood.send(frame)
            async with asyncio.timeout(60):
                await reader
            worst_ping = await pinger.stop()
            assert answered == frames * per_frame
        after = gw.rss()
    assert peak - baseline < 100, f"RSS {baseline:.0f} -> peak {peak:.0f} MiB"
    assert after - baseline < 100, f"RSS {baseline:.0f} -> after {after:.0f} MiB"
    assert worst_ping < 1.0, f"a normal client's ping waited {worst_ping:.2f} s"


async def test_a_client_that_floods_and_never_reads_is_closed_4008_with_memory_bounded() -> None:
    """The same flood from a client that reads nothing: the gateway stops reading it (TCP
    backpressure), its memory stays bounded, and the connection ends at the slow-consumer
    timeout (4008), after which its input is read and dropped until the close. Before: the
    reader itself blocked in a send the watchdog did not see, and the connection hung."""
    frame = "\n".join(
        orjson.dumps({"type": "cancel", "request_id": f"nope-{i}"}).decode() for i in range(1000)
    )
    async with gateway_process("--slow-consumer-timeout", "1") as gw:
        async with (
            connect(gw.url, subprotocols=JSON, additional_headers=AUTH) as normal,
            connect(gw.url, subprotocols=JSON, additional_headers=AUTH, max_queue=None) as flood,
        ):
            baseline = gw.rss()
            pinger = Pinger(normal)
            flood.transport.pause_reading()  # reads nothing from now on
            sent = 0
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                async with asyncio.timeout(8):
                    while sent < 2000:  # the gateway stops reading long before: send blocks
                        await flood.send(frame)
                        sent += 1
            peak = gw.rss()
            flood.transport.resume_reading()
            with contextlib.suppress(ConnectionClosed):
                async with asyncio.timeout(15):
                    while True:
                        await flood.recv(decode=False)
            assert flood.close_code == CloseCode.SLOW_CONSUMER, (flood.close_code, gw.log)
            worst_ping = await pinger.stop()
        after = gw.rss()
    assert peak - baseline < 100, f"RSS {baseline:.0f} -> peak {peak:.0f} MiB"
    assert after - baseline < 100, f"RSS {baseline:.0f} -> after {after:.0f} MiB"
    assert worst_ping < 1.0, f"a normal client's ping waited {worst_ping:.2f} s"


# --- 2. big and many-line frames ------------------------------------------------------------------


async def test_before_authentication_a_large_frame_closes_1009_unread() -> None:
    """Without credentials, the first frame must be a (small) hello: a 1 MiB frame of short lines
    is refused from its header (1009), not decoded. /healthz and an authenticated client are
    served meanwhile. Before: decoding it took seconds, then 4001."""
    junk = "x\n" * (MIB // 2 - 8)
    async with (
        gateway_process() as gw,
        connect(gw.url, subprotocols=JSON, additional_headers=AUTH) as normal,
    ):
        pinger = Pinger(normal)
        for _ in range(3):
            async with connect(gw.url, subprotocols=JSON, max_size=None) as hostile:
                await hostile.send(junk)
                with contextlib.suppress(ConnectionClosed):
                    async with asyncio.timeout(10):
                        await hostile.recv()
                assert hostile.close_code == CloseCode.MESSAGE_TOO_BIG, hostile.close_code
        # A hello of the largest size a client may send still fits.
        async with connect(gw.url, subprotocols=JSON) as late:
            hello = {"type": "hello", "client_key": KEY, "token": None}
            del hello["token"]
            padded = orjson.dumps(hello).decode() + " " * 9000  # JSON whitespace
            await late.send(padded)
            assert b'"welcome"' in await late.recv(decode=False)
            # Authenticated now: frames up to the configured size again.
            big_chat = {"type": "chat", "request_id": "b", "message": "y" * 200_000}
            await late.send(orjson.dumps({**big_chat, "metadata": QUICK}).decode())
            while b'"response"' not in (answer := await late.recv(decode=False)):
                pass
            assert b'"completed"' in answer
        assert await pinger.stop() < 1.0


async def test_a_frame_over_the_message_cap_costs_its_messages_in_rate() -> None:
    """A frame of more than max_batch_messages lines is refused before decoding and charged
    as the messages it carries, not as one: the next message finds the bucket empty. Before:
    one rate token per frame, and ~200 ms of decoding each."""
    many = "1\n" * 500_000
    async with (
        running_gateway(client_keys=(KEY,), rate_limit=0.001, rate_burst=1000) as gw,
        WireClient.open(gw.url, headers=AUTH) as client,
    ):
        await client.ws.send(many)
        await client.send(Ping(id="after"))
        await client.wait_for(lambda: len(client.errors) == 2)
        assert [e.code for e in client.errors] == [
            ErrorCode.FRAME_TOO_LARGE,
            ErrorCode.RATE_LIMITED,
        ]


# --- 3. deep nesting ------------------------------------------------------------------------------

DEEP = "[" * 1000 + "12345678901234567890" + "]" * 1000


@pytest.mark.parametrize("where", ["alone", "in_a_cancel_frame", "in_metadata"])
async def test_deep_nesting_with_a_long_number_is_a_bad_frame_and_nothing_else(where: str) -> None:
    """A line nested 1,000 deep holding a 20-digit integer is ``bad_frame``; the connection and
    its other requests carry on (G6), a cancel in the same frame is done. Before: an uncaught
    RecursionError closed the connection (1011, or no close frame at all on the early-cancel
    path) and cancelled its requests."""
    async with running_gateway() as gw, WireClient.open(gw.url) as client:
        keep = await client.chat("keep", metadata=LONG)
        doomed = await client.chat("doomed", metadata=LONG)
        await client.chunks("keep", 1)
        await client.chunks("doomed", 1)
        if where == "alone":
            await client.ws.send(DEEP)
        elif where == "in_a_cancel_frame":
            doomed.machine.on_cancel()
            cancel = orjson.dumps({"type": "cancel", "request_id": "doomed"}).decode()
            await client.ws.send(cancel + "\n" + DEEP)
        else:
            chat = {"type": "chat", "request_id": "deep", "message": "x"}
            line = orjson.dumps(chat).decode()[:-1] + ',"metadata":{"a":' + DEEP + "}}"
            await client.ws.send(line)
        await client.send(Ping(id="after"))
        await client.wait_for(lambda: any(getattr(m, "id", None) == "after" for m in client.others))
        assert [e.code for e in client.errors] == [ErrorCode.BAD_FRAME]
        if where == "in_a_cancel_frame":
            assert (await client.response("doomed")).status is ResponseStatus.CANCELLED
        await client.chunks("keep", len(keep.chunks) + 1)  # still streaming
        assert keep.response is None
        assert client.ws.close_code is None


# --- 4. unauthenticated slot hogging --------------------------------------------------------------


async def _hold(url: str) -> ClientConnection:
    """A connection that completed the handshake and will never send credentials."""
    return await connect(url, subprotocols=JSON)


async def _refused_with(ws: ClientConnection) -> int | None:
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(5):
            while True:  # an error explaining the close may come first
                await ws.recv()
    return ws.close_code


async def test_unauthenticated_sockets_cannot_keep_authenticated_clients_out() -> None:
    """With max_connections 20, sockets that never authenticate get a tenth of the slots; the
    rest (1013) are refused, and clients with credentials still get in. Before: they filled
    every slot and a client with a valid key got 1013."""
    async with running_gateway(client_keys=(KEY,), max_connections=20) as gw:
        held = [await _hold(gw.url) for _ in range(2)]
        extra = [await _hold(gw.url) for _ in range(10)]
        for ws in extra:
            assert await _refused_with(ws) == CloseCode.TRY_AGAIN_LATER
            assert ws.close_reason == "too many unauthenticated connections"
        async with WireClient.open(gw.url, headers=AUTH) as client:
            await client.chat("q", metadata=QUICK)
            assert (await client.response("q")).status is ResponseStatus.COMPLETED
            assert client.welcome is not None
        for ws in held:
            await ws.close()
    _unauthenticated_released(gw)


async def test_unauthenticated_budget_per_address_and_a_hello_frees_its_slot() -> None:
    async with running_gateway(
        client_keys=(KEY,), max_unauthenticated_connections=10, max_unauthenticated_per_address=2
    ) as gw:
        first, second = await _hold(gw.url), await _hold(gw.url)
        third = await _hold(gw.url)
        assert await _refused_with(third) == CloseCode.TRY_AGAIN_LATER
        assert third.close_reason == "too many unauthenticated connections from this address"
        # A hello welcomed: that connection is authenticated and leaves the budget.
        await first.send(orjson.dumps({"type": "hello", "client_key": KEY}).decode())
        assert b'"welcome"' in await first.recv(decode=False)
        fourth = await _hold(gw.url)
        await fourth.send(orjson.dumps({"type": "ping", "id": 1}).decode())  # not a hello
        assert await _refused_with(fourth) == CloseCode.UNAUTHORIZED  # admitted, then refused
        for ws in (first, second):
            await ws.close()
    _unauthenticated_released(gw)


def _unauthenticated_released(gw: Gateway) -> None:
    """Every unauthenticated slot was given back once the connections were gone (no leak);
    checked after shutdown, which awaits every connection's handler."""
    assert not gw.connections
    assert gw._unauthenticated_total == 0
    assert gw._unauthenticated == {}


# --- 5. rate: sustained excess closes 4029 --------------------------------------------------------


async def test_sustained_excess_over_the_rate_closes_4029() -> None:
    """A client sending ten times the rate for longer than rate_close_after is closed with 4029
    (SPEC.md §7.1), even though the refilling bucket lets some of its messages through. Before:
    each admitted message reset the count and the connection was never closed."""
    async with (
        running_gateway(rate_limit=100, rate_burst=10, rate_close_after=0.5) as gw,
        WireClient.open(gw.url) as client,
    ):
        frame = "\n".join(orjson.dumps({"type": "ping", "id": f"p{i}"}).decode() for i in range(10))
        started = time.monotonic()
        with contextlib.suppress(ConnectionClosed):
            for _ in range(500):  # ~1,000 pings/s for at most ~5 s
                await client.ws.send(frame)
                await asyncio.sleep(0.01)
        async with asyncio.timeout(10):
            await client.ws.wait_closed()
        assert client.ws.close_code == CloseCode.RATE_LIMITED
        assert time.monotonic() - started < 5
        admitted = sum(1 for m in client.others if isinstance(m, protocol.Pong))
        assert admitted > 10, "some pings passed as the bucket refilled: not a burst-only close"
        client.violations.clear()  # the reader records the error close


async def test_a_flooder_that_resets_while_the_reader_waits_for_room_is_cleaned_up() -> None:
    """The reader waits for its answers to be written (control_room) while the client does not
    read; the client then resets its connection: the writer's send fails, and the connection
    must still end (requests stopped, handler finished) instead of waiting for room forever."""
    frame = "\n".join(
        orjson.dumps({"type": "cancel", "request_id": f"nope-{i}"}).decode() for i in range(1000)
    )
    async with running_gateway(max_control_messages=64) as gw:
        flood = await connect(gw.url, subprotocols=JSON, max_queue=None)
        flood.transport.pause_reading()  # reads nothing
        (conn,) = gw.connections
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                while not conn.outbound.control_backlog or not conn.outbound.send_started:
                    await flood.send(frame)
        assert conn.outbound.control_backlog, "the reader never had to wait"
        sock = flood.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        flood.transport.abort()  # RST
        async with asyncio.timeout(5):
            await conn.wait_ended()


async def test_a_frame_the_early_cancel_path_declines_is_decoded_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A frame holding a cancel and something else is decoded by the early-cancel path, which
    declines it; the reader then handles those same messages instead of decoding it again
    (a hostile client's frames would otherwise cost two decodes each)."""
    decoded: list[object] = []
    decode = protocol.decode

    def counting(data: Any, *args: Any) -> Any:
        decoded.append(data)
        return decode(data, *args)

    monkeypatch.setattr(protocol, "decode", counting)
    async with running_gateway() as gw, WireClient.open(gw.url) as client:
        doomed = await client.chat("doomed", metadata=LONG)
        await client.chunks("doomed", 1)
        doomed.machine.on_cancel()
        mixed = (
            orjson.dumps({"type": "cancel", "request_id": "doomed"}).decode()
            + "\n"
            + orjson.dumps({"type": "ping", "id": "mixed"}).decode()
        )
        decoded.clear()
        await client.ws.send(mixed)
        assert (await client.response("doomed")).status is ResponseStatus.CANCELLED
        await client.wait_for(lambda: any(getattr(m, "id", None) == "mixed" for m in client.others))
        frames = [d if isinstance(d, bytes) else d.encode() for d in decoded]
        assert frames.count(mixed.encode()) == 1, decoded
