"""Resumable requests and cancel before start (SPEC.md §5.8, §5.3), over real sockets.

A dropped connection detaches a resumable request instead of cancelling it; ``resume`` from a
new connection of the same user continues it after the client's last ``seq``: no gap, no
duplicate, exactly one terminal (checked by the strict client's state machines). An explicit
cancel always wins; a cancel that arrives before its chat leaves a tombstone.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog

import protocol
from gateway.connection import Connection
from gateway.registry import RequestKey
from gateway.server import Gateway
from protocol import (
    CancelReason,
    CancelStatus,
    Codec,
    ErrorCode,
    ResponseStatus,
    ResumeResult,
    ResumeStatus,
)
from tests.gateway.conftest import running_gateway
from tests.gateway.http_client import http
from tests.gateway.wire import Track, WireClient

#: Slow enough to drop a connection mid-answer: 60 tokens, 4 ms apart.
SLOW = {"tokens": 60, "token_delay_ms": 4, "plan_ms": 0, "tool_ms": 0}
#: One answer at once (zero delay).
QUICK = {"tokens": 40, "token_delay_ms": 0, "plan_ms": 0, "tool_ms": 0}


async def _connection(gw: Gateway, client: WireClient) -> Connection:
    """The gateway's side of ``client``'s connection (named by its welcome)."""
    if client.welcome is None:  # nothing sent yet: the welcome comes with the first answer
        await client.send(protocol.Ping())
        await client.wait_for(lambda: client.welcome is not None)
    assert client.welcome is not None
    (conn,) = [c for c in gw.connections if c.id == client.welcome.connection_id]
    return conn


async def drop(gw: Gateway, client: WireClient) -> None:
    """Cut the client's TCP connection and wait until the gateway has seen it go."""
    conn = await _connection(gw, client)
    client.abort()
    async with asyncio.timeout(5):
        await conn.wait_ended()


async def detached(
    gw: Gateway,
    *,
    chunks: int | None = 2,
    metadata: dict[str, int] = SLOW,
    codec: Codec = Codec.JSON,
    **fields: Any,
) -> Track:
    """A resumable chat ``r1`` whose connection was cut after ``chunks`` chunks arrived (None:
    after its response), once the gateway saw it go."""
    async with WireClient.open(gw.url, codec) as first:
        track = await first.chat("r1", resumable=True, metadata=metadata, **fields)
        if chunks is None:
            await first.response("r1")
        else:
            await first.chunks("r1", chunks)
        await drop(gw, first)
    assert track.resumable is not None
    return track


def kept(tracks: tuple[Track, ...] | list[Track]) -> list[protocol.Chunk]:
    """The chunks a client keeps of one request tracked over several connections (in the order
    they were opened): of each connection, those before the point the next one resumed from;
    what an old connection still receives past it is dropped (it comes again on the new one,
    SPEC.md §5.8)."""
    out: list[protocol.Chunk] = []
    for track, following in zip(tracks, (*tracks[1:], None), strict=True):
        limit = following.machine.first_seq if following is not None else None
        out += [c for c in track.chunks if limit is None or c.seq < limit]
    return out


def joined(*tracks: Track) -> str:
    """The text of the chunks the tracks received, in seq order, each seq once (asserted).

    The tracks of one request in the order they were opened: a client that resumed a
    request still attached elsewhere drops what the old connection got after the resume
    point (it arrives again on the new one, SPEC.md §5.8)."""
    chunks = sorted(kept(tracks), key=lambda c: c.seq)
    seqs = [c.seq for c in chunks]
    assert seqs == list(range(len(seqs))), f"gap or duplicate: {seqs}"
    return "".join(c.text for c in chunks)


def ending(tracks: list[Track]) -> protocol.Response:
    """The one response of a request tracked over several connections. What an earlier
    connection still received about it after the client resumed it elsewhere is what a client
    ignores (SPEC.md §5.8): a response already on its way there is replayed on the new one."""
    (response,) = counted(tracks)
    return response


def counted(tracks: list[Track]) -> list[protocol.Response]:
    """The responses a client takes, over the connections of one request: each connection's,
    if it came before the client resumed the request elsewhere."""
    responses = []
    for track, following in zip(tracks, (*tracks[1:], None), strict=True):
        if track.response is None or track.response_at is None:
            continue
        if following is None or track.response_at < following.opened_at:
            responses.append(track.response)
    return responses


