"""Resumable requests in the SDK (SPEC.md §5.8): the client reconnects and resumes by itself.

The SDK talks to a real gateway through :class:`CutProxy`, a TCP proxy in the test's loop that
the test can sever at any moment: the SDK's socket gets a TCP reset (no close frame), and the
gateway's side is closed too, or kept open (the gateway then still runs the request on the old
connection, and the resume *moves* it). The proxy can also hold or refuse the reconnection, so
a test can act while the client is reconnecting. Every stream is checked end to end: the chunks
the caller got are numbered 0, 1, 2, ... once each, they join to the response's content, and
the iteration ends exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import protocol
from gateway import (
    AsyncChatStream,
    AsyncClient,
    Chunk,
    Client,
    ConnectError,
    ConnectionLost,
    InvalidRequest,
    ProtocolViolation,
    RequestMoved,
    ResumeFailed,
    ResumeNotFound,
    Step,
)
from gateway.client import _async
from gateway.registry import RequestKey, RequestStatus
from gateway.server import Gateway
from protocol import CancelReason, CancelStatus, Codec

from ..gateway.conftest import running_gateway
from ..gateway.wire import WireClient
from .conftest import ThreadedGateway, wait_record
from .scripted import Peer, scripted_gateway

#: About a second of answer, one token every 4 ms.
LONG = {"tokens": 300, "token_delay_ms": 4, "plan_ms": 0, "tool_ms": 0}
#: About half a second.
MEDIUM = {"tokens": 150, "token_delay_ms": 4, "plan_ms": 0, "tool_ms": 0}
#: Runs until cancelled (minutes).
ENDLESS = {"tokens": 100_000, "token_delay_ms": 5, "plan_ms": 0, "tool_ms": 0}


class CutProxy:
    """A TCP proxy to ``upstream`` that the test can cut, hold and refuse (see the module).
    With several upstreams, each new connection goes to the next (a round-robin front)."""

    def __init__(self, upstream_host: str, *upstream_ports: int) -> None:
        self.upstreams = [(upstream_host, port) for port in upstream_ports]
        self._turn = 0
        self.port = 0
        self.accepted = 0  # connections accepted from the SDK
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._pairs: list[_Pair] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._released = asyncio.Event()
        self._released.set()
        self._refusing = False
        self._changed = asyncio.Condition()
        self.held = 0  # connections that arrived while held
        self.refused = 0
        self._kept: list[_Pair] = []  # every pair, to close the kept upstreams at the end

    @classmethod
    @contextlib.asynccontextmanager
    async def to(cls, *gateways: Gateway) -> AsyncIterator[CutProxy]:
        async with cls.to_ports(*(gw.port for gw in gateways)) as proxy:
            yield proxy

    @classmethod
    @contextlib.asynccontextmanager
    async def to_ports(cls, *ports: int) -> AsyncIterator[CutProxy]:
        proxy = cls("127.0.0.1", *ports)
        proxy._server = await asyncio.start_server(proxy._serve, "127.0.0.1", 0)
        proxy.port = proxy._server.sockets[0].getsockname()[1]
        try:
            yield proxy
        finally:
            # Reset every socket: the pumps see it and end (cancelling them instead trips
            # asyncio's start_server callback on Python 3.11).
            proxy._server.close()
            proxy.refuse()
            proxy.release()
            for pair in proxy._kept:
                _reset(pair.client)
                _reset(pair.upstream)
            tasks = list(proxy._tasks)
            _, pending = await asyncio.wait(tasks, timeout=5) if tasks else (set(), set())
            for task in pending:  # pragma: no cover - a pump that did not end
                task.cancel()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    # -- what the test does ----------------------------------------------------------------

    def cut(self, *, keep_upstream: bool = False) -> None:
        """Reset every connection the SDK has through the proxy (no close frame). With
        ``keep_upstream`` the gateway's side stays open, and what it sends goes nowhere."""
        pairs, self._pairs = self._pairs, []
        for pair in pairs:
            pair.keep_upstream = keep_upstream
            _reset(pair.client)
            if not keep_upstream:
                _reset(pair.upstream)
        self.cuts += 1

    def hold(self) -> None:
        """New connections wait (accepted, not forwarded) until :meth:`release`."""
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    def refuse(self, refusing: bool = True) -> None:
        """New connections are reset as soon as they are accepted."""
        self._refusing = refusing

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)

    # -- serving ---------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._forward(reader, writer)
        finally:
            self._tasks.discard(task)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            self.refused += 1
            await self._notify()
            _reset(writer)
            return
        if not self._released.is_set():
            self.held += 1
            await self._notify()
            await self._released.wait()
        upstream = self.upstreams[self._turn % len(self.upstreams)]
        self._turn += 1
        up_reader, up_writer = await asyncio.open_connection(*upstream)
        self.accepted += 1
        pair = _Pair(writer, up_writer)
        self._pairs.append(pair)
        self._kept.append(pair)
        await self._notify()
        await asyncio.gather(
            _pump(reader, up_writer, lambda: not pair.keep_upstream),
            _pump(up_reader, writer, lambda: True),
            return_exceptions=True,
        )

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()


