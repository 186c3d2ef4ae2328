"""End-to-end cancellation: G2, G4, G5, G7, deadlines and usage honesty (SPEC.md §5.3-§5.7, §6).

A real gateway on an ephemeral port, real sockets, the strict :class:`WireClient` (whose
client-side state machine fails a test on any chunk after a response, a second response, a seq
gap or content != joined chunks). Backend-side evidence comes from backends defined here:

- :class:`StepBackend` runs one step of every kind (plan, LLM call, tool call, agent call,
  abortable stream, LLM call) and records, inside each operation's own coroutine, whether the
  cancel flag was already set when its body began; any step can be held on a gate the test
  opens, so a cancel lands *during* a non-abortable operation by construction.
- :class:`RecordingSimulated` wraps the simulated backend's operations the same way (randomized
  test).
- :class:`Firehose` emits as fast as it can and says when its output backs up (slow reader).

Synchronisation is by events; the only sleeps are the random cancel moments of the randomized
test, the bounded poll for connection housekeeping, and zero/1 ms sleeps inside test backends
(a producer yielding the loop, a simulated upstream's pace), never to wait for an outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import random
import socket
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import msgpack
import pytest

import protocol
from gateway.backends.simulated import SimulatedBackend, SimulationSettings
from gateway.pipeline import PipelineHalted, RequestContext
from gateway.registry import RequestKey, RequestRecord, RequestStatus
from gateway.server import Gateway
from protocol import (
    Cancel,
    CancelReason,
    CancelResult,
    CancelStatus,
    Chat,
    Codec,
    Message,
    Ping,
    ResponseStatus,
    Usage,
    UsageReport,
)

from .conftest import native_transport, running_gateway, settled
from .wire import Track, WireClient

CODECS = [pytest.param(c, id=c.name.lower()) for c in Codec]

#: A stream long enough never to finish during a test (simulated backend metadata).
ENDLESS = {"tokens": 100_000, "token_delay_ms": 1, "plan_ms": 0, "tool_ms": 0}


# -- helpers -----------------------------------------------------------------------------------


async def http(gateway: Gateway, method: str, request_id: str) -> tuple[int, dict[str, Any]]:
    """One HTTP/1.1 call on the gateway's port over a raw socket: (status, JSON body)."""
    host, port = gateway.config.host, gateway.port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            f"{method} /v1/requests/{request_id} HTTP/1.1\r\n"
            f"Host: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        async with asyncio.timeout(10):
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            status_line, *lines = head.split("\r\n")
            fields = (line.partition(":") for line in lines)
            length = next(int(v) for k, _, v in fields if k.strip().lower() == "content-length")
            body = await reader.readexactly(length)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return int(status_line.split()[1]), json.loads(body)


def words(track: Track) -> int:
    """Tokens received: every token of the simulated backend is one word with a leading space."""
    return sum(chunk.text.count(" ") for chunk in track.chunks)


def text(track: Track) -> str:
    return "".join(chunk.text for chunk in track.chunks)


def after_response(track: Track) -> list[str]:
    """Types of the messages that came after the request's response."""
    kinds = [type(m).__name__ for m in track.log]
    return kinds[kinds.index("Response") + 1 :]


def others_results(client: WireClient, request_id: str) -> list[CancelResult]:
    """cancel_results for a request this client did not start (a cross-connection cancel)."""
    return [m for m in client.others if isinstance(m, CancelResult) and m.request_id == request_id]


def usage_tuple(usage: Usage) -> tuple[int, int]:
    return usage.input_tokens, usage.output_tokens


async def record(gateway: Gateway, request_id: str) -> RequestRecord:
    """What GET /v1/requests/{id} reports for the anonymous user, read from the registry."""
    found = await gateway.registry.lookup(RequestKey("", request_id))
    assert found is not None, f"{request_id}: no record"
    return found


