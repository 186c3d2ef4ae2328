"""State-machine layer: every (role, state, event) pair, allowed or refused, plus the guarantees
one side can check alone (G1-G4) and a model-based run of a gateway and a client together."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from protocol import (
    CancelReason,
    CancelResult,
    CancelStatus,
    ErrorCode,
    ErrorInfo,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    RequestState,
    RequestStateMachine,
    Response,
    ResponseStatus,
    Resumable,
    ResumeResult,
    ResumeStatus,
    Sender,
    Step,
    StepState,
    Usage,
    UsageReport,
)
from protocol.state import CANCEL_OUTCOMES, TRANSITIONS, Event

RID = "req-1"
S = RequestState
ROLES = pytest.mark.parametrize("role", list(Sender), ids=lambda r: r.name.lower())
REFUSAL = {Sender.GATEWAY: LocalProtocolError, Sender.CLIENT: RemoteProtocolError}
REACHABLE = {
    Sender.GATEWAY: {S.ACTIVE, S.CANCELLING, S.COMPLETED, S.CANCELLED, S.FAILED},
    Sender.CLIENT: {S.ACTIVE, S.CANCEL_SENT, S.COMPLETED, S.CANCELLED, S.FAILED, S.MOVED, S.GONE},
}


# --- messages -----------------------------------------------------------------------------------


def completed(content: str = "") -> Response:
    return Response(request_id=RID, status=ResponseStatus.COMPLETED, content=content)


def cancelled(*, final: bool = False, reason: CancelReason = CancelReason.CLIENT) -> Response:
    usage = Usage(input_tokens=3, output_tokens=2, saved_tokens=40, final=final)
    return Response(request_id=RID, status=ResponseStatus.CANCELLED, reason=reason, usage=usage)


def failed() -> Response:
    error = ErrorInfo(code="backend_error", message="backend down")
    return Response(request_id=RID, status=ResponseStatus.FAILED, error=error)


def usage_report() -> UsageReport:
    return UsageReport(request_id=RID, usage=Usage(input_tokens=3, output_tokens=5))


def apply(machine: RequestStateMachine, event: Event) -> object:
    """Feed one event through the machine's public method, with a message that fits it."""
    if event is Event.CHUNK:
        return machine.on_chunk(machine.next_seq, "x")
    if event is Event.CANCEL:
        return machine.on_cancel()
    if event is Event.COMPLETED:
        return machine.on_response(completed(machine.text))
    if event is Event.CANCELLED:
        return machine.on_response(cancelled(final=False))
    if event is Event.FAILED:
        return machine.on_response(failed())
    if event is Event.STEP:
        return machine.on_step(step(machine.next_step, StepState.STARTED))
    if event is Event.MOVED:  # for a request known to be resumable (as if told so first)
        if machine.epoch is None:
            machine.epoch = "e1.1"
        return machine.on_moved()
    if event is Event.GONE:  # the answer to a resume: as if this machine had sent one
        machine.awaiting_resume = True
        try:
            return machine.on_resume_result(not_found())
        finally:
            machine.awaiting_resume = False
    return machine.on_usage(usage_report())


def not_found() -> ResumeResult:
    return ResumeResult(request_id=RID, status=ResumeStatus.NOT_FOUND)


def step(index: int, state: StepState) -> Step:
    return Step(request_id=RID, index=index, kind="tool", name="search", state=state)


def snapshot(machine: RequestStateMachine) -> tuple[object, ...]:
    return (machine.state, machine.next_seq, machine.text, machine.usage_pending, machine.next_step)


# --- reaching every state through public methods ------------------------------------------------


def _shortest_paths(role: Sender) -> dict[RequestState, tuple[Event, ...]]:
    """Breadth-first over the table: the shortest event sequence that reaches each state."""
    paths: dict[RequestState, tuple[Event, ...]] = {S.ACTIVE: ()}
    frontier = [S.ACTIVE]
    while frontier:
        following = []
        for state in frontier:
            for (src, event), dst in TRANSITIONS[role].items():
                if src is state and dst not in paths:
                    paths[dst] = (*paths[state], event)
                    following.append(dst)
        frontier = following
    return paths


PATHS = {role: _shortest_paths(role) for role in Sender}
#: Every (role, state, event); the expected outcome is looked up in TRANSITIONS.
PAIRS = [
    pytest.param(role, state, event, id=f"{role.name.lower()}-{state.value}-{event.value}")
    for role in Sender
    for state in sorted(REACHABLE[role], key=lambda s: s.value)
    for event in Event
]


def machine_in(role: Sender, state: RequestState, *, stream: bool = True) -> RequestStateMachine:
    machine = RequestStateMachine(RID, role, stream=stream)
    for event in PATHS[role][state]:
        apply(machine, event)
    assert machine.state is state
    return machine


@ROLES
def test_reachable_states_are_exactly_those_of_the_role(role):
    assert set(PATHS[role]) == REACHABLE[role]
    assert {s for s, _ in TRANSITIONS[role]} | set(TRANSITIONS[role].values()) == REACHABLE[role]


@pytest.mark.parametrize(("role", "state", "event"), PAIRS)
def test_transition(role, state, event):
    machine = machine_in(role, state)
    if state is S.CANCELLED:
        assert machine.usage_pending  # reached with a non-final usage, so a usage report fits
    expected = TRANSITIONS[role].get((state, event))
    if expected is not None:
        apply(machine, event)
        assert machine.state is expected
        return
    assert event is not Event.CANCEL, "a cancel is never refused"
    before = snapshot(machine)
    with pytest.raises(ProtocolError) as info:
        apply(machine, event)
    assert type(info.value) is REFUSAL[role]
    assert info.value.code is ErrorCode.PROTOCOL_VIOLATION
    assert info.value.request_id == RID
    assert snapshot(machine) == before  # a refused event changes nothing


