"""Every knob of the service, read once from `VIT_*` environment variables or passed in."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.decode import DEFAULT_MAX_PIXELS
from service.session import CPU, CUDA


class Settings(BaseSettings):
    """Service configuration; `VIT_MODEL=...` sets `model`, and so on."""

    model_config = SettingsConfigDict(env_prefix="VIT_", frozen=True)

    model: Path = Path("models/shapes-vit.onnx")
    """The self-describing ONNX file to serve (written by vit-export)."""

    host: str = "127.0.0.1"
    """Interface uvicorn binds; 0.0.0.0 inside a container."""

    port: int = Field(8000, ge=1, le=65535)
    """TCP port uvicorn listens on."""

    providers: tuple[str, ...] = (CUDA, CPU)
    """onnxruntime execution providers in order of preference; unavailable ones are skipped."""

    require_cuda: bool = False
    """Refuse to start unless the session really runs on CUDA (for GPU deployments)."""

    intra_op_threads: int = Field(0, ge=0)
    """onnxruntime threads inside one operator; 0 means one per core available to the process."""

    inter_op_threads: int = Field(1, ge=1)
    """onnxruntime threads across independent operators; a ViT is a chain, so 1."""

    decode_threads: int = Field(2, ge=1)
    """Threads decoding and preprocessing uploads (Pillow releases the GIL while decoding)."""

    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1)
    """Largest request body accepted, enforced while it streams (chunked bodies too): 413 above."""

    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    """Largest image (width x height) decoded, checked from the header first: 422 above."""

    max_images_per_request: int = Field(64, ge=1)
    """Most images one /v1/classify or OIP request may carry: 400 above."""

    default_top_k: int = Field(5, ge=1)
    """Classes listed in `top` when the request does not say."""

    max_batch_size: int = Field(16, ge=1)
    """Most images in one onnxruntime call. On 2 CPU cores the in-process pipeline with the
    default model peaked at batch 16 for 640x480 JPEGs (docs/BENCHMARKS.md), and a larger batch
    only adds latency for the requests that fill it."""

    max_batch_delay_ms: float = Field(0.0, ge=0)
    """How long a batch waits for more requests before running; 0 takes what is queued. While
    one batch runs the next one fills up anyway, so waiting only adds latency on CPU."""

    max_queue: int = Field(256, ge=1)
    """Images accepted (queued or in inference) before new requests get 503 with Retry-After:
    about one second of work for the default model on 2 cores (~250 images/s)."""

    request_timeout_ms: float = Field(10_000, gt=0)
    """Deadline for a request's queue wait; requests still queued then get 504 and never reach
    the model. The `X-Request-Timeout-Ms` header can lower it per request."""

    graceful_shutdown_s: int = Field(20, ge=1)
    """On SIGTERM the server stops accepting connections and lets in-flight requests finish for
    at most this long. Keep it below the orchestrator's grace period minus any preStop delay
    (Kubernetes: 30 s by default; the shipped Deployment waits 5 s in preStop)."""
