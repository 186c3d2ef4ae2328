"""The per-request state machine (SPEC.md §5), for either side of the connection.

Theory of operation
-------------------
Everything that decides whether a message about one request may be sent or accepted lives here,
as data: :data:`TRANSITIONS` maps ``(role, state, event)`` to the next state, and a missing key is
the one place that refuses. The gateway owns one machine per accepted ``chat`` with
``role=Sender.GATEWAY`` and feeds it what it *sends* (chunks, the response, the usage report) and
what it *reads* (cancels); a client owns one per ``chat`` it sent with ``role=Sender.CLIENT`` and
feeds it the same events from the other direction.

::

    gateway:  ACTIVE --chunk--> ACTIVE            client:  ACTIVE --chunk--> ACTIVE
              ACTIVE --cancel--> CANCELLING                ACTIVE --cancel--> CANCEL_SENT
              CANCELLING --cancelled--> CANCELLED          CANCEL_SENT --chunk--> CANCEL_SENT
              ACTIVE --completed|cancelled|failed-->       (chunks sent before the gateway read
                        COMPLETED|CANCELLED|FAILED          the cancel may still arrive)
              terminal --cancel--> terminal                ACTIVE|CANCEL_SENT --response--> terminal

The guarantees of SPEC.md §6 that one side can check alone follow from the table:

- G1: no chunk or response after the terminal response (terminal states accept only ``cancel``
  and one ``usage`` report after a response whose usage was not final).
- G2: on the gateway, after a cancel was read (CANCELLING) no chunk and no ``completed`` or
  ``failed`` response: the race between cancel and completion is decided by whichever event the
  gateway's machine sees first.
- G3: ``seq`` must be the next number; with ``stream=True`` a completed response's content must
  equal the joined chunk texts; with ``stream=False`` no chunk is allowed.
- Steps (SPEC.md §3.12): a ``step`` message is allowed where a chunk is: never after the
  terminal response, and on the gateway never after a cancel was read.
- G4: :meth:`RequestStateMachine.on_cancel` returns the outcome of a cancel from the state it
  found: ``cancelled`` once, ``already_cancelled`` or ``already_completed`` afterwards.

The gateway *commits* a completed or failed response before it can send it: the response waits
behind the request's chunks still queued, which go out first (G3). SPEC.md §5.1 decides the race
with a cancel by that commit, not by the write, so the gateway's machine records it
(:meth:`RequestStateMachine.on_commit`): a cancel read after the commit finds the terminal state
the committed response leads to (``already_completed``), although the chunks before it are still
being sent. :attr:`RequestStateMachine.decided` is that state: the gateway's answer to "where does
this request stand", for cancels and for status lookups alike. A cancelled response is never
committed ahead of chunks: it drops them and goes out at once (:meth:`on_response`, G2).

A refused event raises :class:`LocalProtocolError` when this side would be the one sending it (a
bug here) and :class:`RemoteProtocolError` when it was received (the peer's fault), both with
code ``protocol_violation``. A cancel is never refused: it is idempotent by design.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Final

from .errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from .messages import (
    CancelResult,
    CancelStatus,
    Response,
    ResponseStatus,
    Resumable,
    ResumeResult,
    ResumeStatus,
    Sender,
    Step,
    StepState,
    UsageReport,
)

__all__ = ["CANCEL_OUTCOMES", "TRANSITIONS", "Event", "RequestState", "RequestStateMachine"]


class RequestState(enum.Enum):
    """Where one request stands, as one side has seen it."""

    ACTIVE = "active"
    #: Gateway only: a cancel was read; the next and last message is the cancelled response.
    CANCELLING = "cancelling"
    #: Client only: a cancel was sent; chunks already in flight may still arrive.
    CANCEL_SENT = "cancel_sent"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"
    #: Client only: ``moved`` received; the request goes on on another connection (§5.8).
    MOVED = "moved"
    #: Client only: a ``resume`` answered ``not_found``; nothing about the request will come.
    GONE = "gone"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL: Final = frozenset({RequestState.COMPLETED, RequestState.CANCELLED, RequestState.FAILED})
#: Client only: nothing more about the request arrives on this connection, though it may run on.
_ENDED_HERE: Final = frozenset({RequestState.MOVED, RequestState.GONE})


class Event(enum.Enum):
    """What happens to a request: the keys of :data:`TRANSITIONS` with the state."""

    CHUNK = "chunk"
    CANCEL = "cancel"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"
    USAGE = "usage"
    STEP = "step"
    #: Client only: ``moved`` received (§5.8).
    MOVED = "moved"
    #: Client only: the ``resume_result`` of this machine's resume said ``not_found``.
    GONE = "gone"


_S = RequestState
_E = Event
_RESPONSE_EVENT: Final = {
    ResponseStatus.COMPLETED: _E.COMPLETED,
    ResponseStatus.CANCELLED: _E.CANCELLED,
    ResponseStatus.FAILED: _E.FAILED,
}
_TERMINAL_BY_EVENT: Final = {
    _E.COMPLETED: _S.COMPLETED,
    _E.CANCELLED: _S.CANCELLED,
    _E.FAILED: _S.FAILED,
}


def _ends(state: RequestState) -> dict[tuple[RequestState, Event], RequestState]:
    """Every response event ends a request that is in ``state``."""
    return {(state, event): terminal for event, terminal in _TERMINAL_BY_EVENT.items()}


def _cancel_is_idempotent(*states: RequestState) -> dict[tuple[RequestState, Event], RequestState]:
    return {(state, _E.CANCEL): state for state in states}


#: ``TRANSITIONS[role][(state, event)]`` is the next state; a missing key refuses the event.
TRANSITIONS: Final[dict[Sender, dict[tuple[RequestState, Event], RequestState]]] = {
    Sender.GATEWAY: {
        (_S.ACTIVE, _E.CHUNK): _S.ACTIVE,
        (_S.ACTIVE, _E.STEP): _S.ACTIVE,
        (_S.ACTIVE, _E.CANCEL): _S.CANCELLING,
        **_ends(_S.ACTIVE),
        # G2: once a cancel is read, only the cancelled response may follow.
        (_S.CANCELLING, _E.CANCELLED): _S.CANCELLED,
        **_cancel_is_idempotent(_S.CANCELLING, *_TERMINAL),
        (_S.CANCELLED, _E.USAGE): _S.CANCELLED,
    },
    Sender.CLIENT: {
        (_S.ACTIVE, _E.CHUNK): _S.ACTIVE,
        (_S.ACTIVE, _E.STEP): _S.ACTIVE,
        (_S.ACTIVE, _E.CANCEL): _S.CANCEL_SENT,
        **_ends(_S.ACTIVE),
        (_S.CANCEL_SENT, _E.CHUNK): _S.CANCEL_SENT,
        (_S.CANCEL_SENT, _E.STEP): _S.CANCEL_SENT,
        **_ends(_S.CANCEL_SENT),
        **_cancel_is_idempotent(_S.CANCEL_SENT, *_TERMINAL, *_ENDED_HERE),
        (_S.CANCELLED, _E.USAGE): _S.CANCELLED,
        (_S.ACTIVE, _E.MOVED): _S.MOVED,
        (_S.CANCEL_SENT, _E.MOVED): _S.MOVED,
        (_S.ACTIVE, _E.GONE): _S.GONE,
        (_S.CANCEL_SENT, _E.GONE): _S.GONE,
    },
}

# States where a chunk is accepted; a chunk never changes the state (checked at import).
_CHUNK_STATES: Final = {
    role: tuple(s for (s, e), nxt in table.items() if e is _E.CHUNK and nxt is s)
    for role, table in TRANSITIONS.items()
}
assert all(
    nxt is s for table in TRANSITIONS.values() for (s, e), nxt in table.items() if e is _E.CHUNK
)

#: The outcome of a cancel that finds the request in a state (G4).
CANCEL_OUTCOMES: Final[dict[RequestState, CancelStatus]] = {
    _S.ACTIVE: CancelStatus.CANCELLED,
    _S.CANCELLING: CancelStatus.ALREADY_CANCELLED,
    _S.CANCEL_SENT: CancelStatus.ALREADY_CANCELLED,
    _S.CANCELLED: CancelStatus.ALREADY_CANCELLED,
    _S.COMPLETED: CancelStatus.ALREADY_COMPLETED,
    _S.FAILED: CancelStatus.ALREADY_COMPLETED,
    # Client only, where the answer comes from elsewhere: the same as a sent cancel's.
    _S.MOVED: CancelStatus.ALREADY_CANCELLED,
    _S.GONE: CancelStatus.ALREADY_CANCELLED,
}

#: Client check of a ``cancel_result``: the states it may find the request in. The gateway sends
#: a cancel's result after the request's response (SPEC.md §5.3), so a client has seen it.
#: After ``moved`` or a ``not_found`` resume the response goes elsewhere (or nowhere), so any
#: outcome may be the true one.
_RESULT_STATES: Final[dict[CancelStatus, frozenset[RequestState]]] = {
    CancelStatus.CANCELLED: frozenset({_S.CANCELLED, *_ENDED_HERE}),
    CancelStatus.ALREADY_CANCELLED: frozenset({_S.CANCELLED, *_ENDED_HERE}),
    CancelStatus.ALREADY_COMPLETED: frozenset({_S.COMPLETED, _S.FAILED, *_ENDED_HERE}),
    CancelStatus.NOT_FOUND: frozenset(RequestState),
}


class RequestStateMachine:
    """Tracks one request on one side and refuses what the protocol forbids.

    Also keeps the streamed text so a gateway can build the completed ``content`` from exactly
    what it sent, and a client can check it (G3).
    """

    __slots__ = (
        "_cancels_unanswered",
        "_chunk_states",
        "_open_steps",
        "_parts",
        "_step_base",
        "_transitions",
        "awaiting_resume",
        "committed",
        "epoch",
        "first_seq",
        "next_seq",
        "next_step",
        "request_id",
        "resumable",
        "role",
        "state",
        "stream",
        "usage_pending",
    )

    def __init__(
        self, request_id: str, role: Sender, *, stream: bool = True, resumable: bool = False
    ) -> None:
        self.request_id = request_id
        self.role = role
        self.stream = stream
        #: The chat asked to survive its connection (§5.8): the gateway keeps every chunk's
        #: text apart (a resume replays them by ``seq``) and sends ``resumable`` first.
        self.resumable = resumable
        #: The request's incarnation, from its ``resumable`` message (None until then).
        self.epoch: str | None = None
        #: Client only, after :meth:`resuming`: the ``resume_result`` has not arrived yet.
        self.awaiting_resume = False
        #: The first ``seq`` this side tracks: 0, or the chunk after a resume's ``after_seq``
        #: (the text before it was received on an earlier connection).
        self.first_seq = 0
        self.state = RequestState.ACTIVE
        #: Gateway only: the terminal state of a response committed (:meth:`on_commit`) and not
        #: sent yet; None otherwise.
        self.committed: RequestState | None = None
        self.next_seq = 0
        #: True after a cancelled response whose usage was not final, until its ``usage`` report.
        self.usage_pending = False
        self._parts: list[str] = []
        self._transitions = TRANSITIONS[role]
        self._chunk_states = _CHUNK_STATES[role]
        self._cancels_unanswered = 0
        #: The index the next ``step`` started must carry, and the started steps not ended.
        self.next_step = 0
        self._open_steps: set[int] = set()
        #: After a resume (§5.8) steps before it were not replayed: the index of the first step
        #: started since (-1 until one does); None when every step was seen from the first.
        self._step_base: int | None = None

    @classmethod
    def resuming(
        cls, request_id: str, epoch: str, after_seq: int | None, *, stream: bool = True
    ) -> RequestStateMachine:
        """Client side: the machine of a request this client sent ``resume`` for, having
        received its chunks up to ``after_seq`` (None: none) on an earlier connection. Until the
        ``resume_result`` arrives (:meth:`on_resume_result`) nothing else about it may."""
        machine = cls(request_id, Sender.CLIENT, stream=stream, resumable=True)
        machine.epoch = epoch
        machine.awaiting_resume = True
        machine.first_seq = machine.next_seq = 0 if after_seq is None else after_seq + 1
        machine._step_base = -1
        return machine

    def __repr__(self) -> str:
        return (
            f"RequestStateMachine({self.request_id!r}, {self.role.name}, "
            f"state={self.state.name}, next_seq={self.next_seq})"
        )

    @property
    def decided(self) -> RequestState:
        """Where the request stands once what this side committed is sent: :attr:`state`, or (on
        the gateway) the terminal state of a committed response still behind queued chunks.
        Cancels are decided against it (G4)."""
        committed = self.committed
        return self.state if committed is None else committed

    @property
    def text(self) -> str:
        """The streamed text so far (chunk texts joined; after a resume, since ``first_seq``)."""
        if len(self._parts) > 1:
            if self.resumable:  # each chunk's text stays apart: chunks_after replays them
                return "".join(self._parts)
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def chunks_after(self, seq: int | None) -> list[str]:
        """Gateway, resumable requests: the texts of the chunks sent after ``seq`` (None: all),
        in order; the first has ``seq + 1``. ValueError for a ``seq`` not sent yet."""
        start = 0 if seq is None else seq + 1 - self.first_seq
        if not self.resumable:
            raise ValueError("only a resumable request keeps its chunks apart")
        if start < 0 or start > len(self._parts):
            raise ValueError(f"no chunk {seq} was sent (next seq {self.next_seq})")
        return self._parts[start:]

    # -- events ------------------------------------------------------------------------------

    def on_chunk(self, seq: int, text: str) -> None:
        """A chunk was sent (gateway) or received (client)."""
        # Hot path (once per chunk): a chunk never changes the state, so membership in the
        # table-derived tuple replaces the (state, event) lookup; tuple membership compares by
        # identity first and skips hashing the enums.
        if self.state not in self._chunk_states or self.awaiting_resume:
            self._refuse_chunk()
        if not self.stream:
            raise self._violation("chunk for a request with stream=false")
        if seq != self.next_seq:
            raise self._violation(f"chunk seq {seq}, expected {self.next_seq}")
        self.next_seq = seq + 1
        self._parts.append(text)

    def on_chunks(self, first_seq: int, texts: Sequence[str]) -> None:
        """:meth:`on_chunk` for chunks ``first_seq``, ``first_seq + 1``, ... sent in a row:
        checked once (the gateway's hot path takes a request's pending chunks together)."""
        if self.state not in self._chunk_states or self.awaiting_resume:
            self._refuse_chunk()
        if not self.stream:
            raise self._violation("chunk for a request with stream=false")
        if first_seq != self.next_seq:
            raise self._violation(f"chunk seq {first_seq}, expected {self.next_seq}")
        self.next_seq = first_seq + len(texts)
        self._parts.extend(texts)

    def on_step(self, step: Step) -> None:
        """A ``step`` message was sent (gateway) or received (client): before the response, and
        on the gateway not after a cancel was read. Started steps count 0, 1, 2, ...; a step ends
        at most once, after it started (SPEC.md §3.12)."""
        self._check_resumed("step")
        state = self._next(Event.STEP)
        base = self._step_base
        if step.state is StepState.STARTED:
            if base == -1:  # the first step started since a resume sets the count (§5.8)
                self._step_base = self.next_step = step.index
            if step.index != self.next_step:
                raise self._violation(f"step {step.index} started, expected {self.next_step}")
            self.next_step += 1
            self._open_steps.add(step.index)
        elif step.index in self._open_steps:
            self._open_steps.discard(step.index)
        elif base is None or (base != -1 and step.index >= base):
            # (after a resume, a step started before it may end: it was not replayed)
            raise self._violation(f"step {step.index} ended but is not running")
        self.state = state

    def on_cancel(self) -> CancelStatus:
        """A cancel was read (gateway) or sent (client). Never refused. Returns its outcome,
        from the state the cancel finds: :attr:`decided` (G4)."""
        found = self.decided
        outcome = CANCEL_OUTCOMES[found]
        # After a commit the cancel finds a terminal state, which it leaves unchanged; the
        # chunks before the committed response still go out (``state`` stays).
        if found is self.state:
            self.state = self._transitions[(found, Event.CANCEL)]
        self._cancels_unanswered += 1
        return outcome

    def on_commit(self, status: ResponseStatus) -> None:
        """Gateway only: the terminal response with ``status`` was committed to the outgoing
        queue, to be sent (:meth:`on_response`) after the chunks queued before it. From now on
        the request is :attr:`decided`: a cancel finds that response's terminal state (G4). The
        commit is refused where sending the response would be (G1, G2), and a second one is."""
        if self.role is not Sender.GATEWAY:
            raise ValueError("only the gateway commits a response before sending it")
        if self.committed is not None:
            raise self._violation(f"{status.value} response after a committed response")
        self.committed = self._next(_RESPONSE_EVENT[status])

    def on_response(self, response: Response) -> None:
        """The terminal response was sent (gateway) or received (client)."""
        self._check_resumed("response")
        state = self._next(_RESPONSE_EVENT[response.status])
        committed = self.committed
        if committed is not None and state is not committed:
            raise self._violation(f"{response.status.value} response, but another was committed")
        streamed = response.status is ResponseStatus.COMPLETED and self.stream
        # After a resume this side saw only the chunks since first_seq: the content ends so.
        whole = self.first_seq == 0 or self.role is Sender.GATEWAY
        if streamed and not (
            response.content == self.text if whole else response.content.endswith(self.text)
        ):
            # Refused before any change: the gateway can still send the right response (G1).
            raise self._violation("completed content differs from the streamed chunks")
        self.state = state
        self.committed = None
        self.usage_pending = not response.usage.final

    def on_resumable(self, message: Resumable) -> None:
        """The ``resumable`` message was sent (gateway) or received (client): only for a chat
        that asked for it, once, before anything else about the request (§5.8)."""
        if not self.resumable:
            raise self._violation("resumable for a chat that did not ask to be")
        if self.epoch is not None:
            raise self._violation("a second resumable message")
        seen = self.next_seq or self.next_step or self.state.is_terminal
        if seen or self.state in _ENDED_HERE:
            raise self._violation("resumable after other messages about the request")
        self.epoch = message.epoch

    def on_moved(self) -> None:
        """Client side: ``moved`` received; the request goes on on another connection. Only
        for a request known to be resumable (its ``resumable`` arrived, or it was resumed)."""
        self._check_resumed("moved")
        if self.epoch is None and self.role is Sender.CLIENT:
            raise self._violation("moved for a request not known to be resumable")
        self._advance(Event.MOVED)

    def on_resume_result(self, result: ResumeResult) -> None:
        """Client side: the answer to this machine's ``resume`` (:meth:`resuming`)."""
        if not self.awaiting_resume:
            raise self._violation("resume_result for no outstanding resume")
        if result.status is ResumeStatus.NOT_FOUND:
            self._advance(Event.GONE)
        self.awaiting_resume = False

    def on_usage(self, report: UsageReport) -> None:
        """The final usage report of a cancelled request."""
        if not self.usage_pending:
            raise self._violation("usage report without a pending non-final usage")
        self._advance(Event.USAGE)
        self.usage_pending = False

    def on_cancel_result(self, result: CancelResult) -> None:
        """Client side: check a ``cancel_result`` against what this client has seen."""
        if self._cancels_unanswered == 0:
            raise self._violation("cancel_result for no outstanding cancel")
        if self.state not in _RESULT_STATES[result.status]:
            raise self._violation(
                f"cancel_result {result.status.value} in state {self.state.value}"
            )
        self._cancels_unanswered -= 1

    # -- internals ---------------------------------------------------------------------------

    def _refuse_chunk(self) -> None:
        self._check_resumed("chunk")
        self._advance(Event.CHUNK)  # raises the refusal

    def _check_resumed(self, what: str) -> None:
        if self.awaiting_resume:
            raise self._violation(f"{what} before the resume_result")

    def _next(self, event: Event) -> RequestState:
        try:
            return self._transitions[(self.state, event)]
        except KeyError:
            raise self._violation(f"{event.value} in state {self.state.value}") from None

    def _advance(self, event: Event) -> None:
        self.state = self._next(event)

    def _violation(self, what: str) -> ProtocolError:
        # The gateway sends everything but cancels; the client receives it. So a refused event is
        # our own bug on the gateway side and the peer's fault on the client side.
        error = LocalProtocolError if self.role is Sender.GATEWAY else RemoteProtocolError
        return error(ErrorCode.PROTOCOL_VIOLATION, what, request_id=self.request_id)
