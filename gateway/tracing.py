"""OpenTelemetry traces, an optional extra (``pip install -e '.[tracing]'``; issue 17).

The gateway sees one narrow interface: a :class:`Tracing` object. Without ``otlp_endpoint`` it
is :data:`NO_TRACING`, whose methods do nothing and return nothing: no ``opentelemetry`` module
is imported, and a request costs one method call at its start (never one per chunk). With it,
:func:`from_config` builds an :class:`OtelTracing` that exports over OTLP/HTTP in the background
(a batch span processor); tests pass their own exporter to :func:`create`.

What is traced (one trace per request; nothing per token or chunk):

- ``muxgate.request``: one span per accepted chat, from its start to the pipeline's halt. A
  child of the client's W3C ``traceparent`` (the chat's ``metadata.traceparent``, else the
  WebSocket handshake's ``traceparent`` header). Attributes: request id, a hash of the user id,
  the node id in a cluster, the final status, the cancel reason, the tokens, the error code.
  Events: ``muxgate.cancel_read`` (with its reason) and ``muxgate.cancelled_response_written``.
- ``muxgate.step.<kind>``: one child span per pipeline step (``plan``, ``llm``, ``llm_stream``,
  ``tool``, ``agent``), from the step helpers' begin to their end; a step cut by a cancel (or
  that raised) ends at the halt with ``muxgate.step.ended = false``.
- Across nodes: a question a node asks the others over NATS (``Cluster._ask``) carries the
  current trace context in the NATS message's headers (:meth:`Tracing.inject`); a node that
  answers a cancel or a lookup records it as a span of that trace (:meth:`Tracing.remote_span`).
  The asking side's span is ``muxgate.cancel`` / ``muxgate.lookup`` (:meth:`Tracing.span`).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the optional extra "tracing"; imported only when tracing is on
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span

    from .config import Config
    from .pipeline import StepRecord

__all__ = [
    "NO_TRACING",
    "OtelTracing",
    "RequestSpan",
    "SpanHandle",
    "Tracing",
    "create",
    "from_config",
    "traceparent_header",
]

TRACEPARENT = "traceparent"


class SpanHandle:
    """A span the caller may annotate; this one (tracing off) ignores it."""

    __slots__ = ()

    def set(self, key: str, value: str | int | float | bool) -> None:
        """Set an attribute (no-op here)."""


_NULL_HANDLE = SpanHandle()


class Tracing:
    """Tracing off: every method does nothing. :class:`OtelTracing` is tracing on."""

    enabled = False

    def set_node(self, node_id: str) -> None:
        """This node's id in a cluster (an attribute of every request span)."""

    def request(
        self, *, request_id: str, user_id: str, traceparent: str | None
    ) -> RequestSpan | None:
        """The span of one accepted chat, started now (None: tracing off)."""
        return None

    @contextlib.contextmanager
    def span(
        self, name: str, *, traceparent: str | None = None, **attributes: str
    ) -> Iterator[SpanHandle]:
        """A span around a block, current inside it (so :meth:`inject` sees it)."""
        yield _NULL_HANDLE

    @contextlib.contextmanager
    def remote_span(
        self, name: str, headers: Mapping[str, str] | None, **attributes: str
    ) -> Iterator[SpanHandle]:
        """A span of another node's trace, whose context came in ``headers`` (NATS); none
        when the headers carry no trace context."""
        yield _NULL_HANDLE

    def inject(self) -> dict[str, str] | None:
        """The current trace context as message headers (None: no trace to carry)."""
        return None

    def shutdown(self) -> None:
        """Export what is pending and stop."""


#: Tracing off (no ``otlp_endpoint``): shared, stateless.
NO_TRACING = Tracing()


def from_config(config: Config) -> Tracing:
    """:data:`NO_TRACING` without ``otlp_endpoint``; else OTLP/HTTP export to it."""
    if config.otlp_endpoint is None:
        return NO_TRACING
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    exporter = OTLPSpanExporter(endpoint=_traces_url(config.otlp_endpoint))
    return create(service_name=config.otlp_service_name, exporter=exporter, batch=True)


def create(
    *, service_name: str = "muxgate", exporter: SpanExporter, batch: bool = False
) -> OtelTracing:
    """Tracing on, exporting to ``exporter`` (e.g. an ``InMemorySpanExporter`` in tests):
    synchronously at each span's end, or in the background with ``batch=True``."""
    return OtelTracing(service_name=service_name, exporter=exporter, batch=batch)


def _traces_url(endpoint: str) -> str:
    """``http://collector:4318`` -> ``http://collector:4318/v1/traces``; a URL with a path is
    taken as it is (the OTLP/HTTP convention for a signal-specific endpoint)."""
    from urllib.parse import urlsplit

    if urlsplit(endpoint).path.strip("/"):
        return endpoint
    return endpoint.rstrip("/") + "/v1/traces"


def traceparent_header(headers: Mapping[str, str]) -> str | None:
    """A handshake's ``traceparent`` header, if it has exactly one."""
    try:
        value = headers.get(TRACEPARENT)
    except LookupError:  # repeated (websockets' MultipleValuesError): none taken
        return None
    return value if isinstance(value, str) and value else None


def _user_hash(user_id: str) -> str:
    return hashlib.sha256(user_id.encode()).hexdigest()[:16]


