"""Traces with OpenTelemetry, configured by the standard variables alone.

Tracing is on when `OTEL_TRACES_EXPORTER` names an exporter (`otlp`, `console`), or, that
variable unset, when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is
set; `OTEL_SDK_DISABLED=true` turns it off. The OTLP protocol is
`OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` or `OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf`, the
default, or `grpc`); the SDK itself reads the endpoint, headers, timeout, the sampler
(`OTEL_TRACES_SAMPLER`/`_ARG`), the resource (`OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`) and the export queue's bounds (`OTEL_BSP_*`). Off, no span is
made and no request runs a line of it: the fronts and the pipeline hold None.

Spans are exported from a bounded queue on a thread of their own: a slow or unreachable
collector costs spans, which are counted (`vit_trace_spans_dropped_total`), never a request's
time.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

DEFAULT_SERVICE_NAME = "vit-inference"
"""The resource's service.name unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES name one."""
TRACER_NAME = "vit_inference"
OTLP_PROTOCOLS = ("http/protobuf", "grpc")
DEFAULT_QUEUE_SPANS = 2048
"""OTEL_BSP_MAX_QUEUE_SIZE's default, as the specification gives it."""
FLUSH_AT_EXIT_S = 5.0
"""The longest a stopping server waits for its last spans to leave."""
DEFAULT_BATCH = 512
"""OTEL_BSP_MAX_EXPORT_BATCH_SIZE's default (never more than the queue holds)."""
ERROR_TYPE = "error.type"


class TracingMisconfigured(ValueError):
    """The OTEL_* variables ask for something this service cannot do."""


def wanted(environ: Mapping[str, str]) -> bool:
    """Whether the standard variables ask for traces."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER")
    if exporters is not None:
        return any(name.strip().lower() not in ("", "none") for name in exporters.split(","))
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def _exporters(environ: Mapping[str, str]) -> list[SpanExporter]:
    names = [
        name.strip().lower()
        for name in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")
        if name.strip().lower() not in ("", "none")
    ]
    exporters: list[SpanExporter] = []
    for name in names:
        if name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name == "otlp":
            exporters.append(_otlp(environ))
        else:
            raise TracingMisconfigured(
                f"OTEL_TRACES_EXPORTER={name!r}: this service exports traces with otlp or console"
            )
    return exporters


def _otlp(environ: Mapping[str, str]) -> SpanExporter:
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter()
    raise TracingMisconfigured(
        f"OTLP protocol {protocol!r}: this service exports traces over "
        f"{' or '.join(OTLP_PROTOCOLS)}"
    )


def _resource(environ: Mapping[str, str]) -> Resource:
    """The SDK's resource from the variables, named vit-inference unless they name it."""
    named = environ.get("OTEL_SERVICE_NAME") or any(
        pair.split("=", 1)[0].strip() == SERVICE_NAME
        for pair in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",")
    )
    return Resource.create({} if named else {SERVICE_NAME: DEFAULT_SERVICE_NAME})


