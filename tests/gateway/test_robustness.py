"""End-to-end robustness: bad input (G6), limits, rate limiting, slow readers and bounded memory,
fairness, outbound batching, and the SIGTERM drain of a real ``muxgate serve`` process.

Everything runs against a real gateway on an ephemeral port over real sockets. Tests wait on
events (the strict client's condition, pipeline tasks, log lines of the subprocess), never on
sleeps; the only polls are event-loop turns (to see a paused pipeline stay paused) and one
bounded housekeeping check (a closed connection leaves the gateway's set).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest
import structlog.testing
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import protocol
from gateway.backends.simulated import SimulatedBackend
from gateway.pipeline import RequestContext
from gateway.registry import RequestKey, RequestStatus
from gateway.server import Gateway
from protocol import (
    CancelReason,
    CancelStatus,
    Chat,
    CloseCode,
    Codec,
    Error,
    ErrorCode,
    Ping,
    Pong,
    ResponseStatus,
)
from protocol.limits import MAX_FRAME_BYTES, MAX_SAFE_INTEGER

from .conftest import running_gateway, settled
from .wire import Track, WireClient

CODECS = [pytest.param(c, id=c.name.lower()) for c in Codec]
JSON_PROTO = Codec.JSON.subprotocol
MSGPACK_PROTO = Codec.MSGPACK.subprotocol
REPO = Path(__file__).resolve().parents[2]

#: Two requests kept in flight while bad input arrives: ~250 ms of tokens each.
INFLIGHT = {"tokens": 80, "token_delay_ms": 3, "plan_ms": 1, "tool_ms": 1, "seed": 7}
#: A request that outlives any test unless cancelled.
LONG = {"tokens": 5000, "token_delay_ms": 5, "plan_ms": 0, "tool_ms": 0}
#: A request that ends in a few event-loop turns.
QUICK = {"tokens": 5, "token_delay_ms": 0, "plan_ms": 0, "tool_ms": 0}


def _j(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def _mp(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def all_errors(client: WireClient) -> list[Error]:
    errors = list(client.errors)
    for track in client.tracks.values():
        errors.extend(track.errors)
    return errors


def pong_ids(client: WireClient) -> list[Any]:
    return [m.id for m in client.others if isinstance(m, Pong)]


async def barrier(client: WireClient, tag: str) -> None:
    """Round trip a ping: whatever the gateway queued for earlier messages has arrived."""
    await client.send(Ping(id=tag))
    await client.wait_for(lambda: tag in pong_ids(client))


async def closed_with(client: WireClient, code: int) -> None:
    """Wait until the gateway closed the connection and check the close code it sent."""
    async with asyncio.timeout(10):
        await client.ws.wait_closed()
        await client._reader
    assert client.ws.close_code == code, (client.ws.close_code, client.ws.close_reason)
    # The reader records an error close as ConnectionClosedError: expected here.
    client.violations[:] = [v for v in client.violations if not isinstance(v, ConnectionClosed)]


def attached(ws: ClientConnection, codec: Codec) -> Any:
    """A strict client over a connection opened by hand (to choose subprotocols freely)."""
    return WireClient.attach(ws, codec)


# --- 1. bad input is contained (G6) --------------------------------------------------------------


@dataclass(frozen=True)
class BadInput:
    codec: Codec
    #: Raw frames: ``str`` is sent as a text frame, ``bytes`` as a binary frame.
    frames: tuple[str | bytes, ...]
    code: ErrorCode
    #: The ``request_id`` the error must carry (the bad message had a valid one).
    request_id: str | None = None
    #: Chats in the same frame that must be accepted and complete.
    good: tuple[str, ...] = ()
    #: Pings in the same frame that must be answered, in order.
    pongs: tuple[str, ...] = ()


def _chat(rid: str, **fields: Any) -> dict[str, Any]:
    return {"type": "chat", "request_id": rid, "message": "hi", "metadata": QUICK, **fields}


_USAGE = {"input_tokens": 0, "output_tokens": 0, "saved_tokens": 0, "final": True}

BAD_INPUTS = {
    "invalid_json": BadInput(Codec.JSON, ('{"type":"ping","id":',), ErrorCode.BAD_FRAME),
    "non_object": BadInput(Codec.JSON, ('[{"type":"ping"}]',), ErrorCode.BAD_FRAME),
    "string_value": BadInput(Codec.JSON, ('"ping"',), ErrorCode.BAD_FRAME),
    "no_type": BadInput(Codec.JSON, (_j({"request_id": "nt"}),), ErrorCode.BAD_FRAME),
    "empty_frame": BadInput(Codec.JSON, ("",), ErrorCode.BAD_FRAME),
    "unknown_type": BadInput(
        Codec.JSON,
        (_j({"type": "frobnicate", "request_id": "u1"}),),
        ErrorCode.UNKNOWN_TYPE,
        "u1",
    ),
    "bad_request_id": BadInput(
        Codec.JSON, (_j(_chat("has spaces")),), ErrorCode.INVALID_FIELD, None
    ),
    "timeout_ms_zero": BadInput(
        Codec.JSON, (_j(_chat("t0", timeout_ms=0)),), ErrorCode.INVALID_FIELD, "t0"
    ),
    "message_and_messages": BadInput(
        Codec.JSON,
        (_j(_chat("mm", messages=[{"role": "user", "content": "hi"}])),),
        ErrorCode.INVALID_FIELD,
        "mm",
    ),
    "names_a_running_request": BadInput(
        Codec.JSON, (_j(_chat("a", timeout_ms=0)),), ErrorCode.INVALID_FIELD, "a"
    ),
    "gateway_type_chunk": BadInput(
        Codec.JSON,
        (_j({"type": "chunk", "request_id": "g1", "seq": 0, "text": "x"}),),
        ErrorCode.UNKNOWN_TYPE,
        "g1",
    ),
    "gateway_type_response": BadInput(
        Codec.MSGPACK,
        (_mp({"type": "response", "request_id": "a", "status": "completed", "usage": _USAGE}),),
        ErrorCode.UNKNOWN_TYPE,
        "a",
    ),
    "gateway_type_welcome": BadInput(
        Codec.JSON, (_j({"type": "welcome", "connection_id": "c"}),), ErrorCode.UNKNOWN_TYPE
    ),
    "binary_on_json": BadInput(
        Codec.JSON, (_mp({"type": "ping", "id": "lost"}),), ErrorCode.BAD_FRAME
    ),
    "text_on_msgpack": BadInput(
        Codec.MSGPACK, (_j({"type": "ping", "id": "lost"}),), ErrorCode.BAD_FRAME
    ),
    "truncated_msgpack": BadInput(Codec.MSGPACK, (_mp(_chat("tr"))[:-5],), ErrorCode.BAD_FRAME),
    "json_batch_one_line_of_three_bad": BadInput(
        Codec.JSON,
        ("\n".join([_j(_chat("n1")), "{not json", _j({"type": "ping", "id": "q"})]),),
        ErrorCode.BAD_FRAME,
        good=("n1",),
        pongs=("q",),
    ),
    "json_batch_one_invalid_field_of_three": BadInput(
        Codec.JSON,
        ("\n".join([_j(_chat("n1")), _j(_chat("n2", stream=1)), _j(_chat("n3"))]),),
        ErrorCode.INVALID_FIELD,
        "n2",
        good=("n1", "n3"),
    ),
    "msgpack_batch_one_of_three_bad": BadInput(
        Codec.MSGPACK,
        (_mp(_chat("n1")) + _mp(7) + _mp({"type": "ping", "id": "q"}),),
        ErrorCode.BAD_FRAME,
        good=("n1",),
        pongs=("q",),
    ),
    "too_many_messages_in_frame": BadInput(
        Codec.JSON,
        ("\n".join(_j({"type": "ping", "id": f"x{i}"}) for i in range(1025)),),
        ErrorCode.FRAME_TOO_LARGE,
    ),
}


@pytest.mark.parametrize("case", [pytest.param(c, id=k) for k, c in BAD_INPUTS.items()])
async def test_bad_input_gets_one_error_and_touches_nothing_else(case: BadInput) -> None:
    # A burst above the largest frame: a refused over-cap frame costs its messages' worth of
    # rate (SPEC.md §7.1), and the barrier after it must not be refused for rate.
    async with (
        running_gateway(rate_burst=4096) as gateway,
        WireClient.open(gateway.url, case.codec) as client,
    ):
        a = await client.chat("a", "contain the damage", metadata=INFLIGHT)
        b = await client.chat("b", "contain the damage", metadata=INFLIGHT)
        await client.wait_for(lambda: bool(a.chunks and b.chunks))
        refused: Track | None = None
        if case.request_id is not None and case.request_id not in client.tracks:
            refused = client.track(case.request_id)  # a response for it would land here
        for rid in case.good:
            client.track(rid)
        for frame in case.frames:
            await client.ws.send(frame)
        await barrier(client, "after-bad")

        errors = all_errors(client)
        assert [(e.code, e.request_id) for e in errors] == [(case.code, case.request_id)]
        assert pong_ids(client) == [*case.pongs, "after-bad"]
        seen = (len(a.chunks), len(b.chunks))

        ra, rb = await client.response("a"), await client.response("b")
        assert ra.status is ResponseStatus.COMPLETED
        assert rb.status is ResponseStatus.COMPLETED
        # Same prompt, same seed: neither text was altered by the bad input (G6). Chunks kept
        # flowing after the error, contiguous (the client's state machine checks every seq).
        assert ra.content == rb.content != ""
        assert len(a.chunks) > seen[0]
        assert len(b.chunks) > seen[1]
        for rid in case.good:
            assert (await client.response(rid)).status is ResponseStatus.COMPLETED
        await barrier(client, "end")
        assert len(all_errors(client)) == 1
        if refused is not None:  # a refused chat creates no request: no response follows
            assert refused.response is None
            assert len(refused.log) == 1
        await client.ws.close()
        await settled(gateway)
        if refused is not None:
            key = RequestKey("", refused.machine.request_id)
            assert await gateway.registry.lookup(key) is None


async def test_frame_over_max_frame_bytes_closes_1009_and_cancels() -> None:
    async with running_gateway(max_frame_bytes=1024) as gw:
        async with WireClient.open(gw.url) as client:
            long = await client.chat("long", metadata=LONG)
            await client.chunks("long", 1)
            assert client.welcome is not None
            assert client.welcome.limits.max_frame_bytes == 1024
            # Exactly at the limit: accepted.
            edge = _j(_chat("edge", message="x" * (1024 - len(_j(_chat("edge", message=""))))))
            assert len(edge.encode()) == 1024
            client.track("edge")
            await client.ws.send(edge)
            assert (await client.response("edge")).status is ResponseStatus.COMPLETED
            # One byte over: close 1009, no error message, the connection's requests cancelled.
            big = _j(_chat("big", message="x" * (1025 - len(_j(_chat("big", message=""))))))
            assert len(big.encode()) == 1025
            client.track("big")
            await client.ws.send(big)
            await closed_with(client, CloseCode.MESSAGE_TOO_BIG)
            assert long.response is None
            assert not all_errors(client)
        await settled(gw)
        record = await gw.registry.lookup(RequestKey("", "long"))
        assert record is not None
        assert record.status is RequestStatus.CANCELLED
        assert record.reason is CancelReason.DISCONNECT
        assert record.usage.final
        assert record.usage.output_tokens > 0
        assert await gw.registry.lookup(RequestKey("", "big")) is None
        assert not gw.registry.active()


@pytest.mark.parametrize("codec", CODECS)
async def test_batched_client_frames_are_accepted(gateway: Gateway, codec: Codec) -> None:
    async with WireClient.open(gateway.url, codec) as client:
        for rid in ("q1", "q2"):
            client.track(rid)
        client.track("q3", stream=False)
        await client.send(
            Chat(request_id="q1", message="one", metadata=QUICK),
            Chat(request_id="q2", message="two", metadata=QUICK),
            Chat(request_id="q3", message="three", stream=False, metadata=QUICK),
            Ping(id=1),
        )
        for rid in ("q1", "q2", "q3"):
            assert (await client.response(rid)).status is ResponseStatus.COMPLETED
        assert not client.tracks["q3"].chunks
        # A chat and its cancel in one frame: processed in order, response then result.
        c = client.track("c")
        c.machine.on_cancel()
        await client.send(
            Chat(request_id="c", message="x", metadata=LONG),
            protocol.Cancel(request_id="c"),
        )
        assert (await client.cancel_result("c")).status is CancelStatus.CANCELLED
        assert c.response is not None
        assert c.response.reason is CancelReason.CLIENT
        assert not c.chunks
        assert pong_ids(client) == [1]
        assert not all_errors(client)
    await settled(gateway)


async def test_subprotocol_none_offered_means_json(gateway: Gateway) -> None:
    async with connect(gateway.url) as ws:
        assert ws.subprotocol is None
        async with attached(ws, Codec.JSON) as client:  # checks every frame is text
            await client.chat("r1", metadata=QUICK)
            assert (await client.response("r1")).status is ResponseStatus.COMPLETED


@pytest.mark.parametrize("offered", [[JSON_PROTO, MSGPACK_PROTO], [MSGPACK_PROTO, JSON_PROTO]])
async def test_subprotocol_both_offered_selects_msgpack(
    gateway: Gateway, offered: list[Any]
) -> None:
    async with connect(gateway.url, subprotocols=offered) as ws:
        assert ws.subprotocol == MSGPACK_PROTO
        async with attached(ws, Codec.MSGPACK) as client:  # checks every frame is binary
            await client.chat("r1", metadata=QUICK)
            assert (await client.response("r1")).status is ResponseStatus.COMPLETED


async def test_subprotocol_only_unknown_offered_is_refused_400(gateway: Gateway) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with connect(gateway.url, subprotocols=["muxgate.v9.json"]):  # type: ignore[list-item]
            pass
    assert info.value.response.status_code == 400
    assert not gateway.connections


# --- 2. limits -----------------------------------------------------------------------------------


async def test_a_request_stops_counting_before_its_end_is_written() -> None:
    """SPEC.md §5.6: a request counts against max_streams until it is finished; a client that
    sees it finish may send its next chat at once, and the gateway (which handles that chat in
    the callback that reads it) must not refuse it. So whenever a frame carrying a request's
    end (a final response, or the final usage after a cancel) is written, that request no
    longer counts: checked at every write, completed and cancelled requests alike."""
    async with running_gateway(max_streams=2) as gw, WireClient.open(gw.url) as client:
        await client.chat("warm", metadata=QUICK)
        await client.response("warm")
        (conn,) = gw.connections
        assert conn.mux is not None
        mux, channel = conn.mux, conn.channel
        counted_at_end: list[tuple[str, set[str]]] = []

        class Recording:
            """The connection's channel, recording what counts when a request's end is written."""

            def __getattr__(self, name: str) -> Any:
                return getattr(channel, name)

            def write(self, data: bytes, text: bool) -> None:
                for m in protocol.decode(data, client.codec, protocol.Sender.GATEWAY):
                    final = (isinstance(m, protocol.Response) and m.usage.final) or isinstance(
                        m, protocol.UsageReport
                    )
                    if final:
                        counted = {r.ctx.request_id for r in mux.requests}
                        counted_at_end.append((m.request_id, counted))
                channel.write(data, text)

        conn.channel = Recording()  # type: ignore[assignment]
        for n in range(10):
            await client.chat(f"q{n}", metadata=QUICK)
            await client.chat(f"c{n}", metadata=LONG)
            await client.chunks(f"c{n}", 1)
            await client.cancel(f"c{n}")
            await client.response(f"q{n}")
            await client.final_usage(f"c{n}")
        assert len(counted_at_end) == 20
        assert all(rid not in counted for rid, counted in counted_at_end), counted_at_end


async def test_max_streams() -> None:
    async with running_gateway(max_streams=3) as gw, WireClient.open(gw.url) as client:
        for rid in ("s1", "l1", "l2", "x4"):
            client.track(rid)
        # One frame: the four chats are read before any pipeline runs.
        await client.send(
            Chat(request_id="s1", message="short", metadata=QUICK),
            Chat(request_id="l1", message="long", metadata=LONG),
            Chat(request_id="l2", message="long", metadata=LONG),
            Chat(request_id="x4", message="one too many", metadata=QUICK),
        )
        await client.wait_for(lambda: bool(client.tracks["x4"].errors))
        assert client.welcome is not None
        assert client.welcome.limits.max_streams == 3
        assert [e.code for e in client.tracks["x4"].errors] == [ErrorCode.TOO_MANY_STREAMS]
        assert (await client.response("s1")).status is ResponseStatus.COMPLETED
        # s1 finished: its slot is free again.
        await client.chat("n1", metadata=QUICK)
        assert (await client.response("n1")).status is ResponseStatus.COMPLETED
        # Cancelled requests free their slot once finished (after the final usage).
        await client.cancel("l1")
        await client.final_usage("l1")
        await client.chat("n2", metadata=QUICK)
        assert (await client.response("n2")).status is ResponseStatus.COMPLETED
        assert client.tracks["l2"].response is None
        assert client.tracks["x4"].response is None
        assert len(all_errors(client)) == 1
        await client.cancel("l2")
        await client.final_usage("l2")
        await settled(gw)


async def test_duplicate_request_id() -> None:
    async with running_gateway() as gw, WireClient.open(gw.url) as client:
        dup = await client.chat("dup", "same text", metadata=INFLIGHT)
        await client.chunks("dup", 1)
        await client.send(Chat(request_id="dup", message="again", metadata=QUICK))
        await client.wait_for(lambda: bool(dup.errors))
        assert [(e.code, e.request_id) for e in dup.errors] == [
            (ErrorCode.DUPLICATE_REQUEST_ID, "dup")
        ]
        first = await client.response("dup")
        assert first.status is ResponseStatus.COMPLETED
        # Untouched: the same text as the same chat run alone.
        await client.chat("ref", "same text", metadata=INFLIGHT)
        assert (await client.response("ref")).content == first.content
        # Finished: the id is free again; a second chat in the same frame is a duplicate.
        again = client.track("dup")
        await client.send(
            Chat(request_id="dup", message="x", metadata=QUICK),
            Chat(request_id="dup", message="y", metadata=QUICK),
        )
        assert (await client.response("dup")).status is ResponseStatus.COMPLETED
        assert [e.code for e in again.errors] == [ErrorCode.DUPLICATE_REQUEST_ID]
    await settled(gw)


async def test_ping_pong_ids_and_batches(gateway: Gateway) -> None:
    async with WireClient.open(gateway.url) as client:
        await client.send(Ping(id="hb-1"))
        await client.send(Ping(id=42))
        await client.send(Ping())
        batch = [Ping(id=i) for i in range(20)]
        batch += [Ping(id=MAX_SAFE_INTEGER), Ping(id=-MAX_SAFE_INTEGER), Ping(id="x" * 128)]
        await client.send(*batch)
        expected = ["hb-1", 42, None, *range(20), MAX_SAFE_INTEGER, -MAX_SAFE_INTEGER, "x" * 128]
        await client.wait_for(lambda: len(pong_ids(client)) == len(expected))
        ids = pong_ids(client)
        assert ids == expected
        assert [type(i) for i in ids[:2]] == [str, int]
        assert not all_errors(client)


# --- 3. rate limiting ----------------------------------------------------------------------------

#: A bucket that never refills during a test: exactly ``rate_burst`` messages are admitted.
NO_REFILL = 0.001


async def test_rate_limited_but_cancel_always_answered_then_4029() -> None:
    async with running_gateway(rate_limit=NO_REFILL, rate_burst=5) as gw:
        async with WireClient.open(gw.url) as client:
            long = await client.chat("long", metadata=LONG)  # 1 of 5
            await client.chunks("long", 1)
            refused = client.track("refused")
            long.machine.on_cancel()
            await client.send(
                *[Ping(id=i) for i in range(6)],  # 0-3 admitted, 4 and 5 refused
                protocol.Cancel(request_id="long"),  # never refused for rate
                Ping(id=6),  # refused
                Chat(request_id="refused", message="x", metadata=QUICK),  # refused
            )
            await client.wait_for(lambda: bool(refused.errors))
            assert pong_ids(client) == [0, 1, 2, 3]
            assert [(e.code, e.request_id) for e in client.errors] == [
                (ErrorCode.RATE_LIMITED, None)
            ] * 3
            assert [(e.code, e.request_id) for e in refused.errors] == [
                (ErrorCode.RATE_LIMITED, "refused")
            ]
            assert (await client.cancel_result("long")).status is CancelStatus.CANCELLED
            assert long.response is not None
            assert long.response.reason is CancelReason.CLIENT
            # Still limited, the connection is open and a cancel is still answered.
            await client.cancel("long")
            await client.wait_for(lambda: len(long.cancel_results) == 2)
            assert long.cancel_results[1].status is CancelStatus.ALREADY_CANCELLED
            # The flood goes on: close 4029 (after the errors explaining it).
            await client.send(*[Ping(id=f"f{i}") for i in range(20)])
            await closed_with(client, CloseCode.RATE_LIMITED)
            assert pong_ids(client) == [0, 1, 2, 3]
            assert {e.code for e in client.errors} == {ErrorCode.RATE_LIMITED}
            assert refused.response is None
        await settled(gw)
        assert await gw.registry.lookup(RequestKey("", "refused")) is None


async def test_sustained_flood_closes_4029_and_cancels() -> None:
    async with running_gateway(rate_limit=NO_REFILL, rate_burst=3) as gw:
        async with WireClient.open(gw.url) as client:
            long = await client.chat("long", metadata=LONG)
            await client.chunks("long", 1)
            for i in range(10):  # one frame each: a flood of frames
                await client.send(Ping(id=i))
            await closed_with(client, CloseCode.RATE_LIMITED)
            assert pong_ids(client) == [0, 1]
            assert [e.code for e in client.errors] == [ErrorCode.RATE_LIMITED] * 3
            assert long.response is None
        await settled(gw)
        record = await gw.registry.lookup(RequestKey("", "long"))
        assert record is not None
        assert record.reason is CancelReason.DISCONNECT


async def test_forced_close_stops_requests_before_the_close_handshake() -> None:
    """A connection the gateway closes (here 4029) stops its requests once the error explaining
    the close is out, not when the close handshake ends: a client that does not read can stretch
    that to the close timeout (10 s), and its requests would go on spending tokens meanwhile."""
    async with (
        running_gateway(rate_limit=NO_REFILL, rate_burst=3) as gw,
        WireClient.open(gw.url) as client,
    ):
        await client.chat("long", metadata=LONG)
        await client.chunks("long", 1)
        client.ws.transport.pause_reading()  # from now on it reads nothing, not even a close
        for i in range(10):
            await client.send(Ping(id=i))
        await settled(gw, timeout=3)  # the pipeline halted well before the close timeout
        record = await gw.registry.lookup(RequestKey("", "long"))
        assert record is not None
        assert record.reason is CancelReason.DISCONNECT
        client.ws.transport.resume_reading()
        await closed_with(client, CloseCode.RATE_LIMITED)


@pytest.mark.parametrize("codec", CODECS)
async def test_flood_of_bad_frames_is_rate_limited_too(codec: Codec) -> None:
    """Issue 3 item 9: a flood of frames is rate-limited, whatever they carry."""
    bad: str | bytes = b"\x00" if codec.is_text else "not msgpack"  # wrong frame kind
    async with (
        running_gateway(rate_limit=NO_REFILL, rate_burst=3) as gw,
        WireClient.open(gw.url, codec) as client,
    ):
        await client.send(Ping(id=0))
        await client.wait_for(lambda: pong_ids(client) == [0])
        for _ in range(5):
            await client.ws.send(bad)
            await client.ws.send("{oops" if codec.is_text else b"\xc1")
        await closed_with(client, CloseCode.RATE_LIMITED)
        codes = [e.code for e in client.errors]
        assert codes[:2] == [ErrorCode.BAD_FRAME] * 2, codes
        assert set(codes[2:]) == {ErrorCode.RATE_LIMITED}, codes


# --- 4. slow readers, bounded memory, fairness ---------------------------------------------------


class _Probe:
    """What one request's pipeline did at its emits (installed between pipeline and outbound)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.go = asyncio.Event()
        self.paused = asyncio.Event()
        self.waiting = False
        self.max_pending = 0
        self.max_token = 0
        self.pushes = 0


