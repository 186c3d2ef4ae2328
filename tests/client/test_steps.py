"""Pipeline steps in the SDK (SPEC.md §3.12): ``steps=True``, ``stream.steps``,
``stream.current_step``, ``stream.halt``, ``response.halt`` and the ``on_step`` callback.

First against a scripted gateway (exact frames: order within one batch, the halt's two stages,
violations), then against a real gateway whose simulated backend plans, streams, calls a tool
(and an agent), and streams again — so a cancel lands in a step of the kind the test chooses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from gateway import (
    AsyncChatStream,
    AsyncClient,
    Client,
    Halt,
    HaltState,
    InvalidRequest,
    ProtocolViolation,
    Step,
    StepInfo,
    StepState,
)
from gateway.client._config import CodecName
from gateway.server import Gateway
from protocol import (
    CancelReason,
    CancelResult,
    CancelStatus,
    Chunk,
    Response,
    ResponseStatus,
    Usage,
    UsageReport,
)

from .conftest import ENDLESS, ThreadedGateway, wait_active
from .scripted import Peer, scripted_gateway

CODECS = [pytest.param(c, id=c) for c in ("json", "msgpack")]

#: Simulated backend: plan, answer (4 tokens), search, fact-check, answer-continued; all quick.
QUICK_AGENT = {"tokens": 8, "token_delay_ms": 1, "plan_ms": 1, "tool_ms": 1, "agent_ms": 1}
#: The tool call (step 2, "search") takes long enough to be cancelled during it.
SLOW_SEARCH = {"tokens": 6, "token_delay_ms": 1, "plan_ms": 0, "tool_ms": 400}
SEARCH = StepInfo(index=2, kind="tool", name="search")
STARTED, ENDED = StepState.STARTED, StepState.ENDED


def _usage(*, final: bool = True) -> Usage:
    return Usage(input_tokens=1, output_tokens=1, saved_tokens=0, final=final)


def _step(rid: str, index: int, kind: str, name: str, state: StepState) -> Step:
    return Step(request_id=rid, index=index, kind=kind, name=name, state=state)


def _brief(step: Step) -> tuple[int, str, str, str]:
    return (step.index, step.kind, step.name, step.state.value)


# -- against a scripted gateway ----------------------------------------------------------------


async def test_the_chat_asks_for_steps_only_when_told() -> None:
    chats: dict[str, bool] = {}

    async def script(peer: Peer) -> None:
        await peer.welcome()
        for _ in range(4):
            chat = await peer.chat()
            assert chat.message is not None
            chats[chat.message] = chat.steps
            await peer.send(
                Response(
                    request_id=chat.request_id, status=ResponseStatus.COMPLETED, usage=_usage()
                )
            )
        await peer.ws.wait_closed()

    async with scripted_gateway(script) as url, AsyncClient(url) as client:
        await client.chat("chat-on", steps=True)
        await client.chat("chat-off")
        assert [c async for c in client.chat_stream("stream-on", steps=True)] == []
        assert [c async for c in client.chat_stream("stream-off")] == []
    assert chats == {"chat-on": True, "chat-off": False, "stream-on": True, "stream-off": False}


async def test_on_step_requires_steps() -> None:
    async with AsyncClient("ws://127.0.0.1:9") as client:
        with pytest.raises(InvalidRequest, match="steps=True"):
            client.chat_stream("x", on_step=print)

        async def awaitable_callback(step: Step) -> None:
            pass

        with pytest.raises(TypeError, match="plain function"):
            client.chat_stream("x", steps=True, on_step=awaitable_callback)
    with Client("ws://127.0.0.1:9") as sync_client, pytest.raises(InvalidRequest):
        sync_client.chat_stream("x", on_step=print)


async def test_steps_are_taken_in_order_with_the_chunks_of_one_frame() -> None:
    """A whole exchange in one batched frame: the callback and the loop still see the wire's
    order, and ``current_step`` at each chunk is the step the chunk was streamed in."""

    async def script(peer: Peer) -> None:
        await peer.welcome()
        rid = (await peer.chat()).request_id
        await peer.send(
            Chunk(request_id=rid, seq=0, text="a"),
            _step(rid, 0, "llm_stream", "answer", STARTED),
            Chunk(request_id=rid, seq=1, text="b"),
            _step(rid, 0, "llm_stream", "answer", ENDED),
            _step(rid, 1, "tool", "search", STARTED),
            _step(rid, 1, "tool", "search", ENDED),
            _step(rid, 2, "brand_new_kind", "resume", STARTED),  # unknown kinds are accepted
            Chunk(request_id=rid, seq=2, text="c"),
            _step(rid, 2, "brand_new_kind", "resume", ENDED),
            Response(
                request_id=rid, status=ResponseStatus.COMPLETED, content="abc", usage=_usage()
            ),
        )
        await peer.ws.wait_closed()

    events: list[tuple[Any, ...]] = []
    async with scripted_gateway(script) as url, AsyncClient(url) as client:
        stream = client.chat_stream(
            "x", steps=True, on_step=lambda s: events.append(("step", s.index, s.state.value))
        )
        async for chunk in stream:
            current = stream.current_step
            events.append(("chunk", chunk.text, current.name if current else None))
    assert events == [
        ("chunk", "a", None),
        ("step", 0, "started"),
        ("chunk", "b", "answer"),
        ("step", 0, "ended"),
        ("step", 1, "started"),
        ("step", 1, "ended"),
        ("step", 2, "started"),
        ("chunk", "c", "resume"),
        ("step", 2, "ended"),
    ]
    assert [(s.index, s.state.value) for s in stream.steps] == [
        e[1:] for e in events if e[0] == "step"
    ]
    assert stream.current_step is None
    assert stream.response is not None
    assert stream.response.completed
    assert stream.halt is None
    assert stream.response.halt is None


async def test_overlapping_steps_current_step_is_the_latest_still_running() -> None:
    seen: list[str | None] = []

    async def script(peer: Peer) -> None:
        await peer.welcome()
        rid = (await peer.chat()).request_id
        await peer.send(_step(rid, 0, "tool", "flights", STARTED))
        await peer.send(_step(rid, 1, "tool", "hotels", STARTED))
        await peer.send(_step(rid, 1, "tool", "hotels", ENDED))
        await peer.send(_step(rid, 0, "tool", "flights", ENDED))
        await peer.send(Response(request_id=rid, status=ResponseStatus.COMPLETED, usage=_usage()))
        await peer.ws.wait_closed()

    async with scripted_gateway(script) as url, AsyncClient(url) as client:
        stream: AsyncChatStream

        def on_step(step: Step) -> None:
            current = stream.current_step
            seen.append(current.name if current is not None else None)

        stream = client.chat_stream("x", steps=True, on_step=on_step)
        assert [c async for c in stream] == []
    assert seen == ["flights", "hotels", "flights", None]
    assert stream.current_step is None


async def test_halt_is_pending_in_the_response_then_final_in_the_usage() -> None:
    release_usage = asyncio.Event()
    pending = Halt(state=HaltState.PENDING, step=StepInfo(index=1, kind="tool", name="search"))
    halted = Halt(state=HaltState.HALTED, step=StepInfo(index=1, kind="tool", name="search"))

    async def script(peer: Peer) -> None:
        await peer.welcome()
        rid = (await peer.chat()).request_id
        await peer.send(
            _step(rid, 0, "llm_stream", "answer", STARTED),
            Chunk(request_id=rid, seq=0, text="a"),
            Chunk(request_id=rid, seq=1, text="b"),
            _step(rid, 0, "llm_stream", "answer", ENDED),
            _step(rid, 1, "tool", "search", STARTED),
        )
        assert (await peer.receive()).TYPE == "cancel"
        await peer.send(
            Response(
                request_id=rid,
                status=ResponseStatus.CANCELLED,
                reason=CancelReason.CLIENT,
                usage=_usage(final=False),
                halt=pending,
            ),
            CancelResult(request_id=rid, status=CancelStatus.CANCELLED),
        )
        await release_usage.wait()
        await peer.send(UsageReport(request_id=rid, usage=_usage(), halt=halted))
        await peer.ws.wait_closed()

    async with scripted_gateway(script) as url, AsyncClient(url) as client:
        stream = client.chat_stream("x", steps=True)
        async for _ in stream:
            break  # the first chunk: the steps after it are queued, the chunk after it too
        response = await stream.cancel()
        assert response is not None
        assert response.cancelled
        # The steps queued before the response are taken in; the chunk is dropped.
        assert [_brief(s) for s in stream.steps] == [
            (0, "llm_stream", "answer", "started"),
            (0, "llm_stream", "answer", "ended"),
            (1, "tool", "search", "started"),
        ]
        assert response.halt == pending
        assert stream.halt == pending
        assert response.to_dict()["halt"] == {
            "state": "pending",
            "step": {"index": 1, "kind": "tool", "name": "search"},
            "aborted": False,
        }
        assert stream.current_step == stream.steps[-1]  # the pipeline is finishing it
        release_usage.set()
        assert (await client.final_usage(response)).final
        assert stream.halt == halted
        assert response.halt == pending  # the response is what it said
        assert stream.current_step is None


@pytest.mark.parametrize(
    "bad",
    [
        "step_without_steps",
        "halt_without_steps",
        "step_index_gap",
        "step_ended_not_started",
        "step_after_response",
    ],
)
async def test_step_violations_are_refused(bad: str) -> None:
    async def script(peer: Peer) -> None:
        await peer.welcome()
        chats = {chat.message: chat for chat in [await peer.chat(), await peer.chat()]}
        rid = chats["bad"].request_id
        if bad == "step_without_steps":
            await peer.send(_step(rid, 0, "plan", "plan", STARTED))
        elif bad == "halt_without_steps":
            halt = Halt(state=HaltState.PENDING)
            await peer.send(
                Response(
                    request_id=rid,
                    status=ResponseStatus.CANCELLED,
                    reason=CancelReason.TIMEOUT,
                    usage=_usage(final=False),
                    halt=halt,
                )
            )
        elif bad == "step_index_gap":
            await peer.send(_step(rid, 1, "plan", "plan", STARTED))
        elif bad == "step_ended_not_started":
            await peer.send(_step(rid, 0, "plan", "plan", ENDED))
        elif bad == "step_after_response":
            await peer.send(
                Response(request_id=rid, status=ResponseStatus.COMPLETED, usage=_usage()),
                _step(rid, 0, "plan", "plan", STARTED),
            )
        await peer.ws.wait_closed()
        assert peer.ws.close_code == 1002  # the SDK closed with "protocol error"

    asks = bad not in ("step_without_steps", "halt_without_steps")
    async with scripted_gateway(script) as url, AsyncClient(url) as client:
        victim = client.chat_async("victim", steps=True)
        with contextlib.suppress(ProtocolViolation):
            async for _ in client.chat_stream("bad", steps=asks):
                pass
        with pytest.raises(ProtocolViolation):
            await victim


# -- against a real gateway ---------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
async def test_steps_arrive_in_order_with_chunks_and_before_the_response(
    gateway: Gateway, codec: CodecName
) -> None:
    events: list[Step | Chunk] = []
    async with AsyncClient(gateway.url, codec=codec) as client:
        stream = client.chat_stream(
            "Find flights to Lisbon", steps=True, metadata=QUICK_AGENT, on_step=events.append
        )
        async for chunk in stream:
            events.append(chunk)
    steps = [e for e in events if isinstance(e, Step)]
    assert [_brief(s) for s in steps] == [
        (0, "plan", "plan", "started"),
        (0, "plan", "plan", "ended"),
        (1, "llm_stream", "answer", "started"),
        (1, "llm_stream", "answer", "ended"),
        (2, "tool", "search", "started"),
        (2, "tool", "search", "ended"),
        (3, "agent", "fact-check", "started"),
        (3, "agent", "fact-check", "ended"),
        (4, "llm_stream", "answer-continued", "started"),
        (4, "llm_stream", "answer-continued", "ended"),
    ]
    assert stream.steps == tuple(steps)
    # Every chunk was streamed inside one of the two answer steps, and both streamed some.
    open_step: Step | None = None
    texts: dict[str, str] = {}
    for event in events:
        if isinstance(event, Step):
            open_step = event if event.state is STARTED else None
        else:
            assert open_step is not None, event
            assert open_step.kind == "llm_stream", event
            texts[open_step.name] = texts.get(open_step.name, "") + event.text
    assert set(texts) == {"answer", "answer-continued"}
    response = stream.response
    assert response is not None
    assert response.completed
    assert texts["answer"] + texts["answer-continued"] == response.content
    assert response.halt is None
    assert stream.halt is None
    assert stream.current_step is None


async def test_cancel_during_a_tool_step_halts_after_it(gateway: Gateway) -> None:
    tool_started = asyncio.Event()

    def on_step(step: Step) -> None:
        if step.kind == "tool" and step.state is STARTED:
            tool_started.set()

    async with AsyncClient(gateway.url) as client:
        stream = client.chat_stream(
            "Find flights to Lisbon", steps=True, metadata=SLOW_SEARCH, on_step=on_step
        )
        consumer = asyncio.create_task(_texts(stream))
        async with asyncio.timeout(10):
            await tool_started.wait()
        result = await client.cancel_request(stream.request_id)
        assert result.status == "cancelled"
        await consumer
        response = stream.response
        assert response is not None
        assert response.cancelled
        assert not response.usage.final
        assert response.halt == Halt(state=HaltState.PENDING, step=SEARCH)
        assert stream.halt == response.halt
        current = stream.current_step
        assert current is not None
        assert _brief(current) == (2, "tool", "search", "started")
        at_response = stream.steps
        assert at_response[-1] == current  # no step after the cancel was read

        usage = await client.final_usage(response)
        assert usage.final
        assert stream.halt == Halt(state=HaltState.HALTED, step=SEARCH, aborted=False)
        assert stream.current_step is None
        assert stream.steps == at_response
        # The SDK refuses any chunk or step after the response (a protocol violation closes
        # the connection): still open, and serving, after the usage report came in-band.
        assert client.connected
        assert (await client.chat("again", metadata={"tokens": 2})).completed


async def test_cancel_while_the_answer_streams_aborts_the_stream(gateway: Gateway) -> None:
    async with AsyncClient(gateway.url) as client:
        stream = client.chat_stream("Write a long story", steps=True, metadata=ENDLESS)
        received = 0
        async for _ in stream:
            received += 1
            if received == 3:
                break
        response = await stream.cancel()
        assert response is not None
        assert response.cancelled
        assert response.halt == Halt(state=HaltState.PENDING)  # no step to wait for
        usage = await client.final_usage(response)
        assert usage.final
        answer = StepInfo(index=1, kind="llm_stream", name="answer")
        assert stream.halt == Halt(state=HaltState.HALTED, step=answer, aborted=True)
        assert [_brief(s) for s in stream.steps] == [
            (0, "plan", "plan", "started"),
            (0, "plan", "plan", "ended"),
            (1, "llm_stream", "answer", "started"),
        ]
        assert stream.current_step is None
        assert client.connected


async def test_without_steps_there_are_no_steps_and_no_halt(gateway: Gateway) -> None:
    async with AsyncClient(gateway.url) as client:
        # A step or a halt for a chat that did not ask would be a ProtocolViolation.
        stream = client.chat_stream("Find flights", metadata=SLOW_SEARCH)
        async for _ in stream:
            response = await stream.cancel()
            break
        else:
            raise AssertionError("no chunk")
        assert response is not None
        assert response.cancelled
        assert response.halt is None
        assert "halt" not in response.to_dict()
        await client.final_usage(response)
        assert stream.steps == ()
        assert stream.halt is None
        assert stream.current_step is None

        task = client.chat_async("Find flights", request_id="plain-off", metadata=SLOW_SEARCH)
        await wait_active(gateway, "plain-off")
        await client.cancel_request("plain-off")
        response = await task
        assert response.cancelled
        assert response.halt is None
        await client.final_usage(response)
        assert client.connected


async def test_a_plain_chat_with_steps_gets_the_halt(gateway: Gateway) -> None:
    async with AsyncClient(gateway.url) as client:
        task = client.chat_async(
            "Plan a trip",
            request_id="plain-steps",
            steps=True,
            metadata={"tokens": 4, "token_delay_ms": 1, "plan_ms": 300, "tool_ms": 0},
        )
        await wait_active(gateway, "plain-steps")
        await client.cancel_request("plain-steps")
        response = await task
        plan = StepInfo(index=0, kind="plan", name="plan")
        assert response.halt == Halt(state=HaltState.PENDING, step=plan)
        assert (await client.final_usage(response)).final
        assert client.connected


async def test_a_failing_callback_costs_neither_the_answer_nor_the_connection(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[Step] = []

    def on_step(step: Step) -> None:
        calls.append(step)
        raise RuntimeError(f"display bug at step {step.index}")

    caplog.set_level(logging.ERROR, logger="muxgate.client")
    async with AsyncClient(gateway.url) as client:
        other = client.chat_async("meanwhile", metadata={"tokens": 20, "token_delay_ms": 2})
        stream = client.chat_stream("x", steps=True, metadata=QUICK_AGENT, on_step=on_step)
        text = "".join([c.text async for c in stream])
        assert stream.response is not None
        assert stream.response.completed
        assert text == stream.response.content
        assert len(calls) == 10
        assert stream.steps == tuple(calls)
        assert (await other).completed
        assert client.connected
    failures = [r for r in caplog.records if "on_step callback failed" in r.getMessage()]
    assert len(failures) == 10
    assert all(r.exc_info is not None for r in failures)


def test_the_blocking_client_follows_steps_and_the_halt(threaded_gateway: ThreadedGateway) -> None:
    tool_started = threading.Event()
    seen: list[Step] = []
    callback_threads: set[str] = set()

    def on_step(step: Step) -> None:
        seen.append(step)
        callback_threads.add(threading.current_thread().name)
        if step.kind == "tool" and step.state is STARTED:
            tool_started.set()

    with Client(threaded_gateway.url) as client:
        stream = client.chat_stream(
            "Find flights", steps=True, metadata=SLOW_SEARCH, on_step=on_step
        )
        with ThreadPoolExecutor(1) as pool:
            chunks = pool.submit(list, stream)
            assert tool_started.wait(10)
            assert client.cancel_request(stream.request_id).status == "cancelled"
            assert chunks.result(10)
        response = stream.response
        assert response is not None
        assert response.cancelled
        assert response.halt == Halt(state=HaltState.PENDING, step=SEARCH)
        current = stream.current_step
        assert current is not None
        assert current.name == "search"
        assert client.final_usage(response).final
        assert stream.halt == Halt(state=HaltState.HALTED, step=SEARCH)
        assert stream.current_step is None
        assert list(stream.steps) == seen
        assert callback_threads == {"muxgate-client"}  # the client's thread, as documented


# -- helpers -------------------------------------------------------------------------------------


async def _texts(stream: Any) -> list[str]:
    return [chunk.text async for chunk in stream]
