"""``AsyncClient`` against a real gateway: chats, streams, concurrency, codecs, reconnects,
cancel by id (in-band and over HTTP), final usage, refusals and failures."""

from __future__ import annotations

import asyncio
import contextlib
import re

import pytest

from gateway import (
    AsyncClient,
    CancelStatus,
    ConnectError,
    ConnectionLost,
    GatewayShuttingDown,
    InvalidRequest,
    ProtocolViolation,
    RequestFailed,
    RequestRefused,
)
from gateway.registry import RequestStatus
from gateway.server import Gateway
from protocol import Chunk, Codec, Error, Response, Usage, UsageReport, Welcome

from ..gateway.conftest import native_transport, running_gateway
from .conftest import ENDLESS, SLOW_TOOL, same_usage_over_http, wait_active, wait_record
from .scripted import Peer, scripted_gateway

CODECS = [pytest.param(c, id=c) for c in ("json", "msgpack")]


async def test_chat_returns_the_completed_response(gateway: Gateway) -> None:
    async with AsyncClient(gateway.url) as client:
        assert not client.connected  # lazy: nothing opened yet
        response = await client.chat("Tell me about gateways")
        assert client.connected
    assert response.status == "completed"
    assert response.completed
    assert not response.cancelled
    assert response.content.startswith(" On gateways,")
    assert re.fullmatch(r"req_[0-9a-f]{32}", response.request_id)
    assert response.usage.final
    assert response.usage.output_tokens > 0
    assert response.reason is None
    assert response.error is None


@pytest.mark.parametrize("codec", CODECS)
async def test_stream_yields_chunks_then_the_response(gateway: Gateway, codec: str) -> None:
    async with AsyncClient(gateway.url, codec=codec) as client:
        assert client.codec is Codec(f"muxgate.v1.{codec}")
        stream = client.chat_stream("Stream it", request_id="s-1")
        chunks = [chunk async for chunk in stream]
        assert all(isinstance(c, Chunk) and c.text for c in chunks)
        assert [c.seq for c in chunks] == list(range(len(chunks)))
        assert stream.response is not None
        assert stream.response.status == "completed"
        assert "".join(c.text for c in chunks) == stream.response.content == stream.text
        # The same text as a plain chat: the simulated backend is deterministic per prompt.
        again = await client.chat("Stream it")
        assert again.content == stream.response.content


async def test_messages_metadata_user_and_timeout(gateway: Gateway) -> None:
    async with AsyncClient(gateway.url, user_id="default-user") as client:
        conversation = [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Summarize websockets"},
        ]
        response = await client.chat(
            messages=conversation, metadata={"tokens": 4}, request_id="m-1", timeout=30
        )
        assert response.status == "completed"
        assert len(response.content.split()) >= 4
        await wait_record(gateway, "m-1", user="default-user", statuses=(RequestStatus.COMPLETED,))
        await client.chat("for alice", request_id="m-2", user_id="alice")
        await wait_record(gateway, "m-2", user="alice", statuses=(RequestStatus.COMPLETED,))

        # timeout= is the gateway's deadline: the answer is a cancelled response, not an error.
        late = await client.chat("slow", metadata=ENDLESS, timeout=0.2)
        assert late.status == "cancelled"
        assert late.reason == "timeout"
        assert late.content == ""


async def test_fifty_concurrent_chats_share_one_connection(gateway: Gateway) -> None:
    async with AsyncClient(gateway.url) as client:

        async def streamed(i: int) -> str:
            stream = client.chat_stream(f"stream {i}", metadata={"tokens": 10})
            return "".join([c.text async for c in stream])

        plain = [asyncio.create_task(client.chat(f"chat {i}")) for i in range(25)]
        streams = [asyncio.create_task(streamed(i)) for i in range(25)]
        responses = await asyncio.gather(*plain)
        texts = await asyncio.gather(*streams)
        assert {r.status for r in responses} == {"completed"}
        assert len({r.request_id for r in responses}) == 25
        assert all(texts)
        assert len(gateway.connections) == 1