class _Pair:
    """One connection through the proxy: the SDK's side and the gateway's."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.keep_upstream = False


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset: SO_LINGER 0, then abort."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, close_after: Callable[[], bool]
) -> None:
    """Copy until EOF or a reset, then close ``writer`` if ``close_after()``; what cannot be
    written (a cut side) is dropped."""
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            if writer.transport.is_closing():
                continue  # the other side was cut: the data goes nowhere
            writer.write(data)
            with contextlib.suppress(ConnectionError, OSError):
                await writer.drain()
    if close_after() and not writer.transport.is_closing():
        writer.transport.abort()


@contextlib.asynccontextmanager
async def setup(**gateway_settings: Any) -> AsyncIterator[tuple[Gateway, CutProxy]]:
    async with running_gateway(**gateway_settings) as gw, CutProxy.to(gw) as proxy:
        yield gw, proxy


class Reader:
    """Reads one stream in a task, keeping every chunk; counts chunks for all readers."""

    def __init__(self, stream: AsyncChatStream, progress: Progress) -> None:
        self.stream = stream
        self.chunks: list[Chunk] = []
        self.progress = progress
        self.ends = 0
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for chunk in self.stream:
            self.chunks.append(chunk)
            await self.progress.tick()
        self.ends += 1
        with contextlib.suppress(StopAsyncIteration):  # a second end never comes
            await self.stream.__anext__()
            raise AssertionError("the stream yielded after its end")

    def check(self) -> None:
        """No gap, no repeat, the content, one end."""
        response = self.stream.response
        assert response is not None
        assert response.completed, response
        seqs = [c.seq for c in self.chunks]
        assert seqs == list(range(len(seqs))), f"gap or duplicate: {seqs}"
        assert "".join(c.text for c in self.chunks) == response.content
        assert self.stream.text == response.content
        assert self.ends == 1


class Progress:
    """Chunks read by all readers, to cut at chosen points (not at chosen times)."""

    def __init__(self) -> None:
        self.chunks = 0
        self._changed = asyncio.Condition()

    async def tick(self) -> None:
        self.chunks += 1
        async with self._changed:
            self._changed.notify_all()

    async def reach(self, count: int, readers: list[Reader], timeout: float = 20.0) -> bool:
        """Until ``count`` chunks were read (True), or every reader ended (False)."""

        def done() -> bool:
            return all(r.task.done() for r in readers)

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.chunks >= count or done())
        return self.chunks >= count


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Yield to the loop until ``predicate`` holds (for SDK-internal states with no event)."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - the SDK has no event for its internals
            await asyncio.sleep(0)


async def read_all(stream: AsyncChatStream, into: list[Chunk]) -> None:
    async for chunk in stream:
        into.append(chunk)


def _detached(client: AsyncClient, request_id: str) -> bool:
    exchange = client._detached.get(request_id)
    return exchange is not None and exchange.detached


# -- the API --------------------------------------------------------------------------------


async def test_resumable_and_grace_go_out_with_the_chat() -> None:
    chats: list[protocol.Chat] = []

    async def script(peer: Peer) -> None:
        await peer.welcome()
        while True:
            chat = await peer.chat()
            chats.append(chat)
            await peer.send(protocol.Response(request_id=chat.request_id, status="completed"))

    async with scripted_gateway(script) as url:
        async with AsyncClient(url) as client:
            await client.chat("a")
            await client.chat("b", resumable=True)
            await client.chat("c", grace=1.5)  # implies resumable
            assert not client.resumable
        async with AsyncClient(url, resumable=True) as client:
            assert client.resumable
            await client.chat("d")
            await client.chat("e", resumable=False)
            with pytest.raises(InvalidRequest):
                client.chat_stream("f", resumable=False, grace=1)
            with pytest.raises(InvalidRequest):
                client.chat_stream("f", grace=0)
            with pytest.raises(InvalidRequest):
                client.chat_stream("f", grace=3601)
    assert [(c.resumable, c.grace_ms) for c in chats] == [
        (False, None),
        (True, None),
        (True, 1500),
        (True, None),
        (False, None),
    ]
    with pytest.raises(InvalidRequest):
        AsyncClient(url, reconnect_timeout=-1)


# -- resuming -------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["Once upon a time.", "Once upon a dime."])
async def test_the_resume_names_the_epoch_and_the_last_seq_received(content: str) -> None:
    """A scripted gateway: two chunks, a drop without close frame, then the resume must ask
    for what follows seq 1. The completed content is checked against the text of both
    connections (a wrong one is a protocol violation)."""
    resumes: list[protocol.Resume] = []

    async def script(peer: Peer) -> None:
        await peer.welcome()
        message = await peer.receive()
        if isinstance(message, protocol.Chat):
            rid = message.request_id
            await peer.send(
                protocol.Resumable(request_id=rid, epoch="e.1", grace_ms=1000),
                protocol.Chunk(request_id=rid, seq=0, text="Once"),
                protocol.Chunk(request_id=rid, seq=1, text=" upon"),
            )
            await peer.receive()  # never comes: the drop ends it
        assert isinstance(message, protocol.Resume), message
        resumes.append(message)
        rid = message.request_id
        await peer.send(
            protocol.ResumeResult(request_id=rid, status=protocol.ResumeStatus.RESUMED),
            protocol.Chunk(request_id=rid, seq=2, text=" a time."),
            protocol.Response(request_id=rid, status="completed", content=content),
        )
        await peer.receive()

    async with scripted_gateway(script) as url, AsyncClient(url, resumable=True) as client:
        stream = client.chat_stream("story", request_id="r1")
        chunks = [await stream.__anext__(), await stream.__anext__()]
        conn = client._conn
        assert conn is not None
        conn.ws.transport.abort()  # from our side: the same as a reset
        if content == "Once upon a time.":
            await read_all(stream, chunks)
            assert stream.response is not None
            assert stream.response.content == content
            assert [c.seq for c in chunks] == [0, 1, 2]
            assert stream.resumes == 1
        else:
            with pytest.raises(ProtocolViolation):
                await read_all(stream, chunks)
    assert resumes == [protocol.Resume(request_id="r1", epoch="e.1", after_seq=1)]


@pytest.mark.parametrize(("seed", "codec"), [(1, Codec.JSON), (2, Codec.MSGPACK), (3, Codec.JSON)])
async def test_concurrent_streams_survive_random_cuts(
    seed: int, codec: Codec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six resumable streams on one client; the connection is cut (TCP reset) at random points,
    sometimes leaving the gateway's side open (the resume moves the requests off it), and
    sometimes again while the client is reconnecting (before or after its resumes went out).
    Each caller gets every chunk once, in order, and exactly one end."""
    monkeypatch.setattr(_async, "RECONNECT_STABLE_AFTER", 0.0)  # cuts here come fast
    rng = random.Random(seed)
    progress = Progress()
    async with setup() as (gw, proxy), AsyncClient(proxy.url, codec=codec) as client:
        readers = [
            Reader(client.chat_stream(f"story {i}", resumable=True, metadata=LONG), progress)
            for i in range(6)
        ]
        # Six streams of ~300 chunks in step: cutting before half of them were read, each
        # stream is mid-answer at every cut.
        points = sorted(rng.sample(range(10, 900), 5))
        settled = 0  # cuts after which the test waited for every stream to be resumed
        for point in points:
            assert await progress.reach(point, readers)
            before = proxy.accepted
            proxy.cut(keep_upstream=rng.random() < 0.4)
            await proxy.wait_for(lambda before=before: proxy.accepted > before)
            if rng.random() < 0.3:
                proxy.cut()  # the client is reconnecting: handshake or resumes in flight
                continue
            resumed = [r.stream.resumes for r in readers]
            await until(
                lambda resumed=resumed: all(
                    r.stream.resumes > n or r.task.done()
                    for r, n in zip(readers, resumed, strict=True)
                )
            )
            settled += 1
        async with asyncio.timeout(30):
            await asyncio.gather(*(r.task for r in readers))
        for reader in readers:
            reader.check()
        assert settled >= 1
        assert all(settled <= r.stream.resumes <= proxy.cuts for r in readers)
        assert gw.resumables.detached == 0