class OtelTracing(Tracing):
    """Tracing on: its own TracerProvider (the process's global one is left alone)."""

    enabled = True

    def __init__(self, *, service_name: str, exporter: SpanExporter, batch: bool) -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._trace = trace
        self._provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        self._provider.add_span_processor(processor)
        self.tracer = self._provider.get_tracer("muxgate")
        self._propagator = TraceContextTextMapPropagator()
        self.node_id: str | None = None

    def set_node(self, node_id: str) -> None:
        self.node_id = node_id

    def _parent(self, traceparent: str | None) -> Any:
        if not traceparent:
            return None
        return self._propagator.extract({TRACEPARENT: traceparent})

    def request(
        self, *, request_id: str, user_id: str, traceparent: str | None
    ) -> RequestSpan | None:
        attributes: dict[str, str] = {
            "muxgate.request_id": request_id,
            "muxgate.user_id_hash": _user_hash(user_id),
        }
        if self.node_id is not None:
            attributes["muxgate.node_id"] = self.node_id
        span = self.tracer.start_span(
            "muxgate.request",
            context=self._parent(traceparent),
            kind=self._trace.SpanKind.SERVER,
            attributes=attributes,
        )
        return RequestSpan(self, span)

    @contextlib.contextmanager
    def span(
        self, name: str, *, traceparent: str | None = None, **attributes: str
    ) -> Iterator[SpanHandle]:
        if self.node_id is not None:
            attributes.setdefault("muxgate.node_id", self.node_id)
        with self.tracer.start_as_current_span(
            name,
            context=self._parent(traceparent),
            kind=self._trace.SpanKind.CLIENT,
            attributes=attributes,
        ) as span:
            yield _Handle(span)

    @contextlib.contextmanager
    def remote_span(
        self, name: str, headers: Mapping[str, str] | None, **attributes: str
    ) -> Iterator[SpanHandle]:
        traceparent = headers.get(TRACEPARENT) if headers else None
        if not traceparent:
            yield _NULL_HANDLE
            return
        if self.node_id is not None:
            attributes.setdefault("muxgate.node_id", self.node_id)
        with self.tracer.start_as_current_span(
            name,
            context=self._parent(traceparent),
            kind=self._trace.SpanKind.SERVER,
            attributes=attributes,
        ) as span:
            yield _Handle(span)

    def inject(self) -> dict[str, str] | None:
        if not self._trace.get_current_span().get_span_context().is_valid:
            return None
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        return carrier or None

    def shutdown(self) -> None:
        self._provider.shutdown()


class _Handle(SpanHandle):
    __slots__ = ("_span",)

    def __init__(self, span: Span) -> None:
        self._span = span

    def set(self, key: str, value: str | int | float | bool) -> None:
        self._span.set_attribute(key, value)


class RequestSpan:
    """The ``muxgate.request`` span of one request and its step spans. Called by the request
    (start, cancel, halt) and by its :class:`RequestContext` (a step's begin and end): a few
    times per request, never per chunk."""

    __slots__ = ("_ended", "_span", "_steps", "_tracing")

    def __init__(self, tracing: OtelTracing, span: Span) -> None:
        self._tracing = tracing
        self._span = span
        self._steps: dict[int, Span] = {}
        self._ended = False

    def step_begin(self, step: StepRecord) -> None:
        if self._ended:
            return
        trace = self._tracing._trace
        self._steps[step.index] = self._tracing.tracer.start_span(
            f"muxgate.step.{step.kind}",
            context=trace.set_span_in_context(self._span),
            attributes={
                "muxgate.step.kind": step.kind,
                "muxgate.step.name": step.name,
                "muxgate.step.index": step.index,
                "muxgate.step.abortable": step.abortable,
            },
        )

    def step_end(self, step: StepRecord) -> None:
        span = self._steps.pop(step.index, None)
        if span is not None:
            span.set_attribute("muxgate.step.ended", True)
            span.end()

    def cancel_read(self, reason: str) -> None:
        if not self._ended:
            self._span.add_event("muxgate.cancel_read", {"muxgate.cancel_reason": reason})

    def cancel_sent(self) -> None:
        """The cancelled response was handed to the socket (dropped after the halt: the span
        has ended; the halt is usually later, a cut pipeline unwinding takes a loop turn)."""
        if not self._ended:
            self._span.add_event("muxgate.cancelled_response_written")

    def halted(
        self,
        *,
        status: str,
        reason: str | None,
        input_tokens: int,
        output_tokens: int,
        saved_tokens: int,
        error_code: str | None,
    ) -> None:
        """The pipeline halted: open steps end (cut), then the request span."""
        if self._ended:
            return
        self._ended = True
        for span in self._steps.values():
            span.set_attribute("muxgate.step.ended", False)
            span.end()
        self._steps.clear()
        span = self._span
        span.set_attribute("muxgate.status", status)
        if reason is not None:
            span.set_attribute("muxgate.cancel_reason", reason)
        span.set_attribute("muxgate.input_tokens", input_tokens)
        span.set_attribute("muxgate.output_tokens", output_tokens)
        if saved_tokens:
            span.set_attribute("muxgate.saved_tokens", saved_tokens)
        if error_code is not None:
            span.set_attribute("muxgate.error_code", error_code)
            span.set_status(self._tracing._trace.StatusCode.ERROR, error_code)
        span.end()
