"""The lifecycle of one request: its pipeline task, cancel token, deadline and terminal decision.

Theory of operation (SPEC.md §5-§6):

- ``status`` moves ACTIVE -> COMPLETED | FAILED | CANCELLING -> CANCELLED, and the move out of
  ACTIVE happens in exactly one synchronous method (:meth:`Request.cancel`,
  :meth:`Request._complete`, :meth:`Request._fail`). The event loop runs one of them at a time,
  so the race between a cancel and completion is decided atomically: whoever runs first wins, the
  other sees a non-ACTIVE status (G4).
- A cancel flags the pipeline (the :class:`CancelToken`), drops the request's pending text and
  queues the cancelled response in the same step (G2). It never cancels the pipeline task: the
  pipeline halts at its next checkpoint (G5). Only then is the usage final; the ``usage`` report
  follows (SPEC.md §5.4).
- The request stays in the registry's finished records after its response, for late cancels and
  ``GET``; the pipeline task is awaited by the connection, so nothing is left behind.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from protocol import (
    CancelReason,
    CancelStatus,
    ChatMessage,
    ErrorCode,
    ErrorInfo,
    Halt,
    HaltState,
    Response,
    ResponseStatus,
    StepInfo,
    UsageReport,
)

from .cancellation import CancelToken, PipelineHalted
from .outbound import Outbound
from .output_queue import ContentTooLarge, OutputQueue
from .pipeline import Backend, BackendFailure, RequestContext, StepRecord
from .registry import RequestKey, RequestRecord, RequestRegistry, RequestStatus

__all__ = ["Request", "RequestObserver"]

_serials = itertools.count(1)


class RequestObserver(Protocol):
    """Metrics and logs hook; one per gateway."""

    def request_started(self, request: Request) -> None: ...

    def request_answered(self, request: Request) -> None:
        """The terminal response was decided (completed, failed or cancelled)."""
        ...

    def request_halted(self, request: Request) -> None:
        """The pipeline task ended; usage is final."""
        ...

    def cancel_sent(self, request: Request) -> None:
        """The cancelled response was handed to the socket."""
        ...


class Request:
    """One accepted ``chat`` on this node. Implements :class:`registry.LiveRequest`."""

    def __init__(
        self,
        *,
        key: RequestKey,
        stream: bool,
        messages: Sequence[ChatMessage],
        metadata: Mapping[str, Any],
        outbound: Outbound,
        backend: Backend,
        registry: RequestRegistry,
        observer: RequestObserver,
        timeout: float | None,
        max_content_chars: int | None = None,
        steps: bool = False,
    ) -> None:
        self._key = key
        self._serial = next(_serials)
        self.outbound = outbound
        self.backend = backend
        self.registry = registry
        self.observer = observer
        self.stream = OutputQueue(outbound.scheduler, key.request_id, stream=stream)
        if max_content_chars is not None:
            self.stream.max_content_chars = max_content_chars
        self.token = CancelToken()
        self._timeout = timeout
        self.deadline: float | None = None
        self.ctx = RequestContext(
            request_id=key.request_id,
            user_id=key.user_id,
            messages=messages,
            metadata=metadata,
            deadline=None,
            token=self.token,
            sink=self.stream,
            steps=self.stream if steps else None,
        )
        #: The client asked for its pipeline's steps (``chat.steps``): halt objects too.
        self.reports_steps = steps
        self.status = RequestStatus.ACTIVE
        self.reason: CancelReason | None = None
        self.error: ErrorInfo | None = None
        self.created_at = time.time()
        self.started = time.perf_counter()
        self.cancel_read_at: float | None = None
        self.cancel_sent_at: float | None = None
        self.halted_at: float | None = None
        self.task: asyncio.Task[None] | None = None
        self.failure: BaseException | None = None
        #: True when the failure was expected and explained to the client (the backend raised
        #: BackendFailure, or the answer would not fit a frame): no traceback in the log.
        self.failure_expected = False
        self._deadline_handle: asyncio.TimerHandle | None = None

    # -- LiveRequest -------------------------------------------------------------------------

    @property
    def key(self) -> RequestKey:
        return self._key

    @property
    def serial(self) -> int:
        return self._serial

    def record(self) -> RequestRecord:
        final = self.halted_at is not None
        return RequestRecord(
            request_id=self._key.request_id,
            status=self.status,
            usage=self.ctx.usage.snapshot(cancelled=self.reason is not None, final=final),
            reason=self.reason,
            error=self.error,
            created_at=self.created_at,
            finished_at=None if self.status is RequestStatus.ACTIVE else time.time(),
        )

    def cancel(self, reason: CancelReason) -> CancelStatus:
        """Decide a cancel now (G2, G4). Never awaits; never cancels the pipeline task."""
        if self.status is not RequestStatus.ACTIVE:
            if self.status in (RequestStatus.CANCELLING, RequestStatus.CANCELLED):
                return CancelStatus.ALREADY_CANCELLED
            return CancelStatus.ALREADY_COMPLETED
        self.status = RequestStatus.CANCELLING
        self.reason = reason
        self.cancel_read_at = time.perf_counter()
        self.token.cancel(reason)  # flags the pipeline; aborts an abortable stream read
        self.stream.machine.on_cancel()
        halt = None
        if self.reports_steps:  # where the pipeline will halt: after the step it is in, if any
            halt = Halt(state=HaltState.PENDING, step=_step_info(self.ctx.halt_pending()))
        response = Response(
            request_id=self._key.request_id,
            status=ResponseStatus.CANCELLED,
            reason=reason,
            usage=self.ctx.usage.snapshot(cancelled=True, final=False),
            halt=halt,
        )
        self.outbound.cancel_stream(self.stream, response, on_sent=self._cancel_sent)
        self.outbound.write_now()  # on the socket now; the bookkeeping below can wait
        self._answered()
        return CancelStatus.CANCELLED

    # -- the pipeline ------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        """Register, open the outbound stream, arm the deadline, start the pipeline task.

        Raises :class:`registry.DuplicateRequest` (and changes nothing) if the user already has
        an active request with this id.
        """
        self.registry.add(self)
        self.outbound.attach_stream(self.stream)
        loop = asyncio.get_running_loop()
        if self._timeout is not None:
            self.deadline = self.ctx.deadline = loop.time() + self._timeout
            self._deadline_handle = loop.call_at(self.deadline, self._expire)
        self.observer.request_started(self)
        self.task = loop.create_task(self._run(), name=f"muxgate-request-{self._key.request_id}")
        return self.task

    async def _run(self) -> None:
        try:
            await self.backend.run(self.ctx)
        except PipelineHalted as exc:
            if self.status is RequestStatus.ACTIVE:
                # Halted although nobody cancelled (a backend raised it itself): without this
                # the request would never get its response (G1). It is the backend's failure.
                self._fail(exc)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Only a last resort at shutdown cancels this task; the cancel decides the
                # response.
                self.cancel(CancelReason.SHUTDOWN)
                raise
            # Nobody cancelled this task: the backend let a CancelledError of its own escape
            # (an inner task it cancelled). That is its failure, not a cancel of the request.
            if self.status is RequestStatus.ACTIVE:
                self._fail(exc)
        except Exception as exc:  # the backend's failure is this request's, not the gateway's
            if self.status is RequestStatus.ACTIVE:
                self._fail(exc)
        else:
            if self.status is RequestStatus.ACTIVE:
                self._complete()
        finally:
            self._halted()

    def _complete(self) -> None:
        self.status = RequestStatus.COMPLETED
        self.stream.finish(
            ResponseStatus.COMPLETED, self.ctx.usage.snapshot(cancelled=False, final=True)
        )
        self._answered()

    def _fail(self, exc: BaseException) -> None:
        self.status = RequestStatus.FAILED
        if isinstance(exc, BackendFailure):  # the backend explains it (e.g. invalid_field)
            self.error = exc.error
            self.failure_expected = True
        elif isinstance(exc, ContentTooLarge):  # the answer would not fit a frame
            self.error = ErrorInfo(code=ErrorCode.FRAME_TOO_LARGE, message=str(exc))
            self.failure_expected = True
        else:
            # A bug. Details may be sensitive: the client gets a code and a generic message;
            # the log the rest, with the traceback.
            self.error = ErrorInfo(code=ErrorCode.BACKEND_ERROR, message="the backend failed")
        self.failure = exc
        self.stream.finish(
            ResponseStatus.FAILED,
            self.ctx.usage.snapshot(cancelled=False, final=True),
            self.error,
        )
        self._answered()

    def _expire(self) -> None:
        self.cancel(CancelReason.TIMEOUT)

    def _answered(self) -> None:
        if self._deadline_handle is not None:
            self._deadline_handle.cancel()
            self._deadline_handle = None
        self.observer.request_answered(self)

    def _cancel_sent(self) -> None:
        self.cancel_sent_at = time.perf_counter()
        self.observer.cancel_sent(self)

    def _halted(self) -> None:
        self.halted_at = time.perf_counter()
        if self.status is RequestStatus.CANCELLING:
            self.status = RequestStatus.CANCELLED
            usage = self.ctx.usage.snapshot(cancelled=True, final=True)
            halt = None
            if self.reports_steps:
                step, aborted = self.ctx.halted_in()
                halt = Halt(state=HaltState.HALTED, step=_step_info(step), aborted=aborted)
            # SPEC.md §5.4: the final figure follows the non-final one in the response.
            self.outbound.send_control(
                UsageReport(request_id=self._key.request_id, usage=usage, halt=halt)
            )
        # Finished (SPEC.md §5.6): the id is free and the record kept for late cancels and GET.
        self.registry.finished(self)
        self.observer.request_halted(self)


def _step_info(step: StepRecord | None) -> StepInfo | None:
    if step is None:
        return None
    return StepInfo(index=step.index, kind=step.kind, name=step.name)