@ROLES
def test_every_state_accepts_cancel(role):
    for state in REACHABLE[role]:
        assert (state, Event.CANCEL) in TRANSITIONS[role]


@ROLES
def test_terminal_states_accept_only_cancel_and_usage(role):
    for (state, event), _ in TRANSITIONS[role].items():
        if state.is_terminal:
            assert event in (Event.CANCEL, Event.USAGE)
            assert TRANSITIONS[role][(state, event)] is state  # G1: terminal stays terminal
    assert {s for s in RequestState if s.is_terminal} == {S.COMPLETED, S.CANCELLED, S.FAILED}


# --- G3: seq and content ------------------------------------------------------------------------


@ROLES
@pytest.mark.parametrize(
    ("seqs", "bad_at"),
    [
        ([1], 0),  # must start at 0
        ([0, 2], 1),  # gap
        ([0, 1, 1], 2),  # repeat
        ([0, 0], 1),
        ([0, 1, 2, 1], 3),  # backwards
        ([5], 0),
    ],
    ids=["start-at-1", "gap", "repeat", "repeat-0", "backwards", "start-at-5"],
)
def test_seq_must_be_contiguous_from_zero(role, seqs, bad_at):
    machine = RequestStateMachine(RID, role)
    for seq in seqs[:bad_at]:
        machine.on_chunk(seq, f"t{seq}")
    before = snapshot(machine)
    with pytest.raises(REFUSAL[role]) as info:
        machine.on_chunk(seqs[bad_at], "bad")
    assert info.value.code is ErrorCode.PROTOCOL_VIOLATION
    assert info.value.request_id == RID
    assert snapshot(machine) == before
    # The expected chunk is still accepted afterwards.
    machine.on_chunk(machine.next_seq, "ok")


@ROLES
def test_chunks_in_a_row_are_checked_once_like_one_by_one(role):
    """on_chunks(first, texts) is on_chunk for each: the same seq rule, text and refusals."""
    machine = RequestStateMachine(RID, role)
    machine.on_chunks(0, ["a", "b", "c"])
    assert (machine.next_seq, machine.text) == (3, "abc")
    before = snapshot(machine)
    for bad_first in (2, 4, 0):
        with pytest.raises(REFUSAL[role]):
            machine.on_chunks(bad_first, ["x", "y"])
        assert snapshot(machine) == before
    machine.on_chunk(3, "d")
    machine.on_chunks(4, ["e"])
    machine.on_response(completed("abcde"))
    with pytest.raises(REFUSAL[role]):  # nothing after the response
        machine.on_chunks(5, ["f", "g"])
    unstreamed = RequestStateMachine(RID, role, stream=False)
    with pytest.raises(REFUSAL[role]):
        unstreamed.on_chunks(0, ["x", "y"])
    assert unstreamed.next_seq == 0


@ROLES
def test_text_joins_the_chunks(role):
    machine = RequestStateMachine(RID, role)
    assert machine.text == ""
    parts = ["Hel", "lo", ", ", "wörld 🌍", "\n"]
    for seq, part in enumerate(parts):
        machine.on_chunk(seq, part)
        assert machine.text == "".join(parts[: seq + 1])
        assert machine.next_seq == seq + 1
    assert machine.text == "Hello, wörld 🌍\n"
    machine.on_response(completed("Hello, wörld 🌍\n"))
    assert machine.state is S.COMPLETED
    assert machine.text == "Hello, wörld 🌍\n"


@ROLES
@pytest.mark.parametrize(
    ("chunks", "content"),
    [([], "x"), (["a", "b"], "a"), (["a", "b"], "abc"), (["a", "b"], "ba"), (["a"], "")],
    ids=["no-chunks", "short", "long", "order", "empty"],
)
def test_completed_content_must_equal_the_streamed_text(role, chunks, content):
    machine = RequestStateMachine(RID, role)
    for seq, text in enumerate(chunks):
        machine.on_chunk(seq, text)
    before = snapshot(machine)
    with pytest.raises(REFUSAL[role]) as info:
        machine.on_response(completed(content))
    assert info.value.code is ErrorCode.PROTOCOL_VIOLATION
    assert snapshot(machine) == before
    machine.on_response(completed("".join(chunks)))
    assert machine.state is S.COMPLETED


@ROLES
@pytest.mark.parametrize("seq", [0, 1])
def test_stream_false_refuses_any_chunk(role, seq):
    machine = RequestStateMachine(RID, role, stream=False)
    with pytest.raises(REFUSAL[role]) as info:
        machine.on_chunk(seq, "x")
    assert info.value.code is ErrorCode.PROTOCOL_VIOLATION
    assert machine.state is S.ACTIVE
    assert machine.next_seq == 0


@ROLES
@pytest.mark.parametrize("content", ["", "the whole answer"])
def test_stream_false_accepts_completed_content_without_chunks(role, content):
    machine = RequestStateMachine(RID, role, stream=False)
    machine.on_response(completed(content))
    assert machine.state is S.COMPLETED


@ROLES
def test_cancelled_and_failed_responses_need_no_matching_text(role):
    for response in (cancelled(final=True), failed()):
        machine = RequestStateMachine(RID, role)
        machine.on_chunk(0, "partial")
        machine.on_response(response)
        assert machine.state.is_terminal


