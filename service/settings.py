"""Every knob of the service, read once from `VIT_*` environment variables or passed in."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model_contract.decode import DEFAULT_MAX_PIXELS
from model_runtime.options import RuntimeOptions

ENV_PREFIX = "VIT_"


class _RuntimeFromEnvironment(BaseSettings, RuntimeOptions):
    """The runtime options as `VIT_*` variables name them (`VIT_MAX_BATCH_SIZE`, ...): only to
    read them; what `Settings` holds is a plain `RuntimeOptions`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True)


class Settings(BaseSettings):
    """Service configuration; `VIT_MODEL=...` sets `model`, and so on. How a model runs
    (providers, threads, batch size, IO binding, ...) is `runtime`, read from variables named
    the same way (`VIT_MAX_BATCH_SIZE`) and given to sessions whole, with none of the server's
    tokens or addresses."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, use_attribute_docstrings=True
    )

    runtime: RuntimeOptions = Field(default_factory=RuntimeOptions)
    """How a model runs: model_runtime/options.py."""

    def __init__(self, **given: Any) -> None:
        """`runtime` read from the `VIT_*` variables, under any options passed by their own
        names (`Settings(max_batch_size=8)`, as the variables name them) or whole (`runtime=`)."""
        named = {key: given.pop(key) for key in list(given) if key in RuntimeOptions.model_fields}
        whole = given.pop("runtime", None)
        if isinstance(whole, RuntimeOptions):
            whole = whole.model_dump(exclude_unset=True)
        read = _RuntimeFromEnvironment(**{**(whole or {}), **named})
        super().__init__(runtime=RuntimeOptions(**read.model_dump()), **given)

    model: Path = Path("models/shapes-vit.onnx")
    """The self-describing ONNX file (from vit-export or vit-import) or model repository to
    serve. A repository is a directory laid out as `<name>/<version>/model.onnx`
    (docs/REPOSITORY.md)."""

    model_control: Literal["none", "poll", "explicit", "on_demand"] = "none"
    """What may change the models served after start: none, poll, explicit or on_demand. none:
    load every model at start, change nothing afterwards; poll: also load new and changed
    versions and unload removed ones every repository_poll_s; explicit: change only on POST
    /v2/repository/models/{name}/load or unload (every model is loaded at start); on_demand:
    load only pinned_models at start, any other model on its first request, unloading the
    least recently used versions no request is using where models_memory_bytes would be
    exceeded, and scan as poll does (docs/REPOSITORY.md)."""

    pinned_models: Annotated[tuple[str, ...], NoDecode] = ()
    """Models on_demand mode loads at start and never unloads to make room: names, separated
    by commas."""

    @field_validator("pinned_models", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(name.strip() for name in value.split(",") if name.strip())
        return value

    repository_poll_s: float = Field(5.0, gt=0)
    """How often poll mode scans the repository."""

    version_policy: str = "latest:1"
    """Which versions of each model to serve, as Triton's: latest, latest:N, all, specific:1,3."""

    default_model: str | None = None
    """The model /v1/classify serves; unset, the only one (with several, name it in the URL)."""

    admin_token: SecretStr | None = None
    """Bearer token for the repository API (index, load, unload). Unset, that API is refused:
    it changes what the server runs."""

    api_token: SecretStr | None = None
    """Bearer token for the inference routes, if set. Health, readiness, /metrics and the
    models' descriptions (/v1/models, /v2/models/{name}) stay open for probes, scrapers and
    the web page."""

    @field_validator("admin_token", "api_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """An empty token (`VIT_ADMIN_TOKEN=`) is none: never a token an empty bearer meets."""
        return None if value == "" else value

    models_memory_bytes: int = Field(0, ge=0)
    """The most resident memory the loaded model versions may take together (0: no bound). A
    load that would exceed it is refused with the reason (in on_demand mode, least recently used
    versions are unloaded first). Each version's memory is measured as it loads (and estimated
    at three times its file's size before)."""

    host: str = "127.0.0.1"
    """Interface uvicorn binds; 0.0.0.0 inside a container."""

    port: int = Field(8000, ge=1, le=65535)
    """TCP port uvicorn listens on."""

    grpc_port: int = Field(8001, ge=0, le=65535)
    """TCP port of the Open Inference Protocol over gRPC, on the same host as HTTP (0: off)."""

    grpc_max_message_bytes: int = Field(4 * 1024 * 1024, ge=1)
    """Largest gRPC request message accepted (gRPC's own default, 4 MiB); larger ones are
    refused with RESOURCE_EXHAUSTED before they are held. gRPC receives a message whole before
    it is parsed, so this and VIT_GRPC_MAX_INFER_CALLS bound what messages can hold."""

    grpc_max_streams_per_connection: int = Field(100, ge=1)
    """Calls one gRPC connection may have open at once (HTTP/2 streams, health Watch streams
    included); a client over it waits for one to end."""

    grpc_max_infer_calls: int = Field(16, ge=1)
    """ModelInfer calls over gRPC at once, from their start until answered (their messages
    being received included); more are refused with UNAVAILABLE and a retry-after. Health and
    metadata calls are never counted. The default keeps what messages can hold, 16 x
    VIT_GRPC_MAX_MESSAGE_BYTES, within VIT_MAX_BODY_BYTES_IN_FLIGHT as HTTP's bodies are."""

    inference_nice: int = Field(5, ge=0, le=19)
    """Niceness added to the inference threads (Linux): the event loop and the decoders run
    first. The threads also run as batch work that never preempts a running thread
    (model_runtime/scheduling.py). With the cores saturated, onnxruntime takes what the event
    loop (health, refusals, responses) and the decoders leave: at twice capacity on 2 cores
    the 503s' p99 was 69-93 ms against 116-312 ms at 0, with the same goodput; at 16 clients
    throughput was the same or 1-4% higher."""

    decode_workers: int = Field(2, ge=1)
    """Processes decoding and preprocessing uploads, each one image at a time. Each holds
    ~40 MB at rest, ~47 MB between 1080p photos and ~87 MB after a 12-megapixel one until it
    has been idle for a second (freed memory is kept for the next image, within the limit),
    plus up to `decode_memory_bytes` while it decodes."""

    decode_memory_bytes: int = Field(192 * 1024 * 1024, ge=16 * 1024 * 1024)
    """Memory one image's decoding may take beyond what its worker holds at rest. Enforced on
    Linux (RLIMIT_AS); macOS has no equivalent. Over it the image is a 422
    `too_expensive_to_decode` and the worker is replaced. A 40 MP
    RGB PNG needs ~130 MB; a 40 MP 16-bit or RGBA one more. The Deployment's memory limit
    follows from it (docs/RELIABILITY.md, "Memory budget")."""

    decode_timeout_s: float = Field(2.0, gt=0)
    """Wall-clock time one image's decoding may take. Over it the worker is killed and
    replaced and the image is a 422 `too_expensive_to_decode`. A 40 MP PNG takes ~0.5 s on
    one core."""

    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1)
    """Largest request body accepted, enforced while it streams (chunked bodies too): 413 above."""

    max_body_bytes_in_flight: int = Field(64 * 1024 * 1024, ge=1)
    """Budget for the request bodies held at once: over it, 503 with Retry-After. Bodies are
    counted while they stream in (multipart bodies twice: the body and the files parsed from
    it; OIP JSON bodies five times: the Python objects parsing makes) and held until each
    request has left; a request that would go over it is refused before more is read."""

    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    """Largest image (width x height) decoded, checked from the header first: 422 above."""

    max_images_per_request: int = Field(64, ge=1)
    """Most images one /v1/classify or OIP request may carry: 413 above."""

    default_top_k: int = Field(5, ge=1)
    """Classes listed in `top` when the request does not say."""

    max_batch_delay_ms: float = Field(0.0, ge=0)
    """How long a batch waits for more requests before running; 0 takes what is queued. While
    one batch runs the next one fills up anyway, so waiting only adds latency on CPU."""

    max_queue: int = Field(256, ge=1)
    """Images admitted before new requests get 503 with Retry-After. Every image of every
    admitted request counts, from admission (one place while its body is read) until its
    answer has gone, whether it is being read, decoded, queued or in inference. About one
    second of work for the default model on 2 cores (~250 images/s)."""

    request_timeout_ms: float = Field(10_000, gt=0)
    """Deadline for a request's queue wait; requests still queued then get 504 and never reach
    the model. The `X-Request-Timeout-Ms` header can lower it per request."""

    unready_after_failures: int = Field(5, ge=1)
    """Failed onnxruntime calls in a row (raised, or returned NaN/Inf) that turn readiness
    false. The orchestrator then routes around this replica; a probe inference every
    recovery_probe_interval_s brings it back when inference works again."""

    recovery_probe_interval_s: float = Field(1.0, gt=0)
    """How often a replica that stopped being ready over failures tries inference again."""

    head_timeout_s: float = Field(10.0, gt=0)
    """How soon a connection must deliver a whole request head, after opening or after its
    previous response, or be closed. Idle and header-trickling clients cannot pile up."""

    max_head_bytes: int = Field(32 * 1024, ge=1024)
    """The largest request head (request line and headers); a larger one is a 400. So bounded,
    one connection cannot fill memory with headers."""

    max_pipelined_requests: int = Field(64, ge=1)
    """Requests one connection may have waiting behind the one being answered; more is a 400.
    httptools queues every head it parses."""

    body_timeout_s: float = Field(30.0, gt=0)
    """A request body must have arrived this soon after its head, or the answer is 408. A
    20 MiB upload needs 5.6 Mbit/s."""

    graceful_shutdown_s: int = Field(20, ge=1)
    """On SIGTERM the server stops accepting connections and lets in-flight requests finish for
    at most this long. Keep it below the orchestrator's grace period minus any preStop delay
    (Kubernetes: 30 s by default; the shipped Deployment waits 5 s in preStop)."""

    http_parser: Literal["httptools", "h11"] = "httptools"
    """uvicorn's HTTP/1.1 parser: httptools (C) or h11 (pure Python). Both keep the head and
    body deadlines. httptools is the default: measured A/B in docs/BENCHMARKS-analysis.md."""

    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    """The event loop: uvloop (libuv) or the standard library's asyncio."""

    log_format: Literal["text", "json"] = "text"
    """How log lines are written: text, or json (one object a line: time, level, logger,
    message, and the trace and span of the request a line belongs to when traces are on)."""

    access_log: bool = False
    """Log a line per request. Off by default: /metrics already counts and times every request
    by route and status, and at ~500 requests/s the log lines cost about a tenth of the event
    loop's time (profiled at twice capacity on 2 cores). Turn on to debug a client."""