async def no_connections_left(gateway: Gateway) -> None:
    """Housekeeping only: the server drops a closed connection from its set on its own time,
    and exposes no event for it; a short bounded poll is the one acceptable wait here."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(5.0):
            while gateway.connections:  # noqa: ASYNC110 - no event to await
                await asyncio.sleep(0.01)
    assert not gateway.connections, f"{len(gateway.connections)} connection(s) left behind"


# -- a scripted, gated backend (G5 with the backend's own evidence) ---------------------------

#: Token usage each step records when its operation returns (as a real LLM call reports it).
STEP_USAGE = {"plan": (10, 5), "llm": (20, 10), "tool": (0, 0), "agent": (0, 0), "final": (40, 20)}
STREAM_INPUT = 30
PIPELINE = ("plan", "llm", "tool", "agent", "stream", "final")


@dataclass
class StepRun:
    ctx: RequestContext
    #: (step, "begin" | "end", whether the cancel flag was set at that moment)
    log: list[tuple[str, str, bool]] = field(default_factory=list)
    began: dict[str, asyncio.Event] = field(
        default_factory=lambda: {step: asyncio.Event() for step in PIPELINE}
    )
    halted: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: str = ""
    #: abortable stream: tokens produced, tokens produced while the flag was set, how it ended
    stream_tokens: int = 0
    stream_tokens_after_cancel: int = 0
    stream_closed_by: str = ""

    def begun(self) -> list[str]:
        return [step for step, what, _ in self.log if what == "begin"]

    def ended(self, step: str) -> bool:
        return (step, "end") in {(s, w) for s, w, _ in self.log}

    def began_after_cancel(self) -> list[str]:
        return [step for step, what, flagged in self.log if what == "begin" and flagged]


class StepBackend:
    """plan -> llm_call -> tool_call -> agent_call -> stream_llm -> llm_call, one chunk per step.

    ``metadata["gate"]`` names a step that waits, mid-operation, until the test calls
    :meth:`release` (the stream: after its third token, as an upstream that stalls);
    ``metadata["stream_tokens"]`` is the stream's length (0: endless, one token per
    millisecond). Every operation body records whether the flag was set when it began.
    """

    def __init__(self) -> None:
        self.runs: dict[str, StepRun] = {}
        self._gates: dict[tuple[str, str], asyncio.Event] = {}
        self._created: dict[str, asyncio.Event] = {}

    async def began(self, request_id: str, step: str) -> StepRun:
        """Wait (up to 10 s) until the request's pipeline has begun ``step``'s operation."""
        async with asyncio.timeout(10.0):
            await self._created.setdefault(request_id, asyncio.Event()).wait()
            run = self.runs[request_id]
            await run.began[step].wait()
        return run

    def gate(self, request_id: str, step: str) -> asyncio.Event:
        return self._gates.setdefault((request_id, step), asyncio.Event())

    def release(self, request_id: str, step: str) -> None:
        self.gate(request_id, step).set()

    def release_all(self) -> None:
        for event in self._gates.values():
            event.set()

    async def run(self, ctx: RequestContext) -> None:
        run = self.runs[ctx.request_id] = StepRun(ctx)
        self._created.setdefault(ctx.request_id, asyncio.Event()).set()
        gated = ctx.metadata.get("gate")
        ctx.usage.expect(1000)

        def operation(step: str) -> Any:
            async def body() -> str:
                run.log.append((step, "begin", ctx.token.cancelled))
                run.began[step].set()
                if step == gated:
                    await self.gate(ctx.request_id, step).wait()
                input_tokens, output_tokens = STEP_USAGE[step]
                ctx.usage.add(input_tokens=input_tokens, output_tokens=output_tokens)
                run.log.append((step, "end", ctx.token.cancelled))
                return f" {step}"

            return body

        async def tokens() -> AsyncIterator[str]:
            run.log.append(("stream", "begin", ctx.token.cancelled))
            run.began["stream"].set()
            limit = ctx.metadata.get("stream_tokens", 3) or None
            try:
                index = 0
                while limit is None or index < limit:
                    await asyncio.sleep(0.001 if limit is None else 0)
                    if gated == "stream" and index == 3:
                        await self.gate(ctx.request_id, "stream").wait()
                    if ctx.token.cancelled:
                        run.stream_tokens_after_cancel += 1
                    run.stream_tokens += 1
                    yield f" t{index}"
                    index += 1
                run.log.append(("stream", "end", ctx.token.cancelled))
            except BaseException as exc:
                run.stream_closed_by = type(exc).__name__
                raise
            else:
                run.stream_closed_by = "exhausted"

        try:
            await ctx.emit(await ctx.plan(operation("plan")))
            await ctx.emit(await ctx.llm_call(operation("llm")))
            await ctx.emit(await ctx.tool_call(operation("tool")))
            await ctx.emit(await ctx.agent_call(operation("agent")))
            await ctx.stream_llm(tokens(), input_tokens=STREAM_INPUT, name="stream")
            await ctx.emit(await ctx.llm_call(operation("final"), name="final"))
            run.outcome = "returned"
        except BaseException as exc:
            run.outcome = type(exc).__name__
            raise
        finally:
            run.halted.set()


@contextlib.asynccontextmanager
async def step_gateway(**settings: Any) -> AsyncIterator[tuple[Gateway, StepBackend]]:
    backend = StepBackend()
    async with running_gateway(backend_impl=backend, **settings) as gw:
        try:
            yield gw, backend
        finally:
            backend.release_all()  # never leave a pipeline parked on a gate


# -- G2: the wire stops at once ----------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
async def test_no_chunk_after_cancel_and_response_comes_first(
    gateway: Gateway, codec: Codec
) -> None:
    async with WireClient.open(gateway.url, codec) as client:
        track = await client.chat("r1", metadata=ENDLESS)
        await client.chunks("r1", 5)
        await client.cancel("r1")
        response = await client.response("r1")
        assert response.status is ResponseStatus.CANCELLED
        assert response.reason is CancelReason.CLIENT
        assert response.content == ""
        assert (await client.cancel_result("r1")).status is CancelStatus.CANCELLED
        usage = await client.final_usage("r1")
        # The cancelled response is the last message about the request except its cancel_result
        # and then its usage report (the pipeline halts after the cancel is read).
        assert after_response(track) == ["CancelResult", "UsageReport"]
        assert not response.usage.final
        assert usage.final
        # In-flight chunks (written before the gateway read the cancel) may arrive; they are
        # counted, not forbidden. The stream is endless, so the cancel certainly stopped it.
        print(f"chunks received after the cancel was sent: {track.chunks_after_cancel_sent}")
        # Drive the connection on: a later stream completes and nothing more of r1 arrives (the
        # client state machine would fail on any r1 chunk after its response).
        chunks_of_r1 = len(track.chunks)
        await client.chat("r2", metadata={"tokens": 30, "token_delay_ms": 0})
        assert (await client.response("r2")).status is ResponseStatus.COMPLETED
        assert len(track.chunks) == chunks_of_r1
        assert after_response(track) == ["CancelResult", "UsageReport"]
    await settled(gateway)


class Firehose:
    """Emits ``pieces`` pieces of text back to back; ``backlog`` is set once the gateway holds
    more than ``max_pending`` characters of this request unsent (its writer is stuck)."""

    def __init__(self, max_pending: int, piece: str = "x" * 100, pieces: int = 2000) -> None:
        self.max_pending = max_pending
        self.piece = piece
        self.pieces = pieces
        self.backlog = asyncio.Event()
        #: characters the gateway accepted from this pipeline (emit returned)
        self.emitted = 0
        self.halted = asyncio.Event()
        self.outcome = ""

    async def run(self, ctx: RequestContext) -> None:
        sink: Any = ctx._sink  # gray box: the stream behind emit
        try:
            for _ in range(self.pieces):
                if sink.pending_chars + len(self.piece) > self.max_pending:
                    self.backlog.set()  # this emit waits until the reader catches up
                await ctx.emit(self.piece)
                self.emitted += len(self.piece)
                await asyncio.sleep(0)  # the writer gets its turn after every piece
            self.outcome = "returned"
        except BaseException as exc:
            self.outcome = type(exc).__name__
            raise
        finally:
            self.halted.set()


@contextlib.asynccontextmanager
async def slow_reader(gw: Gateway, codec: Codec) -> AsyncIterator[WireClient]:
    """A connected client on a slow network: small socket buffers on both ends (without them
    loopback absorbs megabytes and the gateway's writer never blocks). The test stops reading
    with ``client.ws.transport.pause_reading()``: the gateway's writer then blocks."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (gw.config.host, gw.port))
    async with WireClient.open(gw.url, codec, sock=sock) as client:
        await client.send(Ping(id=1))
        await client.wait_for(lambda: bool(client.others))  # the pong: connection is up
        (conn,) = gw.connections
        server_sock = conn.channel.transport.get_extra_info("socket")
        server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        yield client


@native_transport  # slow_reader(): the server socket's send buffer
@pytest.mark.parametrize("codec", CODECS)
async def test_slow_reader_pending_chunks_are_dropped_not_sent(codec: Codec) -> None:
    """G2 with a reader that stopped reading: text queued in the gateway when the cancel is read
    is dropped. The pipeline produces as fast as it can; the client pauses reading its socket,
    so the gateway's writer blocks and its per-request queue fills past ``max_pending_chars``."""
    max_pending = 2_000
    backend = Firehose(max_pending)
    async with running_gateway(backend_impl=backend, max_pending_chars=max_pending) as gw:
        async with slow_reader(gw, codec) as client:
            client.ws.transport.pause_reading()  # the slow reader
            track = await client.chat("r1")
            async with asyncio.timeout(10):
                await backend.backlog.wait()
            emitted_before_cancel = backend.emitted
            await client.cancel("r1")
            # The cancel is read even though the client reads nothing: the pipeline halts.
            async with asyncio.timeout(10):
                await backend.halted.wait()
            client.ws.transport.resume_reading()
            response = await client.response("r1")
            assert response.status is ResponseStatus.CANCELLED
            assert (await client.cancel_result("r1")).status is CancelStatus.CANCELLED
            await client.final_usage("r1")
            received = len(text(track))
            # Everything received was written before the cancel was read (the machine refuses
            # any chunk after the response); what was still queued was dropped, not flushed.
            assert track.chunks_after_cancel_sent == len(track.chunks)
            assert received < backend.emitted, (received, backend.emitted)
            assert backend.emitted - received > max_pending, (
                f"at least the backed-up queue (> {max_pending} chars) must have been dropped: "
                f"received {received} of {backend.emitted} emitted "
                f"({emitted_before_cancel} before the cancel was sent)"
            )
            assert after_response(track) == ["CancelResult", "UsageReport"]
            # The producer, parked by backpressure, was woken by the cancel and halted at its
            # next emit (a checkpoint) instead of running on with its output dropped.
            assert backend.outcome == "PipelineHalted"
            assert backend.emitted < backend.pieces * len(backend.piece)
        await settled(gw)


@native_transport  # slow_reader(): the server socket's send buffer
@pytest.mark.parametrize("codec", CODECS)
async def test_cancel_while_completed_response_is_queued(codec: Codec) -> None:
    """The race is decided by what the gateway committed, not by what it wrote: the pipeline
    completed and its response is queued behind unsent text (the reader is slow) when the
    cancel is read. Result: already_completed, sent *after* the completed response (SPEC.md
    §5.3), and the completed content is the whole text, nothing dropped."""
    pieces, piece = 1_000, "y" * 100  # 100 000 characters: far more than the socket buffers
    backend = Firehose(max_pending=10**6, piece=piece, pieces=pieces)  # never backs off
    async with running_gateway(backend_impl=backend, max_pending_chars=200_000) as gw:
        async with slow_reader(gw, codec) as client:
            client.ws.transport.pause_reading()
            track = await client.chat("r1")
            async with asyncio.timeout(10):
                await backend.halted.wait()  # the pipeline ran to its end: the response is decided
            assert backend.outcome == "returned"
            (conn,) = gw.connections
            assert conn.outbound.streams["r1"].finishing  # precondition: response not written yet
            await client.cancel("r1")
            assert await http(gw, "DELETE", "r1") == (
                409,
                {"request_id": "r1", "status": "already_completed"},
            )
            client.ws.transport.resume_reading()
            response = await client.response("r1")
            assert response.status is ResponseStatus.COMPLETED
            assert (await client.cancel_result("r1")).status is CancelStatus.ALREADY_COMPLETED
            assert response.content == text(track) == piece * pieces
            assert after_response(track) == ["CancelResult"]
        await settled(gw)


@native_transport  # slow_reader(): the server socket's send buffer
async def test_get_while_completed_response_is_queued_says_completed() -> None:
    """One state machine answers both: while the completed response waits behind unsent text,
    GET already says ``completed`` (the machine is decided), exactly as a cancel then answers
    ``already_completed``; the record keeps that state once the request is finished."""
    pieces, piece = 1_000, "y" * 100
    backend = Firehose(max_pending=10**6, piece=piece, pieces=pieces)
    async with running_gateway(backend_impl=backend, max_pending_chars=200_000) as gw:
        async with slow_reader(gw, Codec.JSON) as client:
            client.ws.transport.pause_reading()
            await client.chat("r1")
            async with asyncio.timeout(10):
                await backend.halted.wait()
            (conn,) = gw.connections
            assert conn.outbound.streams["r1"].finishing  # precondition: response not written
            status, body = await http(gw, "GET", "r1")
            assert (status, body["status"], body["usage"]["final"]) == (200, "completed", True)
            assert "reason" not in body
            rec = await record(gw, "r1")
            assert (rec.status, rec.cancel_outcome) == (
                RequestStatus.COMPLETED,
                CancelStatus.ALREADY_COMPLETED,
            )
            client.ws.transport.resume_reading()
            assert (await client.response("r1")).status is ResponseStatus.COMPLETED
        await settled(gw)
        rec = await record(gw, "r1")
        assert (rec.status, rec.cancel_outcome) == (
            RequestStatus.COMPLETED,
            CancelStatus.ALREADY_COMPLETED,
        )


# -- G4: idempotent, race-safe cancel ----------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
async def test_cancel_is_idempotent(gateway: Gateway, codec: Codec) -> None:
    async with WireClient.open(gateway.url, codec) as client:
        track = await client.chat("r1", metadata=ENDLESS)
        await client.chunks("r1", 2)
        # Two cancels in one frame, then one more, then the HTTP cancel.
        track.machine.on_cancel()
        track.machine.on_cancel()
        track.cancel_sent_at = time.monotonic()
        await client.send(Cancel(request_id="r1"), Cancel(request_id="r1"))
        await client.wait_for(lambda: len(track.cancel_results) == 2)
        await client.cancel("r1")
        await client.wait_for(lambda: len(track.cancel_results) == 3)
        assert [r.status for r in track.cancel_results] == [
            CancelStatus.CANCELLED,
            CancelStatus.ALREADY_CANCELLED,
            CancelStatus.ALREADY_CANCELLED,
        ]
        assert (await client.response("r1")).reason is CancelReason.CLIENT
        assert await http(gateway, "DELETE", "r1") == (
            200,
            {"request_id": "r1", "status": "already_cancelled"},
        )
        await client.final_usage("r1")
        kinds = after_response(track)
        assert kinds.count("CancelResult") == 3
        assert kinds.count("UsageReport") == 1
        assert kinds[:2] == ["CancelResult", "CancelResult"]  # both answers follow the response
        # The first effective cancel fixed the reason; later ones changed nothing.
        assert (await record(gateway, "r1")).reason is CancelReason.CLIENT
    await settled(gateway)


@pytest.mark.parametrize("codec", CODECS)
async def test_cancel_after_completion_is_already_completed(gateway: Gateway, codec: Codec) -> None:
    async with WireClient.open(gateway.url, codec) as client:
        track = await client.chat("r1", metadata={"tokens": 10, "token_delay_ms": 0})
        response = await client.response("r1")
        assert response.status is ResponseStatus.COMPLETED
        await client.cancel("r1")
        assert (await client.cancel_result("r1")).status is CancelStatus.ALREADY_COMPLETED
        assert await http(gateway, "DELETE", "r1") == (
            409,
            {"request_id": "r1", "status": "already_completed"},
        )
        assert after_response(track) == ["CancelResult"]
        assert response.content == text(track) != ""
    rec = await record(gateway, "r1")
    assert rec.status is RequestStatus.COMPLETED
    assert rec.reason is None
    await settled(gateway)


@pytest.mark.parametrize("codec", CODECS)
async def test_cancel_racing_completion(gateway: Gateway, codec: Codec) -> None:
    """Cancel when (nearly) the last token arrives, many times: whichever wins, exactly one
    response and a consistent result (cancelled <=> response cancelled, already_completed <=>
    response completed)."""
    rng = random.Random(20260603)
    outcomes: Counter[tuple[str, str]] = Counter()
    async with WireClient.open(gateway.url, codec) as client:

        async def one(i: int) -> None:
            rid = f"race-{i}"
            tokens = rng.randint(2, 40)
            lead = rng.choice([0, 0, 1, 2])
            meta = {"tokens": tokens, "token_delay_ms": rng.choice([0, 1]), "plan_ms": 0}
            track = await client.chat(rid, metadata={**meta, "tool_ms": 0})
            await client.wait_for(
                lambda: words(track) >= tokens - lead or track.response is not None
            )
            await client.cancel(rid)
            response = await client.response(rid)
            result = await client.cancel_result(rid)
            outcomes[response.status.value, result.status.value] += 1
            context = f"{rid}: tokens={tokens} lead={lead} {response.status} {result.status}"
            if response.status is ResponseStatus.COMPLETED:
                assert result.status is CancelStatus.ALREADY_COMPLETED, context
                assert response.content == text(track), context
                assert after_response(track) == ["CancelResult"], context
            else:
                assert response.status is ResponseStatus.CANCELLED, context
                assert result.status is CancelStatus.CANCELLED, context
                assert response.reason is CancelReason.CLIENT, context
                await client.final_usage(rid)
                assert after_response(track) == ["CancelResult", "UsageReport"], context
            assert len(track.cancel_results) == 1, context

        await asyncio.gather(*(one(i) for i in range(40)))
    assert sum(outcomes.values()) == 40
    # Both consistent outcomes, and both really happen (about a quarter go to the cancel).
    assert set(outcomes) == {("completed", "already_completed"), ("cancelled", "cancelled")}, (
        outcomes
    )
    print(f"race outcomes ({codec.name}): {dict(outcomes)}")
    await settled(gateway)


async def test_cancel_unknown_or_refused_id_is_not_found(gateway: Gateway) -> None:
    async with WireClient.open(gateway.url, Codec.JSON) as client:
        await client.cancel("never-chatted")
        await client.wait_for(lambda: bool(others_results(client, "never-chatted")))
        assert others_results(client, "never-chatted")[0].status is CancelStatus.NOT_FOUND
        # A refused chat creates no request.
        await client.send_raw('{"type":"chat","request_id":"refused","message":"x","timeout_ms":0}')
        await client.cancel("refused")
        await client.wait_for(lambda: bool(others_results(client, "refused")))
        assert others_results(client, "refused")[0].status is CancelStatus.NOT_FOUND
        assert [(e.code, e.request_id) for e in client.errors] == [("invalid_field", "refused")]
    assert await http(gateway, "DELETE", "never-chatted") == (
        404,
        {"request_id": "never-chatted", "status": "not_found"},
    )
    assert (await http(gateway, "DELETE", "refused"))[0] == 404


@pytest.mark.parametrize("codec", CODECS)
async def test_cancel_of_failed_request_is_already_completed(
    gateway: Gateway, codec: Codec
) -> None:
    async with WireClient.open(gateway.url, codec) as client:
        track = await client.chat("r1", metadata={"tokens": 20, "fail_at_token": 3})
        response = await client.response("r1")
        assert response.status is ResponseStatus.FAILED
        assert response.error is not None
        assert response.error.code == "backend_error"
        await client.cancel("r1")
        assert (await client.cancel_result("r1")).status is CancelStatus.ALREADY_COMPLETED
        assert after_response(track) == ["CancelResult"]
    assert await http(gateway, "DELETE", "r1") == (
        409,
        {"request_id": "r1", "status": "already_completed"},
    )
    await settled(gateway)


@pytest.mark.parametrize("codec", CODECS)
async def test_cancel_from_a_second_connection(gateway: Gateway, codec: Codec) -> None:
    """Requests are keyed by (user, id), not connection: the response goes to the connection
    that runs the request, the cancel_result to the one that cancelled."""
    other = Codec.MSGPACK if codec is Codec.JSON else Codec.JSON
    async with (
        WireClient.open(gateway.url, codec) as owner,
        WireClient.open(gateway.url, other) as canceller,
    ):
        track = await owner.chat("shared-1", metadata=ENDLESS)
        await owner.chunks("shared-1", 2)
        await canceller.cancel("shared-1")
        response = await owner.response("shared-1")
        assert response.status is ResponseStatus.CANCELLED
        assert response.reason is CancelReason.CLIENT
        await canceller.wait_for(lambda: bool(others_results(canceller, "shared-1")))
        assert [r.status for r in others_results(canceller, "shared-1")] == [CancelStatus.CANCELLED]
        assert not track.cancel_results  # nothing about the cancel on the owner's connection
        assert canceller.tracks == {}
        assert not canceller.errors
        # The owner's own cancel now finds it cancelled.
        await owner.cancel("shared-1")
        assert (await owner.cancel_result("shared-1")).status is CancelStatus.ALREADY_CANCELLED
        await owner.final_usage("shared-1")
        assert after_response(track) in (
            ["UsageReport", "CancelResult"],
            ["CancelResult", "UsageReport"],
        )
    await settled(gateway)


@pytest.mark.parametrize("codec", CODECS)
async def test_http_delete_mid_stream(gateway: Gateway, codec: Codec) -> None:
    async with WireClient.open(gateway.url, codec) as client:
        track = await client.chat("r1", metadata=ENDLESS)
        await client.chunks("r1", 3)
        assert await http(gateway, "DELETE", "r1") == (
            200,
            {"request_id": "r1", "status": "cancelled"},
        )
        response = await client.response("r1")
        assert response.status is ResponseStatus.CANCELLED
        assert response.reason is CancelReason.API
        assert response.content == ""
        usage = await client.final_usage("r1")
        assert after_response(track) == ["UsageReport"]  # no cancel_result: HTTP answered
        assert await http(gateway, "DELETE", "r1") == (
            200,
            {"request_id": "r1", "status": "already_cancelled"},
        )
        await client.cancel("r1")
        assert (await client.cancel_result("r1")).status is CancelStatus.ALREADY_CANCELLED
    await settled(gateway)
    status, body = await http(gateway, "GET", "r1")
    assert status == 200
    assert body["status"] == "cancelled"
    assert body["reason"] == "api"
    assert body["usage"] == {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "saved_tokens": usage.saved_tokens,
        "final": True,
        "estimated": list(usage.estimated or ()),
    }


async def test_forgotten_request_is_not_found() -> None:
    """Retention by count: beyond it, a finished request is forgotten and answers not_found."""
    async with (
        running_gateway(retention_count=2) as gw,
        WireClient.open(gw.url, Codec.JSON) as client,
    ):
        for i in range(3):
            await client.chat(f"r{i}", metadata={"tokens": 3, "token_delay_ms": 0})
            await client.response(f"r{i}")
        await settled(gw)
        assert len(gw.registry) <= 2
        await client.cancel("r0")
        assert (await client.cancel_result("r0")).status is CancelStatus.NOT_FOUND
        await client.cancel("r2")
        assert (await client.cancel_result("r2")).status is CancelStatus.ALREADY_COMPLETED


@pytest.mark.parametrize("codec", CODECS)
async def test_chat_and_cancel_in_one_frame(codec: Codec) -> None:
    """The cancel is read before the pipeline task even ran: it halts at its first checkpoint,
    no operation starts, and the usage is honestly zero."""
    async with step_gateway() as (gw, backend), WireClient.open(gw.url, codec) as client:
        track = client.track("r1")
        track.machine.on_cancel()
        track.cancel_sent_at = time.monotonic()
        await client.send(Chat(request_id="r1", message="hi"), Cancel(request_id="r1"))
        response = await client.response("r1")
        assert response.status is ResponseStatus.CANCELLED
        assert (await client.cancel_result("r1")).status is CancelStatus.CANCELLED
        usage = await client.final_usage("r1")
        assert usage_tuple(usage) == (0, 0)
        assert not track.chunks
        await settled(gw)
        run = backend.runs.get("r1")
        assert run is None or run.begun() == []


@pytest.mark.parametrize("codec", CODECS)
async def test_cancel_non_streaming_request(gateway: Gateway, codec: Codec) -> None:
    """stream: false keeps the text in the gateway until the end; a cancel drops all of it."""
    async with WireClient.open(gateway.url, codec) as client:
        track = await client.chat("r1", metadata=ENDLESS, stream=False)
        await client.chat("probe", metadata={"tokens": 40, "token_delay_ms": 1})
        await client.chunks("probe", 5)  # r1 has been producing for as long
        await client.cancel("r1")
        response = await client.response("r1")
        assert response.status is ResponseStatus.CANCELLED
        assert response.content == ""
        assert not track.chunks
        usage = await client.final_usage("r1")
        assert usage.output_tokens > 0  # it did produce text, which the client never saw
        assert (await client.response("probe")).status is ResponseStatus.COMPLETED
    await settled(gateway)


async def test_cancel_is_never_rate_limited() -> None:
    """SPEC.md §7.1: past the rate, other messages are refused, a cancel is still answered."""
    async with (
        running_gateway(rate_limit=0.01, rate_burst=5) as gw,
        WireClient.open(gw.url, Codec.JSON) as client,
    ):
        await client.chat("r1", metadata=ENDLESS)  # 1 of the burst of 5
        await client.send(*(Ping(id=i) for i in range(5)))  # 4 answered, the 5th refused
        await client.wait_for(lambda: any(e.code == "rate_limited" for e in client.errors))
        await client.cancel("r1")
        assert (await client.cancel_result("r1")).status is CancelStatus.CANCELLED
        assert (await client.response("r1")).reason is CancelReason.CLIENT
        await client.final_usage("r1")
        await settled(gw)


class HaltsOnItsOwn:
    """A backend that raises PipelineHalted although nobody cancelled (a misuse, or a bug in a
    backend's own cancel handling): the request must still get its one response (G1)."""

    async def run(self, ctx: RequestContext) -> None:
        await ctx.emit(" partial")
        raise PipelineHalted(CancelReason.CLIENT, "backend")


class RaisesCancelledError:
    """A backend that lets a CancelledError of its own escape (e.g. from an inner task it
    cancelled): its failure, not a cancel of the request (not recorded as "shutdown")."""

    async def run(self, ctx: RequestContext) -> None:
        ctx._sink.push("partial")  # gray box: text pushed, no checkpoint
        raise asyncio.CancelledError()


@pytest.mark.parametrize(
    "backend", [HaltsOnItsOwn, RaisesCancelledError], ids=["halted", "cancelled-error"]
)
async def test_a_backend_ending_itself_without_a_cancel_fails_the_request(
    backend: type[HaltsOnItsOwn | RaisesCancelledError],
) -> None:
    async with (
        running_gateway(backend_impl=backend()) as gw,
        WireClient.open(gw.url, Codec.JSON) as client,
    ):
        await client.chat("r1")
        response = await client.response("r1", timeout=5)
        assert response.status is ResponseStatus.FAILED
        assert response.error is not None
        assert response.error.code == "backend_error"
        await settled(gw)
        found = await record(gw, "r1")
        assert (found.status, found.reason) == (RequestStatus.FAILED, None)
        assert not gw.registry.active()


# -- G5: the backend halts at its next checkpoint ----------------------------------------------


@pytest.mark.parametrize("step", ["plan", "llm", "tool", "agent"])
async def test_cancel_during_non_abortable_step(step: str) -> None:
    """The operation in progress is never interrupted: it runs to its end, then the pipeline
    halts at the checkpoint after it and starts nothing more. The wire does not wait for it."""
    async with (
        step_gateway() as (gw, backend),
        WireClient.open(gw.url, Codec.JSON) as client,
    ):
        await client.chat("r1", metadata={"gate": step})
        run = await backend.began("r1", step)
        await client.cancel("r1")
        response = await client.response("r1")
        # The cancelled response went out while the operation is still held on its gate.
        assert response.status is ResponseStatus.CANCELLED
        assert not run.ended(step)
        assert not run.halted.is_set()
        assert run.ctx.cancelled
        backend.release("r1", step)
        usage = await client.final_usage("r1")
        async with asyncio.timeout(10):
            await run.halted.wait()
        assert run.ended(step), "the non-abortable operation was interrupted"
        assert run.outcome == "PipelineHalted"
        index = PIPELINE.index(step)
        assert run.begun() == list(PIPELINE[: index + 1]), "a step started after the cancel"
        assert run.began_after_cancel() == []
        assert len(run.ctx.steps) == index + 1
        # Honest usage: everything the finished operations consumed, including this one.
        expected = [STEP_USAGE[s] for s in PIPELINE[: index + 1]]
        assert usage_tuple(usage) == (sum(i for i, _ in expected), sum(o for _, o in expected))
        await settled(gw)


@pytest.mark.parametrize("upstream", ["flowing", "stalled"])
async def test_cancel_during_abortable_stream(upstream: str) -> None:
    """An abortable stream stops at once: at most one token after the flag, the upstream is
    closed (its ``finally`` runs), and the next LLM call never starts. A stalled upstream is
    aborted while it waits for its next token: the pipeline halts without it."""
    metadata: dict[str, Any] = {"stream_tokens": 0}
    if upstream == "stalled":
        metadata["gate"] = "stream"
    async with (
        step_gateway() as (gw, backend),
        WireClient.open(gw.url, Codec.MSGPACK) as client,
    ):
        track = await client.chat("r1", metadata=metadata)
        await client.wait_for(lambda: any("t2" in c.text for c in track.chunks))
        await client.cancel("r1")
        response = await client.response("r1")
        assert response.status is ResponseStatus.CANCELLED
        usage = await client.final_usage("r1")  # sent once the pipeline halted
        run = backend.runs["r1"]
        async with asyncio.timeout(10):
            await run.halted.wait()  # the stalled upstream's gate is never opened
        assert run.stream_closed_by in ("CancelledError", "GeneratorExit"), run.stream_closed_by
        assert run.stream_tokens_after_cancel <= 1
        assert run.ctx.tokens_after_cancel <= 1
        if upstream == "stalled":
            assert run.stream_tokens == 3
            assert run.stream_closed_by == "CancelledError"  # aborted inside its wait
        assert "final" not in run.begun()
        assert not run.ended("stream")
        assert run.began_after_cancel() == []
        # Every token read is counted, including one read after the flag (if any); the
        # client saw the four steps' words and some of the tokens.
        assert usage_tuple(usage) == (10 + 20 + STREAM_INPUT, 5 + 10 + run.stream_tokens)
        assert words(track) - 4 <= run.stream_tokens
    await settled(gw)


# -- G7: closing the connection cancels its requests -------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
async def test_disconnect_cancels_and_halts(codec: Codec) -> None:
    async with step_gateway() as (gw, backend):
        async with WireClient.open(gw.url, codec) as client:
            await client.chat("in-tool", metadata={"gate": "tool"})
            streaming = await client.chat(
                "in-stream", metadata={"gate": "stream", "stream_tokens": 0}
            )
            await client.wait_for(lambda: any("t2" in c.text for c in streaming.chunks))
            tool_run = await backend.began("in-tool", "tool")
        # The client is gone: the abortable stream halts on its own...
        stream_run = backend.runs["in-stream"]
        async with asyncio.timeout(10):
            await stream_run.halted.wait()
        rec = await record(gw, "in-stream")
        assert (rec.status, rec.reason) == (RequestStatus.CANCELLED, CancelReason.DISCONNECT)
        assert rec.usage.final
        assert rec.usage.output_tokens > 0
        assert stream_run.stream_tokens_after_cancel <= 1
        # ...while the tool call runs to its end: cancelling (flagged, not halted) until then.
        rec = await record(gw, "in-tool")
        assert (rec.status, rec.reason) == (RequestStatus.CANCELLING, CancelReason.DISCONNECT)
        assert not rec.usage.final
        assert tool_run.ctx.cancelled
        assert not tool_run.halted.is_set()
        backend.release("in-tool", "tool")
        async with asyncio.timeout(10):
            await tool_run.halted.wait()
        await settled(gw)
        assert not gw.tasks
        rec = await record(gw, "in-tool")
        assert (rec.status, rec.reason) == (RequestStatus.CANCELLED, CancelReason.DISCONNECT)
        assert rec.usage.final
        assert usage_tuple(rec.usage) == (30, 15)
        for run in (tool_run, stream_run):
            assert run.began_after_cancel() == []
            assert "final" not in run.begun()
        assert tool_run.ended("tool")
        assert "agent" not in tool_run.begun()
        assert not gw.registry.active()
        await no_connections_left(gw)


# -- deadlines ---------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
async def test_deadline_cancels_with_reason_timeout(gateway: Gateway, codec: Codec) -> None:
    async with WireClient.open(gateway.url, codec) as client:
        track = await client.chat("r1", metadata=ENDLESS, timeout_ms=80)
        response = await client.response("r1")
        assert response.status is ResponseStatus.CANCELLED
        assert response.reason is CancelReason.TIMEOUT
        assert response.content == ""
        usage = await client.final_usage("r1")
        assert after_response(track) == ["UsageReport"]
        assert usage.final
        assert usage.input_tokens >= response.usage.input_tokens
        await client.cancel("r1")
        assert (await client.cancel_result("r1")).status is CancelStatus.ALREADY_CANCELLED
    await settled(gateway)
    rec = await record(gateway, "r1")
    assert (rec.status, rec.reason) == (RequestStatus.CANCELLED, CancelReason.TIMEOUT)


async def test_timeout_above_server_max_is_capped_not_refused() -> None:
    async with (
        running_gateway(max_timeout_ms=150) as gw,
        WireClient.open(gw.url, Codec.MSGPACK) as client,
    ):
        started = time.monotonic()
        await client.chat("long", metadata=ENDLESS, timeout_ms=3_600_000)
        await client.chat("default", metadata=ENDLESS)  # no timeout_ms: the server maximum
        for rid in ("long", "default"):
            response = await client.response(rid)
            assert response.status is ResponseStatus.CANCELLED, rid
            assert response.reason is CancelReason.TIMEOUT, rid
            track = client.tracks[rid]
            assert track.response_at is not None
            assert 0.1 <= track.response_at - started < 5.0, rid
            assert not track.errors, rid
            await client.final_usage(rid)
        assert client.welcome is not None
        assert client.welcome.limits.max_timeout_ms == 150
        assert not client.errors
        await settled(gw)


async def test_deadline_during_non_abortable_step() -> None:
    async with (
        step_gateway() as (gw, backend),
        WireClient.open(gw.url, Codec.JSON) as client,
    ):
        await client.chat("r1", metadata={"gate": "tool"}, timeout_ms=200)
        run = await backend.began("r1", "tool")
        response = await client.response("r1")
        assert response.reason is CancelReason.TIMEOUT
        assert not run.ended("tool")
        backend.release("r1", "tool")
        await client.final_usage("r1")
        assert run.ended("tool")
        assert run.begun() == ["plan", "llm", "tool"]
        assert run.began_after_cancel() == []
        await settled(gw)


# -- G8: usage of a cancelled request is honest ------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
async def test_cancelled_usage_is_final_and_not_less(gateway: Gateway, codec: Codec) -> None:
    async with WireClient.open(gateway.url, codec) as client:
        track = await client.chat("r1", metadata=ENDLESS)
        await client.chunks("r1", 5)
        await client.cancel("r1")
        response = await client.response("r1")
        final = await client.final_usage("r1")
        assert isinstance(track.usage_report, UsageReport)
        assert not response.usage.final
        assert final.final
        assert final.input_tokens >= response.usage.input_tokens > 0
        assert final.output_tokens >= response.usage.output_tokens > 0
        # Every token the client saw was produced (and counted); none is hidden.
        assert final.output_tokens >= words(track)
        assert final.saved_tokens > 0
    await settled(gateway)
    rec = await record(gateway, "r1")
    assert rec.usage == final


async def test_usage_includes_llm_call_finished_after_cancel() -> None:
    """The cancel lands during an LLM call whose tokens are recorded when it returns: the
    response reports what was known then, the final figures (usage message and GET) include
    the call."""
    async with (
        step_gateway() as (gw, backend),
        WireClient.open(gw.url, Codec.JSON) as client,
    ):
        track = await client.chat("r1", metadata={"gate": "llm"})
        await backend.began("r1", "llm")
        await client.wait_for(lambda: bool(track.chunks))  # the plan's chunk
        await client.cancel("r1")
        response = await client.response("r1")
        assert usage_tuple(response.usage) == STEP_USAGE["plan"]
        assert not response.usage.final
        rec = await record(gw, "r1")
        assert rec.status is RequestStatus.CANCELLING
        assert not rec.usage.final
        backend.release("r1", "llm")
        final = await client.final_usage("r1")
        both = (STEP_USAGE["plan"][0] + STEP_USAGE["llm"][0], 15)
        assert usage_tuple(final) == both
        assert final.saved_tokens == 1000 - sum(both)
        await settled(gw)
        rec = await record(gw, "r1")
        assert rec.status is RequestStatus.CANCELLED
        assert rec.usage == final


# -- randomized: many streams, cancels at random moments ---------------------------------------

_current_run: contextvars.ContextVar[SimRun] = contextvars.ContextVar("current_run")


@dataclass
class SimRun:
    ctx: RequestContext
    #: (operation, whether the cancel flag was already set when its body began)
    ops: list[tuple[str, bool]] = field(default_factory=list)
    tokens_after_cancel: int = 0
    outcome: str = ""


class RecordingSimulated(SimulatedBackend):
    """The simulated backend, with each operation recording the flag when its body begins."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.runs: dict[str, SimRun] = {}

    async def run(self, ctx: RequestContext) -> None:
        run = self.runs[ctx.request_id] = SimRun(ctx)
        _current_run.set(run)  # inherited by the step helpers' tasks
        try:
            await super().run(ctx)
            run.outcome = "returned"
        except BaseException as exc:
            run.outcome = type(exc).__name__
            raise

    @staticmethod
    def _began(operation: str) -> SimRun:
        run = _current_run.get()
        run.ops.append((operation, run.ctx.token.cancelled))
        return run

    async def simulate_plan(self, settings: SimulationSettings) -> str:
        self._began("plan")
        return await super().simulate_plan(settings)

    async def simulate_tool(self, ctx: RequestContext, settings: SimulationSettings) -> str:
        self._began("tool")
        return await super().simulate_tool(ctx, settings)

    async def simulate_agent(self, ctx: RequestContext, settings: SimulationSettings) -> str:
        self._began("agent")
        return await super().simulate_agent(ctx, settings)

    async def simulate_tokens(
        self, words: Iterator[str], settings: SimulationSettings, start: int, stop: int
    ) -> AsyncIterator[str]:
        run = self._began(f"tokens[{start}:{stop}]")
        tokens = cast(
            AsyncGenerator[str, None], super().simulate_tokens(words, settings, start, stop)
        )
        async with contextlib.aclosing(tokens) as inner:
            async for word in inner:
                if run.ctx.token.cancelled:
                    run.tokens_after_cancel += 1
                yield word


@dataclass
class Plan:
    """What the randomized test does with one request (drawn up front from the seed)."""

    rid: str
    conn: int
    mode: str
    metadata: dict[str, int]
    #: (seconds after the chat, channel) for timed cancels; channel: frame | http | cross
    cancels: list[tuple[float, str]] = field(default_factory=list)
    race_lead: int | None = None
    race_channel: str = "frame"
    #: "midway" mode: seconds to wait, once the first half of the answer arrived (the pipeline
    #: is then in its tool call, or agent call), before cancelling on ``race_channel``
    midway: float | None = None
    cross_conn: int = 0
    frames_owner: int = 0
    #: per cross-connection cancel: whether it was sent before the owner had received anything
    #: about the request (then the gateway may read it before the chat: not_found is right)
    cross_early: list[bool] = field(default_factory=list)
    #: per HTTP DELETE: (status code, body status, sent before the owner received anything)
    http_results: list[tuple[int, str, bool]] = field(default_factory=list)

    def describe(self) -> str:
        return (
            f"{self.rid} mode={self.mode} conn={self.conn} meta={self.metadata} "
            f"cancels={[(round(t, 4), c) for t, c in self.cancels]} race_lead={self.race_lead} "
            f"midway={self.midway}"
        )


MODES = ("none", "frame", "http", "repeat", "race", "cross", "late", "fail", "midway")
MODE_WEIGHTS = (14, 20, 12, 14, 14, 8, 6, 4, 10)


def draw_plans(rng: random.Random, n: int, connections: int) -> list[Plan]:
    plans = []
    for i in range(n):
        tokens = rng.randint(5, 200)
        meta = {
            "tokens": tokens,
            "token_delay_ms": rng.randint(0, 5),
            "plan_ms": rng.randint(0, 5),
            "tool_ms": rng.randint(0, 5),
            "agent_ms": rng.choice([0, 0, 0, 2]),
            "seed": rng.randrange(1 << 32),
        }
        mode = rng.choices(MODES, MODE_WEIGHTS)[0]
        if mode == "fail":
            meta["fail_at_token"] = rng.randint(0, tokens)
        elif mode == "midway":  # long enough tool and agent calls to land in
            meta["tool_ms"] = rng.randint(5, 15)
            meta["agent_ms"] = rng.choice([0, rng.randint(5, 10)])
        conn = i % connections
        plan = Plan(f"q{i}", conn, mode, meta, cross_conn=(conn + rng.randint(1, 3)) % connections)
        # A random moment within the request's expected lifetime (and a little after it).
        duration = (
            meta["plan_ms"] + meta["tool_ms"] + meta["agent_ms"] + tokens * meta["token_delay_ms"]
        ) / 1000 + 0.01
        if mode in ("frame", "http", "cross", "fail"):
            channel = "frame" if mode == "fail" else mode
            plan.cancels.append((rng.uniform(0, duration * 1.2), channel))
        elif mode == "repeat":
            first = rng.uniform(0, duration * 1.2)
            for _ in range(rng.randint(2, 3)):
                at = first + rng.choice([0.0, 0.0, rng.uniform(0, 0.01)])
                plan.cancels.append((at, rng.choice(["frame", "frame", "http", "cross"])))
        elif mode == "race":
            plan.race_lead = rng.choice([0, 0, 1, 2, 3])
            plan.race_channel = rng.choice(["frame", "frame", "http"])
        elif mode == "midway":
            plan.midway = rng.uniform(0, (meta["tool_ms"] + meta["agent_ms"]) / 1000)
            plan.race_channel = rng.choice(["frame", "frame", "http"])
        plans.append(plan)
    return plans


RANDOM_CASES = [
    pytest.param(11, {}, id="seed11"),
    pytest.param(23, {"max_pending_chars": 64}, id="seed23-backpressure"),
    pytest.param(37, {"max_batch_bytes": 0}, id="seed37-unbatched"),
]


@pytest.mark.parametrize(("seed", "settings"), RANDOM_CASES)
async def test_randomized_cancellation(seed: int, settings: dict[str, Any]) -> None:
    n, connections = 240, 4
    rng = random.Random(seed)
    plans = draw_plans(rng, n, connections)
    backend = RecordingSimulated(max_tokens=1000)
    failures: list[str] = []

    def check(ok: bool, plan: Plan, what: str) -> None:
        if not ok:
            failures.append(f"{what} [{plan.describe()}]")

    async with running_gateway(backend_impl=backend, max_streams=n, **settings) as gw:
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(
                    WireClient.open(gw.url, Codec.JSON if i % 2 == 0 else Codec.MSGPACK)
                )
                for i in range(connections)
            ]

            async def cancel(plan: Plan, channel: str) -> None:
                # Nothing orders reads across connections: a cancel from elsewhere may reach the
                # gateway before the chat does, unless the gateway has already answered the chat.
                early = not clients[plan.conn].tracks[plan.rid].log
                if channel == "http":
                    status, body = await http(gw, "DELETE", plan.rid)
                    plan.http_results.append((status, body["status"], early))
                elif channel == "cross":
                    plan.cross_early.append(early)
                    await clients[plan.cross_conn].cancel(plan.rid)
                else:
                    plan.frames_owner += 1
                    await clients[plan.conn].cancel(plan.rid)

            async def drive(plan: Plan) -> None:
                client = clients[plan.conn]
                track = await client.chat(plan.rid, "randomized load", metadata=plan.metadata)
                sent = time.monotonic()

                async def timed(at: float, channel: str) -> None:
                    # The random moment to cancel at (not a wait for an outcome).
                    await asyncio.sleep(max(0.0, sent + at - time.monotonic()))
                    await cancel(plan, channel)

                jobs = [timed(at, channel) for at, channel in plan.cancels]
                await asyncio.gather(*jobs)
                if plan.race_lead is not None:
                    target = plan.metadata["tokens"] - plan.race_lead
                    await client.wait_for(
                        lambda: words(track) >= target or track.response is not None, 20
                    )
                    await cancel(plan, plan.race_channel)
                if plan.midway is not None:
                    half = (plan.metadata["tokens"] + 1) // 2
                    await client.wait_for(
                        lambda: words(track) >= half or track.response is not None, 20
                    )
                    await asyncio.sleep(plan.midway)  # a random moment in the tool/agent calls
                    await cancel(plan, plan.race_channel)
                response = await client.response(plan.rid, 20)
                if plan.mode == "late":
                    await cancel(plan, "frame")
                if response.status is ResponseStatus.CANCELLED:
                    await client.final_usage(plan.rid, 20)
                await client.wait_for(lambda: len(track.cancel_results) == plan.frames_owner, 20)
                cross = clients[plan.cross_conn]
                await cross.wait_for(
                    lambda: len(others_results(cross, plan.rid)) == len(plan.cross_early), 20
                )

            await asyncio.gather(*(drive(plan) for plan in plans))
            await settled(gw, timeout=20)

            stats: Counter[str] = Counter()
            landed: Counter[str] = Counter()  # the last operation a cancelled pipeline began
            for plan in plans:
                track = clients[plan.conn].tracks[plan.rid]
                response = track.response
                assert response is not None
                stats[f"{response.status.value}/{response.reason or '-'}"] += 1
                # Every cancel frame got exactly one result (G4); cross-connection results come
                # in the order their cancels were sent.
                cross_results = others_results(clients[plan.cross_conn], plan.rid)
                check(len(track.cancel_results) == plan.frames_owner, plan, "owner results")
                check(len(cross_results) == len(plan.cross_early), plan, "cross results")
                results = [r.status for r in track.cancel_results]
                misses = []  # reasons of the cancels read before the chat (not_found)
                for early, result in zip(plan.cross_early, cross_results, strict=False):
                    if result.status is CancelStatus.NOT_FOUND:
                        check(early, plan, "not_found for a cancel sent after the chat was read")
                        misses.append(CancelReason.CLIENT)
                    else:
                        results.append(result.status)
                http_answers = []
                for code, status, early in plan.http_results:
                    if (code, status) == (404, "not_found"):
                        check(early, plan, "HTTP not_found after the chat was read")
                        misses.append(CancelReason.API)
                    else:
                        http_answers.append((code, status))
                http_codes = set(http_answers)
                http_statuses = [status for _, status in http_answers]
                # A cancel read before its chat leaves a tombstone (SPEC.md §5.3): the chat ends
                # cancelled at once (zero usage, final) and its pipeline never runs. That cancel
                # answered not_found, and it was the effective one.
                run = backend.runs.get(plan.rid)
                tombstoned = run is None
                if tombstoned:
                    check(bool(misses), plan, "no pipeline run, and no cancel read before the chat")
                    check(response.status is ResponseStatus.CANCELLED, plan, "tombstone ignored")
                    check(response.reason in misses, plan, f"tombstone reason {response.reason}")
                    check(response.usage.final, plan, f"tombstoned usage {response.usage}")
                # G1/G2: one response; after it only results and the usage report.
                tail = after_response(track)
                check(set(tail) <= {"CancelResult", "UsageReport"}, plan, f"after response {tail}")
                outcome_count = (
                    results.count(CancelStatus.CANCELLED)
                    + http_statuses.count("cancelled")
                    + int(tombstoned)
                )
                cancelled_by = response.reason
                if response.status is ResponseStatus.CANCELLED:
                    check(cancelled_by in (CancelReason.CLIENT, CancelReason.API), plan, "reason")
                    check(response.content == "", plan, "partial content")
                    check(outcome_count == 1, plan, f"{outcome_count} effective cancels")
                    in_band = results.count(CancelStatus.CANCELLED)
                    by_frame = cancelled_by is CancelReason.CLIENT and not tombstoned
                    check(
                        in_band == (1 if by_frame else 0),
                        plan,
                        f"in-band cancelled {in_band} with reason {cancelled_by}",
                    )
                    check(
                        set(results) <= {CancelStatus.CANCELLED, CancelStatus.ALREADY_CANCELLED},
                        plan,
                        f"results {results}",
                    )
                    check(
                        http_codes <= {(200, "cancelled"), (200, "already_cancelled")},
                        plan,
                        f"http {plan.http_results}",
                    )
                    final = track.usage_report.usage if track.usage_report else None
                    if tombstoned:  # final in the response itself: nothing ran
                        final = response.usage
                    check(final is not None, plan, "no usage report")
                    if final is not None:
                        check(
                            final.input_tokens >= response.usage.input_tokens
                            and final.output_tokens >= response.usage.output_tokens,
                            plan,
                            f"final usage {final} < response usage {response.usage}",
                        )
                        if run is not None and run.ops:  # work was done: the usage shows it
                            check(final.input_tokens > 0, plan, f"zero usage {final}")
                        check(
                            final.output_tokens >= words(track),
                            plan,
                            f"usage {final} < {words(track)} tokens received",
                        )
                else:
                    check(outcome_count == 0, plan, "a cancel won but the request completed")
                    check(
                        set(results) <= {CancelStatus.ALREADY_COMPLETED},
                        plan,
                        f"results {results}",
                    )
                    check(http_codes <= {(409, "already_completed")}, plan, "http results")
                    if response.status is ResponseStatus.COMPLETED:
                        check(response.content == text(track), plan, "content != chunks")
                        check(words(track) == plan.metadata["tokens"], plan, "short answer")
                        check(plan.mode != "fail", plan, "fail_at_token did not fail")
                    else:
                        check(plan.mode == "fail", plan, f"unexpected {response.status}")
                    final = response.usage
                    check(final.final and final.saved_tokens == 0, plan, f"usage {final}")
                if plan.mode == "none":
                    check(response.status is ResponseStatus.COMPLETED, plan, "not completed")
                if plan.mode == "late":
                    check(results[-1] is CancelStatus.ALREADY_COMPLETED, plan, "late cancel")
                # G5 from the backend's own records, and the gateway's step trace (a tombstoned
                # request has none: its pipeline never ran).
                if run is not None:
                    late = [op for op, flagged in run.ops if flagged]
                    check(not late, plan, f"operations started after the flag: {late}")
                    check(
                        run.tokens_after_cancel <= 1, plan, f"{run.tokens_after_cancel} late tokens"
                    )
                    check(run.ctx.tokens_after_cancel <= 1, plan, "ctx.tokens_after_cancel")
                    # The pipeline's own end matches the response: a cancelled one halted at a
                    # checkpoint (or failed on its own after the cancel), a completed one returned.
                    expected_outcomes = {
                        ResponseStatus.COMPLETED: {"returned"},
                        ResponseStatus.FAILED: {"BackendFailure"},
                        ResponseStatus.CANCELLED: {"PipelineHalted"}
                        | ({"BackendFailure"} if plan.mode == "fail" else set()),
                    }[response.status]
                    check(run.outcome in expected_outcomes, plan, f"pipeline ended {run.outcome}")
                    if response.status is ResponseStatus.CANCELLED and run.ops:
                        landed[run.ops[-1][0].partition("[")[0]] += 1
                # GET agrees with the wire (G8).
                rec = await gw.registry.lookup(RequestKey("", plan.rid))
                check(rec is not None, plan, "no record")
                if rec is not None and final is not None:
                    check(rec.status.value == response.status.value, plan, f"GET {rec.status}")
                    check(rec.reason == response.reason, plan, f"GET reason {rec.reason}")
                    check(rec.usage == final, plan, f"GET usage {rec.usage} != {final}")

            summary = (
                f"seed={seed} settings={settings} outcomes={dict(stats)} "
                f"cancelled after starting={dict(landed)}"
            )
            print(summary)
            assert not failures, f"{summary}: {len(failures)} failures, e.g.:\n" + "\n".join(
                failures[:10]
            )
            for outcome in ("completed/-", "cancelled/client", "cancelled/api"):
                assert stats[outcome] > 0, summary  # the mix really happened
        # Clients closed. Nothing may be left behind.
        await settled(gw)
        assert not gw.tasks, f"seed={seed}: tasks left {gw.tasks}"
        assert not gw.registry.active(), f"seed={seed}: active requests left"
        assert len(gw.registry) <= n, f"seed={seed}: {len(gw.registry)} registry entries"
        await no_connections_left(gw)


# -- cancels read in the loop turn that receives them --------------------------------------------


def _connection(gateway: Gateway) -> Any:
    (conn,) = gateway.connections
    return conn


def _frames_in_one_write(client: WireClient, *messages: Message) -> None:
    """Each message its own WebSocket frame, all in one TCP write: the gateway reads them in
    one ``data_received``, before its reader task runs."""
    ws = client.ws
    for m in messages:
        data = protocol.encode(m, client.codec)
        if client.codec is Codec.JSON:
            ws.protocol.send_text(data)
        else:
            ws.protocol.send_binary(data)
    ws.transport.write(b"".join(ws.protocol.data_to_send()))


@pytest.mark.parametrize("codec", CODECS)
async def test_a_cancel_is_answered_in_the_loop_turn_that_reads_it(
    gateway: Gateway, codec: Codec
) -> None:
    async with WireClient.open(gateway.url, codec) as client:
        track = await client.chat("r1", metadata=ENDLESS)
        await client.chunks("r1", 2)
        await client.cancel("r1")
        assert (await client.response("r1")).status is ResponseStatus.CANCELLED
        assert (await client.cancel_result("r1")).status is CancelStatus.CANCELLED
        assert after_response(track)[0] == "CancelResult"
        assert _connection(gateway).cancels_read_early == 1
    await settled(gateway)


@pytest.mark.parametrize("codec", CODECS)
async def test_a_cancel_queued_behind_its_chat_is_not_read_before_it(
    gateway: Gateway, codec: Codec
) -> None:
    """Order holds: a cancel arriving in the same read as the chat it cancels is handled right
    after it, in the same callback, and finds its request."""
    async with WireClient.open(gateway.url, codec) as client:
        for n in range(20):
            rid = f"r{n}"
            track = client.track(rid)
            track.machine.on_cancel()
            track.cancel_sent_at = time.monotonic()
            _frames_in_one_write(
                client, Chat(request_id=rid, message="hi", metadata=ENDLESS), Cancel(request_id=rid)
            )
            assert (await client.response(rid)).status is ResponseStatus.CANCELLED
            assert (await client.cancel_result(rid)).status is CancelStatus.CANCELLED
        assert _connection(gateway).cancels_read_early == 20
    await settled(gateway)


@pytest.mark.parametrize("codec", CODECS)
async def test_a_frame_of_cancels_with_a_bad_one_answers_both(
    gateway: Gateway, codec: Codec
) -> None:
    """G6 in the read callback: the good cancel is answered, the bad message gets its error."""
    async with WireClient.open(gateway.url, codec) as client:
        track = await client.chat("r1", metadata=ENDLESS)
        await client.chunks("r1", 1)
        track.machine.on_cancel()
        good = protocol.encode(Cancel(request_id="r1"), codec)
        bad = (  # a cancel without its request_id
            b'{"type":"cancel"}' if codec is Codec.JSON else msgpack.packb({"type": "cancel"})
        )
        await client.send_raw(protocol.join_batch([good, bad], codec))
        assert (await client.response("r1")).status is ResponseStatus.CANCELLED
        await client.wait_for(lambda: bool(client.errors or track.errors))
        assert _connection(gateway).cancels_read_early == 1
    await settled(gateway)


async def test_http_delete_is_answered_in_the_loop_turn_that_reads_it(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DELETE is decided in the callback that parsed its request: the asynchronous path
    (a task, as for GET) is never taken (it would fail here), and every answer is still right."""
    from gateway import http_api

    async def usual_path(*args: Any) -> Any:
        raise AssertionError("DELETE took the asynchronous path")

    monkeypatch.setattr(http_api, "_status", usual_path)
    async with WireClient.open(gateway.url) as client:
        await client.chat("r1", metadata=ENDLESS)
        await client.chunks("r1", 2)
        assert await http(gateway, "DELETE", "r1") == (
            200,
            {"request_id": "r1", "status": "cancelled"},
        )
        response = await client.response("r1")
        assert (response.status, response.reason) == (ResponseStatus.CANCELLED, CancelReason.API)
        assert await http(gateway, "DELETE", "r1") == (
            200,
            {"request_id": "r1", "status": "already_cancelled"},
        )
        assert (await http(gateway, "DELETE", "nobody"))[0] == 404
        assert (await http(gateway, "DELETE", "bad%20id"))[0] == 400
    await settled(gateway)