# --- G4: cancel outcomes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "state"),
    [(role, state) for role in Sender for state in sorted(REACHABLE[role], key=lambda s: s.value)],
    ids=lambda x: x.value if isinstance(x, RequestState) else x.name.lower(),
)
def test_cancel_outcome_from_each_state(role, state):
    machine = machine_in(role, state)
    assert machine.on_cancel() is CANCEL_OUTCOMES[state]
    assert machine.state is TRANSITIONS[role][(state, Event.CANCEL)]


def test_cancel_outcomes_table():
    assert CANCEL_OUTCOMES == {
        S.ACTIVE: CancelStatus.CANCELLED,
        S.CANCELLING: CancelStatus.ALREADY_CANCELLED,
        S.CANCEL_SENT: CancelStatus.ALREADY_CANCELLED,
        S.CANCELLED: CancelStatus.ALREADY_CANCELLED,
        S.COMPLETED: CancelStatus.ALREADY_COMPLETED,
        S.FAILED: CancelStatus.ALREADY_COMPLETED,
        S.MOVED: CancelStatus.ALREADY_CANCELLED,
        S.GONE: CancelStatus.ALREADY_CANCELLED,
    }


@ROLES
def test_first_cancel_cancels_later_ones_are_already_cancelled(role):
    machine = RequestStateMachine(RID, role)
    assert machine.on_cancel() is CancelStatus.CANCELLED
    assert machine.on_cancel() is CancelStatus.ALREADY_CANCELLED
    machine.on_response(cancelled())
    assert machine.on_cancel() is CancelStatus.ALREADY_CANCELLED
    assert machine.state is S.CANCELLED


@ROLES
@pytest.mark.parametrize("response", [completed(), failed()], ids=["completed", "failed"])
def test_cancel_after_completion_is_already_completed(role, response):
    machine = RequestStateMachine(RID, role)
    machine.on_response(response)
    assert machine.on_cancel() is CancelStatus.ALREADY_COMPLETED
    assert machine.on_cancel() is CancelStatus.ALREADY_COMPLETED
    assert machine.state is response_state(response)


def response_state(response: Response) -> RequestState:
    return RequestState(response.status.value)


# --- G2: the gateway after a cancel -------------------------------------------------------------


def test_gateway_after_cancel_only_the_cancelled_response_follows():
    machine = RequestStateMachine(RID, Sender.GATEWAY)
    machine.on_chunk(0, "a")
    assert machine.on_cancel() is CancelStatus.CANCELLED
    assert machine.state is S.CANCELLING
    for refused in (
        lambda: machine.on_chunk(1, "b"),
        lambda: machine.on_response(completed("a")),
        lambda: machine.on_response(failed()),
        lambda: machine.on_usage(usage_report()),
    ):
        with pytest.raises(LocalProtocolError) as info:
            refused()
        assert info.value.code is ErrorCode.PROTOCOL_VIOLATION
        assert machine.state is S.CANCELLING
    assert machine.on_cancel() is CancelStatus.ALREADY_CANCELLED
    machine.on_response(cancelled())
    assert machine.state is S.CANCELLED


@pytest.mark.parametrize(
    ("first", "outcome", "terminal"),
    [
        ("cancel", CancelStatus.CANCELLED, S.CANCELLED),
        ("completed", CancelStatus.ALREADY_COMPLETED, S.COMPLETED),
        ("failed", CancelStatus.ALREADY_COMPLETED, S.FAILED),
    ],
)
def test_gateway_race_is_decided_by_the_first_event(first, outcome, terminal):
    """Completion and cancel race; whichever the gateway's machine sees first wins."""
    machine = RequestStateMachine(RID, Sender.GATEWAY)
    machine.on_chunk(0, "a")
    if first == "cancel":
        got = machine.on_cancel()
        with pytest.raises(LocalProtocolError):
            machine.on_response(completed("a"))
        machine.on_response(cancelled(final=True))
    else:
        machine.on_response(completed("a") if first == "completed" else failed())
        got = machine.on_cancel()
        with pytest.raises(LocalProtocolError):
            machine.on_response(cancelled())
    assert got is outcome
    assert machine.state is terminal


# --- G4 on the gateway: the commit decides, the chunks before it still go out -------------------


@pytest.mark.parametrize("response", [completed("ab"), failed()], ids=["completed", "failed"])
def test_gateway_cancel_after_the_commit_is_already_completed(response):
    """SPEC.md §5.1: the race is decided when the response is committed, not when it is sent."""
    machine = RequestStateMachine(RID, Sender.GATEWAY)
    machine.on_chunk(0, "a")
    machine.on_commit(response.status)
    terminal = response_state(response)
    assert (machine.state, machine.committed, machine.decided) == (S.ACTIVE, terminal, terminal)
    assert machine.on_cancel() is CancelStatus.ALREADY_COMPLETED
    assert machine.on_cancel() is CancelStatus.ALREADY_COMPLETED
    assert machine.state is S.ACTIVE  # the chunks queued before the response still go out
    machine.on_chunk(1, "b")
    with pytest.raises(LocalProtocolError):
        machine.on_response(cancelled())  # not the committed response
    assert machine.decided is terminal
    machine.on_response(response)
    assert (machine.state, machine.committed, machine.decided) == (terminal, None, terminal)
    assert machine.on_cancel() is CancelStatus.ALREADY_COMPLETED


def test_gateway_commit_after_the_cancel_was_read_is_refused():
    machine = RequestStateMachine(RID, Sender.GATEWAY)
    assert machine.on_cancel() is CancelStatus.CANCELLED
    for status in (ResponseStatus.COMPLETED, ResponseStatus.FAILED):
        with pytest.raises(LocalProtocolError) as info:
            machine.on_commit(status)  # G2: the cancel won the race
        assert info.value.code is ErrorCode.PROTOCOL_VIOLATION
        assert (machine.state, machine.committed) == (S.CANCELLING, None)