class ProbedBackend(SimulatedBackend):
    """The simulated pipeline, with its chunk sink observed; a request named ``gated*`` waits
    for its probe's ``go`` before it starts."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.probes: dict[str, _Probe] = {}

    async def run(self, ctx: RequestContext) -> None:
        probe = self.probes.setdefault(ctx.request_id, _Probe())
        sink = ctx._sink  # gray box: observe the stream behind emit

        class Observed:
            def push(self, text: str) -> bool:
                over = sink.push(text)
                probe.pushes += 1
                probe.max_token = max(probe.max_token, len(text))
                probe.max_pending = max(probe.max_pending, sink.pending_chars)  # type: ignore[attr-defined]
                return over

            def push_many(self, texts: list[str]) -> bool:
                over = sink.push_many(texts)
                probe.pushes += 1
                probe.max_token = max(probe.max_token, sum(map(len, texts)))  # one push
                probe.max_pending = max(probe.max_pending, sink.pending_chars)  # type: ignore[attr-defined]
                return over

            async def drained(self) -> None:
                probe.waiting = True
                probe.paused.set()
                try:
                    await sink.drained()
                finally:
                    probe.waiting = False

        ctx._sink = Observed()
        probe.started.set()
        if ctx.request_id.startswith("gated"):
            await probe.go.wait()
        await super().run(ctx)


MAX_PENDING = 2048
#: Zero delay, many tokens: far more text (~120k characters) than socket buffers hold.
FLOOD = {"tokens": 20_000, "token_delay_ms": 0, "plan_ms": 0, "tool_ms": 0}


@contextlib.asynccontextmanager
async def stuck_reader(gw: Gateway, backend: ProbedBackend, rid: str) -> AsyncIterator[Any]:
    """A client that sends one big zero-delay chat and then never reads: small socket
    buffers on both ends, and websockets stops reading its socket after one queued frame."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gw.port))
    sock.setblocking(False)
    ws = await connect(gw.url, sock=sock, subprotocols=[JSON_PROTO], max_queue=1)  # type: ignore[list-item]
    try:
        probe = backend.probes.setdefault(rid, _Probe())
        await ws.send(_j({"type": "chat", "request_id": rid, "message": "x", "metadata": FLOOD}))
        async with asyncio.timeout(5):
            await probe.started.wait()
        (conn,) = [c for c in gw.connections if rid in c.outbound.streams]
        server_sock = conn.channel.transport.get_extra_info("socket")
        server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        probe.go.set()
        yield ws, conn, probe
    finally:
        ws.transport.abort()


