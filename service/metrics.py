"""Prometheus metrics on a registry owned by the app (so tests can build many apps), named and
labelled by Prometheus' conventions; what a model version does is labelled with its `model` and
`version`."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

# Sub-millisecond (one CPU inference of a small model) to seconds (a queue under overload).
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.004,
    0.006,
    0.008,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
"""Seconds of a model load: the bundled model loads in about a second, a ViT-B/16 in tens."""
PROBABILITY_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)


Exemplar = dict[str, str] | None
"""A trace an observation links to, in the OpenMetrics exposition (None: none)."""


def exemplar_of(context: trace.SpanContext) -> Exemplar:
    """A span's ids as an exemplar, where the span is sampled (an unsampled one is in no
    backend to jump to)."""
    if not context.is_valid or not context.trace_flags.sampled:
        return None
    return {
        "trace_id": trace.format_trace_id(context.trace_id),
        "span_id": trace.format_span_id(context.span_id),
    }


MODEL = ["model", "version"]
HTTP = ["method", "route", "code"]
GRPC = ["method", "code"]
"""The labels of an HTTP request: its method, the template of the route that took it (never the
raw path) and the status code of the answer."""


class Metrics:
    """Every metric the service exports: its own prefixed `vit_`, base units as suffixes, and the
    standard `process_*` and `python_*` families of the server process."""

    def __init__(self) -> None:
        # A `*_created` twin of every counter and histogram is one more series each, exported
        # as a gauge that nothing queries. The switch is prometheus_client's, for the whole
        # process, which exports no registry but this one.
        disable_created_metrics()
        self.traced = False
        """Whether requests are traced: then latencies carry their trace as an exemplar."""
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.requests = Counter(
            "vit_requests",
            "HTTP requests by method, route template and status code.",
            HTTP,
            registry=r,
        )
        self.request_seconds = Histogram(
            "vit_request_duration_seconds",
            "Total time to answer a request, by method, route template, status code and the "
            'model that served it ("" where none did).',
            [*HTTP, "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "vit_requests_in_flight", "Requests being answered right now.", registry=r
        )
        self.grpc_requests = Counter(
            "vit_grpc_requests", "gRPC calls by method and status code.", GRPC, registry=r
        )
        self.grpc_request_seconds = Histogram(
            "vit_grpc_request_duration_seconds",
            "Total time to answer a gRPC call, by method, status code and the model that "
            'served it ("" where none did).',
            [*GRPC, "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejections = Counter(
            "vit_rejections", "Requests refused, by error type.", ["reason"], registry=r
        )
        self.model_load_failures = Counter(
            "vit_model_load_failures",
            "Model versions that failed to load (checks, warm-up or memory budget), by model.",
            ["model"],
            registry=r,
        )
        self.model_loads = Counter(
            "vit_model_loads",
            "Model versions loaded into service (at start, on a scan, a load call or a first "
            "request), by model.",
            ["model"],
            registry=r,
        )
        self.model_load_seconds = Histogram(
            "vit_model_load_seconds",
            "Time from a version's load starting to its serving: checks, engine choice, "
            "warm-up and self-test.",
            ["model"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.model_unloads = Counter(
            "vit_model_unloads",
            "Model versions taken out of service, by model and why: evicted (least recently "
            "used, to make room under VIT_MODELS_MEMORY_BYTES), explicit (the unload call), "
            "replaced (a new file of the same version), removed (gone from the repository or "
            "the version policy).",
            ["model", "reason"],
            registry=r,
        )
        self.load_waits = Histogram(
            "vit_model_load_wait_seconds",
            "Requests that waited for their model to load (VIT_MODEL_CONTROL=on_demand), and "
            "how long, by model and outcome: loaded, failed or timed_out.",
            ["model", "outcome"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.models_memory_bytes = Gauge(
            "vit_models_memory_bytes",
            "Resident memory the served model versions took as they loaded, in all.",
            registry=r,
        )
        self.stage_seconds = Histogram(
            "vit_stage_duration_seconds",
            "Time per stage: read_body, decode_preprocess (per image), queue_wait, inference.",
            [*MODEL, "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "vit_batch_size_images",
            "Images per onnxruntime call.",
            MODEL,
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "vit_queue_depth_images",
            "Images queued or in inference (places held).",
            MODEL,
            registry=r,
        )
        self.images_in_flight = Gauge(
            "vit_images_in_flight",
            "Image places held by admitted requests (read, decoded, queued or in inference).",
            MODEL,
            registry=r,
        )
        self.body_bytes_in_flight = Gauge(
            "vit_body_in_flight_bytes",
            "Request body bytes held by admitted requests.",
            MODEL,
            registry=r,
        )
        self.memory_bytes = Gauge(
            "vit_model_memory_bytes",
            "Resident memory the model version took as it loaded.",
            MODEL,
            registry=r,
        )
        self.ready = Gauge(
            "vit_model_ready", "1 while the model version is ready.", MODEL, registry=r
        )
        self.images = Counter("vit_images_processed", "Images classified.", MODEL, registry=r)
        self.embeddings = Counter(
            "vit_embeddings_served",
            "Image embeddings answered (/v1/embed, or the OIP output `embedding` asked for).",
            MODEL,
            registry=r,
        )
        self.decode_workers_replaced = Counter(
            "vit_decode_workers_replaced",
            "Decoding workers killed and replaced, by why: memory or time (the image overran "
            "that limit: a 422 too_expensive_to_decode), crash (the decoder died), abandoned "
            "(the image's request failed, timed out or lost its client).",
            [*MODEL, "reason"],
            registry=r,
        )
        self.model = Info(
            "vit_model",
            "A served model version and where it runs: its sha256 and runtime options in "
            "effect (/v1/models says more).",
            MODEL,
            registry=r,
        )
        self.fallbacks = Gauge(
            "vit_model_fallbacks",
            "Runtime options asked for but not in effect (/v1/models lists them, and why).",
            MODEL,
            registry=r,
        )
        self.out_of_distribution = Counter(
            "vit_out_of_distribution_images",
            "Predictions flagged as unlike the model's training images (their score below the "
            "model's calibrated threshold).",
            MODEL,
            registry=r,
        )
        self.self_test_passed = Gauge(
            "vit_model_self_test_passed",
            "1 once the version's startup self-test passed, 0 if it failed (the version then "
            "never serves); absent for a model without one.",
            MODEL,
            registry=r,
        )
        self.top1_probability = Histogram(
            "vit_top1_probability_ratio",
            "Probability of the predicted class (confidence drift).",
            MODEL,
            buckets=PROBABILITY_BUCKETS,
            registry=r,
        )
        self.predicted_class = Counter(
            "vit_predicted_class",
            "Predictions by top-1 label (input drift).",
            [*MODEL, "label"],
            registry=r,
        )
        self.input_format = Counter(
            "vit_input_images", "Decoded uploads by file format.", [*MODEL, "format"], registry=r
        )
        self.exif_rotated = Counter(
            "vit_input_exif_rotated_images", "Uploads turned upright from EXIF.", MODEL, registry=r
        )
        self.mode_converted = Counter(
            "vit_input_mode_converted_images",
            "Uploads converted to RGB, by original mode.",
            [*MODEL, "mode"],
            registry=r,
        )

    def per_version(self) -> list[Any]:
        """The families whose series each belong to one model version."""
        return [
            self.stage_seconds,
            self.batch_size,
            self.queue_depth,
            self.images_in_flight,
            self.body_bytes_in_flight,
            self.memory_bytes,
            self.ready,
            self.images,
            self.embeddings,
            self.decode_workers_replaced,
            self.model,
            self.fallbacks,
            self.out_of_distribution,
            self.self_test_passed,
            self.top1_probability,
            self.predicted_class,
            self.input_format,
            self.exif_rotated,
            self.mode_converted,
        ]

    def exemplar(self) -> Exemplar:
        """The current request's trace, for an observation it makes, while tracing is on."""
        return exemplar_of(trace.get_current_span().get_span_context()) if self.traced else None

    def for_model(self, name: str, version: str) -> ModelMetrics:
        return ModelMetrics(self, name, version)


