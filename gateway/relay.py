"""Resume on another node (issue 17): the node that runs a request relays its stream over NATS
to the node the client reconnected to.

Behind a round-robin load balancer a reconnecting client rarely lands on the node that runs its
request. A ``resume`` that this node cannot find in its own book (:mod:`gateway.resume`) is asked
of every node (``muxgate.<cluster>.resume``); the node that has it (the *owner*) moves the
request's output onto a :class:`RelaySender` — an :class:`~gateway.outbound.Outbound` encoding in
the resuming connection's codec whose "socket" is a NATS subject — and the asking node's
:class:`RelayReceiver` writes what arrives to its client. Everything the gateway decides about
the request (its chunks, its replay, a cancel's outcome, the ``moved`` when it is resumed
again) is still decided by the owner, exactly as for a local connection: the relay only carries
encoded messages, so G1-G5 hold as they do on one node.

Two subjects per relayed request, named by a random token the receiver picks, under each node's
own address (:attr:`Cluster.address`, one subscription per node, whatever the number of
relays): ``<receiver's address>.out.<token>`` (owner → receiver: envelopes of encoded messages)
and ``<owner's address>.in.<token>`` (receiver → owner: acknowledgements, the client's cancels,
the client's departure).

- **Flow control.** The receiver acknowledges messages once they are written to its client's
  socket; the owner keeps at most ``window`` unacknowledged, so a slow client slows its
  request's pipeline (its queue fills, its producer waits) as it would on the owner's own
  socket. Nothing on either node grows without bound.
- **Cancel.** A ``cancel`` read by the receiver goes to the owner, which decides it (the race
  with completion is decided once, there) and answers through the relay, in order. From the
  moment the receiver reads the cancel it holds back the request's chunks still arriving: a
  ``cancelled`` response drops them (nothing of the request is written after the cancel is
  read, G2); any other end writes them first (a completed answer's chunks join to its content).
- **Loss.** A receiver whose client leaves tells the owner, which detaches the request (grace,
  SPEC.md §5.8) for another resume. A receiver whose owner node goes silent (three heartbeats)
  ends the request for its client with a ``failed`` response, ``node_lost``; one whose link to
  NATS drops ends it with ``relay_lost`` (what was in flight may be lost, and the client would
  not know). An owner whose receiver node goes silent, or whose own link drops, detaches the
  request: it stays resumable for its grace.

A relayed chunk is encoded once, by the owner, in the client's codec; the receiver decodes it
only to follow the request (its ``seq``, its end) and writes the owner's bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import msgpack
import orjson

import protocol
from protocol import (
    CancelReason,
    CancelResult,
    CancelStatus,
    Chunk,
    Codec,
    Error,
    ErrorCode,
    ErrorInfo,
    Moved,
    Response,
    ResponseStatus,
    ResumeResult,
    ResumeStatus,
    Sender,
    Step,
    Usage,
    UsageReport,
)

from .observability import log
from .outbound import Outbound
from .registry import RequestKey
from .request import Request
from .resume import ResumableRequest, Resumables

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from .cluster import Cluster

__all__ = ["RELAY_WINDOW", "RelayHub", "RelayReceiver", "RelaySender"]

#: Messages an owner sends ahead of the receiver's acknowledgement.
RELAY_WINDOW = 128

_pack = msgpack.Packer(use_bin_type=True).pack


#: An envelope's first item: more will come; the relay is over; the owner lost the relay (its
#: link to NATS dropped: what it sent meanwhile may be lost), resume again.
MORE, DONE, LOST = 0, 1, 2


def _envelope(state: int, parts: list[bytes]) -> bytes:
    return _pack([state, *parts])


def _lost_response(request_id: str, code: str, message: str) -> Response:
    """What a receiver ends a relayed request with when it can no longer get its end."""
    return Response(
        request_id=request_id,
        status=ResponseStatus.FAILED,
        usage=Usage(final=True, estimated=("input_tokens", "output_tokens")),
        error=ErrorInfo(code=code, message=message),
    )


class RelayHub:
    """The relays of one node: the requests it runs for clients on other nodes (senders) and
    the requests of its clients that run on other nodes (receivers)."""

    def __init__(
        self,
        cluster: Cluster,
        resumables: Resumables,
        *,
        max_senders: int = 10_000,
        window: int = RELAY_WINDOW,
        rejoin_timeout: float = 10.0,
        stall_timeout: float = 40.0,
    ) -> None:
        self.cluster = cluster
        #: How long an owner waits for a receiver's acknowledgement (its window full) before it
        #: takes the receiver for gone: longer than a connection's slow-consumer timeout, so
        #: that the receiver's own watchdog, which knows its client, decides first.
        self.stall_timeout = stall_timeout
        self.resumables = resumables
        self.max_senders = max_senders
        self.window = window
        #: How long a receiver whose link to NATS dropped waits for it before it gives up.
        self.rejoin_timeout = rejoin_timeout
        self.senders: set[RelaySender] = set()
        self.receivers: set[RelayReceiver] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Requests this node relayed to another node's client (a figure for metrics).
        self.relayed = 0
        cluster.on_resume = self.answer_resume
        cluster.watch_link(self._link_lost)

    # -- the owner's side --------------------------------------------------------------------

    async def answer_resume(self, key: RequestKey, body: dict[str, Any]) -> dict[str, Any]:
        """Another node's client resumes ``key``: relay it there if this node has it (same
        user, id and epoch), else ``not_found`` (G9: every miss alike)."""
        node = self.cluster.node_id
        miss = {"node": node, "status": "not_found"}
        if not _well_formed(body) or self._find(key, body["epoch"]) is None:
            return miss
        epoch: str = body["epoch"]
        if len(self.senders) >= self.max_senders:
            return {"node": node, "status": "error", "code": ErrorCode.UNAVAILABLE.value,
                    "message": "this node relays too many requests"}  # fmt: skip
        request = self._find(key, epoch)
        assert request is not None
        refusal = _refusal(request, body)
        if refusal is not None:
            return {"node": node, **refusal}
        sender = RelaySender(self, key, Codec(body["codec"]), body, self.window)
        sender.take(request, body.get("after_seq"))
        self.relayed += 1
        return {"node": node, "status": "resumed", "running": not request.finished,
                "address": self.cluster.address}  # fmt: skip

    def _find(self, key: RequestKey, epoch: str) -> Request | None:
        entry = self.resumables.find(key, epoch)
        request = entry.request if entry is not None else None
        return request if isinstance(request, Request) else None

    def detached_finished(self, request: Request) -> None:
        self.resumables.ended(request)

    def _link_lost(self) -> None:
        """This node's link to NATS dropped: every relay is broken both ways."""
        for sender in list(self.senders):
            sender.lost("nats link lost", tell=True)
        for receiver in list(self.receivers):
            receiver.link_lost()

    def spawn(self, message: Coroutine[Any, Any, None]) -> None:
        """A message to another node, sent in the background (kept referenced until sent)."""
        task = asyncio.get_running_loop().create_task(message)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the client's side -------------------------------------------------------------------

    def receiver(
        self,
        key: RequestKey,
        outbound: Outbound,
        *,
        epoch: str,
        after_seq: int | None,
        room: bool,
        on_end: Callable[[RelayReceiver], None],
        cancel_elsewhere: Callable[[RequestKey, int], None],
        traceparent: str | None = None,
    ) -> RelayReceiver:
        receiver = RelayReceiver(
            self, key, outbound, epoch=epoch, after_seq=after_seq, room=room, on_end=on_end,
            cancel_elsewhere=cancel_elsewhere, traceparent=traceparent,
        )  # fmt: skip
        self.receivers.add(receiver)
        return receiver

    async def close(self, grace: float) -> None:
        """Shutdown: senders get their last messages out (the requests were cancelled with
        reason ``shutdown``), for at most ``grace`` seconds; then every relay ends."""
        pumps = [s.pump for s in self.senders if s.pump is not None]
        if pumps:
            await asyncio.wait(pumps, timeout=grace)
        for sender in list(self.senders):
            await sender.close()
        for receiver in list(self.receivers):
            receiver.close()
        if self._tasks:  # the last messages to other nodes
            await asyncio.wait(self._tasks, timeout=grace)


