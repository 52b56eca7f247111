"""The onnxruntime session behind one narrow call: infer(batch) -> named outputs (the
probabilities, and the attention rollout where the model has one)."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from model_contract.metadata import ModelMetadata
from model_contract.ood import ood_scores
from model_contract.outputs import (
    ATTENTION_ROLLOUT,
    EMBEDDING,
    OOD_SCORE,
    PROBABILITIES,
    served_outputs,
)
from model_runtime.engine_choice import (
    TIMED_BATCH,
    Candidate,
    Timing,
    batches_serve,
    engine_candidates,
    time_candidate,
)
from model_runtime.graph_check import GraphDeclarations, check_graph
from model_runtime.io_binding import BucketedIoBinding
from model_runtime.load_check import LoadCheckFailed, check_in_a_process, time_bound
from model_runtime.model_file import read_model_file
from model_runtime.openvino_engine import ONNXRUNTIME, OpenVinoCalls, Precision
from model_runtime.options import CPU, CUDA, TENSORRT, RuntimeOptions
from model_runtime.platform import usable_cpu_count
from model_runtime.providers import (
    NO_NVIDIA_DRIVER,
    ProviderPlan,
    nvidia_driver_present,
    plan_providers,
)
from model_runtime.session_plan import ModelFacts, SessionPlan, plan_sessions
from model_runtime.watchdog import watchdog

logger = logging.getLogger(__name__)

DEFAULT_OPTIONS = RuntimeOptions()

Outputs = dict[str, np.ndarray]
"""A batch's outputs by name, each with one row per image: those `served_outputs` lists
(model_contract/outputs.py)."""


def per_image(outputs: Outputs) -> list[Outputs]:
    """A batch's outputs as one mapping per image, each output keeping its leading axis."""
    count = len(next(iter(outputs.values())))
    return [{name: values[i : i + 1] for name, values in outputs.items()} for i in range(count)]


ARENA_SHRINKAGE = "memory.enable_memory_arena_shrinkage"
"""onnxruntime's run option: the arenas named give back their free memory when the call ends."""
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


class Calls(Protocol):
    """One engine's calls of a model: the outputs `names` for `feeds`, bounded in time
    (InferenceOverran past `seconds`)."""

    def run(
        self, names: list[str], feeds: dict[str, np.ndarray], seconds: float
    ) -> list[np.ndarray]: ...


class OnnxruntimeCalls:
    """An onnxruntime session's calls, each stopped by the watchdog past its bound; with
    `arena_kept_for_one_image`, a call of several images gives back what the CPU arena grew
    for it when it ends."""

    def __init__(self, session: ort.InferenceSession, *, arena_kept_for_one_image: bool) -> None:
        self.session = session
        self._arena_kept_for_one_image = arena_kept_for_one_image

    def run(
        self, names: list[str], feeds: dict[str, np.ndarray], seconds: float
    ) -> list[np.ndarray]:
        options = None
        if self._arena_kept_for_one_image and max(len(feed) for feed in feeds.values()) > 1:
            options = ort.RunOptions()
            options.add_run_config_entry(ARENA_SHRINKAGE, "cpu:0")
        with watchdog().bounded(seconds, options) as bounded:
            return list(self.session.run(names, feeds, bounded))


@dataclass
class _Engine:
    """A candidate built and ready: its main calls, and its calls for a lone image."""

    candidate: Candidate
    calls: Calls
    lone_calls: Calls | None = None
    bound: BucketedIoBinding | None = None


