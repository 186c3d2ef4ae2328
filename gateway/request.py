"""The lifecycle of one request: its pipeline task, cancel token, deadline and terminal decision.

Theory of operation (SPEC.md §5-§6):

- The request's state is its output queue's :class:`protocol.RequestStateMachine` (gateway
  side, ``self.stream.machine``): nothing here keeps a status of its own. The move out of ACTIVE
  happens in exactly one synchronous method: :meth:`Request.cancel` feeds the cancel to the
  machine (``on_cancel``), :meth:`Request._complete` and :meth:`Request._fail` commit the
  response (``OutputQueue.finish`` -> ``on_commit``). The event loop runs one of them at a time,
  so the race between a cancel and completion is decided atomically: whichever the machine sees
  first wins, and the machine gives the cancel its outcome (G4). ``status`` (the ``GET`` word)
  and ``record()`` are read from the machine.
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
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from protocol import (
    CancelReason,
    CancelStatus,
    ChatMessage,
    ErrorCode,
    ErrorInfo,
    Halt,
    HaltState,
    RequestState,
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
from .tracing import NO_TRACING, RequestSpan, Tracing

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
        resumable: bool = False,
        on_finished: Callable[[Request], object] | None = None,
        tracing: Tracing = NO_TRACING,
        traceparent: str | None = None,
    ) -> None:
        self._key = key
        #: Tracing (gateway/tracing.py): the span starts with the request, ends at its halt.
        self._tracing = tracing
        self._traceparent = traceparent
        self.trace: RequestSpan | None = None
        #: Called once the request is finished (SPEC.md §5.6), before anything of its end is
        #: written: the connection stops counting it against max_streams at that moment, so a
        #: client that saw it finish and sends its next chat at once is never refused.
        self._on_finished = on_finished
        self._serial = next(_serials)
        self.outbound = outbound
        self.backend = backend
        self.registry = registry
        self.observer = observer
        self.stream = OutputQueue(
            outbound.scheduler, key.request_id, stream=stream, resumable=resumable
        )
        #: The ``usage`` report once written (a resume after the end replays it, §5.8).
        self.usage_report: UsageReport | None = None
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
        machine = self.stream.machine
        status = RequestStatus.of(machine)
        reason = self.reason
        return RequestRecord(
            request_id=self._key.request_id,
            status=status,
            state=machine.decided,
            usage=self.ctx.usage.snapshot(cancelled=reason is not None, final=final),
            reason=reason,
            error=self.error,
            created_at=self.created_at,
            finished_at=None if status is RequestStatus.ACTIVE else time.time(),
        )

    # -- state, read from the machine --------------------------------------------------------

    @property
    def status(self) -> RequestStatus:
        """Where the request stands, in the words of ``GET`` (SPEC.md §8.2)."""
        return RequestStatus.of(self.stream.machine)

    @property
    def reason(self) -> CancelReason | None:
        """The reason of the effective cancel, if any: the first one fixes it (SPEC.md §5.3)."""
        return self.token.reason

    @property
    def finished(self) -> bool:
        """The pipeline halted: the request no longer counts against a connection (§5.6)."""
        return self.halted_at is not None

    @property
    def undecided(self) -> bool:
        """No cancel read and no response committed yet: the machine is still ACTIVE."""
        return self.stream.machine.decided is RequestState.ACTIVE

    # -- the cancel --------------------------------------------------------------------------

    def cancel(self, reason: CancelReason) -> CancelStatus:
        """Decide a cancel now (G2, G4). Never awaits; never cancels the pipeline task.

        The machine decides: its outcome is the answer, and only ``cancelled`` (it found the
        request ACTIVE, nothing committed) acts."""
        outcome = self.stream.machine.on_cancel()
        if outcome is not CancelStatus.CANCELLED:
            return outcome
        self.cancel_read_at = time.perf_counter()
        self.token.cancel(reason)  # flags the pipeline; aborts an abortable stream read
        if self.trace is not None:
            self.trace.cancel_read(reason.value)
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

    # -- detach and resume (SPEC.md §5.8) ----------------------------------------------------

    def set_on_finished(self, on_finished: Callable[[Request], object] | None) -> None:
        """Who counts the request now (the connection it moved to; None while detached)."""
        self._on_finished = on_finished

    def detach(self, void: Outbound) -> None:
        """Its connection closed: its output goes on into ``void`` (numbered, kept)."""
        if not self.stream.closed:
            self.stream.move_to(void.scheduler)
        self.outbound = void

    def reattach(self, outbound: Outbound, after_seq: int) -> None:
        """Resumed on ``outbound``'s connection, the client having the chunks up to
        ``after_seq`` (-1: none): those after it go out again first, then the live output;
        or, if the response was already sent (elsewhere or nowhere), it and the usage report.
        The caller checked that ``after_seq`` is below the machine's ``next_seq``."""
        old, stream = self.outbound, self.stream
        if not stream.closed:
            if stream.trailer:  # answers to the old connection's own cancels: theirs
                old.send_control(*stream.trailer)
            stream.move_to(outbound.scheduler, replay_after=after_seq)
        else:
            response = stream.sent_response
            assert response is not None, "a closed queue of a resumable request sent its end"
            replay = OutputQueue(
                outbound.scheduler, self._key.request_id, stream=True, machine=stream.machine
            )
            replay.sent_response = response
            outbound.attach_stream(replay)
            after = (self.usage_report,) if self.usage_report is not None else ()
            replay.replay_ended(after_seq, response, *after)
            self.stream = replay
        self.outbound = outbound
        outbound.write_now()

    # -- the pipeline ------------------------------------------------------------------------

    def start_cancelled(self, reason: CancelReason) -> None:
        """Accept the request and end it at once, cancelled, without starting its pipeline: a
        cancel for its id arrived before it (SPEC.md §5.3, cancel before start). Its only
        message is the cancelled response, with zero usage, final."""
        self.registry.add(self)
        self._trace_start()
        self.outbound.attach_stream(self.stream)
        self.observer.request_started(self)
        self.stream.machine.on_cancel()
        self.cancel_read_at = time.perf_counter()
        self.token.cancel(reason)
        if self.trace is not None:
            self.trace.cancel_read(reason.value)
        halt = Halt(state=HaltState.HALTED) if self.reports_steps else None
        response = Response(
            request_id=self._key.request_id,
            status=ResponseStatus.CANCELLED,
            reason=reason,
            usage=self.ctx.usage.snapshot(cancelled=True, final=True),
            halt=halt,
        )
        self.outbound.cancel_stream(self.stream, response, on_sent=self._cancel_sent)
        self.outbound.write_now()
        self._answered()
        self._halted()

    def start(self) -> asyncio.Task[None]:
        """Register, open the outbound stream, arm the deadline, start the pipeline task.

        Raises :class:`registry.DuplicateRequest` (and changes nothing) if the user already has
        an active request with this id.
        """
        self.registry.add(self)
        self._trace_start()
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
            if self.undecided:
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
            if self.undecided:
                self._fail(exc)
        except Exception as exc:  # the backend's failure is this request's, not the gateway's
            if self.undecided:
                self._fail(exc)
        else:
            if self.undecided:
                self._complete()
        finally:
            self._halted()

    def _complete(self) -> None:
        self.stream.finish(  # commits the response: the machine is decided COMPLETED
            ResponseStatus.COMPLETED, self.ctx.usage.snapshot(cancelled=False, final=True)
        )
        self._answered()

    def _fail(self, exc: BaseException) -> None:
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
        self.stream.finish(  # commits the response: the machine is decided FAILED
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

    def _trace_start(self) -> None:
        trace = self._tracing.request(
            request_id=self._key.request_id,
            user_id=self._key.user_id,
            traceparent=self._traceparent,
        )
        if trace is not None:
            self.trace = trace
            self.ctx.trace_steps(trace)

    def _cancel_sent(self) -> None:
        self.cancel_sent_at = time.perf_counter()
        if self.trace is not None:
            self.trace.cancel_sent()
        self.observer.cancel_sent(self)

    def _halted(self) -> None:
        self.halted_at = time.perf_counter()
        machine = self.stream.machine
        if machine.usage_pending:  # cancelled, and the response's usage was not final
            usage = self.ctx.usage.snapshot(cancelled=True, final=True)
            halt = None
            if self.reports_steps:
                step, aborted = self.ctx.halted_in()
                halt = Halt(state=HaltState.HALTED, step=_step_info(step), aborted=aborted)
            # SPEC.md §5.4: the final figure follows the non-final one in the response.
            report = UsageReport(request_id=self._key.request_id, usage=usage, halt=halt)
            machine.on_usage(report)  # status: cancelling -> cancelled
            self.usage_report = report
            self.outbound.send_control(report)
        # Finished (SPEC.md §5.6): the id is free and the record kept for late cancels and GET.
        self.registry.finished(self)
        if self._on_finished is not None:
            self._on_finished(self)
        self.observer.request_halted(self)
        if self.trace is not None:
            meter = self.ctx.usage
            reason = self.reason
            self.trace.halted(
                status=self.status.value,
                reason=reason.value if reason is not None else None,
                input_tokens=meter.input_tokens,
                output_tokens=meter.output_tokens,
                saved_tokens=meter.saved_tokens if reason is not None else 0,
                error_code=self.error.code if self.error is not None else None,
            )


def _step_info(step: StepRecord | None) -> StepInfo | None:
    if step is None:
        return None
    return StepInfo(index=step.index, kind=step.kind, name=step.name)
