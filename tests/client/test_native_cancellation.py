"""Python's own ways of giving up each cancel the request on the gateway (AsyncClient).

For each -- ``task.cancel()``, ``asyncio.timeout``, ``asyncio.wait_for``, ``break`` out of
``async for``, ``aclose()``, a timeout around the loop, leaving ``async with`` -- the gateway's
own record of the request must say cancelled with reason ``client`` (the in-band ``cancel``
frame; a dropped connection would say ``disconnect``), and the same connection must go on
serving other requests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import pytest

from gateway import AsyncClient
from gateway.registry import RequestKey
from gateway.server import Gateway

from .conftest import ENDLESS, wait_active, wait_record


async def gave_up_on(gateway: Gateway, client: AsyncClient, request_id: str) -> None:
    """The gateway cancelled ``request_id`` because of our cancel frame; the connection
    is the same one and still works."""
    record = await wait_record(gateway, request_id)
    assert record.reason == "client", record
    (conn,) = gateway.connections
    response = await client.chat("next one", metadata={"tokens": 3})
    assert response.status == "completed"
    assert gateway.connections == {conn}


async def by_task_cancel(client: AsyncClient, gateway: Gateway, rid: str) -> None:
    task = client.chat_async("long", request_id=rid, metadata=ENDLESS)
    await wait_active(gateway, rid)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def by_task_cancel_of_chat(client: AsyncClient, gateway: Gateway, rid: str) -> None:
    task = asyncio.create_task(client.chat("long", request_id=rid, metadata=ENDLESS))
    await wait_active(gateway, rid)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def by_asyncio_timeout(client: AsyncClient, gateway: Gateway, rid: str) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await client.chat("long", request_id=rid, metadata=ENDLESS)


async def by_wait_for(client: AsyncClient, gateway: Gateway, rid: str) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.chat_async("long", request_id=rid, metadata=ENDLESS), 0.2)


async def by_break(client: AsyncClient, gateway: Gateway, rid: str) -> None:
    received = 0
    async for _chunk in client.chat_stream("long", request_id=rid, metadata=ENDLESS):
        received += 1
        if received == 3:
            break  # the stream object's last reference goes: it cancels
    assert received == 3


async def by_aclose(client: AsyncClient, gateway: Gateway, rid: str) -> None:
    stream = client.chat_stream("long", request_id=rid, metadata=ENDLESS)
    async for _chunk in stream:
        break
    await stream.aclose()
    assert [c async for c in stream] == []  # closed: iteration is over


async def by_timeout_around_the_loop(client: AsyncClient, gateway: Gateway, rid: str) -> None:
    stream = client.chat_stream("long", request_id=rid, metadata=ENDLESS)

    async def read_all() -> None:
        async with asyncio.timeout(0.2):
            async for _chunk in stream:
                pass

    with pytest.raises(TimeoutError):
        await read_all()
    assert stream.response is None


async def by_leaving_async_with(client: AsyncClient, gateway: Gateway, rid: str) -> None:
    with contextlib.suppress(ZeroDivisionError):
        async with client.chat_stream("long", request_id=rid, metadata=ENDLESS) as stream:
            async for _chunk in stream:
                raise ZeroDivisionError  # an error in the loop body


async def by_stream_cancel(client: AsyncClient, gateway: Gateway, rid: str) -> None:
    stream = client.chat_stream("long", request_id=rid, metadata=ENDLESS)
    async for _chunk in stream:
        break
    response = await stream.cancel()
    assert response is not None
    assert (response.status, response.reason, response.content) == ("cancelled", "client", "")
    assert stream.response is response


WAYS: list[Callable[[AsyncClient, Gateway, str], Awaitable[None]]] = [
    by_task_cancel,
    by_task_cancel_of_chat,
    by_asyncio_timeout,
    by_wait_for,
    by_break,
    by_aclose,
    by_timeout_around_the_loop,
    by_leaving_async_with,
    by_stream_cancel,
]


@pytest.mark.parametrize("way", WAYS, ids=lambda way: way.__name__.removeprefix("by_"))
@pytest.mark.parametrize("codec", ["json", "msgpack"])
async def test_giving_up_cancels_on_the_gateway(
    gateway: Gateway,
    way: Callable[[AsyncClient, Gateway, str], Awaitable[None]],
    codec: str,
) -> None:
    async with AsyncClient(gateway.url, codec=codec) as client:
        await client.chat("warm up", metadata={"tokens": 2})  # connection opened
        await way(client, gateway, "given-up")
        await gave_up_on(gateway, client, "given-up")


async def test_cancelled_before_sending_sends_nothing(gateway: Gateway) -> None:
    async with AsyncClient(gateway.url) as client:
        task = client.chat_async("never", request_id="never-sent")
        task.cancel()  # before the task ever ran: no chat, so no cancel either
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (await client.cancel_request("never-sent")).status == "not_found"
        assert await gateway.registry.lookup(RequestKey("", "never-sent")) is None