class _Labelled:
    """A metric family with its first labels given: `labels(*rest)` gives the child."""

    def __init__(self, family: Any, *given: str) -> None:
        self._family = family
        self._given = given

    def labels(self, *rest: str) -> Any:
        return self._family.labels(*self._given, *rest)


class ModelMetrics:
    """One model version's view of the metrics: every series it writes carries its labels."""

    def __init__(self, metrics: Metrics, name: str, version: str) -> None:
        self._metrics = metrics
        self._labels = (name, version)
        self.rejections = metrics.rejections  # by error type, for the whole server
        self.stage_seconds = _Labelled(metrics.stage_seconds, name, version)
        self.decode_workers_replaced = _Labelled(metrics.decode_workers_replaced, name, version)
        self.batch_size = metrics.batch_size.labels(name, version)
        self.queue_depth = metrics.queue_depth.labels(name, version)
        self.images_in_flight = metrics.images_in_flight.labels(name, version)
        self.body_bytes_in_flight = metrics.body_bytes_in_flight.labels(name, version)
        self.memory_bytes = metrics.memory_bytes.labels(name, version)
        self.ready = metrics.ready.labels(name, version)
        self.model = metrics.model.labels(name, version)
        self.fallbacks = metrics.fallbacks.labels(name, version)
        self._images = metrics.images.labels(name, version)
        self._embeddings = metrics.embeddings.labels(name, version)
        self._top1 = metrics.top1_probability.labels(name, version)
        self._predicted = _Labelled(metrics.predicted_class, name, version)
        self._format = _Labelled(metrics.input_format, name, version)
        self._rotated = metrics.exif_rotated.labels(name, version)
        self._out_of_distribution = metrics.out_of_distribution.labels(name, version)
        self._converted = _Labelled(metrics.mode_converted, name, version)

    def exemplar(self) -> Exemplar:
        return self._metrics.exemplar()

    def observe_decoded(self, image_format: str, original_mode: str, exif_rotated: bool) -> None:
        self._format.labels(image_format).inc()
        if exif_rotated:
            self._rotated.inc()
        if original_mode != "RGB":
            self._converted.labels(original_mode).inc()

    def observe_predictions(
        self, top1: list[float], labels: list[str], out_of_distribution: int = 0
    ) -> None:
        self._images.inc(len(top1))
        for probability, label in zip(top1, labels, strict=True):
            self._top1.observe(probability)
            self._predicted.labels(label).inc()
        if out_of_distribution:
            self._out_of_distribution.inc(out_of_distribution)

    def observe_embeddings(self, count: int) -> None:
        self._embeddings.inc(count)

    def publish_self_test(self, passed: bool | None) -> None:
        """1 or 0 once the self-test passed or failed; with None (the file has none), no
        series at all, not even one a reload of the same version left behind. The series is
        made only here: a labelled gauge starts at 0, which would read as a failure."""
        if passed is None:
            self._metrics.self_test_passed.remove(*self._labels)
        else:
            self._metrics.self_test_passed.labels(*self._labels).set(float(passed))

    def remove(self) -> None:
        """Drop every series of the version once it is retired. Kept, a server that swaps
        versions would export every version it ever served, its counters and histograms
        included, for as long as it runs; what they counted is in Prometheus already, up to
        the last scrape."""
        name, version = self._labels
        for family in self._metrics.per_version():
            family.remove_by_labels({"model": name, "version": version})