async def test_beyond_max_streams_callers_wait_for_a_slot() -> None:
    async with running_gateway(max_streams=2) as gw, AsyncClient(gw.url) as client:
        responses = await asyncio.gather(*(client.chat(f"q{i}") for i in range(12)))
        assert {r.status for r in responses} == {"completed"}


async def test_failed_request_raises_request_failed(gateway: Gateway) -> None:
    async with AsyncClient(gateway.url) as client:
        with pytest.raises(RequestFailed) as failed:
            await client.chat("fail", metadata={"fail_at_token": 2}, request_id="f-1")
        assert failed.value.code == "backend_error"
        assert failed.value.response.status == "failed"
        assert failed.value.response.error is not None
        with pytest.raises(RequestFailed):
            async for _ in client.chat_stream("fail", metadata={"fail_at_token": 2}):
                pass
        assert (await client.chat("still fine")).status == "completed"


async def test_invalid_calls_raise_before_sending(gateway: Gateway) -> None:
    client = AsyncClient(gateway.url)
    bad_calls = [
        lambda: client.chat("x", request_id="has space"),
        lambda: client.chat("x", user_id=""),
        lambda: client.chat("x", messages=[{"role": "user", "content": "y"}]),
        lambda: client.chat(),
        lambda: client.chat("x", timeout=0),
        lambda: client.chat("x", messages=[{"role": "robot", "content": "y"}]),
        lambda: client.cancel_request("bad id"),
    ]
    for call in bad_calls:
        with pytest.raises(InvalidRequest):
            await call()
    with pytest.raises(ValueError, match="request_id"):  # InvalidRequest is a ValueError
        client.chat_stream("x", request_id="")
    assert not client.connected
    await client.aclose()


async def test_duplicate_request_ids_are_refused(gateway: Gateway) -> None:
    async with AsyncClient(gateway.url) as one, AsyncClient(gateway.url) as two:
        running = one.chat_async("long", request_id="dup", metadata=ENDLESS)
        await wait_active(gateway, "dup")
        with pytest.raises(RequestRefused) as local:
            await one.chat("again", request_id="dup")
        assert local.value.code == "duplicate_request_id"
        # Another connection, same (anonymous) user: the gateway refuses it (SPEC.md §5.6).
        with pytest.raises(RequestRefused) as remote:
            await two.chat("again", request_id="dup")
        assert remote.value.code == "duplicate_request_id"
        assert remote.value.request_id == "dup"
        assert (await two.chat("other")).status == "completed"  # two's connection is fine
        running.cancel()


async def test_cancel_request_in_band_outcomes(gateway: Gateway) -> None:
    async with AsyncClient(gateway.url) as client:
        task = client.chat_async("long", request_id="c-1", metadata=ENDLESS)
        first = await client.cancel_request("c-1")  # before the chat even left: it waits
        assert first.status is CancelStatus.CANCELLED
        response = await task
        assert (response.status, response.reason, response.content) == ("cancelled", "client", "")
        second = await client.cancel_request("c-1")
        assert second.status is CancelStatus.ALREADY_CANCELLED

        done = await client.chat("quick", request_id="c-2")
        assert done.status == "completed"
        late = await client.cancel_request("c-2")
        assert late.status is CancelStatus.ALREADY_COMPLETED
        unknown = await client.cancel_request("never-sent")
        assert unknown.status is CancelStatus.NOT_FOUND
        record = await wait_record(gateway, "c-1", statuses=(RequestStatus.CANCELLED,))
        assert record.reason == "client"


async def test_cancel_request_of_another_client_goes_over_http(gateway: Gateway) -> None:
    async with AsyncClient(gateway.url) as owner, AsyncClient(gateway.http_url) as other:
        task = owner.chat_async("long", request_id="h-1", user_id="bob", metadata=ENDLESS)
        await wait_active(gateway, "h-1", user="bob")
        # Not on `other`'s connection (it has none): DELETE /v1/requests/h-1, reason api.
        result = await other.cancel_request("h-1", user_id="bob")
        assert result.status is CancelStatus.CANCELLED
        assert not other.connected
        response = await task
        assert (response.status, response.reason) == ("cancelled", "api")
        assert (await other.cancel_request("h-1", user_id="bob")).status == "already_cancelled"
        # Another user's request is not found (SPEC.md G9).
        assert (await other.cancel_request("h-1", user_id="eve")).status == "not_found"
        info = await other.get_request("h-1", user_id="bob")
        assert (info.status, info.reason) in {("cancelled", "api"), ("cancelling", "api")}
        done = await owner.chat("quick", request_id="h-2")
        assert (await other.cancel_request(done.request_id)).status == "already_completed"


