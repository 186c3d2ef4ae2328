"""Where requests are found by ``(user, request_id)``: cancel routing and status lookup.

The gateway talks to a :class:`RequestRegistry`, never to another connection directly. The
in-memory registry below serves one process; a broker-backed one (several gateway nodes, where a
cancel may arrive at a node that does not hold the stream) implements the same interface by
forwarding :meth:`RequestRegistry.cancel` to the node that owns the request, which decides the
race locally and atomically (SPEC.md §6 G4). Connection code does not change.

Isolation (SPEC.md §4): every lookup is keyed by the *authenticated* user, so another user's
request is indistinguishable from an unknown one: ``not_found``.

Finished requests are remembered for ``retention_seconds`` and at most ``retention_count``
entries, so a late cancel still answers ``already_completed`` / ``already_cancelled``.

One state machine (SPEC.md §5.1): a request's status lives in the gateway's
:class:`protocol.RequestStateMachine` (its output queue's ``machine``), and every cancel outcome is
that machine's (:data:`protocol.state.CANCEL_OUTCOMES`). A running request decides a cancel
itself (:meth:`LiveRequest.cancel` feeds its machine); a finished one is remembered as a frozen
:class:`RequestRecord` that keeps the machine's final state, which a late cancel is looked up in.
:class:`RequestStatus` is only the vocabulary of ``GET``, derived from the machine
(:meth:`RequestStatus.of`), never assigned.
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from protocol import (
    CancelReason,
    CancelStatus,
    ErrorInfo,
    RequestState,
    RequestStateMachine,
    Usage,
)
from protocol.state import CANCEL_OUTCOMES

__all__ = [
    "DuplicateRequest",
    "InMemoryRegistry",
    "LiveRequest",
    "RequestKey",
    "RequestRecord",
    "RequestRegistry",
    "RequestStatus",
]


@dataclass(frozen=True, slots=True)
class RequestKey:
    #: The authenticated user; "" is the anonymous user, which no ``user_id`` field can name.
    user_id: str
    request_id: str


class RequestStatus(enum.StrEnum):
    """Status words of ``GET /v1/requests/{id}`` (SPEC.md §8.2): the gateway's machine, as the
    HTTP API words it (:meth:`of`). Not a state of its own."""

    ACTIVE = "active"
    CANCELLING = "cancelling"  # cancelled on the wire; the pipeline has not halted yet
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @classmethod
    def of(cls, machine: RequestStateMachine) -> RequestStatus:
        """The word for where ``machine`` (gateway side) stands: its :attr:`decided` state; a
        cancelled request is ``cancelling`` until its final usage went out (the pipeline halted,
        SPEC.md §5.4), i.e. while the machine still expects the ``usage`` report."""
        state = machine.decided
        if state is RequestState.CANCELLED and machine.usage_pending:
            return cls.CANCELLING
        return _WORDS[state]


_WORDS: dict[RequestState, RequestStatus] = {
    RequestState.ACTIVE: RequestStatus.ACTIVE,
    # Only inside Request.cancel, between reading the cancel and queuing the cancelled response.
    RequestState.CANCELLING: RequestStatus.CANCELLING,
    RequestState.COMPLETED: RequestStatus.COMPLETED,
    RequestState.CANCELLED: RequestStatus.CANCELLED,
    RequestState.FAILED: RequestStatus.FAILED,
}


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What ``GET`` reports about a request: a snapshot of it, taken from its machine."""

    request_id: str
    status: RequestStatus
    #: The machine's :attr:`~protocol.RequestStateMachine.decided` state when the snapshot was
    #: taken: what a cancel of a finished request is decided against (not part of the body).
    state: RequestState
    usage: Usage
    reason: CancelReason | None = None
    error: ErrorInfo | None = None
    created_at: float = 0.0  # wall-clock seconds
    finished_at: float | None = None

    @property
    def cancel_outcome(self) -> CancelStatus:
        """What a cancel finding the request as recorded answers (the protocol's table, G4)."""
        return CANCEL_OUTCOMES[self.state]

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"request_id": self.request_id, "status": self.status.value}
        if self.reason is not None:
            body["reason"] = self.reason.value
        if self.error is not None:
            body["error"] = {"code": str(self.error.code), "message": self.error.message}
        usage: dict[str, object] = {
            "input_tokens": self.usage.input_tokens,
            "output_tokens": self.usage.output_tokens,
            "saved_tokens": self.usage.saved_tokens,
            "final": self.usage.final,
        }
        if self.usage.estimated is not None:
            usage["estimated"] = list(self.usage.estimated)
        body["usage"] = usage
        body["created_at"] = self.created_at
        if self.finished_at is not None:
            body["finished_at"] = self.finished_at
        return body