def last_seq(track: Track) -> int | None:
    return track.chunks[-1].seq if track.chunks else None


@contextlib.asynccontextmanager
async def gateway(**settings: Any) -> AsyncIterator[Gateway]:
    async with running_gateway(**settings) as gw:
        yield gw


async def wait_finished(gw: Gateway, rid: str, user: str = "") -> None:
    """Until the request's pipeline halted (its task ended)."""
    record = None
    for request in gw.registry.active():
        if request.key == RequestKey(user, rid):
            record = request
    if record is not None:
        task = record.task  # type: ignore[attr-defined]
        async with asyncio.timeout(10):
            await asyncio.shield(task)


# -- the resumable message ------------------------------------------------------------------


async def test_a_resumable_chat_is_told_its_epoch_and_grace_first() -> None:
    async with gateway(resume_max_grace_seconds=60) as gw, WireClient.open(gw.url) as client:
        track = await client.chat("r1", resumable=True, grace_ms=3_600_000, metadata=QUICK)
        await client.response("r1")
        assert isinstance(track.log[0], protocol.Resumable)  # before any chunk (the machine too)
        assert track.resumable is not None
        assert track.resumable.grace_ms == 60_000  # capped by the gateway
        plain = await client.chat("r2", metadata=QUICK)
        await client.response("r2")
        assert plain.resumable is None  # only when asked
        other = await client.chat("r3", resumable=True, metadata=QUICK)
        await client.response("r3")
        assert other.resumable is not None
        assert other.resumable.grace_ms == 30_000  # the default
        assert other.resumable.epoch != track.resumable.epoch


# -- detach and resume ------------------------------------------------------------------------


@pytest.mark.parametrize("codecs", [(Codec.JSON, Codec.JSON), (Codec.JSON, Codec.MSGPACK)])
async def test_a_dropped_connection_resumes_without_gap_or_duplicate(
    codecs: tuple[Codec, Codec],
) -> None:
    async with gateway() as gw:
        before = await detached(gw, chunks=5, codec=codecs[0])
        assert before.response is None
        assert gw.resumables.detached == 1
        assert before.resumable is not None
        async with WireClient.open(gw.url, codecs[1]) as second:
            after = await second.resume("r1", before.resumable.epoch, last_seq(before))
            assert (await second.resume_result("r1")).status is ResumeStatus.RESUMED
            response = await second.response("r1")
        assert response.status is ResponseStatus.COMPLETED
        assert joined(before, after) == response.content
        assert after.chunks[0].seq == len(before.chunks)


async def test_a_request_that_ended_while_detached_is_replayed_from_where_the_client_was() -> None:
    async with gateway() as gw:
        before = await detached(gw, chunks=3)
        await wait_finished(gw, "r1")
        assert before.resumable is not None
        async with WireClient.open(gw.url) as second:
            after = await second.resume("r1", before.resumable.epoch, last_seq(before))
            response = await second.response("r1")
            assert after.resume_results[0].status is ResumeStatus.RESUMED
        assert response.status is ResponseStatus.COMPLETED
        assert joined(before, after) == response.content


async def test_a_client_that_had_every_chunk_of_an_ended_request_gets_its_end() -> None:
    async with gateway() as gw:
        before = await detached(gw, chunks=None, metadata=QUICK)
        response = before.response
        assert response is not None
        async with WireClient.open(gw.url) as second:
            after = await second.resume("r1", before.resumable.epoch, last_seq(before))
            assert await second.response("r1") == response
        assert after.chunks == []


async def test_resume_without_after_seq_replays_everything() -> None:
    async with gateway() as gw:
        before = await detached(gw, chunks=2)
        async with WireClient.open(gw.url) as second:
            after = await second.resume("r1", before.resumable.epoch)
            response = await second.response("r1")
        assert joined(after) == response.content


async def test_a_request_that_ended_while_attached_stays_resumable_for_its_grace() -> None:
    """The response was written, but the client's connection dropped before it arrived."""
    async with gateway() as gw:
        before = await detached(gw, chunks=None, metadata=QUICK)
        response = before.response
        assert response is not None
        async with WireClient.open(gw.url) as second:
            after = await second.resume("r1", before.resumable.epoch, 10)
            again = await second.response("r1")
        assert again == response
        assert [c.seq for c in after.chunks] == list(range(11, len(before.chunks)))