async def wait_paused_for_good(stream: Any, probe: _Probe) -> int:
    """Wait until the pipeline waits at its emit and makes no progress across loop turns."""
    async with asyncio.timeout(10):
        await probe.paused.wait()
        stable = 0
        while stable < 5:
            before = stream.emitted_chars
            for _ in range(20):
                await asyncio.sleep(0)  # event-loop turns, not time
            stable = stable + 1 if probe.waiting and stream.emitted_chars == before else 0
    return int(stream.emitted_chars)


async def test_slow_reader_memory_bounded_pipeline_paused_others_unaffected() -> None:
    backend = ProbedBackend()
    async with running_gateway(backend_impl=backend, max_pending_chars=MAX_PENDING) as gw:
        async with stuck_reader(gw, backend, "gated-slow") as (_, conn, probe):
            stream = conn.outbound.streams["gated-slow"]
            emitted = await wait_paused_for_good(stream, probe)
            bound = MAX_PENDING + probe.max_token
            assert probe.max_pending <= bound
            assert stream.pending_chars <= bound
            assert emitted < 40_000, "the pipeline should pause long before its end"

            # Another client on another connection streams normally meanwhile.
            async with WireClient.open(gw.url) as other:
                track = await other.chat("other", metadata={**FLOOD, "tokens": 3000})
                response = await other.response("other")
                assert response.status is ResponseStatus.COMPLETED
                assert "".join(c.text for c in track.chunks) == response.content
            # ...and the stuck one stayed paused all along, its memory bounded.
            assert stream.emitted_chars == emitted
            assert probe.waiting
            assert probe.max_pending <= bound
            assert stream.pending_chars <= bound
            assert len(conn.outbound._control) <= 1
            (request,) = conn.mux.requests
        # The client went away (TCP reset): its request is cancelled (G7).
        async with asyncio.timeout(5):
            await request.task
        record = await gw.registry.lookup(RequestKey("", "gated-slow"))
        assert record is not None
        assert record.reason is CancelReason.DISCONNECT
        assert record.usage.final


