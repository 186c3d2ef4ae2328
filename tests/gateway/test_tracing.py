"""OpenTelemetry traces (gateway/tracing.py, extra "tracing"): one trace per request.

A real gateway on an ephemeral port, its spans exported to memory through the module's own
API (:func:`gateway.tracing.create`), never over OTLP. Without ``otlp_endpoint`` nothing is
recorded and no ``opentelemetry`` module is imported (checked in a fresh interpreter).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway import tracing
from gateway.cluster import Cluster
from gateway.config import Config
from gateway.registry import RequestKey
from gateway.server import Gateway
from protocol import CancelReason, CancelStatus, ResponseStatus

from .conftest import running_gateway
from .http_client import http
from .wire import WireClient

ROOT = Path(__file__).resolve().parents[2]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.clear()


def _spans(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


async def _request_span(exporter: InMemorySpanExporter, request_id: str) -> ReadableSpan:
    """The request's span once ended (at the halt, which may follow the response)."""
    async with asyncio.timeout(5):
        while True:
            for span in _spans(exporter, "muxgate.request"):
                assert span.attributes is not None
                if span.attributes["muxgate.request_id"] == request_id:
                    return span
            await asyncio.sleep(0.005)


def _children(exporter: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [
        s
        for s in exporter.get_finished_spans()
        if s.parent is not None and s.parent.span_id == parent.context.span_id
    ]


async def test_completed_request_is_one_span_with_step_children(
    exporter: InMemorySpanExporter,
) -> None:
    traced = tracing.create(service_name="muxgate-test", exporter=exporter)
    async with (
        running_gateway(tracing=traced) as gw,
        WireClient.open(gw.url) as client,
    ):
        await client.chat("r1", "hello there")
        response = await client.response("r1")
        assert response.status is ResponseStatus.COMPLETED
        span = await _request_span(exporter, "r1")

    assert len(_spans(exporter, "muxgate.request")) == 1
    assert span.parent is None  # no client trace: a root
    attributes = dict(span.attributes or {})
    assert attributes["muxgate.status"] == "completed"
    assert "muxgate.cancel_reason" not in attributes
    assert attributes["muxgate.output_tokens"] == response.usage.output_tokens > 0
    assert attributes["muxgate.input_tokens"] == response.usage.input_tokens
    assert "muxgate.user_id_hash" in attributes
    assert "muxgate.node_id" not in attributes  # a single node
    assert span.resource.attributes["service.name"] == "muxgate-test"
    steps = sorted(
        _children(exporter, span), key=lambda s: (s.attributes or {})["muxgate.step.index"]
    )
    kinds = [(s.attributes or {})["muxgate.step.kind"] for s in steps]
    # The simulated pipeline: plan, answer (stream), search (tool), the rest (stream).
    assert kinds[0] == "plan"
    assert {"plan", "llm_stream", "tool"} <= set(kinds)
    assert [s.name for s in steps] == [f"muxgate.step.{k}" for k in kinds]
    assert span.context is not None
    for step in steps:
        assert step.context is not None
        assert step.context.trace_id == span.context.trace_id
        assert (step.attributes or {})["muxgate.step.ended"] is True
        assert step.start_time is not None
        assert span.start_time is not None
        assert step.start_time >= span.start_time
        assert step.end_time is not None
        assert span.end_time is not None
        assert step.end_time <= span.end_time
    # Never per chunk: no event on the request span for the chunks it streamed.
    assert not span.events
    assert len(exporter.get_finished_spans()) == 1 + len(steps)


async def test_cancelled_request_has_the_cancel_event_and_reason(
    exporter: InMemorySpanExporter,
) -> None:
    traced = tracing.create(exporter=exporter)
    slow = {"tokens": 400, "token_delay_ms": 20}
    async with (
        running_gateway(tracing=traced, backend_options=slow) as gw,
        WireClient.open(gw.url) as client,
    ):
        await client.chat("c1", "tell me a long story")
        await client.chunks("c1", 3)
        await client.cancel("c1")
        response = await client.response("c1")
        assert response.status is ResponseStatus.CANCELLED
        usage = await client.final_usage("c1")
        span = await _request_span(exporter, "c1")

    attributes = dict(span.attributes or {})
    assert attributes["muxgate.status"] == "cancelled"
    assert attributes["muxgate.cancel_reason"] == "client"
    assert attributes["muxgate.output_tokens"] == usage.output_tokens
    events = [e.name for e in span.events]
    assert events[0] == "muxgate.cancel_read"
    assert (span.events[0].attributes or {})["muxgate.cancel_reason"] == "client"
    # The cancelled response is on the socket before the cut stream unwinds to its halt.
    assert "muxgate.cancelled_response_written" in events
    steps = _children(exporter, span)
    assert steps
    # The stream the cancel cut never ended: its span ends at the halt, marked so.
    cut = [s for s in steps if (s.attributes or {})["muxgate.step.ended"] is False]
    assert [(s.attributes or {})["muxgate.step.kind"] for s in cut] == ["llm_stream"]


async def test_metadata_traceparent_puts_the_request_in_the_clients_trace(
    exporter: InMemorySpanExporter,
) -> None:
    traced = tracing.create(exporter=exporter)
    other = f"00-{'1' * 32}-{'2' * 16}-01"
    async with (
        running_gateway(tracing=traced) as gw,
        WireClient.open(gw.url, headers={"traceparent": other}) as client,
    ):
        await client.chat("t1", "hi", metadata={"traceparent": TRACEPARENT})
        await client.chat("t2", "hi")  # no metadata: the handshake's header
        await client.response("t1")
        await client.response("t2")
        first = await _request_span(exporter, "t1")
        second = await _request_span(exporter, "t2")

    assert first.parent is not None
    assert first.parent.is_remote
    assert format(first.parent.trace_id, "032x") == TRACE_ID
    assert format(first.parent.span_id, "016x") == PARENT_ID
    assert first.context is not None
    assert format(first.context.trace_id, "032x") == TRACE_ID
    for step in _children(exporter, first):
        assert step.context is not None
        assert format(step.context.trace_id, "032x") == TRACE_ID
    assert second.parent is not None
    assert format(second.parent.trace_id, "032x") == "1" * 32


async def test_a_bad_traceparent_starts_a_trace_of_its_own(
    exporter: InMemorySpanExporter,
) -> None:
    traced = tracing.create(exporter=exporter)
    async with running_gateway(tracing=traced) as gw, WireClient.open(gw.url) as client:
        await client.chat("b1", "hi", metadata={"traceparent": "not-a-traceparent"})
        assert (await client.response("b1")).status is ResponseStatus.COMPLETED
        span = await _request_span(exporter, "b1")
    assert span.parent is None


def test_tracing_off_records_nothing_and_imports_nothing() -> None:
    """A fresh interpreter: a gateway without otlp_endpoint serves a chat; no opentelemetry
    module was imported by then."""
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from gateway.config import Config
        from gateway.server import Gateway
        from gateway.tracing import NO_TRACING
        from tests.gateway.wire import WireClient

        TP = "{TRACEPARENT}"

        async def main():
            gw = Gateway(Config(port=0, backend_options={{"tokens": 5, "token_delay_ms": 1}}))
            assert gw.tracing is NO_TRACING
            await gw.start()
            try:
                async with WireClient.open(gw.url) as client:
                    await client.chat("r1", "hello", metadata={{"traceparent": TP}})
                    response = await client.response("r1")
                    assert response.status.value == "completed", response
            finally:
                await gw.shutdown(grace=0.5)

        asyncio.run(main())
        loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        assert not loaded, loaded
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "ok"  # (the gateway logs before it)


def test_config_turns_tracing_on() -> None:
    assert Gateway(Config(port=0)).tracing is tracing.NO_TRACING
    gw = Gateway(Config(port=0, otlp_endpoint="http://127.0.0.1:4318", otlp_service_name="x"))
    try:
        assert isinstance(gw.tracing, tracing.OtelTracing)
    finally:
        gw.tracing.shutdown()
    assert tracing._traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert tracing._traces_url("http://c:4318/") == "http://c:4318/v1/traces"
    assert tracing._traces_url("http://c/otlp/v1/traces") == "http://c/otlp/v1/traces"


# -- across nodes: the trace context in NATS headers (no NATS server needed) ---------------


class _FakeNats:
    """What Cluster._ask uses of a NATS client: records what it publishes."""

    def __init__(self) -> None:
        self.published: list[dict[str, Any]] = []

    def new_inbox(self) -> str:
        return "_INBOX.test"

    async def subscribe(self, subject: str, cb: Any) -> Any:
        async def unsubscribe() -> None:
            return None

        return SimpleNamespace(unsubscribe=unsubscribe)

    async def publish(
        self, subject: str, payload: bytes, reply: str = "", headers: Any = None
    ) -> None:
        self.published.append(
            {"subject": subject, "payload": payload, "reply": reply, "headers": headers}
        )


def _cluster(traced: tracing.Tracing, node: str) -> tuple[Cluster, _FakeNats]:
    cluster = Cluster("nats://unused", node_id=node, tracing=traced)
    nc = _FakeNats()
    cluster._nc = nc  # type: ignore[assignment]
    cluster.connected = True
    traced.set_node(node)
    return cluster, nc


async def test_a_question_carries_the_trace_and_the_answer_joins_it(
    exporter: InMemorySpanExporter,
) -> None:
    asker, asker_nc = _cluster(tracing.create(exporter=exporter), "node-a")
    owner, _ = _cluster(tracing.create(exporter=exporter), "node-b")
    decided: list[tuple[RequestKey, CancelReason]] = []

    def on_cancel(key: RequestKey, reason: CancelReason) -> CancelStatus:
        decided.append((key, reason))
        return CancelStatus.CANCELLED

    owner.on_cancel = on_cancel

    with asker.tracing.span(
        "muxgate.cancel", traceparent=TRACEPARENT, **{"muxgate.request_id": "x1"}
    ):
        await asker.cancel(RequestKey("u", "x1"), CancelReason.API)
    (question,) = asker_nc.published
    headers = question["headers"]
    assert headers is not None
    assert headers["traceparent"].split("-")[1] == TRACE_ID

    # The owner answers the message as NATS delivers it (data, headers, reply inbox).
    msg = SimpleNamespace(data=question["payload"], headers=headers, reply="")
    await owner._answer_cancel(msg)  # type: ignore[arg-type]
    assert decided == [(RequestKey("u", "x1"), CancelReason.API)]

    (ask,) = _spans(exporter, "muxgate.cancel")
    (answer,) = _spans(exporter, "muxgate.cluster.answer_cancel")
    assert ask.context is not None
    assert answer.context is not None
    assert format(ask.context.trace_id, "032x") == TRACE_ID
    assert answer.context.trace_id == ask.context.trace_id
    assert answer.parent is not None
    assert answer.parent.span_id == ask.context.span_id
    attributes = dict(answer.attributes or {})
    assert attributes["muxgate.cancel_status"] == "cancelled"
    assert attributes["muxgate.node_id"] == "node-b"
    assert attributes["muxgate.request_id"] == "x1"


async def test_no_trace_no_headers(exporter: InMemorySpanExporter) -> None:
    """Outside a traced call, and with tracing off, questions carry no headers, and an answer
    to a question without them records nothing."""
    for traced in (tracing.create(exporter=exporter), tracing.NO_TRACING):
        cluster, nc = _cluster(traced, "node-a")
        cluster.on_cancel = lambda key, reason: CancelStatus.NOT_FOUND
        await cluster.cancel(RequestKey("u", "x2"), CancelReason.API)
        assert nc.published[0]["headers"] is None
        msg = SimpleNamespace(data=nc.published[0]["payload"], headers=None, reply="")
        await cluster._answer_cancel(msg)  # type: ignore[arg-type]
    assert not exporter.get_finished_spans()


@contextlib.asynccontextmanager
async def traced_pair(exporter: InMemorySpanExporter) -> AsyncIterator[tuple[Gateway, Gateway]]:
    """Nodes ``a`` and ``b``, each tracing to ``exporter``, joined over a real NATS server."""
    from .test_cluster import NATS_SERVER, nats_server, nodes_on

    if NATS_SERVER is None:
        pytest.skip("nats-server not installed (extra 'cluster')")
    async with nats_server() as server, contextlib.AsyncExitStack() as stack:
        a, b = [
            (await stack.enter_async_context(
                nodes_on(server.url, name, tracing=tracing.create(exporter=exporter))
            ))[0]
            for name in ("a", "b")
        ]  # fmt: skip
        assert b.cluster is not None
        async with asyncio.timeout(10):
            await b.cluster.wait_for_peers(1)
        yield a, b


async def test_one_trace_across_two_real_nodes(exporter: InMemorySpanExporter) -> None:
    """A chat on node a in the client's trace, cancelled by a DELETE on node b carrying the same
    ``traceparent``: b's ask, a's answer over NATS and the request's span are one trace."""
    async with traced_pair(exporter) as (a, b), WireClient.open(a.url) as client:
        metadata = {"tokens": 100_000, "token_delay_ms": 5, "traceparent": TRACEPARENT}
        await client.chat("r1", metadata=metadata)
        await client.chunks("r1", 2)
        answer = await http("DELETE", f"{b.http_url}/v1/requests/r1", {"traceparent": TRACEPARENT})
        assert answer.json()["status"] == "cancelled"
        await client.response("r1")
        request = await _request_span(exporter, "r1")
    (ask,) = [s for s in exporter.get_finished_spans() if s.name == "muxgate.cancel"]
    (reply,) = _spans(exporter, "muxgate.cluster.answer_cancel")
    for span in (request, ask, reply):
        assert span.context is not None
        assert format(span.context.trace_id, "032x") == TRACE_ID
    assert (ask.attributes or {})["muxgate.node_id"] == "b"
    assert (reply.attributes or {})["muxgate.node_id"] == "a"
    assert (request.attributes or {})["muxgate.node_id"] == "a"
    assert (request.attributes or {})["muxgate.cancel_reason"] == "api"
    assert reply.parent is not None
    assert ask.context is not None
    assert reply.parent.span_id == ask.context.span_id


async def test_a_resume_on_another_node_joins_the_resuming_connections_trace(
    exporter: InMemorySpanExporter,
) -> None:
    """The resuming node's question (``muxgate.resume``, parent: the new connection's
    handshake ``traceparent``) and the owner's answer are one trace."""
    async with traced_pair(exporter) as (a, b):
        async with WireClient.open(a.url) as first:
            track = await first.chat("r1", resumable=True, metadata={"tokens": 40})
            epoch = (await first.resumable("r1")).epoch
            await first.response("r1")
        headers = {"traceparent": TRACEPARENT}
        async with WireClient.open(b.url, headers=headers) as second:
            await second.resume("r1", epoch, track.chunks[-1].seq)
            await second.response("r1")
    (ask,) = [s for s in exporter.get_finished_spans() if s.name == "muxgate.resume"]
    (reply,) = _spans(exporter, "muxgate.cluster.answer_resume")
    for span in (ask, reply):
        assert span.context is not None
        assert format(span.context.trace_id, "032x") == TRACE_ID
    assert (reply.attributes or {})["muxgate.resume_status"] == "resumed"
    assert (reply.attributes or {})["muxgate.node_id"] == "a"
    assert (ask.attributes or {})["muxgate.node_id"] == "b"