async def test_resuming_a_request_attached_elsewhere_moves_it() -> None:
    async with gateway() as gw:
        async with WireClient.open(gw.url) as first, WireClient.open(gw.url) as second:
            before = await first.chat("r1", resumable=True, metadata=SLOW)
            await first.chunks("r1", 3)
            assert before.resumable is not None
            # The client resumes from what it has when the answer moves: chunks still in
            # flight to the first connection arrive there, before `moved`.
            after = await second.resume("r1", before.resumable.epoch, last_seq(before))
            response = await second.response("r1")
            await first.wait_for(lambda: before.moved)
        assert before.response is None
        assert before.machine.state is protocol.RequestState.MOVED
        # What the first connection got after the resume point is sent again on the second.
        kept = [c for c in before.chunks if c.seq <= (after.machine.first_seq - 1)]
        assert "".join(c.text for c in kept) + "".join(c.text for c in after.chunks) == (
            response.content
        )


async def test_a_cancel_wins_over_a_detached_request_and_the_resume_replays_it() -> None:
    async with gateway() as gw:
        before = await detached(gw, chunks=3)
        answer = await http("DELETE", f"{gw.http_url}/v1/requests/r1")
        assert answer.status == 200
        assert answer.json()["status"] == "cancelled"
        async with WireClient.open(gw.url) as second:
            after = await second.resume("r1", before.resumable.epoch, last_seq(before))
            response = await second.response("r1")
            usage = await second.final_usage("r1")
        assert response.status is ResponseStatus.CANCELLED
        assert response.reason is CancelReason.API
        assert usage.final
        # the chunks sent (into the void) before the cancel, then nothing after it (G2)
        assert after.log[-1] in (response, after.usage_report)


async def test_grace_expiry_cancels_with_reason_disconnect_and_forgets_the_epoch() -> None:
    async with gateway() as gw:
        before = await detached(gw, chunks=2, grace_ms=30)
        await wait_finished(gw, "r1")
        record = await gw.registry.lookup(RequestKey("", "r1"))
        assert record is not None
        assert record.reason is CancelReason.DISCONNECT
        assert before.resumable is not None
        async with WireClient.open(gw.url) as second:
            after = await second.resume("r1", before.resumable.epoch, last_seq(before))
            assert (await second.resume_result("r1")).status is ResumeStatus.NOT_FOUND
            assert after.machine.state is protocol.RequestState.GONE


async def test_a_non_resumable_request_is_still_cancelled_by_a_disconnect() -> None:
    async with gateway() as gw:
        async with WireClient.open(gw.url) as first:
            await first.chat("r1", metadata=SLOW)
            await first.chunks("r1", 2)
            await drop(gw, first)
        await wait_finished(gw, "r1")
        record = await gw.registry.lookup(RequestKey("", "r1"))
        assert record is not None
        assert record.reason is CancelReason.DISCONNECT
        assert gw.resumables.detached == 0


# -- what a resume cannot find or do -------------------------------------------------------


async def test_unknown_id_wrong_epoch_and_another_users_id_answer_alike() -> None:
    keys = {"client_keys": ("k1",)}
    async with gateway(**keys) as gw:
        headers = {"X-Muxi-Client-Key": "k1"}
        async with WireClient.open(gw.url, headers=headers) as alice:
            before = await alice.chat("r1", resumable=True, user_id="alice", metadata=SLOW)
            await alice.resumable("r1")
            assert before.resumable is not None
            epoch = before.resumable.epoch
            async with WireClient.open(gw.url, headers=headers) as bob:
                answers = []
                for rid, user, ep in (
                    ("r1", "bob", epoch),
                    ("r1", "alice", "x.1"),
                    ("r1", "bob", "x.1"),
                ):
                    track = await bob.resume(rid, ep, user_id=user)
                    answers.append(await bob.resume_result(rid))
                    assert track.machine.state is protocol.RequestState.GONE
                expected = ResumeResult(request_id="r1", status=ResumeStatus.NOT_FOUND)
                assert answers == [expected] * 3  # byte-identical: nothing tells them apart
            await alice.response("r1")  # untouched