@pytest.mark.parametrize("state", [S.COMPLETED, S.CANCELLED, S.FAILED], ids=lambda s: s.value)
@pytest.mark.parametrize("status", list(ResponseStatus), ids=lambda s: s.value)
def test_gateway_commit_after_the_response_is_refused(state, status):
    machine = machine_in(Sender.GATEWAY, state)
    with pytest.raises(LocalProtocolError):
        machine.on_commit(status)  # G1
    assert (machine.state, machine.committed, machine.decided) == (state, None, state)


def test_gateway_commits_once():
    machine = RequestStateMachine(RID, Sender.GATEWAY)
    machine.on_commit(ResponseStatus.COMPLETED)
    for status in ResponseStatus:
        with pytest.raises(LocalProtocolError):
            machine.on_commit(status)
    assert machine.committed is S.COMPLETED


def test_only_the_gateway_commits():
    machine = RequestStateMachine(RID, Sender.CLIENT)
    with pytest.raises(ValueError, match="gateway"):
        machine.on_commit(ResponseStatus.COMPLETED)
    assert (machine.committed, machine.decided) == (None, S.ACTIVE)


#: Gateway events for the random test below: the table's, plus committing a response.
COMMIT_COMPLETED, COMMIT_FAILED = "commit_completed", "commit_failed"
_COMMITS = {COMMIT_COMPLETED: Event.COMPLETED, COMMIT_FAILED: Event.FAILED}
_RESPONSES = {Event.COMPLETED, Event.CANCELLED, Event.FAILED}


@settings(max_examples=400)
@given(
    events=st.lists(st.sampled_from([*Event, COMMIT_COMPLETED, COMMIT_FAILED]), max_size=14),
    data=st.data(),
)
def test_gateway_random_sequences_with_commits(events, data):
    """Any gateway event sequence, commits included, against a reference model: a commit is
    accepted where its response would be and only once; a cancel is decided against the
    committed state; a response must be the committed one; a refused event changes nothing."""
    table = TRANSITIONS[Sender.GATEWAY]
    machine = RequestStateMachine(RID, Sender.GATEWAY)
    state: RequestState = S.ACTIVE
    committed: RequestState | None = None
    pending, cancelled_outcomes = False, 0
    for event in events:
        final = data.draw(st.booleans()) if event is Event.CANCELLED else True
        if isinstance(event, str):
            allowed = committed is None and (state, _COMMITS[event]) in table
        elif event in _RESPONSES:
            nxt = table.get((state, event))
            allowed = nxt is not None and committed in (None, nxt)
        else:
            allowed = (state, event) in table and (event is not Event.USAGE or pending)

        def action(event: Event | str = event, final: bool = final) -> object:
            if isinstance(event, str):
                status = ResponseStatus(_COMMITS[event].value)
                return machine.on_commit(status)
            if event is Event.CANCELLED:
                return machine.on_response(cancelled(final=final))
            return apply(machine, event)

        if not allowed:
            before = (*snapshot(machine), machine.committed)
            with pytest.raises(LocalProtocolError):
                action()
            assert (*snapshot(machine), machine.committed) == before
            continue
        outcome = action()
        if isinstance(event, str):
            committed = table[(state, _COMMITS[event])]
        elif event is Event.CANCEL:
            found = state if committed is None else committed
            assert outcome is CANCEL_OUTCOMES[found]
            if committed is not None:
                assert outcome is CancelStatus.ALREADY_COMPLETED
            else:
                state = table[(state, event)]
            cancelled_outcomes += outcome is CancelStatus.CANCELLED
        else:
            state = table[(state, event)]
            if event in _RESPONSES:
                committed = None
                pending = event is Event.CANCELLED and not final
            if event is Event.USAGE:
                pending = False
        decided = state if committed is None else committed
        assert (machine.state, machine.committed, machine.decided) == (state, committed, decided)
        assert machine.usage_pending == pending
    assert cancelled_outcomes <= 1


# --- usage reports ------------------------------------------------------------------------------


@ROLES
def test_usage_report_once_after_non_final_cancelled_response(role):
    machine = RequestStateMachine(RID, role)
    machine.on_cancel()
    machine.on_response(cancelled(final=False))
    assert machine.usage_pending
    machine.on_usage(usage_report())
    assert not machine.usage_pending
    assert machine.state is S.CANCELLED
    with pytest.raises(REFUSAL[role]) as info:
        machine.on_usage(usage_report())
    assert info.value.code is ErrorCode.PROTOCOL_VIOLATION


@ROLES
def test_usage_report_may_follow_later_cancels(role):
    machine = RequestStateMachine(RID, role)
    machine.on_response(cancelled(final=False, reason=CancelReason.TIMEOUT))
    assert machine.on_cancel() is CancelStatus.ALREADY_CANCELLED
    machine.on_usage(usage_report())
    assert machine.state is S.CANCELLED


@ROLES
@pytest.mark.parametrize(
    "events",
    [
        [],
        ["chunk"],
        ["cancel"],
        ["cancelled-final"],
        ["completed"],
        ["failed"],
    ],
    ids=["active", "streaming", "cancel", "cancelled-final", "completed", "failed"],
)
def test_usage_report_refused_without_pending_usage(role, events):
    machine = RequestStateMachine(RID, role)
    steps: dict[str, Callable[[], object]] = {
        "chunk": lambda: machine.on_chunk(0, "x"),
        "cancel": machine.on_cancel,
        "cancelled-final": lambda: machine.on_response(cancelled(final=True)),
        "completed": lambda: machine.on_response(completed()),
        "failed": lambda: machine.on_response(failed()),
    }
    for name in events:
        steps[name]()
    before = snapshot(machine)
    with pytest.raises(REFUSAL[role]) as info:
        machine.on_usage(usage_report())
    assert info.value.code is ErrorCode.PROTOCOL_VIOLATION
    assert info.value.request_id == RID
    assert snapshot(machine) == before


