"""The onnxruntime session behind one narrow call: infer(batch) -> named outputs (the
probabilities, and the attention rollout where the model has one)."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from model_contract.metadata import ModelMetadata
from model_contract.ood import ood_scores
from model_runtime.graph_check import check_graph
from model_runtime.io_binding import BucketedIoBinding
from model_runtime.load_check import LoadCheckFailed, check_in_a_process, time_bound
from model_runtime.model_file import ONNX_FORMAT_ONLY, read_model_file
from model_runtime.options import CPU, CUDA, TENSORRT, RuntimeOptions
from model_runtime.platform import usable_cpu_count
from model_runtime.providers import (
    NO_NVIDIA_DRIVER,
    ProviderPlan,
    nvidia_driver_present,
    plan_providers,
)
from model_runtime.watchdog import watchdog

logger = logging.getLogger(__name__)

DEFAULT_OPTIONS = RuntimeOptions()

PROBABILITIES = "probabilities"
ATTENTION_ROLLOUT = "attention_rollout"
OOD_SCORE = "ood_score"
Outputs = dict[str, np.ndarray]
"""A batch's outputs by name, each with one row per image: `PROBABILITIES` always,
`ATTENTION_ROLLOUT` where the model carries one, `OOD_SCORE` where it is calibrated. A new
output is a new key, not a new path."""


def per_image(outputs: Outputs) -> list[Outputs]:
    """A batch's outputs as one mapping per image, each output keeping its leading axis."""
    count = len(outputs[PROBABILITIES])
    return [{name: values[i : i + 1] for name, values in outputs.items()} for i in range(count)]


CUDA_GRAPH_WARM_UP_RUNS = 3


class OutputRowsMismatch(RuntimeError):
    """A call's output did not have one row per image: the graph ignores the batch for some
    inputs, and no row can be given to any image of that call."""


class CudaUnavailable(RuntimeError):
    """CUDA was required but onnxruntime could not use it."""


def default_thread_count() -> int:
    """All cores this process may use: one session on one replica should own the machine."""
    return usable_cpu_count()


def load_pip_cuda_libraries() -> None:
    """Load CUDA and cuDNN from the nvidia-* wheels (the GPU image's `onnxruntime-gpu[cuda,cudnn]`).

    The dynamic loader does not search site-packages, so without this the CUDA provider would
    fail to load there and the session would quietly run on the CPU.
    """
    if importlib.util.find_spec("nvidia") is not None:
        ort.preload_dlls()


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 for accuracy, returned as float32."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)


