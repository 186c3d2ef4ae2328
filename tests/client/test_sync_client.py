"""The blocking ``Client`` against a real gateway served from another thread: chats, streams,
futures, many threads on one connection, and Ctrl-C (a real SIGINT) cancelling on the gateway."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from gateway import CancelStatus, ChatFuture, Client, RequestFailed
from gateway.registry import RequestStatus

from ..gateway.conftest import native_transport
from .conftest import ENDLESS, SLOW_TOOL, ThreadedGateway, same_usage_over_http, threaded

#: Slow tokens: a stream spends its time waiting in ``next()``.
SLOW_TOKENS = {"tokens": 100_000, "token_delay_ms": 150, "plan_ms": 0, "tool_ms": 0}


@pytest.fixture
def gw() -> Iterator[ThreadedGateway]:
    with threaded() as gateway:
        yield gateway


@pytest.fixture
def client(gw: ThreadedGateway) -> Iterator[Client]:
    with Client(gw.url) as c:
        yield c


def interrupt_when_active(gw: ThreadedGateway, request_id: str, delay: float = 0.05) -> None:
    """From another thread: once the gateway runs ``request_id``, press Ctrl-C (SIGINT)."""

    def press() -> None:
        gw.active(request_id)
        time.sleep(delay)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press, daemon=True).start()


def still_usable(gw: ThreadedGateway, client: Client) -> None:
    assert client.chat("and then?", metadata={"tokens": 2}).status == "completed"
    assert gw.connections() == 1


def test_chat_stream_and_future(gw: ThreadedGateway, client: Client) -> None:
    response = client.chat("Hello there", request_id="s-1")
    assert (response.status, response.request_id) == ("completed", "s-1")
    with client.chat_stream("Hello there") as stream:
        texts = [chunk.text for chunk in stream]
    assert stream.response is not None
    assert "".join(texts) == stream.response.content == response.content
    future = client.chat_async("Hello there")
    assert isinstance(future, ChatFuture)
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(timeout=10).content == response.content
    assert future.request_id.startswith("req_")
    with pytest.raises(RequestFailed):
        client.chat("fail", metadata={"fail_at_token": 1})
    assert gw.connections() == 1


def test_ten_threads_share_one_connection(gw: ThreadedGateway, client: Client) -> None:
    def work(i: int) -> list[str]:
        statuses = [client.chat(f"thread {i} chat {j}").status for j in range(3)]
        statuses.append(client.chat_stream(f"thread {i}").__iter__().__next__().text and "ok")
        future = client.chat_async(f"thread {i} async")
        statuses.append(future.result(timeout=10).status)
        return statuses

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(work, range(10)))
    assert all(r == ["completed"] * 3 + ["ok", "completed"] for r in results)
    assert gw.connections() == 1


def test_future_cancel_cancels_on_the_gateway(gw: ThreadedGateway, client: Client) -> None:
    future = client.chat_async("long", request_id="f-1", metadata=ENDLESS)
    gw.active("f-1")
    assert future.cancel()
    assert future.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        future.result()
    assert gw.record("f-1").reason == "client"
    assert not future.cancel() or future.cancelled()
    still_usable(gw, client)


def test_ctrl_c_during_chat_cancels_on_the_gateway(gw: ThreadedGateway, client: Client) -> None:
    client.chat("warm up", metadata={"tokens": 2})
    interrupt_when_active(gw, "k-1")
    with pytest.raises(KeyboardInterrupt):
        client.chat("long", request_id="k-1", metadata=ENDLESS)
    assert gw.record("k-1").reason == "client"
    still_usable(gw, client)


def test_ctrl_c_during_future_result_cancels(gw: ThreadedGateway, client: Client) -> None:
    future = client.chat_async("long", request_id="k-2", metadata=ENDLESS)
    interrupt_when_active(gw, "k-2")
    with pytest.raises(KeyboardInterrupt):
        future.result()
    assert gw.record("k-2").reason == "client"
    assert future.cancelled()
    still_usable(gw, client)


def test_ctrl_c_while_iterating_cancels(gw: ThreadedGateway, client: Client) -> None:
    stream = client.chat_stream("long", request_id="k-3", metadata=SLOW_TOKENS)
    received = []

    def read_all() -> None:
        for chunk in stream:
            received.append(chunk)
            if len(received) == 1:
                interrupt_when_active(gw, "k-3", delay=0.01)

    with pytest.raises(KeyboardInterrupt):
        read_all()
    assert len(received) >= 1
    # The stream object is still referenced: the interrupted next() itself sent the cancel.
    assert gw.record("k-3").reason == "client"
    response = stream.cancel()  # already cancelled: waits for the response
    assert response is not None
    assert (response.status, response.reason) == ("cancelled", "client")
    still_usable(gw, client)


def test_break_close_and_with_cancel(gw: ThreadedGateway, client: Client) -> None:
    for n, _chunk in enumerate(client.chat_stream("long", request_id="b-1", metadata=ENDLESS)):
        if n == 2:
            break
    assert gw.record("b-1").reason == "client"

    stream = client.chat_stream("long", request_id="b-2", metadata=ENDLESS)
    next(stream)
    stream.close()
    assert list(stream) == []
    assert gw.record("b-2").reason == "client"

    with client.chat_stream("long", request_id="b-3", metadata=ENDLESS) as stream:
        next(stream)
    assert gw.record("b-3").reason == "client"
    still_usable(gw, client)


def test_cancel_request_and_final_usage(gw: ThreadedGateway, client: Client) -> None:
    future = client.chat_async("agent", request_id="u-1", metadata=SLOW_TOOL)
    gw.active("u-1")
    time.sleep(0.15)  # into the 400 ms tool call: the cancelled response cannot be final
    assert client.cancel_request("u-1").status is CancelStatus.CANCELLED
    response = future.result(timeout=10)
    assert (response.status, response.reason) == ("cancelled", "client")
    assert not response.usage.final
    final = client.final_usage(response)
    assert final.final
    assert final.output_tokens >= response.usage.output_tokens
    assert gw.record("u-1", statuses=(RequestStatus.CANCELLED,)).usage == final
    info = client.get_request("u-1")
    assert (info.status, info.reason) == ("cancelled", "client")
    assert same_usage_over_http(info.usage, final)
    assert final.estimated == ("input_tokens", "output_tokens", "saved_tokens")  # simulated


def test_close_stops_the_thread_and_refuses_further_calls(gw: ThreadedGateway) -> None:
    before = threading.active_count()
    client = Client(gw.url)
    client.chat("hi")
    future = client.chat_async("long", request_id="c-1", metadata=ENDLESS)
    gw.active("c-1")
    client.close()
    with pytest.raises(Exception, match="closed"):
        future.result(timeout=5)
    assert gw.record("c-1", statuses=(RequestStatus.CANCELLED,)).reason == "disconnect"
    with pytest.raises(RuntimeError, match="closed"):
        client.chat("after close")
    client.close()  # idempotent
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() <= before


@native_transport  # the network drop is the gateway transport's abort()
def test_sync_client_reconnects(gw: ThreadedGateway, client: Client) -> None:
    assert client.chat("one").status == "completed"

    async def drop() -> None:
        for conn in list(gw.gw.connections):
            conn.channel.transport.abort()

    gw.call(drop())
    time.sleep(0.05)
    assert client.chat("two").status == "completed"
    assert client.connected