# --- the client side ----------------------------------------------------------------------------


def test_client_accepts_chunks_in_flight_after_sending_cancel():
    machine = RequestStateMachine(RID, Sender.CLIENT)
    machine.on_chunk(0, "a")
    assert machine.on_cancel() is CancelStatus.CANCELLED
    assert machine.state is S.CANCEL_SENT
    machine.on_chunk(1, "b")  # sent before the gateway read the cancel
    machine.on_chunk(2, "c")
    assert machine.state is S.CANCEL_SENT
    with pytest.raises(RemoteProtocolError):
        machine.on_chunk(4, "gap")  # G3 still holds
    assert machine.on_cancel() is CancelStatus.ALREADY_CANCELLED


@pytest.mark.parametrize(
    "response",
    [completed("abc"), cancelled(), cancelled(final=True), failed()],
    ids=["completed", "cancelled", "cancelled-final", "failed"],
)
def test_client_accepts_any_response_after_sending_cancel(response):
    machine = RequestStateMachine(RID, Sender.CLIENT)
    for seq, text in enumerate("abc"):
        machine.on_chunk(seq, text)
    machine.on_cancel()
    machine.on_response(response)
    assert machine.state is response_state(response)
    with pytest.raises(RemoteProtocolError):
        machine.on_chunk(3, "late")  # G1: nothing after the response


def result(status: CancelStatus) -> CancelResult:
    return CancelResult(request_id=RID, status=status)


@pytest.mark.parametrize("status", list(CancelStatus), ids=lambda s: s.value)
def test_cancel_result_without_outstanding_cancel_is_a_violation(status):
    machine = RequestStateMachine(RID, Sender.CLIENT)
    machine.on_response(cancelled(reason=CancelReason.API))  # cancelled by someone else
    with pytest.raises(RemoteProtocolError) as info:
        machine.on_cancel_result(result(status))
    assert info.value.code is ErrorCode.PROTOCOL_VIOLATION
    assert info.value.request_id == RID


#: (what the client saw before the cancel_result, status) -> accepted?
CANCEL_RESULT_CASES = {
    # The gateway answers a cancel after the request's response (SPEC §5.3), so a result that
    # arrives while the client still waits for the response is a violation.
    ("cancel", CancelStatus.CANCELLED): False,
    ("cancel", CancelStatus.ALREADY_CANCELLED): False,
    ("cancel", CancelStatus.ALREADY_COMPLETED): False,
    ("cancel", CancelStatus.NOT_FOUND): True,
    ("cancel+cancelled", CancelStatus.CANCELLED): True,
    ("cancel+cancelled", CancelStatus.ALREADY_CANCELLED): True,
    ("cancel+cancelled", CancelStatus.ALREADY_COMPLETED): False,
    ("cancel+cancelled", CancelStatus.NOT_FOUND): True,
    ("cancel+completed", CancelStatus.CANCELLED): False,
    ("cancel+completed", CancelStatus.ALREADY_CANCELLED): False,
    ("cancel+completed", CancelStatus.ALREADY_COMPLETED): True,
    ("cancel+completed", CancelStatus.NOT_FOUND): True,
    ("cancel+failed", CancelStatus.ALREADY_COMPLETED): True,
    ("cancel+failed", CancelStatus.CANCELLED): False,
    ("completed+cancel", CancelStatus.ALREADY_COMPLETED): True,
    ("completed+cancel", CancelStatus.CANCELLED): False,
    ("failed+cancel", CancelStatus.ALREADY_COMPLETED): True,
    ("failed+cancel", CancelStatus.ALREADY_CANCELLED): False,
    ("cancelled+cancel", CancelStatus.ALREADY_CANCELLED): True,
    ("cancelled+cancel", CancelStatus.ALREADY_COMPLETED): False,
}


@pytest.mark.parametrize(
    ("history", "status", "accepted"),
    [(h, s, ok) for (h, s), ok in CANCEL_RESULT_CASES.items()],
    ids=[f"{h}-{s.value}" for h, s in CANCEL_RESULT_CASES],
)
def test_cancel_result_checks(history, status, accepted):
    machine = RequestStateMachine(RID, Sender.CLIENT)
    for step in history.split("+"):
        if step == "cancel":
            machine.on_cancel()
        else:
            apply(machine, Event(step))
    if accepted:
        machine.on_cancel_result(result(status))
        # One cancel, one result: a second result is a violation.
        with pytest.raises(RemoteProtocolError):
            machine.on_cancel_result(result(status))
    else:
        with pytest.raises(RemoteProtocolError) as info:
            machine.on_cancel_result(result(status))
        assert info.value.code is ErrorCode.PROTOCOL_VIOLATION


def test_one_cancel_result_per_cancel():
    machine = RequestStateMachine(RID, Sender.CLIENT)
    for _ in range(3):
        machine.on_cancel()
    machine.on_response(cancelled())
    machine.on_cancel_result(result(CancelStatus.CANCELLED))
    machine.on_cancel_result(result(CancelStatus.ALREADY_CANCELLED))
    machine.on_cancel_result(result(CancelStatus.NOT_FOUND))
    with pytest.raises(RemoteProtocolError):
        machine.on_cancel_result(result(CancelStatus.ALREADY_CANCELLED))


