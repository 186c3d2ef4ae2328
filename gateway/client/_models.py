"""What the SDK hands back: responses, chunks, cancel results, request records.

``Chunk``, ``Usage``, ``CancelResult`` and ``ErrorInfo`` are the protocol's own frozen
dataclasses (``protocol/messages.py``), passed through as decoded; the status enums are
``StrEnum``s, so ``response.status == "cancelled"`` works as on the seed page.
``usage.estimated`` names the figures that are the gateway's estimates rather than the
provider's counts (a tuple in the order ``input_tokens``, ``output_tokens``, ``saved_tokens``;
``()`` when all are reported; ``None`` when the gateway does not say — SPEC.md §3.8).

For a chat sent with ``steps=True`` (SPEC.md §3.12), ``Step`` is one pipeline step that started
or ended (``index``, ``kind`` — ``plan``, ``llm``, ``llm_stream``, ``tool``, ``agent`` or a kind
this SDK does not know —, ``name``, ``state``), and ``Halt`` says where the pipeline of a
cancelled request halts: ``state`` ``pending`` (it is finishing ``halt.step``, a
:class:`StepInfo`, or halts at its next checkpoint when there is no step) or ``halted`` (after
``halt.step``, or inside it when ``halt.aborted``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from protocol import (
    CancelReason,
    CancelResult,
    CancelStatus,
    Chunk,
    ErrorInfo,
    Halt,
    HaltState,
    ResponseStatus,
    Step,
    StepInfo,
    StepState,
    Usage,
)
from protocol import Response as WireResponse

__all__ = [
    "CancelReason",
    "CancelResult",
    "CancelStatus",
    "Chunk",
    "ErrorInfo",
    "Halt",
    "HaltState",
    "RequestInfo",
    "Response",
    "ResponseStatus",
    "Step",
    "StepInfo",
    "StepState",
    "Usage",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Response:
    """The terminal response of one request (SPEC.md §3.7).

    ``content`` is the whole answer when ``status`` is ``completed`` and ``""`` otherwise (no
    partial results). ``reason`` says why a request was cancelled (``client``, ``api``,
    ``timeout``, ``disconnect``, ``shutdown``); ``error`` what failed. ``usage`` is the figure
    the response carried: for a cancelled request it may still grow (``usage.final`` false)
    until the pipeline halts; ``Client.final_usage(response)`` waits for the final one.
    ``halt`` (only for a cancelled chat sent with ``steps=True``, by a gateway that knows steps)
    says where the pipeline halts: ``pending`` while ``usage.final`` is false, else ``halted``;
    a stream's :attr:`AsyncChatStream.halt` then gives the final one (SPEC.md §3.12).
    """

    request_id: str
    status: ResponseStatus
    content: str = ""
    reason: CancelReason | None = None
    error: ErrorInfo | None = None
    usage: Usage = field(default_factory=Usage)
    halt: Halt | None = None
    # Resolved by the connection when the late ``usage`` message arrives (SPEC.md §5.4).
    _final_usage: asyncio.Future[Usage] | None = field(
        default=None, repr=False, compare=False, hash=False
    )
    # The chat's user_id field: whom to ask over HTTP if the connection drops before then.
    _user_id: str | None = field(default=None, repr=False, compare=False, hash=False)

    @classmethod
    def from_wire(
        cls,
        message: WireResponse,
        final_usage: asyncio.Future[Usage] | None = None,
        *,
        user_id: str | None = None,
    ) -> Response:
        return cls(
            request_id=message.request_id,
            status=message.status,
            content=message.content,
            reason=message.reason,
            error=message.error,
            usage=message.usage,
            halt=message.halt,
            _final_usage=final_usage,
            _user_id=user_id,
        )

    @property
    def completed(self) -> bool:
        return self.status is ResponseStatus.COMPLETED

    @property
    def cancelled(self) -> bool:
        return self.status is ResponseStatus.CANCELLED

    def to_dict(self) -> dict[str, Any]:
        """The seed page's JSON shape, plus the optional fields that are set."""
        body: dict[str, Any] = {
            "content": self.content,
            "status": self.status.value,
            "request_id": self.request_id,
        }
        if self.reason is not None:
            body["reason"] = self.reason.value
        if self.error is not None:
            body["error"] = {"code": self.error.code, "message": self.error.message}
        body["usage"] = {
            "input_tokens": self.usage.input_tokens,
            "output_tokens": self.usage.output_tokens,
            "saved_tokens": self.usage.saved_tokens,
            "final": self.usage.final,
        }
        if self.usage.estimated is not None:  # which figures are estimates (SPEC.md §3.8)
            body["usage"]["estimated"] = list(self.usage.estimated)
        if self.halt is not None:  # where the pipeline halts (SPEC.md §3.12)
            body["halt"] = _halt_dict(self.halt)
        return body


def _halt_dict(halt: Halt) -> dict[str, Any]:
    """``halt`` in its wire shape (SPEC.md §3.12)."""
    body: dict[str, Any] = {"state": halt.state.value}
    if halt.step is not None:
        body["step"] = {"index": halt.step.index, "kind": halt.step.kind, "name": halt.step.name}
    body["aborted"] = halt.aborted
    return body


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestInfo:
    """``GET /v1/requests/{id}`` (SPEC.md §8.2): a request's state, running or remembered.

    ``status`` is ``active``, ``cancelling``, ``cancelled``, ``completed``, ``failed`` or
    ``not_found`` (unknown, forgotten, or another user's).
    """

    request_id: str
    status: str
    reason: CancelReason | None = None
    error: ErrorInfo | None = None
    usage: Usage | None = None