async def test_stuck_reader_closed_4008_and_requests_cancelled() -> None:
    backend = ProbedBackend()
    settings = {"max_pending_chars": MAX_PENDING, "slow_consumer_timeout": 0.5}
    async with running_gateway(backend_impl=backend, **settings) as gw:
        async with stuck_reader(gw, backend, "gated-stuck") as (ws, conn, probe):
            async with asyncio.timeout(5):
                await probe.paused.wait()
            (request,) = conn.mux.requests
            # Stuck beyond slow_consumer_timeout: the gateway gives up on this reader and
            # cancels its requests at once, without waiting for the reader to come back.
            async with asyncio.timeout(5):
                await request.task
            record = await gw.registry.lookup(RequestKey("", "gated-stuck"))
            assert record is not None
            assert record.status is RequestStatus.CANCELLED
            assert record.reason is CancelReason.DISCONNECT
            # The reader wakes up: it gets what was written, then the close 4008.
            with contextlib.suppress(ConnectionClosed):
                async with asyncio.timeout(10):
                    async for _ in ws:
                        pass
            assert ws.close_code == CloseCode.SLOW_CONSUMER
        async with asyncio.timeout(5):
            while gw.connections:  # noqa: ASYNC110 - housekeeping: the handler unregisters it
                await asyncio.sleep(0.01)