_TOKEN = re.compile(r"[0-9a-f]{24}")
_ADDRESS = re.compile(r"muxgate\.[A-Za-z0-9_-]+\.node\.[0-9a-f]{16}")


def _well_formed(body: dict[str, Any]) -> bool:
    """A resume question as :class:`RelayReceiver` asks it (the token names NATS subjects: no
    wildcard or separator may slip in)."""
    after = body.get("after_seq")
    return (
        isinstance(body.get("epoch"), str)
        and isinstance(body.get("node"), str)
        and isinstance(body.get("token"), str)
        and _TOKEN.fullmatch(body["token"]) is not None
        and isinstance(body.get("address"), str)
        and _ADDRESS.fullmatch(body["address"]) is not None
        and body.get("codec") in _CODECS
        and (after is None or (isinstance(after, int) and after >= 0))
    )


_CODECS = frozenset(codec.value for codec in Codec)


def _refusal(request: Request, body: dict[str, Any]) -> dict[str, Any] | None:
    """Why a found request cannot be resumed there (an ``error`` for the client), or None."""
    after = body.get("after_seq")
    if after is not None and after >= request.stream.machine.next_seq:
        return {"status": "error", "code": ErrorCode.INVALID_FIELD.value,
                "message": "after_seq is beyond the last chunk sent"}  # fmt: skip
    if not request.finished and not body.get("room", False):
        return {"status": "error", "code": ErrorCode.TOO_MANY_STREAMS.value,
                "message": "the resuming connection is at its stream limit"}  # fmt: skip
    return None