async def test_after_seq_beyond_what_was_sent_is_refused() -> None:
    async with gateway() as gw:
        before = await detached(gw, chunks=2)
        async with WireClient.open(gw.url) as second:
            track = second.track("r1")
            await second.send(
                protocol.Resume(request_id="r1", epoch=before.resumable.epoch, after_seq=10_000)
            )
            await second.wait_for(lambda: bool(track.errors))
            assert track.errors[0].code == ErrorCode.INVALID_FIELD
            # still resumable: a correct resume continues it
            after = await second.resume("r1", before.resumable.epoch, last_seq(before))
            response = await second.response("r1")
        assert joined(before, after) == response.content


async def test_resume_of_a_request_running_on_this_connection_is_a_duplicate() -> None:
    async with gateway() as gw, WireClient.open(gw.url) as client:
        track = await client.chat("r1", resumable=True, metadata=SLOW)
        await client.resumable("r1")
        assert track.resumable is not None
        await client.send(protocol.Resume(request_id="r1", epoch=track.resumable.epoch))
        await client.wait_for(lambda: bool(track.errors))
        assert track.errors[0].code == ErrorCode.DUPLICATE_REQUEST_ID
        assert (await client.response("r1")).status is ResponseStatus.COMPLETED


async def test_a_resumed_request_counts_against_the_new_connections_streams() -> None:
    async with gateway(max_streams=1) as gw:
        before = await detached(gw, chunks=2)
        async with WireClient.open(gw.url) as second:
            busy = await second.chat("busy", metadata=SLOW)
            track = second.track("r1")
            await second.send(protocol.Resume(request_id="r1", epoch=before.resumable.epoch))
            await second.wait_for(lambda: bool(track.errors))
            assert track.errors[0].code == ErrorCode.TOO_MANY_STREAMS
            await second.response("busy")
            assert busy.response is not None
            after = await second.resume("r1", before.resumable.epoch, last_seq(before))
            response = await second.response("r1")
        assert joined(before, after) == response.content


# -- cancel before start (SPEC.md §5.3) -----------------------------------------------------


async def test_a_cancel_that_overtakes_its_chat_ends_the_chat_at_once() -> None:
    async with (
        gateway() as gw,
        WireClient.open(gw.url) as canceller,
        WireClient.open(gw.url) as chatter,
    ):
        await canceller.cancel("r1")
        await canceller.wait_for(lambda: bool(canceller.others))
        assert canceller.others[0] == protocol.CancelResult(
            request_id="r1", status=CancelStatus.NOT_FOUND
        )
        track = await chatter.chat("r1", metadata=SLOW)
        response = await chatter.response("r1")
        assert response.status is ResponseStatus.CANCELLED
        assert response.reason is CancelReason.CLIENT
        assert response.usage.final
        assert (response.usage.input_tokens, response.usage.output_tokens) == (0, 0)
        assert track.chunks == []
        assert track.log == [response]  # its only message
        # The tombstone is used up: the same id runs normally next time.
        again = await chatter.chat("r1", metadata=QUICK)
        assert (await chatter.response("r1")).status is ResponseStatus.COMPLETED
        assert again.chunks


async def test_an_http_cancel_before_the_chat_leaves_a_tombstone_with_reason_api() -> None:
    async with gateway() as gw:
        answer = await http("DELETE", f"{gw.http_url}/v1/requests/r1")
        assert answer.status == 404
        async with WireClient.open(gw.url) as client:
            await client.chat("r1", resumable=True, metadata=SLOW)
            response = await client.response("r1")
        assert response.status is ResponseStatus.CANCELLED
        assert response.reason is CancelReason.API
        record = await gw.registry.lookup(RequestKey("", "r1"))
        assert record is not None
        assert record.reason is CancelReason.API


async def test_tombstones_are_per_user_and_can_be_turned_off() -> None:
    keys = {"client_keys": ("k1",)}
    headers = {"X-Muxi-Client-Key": "k1"}
    async with gateway(**keys) as gw, WireClient.open(gw.url, headers=headers) as client:
        await client.cancel("r1", user_id="alice")
        await client.wait_for(lambda: bool(client.others))
        await client.chat("r1", user_id="bob", metadata=QUICK)
        assert (await client.response("r1")).status is ResponseStatus.COMPLETED
    async with gateway(tombstone_seconds=0) as gw, WireClient.open(gw.url) as client:
        await client.cancel("r1")
        await client.wait_for(lambda: bool(client.others))
        await client.chat("r1", metadata=QUICK)
        assert (await client.response("r1")).status is ResponseStatus.COMPLETED


# -- randomized ---------------------------------------------------------------------------


