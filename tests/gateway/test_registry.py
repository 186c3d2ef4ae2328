"""The registry without a gateway: one state machine (the protocol's, gateway side) is the source
of a request's ``GET`` status word and of every cancel outcome, live or remembered (SPEC.md §5.1,
§5.3, §5.6, §8.2)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from gateway.registry import (
    DuplicateRequest,
    InMemoryRegistry,
    RequestKey,
    RequestRecord,
    RequestStatus,
)
from protocol import (
    CancelReason,
    CancelStatus,
    ErrorInfo,
    RequestState,
    RequestStateMachine,
    Response,
    ResponseStatus,
    Sender,
    Usage,
    UsageReport,
)
from protocol.state import CANCEL_OUTCOMES

RID = "r1"
KEY = RequestKey("", RID)
S = RequestState


def cancelled_response() -> Response:
    return Response(
        request_id=RID,
        status=ResponseStatus.CANCELLED,
        reason=CancelReason.CLIENT,
        usage=Usage(final=False),
    )


def final_usage() -> UsageReport:
    return UsageReport(request_id=RID, usage=Usage(final=True))


@dataclass
class FakeRequest:
    """A :class:`gateway.registry.LiveRequest` that keeps nothing but a gateway machine, as
    :class:`gateway.request.Request` does: the cancel is the machine's, the record read from
    it."""

    key: RequestKey = KEY
    serial: int = 1
    machine: RequestStateMachine = field(
        default_factory=lambda: RequestStateMachine(RID, Sender.GATEWAY)
    )
    reasons: list[CancelReason] = field(default_factory=list)

    def cancel(self, reason: CancelReason) -> CancelStatus:
        outcome = self.machine.on_cancel()
        if outcome is CancelStatus.CANCELLED:
            self.reasons.append(reason)
            self.machine.on_response(cancelled_response())
        return outcome

    def record(self) -> RequestRecord:
        return RequestRecord(
            request_id=RID,
            status=RequestStatus.of(self.machine),
            state=self.machine.decided,
            usage=Usage(),
            reason=self.reasons[0] if self.reasons else None,
        )


# -- the GET word, from the machine --------------------------------------------------------------


def test_status_word_follows_the_machine_through_a_cancel():
    machine = RequestStateMachine(RID, Sender.GATEWAY)
    assert RequestStatus.of(machine) is RequestStatus.ACTIVE
    machine.on_cancel()
    assert RequestStatus.of(machine) is RequestStatus.CANCELLING  # read, response not queued
    machine.on_response(cancelled_response())
    assert RequestStatus.of(machine) is RequestStatus.CANCELLING  # the pipeline runs on
    machine.on_usage(final_usage())
    assert RequestStatus.of(machine) is RequestStatus.CANCELLED  # halted: final usage out


def test_a_cancelled_response_with_final_usage_is_cancelled_at_once():
    machine = RequestStateMachine(RID, Sender.GATEWAY)
    machine.on_cancel()
    response = cancelled_response()
    machine.on_response(
        Response(request_id=RID, status=response.status, reason=response.reason, usage=Usage())
    )
    assert RequestStatus.of(machine) is RequestStatus.CANCELLED


@pytest.mark.parametrize(
    ("status", "word"),
    [
        (ResponseStatus.COMPLETED, RequestStatus.COMPLETED),
        (ResponseStatus.FAILED, RequestStatus.FAILED),
    ],
    ids=["completed", "failed"],
)
def test_status_word_is_decided_by_the_commit_not_the_write(status, word):
    machine = RequestStateMachine(RID, Sender.GATEWAY, stream=False)
    machine.on_commit(status)  # queued behind text not yet written
    assert machine.state is S.ACTIVE
    assert RequestStatus.of(machine) is word
    failed = status is ResponseStatus.FAILED
    error = ErrorInfo(code="backend_error", message="x") if failed else None
    machine.on_response(Response(request_id=RID, status=status, error=error))
    assert RequestStatus.of(machine) is word


def test_every_word_is_a_spec_word():
    """SPEC.md §8.2, exactly: the ``status`` of GET."""
    assert [w.value for w in RequestStatus] == [
        "active",
        "cancelling",
        "completed",
        "cancelled",
        "failed",
    ]


# -- cancel outcomes: live requests decide, finished ones are looked up in the same table --------


def test_live_request_decides_its_cancel():
    registry = InMemoryRegistry()
    request = FakeRequest()
    registry.add(request)
    assert registry.cancel_local(KEY, CancelReason.API) is CancelStatus.CANCELLED
    assert registry.cancel_local(KEY, CancelReason.CLIENT) is CancelStatus.ALREADY_CANCELLED
    assert request.reasons == [CancelReason.API]  # the first effective cancel fixed the reason


def test_live_request_committed_is_already_completed():
    registry = InMemoryRegistry()
    request = FakeRequest()
    registry.add(request)
    request.machine.on_commit(ResponseStatus.COMPLETED)
    assert registry.cancel_local(KEY, CancelReason.API) is CancelStatus.ALREADY_COMPLETED
    assert request.reasons == []


@pytest.mark.parametrize(
    "finish",
    ["completed", "failed", "cancelled", "cancelled-halted"],
)
async def test_a_finished_request_answers_from_its_frozen_state(finish):
    registry = InMemoryRegistry()
    request = FakeRequest()
    registry.add(request)
    machine = request.machine
    if finish.startswith("cancelled"):
        assert request.cancel(CancelReason.TIMEOUT) is CancelStatus.CANCELLED
        if finish == "cancelled-halted":
            machine.on_usage(final_usage())
    elif finish == "completed":
        machine.on_response(Response(request_id=RID, status=ResponseStatus.COMPLETED))
    else:
        error = ErrorInfo(code="backend_error", message="x")
        machine.on_response(Response(request_id=RID, status=ResponseStatus.FAILED, error=error))
    registry.finished(request)
    # Whatever the machine does now, the remembered record answers: it was frozen at the end.
    request.machine = RequestStateMachine(RID, Sender.GATEWAY)
    record = await registry.lookup(KEY)
    assert record is not None
    assert record.state is machine.state
    assert record.status is RequestStatus.of(machine)
    expected = CANCEL_OUTCOMES[machine.state]
    assert record.cancel_outcome is expected
    assert registry.cancel_local(KEY, CancelReason.API) is expected
    assert await registry.cancel(KEY, CancelReason.CLIENT) is expected
    assert "state" not in record.to_json()  # not part of GET's body


async def test_unknown_and_expired_are_not_found():
    registry = InMemoryRegistry(retention_count=1)
    assert registry.cancel_local(KEY, CancelReason.API) is CancelStatus.NOT_FOUND
    request = FakeRequest()
    registry.add(request)
    request.machine.on_response(Response(request_id=RID, status=ResponseStatus.COMPLETED))
    registry.finished(request)
    other = FakeRequest(key=RequestKey("", "r2"), serial=2)
    registry.add(other)
    other.machine.on_response(Response(request_id=RID, status=ResponseStatus.COMPLETED))
    registry.finished(other)  # the count bound forces r1 out
    assert registry.cancel_local(KEY, CancelReason.API) is CancelStatus.NOT_FOUND
    assert await registry.lookup(KEY) is None


def test_a_reused_id_is_a_new_request():
    registry = InMemoryRegistry()
    first = FakeRequest()
    registry.add(first)
    with pytest.raises(DuplicateRequest):
        registry.add(FakeRequest(serial=2))
    first.machine.on_response(Response(request_id=RID, status=ResponseStatus.COMPLETED))
    registry.finished(first)
    assert registry.cancel_local(KEY, CancelReason.API) is CancelStatus.ALREADY_COMPLETED
    second = FakeRequest(serial=2)
    registry.add(second)
    assert registry.cancel_local(KEY, CancelReason.API) is CancelStatus.CANCELLED
