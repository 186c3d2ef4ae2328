"""Resumable requests (SPEC.md §5.8): which ones a ``resume`` can find, and for how long.

A chat with ``resumable: true`` gets an *epoch* (its incarnation) and a grace period. When its
connection closes, the connection's multiplexer *detaches* it (its output goes to a connection
of its own that writes nowhere, :meth:`gateway.outbound.Outbound.void`, so chunks keep their
numbers and the response is kept) instead of cancelling it; a ``resume`` from another
connection of the same user moves it there. This module only keeps the book:

- an entry per resumable request, by (user, request id), replaced when the id starts a new
  incarnation; a resume must name the entry's epoch, so a stream is never continued with
  another one (a new request reusing the id, or a gateway restart: unknown epoch);
- the grace timers: ``grace`` after a detach, a still running request is cancelled with reason
  ``disconnect`` and the entry dropped; ``grace`` after a request ended while attached (or was
  last resumed after its end), the entry is dropped (its text with it);
- bounds: on the entries of ended requests (each holds its answer's text: past ``max_ended``
  the oldest are forgotten first), and on the running requests detached at once (past
  ``max_detached`` a closed connection cancels as it does for any other request, G7).

Nothing here writes or reads a socket; the multiplexers call in synchronously.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from protocol import CancelReason, CancelStatus

from .observability import log
from .registry import RequestKey

__all__ = ["ResumableRequest", "Resumables", "ResumeEntry", "ResumeOwner"]


class ResumableRequest(Protocol):
    """What the book needs of a request (:class:`gateway.request.Request`)."""

    @property
    def key(self) -> RequestKey: ...

    @property
    def finished(self) -> bool:
        """The pipeline halted (the request no longer counts against any connection)."""
        ...

    def cancel(self, reason: CancelReason) -> CancelStatus: ...


class ResumeOwner(Protocol):
    """Where a resumable request is attached: a connection's multiplexer, or a relay to a
    connection on another node (gateway/relay.py)."""

    def forget(self, request: ResumableRequest) -> None:
        """The request is no longer resumable: drop what was kept for it."""
        ...

    def release(self, request: Any, *, moved: bool) -> None:
        """The request was resumed elsewhere; ``moved``: this side still expected more of it
        (its client is told ``moved``)."""
        ...


@dataclass(eq=False, slots=True)
class ResumeEntry:
    """One resumable request: its epoch, its grace, and the connection it is attached to
    (``owner``; None while detached)."""

    request: ResumableRequest
    epoch: str
    grace: float
    owner: ResumeOwner | None
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def detached(self) -> bool:
        return self.owner is None


class Resumables:
    """The resumable requests of one gateway process."""

    def __init__(
        self,
        *,
        default_grace: float = 30.0,
        max_grace: float = 300.0,
        max_ended: int = 1000,
        max_detached: int = 10_000,
        now_loop: Callable[[], asyncio.AbstractEventLoop] = asyncio.get_running_loop,
    ) -> None:
        self.default_grace = default_grace
        self.max_grace = max_grace
        self.max_ended = max_ended
        self.max_detached = max_detached
        self._loop = now_loop
        # A fresh prefix per process: an epoch from before a restart is never found again.
        self._boot = secrets.token_hex(4)
        self._serials = itertools.count(1)
        self._entries: dict[RequestKey, ResumeEntry] = {}
        #: Entries of ended requests, oldest first (the bound's eviction order).
        self._ended: OrderedDict[RequestKey, ResumeEntry] = OrderedDict()
        #: Detached entries whose request still runs (``max_detached``).
        self._running_detached: set[ResumeEntry] = set()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def detached(self) -> int:
        """Requests waiting for a resume (running or ended while detached)."""
        return sum(1 for entry in self._entries.values() if entry.detached)

    def may_detach(self) -> bool:
        """Room for one more running detached request (``max_detached``)."""
        return len(self._running_detached) < self.max_detached

    def grace_for(self, grace_ms: int | None) -> float:
        """The grace a chat gets: its own, capped, or the default (seconds)."""
        wanted = self.default_grace if grace_ms is None else grace_ms / 1000
        return min(wanted, self.max_grace)

    # -- the book ----------------------------------------------------------------------------

    def register(self, request: ResumableRequest, grace: float, owner: ResumeOwner) -> ResumeEntry:
        """A resumable request was accepted on ``owner``'s connection: its entry, with a new
        epoch (replacing an ended incarnation of the same id)."""
        self._drop(request.key)
        epoch = f"{self._boot}.{next(self._serials)}"
        entry = ResumeEntry(request=request, epoch=epoch, grace=grace, owner=owner)
        self._entries[request.key] = entry
        return entry

    def find(self, key: RequestKey, epoch: str) -> ResumeEntry | None:
        """The entry a resume names: same user, id and epoch; None otherwise (G9: the caller
        answers every miss alike)."""
        entry = self._entries.get(key)
        if entry is None or not secrets.compare_digest(entry.epoch, epoch):
            return None
        return entry

    def entry_of(self, request: ResumableRequest) -> ResumeEntry | None:
        entry = self._entries.get(request.key)
        return entry if entry is not None and entry.request is request else None

    # -- events ------------------------------------------------------------------------------

    def detached_from(self, request: ResumableRequest) -> None:
        """Its connection closed: the grace starts."""
        entry = self.entry_of(request)
        if entry is None:
            return
        entry.owner = None
        if not request.finished:
            self._running_detached.add(entry)
        self._arm(entry, self._grace_over)
        key = request.key
        log.info(
            "request.detached",
            request_id=key.request_id,
            user_id=key.user_id,
            running=not request.finished,
            grace_ms=round(entry.grace * 1000),
        )

    def attached_to(self, request: ResumableRequest, owner: ResumeOwner, *, moved: bool) -> None:
        """Resumed on ``owner``'s connection (``moved``: from another one still open)."""
        entry = self.entry_of(request)
        if entry is None:
            return
        key = request.key
        log.info(
            "request.resumed",
            request_id=key.request_id,
            user_id=key.user_id,
            moved=moved,
            running=not request.finished,
        )
        entry.owner = owner
        self._running_detached.discard(entry)
        if request.finished:  # resumable for another grace after this replay
            self._ended_now(entry)
        else:
            self._disarm(entry)

    def ended(self, request: ResumableRequest) -> None:
        """The request finished (its pipeline halted). Attached: resumable for one grace
        more; detached: its detach grace runs on."""
        entry = self.entry_of(request)
        if entry is None:
            return
        self._running_detached.discard(entry)
        if not entry.detached:
            self._ended_now(entry)
        else:
            self._ended[request.key] = entry
            self._bound()

    def close(self) -> None:
        """Shutdown: a detached request still running is cancelled (reason shutdown), every
        timer is cancelled and the book emptied."""
        for entry in list(self._entries.values()):
            self._disarm(entry)
            if entry.detached and not entry.request.finished:
                entry.request.cancel(CancelReason.SHUTDOWN)
        self._entries.clear()
        self._ended.clear()
        self._running_detached.clear()

    # -- internals ---------------------------------------------------------------------------

    def _ended_now(self, entry: ResumeEntry) -> None:
        key = entry.request.key
        self._ended[key] = entry
        self._ended.move_to_end(key)
        self._arm(entry, self._forget)
        self._bound()

    def _grace_over(self, entry: ResumeEntry) -> None:
        entry.timer = None
        if self._entries.get(entry.request.key) is not entry:
            return
        key = entry.request.key
        running = not entry.request.finished
        log.info("request.grace_expired", request_id=key.request_id, user_id=key.user_id,
                 running=running)  # fmt: skip
        if running:
            entry.request.cancel(CancelReason.DISCONNECT)  # G7, one grace late
        self._drop(key)

    def _forget(self, entry: ResumeEntry) -> None:
        entry.timer = None
        if self._entries.get(entry.request.key) is entry:
            self._drop(entry.request.key)

    def _arm(self, entry: ResumeEntry, then: Callable[[ResumeEntry], None]) -> None:
        self._disarm(entry)
        entry.timer = self._loop().call_later(entry.grace, then, entry)

    @staticmethod
    def _disarm(entry: ResumeEntry) -> None:
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None

    def _drop(self, key: RequestKey) -> None:
        entry = self._entries.pop(key, None)
        self._ended.pop(key, None)
        if entry is not None:
            self._running_detached.discard(entry)
            self._disarm(entry)
            if entry.owner is not None:  # its connection keeps nothing for it any more
                entry.owner.forget(entry.request)

    def _bound(self) -> None:
        while len(self._ended) > self.max_ended:
            key, entry = next(iter(self._ended.items()))
            if entry.detached and not entry.request.finished:  # pragma: no cover - defensive
                entry.request.cancel(CancelReason.DISCONNECT)
            self._drop(key)