class DuplicateRequest(Exception):
    """The user already has an active request with this id."""


class LiveRequest(Protocol):
    """What the registry needs from a request running on this node."""

    @property
    def key(self) -> RequestKey: ...

    @property
    def serial(self) -> int:
        """Unique per request in this process: tells a reused id's records apart."""
        ...

    def cancel(self, reason: CancelReason) -> CancelStatus:
        """Decide the cancel atomically (no await) and return its outcome: the outcome its state
        machine gives (``on_cancel``)."""
        ...

    def record(self) -> RequestRecord: ...


class RequestRegistry(Protocol):
    """Request lookup and cancel routing. Async where a broker would need the network."""

    def add(self, request: LiveRequest) -> None:
        """Register an active request; raises :class:`DuplicateRequest`."""
        ...

    def finished(self, request: LiveRequest) -> None:
        """The request reached its terminal response, or (called again) its pipeline halted:
        keep its latest record for late cancels and GET. The id is free for reuse."""
        ...

    async def cancel(self, key: RequestKey, reason: CancelReason) -> CancelStatus: ...

    def cancel_local(self, key: RequestKey, reason: CancelReason) -> CancelStatus:
        """:meth:`cancel` decided synchronously, from what this process knows: a cancel is
        decided in the callback that read it (a frame, a DELETE), before another byte is read."""
        ...

    def is_active(self, key: RequestKey) -> bool:
        """Whether the user has an unfinished request with this id (a new chat would be a
        duplicate)."""
        ...

    def cancel_now(self, key: RequestKey, reason: CancelReason) -> CancelStatus | None:
        """The cancel decided synchronously when this process can (it runs or remembers the
        request, or it is alone); None when other nodes must be asked: then ``await
        cancel()``."""
        ...

    def take_tombstone(self, key: RequestKey) -> CancelReason | None:
        """The reason of a cancel that found no request for ``key`` within the tombstone
        window, consumed; None if there is none (SPEC.md §5.3, cancel before start)."""
        ...

    async def lookup(self, key: RequestKey) -> RequestRecord | None: ...

    def active(self) -> list[LiveRequest]: ...

    def __len__(self) -> int:
        """Entries held: active plus retained."""
        ...