def test_repr_names_the_request():
    machine = RequestStateMachine(RID, Sender.GATEWAY)
    machine.on_chunk(0, "x")
    assert repr(machine) == "RequestStateMachine('req-1', GATEWAY, state=ACTIVE, next_seq=1)"


# --- random event sequences against a reference model -------------------------------------------


@ROLES
@settings(max_examples=300)
@given(events=st.lists(st.sampled_from(list(Event)), max_size=12), data=st.data())
def test_random_sequences_follow_the_table(role, events, data):
    """Any event sequence: each event is accepted iff the table (and, for usage, a pending
    non-final usage) allows it; a refused event changes nothing."""
    machine = RequestStateMachine(RID, role)
    state, pending, seq, cancelled_outcomes, steps = S.ACTIVE, False, 0, 0, 0
    for event in events:
        allowed = (state, event) in TRANSITIONS[role] and (event is not Event.USAGE or pending)
        final = data.draw(st.booleans()) if event is Event.CANCELLED else True

        def action(event: Event = event, final: bool = final) -> object:
            if event is Event.CANCELLED:
                return machine.on_response(cancelled(final=final))
            return apply(machine, event)

        if not allowed:
            before = snapshot(machine)
            with pytest.raises(REFUSAL[role]):
                action()
            assert snapshot(machine) == before
            continue
        outcome = action()
        if event is Event.CANCEL:
            assert outcome is CANCEL_OUTCOMES[state]
            cancelled_outcomes += outcome is CancelStatus.CANCELLED
        if event is Event.CHUNK:
            seq += 1
        if event is Event.STEP:
            steps += 1
        if event is Event.CANCELLED:
            pending = not final
        if event is Event.USAGE:
            pending = False
        state = TRANSITIONS[role][(state, event)]
        assert (machine.state, machine.next_seq, machine.usage_pending) == (state, seq, pending)
        assert machine.next_step == steps
    assert cancelled_outcomes <= 1


# --- a gateway and a client together ------------------------------------------------------------


class GatewayAndClient(RuleBasedStateMachine):
    """One request seen by both sides. The gateway acts at random; whatever its machine lets it
    send travels, in order, to the client's machine, which must accept all of it. The client
    sends cancels at random; the gateway reads them when it likes.

    Invariants (G1-G4): at most one response, nothing but cancel results and one usage report
    after it, seq contiguous, content equal to the chunks, at most one ``cancelled`` outcome,
    one result per cancel, and after a cancel was read the next message is the response.
    """

    @initialize(stream=st.booleans())
    def start(self, stream: bool) -> None:
        self.gateway = RequestStateMachine(RID, Sender.GATEWAY, stream=stream)
        self.client = RequestStateMachine(RID, Sender.CLIENT, stream=stream)
        self.stream = stream
        self.to_client: list[object] = []  # in flight, gateway -> client
        self.to_gateway = 0  # cancels in flight, client -> gateway
        self.unanswered: list[CancelStatus] = []  # outcomes of cancels read, not yet answered
        self.sent: list[object] = []  # everything the gateway sent, in order
        self.delivered: list[object] = []
        self.cancelled_outcomes = 0
        self.cancels_sent = 0
        self.steps_open: set[int] = set()

    # -- the gateway -----------------------------------------------------------------------

    def _gateway_sends(self, message: object, feed: Callable[[], object], event: Event) -> None:
        state = self.gateway.state
        allowed = (state, event) in TRANSITIONS[Sender.GATEWAY]
        if event is Event.CHUNK and not self.stream:
            allowed = False
        if event is Event.USAGE and not self.gateway.usage_pending:
            allowed = False
        if not allowed:
            before = snapshot(self.gateway)
            with pytest.raises(LocalProtocolError):
                feed()
            assert snapshot(self.gateway) == before
            return
        feed()
        self.to_client.append(message)
        self.sent.append(message)
        self._flush_results()

    @rule(text=st.text(min_size=1, max_size=5))
    def emit_chunk(self, text: str) -> None:
        seq = self.gateway.next_seq
        self._gateway_sends(
            ("chunk", seq, text), lambda: self.gateway.on_chunk(seq, text), Event.CHUNK
        )

    @rule()
    def complete(self) -> None:
        response = completed(self.gateway.text)
        self._gateway_sends(response, lambda: self.gateway.on_response(response), Event.COMPLETED)

    @rule()
    def fail(self) -> None:
        response = failed()
        self._gateway_sends(response, lambda: self.gateway.on_response(response), Event.FAILED)

    @rule(final=st.booleans(), reason=st.sampled_from(list(CancelReason)))
    def send_cancelled(self, final: bool, reason: CancelReason) -> None:
        response = cancelled(final=final, reason=reason)  # after a cancel, or a timeout
        self._gateway_sends(response, lambda: self.gateway.on_response(response), Event.CANCELLED)

    @rule(end=st.booleans())
    def send_step(self, end: bool) -> None:
        index = self.gateway.next_step - 1 if end else self.gateway.next_step
        if end and index < 0:
            return
        message = step(index, StepState.ENDED if end else StepState.STARTED)
        if end and index not in self.steps_open:
            with pytest.raises(LocalProtocolError):
                self.gateway.on_step(message)
            return
        self._gateway_sends(message, lambda: self.gateway.on_step(message), Event.STEP)
        if self.sent and self.sent[-1] is message:
            if end:
                self.steps_open.discard(index)
            else:
                self.steps_open.add(index)

    @rule()
    def send_usage(self) -> None:
        report = usage_report()
        self._gateway_sends(report, lambda: self.gateway.on_usage(report), Event.USAGE)

    @precondition(lambda self: self.to_gateway > 0)
    @rule()
    def read_cancel(self) -> None:
        self.to_gateway -= 1
        state = self.gateway.state
        outcome = self.gateway.on_cancel()  # never refused
        assert outcome is CANCEL_OUTCOMES[state]
        self.cancelled_outcomes += outcome is CancelStatus.CANCELLED
        if outcome is CancelStatus.CANCELLED:
            assert self.gateway.state is S.CANCELLING
        self.unanswered.append(outcome)
        self._flush_results()

    def _flush_results(self) -> None:
        # A cancel's result goes out once the request's response has (SPEC §5.3).
        if self.gateway.state.is_terminal:
            for outcome in self.unanswered:
                message = result(outcome)
                self.to_client.append(message)
                self.sent.append(message)
            self.unanswered.clear()

    # -- the client ------------------------------------------------------------------------

    @rule()
    def send_cancel(self) -> None:
        self.client.on_cancel()
        self.to_gateway += 1
        self.cancels_sent += 1

    @precondition(lambda self: self.to_client)
    @rule()
    def deliver(self) -> None:
        message = self.to_client.pop(0)
        self.delivered.append(message)
        if isinstance(message, tuple):
            _, seq, text = message
            self.client.on_chunk(seq, text)
        elif isinstance(message, Response):
            self.client.on_response(message)
        elif isinstance(message, UsageReport):
            self.client.on_usage(message)
        elif isinstance(message, Step):
            self.client.on_step(message)
        else:
            assert isinstance(message, CancelResult)
            self.client.on_cancel_result(message)

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def at_most_one_response_and_nothing_after_it_but_results(self) -> None:
        responses = [i for i, m in enumerate(self.sent) if isinstance(m, Response)]
        assert len(responses) <= 1
        if responses:
            after = self.sent[responses[0] + 1 :]
            assert all(isinstance(m, CancelResult | UsageReport) for m in after)
            assert sum(isinstance(m, UsageReport) for m in after) <= 1
            assert self.gateway.state.is_terminal
        else:
            assert not any(isinstance(m, CancelResult | UsageReport) for m in self.sent)

    @invariant()
    def seq_contiguous_and_content_matches(self) -> None:
        chunks = [m for m in self.sent if isinstance(m, tuple)]
        assert [seq for _, seq, _ in chunks] == list(range(len(chunks)))
        if not self.stream:
            assert not chunks
        for m in self.sent:
            if isinstance(m, Response) and m.status is ResponseStatus.COMPLETED and self.stream:
                assert m.content == "".join(text for _, _, text in chunks)

    @invariant()
    def cancel_outcomes(self) -> None:
        assert self.cancelled_outcomes <= 1
        results = [m.status for m in self.sent if isinstance(m, CancelResult)]
        assert results.count(CancelStatus.CANCELLED) <= 1
        assert len(results) + len(self.unanswered) + self.to_gateway == self.cancels_sent

    @invariant()
    def after_a_cancel_is_read_the_response_is_next(self) -> None:
        if self.gateway.state is S.CANCELLING:
            assert not any(isinstance(m, Response) for m in self.sent)

    @invariant()
    def client_agrees_once_everything_arrived(self) -> None:
        if self.to_client:
            return
        assert self.client.next_seq == self.gateway.next_seq
        assert self.client.text == self.gateway.text
        if self.gateway.state.is_terminal:
            assert self.client.state is self.gateway.state
            assert self.client.usage_pending == self.gateway.usage_pending


