"""Prometheus metrics on a registry owned by the app (so tests can build many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

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
PROBABILITY_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)


class Metrics:
    """Every metric the service exports, names prefixed `vit_`, units in the names."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "vit_requests",
            "HTTP requests by route template and status.",
            ["route", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "vit_request_duration_seconds",
            "Total time to answer a request.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "vit_stage_duration_seconds",
            "Time per stage: read_body, decode_preprocess (per image), queue_wait, inference.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "vit_batch_size_images",
            "Images per onnxruntime call.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "vit_queue_depth_images", "Images queued or in inference (places held).", registry=r
        )
        self.images_in_flight = Gauge(
            "vit_images_in_flight",
            "Image places held by admitted requests (read, decoded, queued or in inference).",
            registry=r,
        )
        self.body_bytes_in_flight = Gauge(
            "vit_body_bytes_in_flight", "Request body bytes held by admitted requests.", registry=r
        )
        self.in_flight = Gauge(
            "vit_requests_in_flight", "Requests being answered right now.", registry=r
        )
        self.images = Counter("vit_images_processed", "Images classified.", registry=r)
        self.rejections = Counter(
            "vit_rejections", "Requests refused, by error type.", ["reason"], registry=r
        )
        self.decode_workers_replaced = Counter(
            "vit_decode_workers_replaced",
            "Decoding workers killed and replaced, by why: memory or time (the image overran "
            "that limit: a 422 too_expensive_to_decode), crash (the decoder died), abandoned "
            "(the image's request failed, timed out or lost its client).",
            ["reason"],
            registry=r,
        )
        self.model = Info("vit_model", "The served model and where it runs.", registry=r)
        self.model_load_failures = Counter(
            "vit_model_load_failures",
            "Model versions that failed to load (checks, warm-up or memory budget), by model.",
            ["model"],
            registry=r,
        )
        self.top1_probability = Histogram(
            "vit_top1_probability",
            "Probability of the predicted class (confidence drift).",
            buckets=PROBABILITY_BUCKETS,
            registry=r,
        )
        self.predicted_class = Counter(
            "vit_predicted_class",
            "Predictions by top-1 label (input drift).",
            ["label"],
            registry=r,
        )
        self.input_format = Counter(
            "vit_input_images", "Decoded uploads by file format.", ["format"], registry=r
        )
        self.exif_rotated = Counter(
            "vit_input_exif_rotated_images", "Uploads turned upright from EXIF.", registry=r
        )
        self.mode_converted = Counter(
            "vit_input_mode_converted_images",
            "Uploads converted to RGB, by original mode.",
            ["mode"],
            registry=r,
        )

    def observe_decoded(self, image_format: str, original_mode: str, exif_rotated: bool) -> None:
        self.input_format.labels(image_format).inc()
        if exif_rotated:
            self.exif_rotated.inc()
        if original_mode != "RGB":
            self.mode_converted.labels(original_mode).inc()

    def observe_predictions(self, top1: list[float], labels: list[str]) -> None:
        self.images.inc(len(top1))
        for probability, label in zip(top1, labels, strict=True):
            self.top1_probability.observe(probability)
            self.predicted_class.labels(label).inc()