async def test_a_resumable_chat_returns_its_response_across_a_cut() -> None:
    async with setup() as (gw, proxy), AsyncClient(proxy.url) as client:
        task = client.chat_async("essay", request_id="r1", resumable=True, metadata=MEDIUM)
        await wait_record(gw, "r1", statuses=(RequestStatus.ACTIVE,))
        proxy.cut()
        async with asyncio.timeout(10):
            response = await task
        assert response.completed
        assert len(response.content) > 0
        record = await wait_record(gw, "r1", statuses=(RequestStatus.COMPLETED,))
        assert record.usage is not None
        assert proxy.accepted == 2


async def test_steps_go_on_after_a_resume() -> None:
    """Steps are not replayed (SPEC.md §5.8): one that started before the cut ends after it."""
    meta = {"tokens": 60, "token_delay_ms": 5, "plan_ms": 0, "tool_ms": 300}
    seen: list[Step] = []
    tool = asyncio.Event()

    def on_step(step: Step) -> None:
        seen.append(step)
        if step.kind == "tool" and step.state == "started":
            tool.set()

    progress = Progress()
    async with setup() as (_, proxy), AsyncClient(proxy.url, resumable=True) as client:
        stream = client.chat_stream("find", steps=True, on_step=on_step, metadata=meta)
        reader = Reader(stream, progress)
        async with asyncio.timeout(10):
            await tool.wait()
            proxy.cut()
            await reader.task
        reader.check()
        assert stream.resumes == 1
        tool_steps = [s for s in seen if s.kind == "tool"]
        assert [s.state for s in tool_steps] == ["started", "ended"]
        assert stream.current_step is None