async def test_shutdown_is_not_held_up_by_a_stuck_reader() -> None:
    backend = ProbedBackend()
    settings = {"max_pending_chars": MAX_PENDING}  # slow_consumer_timeout: the default 30 s
    async with (
        running_gateway(backend_impl=backend, **settings) as gw,
        stuck_reader(gw, backend, "gated-shut") as (_, conn, probe),
    ):
        async with asyncio.timeout(5):
            await probe.paused.wait()
        (request,) = conn.mux.requests
        async with asyncio.timeout(5):
            await gw.shutdown(grace=0.2)
        assert request.task.done()
        assert not gw.connections
        record = await gw.registry.lookup(RequestKey("", "gated-shut"))
        assert record is not None
        assert record.reason is CancelReason.SHUTDOWN


class NeverEndingTool:
    """A backend whose non-abortable tool call never returns (a hung tool server)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()  # never set: the tool hangs

    async def run(self, ctx: RequestContext) -> None:
        async def hung() -> None:
            self.started.set()
            await self.release.wait()

        await ctx.tool_call(hung, name="hung-tool")


async def test_shutdown_waits_for_a_hung_non_abortable_step_a_bounded_time() -> None:
    """A tool call is shielded from cancellation (it finishes, then the pipeline halts), but one
    that never finishes must not hold shutdown forever: it is abandoned after the grace period,
    with a warning."""
    backend = NeverEndingTool()
    async with (
        running_gateway(backend_impl=backend) as gw,
        WireClient.open(gw.url) as client,
    ):
        client.track("hung")
        await client.send(Chat(request_id="hung", message="x"))
        async with asyncio.timeout(5):
            await backend.started.wait()
        with structlog.testing.capture_logs() as logs:
            async with asyncio.timeout(10):
                await gw.shutdown(grace=0.2)
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
            "gateway.shutdown_abandoned"
        ]
        backend.release.set()  # let the abandoned step end before the loop closes


class SlowTool:
    """A backend whose non-abortable tool call takes longer than the step allows."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.finished = asyncio.Event()

    async def run(self, ctx: RequestContext) -> None:
        async def slow() -> str:
            await self.release.wait()
            self.finished.set()  # it was not interrupted: it ran to its end
            return "late"

        await ctx.tool_call(slow, name="slow-tool", give_up_after=0.05)
        await ctx.emit("never")