class RelaySender:
    """On the owner: one relayed request's output, published to the receiver's subject.
    Implements :class:`gateway.resume.ResumeOwner`."""

    def __init__(
        self, hub: RelayHub, key: RequestKey, codec: Codec, asked: dict[str, Any], window: int
    ) -> None:
        self.hub = hub
        self.key = key
        self.peer: str = asked["node"]
        self.window = window
        token = asked["token"]
        self._out = f"{asked['address']}.out.{token}"
        self._route = f"in.{token}"
        hub.senders.add(self)
        hub.cluster.route(self._route, self._heard)  # before the receiver can send a cancel
        self.outbound = Outbound(
            self._send, codec, write=self._write, writable=self._writable, max_batch_bytes=0
        )
        self.request: Request | None = None
        self._buffer: list[bytes] = []
        self._sent = 0
        self._acked = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        #: Nothing more will be queued for the receiver: the pump ends after a ``done``.
        self._ending = False
        self.closed = False
        self._closed = asyncio.Event()
        self.pump: asyncio.Task[None] | None = None
        self._unwatch: Callable[[], None] | None = None

    def take(self, request: Request, after_seq: int | None) -> None:
        """Move ``request`` here (as :meth:`Multiplexer.resume` does for a local connection):
        ``resume_result`` first, then the replay and the live output."""
        hub = self.hub
        entry = hub.resumables.entry_of(request)
        owner = entry.owner if entry is not None else None
        moving = owner is not None and not request.stream.closed
        self.request = request
        self.outbound.send_control(
            ResumeResult(request_id=self.key.request_id, status=ResumeStatus.RESUMED)
        )
        request.reattach(self.outbound, -1 if after_seq is None else after_seq)
        if owner is not None:
            owner.release(request, moved=moving)
        request.set_on_finished(self._finished)
        hub.resumables.attached_to(request, self, moved=moving)
        if request.finished:
            self._ending = True
        self._unwatch = hub.cluster.watch_peer(
            self.peer, lambda: self.lost("receiver node lost", tell=True)
        )
        self.pump = asyncio.get_running_loop().create_task(
            self._run(), name=f"muxgate-relay-{self.key.request_id}"
        )
        self._wake.set()
        log.info("relay.started", request_id=self.key.request_id, user_id=self.key.user_id,
                 peer=self.peer)  # fmt: skip

    # -- ResumeOwner -------------------------------------------------------------------------

    def release(self, request: Request, *, moved: bool) -> None:
        """Resumed on another connection: the receiver's client is told (``moved``)."""
        if self.request is not request:
            return
        if moved:
            self.outbound.send_control(Moved(request_id=request.key.request_id))
        self._end()

    def forget(self, request: ResumableRequest) -> None:
        if self.request is request:
            self._end()

    # -- the outbound's socket ---------------------------------------------------------------

    def _writable(self) -> bool:
        return self._sent - self._acked < self.window

    def _write(self, message: bytes) -> None:
        self._buffer.append(message)
        self._sent += 1
        self._wake.set()

    async def _send(self, message: bytes) -> None:
        try:
            async with asyncio.timeout(self.hub.stall_timeout):
                while not self._writable() and not self.closed:
                    self._room.clear()
                    await self._room.wait()
        except TimeoutError:  # acknowledgements stopped (a lost message, a receiver gone)
            self.lost("no acknowledgement", tell=True)
            return
        self._write(message)

    async def _run(self) -> None:
        """Publish what the outbound wrote, in order; a ``done`` envelope last."""
        nc = self.hub.cluster.client
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._buffer:
                    parts, self._buffer = self._buffer, []
                    await nc.publish(self._out, _envelope(MORE, parts))
                if self._ending and not self._buffer:
                    await self.outbound.flushed()  # its last messages, written here
                    if self._buffer:
                        self._wake.set()
                        continue
                    await nc.publish(self._out, _envelope(DONE, []))
                    return
        except Exception as exc:  # NATS gone: the receiver will know by itself
            log.warning("relay.publish_failed", request_id=self.key.request_id,
                        detail=str(exc)[:200])  # fmt: skip
            self._detach()
        finally:
            await self.close()

    # -- the receiver's messages -------------------------------------------------------------

    def _heard(self, msg: Msg) -> None:
        try:
            body = orjson.loads(msg.data)
            op = body.get("op")
        except (orjson.JSONDecodeError, AttributeError):
            return
        if op == "ack":
            acked = body.get("n")
            if isinstance(acked, int) and acked > self._acked:
                self._acked = min(acked, self._sent)
                self._room.set()
        elif op == "cancel":
            self._cancel()
        elif op == "detach":
            self._detach()
            self.hub.spawn(self.close())

    def _cancel(self) -> None:
        """The receiver's client cancels: decided here, as the node's registry decides any
        cancel of its requests (also when the request moved on meanwhile: a Stop is a Stop);
        the answer goes after anything already queued for the receiver (G1)."""
        handler = self.hub.cluster.on_cancel
        status = handler(self.key, CancelReason.CLIENT) if handler else CancelStatus.NOT_FOUND
        self.outbound.answer_cancel(self.key.request_id, status)
        log.info("relay.cancel", request_id=self.key.request_id, status=status.value)

    # -- the end -----------------------------------------------------------------------------

    def _finished(self, request: Request) -> None:
        self.hub.resumables.ended(request)
        if self.request is request:
            self._end()

    def _end(self) -> None:
        """Nothing more will be queued: the pump sends what is left, then ``done``."""
        self.request = None
        self._ending = True
        self._wake.set()

    def lost(self, why: str, *, tell: bool = False) -> None:
        """The relay is broken: the request goes on detached (its grace). ``tell``: the
        receiver may still be there (this node's link dropped, or acknowledgements stopped):
        it is told, once the link is back, to resume the request again."""
        if self.closed:
            return
        log.info("relay.lost", request_id=self.key.request_id, peer=self.peer, detail=why)
        self._detach()
        self.hub.spawn(self.close())
        if tell:
            self.hub.spawn(self._tell_lost())

    async def _tell_lost(self) -> None:
        cluster = self.hub.cluster
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.hub.rejoin_timeout):
                await cluster.wait_connected(True)
                await cluster.client.publish(self._out, _envelope(LOST, []))

    def _detach(self) -> None:
        """As :meth:`Multiplexer.detach` for one request: its output into the void, its
        grace started (or cancelled like any other when too many are detached)."""
        request, self.request = self.request, None
        if request is None:
            return
        resumables = self.hub.resumables
        if request.finished and request.stream.closed:
            return  # all of it was sent: resumable from its record alone
        if not request.finished and not resumables.may_detach():
            request.cancel(CancelReason.DISCONNECT)
            return
        request.set_on_finished(self.hub.detached_finished)
        request.detach(Outbound.void(self.outbound.codec))
        resumables.detached_from(request)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._closed.set()
        self._room.set()
        self.outbound.close()
        self.hub.senders.discard(self)
        # (The watch holds this object's bound method: dropped with it, no reference cycle.)
        unwatch, self._unwatch = self._unwatch, None
        if unwatch is not None:
            unwatch()
        pump = self.pump
        if pump is not None and pump is not asyncio.current_task():
            pump.cancel()
        self.hub.cluster.unroute(self._route)