GatewayAndClient.TestCase.settings = settings(max_examples=150, stateful_step_count=30)
test_gateway_and_client_together = GatewayAndClient.TestCase


def test_state_machine_covers_every_role_state_event_pair():
    """The table-driven test above is exhaustive: every reachable (state, event) per role."""
    ids = {(p.values[0], p.values[1], p.values[2]) for p in PAIRS}
    expected = {
        (role, state, event)
        for role in Sender
        for state, event in itertools.product(REACHABLE[role], Event)
    }
    assert ids == expected


# --- steps (SPEC.md §3.12) ----------------------------------------------------------------------


@ROLES
def test_steps_count_from_zero_and_end_once(role):
    machine = RequestStateMachine(RID, role)
    machine.on_step(step(0, StepState.STARTED))
    machine.on_step(step(1, StepState.STARTED))  # steps may overlap (e.g. tools in parallel)
    machine.on_step(step(0, StepState.ENDED))
    with pytest.raises(REFUSAL[role]):
        machine.on_step(step(0, StepState.ENDED))  # ended twice
    with pytest.raises(REFUSAL[role]):
        machine.on_step(step(3, StepState.STARTED))  # a gap
    with pytest.raises(REFUSAL[role]):
        machine.on_step(step(5, StepState.ENDED))  # never started
    machine.on_step(step(1, StepState.ENDED))
    assert machine.next_step == 2
    assert machine.state is S.ACTIVE


def test_no_step_after_the_cancel_was_read_or_after_the_response():
    gateway = RequestStateMachine(RID, Sender.GATEWAY)
    gateway.on_step(step(0, StepState.STARTED))
    gateway.on_cancel()
    with pytest.raises(LocalProtocolError):
        gateway.on_step(step(0, StepState.ENDED))  # G2: only the cancelled response now
    client = RequestStateMachine(RID, Sender.CLIENT)
    client.on_step(step(0, StepState.STARTED))
    client.on_cancel()
    client.on_step(step(0, StepState.ENDED))  # sent before the gateway read the cancel
    client.on_response(cancelled(final=False))
    with pytest.raises(RemoteProtocolError):
        client.on_step(step(1, StepState.STARTED))