async def test_a_non_abortable_step_past_its_give_up_time_fails_the_request() -> None:
    """``give_up_after`` bounds the wait for a non-abortable step: the request fails
    (backend_error naming the step) at once, the operation is not interrupted (it finishes in
    the background), and nothing of the request is left running."""
    backend = SlowTool()
    async with (
        running_gateway(backend_impl=backend) as gw,
        WireClient.open(gw.url) as client,
    ):
        client.track("slow")
        await client.send(Chat(request_id="slow", message="x"))
        response = await client.response("slow")
        assert response.status is ResponseStatus.FAILED
        assert response.error is not None
        assert response.error.code == ErrorCode.BACKEND_ERROR
        assert "slow-tool" in response.error.message
        await settled(gw)
        backend.release.set()
        async with asyncio.timeout(5):
            await backend.finished.wait()


async def test_fast_big_answer_does_not_starve_a_small_one() -> None:
    async with running_gateway() as gw, WireClient.open(gw.url) as client:
        big = await client.chat("big", metadata={**FLOOD, "tokens": 30_000})
        await client.chunks("big", 1)
        await client.chat("small", metadata=QUICK)
        small = await client.response("small")
        assert small.status is ResponseStatus.COMPLETED
        assert big.response is None, "the small request waited for the big one"
        assert len(big.chunks) > 1
        await client.cancel("big")
        assert (await client.response("big")).status is ResponseStatus.CANCELLED
        await client.final_usage("big")
    await settled(gw)


