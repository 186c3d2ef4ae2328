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
    CancelResult,
    CancelStatus,
    Chat,
    ChatMessage,
    ClientMessage,
    Error,
    ErrorCode,
    Hello,
    Ping,
    Pong,
    Role,
)

from .auth import AuthError, Principal
from .observability import GatewayObserver
from .outbound import Outbound
from .pipeline import Backend
from .registry import DuplicateRequest, RequestKey, RequestRegistry
from .request import Request

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


class Multiplexer:
    """The requests of one connection."""

    def __init__(
        self, services: MultiplexerServices, outbound: Outbound, principal: Principal
    ) -> None:
        self.services = services
        self.outbound = outbound
        self.principal = principal
        #: Requests whose pipeline still runs (counted against ``max_streams``).
        self.requests: set[Request] = set()

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
        if len(self.requests) >= services.max_streams:
            self.error(
                ErrorCode.TOO_MANY_STREAMS,
                f"at most {services.max_streams} concurrent requests per connection",
                rid,
            )
            return
        if rid in self.outbound.streams:
            self.error(ErrorCode.DUPLICATE_REQUEST_ID, "request_id is active", rid)
            return
        timeout_ms = min(chat.timeout_ms or services.max_timeout_ms, services.max_timeout_ms)
        messages = chat.messages or (ChatMessage(role=Role.USER, content=chat.message or ""),)
        request = Request(
            key=RequestKey(user, rid),
            stream=chat.stream,
            messages=messages,
            metadata=chat.metadata or {},
            outbound=self.outbound,
            backend=services.backend,
            registry=services.registry,
            observer=services.observer,
            timeout=timeout_ms / 1000,
            max_content_chars=services.max_content_chars,
            steps=chat.steps,
            on_finished=self.requests.discard,
        )
        try:
            task = request.start()
        except DuplicateRequest:
            self.error(ErrorCode.DUPLICATE_REQUEST_ID, "request_id is active", rid)
            return
        self.requests.add(request)
        services.track(task)
        # Also when the task ends: one cancelled before its first step never finishes itself.
        task.add_done_callback(partial(self._finished, request))

    def _finished(self, request: Request, _task: object) -> None:
        self.requests.discard(request)

    def cancel(self, cancel: Cancel) -> None:
        """Decide a cancel now (this process's registry). The cancelled response is written
        before this returns (Request.cancel); the result goes with the next write."""
        key = self._cancel_key(cancel)
        if key is None:
            return
        status = self.services.registry.cancel_local(key, CancelReason.CLIENT)
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
        result = CancelResult(request_id=rid, status=status)
        stream = self.outbound.streams.get(rid)
        if stream is not None and stream.finishing:
            # Lost the race to completion: the result follows the completed response (G1).
            self.outbound.send_after(stream, result)
        else:
            self.outbound.send_control(result)

    def disconnect(self) -> None:
        """G7: the connection closed; cancel its requests (their pipelines halt on their own)."""
        for request in list(self.requests):
            request.cancel(CancelReason.DISCONNECT)

    async def wait_halted(self) -> None:
        tasks = [r.task for r in self.requests if r.task is not None]
        if tasks:
            await asyncio.wait(tasks)
