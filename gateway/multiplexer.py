"""Which request a message belongs to: dispatch of one connection's decoded messages.

The connection (I/O) hands every valid message here; the multiplexer resolves the user, enforces
the per-connection stream limit and id rules, starts requests, routes cancels through the
registry, and answers pings. Every refusal is an ``error`` message naming the request, and
touches no other request (G6).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from protocol import (
    Cancel,
    CancelReason,
    CancelStatus,
    Chat,
    ChatMessage,
    ClientMessage,
    Error,
    ErrorCode,
    Hello,
    Moved,
    Ping,
    Pong,
    Resumable,
    Resume,
    ResumeResult,
    ResumeStatus,
    Role,
)

from .auth import AuthError, Principal
from .observability import GatewayObserver
from .outbound import Outbound
from .pipeline import Backend
from .registry import RequestKey, RequestRegistry
from .relay import RelayHub, RelayReceiver
from .request import Request
from .resume import ResumableRequest, Resumables
from .tracing import NO_TRACING, Tracing

__all__ = ["Multiplexer", "MultiplexerServices"]


@dataclass(frozen=True, slots=True)
class MultiplexerServices:
    """What the multiplexer uses of the gateway, and nothing else: one bundle per gateway,
    shared by its connections."""

    backend: Backend
    registry: RequestRegistry
    observer: GatewayObserver
    #: Keep a pipeline task referenced until it ends (shutdown awaits them).
    track: Callable[[asyncio.Future[Any]], None]
    #: Whether the gateway is shutting down (new chats are refused with ``unavailable``).
    draining: Callable[[], bool]
    max_streams: int
    max_timeout_ms: int
    max_content_chars: int
    #: Resumable requests of the gateway (SPEC.md §5.8).
    resumables: Resumables
    #: Traces (gateway/tracing.py; off: the no-op NO_TRACING).
    tracing: Tracing = NO_TRACING
    #: In a cluster: resumes of requests that run on another node (gateway/relay.py).
    relays: RelayHub | None = None


class Multiplexer:
    """The requests of one connection."""

    def __init__(
        self,
        services: MultiplexerServices,
        outbound: Outbound,
        principal: Principal,
        *,
        traceparent: str | None = None,
    ) -> None:
        self.services = services
        #: The handshake's W3C ``traceparent`` (tracing on only): the parent of this
        #: connection's request spans unless a chat names its own (``metadata.traceparent``).
        self.traceparent = traceparent
        self.outbound = outbound
        self.principal = principal
        #: Requests whose pipeline still runs (counted against ``max_streams``).
        self.requests: set[Request] = set()
        #: Resumable requests attached here whose output may still be unwritten: detached,
        #: not cancelled, when the connection closes (SPEC.md §5.8).
        self.resumable: set[Request] = set()
        #: Requests resumed here that run on another node (a cluster), by id.
        self.relays: dict[str, RelayReceiver] = {}

    def error(self, code: ErrorCode, message: str, request_id: str | None = None) -> None:
        self.services.observer.errors.labels(code.value).inc()
        self.outbound.send_control(Error(code=code, message=message, request_id=request_id))

    def dispatch(self, message: ClientMessage) -> None:
        """Act on one message, synchronously: a chat's pipeline is started, a cancel decided
        (the cancelled response is queued before this returns)."""
        if isinstance(message, Chat):
            self.chat(message)
        elif isinstance(message, Cancel):
            self.cancel(message)
        elif isinstance(message, Resume):
            self.resume(message)
        elif isinstance(message, Ping):
            self.outbound.send_control(Pong(id=message.id))
        elif isinstance(message, Hello):
            self.error(ErrorCode.PROTOCOL_VIOLATION, "hello is only allowed as the first message")

    def chat(self, chat: Chat) -> None:
        rid = chat.request_id
        services = self.services
        if services.draining():
            self.error(ErrorCode.UNAVAILABLE, "the gateway is shutting down", rid)
            return
        try:
            user = self.principal.user_for(chat.user_id)
        except AuthError as exc:
            self.error(exc.code, exc.message, rid)
            return
        if self._full():
            self.error(
                ErrorCode.TOO_MANY_STREAMS,
                f"at most {services.max_streams} concurrent requests per connection",
                rid,
            )
            return
        if rid in self.outbound.streams or rid in self.relays:
            self.error(ErrorCode.DUPLICATE_REQUEST_ID, "request_id is active", rid)
            return
        timeout_ms = min(chat.timeout_ms or services.max_timeout_ms, services.max_timeout_ms)
        messages = chat.messages or (ChatMessage(role=Role.USER, content=chat.message or ""),)
        key = RequestKey(user, rid)
        metadata = chat.metadata or {}
        traceparent = self.traceparent
        if services.tracing.enabled:
            own = metadata.get("traceparent")
            if isinstance(own, str) and own:
                traceparent = own
        request = Request(
            key=key,
            stream=chat.stream,
            messages=messages,
            metadata=metadata,
            outbound=self.outbound,
            backend=services.backend,
            registry=services.registry,
            observer=services.observer,
            timeout=timeout_ms / 1000,
            max_content_chars=services.max_content_chars,
            steps=chat.steps,
            resumable=chat.resumable,
            on_finished=self._request_finished,
            tracing=services.tracing,
            traceparent=traceparent,
        )
        if services.registry.is_active(key):
            self.error(ErrorCode.DUPLICATE_REQUEST_ID, "request_id is active", rid)
            return
        if chat.resumable:  # its first message, before any chunk or response (SPEC.md §5.8)
            grace = services.resumables.grace_for(chat.grace_ms)
            entry = services.resumables.register(request, grace, self)
            ack = Resumable(request_id=rid, epoch=entry.epoch, grace_ms=max(1, round(grace * 1000)))
            request.stream.machine.on_resumable(ack)
            self.outbound.send_control(ack)
            self.resumable.add(request)
        tombstone = services.registry.take_tombstone(key)
        if tombstone is not None:  # a cancel came first (SPEC.md §5.3): never starts
            self.requests.add(request)
            request.start_cancelled(tombstone)
            return
        task = request.start()
        self.requests.add(request)
        services.track(task)
        # Also when the task ends: one cancelled before its first step never finishes itself.
        task.add_done_callback(partial(self._finished, request))

    def _full(self) -> bool:
        """Whether the connection runs ``max_streams`` requests (relayed ones included)."""
        running = len(self.requests)
        if self.relays:
            running += sum(1 for relay in self.relays.values() if relay.counts)
        return running >= self.services.max_streams

    def _finished(self, request: Request, _task: object) -> None:
        self.requests.discard(request)

    def _request_finished(self, request: Request) -> None:
        self.requests.discard(request)
        if request.stream.machine.resumable:
            self.services.resumables.ended(request)

    def cancel(self, cancel: Cancel) -> None:
        """Decide a cancel now (this process's registry). The cancelled response is written
        before this returns (Request.cancel); the result goes with the next write."""
        key = self._cancel_key(cancel)
        if key is None:
            return
        relay = self.relays.get(key.request_id)
        if relay is not None and relay.key == key:  # runs on another node: its owner decides
            relay.cancel()
            return
        registry = self.services.registry
        status = registry.cancel_now(key, CancelReason.CLIENT)
        if status is not None:
            self._cancel_result(key.request_id, status)
            return
        # Another node may run it (a cluster): asked without holding up this connection.
        task = asyncio.ensure_future(self._cancel_elsewhere(key))
        self.services.track(task)

    async def _cancel_elsewhere(self, key: RequestKey) -> None:
        with self.services.tracing.span(
            "muxgate.cancel", traceparent=self.traceparent, **{"muxgate.request_id": key.request_id}
        ) as span:
            status = await self.services.registry.cancel(key, CancelReason.CLIENT)
            span.set("muxgate.cancel_status", status.value)
        self._cancel_result(key.request_id, status)

    def _cancel_key(self, cancel: Cancel) -> RequestKey | None:
        """The key a cancel names for this connection's principal (None: refused, error sent)."""
        try:
            user = self.principal.user_for(cancel.user_id)
        except AuthError as exc:
            self.error(exc.code, exc.message, cancel.request_id)
            return None
        return RequestKey(user, cancel.request_id)

    def _cancel_result(self, rid: str, status: CancelStatus) -> None:
        self.outbound.answer_cancel(rid, status)

    # -- resume (SPEC.md §5.8) ---------------------------------------------------------------

    def resume(self, resume: Resume) -> None:
        """Continue a resumable request here: answered ``resume_result`` (then the stream), or
        ``error`` for a resume this connection cannot take."""
        rid = resume.request_id
        services = self.services
        try:
            user = self.principal.user_for(resume.user_id)
        except AuthError as exc:
            self.error(exc.code, exc.message, rid)
            return
        key = RequestKey(user, rid)
        entry = services.resumables.find(key, resume.epoch)
        request = entry.request if entry is not None else None
        if rid in self.relays:
            self.error(ErrorCode.DUPLICATE_REQUEST_ID, "request_id is active here", rid)
            return
        if not isinstance(request, Request):  # unknown, another user's, another epoch: alike
            if services.relays is not None and rid not in self.outbound.streams:
                if len(self.relays) >= services.max_streams:  # (each asks every node: bounded)
                    self.error(
                        ErrorCode.TOO_MANY_STREAMS,
                        f"at most {services.max_streams} requests resumed from other nodes",
                        rid,
                    )
                    return
                self._resume_elsewhere(key, resume)  # perhaps another node's (a cluster)
                return
            self.outbound.send_control(ResumeResult(request_id=rid, status=ResumeStatus.NOT_FOUND))
            return
        assert entry is not None
        if rid in self.outbound.streams or request in self.requests:
            self.error(ErrorCode.DUPLICATE_REQUEST_ID, "request_id is active here", rid)
            return
        after = -1 if resume.after_seq is None else resume.after_seq
        if after >= request.stream.machine.next_seq:
            self.error(ErrorCode.INVALID_FIELD, "after_seq is beyond the last chunk sent", rid)
            return
        running = not request.finished
        if running and self._full():
            self.error(
                ErrorCode.TOO_MANY_STREAMS,
                f"at most {services.max_streams} concurrent requests per connection",
                rid,
            )
            return
        owner = entry.owner
        moving = owner is not None and not request.stream.closed
        self.outbound.send_control(ResumeResult(request_id=rid, status=ResumeStatus.RESUMED))
        request.reattach(self.outbound, after)
        if owner is not None:
            owner.release(request, moved=moving)
        request.set_on_finished(self._request_finished)
        if running:
            self.requests.add(request)
        self.resumable.add(request)
        services.resumables.attached_to(request, self, moved=moving)

    def _resume_elsewhere(self, key: RequestKey, resume: Resume) -> None:
        """Ask the other nodes for the request (SPEC.md §5.8 across nodes, gateway/relay.py):
        its owner relays it here, or every node misses (``not_found``). The id is taken on
        this connection meanwhile."""
        hub = self.services.relays
        assert hub is not None
        receiver = hub.receiver(
            key,
            self.outbound,
            epoch=resume.epoch,
            after_seq=resume.after_seq,
            room=not self._full(),
            on_end=self._relay_ended,
            cancel_elsewhere=self._cancels_elsewhere,
            traceparent=self.traceparent,
        )
        self.relays[key.request_id] = receiver
        self.services.track(receiver.start())

    def _relay_ended(self, receiver: RelayReceiver) -> None:
        if self.relays.get(receiver.key.request_id) is receiver:
            del self.relays[receiver.key.request_id]

    def _cancels_elsewhere(self, key: RequestKey, count: int) -> None:
        """Cancels a relay ended without answering: asked of the cluster, one answer each."""
        for _ in range(count):
            self.services.track(asyncio.ensure_future(self._cancel_elsewhere(key)))

    def forget(self, request: ResumableRequest) -> None:
        """No longer resumable (its grace after the end ran out): nothing kept for it here."""
        if isinstance(request, Request):
            self.resumable.discard(request)

    def release(self, request: Request, *, moved: bool) -> None:
        """``request`` was resumed on another connection: it no longer counts here, and (when
        this connection still expected more of it) the client is told."""
        self.requests.discard(request)
        self.resumable.discard(request)
        if moved:
            self.outbound.send_control(Moved(request_id=request.key.request_id))

    def detach(self) -> None:
        """The connection is closing: its resumable requests with output still to come go on
        detached (SPEC.md §5.8) rather than being cancelled by :meth:`disconnect`. Before the
        outbound closes, which would drop their pending text."""
        resumables = self.services.resumables
        for request in list(self.resumable):
            self.resumable.discard(request)
            if request.finished and request.stream.closed:
                continue  # all of it was written here: resumable from its record alone
            if not request.finished and not resumables.may_detach():
                continue  # too many detached at once: cancelled like any other (G7)
            self.requests.discard(request)
            request.set_on_finished(self._detached_finished)
            request.detach(Outbound.void(self.outbound.codec))
            resumables.detached_from(request)

    def _detached_finished(self, request: Request) -> None:
        self.services.resumables.ended(request)

    def disconnect(self) -> None:
        """G7: the connection closed; cancel its requests (their pipelines halt on their own).
        Resumable ones were detached first (:meth:`detach`) and are not among them."""
        self.detach()
        for relay in list(self.relays.values()):
            relay.detach()  # its owner detaches it in turn: resumable for its grace
        for request in list(self.requests):
            request.cancel(CancelReason.DISCONNECT)

    async def wait_halted(self) -> None:
        tasks = [r.task for r in self.requests if r.task is not None]
        if tasks:
            await asyncio.wait(tasks)