# --- 5. outbound batching ------------------------------------------------------------------------


class CountingClient(WireClient):
    """Also records every frame's size and counts messages."""

    def __init__(self, ws: ClientConnection, codec: Codec) -> None:
        super().__init__(ws, codec)
        self.sizes: list[int] = []
        self.messages = 0
        self.ws = _SizeRecorder(ws, self.sizes)  # type: ignore[assignment]  # reader not started

    def _on_message(self, m: Any) -> None:
        self.messages += 1
        super()._on_message(m)


class _SizeRecorder:
    def __init__(self, ws: ClientConnection, sizes: list[int]) -> None:
        self._ws = ws
        self._sizes = sizes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ws, name)

    async def __aiter__(self) -> AsyncIterator[str | bytes]:
        async for data in self._ws:
            self._sizes.append(len(data.encode()) if isinstance(data, str) else len(data))
            yield data


async def _many_streams(client: CountingClient, n: int, **chat: Any) -> None:
    stream = chat.get("stream", True)
    for i in range(n):
        client.track(f"s{i}", stream=stream)
    await client.send(*[Chat(request_id=f"s{i}", message=f"q{i}", **chat) for i in range(n)])
    for i in range(n):
        assert (await client.response(f"s{i}", timeout=20)).status is ResponseStatus.COMPLETED


@pytest.mark.parametrize("codec", CODECS)
async def test_outbound_frames_are_batched(codec: Codec) -> None:
    async with running_gateway() as gw, CountingClient.open(gw.url, codec) as client:
        await _many_streams(client, 40, metadata={**QUICK, "tokens": 50})
        assert client.frames == len(client.sizes)
        assert client.frames < client.messages / 2, (client.frames, client.messages)
        assert max(client.sizes) <= protocol.limits.DEFAULT_BATCH_BYTES + 1024


@pytest.mark.parametrize("codec", CODECS)
async def test_batching_off_sends_one_message_per_frame(codec: Codec) -> None:
    async with (
        running_gateway(max_batch_bytes=0) as gw,
        CountingClient.open(gw.url, codec) as client,
    ):
        await _many_streams(client, 40, metadata={**QUICK, "tokens": 50})
        await client.send(*[Ping(id=i) for i in range(10)])
        await client.wait_for(lambda: len(pong_ids(client)) == 10)
        assert client.frames == client.messages == len(client.sizes)


