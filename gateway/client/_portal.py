"""A portal: an event loop in a daemon thread that blocking code hands coroutines to.

The sync :class:`Client` keeps its :class:`AsyncClient` (and so its one WebSocket) on this
loop; any number of threads call into it. A ``KeyboardInterrupt`` (Ctrl-C) that arrives while a
thread waits cancels the coroutine it was waiting for -- which sends the request's ``cancel``
frame -- and is then re-raised.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["Portal"]

T = TypeVar("T")

#: After Ctrl-C: how long to wait for the interrupted coroutine to queue its cancel frame.
_INTERRUPT_GRACE = 2.0
#: How often a waiting thread checks that the loop still runs.
_POLL = 0.5


class Portal:
    def __init__(self, name: str = "muxgate-client") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def _check_caller(self) -> None:
        if threading.current_thread() is self._thread:
            raise RuntimeError("a blocking Client method was called from its own event loop")
        if not self.running:
            raise RuntimeError("the client is closed")

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result (cancelled on KeyboardInterrupt)."""
        try:
            self._check_caller()
        except RuntimeError:
            coro.close()
            raise
        done = threading.Event()
        tasks: list[asyncio.Task[T]] = []

        def start() -> None:
            task = self.loop.create_task(coro)
            tasks.append(task)
            task.add_done_callback(lambda _: done.set())

        def cancel() -> None:
            for task in tasks:
                task.cancel()

        self.loop.call_soon_threadsafe(start)
        try:
            # Polled, so that a client closed by another thread meanwhile cannot strand us.
            while not done.wait(_POLL):
                if not self.running:
                    raise RuntimeError("the client is closed")
        except RuntimeError:
            raise
        except BaseException:  # KeyboardInterrupt: stop the work on the gateway too
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(cancel)  # runs after start(): FIFO
            done.wait(_INTERRUPT_GRACE)
            raise
        return tasks[0].result()

    def run_sync(self, fn: Callable[[], T]) -> T:
        """Run a plain function on the loop's thread and return its result."""
        self._check_caller()
        result: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                result.set_result(fn())
            except BaseException as exc:
                result.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        while not concurrent.futures.wait([result], _POLL).done:
            if not self.running:
                raise RuntimeError("the client is closed")
        return result.result()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the loop (cancelling what still runs) and join the thread."""
        if self.loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