class ModelSession:
    """A loaded self-describing model: its metadata, its engine and providers, and inference."""

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
        self.metadata = ModelMetadata.from_props(self.load_check.metadata_props)
        self.graph = check_graph(self.load_check.declared, self.metadata, path)
        self.fixed_batch_size = self.graph.fixed_batch_size
        self.images_per_call = self.metadata.images_per_call
        self.load_check.check_rows(self._graph_outputs)
        self.max_batch_size = options.max_batch_size
        session, plan, providers = self._onnxruntime_session(model_bytes, options)
        self.plan = plan
        """What the onnxruntime sessions were built from."""
        self.inference_workers = plan.inference_workers
        self.input_name = self.graph.input_name
        self.output_name = self.graph.output_name
        self.attention_output = self.graph.attention_output
        self.outputs = served_outputs(self.metadata, self.graph.attention_grid)
        """What `infer` answers with: each output's name and shape."""
        self.output_names = tuple(output.name for output in self.outputs)
        candidates = engine_candidates(
            options, self.metadata.precision, self.provider, self.load_check.openvino_refused
        )
        self.fallbacks = (*providers.fallbacks(self.providers), *plan.fallbacks, *candidates.notes)
        for fallback in self.fallbacks:
            # A CPU-only machine serving from the CPU is expected, not a warning.
            level = logging.INFO if fallback.endswith(NO_NVIDIA_DRIVER) else logging.WARNING
            logger.log(level, "serving on %s: %s", self.provider, fallback)
        self._trials = [
            self._onnxruntime_engine(c, session, model_bytes)
            if c.engine == ONNXRUNTIME
            else self._openvino_engine(c, model_bytes)
            for c in candidates.options
        ]
        self._serve(self._trials[0])
        self.engine_choice = (
            "auto: not measured yet (onnxruntime until then)"
            if len(self._trials) > 1
            else "; ".join(candidates.notes) or f"VIT_ENGINE={options.engine}"
        )
        """Why the engine in use serves: the setting, or the measurement that chose it."""
        self.one_image_per_call = False
        """Whether calls hold one image each: where the load-time measurement found that
        long batches gain too little (`batches_serve`), and VIT_INFERENCE_WORKERS leaves
        the calls at once to the service."""
        self._schedules = options.inference_workers == 0
        if self._trials[0].lone_calls is None and len(self._trials) == 1:
            self._trials = []  # nothing to choose between: no measurement
        logger.info(  # by file: a repository names the model by its folders, not its metadata
            "%s: %s", self.path, ", ".join(f"{key} {value}" for key, value in self.runtime.items())
        )

    def _onnxruntime_session(
        self, model_bytes: bytes, options: RuntimeOptions
    ) -> tuple[ort.InferenceSession, SessionPlan, ProviderPlan]:
        """The main onnxruntime session as planned, checked against the load check's report;
        the plan it was built from, made again where onnxruntime gave up a provider."""
        providers = plan_providers(
            options, set(ort.get_available_providers()), gpu_present=nvidia_driver_present()
        )
        if CUDA in providers.names:
            load_pip_cuda_libraries()
        facts = ModelFacts(len(model_bytes), self.graph, self.metadata)
        plan = plan_sessions(options, providers, facts)
        session, plan = _create_session(model_bytes, plan, options, facts)
        providers = plan.providers  # less CUDA graphs, with the reason, where they failed
        if GraphDeclarations.of(session) != self.load_check.declared or (
            session.get_modelmeta().custom_metadata_map != self.load_check.metadata_props
        ):
            raise LoadCheckFailed(
                "the file's graph or metadata differ from what its checks in a process of "
                "their own reported: refused"
            )
        self.providers: tuple[str, ...] = tuple(session.get_providers())
        self.provider = self.providers[0]
        if self.provider != plan.provider:
            # onnxruntime gave up a provider while building the session: what follows from
            # the one it runs on (threads, calls at once) is planned again, for it alone.
            in_use = ProviderPlan(
                tuple(e for e in providers.entries if e[0] in self.providers), providers.notes
            )
            replanned = plan_sessions(options, in_use, facts, provider=self.provider)
            if replanned.threads_per_call != plan.threads_per_call:
                session = ort.InferenceSession(
                    model_bytes, replanned.session_options(), providers=list(in_use.entries)
                )
            plan = replanned
        if options.require_cuda and self.provider not in (CUDA, TENSORRT):
            raise CudaUnavailable(f"CUDA was required but the session runs on {self.provider}")
        return session, plan, providers

    def _onnxruntime_engine(
        self, candidate: Candidate, session: ort.InferenceSession, model_bytes: bytes
    ) -> _Engine:
        plan = self.plan
        bound = (
            BucketedIoBinding(
                session,
                input_name=self.input_name,
                outputs=self._bound_shapes(),
                image_shape=(
                    3,
                    self.metadata.preprocessing.input_size,
                    self.metadata.preprocessing.input_size,
                ),
                max_batch_size=self.max_batch_size,
                device="cpu" if self.provider == CPU else "cuda",
                cuda_graph=plan.cuda_graph,
            )
            if plan.io_binding
            else None
        )
        kept = plan.arena_kept_for_one_image
        lone = (
            OnnxruntimeCalls(
                ort.InferenceSession(model_bytes, plan.lone_call_options(), providers=[CPU]),
                arena_kept_for_one_image=kept,
            )
            if plan.lone_call
            else None
        )
        return _Engine(
            candidate, OnnxruntimeCalls(session, arena_kept_for_one_image=kept), lone, bound
        )

    def _openvino_engine(self, candidate: Candidate, model_bytes: bytes) -> _Engine:
        """OpenVINO with as many calls at once as onnxruntime would run, sharing every core."""
        precision: Precision = "bf16" if candidate.precision == "bf16" else "fp32"
        plan = self.plan
        calls = OpenVinoCalls(
            model_bytes,
            precision=precision,
            streams=plan.inference_workers,
            threads=plan.all_threads,
        )
        # A lone image gets every core in one stream: the same kernels, the same numbers.
        lone = (
            OpenVinoCalls(model_bytes, precision=precision, streams=1, threads=plan.all_threads)
            if plan.lone_call
            else None
        )
        return _Engine(candidate, calls, lone)

    def _serve(self, engine: _Engine) -> None:
        self.engine = engine.candidate.engine
        """onnxruntime or openvino: what runs the model's calls."""
        self.precision = engine.candidate.precision
        """The precision the model's calls compute in (a bf16 file runs at fp32 where the
        engine or the CPU has no bf16)."""
        self.precision_why = engine.candidate.why
        self.lone_engine = engine.candidate.engine
        """The engine a lone image runs on."""
        self._serving = engine

    @property
    def choosing(self) -> bool:
        """Whether `choose_engine` has engines or schedules to measure: two engines under
        VIT_ENGINE=auto, or batches against one image at a time on every core."""
        return bool(self._trials)

    def choose_engine(self, golden: list[np.ndarray], expected: np.ndarray | None) -> None:
        """At load: each engine's self-test run on the `golden` tensors against `expected`
        (the file's probabilities, within its tolerance), then its warm-up timed (one image
        alone, every call at once on a batch, then on one image each); the one that passes and
        would serve the more images a second under load (`_served_rate`) is kept, the other
        dropped; a lone image runs on busy-waiting onnxruntime where its
        precision is the same. Where calls of one image each do nearly as well as long batches
        (`batches_serve`), every call holds one. Every time is logged, and shown in
        `engine_choice`."""
        if not self.choosing:
            return
        image = golden[0] if golden else np.zeros(self._input_shape(1), np.float32)
        batch = min(TIMED_BATCH, self.max_batch_size)
        timings: list[Timing] = []
        failed: list[str] = []
        for trial in self._trials:
            worst = self._golden_difference(trial, golden, expected)
            test = self.metadata.self_test
            if test is not None and worst is not None and worst > test.tolerance:
                failed.append(
                    f"{trial.candidate.engine} {trial.candidate.precision} failed the self-test "
                    f"(a probability {worst:.1e} off, over {test.tolerance:.1e})"
                )
                continue
            timings.append(
                time_candidate(
                    trial.candidate,
                    functools.partial(self._raw, engine=trial),
                    functools.partial(self._run, trial.lone_calls or trial.calls),
                    image,
                    self.inference_workers,
                    batch,
                )
            )
        chosen = max(timings, key=self._served_rate) if timings else None
        # A lone image goes to onnxruntime's busy-waiting session wherever it computes in the
        # same precision as the batches (float32 rounding apart, the same numbers), whichever
        # serves them: OpenVINO's threads sleep between operators, and a lone image served
        # through it waited 1-4 ms longer in the service, more than one image's timing at load
        # can tell apart.
        alone = next(
            (
                t
                for t in timings
                if chosen
                and t.candidate.engine == ONNXRUNTIME
                and t.candidate.precision == chosen.candidate.precision
            ),
            chosen,
        )
        keep = self._trial(chosen) or self._trials[0]
        lone = self._trial(alone) or keep
        lone_calls = lone.lone_calls or keep.lone_calls
        self._serve(_Engine(keep.candidate, keep.calls, lone_calls, keep.bound))
        self.lone_engine = (lone if lone.lone_calls else keep).candidate.engine
        measured = "; ".join([t.line() for t in timings] + failed)
        if len(self._trials) > 1:
            self.engine_choice = f"auto: {self.engine} is the faster that passed ({measured})"
        else:
            self.engine_choice = f"{self.engine_choice} ({measured})"
        if self.lone_engine != self.engine:
            self.engine_choice += f"; a lone image on {self.lone_engine}, busy-waiting"
        self._trials = []
        if chosen is not None and self._schedules and not batches_serve(chosen):
            # Calls of one image each, side by side: no request waits behind a long batch.
            self.one_image_per_call = True
            self.engine_choice += (
                f"; one image per call, {chosen.calls} at once: {chosen.singles_per_second:.3g} "
                f"images/s against {chosen.images_per_second:.3g} batched"
            )
        logger.info("%s: %s", self.path, self.engine_choice)

    def _served_rate(self, timing: Timing) -> float:
        """The images a second `timing`'s candidate would serve under load: its batches, or its
        calls of one image each where the schedule is the service's and its batches do not
        serve (`batches_serve`)."""
        if self._schedules and not batches_serve(timing):
            return timing.singles_per_second
        return timing.images_per_second

    def _trial(self, timing: Timing | None) -> _Engine | None:
        """The engine `timing` measured."""
        return next((t for t in self._trials if timing and t.candidate == timing.candidate), None)

    def _golden_difference(
        self, engine: _Engine, golden: list[np.ndarray], expected: np.ndarray | None
    ) -> float | None:
        """The largest difference of `engine`'s answers (probabilities, or a model without
        classes its embeddings) for the golden tensors from `expected`; None without both."""
        if not golden or expected is None:
            return None
        primary = self.primary_output
        answers = np.concatenate(
            [self._named(self._raw(t, engine), len(t))[primary] for t in golden]
        )
        return float(np.abs(answers - expected).max())

    def _input_shape(self, images: int) -> tuple[int, int, int, int]:
        side = self.metadata.preprocessing.input_size
        return (images, 3, side, side)

    @property
    def runtime(self) -> dict[str, str]:
        """How the model runs, as `model_info` shows it."""

        def on(flag: bool) -> str:
            return "on" if flag else "off"

        plan, serving = self.plan, self._serving
        if isinstance(serving.calls, OpenVinoCalls):
            provider, threads = "OpenVINO-CPU", str(serving.calls.threads)
        else:
            provider, threads = self.provider, str(plan.threads_per_call)
        return {
            "engine": self.engine,
            "lone_engine": self.lone_engine,
            "provider": provider,
            "inference_workers": str(self.inference_workers),
            "intra_op_threads": threads,
            "lone_call_spinning": on(serving.lone_calls is not None),
            "cpu_memory_arena": self._arena(),
            "precision": self.precision,
            "file_precision": self.metadata.precision,
            "batch": "one image per call" if self.one_image_per_call else self._batching(),
            "io_binding": on(serving.bound is not None),
            "cuda_graph": on(serving.bound is not None and plan.cuda_graph),
            "tensorrt": on(self.engine == ONNXRUNTIME and TENSORRT in self.providers),
        }

    def _arena(self) -> str:
        """The CPU arena as `runtime` shows it."""
        if not self.plan.cpu_memory_arena or self.engine != ONNXRUNTIME:
            return "off"
        return "kept for one image" if self.plan.arena_kept_for_one_image else "on"

    @property
    def _graph_outputs(self) -> tuple[str, ...]:
        """The graph's outputs the service reads, by the graph's names."""
        graph = self.graph
        return (
            graph.output_name,
            *filter(None, [graph.attention_output, graph.ood_output, graph.embedding_output]),
        )

    def _batching(self) -> str:
        fixed = f"fixed {self.fixed_batch_size}" if self.fixed_batch_size else "dynamic"
        if self.images_per_call is not None:
            return f"{fixed}, {self.images_per_call} image per call ({self.metadata.precision})"
        return fixed

    def _bound_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each output's shape per image, for the bound buffers."""
        served = served_outputs(self.metadata, self.graph.attention_grid)
        shapes: dict[str, tuple[int, ...]] = {self.graph.output_name: served[0].per_image}
        if self.graph.embedding_output is not None:
            shapes[self.graph.embedding_output] = served[-1].per_image
        if self.graph.attention_output is not None and self.graph.attention_grid is not None:
            shapes[self.graph.attention_output] = self.graph.attention_grid
        if self.graph.ood_output is not None:
            shapes[self.graph.ood_output] = ()
        return shapes

    def call_seconds(self, images: int) -> float:
        """How long one onnxruntime call of `images` may run before it is stopped: the load-time
        bound, which covered a batch of two, for every two images. A graph whose time depends on
        its pixels cannot hold a thread, a core and its requests' places for good."""
        return self.check_seconds * max(1.0, images / 2)

    def warm_up_batch_sizes(self) -> tuple[int, ...]:
        """Every bound batch size (each has its buffers, and on CUDA its graph, to set up);
        with CUDA graphs each several times, since onnxruntime captures after a few runs;
        unbound, one call through each session."""
        bound = self._serving.bound
        if bound is None:
            # A lone image goes through the lone-call session, two through the main one.
            return (1, 2) if self._serving.lone_calls is not None else (1,)
        runs = CUDA_GRAPH_WARM_UP_RUNS if self.plan.cuda_graph else 1
        return tuple(b.batch_size for b in bound.buckets for _ in range(runs))

    @property
    def labels(self) -> tuple[str, ...]:
        return self.metadata.labels

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """The model's raw classification output for a float32 (N, 3, S, S) batch."""
        return self._raw(batch)[self.output_name]

    def _raw(self, batch: np.ndarray, engine: _Engine | None = None) -> dict[str, np.ndarray]:
        """The graph's outputs for `batch` from `engine` (the one serving when None)."""
        engine = engine or self._serving
        if engine.bound is not None:
            # Through the bound buckets only, in chunks if need be: with CUDA graphs on, a plain
            # run would replay (or capture over) graph 0 with the wrong buffers.
            bound = engine.bound
            step = bound.max_batch_size
            chunks = [
                bound.run(batch[i : i + step], self.call_seconds(step))
                for i in range(0, len(batch), step)
            ]
            return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}
        return self._run(engine.calls, batch)

    def _run(self, calls: Calls, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Plain runs, float32: in calls of at most `images_per_call` images where that is
        bounded; a graph with a fixed batch gets exactly that many rows per call (padded with
        zeros, which are never returned)."""
        fixed = self.fixed_batch_size
        step = self.images_per_call or fixed
        names = self._graph_outputs

        def plain(inputs: np.ndarray) -> dict[str, np.ndarray]:
            values = calls.run(
                list(names), {self.input_name: inputs}, self.call_seconds(len(inputs))
            )
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
        """`infer` for a call with nothing else to do on the machine: through the calls that
        use every core at once (onnxruntime's busy-wait between operators), where there are."""
        lone = self._serving.lone_calls
        if lone is None:
            return self.infer(batch)
        return self._named(self._run(lone, batch), len(batch))

    @property
    def primary_output(self) -> str:
        """What the model is for: its probabilities, or for a model without classes its
        embedding; the output its self-test checks."""
        return self.outputs[0].name

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities (N, classes), float32, each row summing to 1; for a model
        without classes, its embeddings (N, size)."""
        return self.infer(batch)[self.primary_output]

    def _named(self, raw: dict[str, np.ndarray], images: int) -> Outputs:
        for name, values in raw.items():
            if values.ndim == 0 or len(values) != images:
                raise OutputRowsMismatch(
                    f"the graph's output {name} gave {list(values.shape)} for {images} images: "
                    "not one row per image"
                )
        scores = raw[self.output_name]
        if not self.metadata.has_classes:
            return {EMBEDDING: scores.astype(np.float32)}
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
        if self.graph.embedding_output is not None:
            named[EMBEDDING] = raw[self.graph.embedding_output]
        return named


def _create_session(
    model_bytes: bytes, plan: SessionPlan, options: RuntimeOptions, facts: ModelFacts
) -> tuple[ort.InferenceSession, SessionPlan]:
    """The session for `plan`; planned again without CUDA graph capture, and built for that,
    if the model cannot be captured."""
    try:
        session = ort.InferenceSession(
            model_bytes, plan.session_options(), providers=list(plan.providers.entries)
        )
        return session, plan
    except Exception as error:  # onnxruntime raises its own untyped errors here
        if not plan.providers.cuda_graph:
            raise
        note = f"cuda_graph could not be used ({error}): off"
        providers = plan.providers.without_cuda_graph(note)
        fallback = plan_sessions(options, providers, facts)
        session = ort.InferenceSession(
            model_bytes, fallback.session_options(), providers=list(providers.entries)
        )
        return session, fallback
