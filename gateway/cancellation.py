"""The cancel flag a request's pipeline polls at its checkpoints (SPEC.md §5.3).

Cancellation is cooperative: setting the token never interrupts running code. The pipeline sees
the flag at its next checkpoint and raises :class:`PipelineHalted` there. The one exception is an
operation the pipeline itself declared *abortable* (a streaming LLM read): it registers a callback
with :meth:`CancelToken.on_cancel` to stop reading at once.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from protocol import CancelReason

__all__ = ["CancelSignal", "CancelToken", "PipelineHalted"]


class PipelineHalted(Exception):
    """Raised at a checkpoint once the request is cancelled; unwinds the pipeline.

    Backends should let it propagate (``finally`` blocks still run). Catching it to carry on is
    a bug: the gateway has already sent the cancelled response.
    """

    def __init__(self, reason: CancelReason, checkpoint: str) -> None:
        super().__init__(f"request cancelled ({reason.value}); halted at {checkpoint}")
        self.reason = reason
        self.checkpoint = checkpoint


class CancelToken:
    """A one-shot flag with a reason. The first :meth:`cancel` wins; later calls change nothing."""

    __slots__ = ("_callbacks", "reason")

    def __init__(self) -> None:
        self.reason: CancelReason | None = None
        self._callbacks: list[Callable[[], object]] = []

    @property
    def cancelled(self) -> bool:
        return self.reason is not None

    def cancel(self, reason: CancelReason) -> bool:
        """Set the flag; True if this call set it. Callbacks run synchronously, once."""
        if self.reason is not None:
            return False
        self.reason = reason
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()
        return True

    def on_cancel(self, callback: Callable[[], object]) -> Callable[[], object]:
        """Run ``callback`` on cancel (now, if already cancelled); returns an unregister."""
        if self.reason is not None:
            callback()
            return _nothing
        self._callbacks.append(callback)
        return partial(self._remove, callback)

    def _remove(self, callback: Callable[[], object]) -> None:
        if callback in self._callbacks:
            self._callbacks.remove(callback)


class CancelSignal:
    """What a backend sees of its request's :class:`CancelToken`: it can look (``cancelled``,
    ``reason``) and listen (:meth:`on_cancel`), never cancel. Only the gateway decides a cancel,
    so a backend cannot end its own request ``cancelled`` behind the client's back."""

    __slots__ = ("_token",)

    def __init__(self, token: CancelToken) -> None:
        self._token = token

    @property
    def cancelled(self) -> bool:
        return self._token.reason is not None

    @property
    def reason(self) -> CancelReason | None:
        return self._token.reason

    def on_cancel(self, callback: Callable[[], object]) -> Callable[[], object]:
        """Run ``callback`` on cancel (now, if already cancelled); returns an unregister."""
        return self._token.on_cancel(callback)


def _nothing() -> None:
    pass