# --- resumable requests (SPEC.md §5.8) ----------------------------------------------------------


def resumable_ack(epoch: str = "e1.1") -> Resumable:
    return Resumable(request_id=RID, epoch=epoch, grace_ms=30_000)


@ROLES
def test_resumable_is_first_once_and_only_when_asked(role):
    machine = RequestStateMachine(RID, role, resumable=True)
    machine.on_resumable(resumable_ack())
    assert machine.epoch == "e1.1"
    with pytest.raises(REFUSAL[role]):
        machine.on_resumable(resumable_ack("e1.2"))  # once
    late = RequestStateMachine(RID, role, resumable=True)
    late.on_chunk(0, "x")
    with pytest.raises(REFUSAL[role]):
        late.on_resumable(resumable_ack())  # before anything else
    plain = RequestStateMachine(RID, role)
    with pytest.raises(REFUSAL[role]):
        plain.on_resumable(resumable_ack())  # only for a chat that asked


def test_a_resuming_client_accepts_nothing_before_its_resume_result():
    machine = RequestStateMachine.resuming(RID, "e1.1", 4)
    for event in (Event.CHUNK, Event.STEP, Event.COMPLETED, Event.MOVED):
        with pytest.raises(RemoteProtocolError):
            apply(machine, event)
    machine.on_resume_result(ResumeResult(request_id=RID, status=ResumeStatus.RESUMED))
    with pytest.raises(RemoteProtocolError):  # one result per resume
        machine.on_resume_result(ResumeResult(request_id=RID, status=ResumeStatus.RESUMED))
    machine.on_chunk(5, " world")  # from after_seq + 1
    with pytest.raises(RemoteProtocolError):
        machine.on_chunk(7, "!")  # no gap
    machine.on_response(completed("hello world"))  # the content ends with what came since
    assert machine.state is S.COMPLETED


def test_a_resumed_completed_content_must_end_with_the_text_since_the_resume():
    machine = RequestStateMachine.resuming(RID, "e1.1", None)
    machine.on_resume_result(ResumeResult(request_id=RID, status=ResumeStatus.RESUMED))
    machine.on_chunk(0, "abc")
    with pytest.raises(RemoteProtocolError):
        machine.on_response(completed("abx"))
    machine.on_response(completed("abc"))


def test_a_resume_not_found_is_gone_and_only_cancel_results_may_follow():
    machine = RequestStateMachine.resuming(RID, "e1.1", 2)
    machine.on_cancel()  # the user pressed Stop while reconnecting
    machine.on_resume_result(not_found())
    assert machine.state is S.GONE
    with pytest.raises(RemoteProtocolError):
        machine.on_chunk(3, "x")
    machine.on_cancel_result(CancelResult(request_id=RID, status=CancelStatus.ALREADY_COMPLETED))


def test_after_moved_nothing_but_cancel_results_of_any_status():
    for status in CancelStatus:
        machine = RequestStateMachine(RID, Sender.CLIENT, resumable=True)
        machine.on_resumable(resumable_ack())
        machine.on_chunk(0, "x")
        machine.on_cancel()
        machine.on_moved()
        assert machine.state is S.MOVED
        for event in (Event.CHUNK, Event.STEP, Event.COMPLETED, Event.CANCELLED, Event.MOVED):
            with pytest.raises(RemoteProtocolError):
                apply(machine, event)
        machine.on_cancel_result(CancelResult(request_id=RID, status=status))


def test_gateway_keeps_each_chunk_of_a_resumable_request_apart():
    machine = RequestStateMachine(RID, Sender.GATEWAY, resumable=True)
    machine.on_chunks(0, ["a", "b"])
    machine.on_chunk(2, "c")
    assert machine.text == "abc"
    assert machine.chunks_after(None) == ["a", "b", "c"]
    assert machine.chunks_after(0) == ["b", "c"]
    assert machine.chunks_after(2) == []
    with pytest.raises(ValueError, match="no chunk 3"):
        machine.chunks_after(3)  # not sent yet
    with pytest.raises(ValueError, match="only a resumable"):
        RequestStateMachine(RID, Sender.GATEWAY).chunks_after(None)  # not resumable


def test_after_a_resume_steps_are_counted_from_the_first_live_one():
    machine = RequestStateMachine.resuming(RID, "e1.1", None)
    machine.on_resume_result(ResumeResult(request_id=RID, status=ResumeStatus.RESUMED))
    machine.on_step(step(1, StepState.ENDED))  # started before the resume: not replayed
    machine.on_step(step(4, StepState.STARTED))
    machine.on_step(step(2, StepState.ENDED))  # also before the resume
    with pytest.raises(RemoteProtocolError):
        machine.on_step(step(6, StepState.STARTED))  # the live ones stay contiguous
    machine.on_step(step(5, StepState.STARTED))
    machine.on_step(step(4, StepState.ENDED))
    with pytest.raises(RemoteProtocolError):
        machine.on_step(step(4, StepState.ENDED))  # twice
    with pytest.raises(RemoteProtocolError):
        machine.on_step(step(7, StepState.ENDED))  # never started


def test_moved_only_for_a_request_known_to_be_resumable():
    plain = RequestStateMachine(RID, Sender.CLIENT)
    with pytest.raises(RemoteProtocolError):
        plain.on_moved()
    asked = RequestStateMachine(RID, Sender.CLIENT, resumable=True)
    with pytest.raises(RemoteProtocolError):
        asked.on_moved()  # its resumable message has not arrived
    asked.on_resumable(resumable_ack())
    asked.on_moved()
    assert asked.state is S.MOVED