def test_the_blocking_client_resumes_too() -> None:
    with ThreadedGateway() as threaded:

        async def open_proxy() -> tuple[CutProxy, contextlib.AsyncExitStack]:
            stack = contextlib.AsyncExitStack()
            return await stack.enter_async_context(CutProxy.to(threaded.gw)), stack

        proxy, stack = threaded.call(open_proxy())

        async def cut() -> None:
            proxy.cut()

        try:
            with Client(proxy.url, resumable=True) as client:
                assert client.resumable
                stream = client.chat_stream("story", metadata=MEDIUM)
                chunks = []
                for chunk in stream:
                    chunks.append(chunk)
                    if len(chunks) == 5:
                        threaded.call(cut())
                assert stream.response is not None
                assert stream.response.completed
                assert [c.seq for c in chunks] == list(range(len(chunks)))
                assert "".join(c.text for c in chunks) == stream.response.content
                assert stream.resumes == 1
        finally:
            threaded.call(stack.aclose())


# -- what does not resume -------------------------------------------------------------------


async def test_a_non_resumable_stream_still_fails_on_a_cut() -> None:
    progress = Progress()
    async with setup() as (gw, proxy), AsyncClient(proxy.url) as client:
        plain = Reader(client.chat_stream("plain", request_id="p1", metadata=MEDIUM), progress)
        kept = Reader(client.chat_stream("kept", resumable=True, metadata=MEDIUM), progress)
        await progress.reach(10, [plain, kept])
        proxy.cut()
        async with asyncio.timeout(10):
            with pytest.raises(ConnectionLost) as caught:
                await plain.task
            await kept.task
        assert not isinstance(caught.value, ResumeFailed)
        kept.check()
        record = await wait_record(gw, "p1")
        assert record.reason is CancelReason.DISCONNECT


async def test_closing_the_client_cancels_its_resumable_requests() -> None:
    """Nobody could resume them: the client cancels them rather than let them run detached."""
    async with setup() as (gw, _):
        client = AsyncClient(gw.url)
        stream = client.chat_stream("story", request_id="r1", resumable=True, metadata=ENDLESS)
        await stream.__anext__()
        await client.aclose()
        with pytest.raises(ConnectionLost):
            await stream.__anext__()
        record = await wait_record(gw, "r1", statuses=(RequestStatus.CANCELLED,))
        assert record.reason is CancelReason.CLIENT  # not left running, detached


# -- cancels while reconnecting -------------------------------------------------------------


async def _cut_and_hold(client: AsyncClient, proxy: CutProxy, request_id: str) -> None:
    """Cut, and hold the client's reconnection: the request waits, detached."""
    proxy.hold()
    proxy.cut()
    await proxy.wait_for(lambda: proxy.held > 0)
    assert _detached(client, request_id)