class _Counts:
    """What became of the sampled spans, across threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queued = self.taken = self.exported = self.failed = self.dropped = 0


class _CountedExporter(SpanExporter):
    """An exporter whose batches are counted as taken from the queue, then as exported or
    failed."""

    def __init__(self, exporter: SpanExporter, counts: _Counts) -> None:
        self._exporter = exporter
        self._counts = counts

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._counts.lock:
            self._counts.taken += len(spans)
        result = SpanExportResult.FAILURE
        try:
            result = self._exporter.export(spans)
        finally:
            with self._counts.lock:
                if result is SpanExportResult.SUCCESS:
                    self._counts.exported += len(spans)
                else:
                    self._counts.failed += len(spans)
        return result

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)


class _BoundedQueue(SpanProcessor):
    """In front of the batch processor: a span that would overflow its queue is dropped here,
    and counted, before the batch processor would drop one uncounted."""

    def __init__(self, processor: SpanProcessor, counts: _Counts, capacity: int) -> None:
        self._processor = processor
        self._counts = counts
        self._capacity = capacity

    def on_start(self, span: SdkSpan, parent_context: otel_context.Context | None = None) -> None:
        self._processor.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is None or not span.context.trace_flags.sampled:
            return
        counts = self._counts
        with counts.lock:
            if counts.queued - counts.taken >= self._capacity:
                counts.dropped += 1
                return
            counts.queued += 1
        self._processor.on_end(span)

    def shutdown(self) -> None:
        self._processor.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._processor.force_flush(timeout_millis)


class Tracing:
    """The process's tracer, its export pipeline, and the spans that pipeline counted."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._counts: list[_Counts] = []
        """One per exporter, each with its own queue."""
        self._provider = TracerProvider(resource=_resource(environ))  # sampler: OTEL_TRACES_*
        capacity = int(environ.get("OTEL_BSP_MAX_QUEUE_SIZE") or DEFAULT_QUEUE_SPANS)
        batch = min(capacity, int(environ.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") or DEFAULT_BATCH))
        for exporter in _exporters(environ):
            counts = _Counts()
            self._counts.append(counts)
            counted = _CountedExporter(exporter, counts)
            batches = BatchSpanProcessor(
                counted, max_queue_size=capacity, max_export_batch_size=batch
            )
            self._provider.add_span_processor(_BoundedQueue(batches, counts, capacity))
        self.tracer = self._provider.get_tracer(TRACER_NAME)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Tracing | None:
        """Tracing as the variables ask, or None when they do not."""
        environ = os.environ if environ is None else environ
        return cls(environ) if wanted(environ) else None

    def shutdown(self) -> None:
        """Export what is queued, for at most FLUSH_AT_EXIT_S (the SDK's own wait can reach 30 s
        against a dead collector, more than a pod's grace period), and stop."""
        stopping = threading.Thread(target=self._provider.shutdown, daemon=True)
        stopping.start()
        stopping.join(FLUSH_AT_EXIT_S)

    def record(
        self,
        name: str,
        parent: otel_context.Context | None,
        start_ns: int,
        end_ns: int,
        attributes: Mapping[str, Any],
        *,
        links: Sequence[Link] = (),
        error: str | None = None,
    ) -> trace.Span:
        """A span already over: from `start_ns` to `end_ns` (nanoseconds since the epoch),
        under `parent` (a trace of its own for None), failed with `error` (its type) if given."""
        span = self.tracer.start_span(
            name,
            context=parent if parent is not None else otel_context.Context(),
            start_time=start_ns,
            attributes=attributes,
            links=links,
        )
        if error is not None:
            span.set_attribute(ERROR_TYPE, error)
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=end_ns)
        return span

    def server_span(
        self, name: str, parent: otel_context.Context, attributes: Mapping[str, Any]
    ) -> trace.Span:
        return self.tracer.start_span(
            name, context=parent, kind=SpanKind.SERVER, attributes=attributes
        )

    def collect(self) -> Iterator[Metric]:
        """The export pipeline's own counts, for /metrics (a prometheus_client collector)."""
        dropped = failed = exported = queued = 0
        for counts in self._counts:
            with counts.lock:
                dropped += counts.dropped
                failed += counts.failed
                exported += counts.exported
                queued += counts.queued - counts.taken
        lost = CounterMetricFamily(
            "vit_trace_spans_dropped",
            "Spans lost before a collector took them, by why: queue_full (the export queue, "
            "OTEL_BSP_MAX_QUEUE_SIZE, was full: a slow or unreachable collector) or "
            "export_failed (the collector refused them, or could not be reached in time).",
            labels=["reason"],
        )
        lost.add_metric(["queue_full"], dropped)
        lost.add_metric(["export_failed"], failed)
        taken = CounterMetricFamily("vit_trace_spans_exported", "Spans a collector has taken.")
        taken.add_metric([], exported)
        waiting = GaugeMetricFamily("vit_trace_spans_queued", "Spans waiting to be exported.")
        waiting.add_metric([], queued)
        yield from (lost, taken, waiting)
