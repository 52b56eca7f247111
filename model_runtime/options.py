"""How a model runs: the onnxruntime options, defined once. `Settings` takes them from `VIT_*`
variables; the session, the export and evaluation tools and the benchmarks take them whole."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


ARENA_MAX_MODEL_BYTES = 128 * 1024 * 1024
"""The largest model file whose sessions keep all of onnxruntime's CPU arena by default. Above
it a batch's activations take hundreds of MB per call in flight, and allocating them afresh
costs nothing measurable next to a call that long; so a call of several images gives back
what the arena grew for it when it ends, and only one image's activations stay between calls.
A ViT-B/16's lone image took 283 ms inside the service with its arena kept and 355-381 ms
allocating afresh (12 requests each, one client), against 60 MB kept per session."""


class RuntimeOptions(BaseModel):
    """The session's options; each GPU-side one falls back cleanly, and says so, where it
    cannot apply (model_runtime/providers.py)."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    def arena_kept_for_one_image(self, model_bytes: int) -> bool:
        """Whether a call of several images gives back what the arena grew for it when it ends
        (ARENA_MAX_MODEL_BYTES)."""
        return self.cpu_memory_arena == "auto" and model_bytes > ARENA_MAX_MODEL_BYTES

    engine: Literal["auto", "onnxruntime", "openvino"] = "auto"
    """What runs the model. auto: where OpenVINO is installed and the model runs on the CPU,
    the model's warm-up is timed on both onnxruntime and OpenVINO and the faster one whose
    self-test passes serves it; both times are logged and `/v1/models` shows them. An FP32 file
    runs at FP32 on either; a bf16 file (`vit-export --bf16`) runs at bf16 on OpenVINO where
    the CPU computes bf16, at FP32 elsewhere. int8 and fp16 files run on onnxruntime, whose
    operators they were checked with."""

    providers: tuple[str, ...] = (CUDA, CPU)
    """onnxruntime execution providers in order of preference; unavailable ones are skipped."""

    require_cuda: bool = False
    """Refuse to start unless the session really runs on CUDA (for GPU deployments)."""

    intra_op_threads: int = Field(0, ge=0)
    """onnxruntime threads inside one operator; 0 means one per core available to the process."""

    inter_op_threads: int = Field(1, ge=1)
    """onnxruntime threads across independent operators; a ViT is a chain, so 1."""

    intra_op_spinning: bool = False
    """Let onnxruntime's threads busy-wait for the next operator instead of sleeping. Off, the
    decode threads get those cycles: spinning on every call cost 5% of the images/s at 16
    clients on 2 cores (docs/BENCHMARKS-analysis.md). `lone_call_spinning` keeps the gain for a
    lone request."""

    lone_call_spinning: bool = True
    """On the CPU provider, run a lone image through a second session that busy-waits while it
    runs. Lone: no other call running, nothing queued or being decoded; the session's threads
    stop as it returns: ~1 ms off that call on 2 cores (batch 1: 3.0-4.0 ms against
    4.0-4.5 ms), with none of the spinning's cost under load. Costs a second copy of the
    session: +24 MB resident with the default model (165 -> 189 MB)."""

    cpu_memory_arena: Literal["auto", "on", "off"] = "auto"
    """onnxruntime's CPU memory arena, which keeps each call's largest activations for the next.
    auto: on; for model files over ARENA_MAX_MODEL_BYTES a call of several images gives back
    what it grew when it ends, so only one image's activations stay. A ViT-B/16 (346 MB) held
    2.9 GB after load at 16 clients keeping every batch's and 1.9 GB without the arena. Its int8
    file (88 MB, kept whole) held 1.6 GB against 0.73 GB, but served 11% fewer images/s at 16
    clients without; the ViT-Ti (23 MB) held about the same either way and served 10% fewer
    without."""

    max_batch_size: int = Field(16, ge=1)
    """Most images in one onnxruntime call; a request with more runs as several calls. On 2
    CPU cores the in-process pipeline with the default model gains under 10% from batch 8 to 32
    (docs/BENCHMARKS.md), and a larger batch only adds latency for the requests that fill it."""

    inference_workers: int = Field(0, ge=0)
    """onnxruntime calls running at once, each on its own batch. 0 chooses: 2 on the CPU
    provider, each with its share of the cores (one thread each on 2 cores), since one call's
    intra-op parallelism leaves cores idle between the model's many small operators: in-process
    two calls of one thread did 339-357 images/s against 290-328 for one call of two threads
    (batches of 4-16). 1 on a GPU, and always 1 with IO binding, whose buffers one call at a
    time may use. A lone image still gets every core (see `lone_call_spinning`)."""

    io_binding: bool = False
    """Run inference through onnxruntime IO binding, with buffers preallocated per batch size.
    The sizes are buckets, powers of two up to max_batch_size. Saves per-call device
    allocations and copies on a GPU; on the CPU provider it computes exactly the same numbers
    and saves little."""

    cuda_graph: bool = False
    """Capture one CUDA graph per batch bucket and replay it (implies IO binding). Falls back,
    logged and reported in model_info, when the provider is not CUDA or the model cannot be
    captured."""

    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = "HEURISTIC"
    """cuDNN's convolution algorithm search. The ViT's only convolution is the patch embedding,
    and EXHAUSTIVE re-benchmarks for every new batch shape, a latency spike per bucket."""

    gpu_mem_limit_bytes: int = Field(0, ge=0)
    """Cap on the CUDA provider's memory arena; 0 leaves onnxruntime's default (no cap)."""

    arena_extend_strategy: Literal["kNextPowerOfTwo", "kSameAsRequested"] = "kNextPowerOfTwo"
    """How the CUDA arena grows; kSameAsRequested keeps memory tight with IO binding's few
    fixed buffers."""

    tensorrt: bool = False
    """Put onnxruntime's TensorRT provider first (CUDA, then CPU, behind it). Skipped, and
    reported, where this onnxruntime build or machine lacks TensorRT."""

    tensorrt_cache_dir: Path = Path("/tmp/vit-tensorrt-cache")
    """Where TensorRT keeps built engines and timing caches, so a restart does not rebuild them."""

    tensorrt_fp16: bool = False
    """Let TensorRT run layers in half precision."""

    model_check_timeout_s: float = Field(10.0, gt=0)
    """The longest a model file's load-time checks may take, plus `model_check_seconds_per_gb`
    for each GB of the file. The checks (a fresh session and one call each with a batch of 1
    and of 2) run in a process of their own; a file that overruns is refused and its process
    killed, so a graph that never finishes cannot hold a load. The warm-up and self-test that
    follow in the server are bounded by the same time."""

    model_check_seconds_per_gb: float = Field(60.0, ge=0)
    """What the load-time checks' bound grows by per GB of model file. Creating a session and
    running a ViT-B/16 (346 MB) once takes a few seconds on two cores."""

    max_metadata_bytes: int = Field(8 * 1024 * 1024, ge=64 * 1024)
    """The most bytes a model file's metadata may hold, every key and value together. A file
    with more is refused before it is parsed. A ViT-B/16 with 1,000 labels, its calibration
    and its golden images holds well under 1 MB."""


IN_PROCESS = RuntimeOptions(engine="onnxruntime", providers=(CPU,), lone_call_spinning=False)
"""For tools that run a model once in-process (export checks, evaluation, tests of numbers):
onnxruntime on the CPU, whose numbers are the reference, and a single session."""
