"""Which onnxruntime execution providers to ask for, with which options, and every fallback said.

Asking is not getting: onnxruntime-gpu lists CUDA and TensorRT as available on any machine and
only finds out while creating the session that their libraries are missing, then quietly runs on
the CPU. So the plan is checked against the session's real providers afterwards
(`ProviderPlan.fallbacks`), and each difference is logged and reported in `model_info`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from model_runtime.options import CPU, CUDA, TENSORRT, RuntimeOptions

ProviderEntry = tuple[str, dict[str, str]]
CUDA_GRAPH_NEEDS_CUDA = "cuda_graph needs the CUDA provider in use: off"
NO_NVIDIA_DRIVER = "not tried: no NVIDIA driver on this machine"


def nvidia_driver_present() -> bool:
    """Whether a GPU can be here at all: the NVIDIA kernel driver is loaded (on the host, or
    passed into the container by the NVIDIA Container Toolkit). Without it, asking onnxruntime
    for CUDA only prints a red library-loading error before it falls back to the CPU."""
    return Path("/proc/driver/nvidia/version").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


@dataclass(frozen=True)
class ProviderPlan:
    """The providers to request, in order, with options; and what was given up before asking."""

    entries: tuple[ProviderEntry, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.entries)

    @property
    def cuda_graph(self) -> bool:
        return any(options.get("enable_cuda_graph") == "1" for _, options in self.entries)

    def without_cuda_graph(self, note: str) -> ProviderPlan:
        """The same plan with CUDA graph capture off (for models it cannot capture)."""
        entries = tuple(
            (name, {**options, "enable_cuda_graph": "0"} if name == CUDA else options)
            for name, options in self.entries
        )
        return ProviderPlan(entries, (*self.notes, note))

    def fallbacks(self, in_use: tuple[str, ...]) -> tuple[str, ...]:
        """Everything asked for but not in use, after the session was made."""
        lost = [
            f"{name} was requested but is not in use (its libraries did not load)"
            for name in self.names
            if name not in in_use
        ]
        if self.cuda_graph and in_use[0] != CUDA:
            lost.append(CUDA_GRAPH_NEEDS_CUDA)
        return (*self.notes, *lost)


def cuda_options(runtime: RuntimeOptions) -> dict[str, str]:
    options = {
        "cudnn_conv_algo_search": runtime.cudnn_conv_algo_search,
        "arena_extend_strategy": runtime.arena_extend_strategy,
        "enable_cuda_graph": "1" if runtime.cuda_graph else "0",
    }
    if runtime.gpu_mem_limit_bytes:
        options["gpu_mem_limit"] = str(runtime.gpu_mem_limit_bytes)
    return options


def tensorrt_options(options: RuntimeOptions) -> dict[str, str]:
    return {
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": str(options.tensorrt_cache_dir),
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": str(options.tensorrt_cache_dir),
        "trt_fp16_enable": "1" if options.tensorrt_fp16 else "0",
    }


def plan_providers(
    options: RuntimeOptions,
    available: set[str],
    *,
    gpu_present: bool = True,
) -> ProviderPlan:
    """Providers in order of preference, skipping the unavailable ones (and the GPU ones where
    no GPU can be) and saying so."""
    notes: list[str] = []
    order = list(options.providers)
    if options.tensorrt and TENSORRT not in order:
        order.insert(0, TENSORRT)
    entries: list[ProviderEntry] = []
    for name in order:
        if name in (TENSORRT, CUDA) and name in available and not gpu_present:
            notes.append(f"{name} {NO_NVIDIA_DRIVER}")
            continue
        if name not in available:
            if name != CPU:
                notes.append(f"{name} is not available in this onnxruntime build")
            continue
        if name == TENSORRT:
            entries.append((name, tensorrt_options(options)))
        elif name == CUDA:
            entries.append((name, cuda_options(options)))
        else:
            entries.append((name, {}))
    if CPU not in [name for name, _ in entries]:
        entries.append((CPU, {}))
    if options.cuda_graph and CUDA not in [name for name, _ in entries]:
        notes.append(CUDA_GRAPH_NEEDS_CUDA)
    return ProviderPlan(tuple(entries), tuple(notes))
