"""``AsyncClient``: the asyncio SDK. ``Client`` (``_sync.py``) runs one of these in a thread.

Cancellation is native: whatever stops the caller waiting -- ``task.cancel()``, an
``asyncio.timeout``/``wait_for`` expiring, leaving an ``async for`` over a stream, ``aclose()``
-- queues the ``cancel`` frame for the request on the way out (see ``Connection.stop``), so the
gateway stops the pipeline at its next checkpoint (SPEC.md §5.3) while the connection stays
open for the other requests.

Pipeline steps (SPEC.md §3.12) are opt-in per chat (``steps=True``): a stream then reports the
steps it reached (:attr:`AsyncChatStream.steps`, :attr:`~AsyncChatStream.current_step`, an
``on_step`` callback) in their order with its chunks, and where a cancelled pipeline halts
(:attr:`AsyncChatStream.halt`, :attr:`Response.halt`).

Resumable requests (SPEC.md §5.8) are opt-in per call or per client (``resumable=True``): when
the connection drops, the gateway keeps such a request running for its grace period, and the
client reconnects by itself (:meth:`AsyncClient._resume_detached`: the first attempt at once,
then exponential backoff with jitter, for at most ``reconnect_timeout`` seconds) and sends
``resume`` for each of them from the last chunk it received. The caller's stream or awaited
chat just goes on: no gap, no repeat, one end. A cancel asked for meanwhile goes out right
after the resume. Giving up fails them with :class:`ResumeFailed`; a gateway that no longer
has one answers ``not_found`` (:class:`ResumeNotFound`); another client resuming it ends it
here with :class:`RequestMoved`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import random
import uuid
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

from protocol import CancelResult, Chat, ChatMessage, Codec, StepState, Usage, limits

from ._config import CodecName, Settings, check_request_id, check_user_id
from ._connection import Connection, Exchange
from ._errors import (
    ConnectionLost,
    InvalidRequest,
    MuxgateError,
    RequestRefused,
    ResumeFailed,
    TransportError,
    mapped_errors,
)
from ._http import cancel_over_http, get_over_http
from ._models import Chunk, Halt, RequestInfo, Response, Step

__all__ = ["AsyncChatStream", "AsyncClient", "MessagesLike", "StepCallback"]

log = logging.getLogger("muxgate.client")

#: ``messages=``: a conversation, oldest first, as ``{"role": ..., "content": ...}`` mappings or
#: :class:`protocol.ChatMessage`.
MessagesLike = Sequence[Mapping[str, str] | ChatMessage]

#: ``on_step=``: called with each :class:`Step` of a stream, in order with its chunks.
StepCallback = Callable[[Step], object]

#: Reconnecting after a drop, to resume (SPEC.md §5.8): the first attempt goes at once; after
#: the n-th failed one (n = 1, 2, ...) the client waits ``min(MAX, BASE * 2 ** (n - 1))`` times
#: a random factor in [0.5, 1) ("equal jitter": reconnecting clients spread out), and gives up
#: when the next attempt would start more than ``reconnect_timeout`` after the drop.
RECONNECT_BASE_DELAY = 0.1
RECONNECT_MAX_DELAY = 5.0
#: A connection that dropped sooner than this after it opened (or closed with 1013, 4008 or
#: 4029: the gateway asks for a pause, SPEC.md §2.6) does not earn an immediate retry: the
#: next reconnection starts one backoff step further, so a flapping link cannot spin.
RECONNECT_STABLE_AFTER = 1.0
_SLOW_DOWN_CLOSES = frozenset({1013, 4008, 4029})


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


def build_chat(
    message: str | None,
    *,
    request_id: str | None,
    user_id: str | None,
    timeout: float | None,
    metadata: Mapping[str, Any] | None,
    messages: MessagesLike | None,
    stream: bool,
    steps: bool = False,
    resumable: bool = False,
    grace: float | None = None,
) -> Chat:
    """A validated ``chat`` message (raises :class:`InvalidRequest`; nothing is sent)."""
    if request_id is None:
        request_id = new_request_id()
    check_request_id(request_id)
    check_user_id(user_id)
    timeout_ms: int | None = None
    if timeout is not None:
        if not 0 < timeout <= limits.MAX_TIMEOUT_MS / 1000:
            raise InvalidRequest(f"timeout must be in (0, {limits.MAX_TIMEOUT_MS // 1000}] s")
        timeout_ms = max(1, math.ceil(timeout * 1000))
    grace_ms: int | None = None
    if grace is not None:
        if not resumable:
            raise InvalidRequest("grace is only for a resumable chat (resumable=True)")
        if not 0 < grace <= limits.MAX_GRACE_MS / 1000:
            raise InvalidRequest(f"grace must be in (0, {limits.MAX_GRACE_MS // 1000}] s")
        grace_ms = max(1, math.ceil(grace * 1000))
    turns: tuple[ChatMessage, ...] | None = None
    with mapped_errors("chat"):
        if messages is not None:
            turns = tuple(
                m
                if isinstance(m, ChatMessage)
                else ChatMessage(role=m["role"], content=m["content"])  # type: ignore[arg-type]
                for m in messages
            )
        return Chat(
            request_id=request_id,
            message=message,
            messages=turns,
            stream=stream,
            user_id=user_id,
            timeout_ms=timeout_ms,
            metadata=dict(metadata) if metadata is not None else None,
            steps=steps,
            resumable=resumable,
            grace_ms=grace_ms,
        )


class AsyncClient:
    """An asyncio client of a muxgate gateway: one WebSocket, any number of concurrent requests.

    Every argument is optional (see ``gateway/client/_config.py`` for the environment
    variables): ``url`` (``ws://``/``wss://``/``http://``/``https://``; default
    ``MUXGATE_URL`` or ``ws://localhost:8001``), ``client_key`` (``MUXGATE_CLIENT_KEY``) or
    ``token`` (``MUXGATE_TOKEN``), ``user_id`` (the default user of every call), ``codec``
    (``"json"`` or ``"msgpack"``), ``connect_timeout`` in seconds, ``resumable`` (the default
    of every chat's ``resumable``) and ``reconnect_timeout`` (seconds: how long to keep trying
    to reconnect after a drop, to resume the resumable requests).

    The connection opens on the first call and reopens on the next call after it dropped
    (at once, by itself, while resumable requests wait to be resumed).
    The client is bound to the event loop it is first used in; use ``async with`` or call
    :meth:`aclose`.
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
        self._settings = Settings.resolve(
            url,
            client_key=client_key,
            token=token,
            user_id=user_id,
            codec=codec,
            connect_timeout=connect_timeout,
        )
        if type(resumable) is not bool:
            raise InvalidRequest("resumable must be True or False")
        if not reconnect_timeout >= 0:
            raise InvalidRequest("reconnect_timeout must not be negative")
        self._resumable = resumable
        self._reconnect_timeout = float(reconnect_timeout)
        #: Resumable requests whose connection dropped, waiting for a resume; by request_id.
        self._detached: dict[str, Exchange] = {}
        self._resumer: asyncio.Task[None] | None = None
        #: Backoff steps the next reconnection starts with (see RECONNECT_STABLE_AFTER).
        self._flaps = 0
        self._background: set[asyncio.Task[Any]] = set()
        self._conn: Connection | None = None
        self._lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Requests whose chat is not on the wire yet: request_id -> resolved once it is
        #: (with its connection and exchange) or once it never will be (None).
        self._starting: dict[str, asyncio.Future[tuple[Connection, Exchange] | None]] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"AsyncClient({self.url!r}, codec={self.codec.name.lower()!r})"

    @property
    def url(self) -> str:
        """The WebSocket endpoint."""
        return self._settings.ws_url

    @property
    def http_url(self) -> str:
        """The base of the HTTP API."""
        return self._settings.http_url

    @property
    def codec(self) -> Codec:
        return self._settings.codec

    @property
    def user_id(self) -> str | None:
        """The default user of this client's calls (``None``: the anonymous user)."""
        return self._settings.user_id

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.is_open

    @property
    def resumable(self) -> bool:
        """The default of every chat's ``resumable`` (SPEC.md §5.8)."""
        return self._resumable

    @property
    def reconnect_timeout(self) -> float:
        """Seconds to keep reconnecting after a drop, to resume the resumable requests."""
        return self._reconnect_timeout

    # -- chat --------------------------------------------------------------------------------

    async def chat(
        self,
        message: str | None = None,
        *,
        request_id: str | None = None,
        user_id: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the gateway's deadline (timeout_ms)
        metadata: Mapping[str, Any] | None = None,
        messages: MessagesLike | None = None,
        steps: bool = False,
        resumable: bool | None = None,
        grace: float | None = None,
    ) -> Response:
        """Send one chat and return its :class:`Response` (``completed`` or ``cancelled``).

        ``timeout`` (seconds) is the gateway's deadline for the request (``timeout_ms``): when
        it expires the response is ``cancelled`` with reason ``timeout``. A ``failed`` request
        raises :class:`RequestFailed`. Cancelling the awaiting task cancels the request.
        ``steps=True`` asks the gateway where a cancelled pipeline halts (``response.halt``,
        SPEC.md §3.12); to follow the steps themselves, use :meth:`chat_stream`.

        ``resumable=True`` (default: the client's ``resumable``) lets the request survive a
        dropped connection (SPEC.md §5.8): the client reconnects and resumes it, and this call
        just returns its response. ``grace`` (seconds; implies ``resumable``) asks how long the
        gateway keeps it waiting for the resume (it caps it; default: its own, 30 s).
        """
        chat = self._build(
            message,
            request_id=request_id,
            user_id=user_id,
            timeout=timeout,
            metadata=metadata,
            messages=messages,
            stream=False,
            steps=steps,
            resumable=resumable,
            grace=grace,
        )
        return await self._run(chat, self._announce(chat))

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
    ) -> asyncio.Task[Response]:
        """Start :meth:`chat` in a task and return the task (call from a running loop).

        The request counts as started at once: :meth:`cancel_request` with its id, even right
        away, cancels it in-band. ``task.cancel()`` cancels it on the gateway.
        """
        chat = self._build(
            message,
            request_id=request_id,
            user_id=user_id,
            timeout=timeout,
            metadata=metadata,
            messages=messages,
            stream=False,
            steps=steps,
            resumable=resumable,
            grace=grace,
        )
        loop = asyncio.get_running_loop()
        announced = self._announce(chat)
        task = loop.create_task(self._run(chat, announced), name=f"muxgate-{chat.request_id}")
        # Cancelled before it ever ran: nothing was sent, and a cancel_request must not wait.
        task.add_done_callback(lambda _: self._unannounce(chat.request_id, announced))
        return task

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
    ) -> AsyncChatStream:
        """A streamed chat: ``async for chunk in client.chat_stream(...)`` yields
        :class:`Chunk`s (``chunk.text``) as they arrive; the chat is sent when iteration
        starts. Afterwards ``stream.response`` is the final :class:`Response`. Leaving the loop
        early (``break``, an exception, a timeout) or ``aclose()`` cancels the request.

        ``steps=True`` asks for the pipeline's steps (SPEC.md §3.12): ``stream.steps``,
        ``stream.current_step`` and ``stream.halt`` follow them, and ``on_step(step)`` (which
        requires ``steps=True``) is called with each :class:`Step` in its order with the chunks:
        from the iteration, after every chunk before it was yielded and before any chunk after
        it. It is a plain function, run in the client's event loop (for :class:`Client`, its
        thread), so it must not block. An exception it raises is logged (logger
        ``muxgate.client``) and otherwise ignored: the stream, the request and the connection
        go on.

        ``resumable`` and ``grace`` as for :meth:`chat`: a resumable stream goes on across a
        dropped connection, from the chunk after the last one received (``stream.resumes``
        counts the resumes). It raises :class:`ResumeFailed` / :class:`ResumeNotFound` when it
        cannot, :class:`RequestMoved` when another client resumed it (after the chunks that
        arrived before). Steps that started while it was detached are not reported.
        """
        if on_step is not None:
            if not steps:
                raise InvalidRequest("on_step needs steps=True")
            if inspect.iscoroutinefunction(on_step):
                raise TypeError("on_step must be a plain function (it is called, not awaited)")
        chat = self._build(
            message,
            request_id=request_id,
            user_id=user_id,
            timeout=timeout,
            metadata=metadata,
            messages=messages,
            stream=True,
            steps=steps,
            resumable=resumable,
            grace=grace,
        )
        return AsyncChatStream(self, chat, on_step)

    # -- cancel and inspect ------------------------------------------------------------------

    async def cancel_request(self, request_id: str, *, user_id: str | None = None) -> CancelResult:
        """Cancel a request by id; ``result.status`` is ``cancelled``, ``already_cancelled``,
        ``already_completed`` or ``not_found`` (never raised).

        In-band (a ``cancel`` frame, reason ``client``) when the request runs on this client's
        connection; otherwise ``DELETE /v1/requests/{id}`` (reason ``api``), so any process
        holding the credentials can cancel by id. ``user_id`` defaults to the client's.
        A resumable request of this client waiting to be resumed gets its cancel right after
        the resume (over HTTP if the client gives up reconnecting).
        """
        check_request_id(request_id)
        check_user_id(user_id)
        self._check_open()
        announced = self._starting.get(request_id)
        if announced is not None:
            await asyncio.shield(announced)  # its chat goes out first, then the cancel
        exchange = self._exchange_of(request_id)
        wanted = user_id if user_id is not None else self._settings.user_id
        if exchange is not None and (wanted is None or wanted == exchange.user):
            waiter = exchange.request_cancel()
            try:
                status = await asyncio.shield(waiter)
            except TransportError:
                pass  # the connection dropped meanwhile (G7): ask over HTTP below
            else:
                return CancelResult(request_id=request_id, status=status)
        return await cancel_over_http(self._settings, request_id, user_id)

    async def get_request(self, request_id: str, *, user_id: str | None = None) -> RequestInfo:
        """``GET /v1/requests/{id}``: status, cancel reason, error and usage of a request of
        this user, running or remembered (``status`` ``not_found`` otherwise)."""
        check_request_id(request_id)
        check_user_id(user_id)
        self._check_open()
        return await get_over_http(self._settings, request_id, user_id)

    async def final_usage(
        self,
        response: Response,
        *,
        timeout: float = 10.0,  # noqa: ASYNC109 - mirrors Client.final_usage
    ) -> Usage:
        """The final token figures of ``response`` (SPEC.md §5.4).

        A cancelled response may carry figures that still grow until the pipeline halts; the
        final ones follow in a ``usage`` message, which this waits for (at most ``timeout``
        seconds). If the connection dropped first, they are read over HTTP (``GET``).
        """
        if response.usage.final:
            return response.usage
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        future = response._final_usage
        if future is not None and future.get_loop() is loop:
            try:
                async with asyncio.timeout_at(deadline):
                    return await asyncio.shield(future)
            except MuxgateError:
                pass  # the connection dropped first: the figures are kept for GET (§5.4)
        delay = 0.05
        while True:
            info = await get_over_http(self._settings, response.request_id, response._user_id)
            if info.usage is not None and info.usage.final:
                return info.usage
            if loop.time() + delay > deadline:
                raise TimeoutError(f"the final usage of {response.request_id} is not known yet")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    # -- lifecycle ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the connection. Requests still in flight fail with :class:`ConnectionLost`
        (and the gateway cancels them, reason ``disconnect``; resumable ones are cancelled
        first, reason ``client``, and those waiting for a resume are left to their grace
        period). Idempotent."""
        self._closed = True
        for announced in list(self._starting.values()):
            if not announced.done():
                announced.set_result(None)
        conn, self._conn = self._conn, None
        if self._loop is not asyncio.get_running_loop():
            return
        resumer, self._resumer = self._resumer, None
        if resumer is not None:
            resumer.cancel()
            with contextlib.suppress(BaseException):
                await resumer
        closed = ConnectionLost("the client closed the connection", close_code=1000)
        for exchange in self._take_detached():
            exchange.fail(closed)  # the gateway cancels it when its grace period ends
        if conn is not None:
            await conn.aclose()
        for task in list(self._background):
            with contextlib.suppress(BaseException):
                await task

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- internals ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the client is closed")

    def _build(
        self, message: str | None, *, resumable: bool | None, grace: float | None, **fields: Any
    ) -> Chat:
        if resumable is None:
            resumable = self._resumable or grace is not None
        return build_chat(message, resumable=resumable, grace=grace, **fields)

    def _exchange_of(self, request_id: str) -> Exchange | None:
        """This client's unfinished request with that id: on the connection, or detached."""
        if self._loop is not asyncio.get_running_loop():
            return None
        conn = self._conn
        if conn is not None and conn.is_open:
            exchange = conn.exchanges.get(request_id)
            if exchange is not None:
                return exchange
        return self._detached.get(request_id)

    def _announce(self, chat: Chat) -> asyncio.Future[tuple[Connection, Exchange] | None]:
        """Register a chat about to be sent, so a cancel for its id waits for it."""
        self._check_open()
        rid = chat.request_id
        if rid in self._starting:
            raise RequestRefused(
                "duplicate_request_id", "request_id is being started", request_id=rid
            )
        announced: asyncio.Future[tuple[Connection, Exchange] | None]
        announced = asyncio.get_running_loop().create_future()
        self._starting[rid] = announced
        return announced

    async def _connection(self) -> Connection:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # First use, or a new event loop (a script calling asyncio.run twice): the old
            # connection belongs to a loop that is gone.
            self._loop, self._conn, self._lock = loop, None, asyncio.Lock()
        conn = self._conn
        if conn is not None and conn.is_open:
            return conn
        assert self._lock is not None
        async with self._lock:
            self._check_open()
            conn = self._conn
            if conn is None or not conn.is_open:
                conn = self._conn = await Connection.open(self._settings, self._on_drop)
            return conn

    async def start(
        self,
        chat: Chat,
        announced: asyncio.Future[tuple[Connection, Exchange] | None],
    ) -> tuple[Connection, Exchange]:
        """Connect if needed and put ``chat`` on the wire; resolve its announcement."""
        rid = chat.request_id
        try:
            conn = await self._connection()
            exchange = await conn.start(chat)
        except BaseException:
            self._unannounce(rid, announced)
            raise
        self._unannounce(rid, announced, (conn, exchange))
        return conn, exchange

    def _unannounce(
        self,
        request_id: str,
        announced: asyncio.Future[tuple[Connection, Exchange] | None],
        sent: tuple[Connection, Exchange] | None = None,
    ) -> None:
        if not announced.done():
            announced.set_result(sent)
        if self._starting.get(request_id) is announced:
            del self._starting[request_id]

    async def _run(
        self,
        chat: Chat,
        announced: asyncio.Future[tuple[Connection, Exchange] | None],
    ) -> Response:
        _, exchange = await self.start(chat, announced)
        try:
            await exchange.wait_done()
        except asyncio.CancelledError:
            exchange.stop()  # queue the cancel frame before giving up (task cancelled)
            raise
        return exchange.outcome()

    # -- resuming after a drop (SPEC.md §5.8) ------------------------------------------------

    def _on_drop(self, conn: Connection, exchanges: list[Exchange], error: MuxgateError) -> None:
        """``conn`` dropped (not by us) while these resumable requests ran: the gateway keeps
        them; reconnect and resume them (called by the connection's reader as it ends)."""
        for exchange in exchanges:
            self._detached[exchange.request_id] = exchange
        if self._closed:
            for exchange in self._take_detached():
                exchange.fail(error)
            return
        loop = asyncio.get_running_loop()
        code = getattr(error, "close_code", None)
        if loop.time() - conn.opened_at < RECONNECT_STABLE_AFTER or code in _SLOW_DOWN_CLOSES:
            self._flaps += 1
        else:
            self._flaps = 0
        log.info(
            "muxgate client: connection dropped (%s); resuming %d request(s)",
            error,
            len(exchanges),
        )
        if self._resumer is None or self._resumer.done():
            self._resumer = loop.create_task(self._resume_detached(error), name="muxgate-resume")

    def _take_detached(self) -> list[Exchange]:
        exchanges = [e for e in self._detached.values() if e.detached]
        self._detached.clear()
        return exchanges

    @staticmethod
    def _backoff(step: int) -> float:
        """The pause before a reconnection attempt after ``step`` failed ones (0: none)."""
        if step <= 0:
            return 0.0
        delay = min(RECONNECT_MAX_DELAY, RECONNECT_BASE_DELAY * 2.0 ** (step - 1))
        return delay * (0.5 + random.random() / 2)

    async def _resume_detached(self, dropped: MuxgateError) -> None:
        """Reconnect and resume every detached request, until none is left (a drop meanwhile
        puts its requests back); giving up fails them with :class:`ResumeFailed`."""
        while self._detached:
            conn = await self._reconnect(dropped)
            if conn is None:
                return
            # Each stays in self._detached until its resume is on the wire (a cancel_request
            # finds it there; aclose fails what is left).
            for rid, exchange in list(self._detached.items()):
                if exchange.detached:
                    try:
                        await conn.resume(exchange)
                    except TransportError:
                        continue  # dropped again: the next round resumes it
                    except MuxgateError as exc:
                        exchange.fail(exc)
                if self._detached.get(rid) is exchange:
                    del self._detached[rid]

    async def _reconnect(self, dropped: MuxgateError) -> Connection | None:
        """The client's connection, reopened with backoff (None: gave up, the detached
        requests failed). At least one attempt; none starts after ``reconnect_timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._reconnect_timeout
        first = step = self._flaps
        last: BaseException = dropped
        while True:
            pause = self._backoff(step)
            if step > first and loop.time() + pause > deadline:
                self._give_up(dropped, last)
                return None
            await asyncio.sleep(pause)
            step += 1
            try:
                return await self._connection()  # each attempt within connect_timeout
            except TransportError as exc:
                last = exc  # refused, unreachable, timed out, closed before welcome: again
            except (MuxgateError, RuntimeError) as exc:
                # Unauthorized or a protocol violation will happen again; a closed client.
                self._give_up(dropped, exc)
                return None

    def _give_up(self, dropped: MuxgateError, last: BaseException) -> None:
        code = getattr(dropped, "close_code", None)
        reason = getattr(dropped, "close_reason", "")
        for exchange in self._take_detached():
            rid = exchange.request_id
            error = ResumeFailed(
                f"request {rid} could not be resumed: {dropped}, then reconnecting failed ({last})",
                request_id=rid,
                close_code=code,
                close_reason=reason,
            )
            error.__cause__ = last
            cancelled = bool(exchange.pending_cancels)
            exchange.fail(error)
            if cancelled:  # a Stop must not be lost: it may still reach the gateway over HTTP
                task = asyncio.get_running_loop().create_task(self._cancel_over_http(exchange))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        log.warning("muxgate client: gave up resuming after %s: %s", dropped, last)

    async def _cancel_over_http(self, exchange: Exchange) -> None:
        try:
            await cancel_over_http(self._settings, exchange.request_id, exchange.chat_user_id)
        except MuxgateError as exc:
            log.warning("muxgate client: cancel of %s failed: %s", exchange.request_id, exc)


class AsyncChatStream:
    """The chunks of one streamed chat, as an async iterator (see
    :meth:`AsyncClient.chat_stream`). Also an async context manager that cancels the request
    if it is left before the end.

    For a chat sent with ``steps=True``, :attr:`steps`, :attr:`current_step` and the
    ``on_step`` callback follow the pipeline's steps *in stream order*, as the stream is
    iterated: a step is taken in once every chunk before it has been yielded (at once when the
    consumer keeps up; :meth:`cancel` takes in those still queued), so what the loop prints and
    what the callback prints come out in the gateway's order. Iteration still yields only
    :class:`Chunk`\\s. :attr:`halt` is read as it arrives.
    """

    def __init__(
        self, client: AsyncClient, chat: Chat, on_step: StepCallback | None = None
    ) -> None:
        self._client = client
        self._chat = chat
        self._on_step = on_step
        self._exchange: Exchange | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._steps: list[Step] = []
        self._running: dict[int, Step] = {}  # started steps not ended, by index
        self._current: Step | None = None  # the latest of them (one attribute: thread-safe)
        #: The final response, once iteration has ended.
        self.response: Response | None = None

    def __repr__(self) -> str:
        state = self._exchange.machine.state.name if self._exchange else "NOT_STARTED"
        return f"AsyncChatStream({self.request_id!r}, {state})"

    @property
    def request_id(self) -> str:
        return self._chat.request_id

    @property
    def text(self) -> str:
        """Everything streamed so far (also what was dropped after a cancel was sent)."""
        return self._exchange.text if self._exchange is not None else ""

    @property
    def resumes(self) -> int:
        """How many times this resumable stream was resumed on a new connection."""
        return self._exchange.resumes if self._exchange is not None else 0

    @property
    def steps(self) -> tuple[Step, ...]:
        """The :class:`Step` messages reached so far, in order (each step ``started``, then
        maybe ``ended``); all of them once iteration ended. Empty without ``steps=True``."""
        return tuple(self._steps)

    @property
    def current_step(self) -> Step | None:
        """The latest step started and not ended while the pipeline runs (after a cancel:
        until it has halted); ``None`` before the first step and once the pipeline is over."""
        current, exchange = self._current, self._exchange
        if current is None or exchange is None:
            return None
        if self._closed and exchange.pipeline_over:
            return None  # the stream reached its response: nothing runs any more
        return current

    @property
    def halt(self) -> Halt | None:
        """Where the pipeline of the cancelled request halts (SPEC.md §3.12): the response's
        ``halt`` (``pending``, or ``halted``), then the final ``halted`` one from the late
        ``usage`` message once it arrives (:meth:`AsyncClient.final_usage` waits for it).
        ``None`` unless the request was cancelled and the chat had ``steps=True``."""
        return self._exchange.halt if self._exchange is not None else None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Chunk:
        exchange = self._exchange
        if exchange is None:
            if self._closed:
                raise StopAsyncIteration
            client = self._client
            _, exchange = await client.start(self._chat, client._announce(self._chat))
            self._exchange = exchange
            self._loop = asyncio.get_running_loop()
        while True:
            try:
                item = await exchange.next_item()
            except asyncio.CancelledError:
                self._stop()  # the consumer was cancelled mid-stream: cancel the request too
                raise
            if isinstance(item, Step):
                self._take_step(item)
                continue
            if item is not None:
                return item
            self._closed = True
            self.response = exchange.outcome()  # raises RequestFailed or the connection's error
            raise StopAsyncIteration

    def _take_step(self, step: Step) -> None:
        self._steps.append(step)
        if step.state is StepState.STARTED:
            self._running[step.index] = step
        else:
            self._running.pop(step.index, None)
        self._current = self._running[max(self._running)] if self._running else None
        if self._on_step is not None:
            try:
                self._on_step(step)
            except Exception:
                # A display hook's bug must not cost the answer, nor the other requests.
                log.exception("muxgate client: on_step callback failed (%s)", self.request_id)

    def _take_queued_steps(self) -> None:
        """The request has its answer: take in the steps queued before it (chunks are gone)."""
        exchange = self._exchange
        if exchange is None:
            return
        while exchange.items:
            item = exchange.items.popleft()
            if isinstance(item, Step):
                self._take_step(item)

    async def cancel(self) -> Response | None:
        """Cancel the request and wait for its final :class:`Response` (``cancelled``, or
        ``completed`` if it won the race). ``None`` if the chat was never sent."""
        exchange = self._exchange
        self._closed = True
        if exchange is None:
            return None
        exchange.stop(keep_steps=True)
        await exchange.wait_done()
        self._take_queued_steps()
        self.response = exchange.outcome()
        return self.response

    async def aclose(self) -> None:
        """Stop iterating; cancel the request unless it already has its answer."""
        self._closed = True
        self._stop()

    def _stop(self) -> None:
        self._closed = True
        if self._exchange is not None:
            self._exchange.stop()

    def __del__(self) -> None:
        # Leaving ``async for`` early drops the last reference: cancel on the gateway then.
        # Always through the loop (a finalizer may run in any thread, or mid-callback).
        exchange, loop = self._exchange, self._loop
        if exchange is None or loop is None or exchange.done:
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: the connection is gone (G7)
            loop.call_soon_threadsafe(exchange.stop)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