async def test_final_usage_follows_a_cancel_during_a_tool_call(gateway: Gateway) -> None:
    async with AsyncClient(gateway.url) as client:
        # Cancel while the non-abortable tool call runs: the response cannot be final.
        task = client.chat_async("agent 2", metadata=SLOW_TOOL, request_id="u-2")
        await asyncio.sleep(0.15)
        assert (await client.cancel_request("u-2")).status == "cancelled"
        response = await task
        assert response.status == "cancelled"
        assert not response.usage.final
        final = await client.final_usage(response)
        assert final.final
        assert final.output_tokens >= response.usage.output_tokens
        assert final.input_tokens >= response.usage.input_tokens
        record = await wait_record(gateway, "u-2", statuses=(RequestStatus.CANCELLED,))
        assert record.usage == final
        assert await client.final_usage(await client.chat("done")) is not None


async def test_final_usage_over_http_when_the_connection_is_gone(gateway: Gateway) -> None:
    client = AsyncClient(gateway.url)
    task = client.chat_async("agent", metadata=SLOW_TOOL, request_id="u-3")
    await wait_active(gateway, "u-3")
    await asyncio.sleep(0.15)
    await client.cancel_request("u-3")
    response = await task
    assert not response.usage.final
    await client.aclose()  # before the usage message: the SDK asks GET /v1/requests/u-3
    final = await client.final_usage(response)
    assert final.final
    record = await wait_record(gateway, "u-3", statuses=(RequestStatus.CANCELLED,))
    assert same_usage_over_http(final, record.usage)


@native_transport  # the network drop is the gateway transport's abort()
async def test_reconnects_on_the_next_call_after_a_drop(gateway: Gateway) -> None:
    async with AsyncClient(gateway.url) as client:
        assert (await client.chat("one")).status == "completed"
        task = client.chat_async("long", request_id="r-1", metadata=ENDLESS)
        await wait_active(gateway, "r-1")
        (conn,) = gateway.connections
        first_id = conn.id
        conn.channel.transport.abort()  # the network drops
        with pytest.raises(ConnectionLost) as lost:
            await task
        assert lost.value.close_code == 1006
        record = await wait_record(gateway, "r-1", statuses=(RequestStatus.CANCELLED,))
        assert record.reason == "disconnect"  # G7
        assert (await client.chat("two")).status == "completed"
        (conn,) = gateway.connections
        assert conn.id != first_id


# The gateway's own transport ends shutdown() once the clients answered their close frames (the
# client has seen 1001 when it returns); an ASGI server may report the connection over as soon
# as the close frame is written (uvicorn does), so the next call may meet that close instead.
@native_transport
async def test_shutdown_ends_requests_and_refuses_new_connections() -> None:
    async with running_gateway(backend_options=ENDLESS) as gw:
        client = AsyncClient(gw.url)
        task = client.chat_async("long", request_id="sd-1")
        await wait_active(gw, "sd-1")
        await gw.shutdown(grace=0.05)
        response = await task  # SPEC.md §5.7: cancelled with reason shutdown, then close 1001
        assert (response.status, response.reason) == ("cancelled", "shutdown")
        with pytest.raises(ConnectError):
            await client.chat("after")
        await client.aclose()


async def test_close_1001_mid_request_is_gateway_shutting_down() -> None:
    async def script(peer: Peer) -> None:
        await peer.welcome()
        await peer.chat()
        await peer.ws.close(1001, "going away")

    async with scripted_gateway(script) as url, AsyncClient(url) as client:
        with pytest.raises(GatewayShuttingDown, match="shutting down") as down:
            await client.chat("hi")
        assert down.value.close_code == 1001
        assert isinstance(down.value, ConnectionLost)