class Requests:
    """Resumable requests followed over the connections a randomized test opens and loses:
    each request's tracks (one per connection it was on), its epoch, and the Stops sent."""

    def __init__(self, rids: list[str], rng: random.Random) -> None:
        self.rids = rids
        self.rng = rng
        self.tracks: dict[str, list[Track]] = {rid: [] for rid in rids}
        self.epochs: dict[str, str] = {}
        self.cancelled: set[str] = set()

    def done(self, rid: str) -> bool:
        """The client has the request's end (not counting one an old connection received
        after the request was resumed elsewhere: the new one gets it again)."""
        return bool(counted(self.tracks[rid]))

    def last(self, rid: str) -> int | None:
        """The last ``seq`` the client kept (what it resumes after)."""
        seqs = [c.seq for c in kept(self.tracks[rid])]
        return max(seqs) if seqs else None

    async def start(self, client: WireClient, metadata: dict[str, int]) -> None:
        for rid in self.rids:
            self.tracks[rid].append(await client.chat(rid, resumable=True, metadata=metadata))
        for rid in self.rids:
            self.epochs[rid] = (await client.resumable(rid)).epoch

    async def some_progress(self, client: WireClient, most: int) -> None:
        """Until a random number of chunks (up to ``most``) arrived in all, or all ended."""
        goal = self.rng.randint(1, most)

        def reached() -> bool:
            received = sum(len(t.chunks) for ts in self.tracks.values() for t in ts)
            return received >= goal or all(self.done(r) for r in self.rids)

        await client.wait_for(reached)

    async def stop_some(self, gw: Gateway, client: WireClient | None, n: int) -> None:
        """Stop ``n`` random requests (again, for some): by frame on ``client``, else HTTP."""
        for rid in self.rng.sample(self.rids, n):
            if rid in self.cancelled:
                continue
            self.cancelled.add(rid)
            if client is not None and self.rng.random() < 0.5:
                await client.cancel(rid)
            else:
                await http("DELETE", f"{gw.http_url}/v1/requests/{rid}")

    async def resume_all(self, client: WireClient) -> None:
        for rid in self.rids:
            if not self.done(rid):
                self.tracks[rid].append(await client.resume(rid, self.epochs[rid], self.last(rid)))

    async def check(self, client: WireClient) -> None:
        """Each request ends once; completed ones join to their content; cancelled ones were
        Stopped (the others never are)."""
        for rid in self.rids:
            if not self.done(rid):
                await client.response(rid, timeout=30)
        for rid in self.rids:
            response = ending(self.tracks[rid])
            if response.status is ResponseStatus.COMPLETED:  # (a Stop may lose to the end)
                assert joined(*self.tracks[rid]) == response.content
            else:
                assert response.status is ResponseStatus.CANCELLED
                assert response.reason in (CancelReason.CLIENT, CancelReason.API)
                assert rid in self.cancelled


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_drops_moves_resumes_and_cancels_keep_every_stream_whole(seed: int) -> None:
    """Requests spread over connections that are cut (TCP abort) or abandoned to a resume
    elsewhere (moved) at random moments; every request is resumed from its last received
    ``seq`` each time, and some are cancelled (frame, HTTP) at random. Every request ends with
    exactly one response (the strict client refuses a second, a chunk after it, a gap, a
    repeat or a wrong content); completed ones join to their content over all connections."""
    rng = random.Random(seed)
    requests = Requests([f"r{i}" for i in range(24)], rng)
    async with gateway(max_streams=64) as gw, contextlib.AsyncExitStack() as stack:
        client = await stack.enter_async_context(WireClient.open(gw.url))
        await requests.start(client, {"tokens": 80, "token_delay_ms": 1, "plan_ms": 0})
        for round_ in range(6):
            await requests.some_progress(client, 40 * (round_ + 1))
            await requests.stop_some(gw, client, 3)
            old = client
            client = await stack.enter_async_context(WireClient.open(gw.url))
            if rng.random() < 0.5:
                await drop(gw, old)  # cut: everything detaches
            # else: the old connection stays open; each resume below moves a request away
            await requests.resume_all(client)
        await requests.check(client)


# -- through a proxy process that loses traffic, then resets --------------------------------