class RelayReceiver:
    """On the client's node: one resumed request of this connection that runs on another node.
    Writes what the owner sends; sends the client's cancels and its departure back.

    When this node's link to NATS drops, what was in flight may be lost: once the link is back
    (within ``hub.rejoin_timeout``), the receiver resumes the request again from the last chunk
    it wrote, and drops what its client already has (a chunk it wrote, the ``resume_result``, a
    response or usage report it wrote): the client sees one stream."""

    def __init__(
        self,
        hub: RelayHub,
        key: RequestKey,
        outbound: Outbound,
        *,
        epoch: str,
        after_seq: int | None,
        room: bool,
        on_end: Callable[[RelayReceiver], None],
        cancel_elsewhere: Callable[[RequestKey, int], None],
        traceparent: str | None = None,
    ) -> None:
        self.hub = hub
        self.key = key
        #: The resuming connection's trace (its handshake's ``traceparent``): the question to
        #: the other nodes, and the owner's answer, are spans of it.
        self.traceparent = traceparent
        self.outbound = outbound
        self.codec = outbound.codec
        self.epoch = epoch
        self.room = room
        self._on_end = on_end
        self._cancel_elsewhere = cancel_elsewhere
        self._in = ""
        #: The owner accepted (its ``resume_result`` may still be on its way).
        self.open = False
        self.ended = False
        #: What the client has. The last chunk received in order (written, or held back
        #: after a cancel) and the last one written: a relay that breaks is resumed again
        #: after the latter.
        self.last_seq = after_seq
        self.written_seq = after_seq
        #: ... and whether it has the ``resume_result``, the response, the usage report.
        self._resumed = False
        self.terminal = False
        self._usage = False
        #: Running on the owner when resumed, and not ended since: counts as a stream here.
        self.running = True
        self.owner: str | None = None
        #: Cancels read and not answered yet (each gets one ``cancel_result``).
        self.unanswered = 0
        #: After a cancel was read: the request's chunks held back until its end is known
        #: (acknowledged only then, so at most a window of them).
        self._held: list[bytes] | None = None
        #: Messages of the current relay written to the client (or dropped): the ack.
        self._written = 0
        self._wrote = asyncio.Event()
        #: The current relay's envelopes (None: the link dropped).
        self._inbox: asyncio.Queue[bytes | None] | None = None
        self.task: asyncio.Task[None] | None = None
        self._unwatch: Callable[[], None] | None = None

    @property
    def counts(self) -> bool:
        """Whether it counts against the connection's ``max_streams``."""
        return not self.ended and self.running and not self.terminal

    def start(self) -> asyncio.Task[None]:
        self.task = asyncio.get_running_loop().create_task(
            self._run(), name=f"muxgate-relay-in-{self.key.request_id}"
        )
        return self.task

    async def _run(self) -> None:
        cluster = self.hub.cluster
        try:
            while await self._relay():  # the link dropped: again once it is back
                self.open = False
                try:
                    async with asyncio.timeout(self.hub.rejoin_timeout):
                        await cluster.wait_connected(True)
                        # ... and the owner's too: a heartbeat it sent since proves its
                        # subscriptions are back (a question sent before would be lost).
                        if self.owner is not None:
                            await cluster.next_beats({self.owner})
                except TimeoutError:
                    self.fail("relay_lost", "the link between the gateway's nodes was lost")
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a broken envelope, say: the stream cannot go on
            log.warning("relay.receive_failed", request_id=self.key.request_id,
                        detail=str(exc)[:200])  # fmt: skip
            self.fail("relay_lost", "the link between the gateway's nodes was lost")

    async def _relay(self) -> bool:
        """One relay from the owner, until it is done (False) or the link drops (True)."""
        cluster = self.hub.cluster
        rid = self.key.request_id
        again = self._resumed
        token = secrets.token_hex(12)
        self._in = ""
        self._written = 0
        inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._inbox = inbox

        def received(msg: Msg) -> None:
            inbox.put_nowait(msg.data)  # bounded by the owner's window

        route = f"out.{token}"
        cluster.route(route, received)
        try:
            with cluster.tracing.span(
                "muxgate.resume", traceparent=self.traceparent, **{"muxgate.request_id": rid}
            ) as span:
                answer = await cluster.resume(
                    self.key,
                    {"epoch": self.epoch, "after_seq": self.written_seq,
                     "codec": self.codec.value, "token": token, "node": cluster.node_id,
                     "address": cluster.address, "room": self.room or again},
                )  # fmt: skip
                span.set("muxgate.resume_status", answer["status"] if answer else "unasked")
            if answer is None and again:
                return True
            if answer is None or answer["status"] == "not_found":
                lost = None
                if answer is not None:  # its node may have died with it
                    lost = await cluster.lost_owner(self.key, answer["heard"])
                if lost is not None:
                    self.fail("node_lost", f"the node that ran it ({lost}) is gone")
                elif again:
                    self.fail("relay_lost", "the request is no longer resumable")
                else:
                    self._answer_miss()
                return False
            if answer["status"] != "resumed":
                if again:
                    self.fail("relay_lost", "the request could not be resumed again")
                else:
                    code = ErrorCode(answer.get("code", ErrorCode.UNAVAILABLE.value))
                    message = str(answer.get("message", ""))
                    self.outbound.send_control(Error(code=code, message=message, request_id=rid))
                    self._end()
                return False
            self._in = f"{answer['address']}.in.{token}"
            self.open = True
            if self.owner is None:
                self.owner = owner = str(answer["node"])
                self.running = bool(answer.get("running", True))
                self._unwatch = cluster.watch_peer(
                    owner,
                    lambda: self.fail("node_lost", f"the node that ran it ({owner}) is gone"),
                )
            for _ in range(self.unanswered):  # read before the owner took it (or lost)
                await self._tell({"op": "cancel"})
            while (data := await inbox.get()) is not None:
                state, *parts = msgpack.unpackb(data)
                if parts and not await self._forward(parts):
                    # A gap: an envelope was lost on the way. Resumed again from the last
                    # chunk written; the owner detaches the request meanwhile.
                    log.warning("relay.gap", request_id=rid, after_seq=self.written_seq)
                    await self._tell({"op": "detach"})
                    break
                if state == DONE:
                    self._end()
                    return False
                if state == LOST:
                    break
            if self._held:  # not written: they come again with the next relay
                self._held = []
            self.last_seq = self.written_seq
            return True
        finally:
            self._inbox = None
            cluster.unroute(route)

    def link_lost(self) -> None:
        """This node's link to NATS dropped: the current relay is over."""
        if self._inbox is not None:
            self._inbox.put_nowait(None)

    def _answer_miss(self) -> None:
        rid = self.key.request_id
        self.outbound.send_control(ResumeResult(request_id=rid, status=ResumeStatus.NOT_FOUND))
        self._end()

    async def _forward(self, parts: list[bytes]) -> bool:
        """Write the owner's messages (a cancel read meanwhile holds chunks back, G2; what the
        client has is dropped); ack them once written, so the owner sends on. False: a chunk
        is missing before one of them (what came before it is written)."""
        out: list[bytes] = []
        consumed = 0
        whole = True
        for part in parts:
            message = protocol.decode_one(part, self.codec, Sender.GATEWAY)
            held = self._held
            if isinstance(message, Chunk | Step):
                if isinstance(message, Chunk):
                    last = -1 if self.last_seq is None else self.last_seq
                    if message.seq <= last:
                        consumed += 1  # the client has it (a second relay's replay)
                        continue
                    if message.seq != last + 1:
                        whole = False
                        break
                    self.last_seq = message.seq
                if held is not None:
                    held.append(part)
                    continue
                self.written_seq = self.last_seq
            elif isinstance(message, ResumeResult):
                if self._resumed:  # the client has one
                    consumed += 1
                    continue
                self._resumed = True
            elif isinstance(message, Response):
                if self.terminal:
                    consumed += 1
                    continue
                self.terminal = True
                if held is not None:
                    if message.status is not ResponseStatus.CANCELLED:
                        out.extend(held)  # it completed (or failed) first: all of it
                        self.written_seq = self.last_seq
                    consumed += len(held)
                    self._held = None
            elif isinstance(message, UsageReport):
                if self._usage:
                    consumed += 1
                    continue
                self._usage = True
            elif isinstance(message, CancelResult):
                self.unanswered = max(0, self.unanswered - 1)
            elif isinstance(message, Moved):
                self.running = False
            consumed += 1
            out.append(part)
        if out:
            self._wrote.clear()
            self.outbound.send_control(*out, on_sent=self._wrote.set)
            await self._wrote.wait()  # on the client's socket (or the relay closed)
        self._written += consumed
        if whole:
            await self._tell({"op": "ack", "n": self._written})
        return whole

    async def _tell(self, body: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            await self.hub.cluster.client.publish(self._in, orjson.dumps(body))

    # -- from the connection ----------------------------------------------------------------

    def cancel(self) -> None:
        """The client cancels: the owner decides; chunks arriving meanwhile are held back."""
        self.unanswered += 1
        if not self.terminal and self._held is None:
            self._held = []
        if self.open:  # else sent once the owner has taken the request
            self.hub.spawn(self._tell({"op": "cancel"}))

    def detach(self) -> None:
        """The client's connection closed: the owner detaches the request (its grace)."""
        if self.ended:
            return
        if self.open:
            self.hub.spawn(self._tell({"op": "detach"}))
        self.close()

    def fail(self, code: str, message: str) -> None:
        """The owner cannot be reached: the client gets an end (unless it has one)."""
        if self.ended:
            return
        rid = self.key.request_id
        log.info("relay.failed", request_id=rid, owner=self.owner, code=code)
        if not self._resumed:
            self.outbound.send_control(ResumeResult(request_id=rid, status=ResumeStatus.RESUMED))
            self._resumed = True
        if not self.terminal:
            self.outbound.send_control(_lost_response(rid, code, message))
            self.terminal = True
        for _ in range(self.unanswered):  # a failed request: the cancels came too late
            self.outbound.send_control(
                CancelResult(request_id=rid, status=CancelStatus.ALREADY_COMPLETED)
            )
        self.unanswered = 0
        if self.open:
            self.hub.spawn(self._tell({"op": "detach"}))
        self.close()

    def _end(self) -> None:
        """The relay is over. Cancels the owner did not answer through it (sent as it moved
        on) are asked of the cluster."""
        if self.ended:
            return
        pending, self.unanswered = self.unanswered, 0
        self.close()
        if pending:
            self._cancel_elsewhere(self.key, pending)

    def close(self) -> None:
        if self.ended:
            return
        self.ended = True
        self._wrote.set()
        self.hub.receivers.discard(self)
        # (The watch holds this object's bound method: dropped with it, no reference cycle.)
        unwatch, self._unwatch = self._unwatch, None
        if unwatch is not None:
            unwatch()
        self._on_end(self)
        task = self.task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
