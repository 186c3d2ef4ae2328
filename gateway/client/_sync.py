"""``Client``: the blocking SDK, for scripts, threads and the terminal.

It runs an :class:`AsyncClient` on a :class:`Portal` (an event loop in a daemon thread), so it
keeps one multiplexed WebSocket however many threads call it. Every blocking wait cancels the
request when interrupted: Ctrl-C (``KeyboardInterrupt``) during :meth:`Client.chat` or while
iterating :meth:`Client.chat_stream` sends the ``cancel`` frame, then re-raises.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import weakref
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

from protocol import CancelResult, Codec, Usage

from ._async import AsyncChatStream, AsyncClient, MessagesLike, StepCallback, new_request_id
from ._config import CodecName
from ._models import Chunk, Halt, RequestInfo, Response, Step
from ._portal import Portal

__all__ = ["ChatFuture", "ChatStream", "Client"]


class ChatFuture(concurrent.futures.Future[Response]):
    """The handle :meth:`Client.chat_async` returns: a :class:`concurrent.futures.Future`
    whose :meth:`cancel` also cancels the request on the gateway, and whose :meth:`result`
    cancels it on Ctrl-C."""

    def __init__(self, task: asyncio.Task[Response], request_id: str) -> None:
        super().__init__()
        self._task = task
        self.request_id = request_id
        task.add_done_callback(self._copy)

    def _copy(self, task: asyncio.Task[Response]) -> None:
        try:
            if task.cancelled():
                super().cancel()
            elif (exc := task.exception()) is not None:
                self.set_exception(exc)
            else:
                self.set_result(task.result())
        except concurrent.futures.InvalidStateError:
            pass  # cancelled from this side meanwhile

    def cancel(self) -> bool:
        """Cancel the request (the ``cancel`` frame is sent); ``False`` if it already ended."""
        if not super().cancel():
            return False
        loop = self._task.get_loop()
        with contextlib.suppress(RuntimeError):  # a closed loop: the connection is gone (G7)
            loop.call_soon_threadsafe(self._task.cancel)
        return True

    def result(self, timeout: float | None = None) -> Response:
        try:
            return super().result(timeout)
        except KeyboardInterrupt:
            self.cancel()
            raise


class ChatStream:
    """The chunks of one streamed chat, as an iterator (see :meth:`Client.chat_stream`).

    ``for chunk in stream`` yields :class:`Chunk`\\s (``chunk.text``); afterwards
    ``stream.response`` is the final :class:`Response`. Leaving the loop early (``break``,
    an exception, Ctrl-C), :meth:`close` or leaving ``with`` cancels the request. With
    ``steps=True``, :attr:`steps`, :attr:`current_step` and :attr:`halt` follow the pipeline
    as on :class:`AsyncChatStream`.
    """

    def __init__(self, portal: Portal, stream: AsyncChatStream) -> None:
        self._portal = portal
        self._stream = stream

    def __repr__(self) -> str:
        return repr(self._stream).replace("AsyncChatStream", "ChatStream", 1)

    @property
    def request_id(self) -> str:
        return self._stream.request_id

    @property
    def response(self) -> Response | None:
        """The final response, once iteration has ended (or after :meth:`cancel`)."""
        return self._stream.response

    @property
    def text(self) -> str:
        """Everything streamed so far."""
        return self._stream.text

    @property
    def steps(self) -> tuple[Step, ...]:
        """The steps reached so far, in order with the chunks (see
        :attr:`AsyncChatStream.steps`)."""
        return self._stream.steps

    @property
    def current_step(self) -> Step | None:
        """The latest step started and not ended while the pipeline runs (see
        :attr:`AsyncChatStream.current_step`)."""
        return self._stream.current_step

    @property
    def halt(self) -> Halt | None:
        """Where the cancelled pipeline halts: pending, then final (see
        :attr:`AsyncChatStream.halt`)."""
        return self._stream.halt

    @property
    def resumes(self) -> int:
        """How many times this resumable stream was resumed on a new connection."""
        return self._stream.resumes

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Chunk:
        try:
            return self._portal.call(self._stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def cancel(self) -> Response | None:
        """Cancel the request and wait for its final response (``None`` if never sent)."""
        return self._portal.call(self._stream.cancel())

    def close(self) -> None:
        """Stop; cancel the request unless it already has its answer."""
        if self._portal.running:
            self._portal.call(self._stream.aclose())

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Client:
    """A blocking client of a muxgate gateway, safe to share between threads.

    Same arguments and defaults as :class:`AsyncClient`: ``Client()`` reads ``MUXGATE_URL``
    (default ``ws://localhost:8001``) and ``MUXGATE_CLIENT_KEY``. One WebSocket, opened on the
    first call, reopened on the next call after it dropped (at once, by itself, while
    resumable requests wait to be resumed: ``resumable=True``, SPEC.md §5.8). Use
    ``with Client() as client:`` or call :meth:`close`.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client_key: str | None = None,
        token: str | None = None,
        user_id: str | None = None,
        codec: CodecName | Codec = "json",
        connect_timeout: float = 10.0,
        resumable: bool = False,
        reconnect_timeout: float = 30.0,
    ) -> None:
        self._async = AsyncClient(
            url,
            client_key=client_key,
            token=token,
            user_id=user_id,
            codec=codec,
            connect_timeout=connect_timeout,
            resumable=resumable,
            reconnect_timeout=reconnect_timeout,
        )
        self._portal = Portal()
        # A client dropped without close() must not leave its thread behind.
        self._finalizer = weakref.finalize(self, self._portal.stop, None)

    def __repr__(self) -> str:
        return f"Client({self.url!r}, codec={self.codec.name.lower()!r})"

    @property
    def url(self) -> str:
        return self._async.url

    @property
    def http_url(self) -> str:
        return self._async.http_url

    @property
    def codec(self) -> Codec:
        return self._async.codec

    @property
    def user_id(self) -> str | None:
        return self._async.user_id

    @property
    def connected(self) -> bool:
        return self._async.connected

    @property
    def resumable(self) -> bool:
        """The default of every chat's ``resumable`` (see :class:`AsyncClient`)."""
        return self._async.resumable

    @property
    def reconnect_timeout(self) -> float:
        return self._async.reconnect_timeout

    def chat(
        self,
        message: str | None = None,
        *,
        request_id: str | None = None,
        user_id: str | None = None,
        timeout: float | None = None,
        metadata: Mapping[str, Any] | None = None,
        messages: MessagesLike | None = None,
        steps: bool = False,
        resumable: bool | None = None,
        grace: float | None = None,
    ) -> Response:
        """Send one chat and wait for its :class:`Response` (see :meth:`AsyncClient.chat`).
        Ctrl-C while waiting cancels the request on the gateway, then raises
        ``KeyboardInterrupt``."""
        return self._portal.call(
            self._async.chat(
                message,
                request_id=request_id,
                user_id=user_id,
                timeout=timeout,
                metadata=metadata,
                messages=messages,
                steps=steps,
                resumable=resumable,
                grace=grace,
            )
        )

    def chat_async(
        self,
        message: str | None = None,
        *,
        request_id: str | None = None,
        user_id: str | None = None,
        timeout: float | None = None,
        metadata: Mapping[str, Any] | None = None,
        messages: MessagesLike | None = None,
        steps: bool = False,
        resumable: bool | None = None,
        grace: float | None = None,
    ) -> ChatFuture:
        """Start a chat and return at once with a :class:`ChatFuture`: ``.result(timeout)``
        waits for the :class:`Response`, ``.cancel()`` cancels the request on the gateway.
        :meth:`cancel_request` with its id works right away."""
        rid = request_id if request_id is not None else new_request_id()

        def start() -> ChatFuture:
            task = self._async.chat_async(
                message,
                request_id=rid,
                user_id=user_id,
                timeout=timeout,
                metadata=metadata,
                messages=messages,
                steps=steps,
                resumable=resumable,
                grace=grace,
            )
            return ChatFuture(task, rid)

        return self._portal.run_sync(start)

    def chat_stream(
        self,
        message: str | None = None,
        *,
        request_id: str | None = None,
        user_id: str | None = None,
        timeout: float | None = None,
        metadata: Mapping[str, Any] | None = None,
        messages: MessagesLike | None = None,
        steps: bool = False,
        on_step: StepCallback | None = None,
        resumable: bool | None = None,
        grace: float | None = None,
    ) -> ChatStream:
        """A streamed chat: ``for chunk in client.chat_stream(...)`` (see
        :meth:`AsyncClient.chat_stream`). ``on_step`` runs in the client's background thread,
        in order with the chunks, while the iterating thread waits for the next chunk."""
        stream = self._async.chat_stream(
            message,
            request_id=request_id,
            user_id=user_id,
            timeout=timeout,
            metadata=metadata,
            messages=messages,
            steps=steps,
            on_step=on_step,
            resumable=resumable,
            grace=grace,
        )
        return ChatStream(self._portal, stream)

    def cancel_request(self, request_id: str, *, user_id: str | None = None) -> CancelResult:
        """Cancel a request by id (see :meth:`AsyncClient.cancel_request`); never raises for
        ``cancelled`` / ``already_cancelled`` / ``already_completed`` / ``not_found``."""
        return self._portal.call(self._async.cancel_request(request_id, user_id=user_id))

    def get_request(self, request_id: str, *, user_id: str | None = None) -> RequestInfo:
        """``GET /v1/requests/{id}`` (see :meth:`AsyncClient.get_request`)."""
        return self._portal.call(self._async.get_request(request_id, user_id=user_id))

    def final_usage(self, response: Response, *, timeout: float = 10.0) -> Usage:
        """The final token figures of ``response`` (see :meth:`AsyncClient.final_usage`)."""
        return self._portal.call(self._async.final_usage(response, timeout=timeout))

    def close(self) -> None:
        """Close the connection and stop the background thread. Idempotent."""
        if self._portal.running:
            try:
                self._portal.call(self._async.aclose())
            finally:
                self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