@contextlib.asynccontextmanager
async def chaos_proxy(gw: Gateway) -> AsyncIterator[tuple[str, Any]]:
    """``tests/gateway/chaos_proxy.py`` in front of ``gw``: yields its WebSocket URL and a
    function sending it a command (``drop``, ``cut``) and awaiting its ``ok``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__).with_name("chaos_proxy.py")),
        str(gw.port),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout
    try:
        async with asyncio.timeout(10):
            port = int((await stdout.readline()).split()[1])

        async def command(what: str) -> None:
            stdin.write(what.encode() + b"\n")
            await stdin.drain()
            async with asyncio.timeout(10):
                assert (await stdout.readline()).strip() == b"ok"

        yield f"ws://127.0.0.1:{port}/v1/ws", command
    finally:
        stdin.close()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


@pytest.mark.parametrize("seed", [7, 8, 9])
async def test_a_proxy_that_loses_traffic_then_resets_costs_no_word(seed: int) -> None:
    """60 resumable requests through a proxy process. At random moments the proxy first loses
    the traffic both ways (chunks the gateway wrote never arrive), then resets both sides; the
    client reconnects through it and resumes every request from the last ``seq`` it really
    received; some requests are cancelled over HTTP meanwhile. Every request ends once, and
    the completed ones join to their content."""
    requests = Requests([f"p{i}" for i in range(60)], random.Random(seed))
    async with (
        gateway(max_streams=64) as gw,
        chaos_proxy(gw) as (url, command),
        contextlib.AsyncExitStack() as stack,
    ):
        client = await stack.enter_async_context(WireClient.open(url))
        await requests.start(client, {"tokens": 120, "token_delay_ms": 1, "plan_ms": 0})
        for round_ in range(5):
            await requests.some_progress(client, 60 * (round_ + 1))
            await requests.stop_some(gw, None, 4)
            conn = await _connection(gw, client)
            client.aborted = True  # what follows is the network's doing, not a violation
            await command("drop")
            await command("cut")
            async with asyncio.timeout(5):
                await conn.wait_ended()
            client = await stack.enter_async_context(WireClient.open(url))
            await requests.resume_all(client)
        await requests.check(client)


async def test_detach_resume_move_and_grace_expiry_are_logged_once_each() -> None:
    """One info line per event, so that a drop and its resume can be traced (never per chunk)."""
    with structlog.testing.capture_logs() as events:
        async with gateway() as gw:
            async with WireClient.open(gw.url) as first, WireClient.open(gw.url) as second:
                before = await first.chat("r1", resumable=True, metadata=SLOW)
                await first.chunks("r1", 2)
                assert before.resumable is not None
                await second.resume("r1", before.resumable.epoch, last_seq(before))
                await second.resume_result("r1")
                await drop(gw, second)
            await wait_finished(gw, "r1")
            async with WireClient.open(gw.url) as third:
                lost = await third.chat("r2", resumable=True, grace_ms=20, metadata=SLOW)
                await third.resumable("r2")
                await drop(gw, third)
            await wait_finished(gw, "r2")
            assert lost.response is None
    named = {e["event"]: e for e in events if e["event"].startswith("request.")}
    assert named["request.resumed"]["moved"] is True
    assert named["request.detached"]["request_id"] in ("r1", "r2")
    assert [e["request_id"] for e in events if e["event"] == "request.detached"] == ["r1", "r2"]
    assert [e["request_id"] for e in events if e["event"] == "request.grace_expired"] == ["r2"]


async def test_a_long_connection_keeps_nothing_for_requests_no_longer_resumable() -> None:
    """Bounded memory on a connection that makes many resumable chats: once a finished one's
    grace runs out, neither the book nor its connection holds it."""
    loop = asyncio.get_running_loop()
    async with gateway() as gw, WireClient.open(gw.url) as client:
        for n in range(5):
            await client.chat(f"r{n}", resumable=True, grace_ms=1000, metadata=QUICK)
            await client.response(f"r{n}")
        conn = await _connection(gw, client)
        assert conn.mux is not None
        entries = list(gw.resumables._entries.values())
        # The connection holds exactly what is still resumable (all of it, unless the machine
        # is slow enough for a grace to run out already).
        assert entries
        assert conn.mux.resumable == {e.request for e in entries}
        # the gateway's own timers: wait until the last of them has fired
        timers = [e.timer for e in entries if e.timer is not None]
        await asyncio.sleep(max(t.when() for t in timers) - loop.time())
        await asyncio.sleep(0)
        assert len(gw.resumables) == 0
        assert conn.mux.resumable == set()