class BigAnswers:
    """Each request answers ``size`` characters in one emit and ends in the same loop turn, so
    the responses of chats read from one frame are all pending when the writer wakes."""

    def __init__(self, size: int) -> None:
        self.size = size

    async def run(self, ctx: RequestContext) -> None:
        await ctx.emit(ctx.request_id[-1] * self.size)


@pytest.mark.parametrize("codec", CODECS)
async def test_no_frame_exceeds_max_frame_bytes(codec: Codec) -> None:
    size = 209_700
    one = len(
        protocol.encode(
            protocol.Response(request_id="s0", status=ResponseStatus.COMPLETED, content="x" * size),
            codec,
        )
    )
    assert 4 * (one + 1) < MAX_FRAME_BYTES < 5 * one, "five responses must not fit one frame"
    settings = {"max_batch_bytes": MAX_FRAME_BYTES, "max_content_chars": 261_000}
    async with (
        running_gateway(backend_impl=BigAnswers(size), **settings) as gw,
        CountingClient.open(gw.url, codec) as client,
    ):
        await _many_streams(client, 8, stream=False)
        assert max(client.sizes) <= MAX_FRAME_BYTES
        assert max(client.sizes) > 3 * one, "pending responses are packed up to the cap"
        for i, track in enumerate(client.tracks.values()):
            assert track.response is not None
            assert track.response.content == str(i) * size


# --- 6. shutdown: a real process and real signals ------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _LogReader:
    """Collects the JSON log lines of a subprocess's stderr; lets a test wait for one."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.lines: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        self._changed = asyncio.Condition()
        self._task = asyncio.create_task(self._read(stream))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.raw.append(line)
            with contextlib.suppress(orjson.JSONDecodeError):
                self.lines.append(orjson.loads(line))
            async with self._changed:
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()

    async def event(self, name: str, within: float = 15.0) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((line for line in self.lines if line.get("event") == name), None)

        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: found() is not None or self._task.done())
        line = found()
        assert line is not None, f"no {name!r} log line; stderr: {b''.join(self.raw)!r}"
        return line


def _http_get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


async def test_sigterm_drains_cancels_closes_1001_and_exits_0() -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUXGATE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "serve",
        "--port",
        str(port),
        "--shutdown-grace",
        "1",
        cwd=REPO,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    logs = _LogReader(proc.stderr)
    try:
        started = await logs.event("gateway.started")
        url = f"ws://127.0.0.1:{port}/v1/ws"
        assert started["url"] == url
        assert started["backend"] == "simulated"
        assert "dev" in started["auth"]
        assert started["level"] == "info"
        warning = await logs.event("auth.disabled")
        assert warning["level"] == "warning"
        assert logs.lines.index(warning) < logs.lines.index(started)

        short_meta = {"tokens": 10, "token_delay_ms": 20, "plan_ms": 0, "tool_ms": 0}
        long_meta = {"tokens": 5000, "token_delay_ms": 20, "plan_ms": 0, "tool_ms": 0}
        async with WireClient.open(url) as c1, WireClient.open(url, Codec.MSGPACK) as c2:
            short = await c1.chat("short", metadata=short_meta)
            long1 = await c1.chat("long", metadata=long_meta)
            await c2.chat("long2", metadata=long_meta)
            await c1.wait_for(lambda: bool(short.chunks and long1.chunks))
            await c2.chunks("long2", 1)

            proc.send_signal(signal.SIGTERM)
            await logs.event("gateway.draining")
            # New connections are refused, the existing ones take no new chat...
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url):
                    pass
            assert refused.value.response.status_code == 503
            late = c1.track("late")
            await c1.send(Chat(request_id="late", message="x"))
            await c1.wait_for(lambda: bool(late.errors))
            assert [(e.code, e.request_id) for e in late.errors] == [
                (ErrorCode.UNAVAILABLE, "late")
            ]
            # ...HTTP keeps working during the grace period (SPEC.md §5.7, §8.3).
            status, body = await asyncio.to_thread(_http_get, port, "/healthz")
            assert (status, orjson.loads(body)) == (503, {"status": "draining"})
            status, body = await asyncio.to_thread(_http_get, port, "/v1/requests/long")
            assert status == 200
            assert orjson.loads(body)["status"] == "active"

            # The short request finishes within the grace period; the long ones are cancelled
            # with reason "shutdown" after it; then both connections close with 1001.
            assert (await c1.response("short")).status is ResponseStatus.COMPLETED
            for client, rid in ((c1, "long"), (c2, "long2")):
                response = await client.response(rid)
                assert response.status is ResponseStatus.CANCELLED
                assert response.reason is CancelReason.SHUTDOWN
                assert (await client.final_usage(rid)).output_tokens > 0
            assert short.response_at is not None
            assert long1.response_at is not None
            assert short.response_at < long1.response_at
            for client in (c1, c2):
                async with asyncio.timeout(10):
                    await client.ws.wait_closed()
                assert client.ws.close_code == CloseCode.GOING_AWAY
            assert late.response is None
        async with asyncio.timeout(15):
            assert await proc.wait() == 0
        await logs.event("gateway.stopped")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