def _usage() -> Usage:
    return Usage(input_tokens=1, output_tokens=1)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param("chunk_after_response", id="chunk-after-response"),
        pytest.param("seq_gap", id="seq-gap"),
        pytest.param("content_differs", id="content-differs"),
        pytest.param("second_welcome", id="second-welcome"),
        pytest.param("unannounced_usage", id="unannounced-usage"),
    ],
)
async def test_gateway_protocol_violations_are_refused(bad: str) -> None:
    async def script(peer: Peer) -> None:
        await peer.welcome()
        chats = {chat.message: chat for chat in [await peer.chat(), await peer.chat()]}
        rid = chats["bad"].request_id
        if bad == "chunk_after_response":
            await peer.send(
                Chunk(request_id=rid, seq=0, text="a"),
                Response(request_id=rid, status="completed", content="a", usage=_usage()),
                Chunk(request_id=rid, seq=1, text="b"),
            )
        elif bad == "seq_gap":
            await peer.send(Chunk(request_id=rid, seq=0, text="a"))
            await peer.send(Chunk(request_id=rid, seq=2, text="b"))
        elif bad == "content_differs":
            await peer.send(
                Chunk(request_id=rid, seq=0, text="a"),
                Response(request_id=rid, status="completed", content="ab", usage=_usage()),
            )
        elif bad == "second_welcome":
            await peer.send(Welcome(connection_id="again"))
        elif bad == "unannounced_usage":
            await peer.send(
                Response(request_id=rid, status="completed", content="", usage=_usage()),
                UsageReport(request_id=rid, usage=_usage()),
            )
        await peer.ws.wait_closed()
        assert peer.ws.close_code == 1002  # the SDK closed with "protocol error"

    async with scripted_gateway(script) as url, AsyncClient(url) as client:
        # Another request on the connection never gets an answer: the violation ends it.
        victim = client.chat_async("victim")
        with contextlib.suppress(ProtocolViolation):
            async for _ in client.chat_stream("bad"):
                pass
        with pytest.raises(ProtocolViolation):
            await victim


async def test_unknown_message_types_and_fields_are_ignored() -> None:
    async def script(peer: Peer) -> None:
        await peer.welcome()
        chat = await peer.chat()
        rid = chat.request_id
        await peer.send(
            {"type": "from_the_future", "request_id": rid},
            {"type": "chunk", "request_id": rid, "seq": 0, "text": "hi", "new_field": 1},
            Response(request_id=rid, status="completed", content="hi", usage=_usage()),
        )
        await peer.ws.wait_closed()

    async with scripted_gateway(script) as url, AsyncClient(url) as client:
        assert [c.text async for c in client.chat_stream("x")] == ["hi"]


async def test_close_fails_in_flight_requests_and_the_gateway_cancels_them(
    gateway: Gateway,
) -> None:
    client = AsyncClient(gateway.url)
    task = client.chat_async("long", request_id="cl-1", metadata=ENDLESS)
    await wait_active(gateway, "cl-1")
    await client.aclose()
    with pytest.raises(ConnectionLost, match="client closed"):
        await task
    record = await wait_record(gateway, "cl-1", statuses=(RequestStatus.CANCELLED,))
    assert record.reason == "disconnect"
    with pytest.raises(RuntimeError, match="closed"):
        await client.chat("after close")
    await client.aclose()  # idempotent


async def test_connect_error_when_nothing_listens() -> None:
    async with running_gateway() as gw:
        url = gw.url
    async with AsyncClient(url, connect_timeout=2) as client:
        with pytest.raises(ConnectError):
            await client.chat("anyone?")
        with pytest.raises(ConnectError):
            await client.cancel_request("r-1")  # over HTTP: nobody there either