@pytest.mark.parametrize("how", ["stream.cancel", "cancel_request", "break"])
async def test_a_cancel_while_reconnecting_wins(how: str) -> None:
    async with setup() as (gw, proxy), AsyncClient(proxy.url, resumable=True) as client:
        stream = client.chat_stream("story", request_id="r1", metadata=ENDLESS)
        async for chunk in stream:
            if chunk.seq == 3:
                break  # (the stream stays open: it is closed below for "break")
        await _cut_and_hold(client, proxy, "r1")
        if how == "stream.cancel":
            cancelling: asyncio.Task[Any] = asyncio.create_task(stream.cancel())
        elif how == "cancel_request":
            cancelling = asyncio.create_task(client.cancel_request("r1"))
        else:
            await stream.aclose()  # what leaving the loop early does
            cancelling = asyncio.create_task(asyncio.sleep(0))
        await until(lambda: bool(client._detached["r1"].pending_cancels))
        # Not sent yet: the gateway still runs it, detached.
        record = await gw.registry.lookup(RequestKey("", "r1"))
        assert record is not None
        assert record.status is RequestStatus.ACTIVE
        proxy.release()
        async with asyncio.timeout(10):
            result = await cancelling
        record = await wait_record(gw, "r1", statuses=(RequestStatus.CANCELLED,))
        assert record.reason is CancelReason.CLIENT  # in-band, right after the resume
        if how == "stream.cancel":
            assert result is not None
            assert result.cancelled
            assert result.reason is CancelReason.CLIENT
        elif how == "cancel_request":
            assert result.status is CancelStatus.CANCELLED
            with pytest.raises(StopAsyncIteration):
                await stream.__anext__()  # the loop ends at the cancelled response
            assert stream.response is not None
            assert stream.response.cancelled


# -- giving up ------------------------------------------------------------------------------


async def test_a_resume_after_the_grace_period_ends_the_stream_with_resume_not_found() -> None:
    async with setup() as (gw, proxy), AsyncClient(proxy.url) as client:
        stream = client.chat_stream("story", request_id="r1", grace=0.05, metadata=ENDLESS)
        chunks = [await stream.__anext__() for _ in range(3)]
        await _cut_and_hold(client, proxy, "r1")
        record = await wait_record(gw, "r1", statuses=(RequestStatus.CANCELLED,))
        assert record.reason is CancelReason.DISCONNECT  # the grace period ended
        proxy.release()
        got: list[Chunk] = []
        with pytest.raises(ResumeNotFound) as caught:
            async with asyncio.timeout(10):
                await read_all(stream, got)  # first the chunks received before the cut
        assert caught.value.request_id == "r1"
        assert [c.seq for c in chunks + got] == list(range(len(chunks) + len(got)))
        assert stream.response is None
        # The client goes on: a new request works on the new connection.
        assert (await client.chat("hi", metadata={"tokens": 3})).completed


async def test_reconnecting_gives_up_after_reconnect_timeout() -> None:
    async with setup() as (gw, proxy):
        client = AsyncClient(proxy.url, resumable=True, reconnect_timeout=1.0)
        async with client:
            stream = client.chat_stream("story", request_id="r1", metadata=ENDLESS)
            await stream.__anext__()
            proxy.refuse()
            proxy.cut()
            started = time.monotonic()
            with pytest.raises(ResumeFailed) as caught:
                async with asyncio.timeout(10):
                    await read_all(stream, [])
            elapsed = time.monotonic() - started
        assert not isinstance(caught.value, ResumeNotFound)
        assert isinstance(caught.value.__cause__, ConnectError)
        assert caught.value.request_id == "r1"
        # Backed off and retried within the bound: the connection was young, so the pauses
        # were 0.05-0.1 s, 0.1-0.2 s, 0.2-0.4 s, ... (RECONNECT_BASE_DELAY, jittered).
        assert proxy.refused >= 3
        assert elapsed < 1.0 + 1.0
        record = await gw.registry.lookup(RequestKey("", "r1"))
        assert record is not None
        assert record.status is RequestStatus.ACTIVE  # detached, until its grace ends


async def test_another_client_resuming_the_request_ends_the_stream_with_request_moved() -> None:
    async with running_gateway() as gw, AsyncClient(gw.url, resumable=True) as client:
        stream = client.chat_stream("story", request_id="r1", metadata=MEDIUM)
        chunks = [await stream.__anext__() for _ in range(3)]
        exchange = stream._exchange
        assert exchange is not None
        assert exchange.epoch is not None
        async with WireClient.open(gw.url) as other:
            track = await other.resume("r1", exchange.epoch, chunks[-1].seq)
            response = await other.response("r1")
        with pytest.raises(RequestMoved) as caught:
            async with asyncio.timeout(10):
                await read_all(stream, chunks)  # first what arrived before `moved`
        assert caught.value.request_id == "r1"
        assert stream.response is None
        first = track.machine.first_seq
        text = "".join(c.text for c in chunks if c.seq < first)
        assert text + "".join(c.text for c in track.chunks) == response.content
