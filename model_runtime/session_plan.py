"""What a model's onnxruntime sessions are built from, decided before any is built: the
providers, the threads of each call, how many calls run at once, bound buffers, CUDA graphs,
the arena and the lone-call session, each with the reason it was given up where it was.

The plan needs the graph's declarations and metadata, which the load-time check reports from
its own process (model_runtime/load_check.py), so each session is built once, as planned.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnxruntime as ort

from model_contract.metadata import ModelMetadata
from model_runtime.graph_check import GraphContract
from model_runtime.model_file import ONNX_FORMAT_ONLY
from model_runtime.options import CPU, CUDA, RuntimeOptions
from model_runtime.platform import usable_cpu_count
from model_runtime.providers import ProviderPlan


@dataclass(frozen=True)
class ModelFacts:
    """What a plan needs to know of the model: its file's size, its graph and its metadata."""

    model_bytes: int
    graph: GraphContract
    metadata: ModelMetadata


@dataclass(frozen=True)
class SessionPlan:
    providers: ProviderPlan
    provider: str
    """The provider the sessions are expected to run on: the first the plan asks for."""
    threads_per_call: int
    """onnxruntime's intra-op threads in the main session."""
    all_threads: int
    """The cores the process may use (or VIT_INTRA_OP_THREADS): the lone-call session's."""
    inter_op_threads: int
    spinning: bool
    """Whether the main session's threads busy-wait between operators."""
    cpu_memory_arena: bool
    arena_kept_for_one_image: bool
    """Calls of several images give back what the arena grew for them when they end."""
    inference_workers: int
    """onnxruntime calls that may run at once."""
    io_binding: bool
    """Calls go through bound buffers, one per batch-size bucket (also with CUDA graphs)."""
    cuda_graph: bool
    lone_call: bool
    """A second session, spinning on every core, for a lone image."""
    fallbacks: tuple[str, ...]
    """What was asked for and given up while planning, each with why."""

    def session_options(self) -> ort.SessionOptions:
        options = self._common()
        options.intra_op_num_threads = self.threads_per_call
        if not self.spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def lone_call_options(self) -> ort.SessionOptions:
        """The CPU session for lone calls, on all threads: they busy-wait between operators
        instead of sleeping (a lone image's call ~1 ms faster on 2 cores), and stop the moment
        the call returns, so they never take cycles from work that arrives afterwards."""
        options = self._common()
        options.intra_op_num_threads = self.all_threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.add_session_config_entry("session.force_spinning_stop", "1")
        return options

    def _common(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.add_session_config_entry(*ONNX_FORMAT_ONLY)
        options.inter_op_num_threads = self.inter_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_cpu_mem_arena = self.cpu_memory_arena
        return options


def plan_sessions(
    options: RuntimeOptions,
    providers: ProviderPlan,
    model: ModelFacts,
    *,
    provider: str | None = None,
) -> SessionPlan:
    """The plan for `model`, expecting to run on `provider` (the first of `providers` when
    None)."""
    provider = provider or providers.names[0]
    fallbacks: list[str] = []
    cuda_graph = providers.cuda_graph and provider == CUDA
    bound = options.io_binding or cuda_graph
    unbindable = _unbindable(model.graph, model.metadata)
    if unbindable and bound:
        fallbacks.append(f"io_binding and cuda_graph: off ({unbindable})")
        bound = cuda_graph = False
    if bound:
        # The bound buffers serve one call at a time.
        workers = 1
        if options.inference_workers > 1:
            why = "IO binding runs one call at a time"
            fallbacks.append(f"inference_workers {options.inference_workers}: 1 ({why})")
    else:
        workers = options.inference_workers or (2 if provider == CPU else 1)
    cores = options.intra_op_threads or usable_cpu_count()
    per_call = cores
    if provider == CPU and not options.intra_op_threads and workers > 1:
        # Calls at once share the cores: one call's threads each. With every call owning
        # all the cores, under load onnxruntime's threads crowded out the event loop and
        # refusals took 3x longer (503 p99 ~350-440 against ~110 ms at twice capacity).
        per_call = max(1, cores // workers)
    return SessionPlan(
        providers=providers,
        provider=provider,
        threads_per_call=per_call,
        all_threads=cores,
        inter_op_threads=options.inter_op_threads,
        spinning=options.intra_op_spinning,
        cpu_memory_arena=options.cpu_memory_arena != "off",
        arena_kept_for_one_image=options.arena_kept_for_one_image(model.model_bytes),
        inference_workers=workers,
        io_binding=bound,
        cuda_graph=cuda_graph,
        lone_call=options.lone_call_spinning and provider == CPU and not bound,
        fallbacks=tuple(fallbacks),
    )


def _unbindable(graph: GraphContract, metadata: ModelMetadata) -> str | None:
    """Why the bound buffers (float32, one per batch-size bucket) cannot serve this graph."""
    if graph.fixed_batch_size is not None:
        return f"the graph fixes the batch at {graph.fixed_batch_size}"
    if metadata.images_per_call is not None:
        return f"{metadata.precision} runs {metadata.images_per_call} image per call"
    if graph.output_type != "tensor(float)":
        return f"the graph's output is {graph.output_type}"
    if graph.attention_output is not None and graph.attention_grid is None:
        return "the graph does not fix its attention grid's shape"
    return None