class InMemoryRegistry:
    """One process's requests: a dict of active ones and a bounded LRU of finished records."""

    def __init__(
        self,
        *,
        retention_seconds: float = 300.0,
        retention_count: int = 10_000,
        tombstone_seconds: float = 10.0,
        tombstone_count: int = 10_000,
    ) -> None:
        self.retention_seconds = retention_seconds
        self.retention_count = retention_count
        #: Cancels that found no request, by key (SPEC.md §5.3): (monotonic time, reason).
        self.tombstone_seconds = tombstone_seconds
        self.tombstone_count = tombstone_count
        self._tombstones: OrderedDict[RequestKey, tuple[float, CancelReason]] = OrderedDict()
        self._active: dict[RequestKey, LiveRequest] = {}
        # key -> (monotonic time finished, serial of the request, record)
        self._finished: OrderedDict[RequestKey, tuple[float, int, RequestRecord]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._active) + len(self._finished)

    @property
    def retained(self) -> int:
        """Records of finished requests kept (retention, SPEC.md §5.6)."""
        return len(self._finished)

    @property
    def tombstones(self) -> int:
        return len(self._tombstones)

    def add(self, request: LiveRequest) -> None:
        key = request.key
        if key in self._active:
            raise DuplicateRequest(key.request_id)
        # An id may be reused once its request has reached its response (SPEC.md §5.6).
        self._finished.pop(key, None)
        self._active[key] = request

    def finished(self, request: LiveRequest) -> None:
        key = request.key
        if self._active.get(key) is request:
            del self._active[key]
        else:
            entry = self._finished.get(key)
            if entry is None or entry[1] != request.serial:
                return  # the id was reused (or expired) meanwhile: that record is gone
        self._finished[key] = (time.monotonic(), request.serial, request.record())
        self._finished.move_to_end(key)
        self._expire()

    async def cancel(self, key: RequestKey, reason: CancelReason) -> CancelStatus:
        return self.cancel_local(key, reason)

    def cancel_local(self, key: RequestKey, reason: CancelReason) -> CancelStatus:
        """Synchronous cancel for callers on this node's event loop. A cancel that finds
        nothing leaves a tombstone (SPEC.md §5.3, cancel before start)."""
        request = self._active.get(key)
        if request is not None:
            return request.cancel(reason)
        record = self._record(key)
        if record is None:
            self._bury(key, reason)
            return CancelStatus.NOT_FOUND
        return record.cancel_outcome

    def is_active(self, key: RequestKey) -> bool:
        return key in self._active

    def knows(self, key: RequestKey) -> bool:
        """Whether this process runs or remembers the request (a cancel is decided here)."""
        return key in self._active or self._record(key) is not None

    def cancel_now(self, key: RequestKey, reason: CancelReason) -> CancelStatus | None:
        """One process: every cancel is decided here, now."""
        return self.cancel_local(key, reason)

    def record_now(self, key: RequestKey) -> RequestRecord | None:
        request = self._active.get(key)
        if request is not None:
            return request.record()
        return self._record(key)

    def take_tombstone(self, key: RequestKey) -> CancelReason | None:
        """The reason of a cancel that named ``key`` before its chat arrived, within the
        window (consumed: one chat ends cancelled, the next one runs)."""
        tombstones = self._tombstones
        if not tombstones:
            return None
        entry = tombstones.pop(key, None)
        if entry is None:
            return None
        at, reason = entry
        return reason if time.monotonic() - at <= self.tombstone_seconds else None

    def bury(self, key: RequestKey, reason: CancelReason) -> None:
        """Leave a tombstone for ``key`` (a cancel found no request for it)."""
        self._bury(key, reason)

    def _bury(self, key: RequestKey, reason: CancelReason) -> None:
        if self.tombstone_seconds <= 0:
            return
        tombstones = self._tombstones
        tombstones.pop(key, None)  # a second cancel restarts the window
        tombstones[key] = (time.monotonic(), reason)
        while len(tombstones) > self.tombstone_count:
            tombstones.popitem(last=False)
        horizon = time.monotonic() - self.tombstone_seconds
        while tombstones:
            oldest, (at, _) = next(iter(tombstones.items()))
            if at >= horizon:
                break
            del tombstones[oldest]

    async def lookup(self, key: RequestKey) -> RequestRecord | None:
        request = self._active.get(key)
        if request is not None:
            return request.record()
        return self._record(key)

    def active(self) -> list[LiveRequest]:
        return list(self._active.values())

    def _record(self, key: RequestKey) -> RequestRecord | None:
        self._expire()
        entry = self._finished.get(key)
        return entry[2] if entry is not None else None

    def _expire(self) -> None:
        finished = self._finished
        while len(finished) > self.retention_count:
            finished.popitem(last=False)
        horizon = time.monotonic() - self.retention_seconds
        while finished:
            key, (at, _, _) = next(iter(finished.items()))
            if at >= horizon:
                break
            del finished[key]