async def test_while_draining_new_chats_and_connections_are_refused() -> None:
    slow = {"tokens": 60, "token_delay_ms": 10}
    async with (
        running_gateway(backend_options=slow) as gw,
        AsyncClient(gw.url) as client,
        AsyncClient(gw.url) as latecomer,
    ):
        task = client.chat_async("finishes within the grace period", request_id="g-1")
        await wait_active(gw, "g-1")
        drain = asyncio.create_task(gw.shutdown(grace=5))
        await asyncio.sleep(0)  # shutdown() sets `draining` before its first await
        assert gw.draining
        with pytest.raises(RequestRefused) as refused:  # SPEC.md §5.7: `unavailable`
            await client.chat("one more?")
        assert refused.value.code == "unavailable"
        # New handshakes are "refused with HTTP 503 or not accepted" (SPEC.md §5.7).
        with pytest.raises(ConnectError) as handshake:
            await latecomer.chat("hello?")
        assert handshake.value.status in (503, None)
        assert (await task).status == "completed"  # in flight: allowed to finish
        await drain


async def test_an_error_about_no_request_ends_the_connection() -> None:
    """An ``error`` without ``request_id`` (e.g. ``internal``) cannot be attributed: rather than
    leave a request waiting forever, the SDK closes and fails what is in flight with it."""

    async def script(peer: Peer) -> None:
        await peer.welcome()
        await peer.chat()
        await peer.send(Error(code="internal", message="something broke"))
        await peer.ws.wait_closed()

    async with scripted_gateway(script) as url, AsyncClient(url) as client:
        with pytest.raises(RequestRefused, match="something broke") as refused:
            await client.chat("hi")
        assert refused.value.code == "internal"


# -- usage.estimated (SPEC.md §3.8) ----------------------------------------------------------


async def test_usage_says_which_figures_are_estimates(gateway: Gateway) -> None:
    """The simulated backend estimates every figure; a cancel adds saved_tokens."""
    async with AsyncClient(gateway.url) as client:
        response = await client.chat("Tell me about gateways")
        assert response.usage.estimated == ("input_tokens", "output_tokens")
        assert response.to_dict()["usage"]["estimated"] == ["input_tokens", "output_tokens"]
        task = client.chat_async("agent 2", metadata=SLOW_TOOL, request_id="e-1")
        await asyncio.sleep(0.15)
        await client.cancel_request("e-1")
        cancelled = await task
        final = await client.final_usage(cancelled)
        assert final.saved_tokens > 0
        assert final.estimated == ("input_tokens", "output_tokens", "saved_tokens")


@pytest.mark.parametrize(
    ("estimated", "expected"),
    [
        pytest.param(None, None, id="absent"),
        pytest.param((), (), id="empty"),
        pytest.param(("output_tokens",), ("output_tokens",), id="output"),
    ],
)
async def test_usage_estimated_is_passed_through_as_sent(
    estimated: tuple[str, ...] | None, expected: tuple[str, ...] | None
) -> None:
    async def script(peer: Peer) -> None:
        await peer.welcome()
        chat = await peer.chat()
        usage = Usage(input_tokens=3, output_tokens=2, estimated=estimated)
        await peer.send(
            Response(request_id=chat.request_id, status="completed", content="hi", usage=usage)
        )
        await peer.ws.wait_closed()

    async with scripted_gateway(script) as url, AsyncClient(url) as client:
        response = await client.chat("x")
        assert response.usage.estimated == expected
        body = response.to_dict()["usage"]
        if expected is None:
            assert "estimated" not in body  # an old gateway: the SDK does not make it up
        else:
            assert body["estimated"] == list(expected)


async def test_an_invalid_usage_estimated_is_a_protocol_violation() -> None:
    async def script(peer: Peer) -> None:
        await peer.welcome()
        chat = await peer.chat()
        usage = {
            "input_tokens": 3,
            "output_tokens": 2,
            "saved_tokens": 0,
            "final": True,
            "estimated": ["output_tokens", "output_tokens"],
        }
        await peer.send(
            {
                "type": "response",
                "request_id": chat.request_id,
                "status": "completed",
                "content": "hi",
                "usage": usage,
            }
        )
        await peer.ws.wait_closed()

    async with scripted_gateway(script) as url, AsyncClient(url) as client:
        with pytest.raises(ProtocolViolation):
            await client.chat("x")
