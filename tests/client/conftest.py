"""Fixtures for SDK tests: a real gateway, in this event loop or in a thread of its own.

Async tests use :func:`running_gateway` in the test's own loop. The blocking :class:`Client`
cannot share the test's thread with the gateway's loop (it would block it), so sync tests use
:class:`ThreadedGateway`: a real gateway on an ephemeral port, served by a loop in a daemon
thread, whose state (``gateway.registry``) tests read through :meth:`ThreadedGateway.call`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from gateway.registry import RequestKey, RequestRecord, RequestStatus
from gateway.server import Gateway
from protocol import Usage

from ..gateway.conftest import running_gateway

T = TypeVar("T")

#: Runs for minutes unless cancelled (simulated backend metadata): answer tokens every 5 ms.
ENDLESS = {"tokens": 100_000, "token_delay_ms": 5, "plan_ms": 0, "tool_ms": 0}
#: A long step that cannot be interrupted: a cancel during it leaves usage.final false.
SLOW_TOOL = {"tokens": 40, "token_delay_ms": 2, "plan_ms": 0, "tool_ms": 400}

CANCELLED_STATES = (RequestStatus.CANCELLING, RequestStatus.CANCELLED)


def same_usage_over_http(http: Usage | None, wire: Usage) -> bool:
    """A ``usage`` read from ``GET /v1/requests/{id}`` equals the wire's: the same figures, and
    the same ``estimated`` if the HTTP body says (the gateway's HTTP bodies do not carry
    ``usage.estimated`` yet: absent there, it is ``None``)."""
    if http is None:
        return False
    if http.estimated is None:
        http = Usage(
            input_tokens=http.input_tokens,
            output_tokens=http.output_tokens,
            saved_tokens=http.saved_tokens,
            final=http.final,
            estimated=wire.estimated,
        )
    return http == wire


async def wait_record(
    gateway: Gateway,
    request_id: str,
    *,
    user: str = "",
    statuses: tuple[RequestStatus, ...] = CANCELLED_STATES,
    within: float = 5.0,
) -> RequestRecord:
    """Poll the gateway's registry until the request's record has one of ``statuses``."""
    key = RequestKey(user, request_id)
    deadline = time.monotonic() + within
    record = None
    while time.monotonic() < deadline:
        record = await gateway.registry.lookup(key)
        if record is not None and record.status in statuses:
            return record
        await asyncio.sleep(0.01)
    raise AssertionError(f"{request_id}: record {record} never reached {statuses}")


async def wait_active(gateway: Gateway, request_id: str, *, user: str = "") -> None:
    await wait_record(gateway, request_id, user=user, statuses=(RequestStatus.ACTIVE,))


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    async with running_gateway() as gw:
        yield gw


class ThreadedGateway:
    """A real gateway served by an event loop in a background thread."""

    def __init__(self, **settings: Any) -> None:
        self._settings = settings
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self.gateway: Gateway | None = None
        self._thread = threading.Thread(target=self._serve, name="test-gateway", daemon=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:
            self._failure = exc
            self._ready.set()
        finally:
            self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with running_gateway(**self._settings) as gw:
            self.gateway = gw
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> ThreadedGateway:
        self._thread.start()
        self._ready.wait(10)
        if self._failure is not None or self.gateway is None:
            raise RuntimeError("the gateway did not start") from self._failure
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    @property
    def gw(self) -> Gateway:
        assert self.gateway is not None
        return self.gateway

    @property
    def url(self) -> str:
        return self.gw.url

    @property
    def http_url(self) -> str:
        return self.gw.http_url

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run ``coro`` on the gateway's loop (e.g. a registry lookup) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def record(self, request_id: str, **kwargs: Any) -> RequestRecord:
        return self.call(wait_record(self.gw, request_id, **kwargs))

    def active(self, request_id: str, *, user: str = "") -> None:
        self.call(wait_active(self.gw, request_id, user=user))

    def connections(self) -> int:
        async def count() -> int:
            return len(self.gw.connections)

        return self.call(count())


@pytest.fixture
def threaded_gateway() -> Iterator[ThreadedGateway]:
    with ThreadedGateway() as gw:
        yield gw


@contextlib.contextmanager
def threaded(**settings: Any) -> Iterator[ThreadedGateway]:
    with ThreadedGateway(**settings) as gw:
        yield gw