class ModelSession:
    """A loaded self-describing model: its metadata, its providers, and inference."""

    def __init__(
        self,
        path: Path,
        options: RuntimeOptions = DEFAULT_OPTIONS,
        *,
        max_memory_bytes: int | None = None,
    ) -> None:
        """The model at `path`, checked before it is loaded here: one self-contained file, its
        first session and inferences bounded in time (and, with `max_memory_bytes`, in memory)
        in a process of their own, each output one row per image."""
        self.path = path
        model_bytes = read_model_file(path, max_metadata_bytes=options.max_metadata_bytes).data
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        self.load_check = check_in_a_process(model_bytes, options)
        """What the file's first session and inferences showed in a process of their own."""
        peak = self.load_check.peak_bytes
        if max_memory_bytes is not None and peak > max_memory_bytes:
            raise LoadCheckFailed(
                f"its first session and inferences took {peak >> 20} MB, over the "
                f"{max_memory_bytes >> 20} MB the memory budget (VIT_MODELS_MEMORY_BYTES) leaves"
            )
        self.check_seconds = time_bound(options, len(model_bytes))
        """How long a load-time inference of this model may take."""
        session_options = ort.SessionOptions()
        session_options.add_session_config_entry(*ONNX_FORMAT_ONLY)
        session_options.intra_op_num_threads = options.intra_op_threads or default_thread_count()
        session_options.inter_op_num_threads = options.inter_op_threads
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session_options.enable_cpu_mem_arena = options.cpu_arena_for(len(model_bytes))
        if not options.intra_op_spinning:
            session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        plan = plan_providers(
            options, set(ort.get_available_providers()), gpu_present=nvidia_driver_present()
        )
        if CUDA in plan.names:
            load_pip_cuda_libraries()
        self._session, plan = _create_session(model_bytes, session_options, plan)
        self.metadata = ModelMetadata.from_props(self._session.get_modelmeta().custom_metadata_map)
        self.graph = check_graph(self._session, self.metadata, path)
        self.fixed_batch_size = self.graph.fixed_batch_size
        self.images_per_call = self.metadata.images_per_call
        self.providers: tuple[str, ...] = tuple(self._session.get_providers())
        self.provider = self.providers[0]
        if options.require_cuda and self.provider not in (CUDA, TENSORRT):
            raise CudaUnavailable(f"CUDA was required but the session runs on {self.provider}")
        cuda_graph = plan.cuda_graph and self.provider == CUDA
        self.fallbacks = plan.fallbacks(self.providers)
        for fallback in self.fallbacks:
            # A CPU-only machine serving from the CPU is expected, not a warning.
            level = logging.INFO if fallback.endswith(NO_NVIDIA_DRIVER) else logging.WARNING
            logger.log(level, "serving on %s: %s", self.provider, fallback)
        unbindable = self._unbindable()
        if unbindable and (options.io_binding or cuda_graph):
            fallback = f"io_binding and cuda_graph: off ({unbindable})"
            self.fallbacks = (*self.fallbacks, fallback)
            logger.warning("fallback: %s", fallback)
            options = options.model_copy(update={"io_binding": False})
            cuda_graph = False
        one_call_at_a_time = options.io_binding or cuda_graph
        self.inference_workers = self._workers(options.inference_workers, one_call_at_a_time)
        cores = options.intra_op_threads or default_thread_count()
        if self.provider == CPU and not options.intra_op_threads and self.inference_workers > 1:
            # Calls at once share the cores: one call's threads each. With every call owning
            # all the cores, under load onnxruntime's threads crowded out the event loop and
            # refusals took 3x longer (503 p99 ~350-440 against ~110 ms at twice capacity).
            session_options.intra_op_num_threads = max(1, cores // self.inference_workers)
            self._session = ort.InferenceSession(model_bytes, session_options, providers=[CPU])
        self.input_name = self.graph.input_name
        self.output_name = self.graph.output_name
        self.attention_output = self.graph.attention_output
        self._graph_outputs = (
            self.output_name,
            *filter(None, [self.attention_output, self.graph.ood_output]),
        )
        self.load_check.check_rows(self._graph_outputs)
        self.output_names = (
            PROBABILITIES,
            *([ATTENTION_ROLLOUT] if self.attention_output else []),
            *([OOD_SCORE] if self.metadata.ood else []),
        )
        """What `infer` answers with, by name."""
        rows, columns = self.graph.attention_grid or (-1, -1)
        shapes = {
            PROBABILITIES: (-1, len(self.labels)),
            ATTENTION_ROLLOUT: (-1, rows, columns),
            OOD_SCORE: (-1,),
        }
        self.output_shapes = {name: shapes[name] for name in self.output_names}
        """Each output's shape (float32, one row per image), -1 where the batch or the graph
        leaves it open."""
        self._bound = (
            BucketedIoBinding(
                self._session,
                input_name=self.input_name,
                outputs=self._bound_shapes(),
                image_shape=(
                    3,
                    self.metadata.preprocessing.input_size,
                    self.metadata.preprocessing.input_size,
                ),
                max_batch_size=options.max_batch_size,
                device="cpu" if self.provider == CPU else "cuda",
                cuda_graph=cuda_graph,
            )
            if one_call_at_a_time
            else None
        )
        self._lone_session = (
            _lone_call_session(model_bytes, session_options, threads=cores)
            if options.lone_call_spinning and self.provider == CPU and self._bound is None
            else None
        )
        self.runtime = {
            "provider": self.provider,
            "inference_workers": str(self.inference_workers),
            "intra_op_threads": str(session_options.intra_op_num_threads),
            "lone_call_spinning": "on" if self._lone_session else "off",
            "cpu_memory_arena": "on" if session_options.enable_cpu_mem_arena else "off",
            "precision": self.metadata.precision,
            "batch": self._batching(),
            "io_binding": "on" if self._bound else "off",
            "cuda_graph": "on" if cuda_graph else "off",
            "tensorrt": "on" if TENSORRT in self.providers else "off",
        }
        logger.info(  # by file: a repository names the model by its folders, not its metadata
            "%s: %s", self.path, ", ".join(f"{key} {value}" for key, value in self.runtime.items())
        )

    def _batching(self) -> str:
        fixed = f"fixed {self.fixed_batch_size}" if self.fixed_batch_size else "dynamic"
        if self.images_per_call is not None:
            return f"{fixed}, {self.images_per_call} image per call ({self.metadata.precision})"
        return fixed

    def _unbindable(self) -> str | None:
        """Why the bound buffers (float32, one per batch-size bucket) cannot serve this graph."""
        if self.fixed_batch_size is not None:
            return f"the graph fixes the batch at {self.fixed_batch_size}"
        if self.images_per_call is not None:
            return f"{self.metadata.precision} runs {self.images_per_call} image per call"
        if self.graph.output_type != "tensor(float)":
            return f"the graph's output is {self.graph.output_type}"
        if self.graph.attention_output is not None and self.graph.attention_grid is None:
            return "the graph does not fix its attention grid's shape"
        return None

    def _bound_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each output's shape per image, for the bound buffers."""
        shapes: dict[str, tuple[int, ...]] = {self.output_name: (len(self.metadata.labels),)}
        if self.graph.attention_output is not None and self.graph.attention_grid is not None:
            shapes[self.graph.attention_output] = self.graph.attention_grid
        if self.graph.ood_output is not None:
            shapes[self.graph.ood_output] = ()
        return shapes

    def _workers(self, requested: int, one_call_at_a_time: bool) -> int:
        """Calls that may run at once: `requested`, or for 0 two on the CPU provider and one
        elsewhere; always one with IO binding, whose buffers serve one call at a time."""
        if not one_call_at_a_time:
            return requested or (2 if self.provider == CPU else 1)
        if requested > 1:
            why = "IO binding runs one call at a time"
            fallback = f"inference_workers {requested}: 1 ({why})"
            self.fallbacks = (*self.fallbacks, fallback)
            logger.warning("fallback: %s", fallback)
        return 1

    def call_seconds(self, images: int) -> float:
        """How long one onnxruntime call of `images` may run before it is stopped: the load-time
        bound, which covered a batch of two, for every two images. A graph whose time depends on
        its pixels cannot hold a thread, a core and its requests' places for good."""
        return self.check_seconds * max(1.0, images / 2)

    def warm_up_batch_sizes(self) -> tuple[int, ...]:
        """Every bound batch size (each has its buffers, and on CUDA its graph, to set up);
        with CUDA graphs each several times, since onnxruntime captures after a few runs;
        unbound, one call through each session."""
        if self._bound is None:
            # A lone image goes through the lone-call session, two through the main one.
            return (1, 2) if self._lone_session is not None else (1,)
        runs = CUDA_GRAPH_WARM_UP_RUNS if self.runtime["cuda_graph"] == "on" else 1
        return tuple(b.batch_size for b in self._bound.buckets for _ in range(runs))

    @property
    def labels(self) -> tuple[str, ...]:
        return self.metadata.labels

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """The model's raw classification output for a float32 (N, 3, S, S) batch."""
        return self._raw(batch)[self.output_name]

    def _raw(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self._bound is not None:
            # Through the bound buckets only, in chunks if need be: with CUDA graphs on, a plain
            # run would replay (or capture over) graph 0 with the wrong buffers.
            step = self._bound.max_batch_size
            chunks = [
                self._bound.run(batch[i : i + step], self.call_seconds(step))
                for i in range(0, len(batch), step)
            ]
            return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}
        return self._run(self._session, batch)

    def _run(self, session: ort.InferenceSession, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Plain runs, float32: in calls of at most `images_per_call` images where that is
        bounded; a graph with a fixed batch gets exactly that many rows per call (padded with
        zeros, which are never returned)."""
        fixed = self.fixed_batch_size
        step = self.images_per_call or fixed
        names = self._graph_outputs

        def plain(inputs: np.ndarray) -> dict[str, np.ndarray]:
            with watchdog().bounded(self.call_seconds(len(inputs))) as options:
                values = session.run(list(names), {self.input_name: inputs}, options)
            return {
                name: np.asarray(value, dtype=np.float32)
                for name, value in zip(names, values, strict=True)
            }

        if step is None or len(batch) == step == (fixed or step):
            return plain(batch)
        chunks = []
        for start in range(0, len(batch), step):
            chunk = batch[start : start + step]
            padded = np.zeros((fixed or len(chunk), *batch.shape[1:]), dtype=batch.dtype)
            padded[: len(chunk)] = chunk
            chunks.append({k: v[: len(chunk)] for k, v in plain(padded).items()})
        return {name: np.concatenate([c[name] for c in chunks]) for name in names}

    def infer(self, batch: np.ndarray) -> Outputs:
        """Every output the service serves for a batch, by name (see `Outputs`)."""
        return self._named(self._raw(batch), len(batch))

    def infer_alone(self, batch: np.ndarray) -> Outputs:
        """`infer` for a call with nothing else to do on the machine: through the session
        whose threads busy-wait between operators while it runs, when there is one."""
        if self._lone_session is None:
            return self.infer(batch)
        return self._named(self._run(self._lone_session, batch), len(batch))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities (N, classes), float32, each row summing to 1."""
        return self.infer(batch)[PROBABILITIES]

    def _named(self, raw: dict[str, np.ndarray], images: int) -> Outputs:
        for name, values in raw.items():
            if values.ndim == 0 or len(values) != images:
                raise OutputRowsMismatch(
                    f"the graph's output {name} gave {list(values.shape)} for {images} images: "
                    "not one row per image"
                )
        scores = raw[self.output_name]
        named = {
            PROBABILITIES: (
                scores.astype(np.float32)
                if self.metadata.output == "probabilities"
                else softmax(scores)
            )
        }
        if self.attention_output is not None:
            named[ATTENTION_ROLLOUT] = raw[self.attention_output]
        if self.graph.ood_output is not None:
            named[OOD_SCORE] = raw[self.graph.ood_output].astype(np.float64)
        elif (ood := self.metadata.ood) is not None:
            # float64, as calibrated: a score on the threshold must fall on the same side.
            named[OOD_SCORE] = ood_scores(scores, self.metadata.output, ood.score)
        return named


def _lone_call_session(
    model_bytes: bytes, options: ort.SessionOptions, *, threads: int
) -> ort.InferenceSession:
    """The CPU session for lone calls, on all `threads`: they busy-wait between operators
    instead of sleeping (a lone image's call ~1 ms faster on 2 cores), and stop the moment the
    call returns, so they never take cycles from work that arrives afterwards."""
    lone = ort.SessionOptions()
    lone.add_session_config_entry(*ONNX_FORMAT_ONLY)
    lone.intra_op_num_threads = threads
    lone.inter_op_num_threads = options.inter_op_num_threads
    lone.graph_optimization_level = options.graph_optimization_level
    lone.enable_cpu_mem_arena = options.enable_cpu_mem_arena
    lone.add_session_config_entry("session.intra_op.allow_spinning", "1")
    lone.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(model_bytes, lone, providers=[CPU])


def _create_session(
    model_bytes: bytes, options: ort.SessionOptions, plan: ProviderPlan
) -> tuple[ort.InferenceSession, ProviderPlan]:
    """The session for `plan`; without CUDA graph capture if the model cannot be captured."""
    try:
        return ort.InferenceSession(model_bytes, options, providers=list(plan.entries)), plan
    except Exception as error:  # onnxruntime raises its own untyped errors here
        if not plan.cuda_graph:
            raise
        fallback = plan.without_cuda_graph(f"cuda_graph could not be used ({error}): off")
        return ort.InferenceSession(
            model_bytes, options, providers=list(fallback.entries)
        ), fallback
