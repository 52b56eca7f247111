"""Which engine runs a model, and at which precision: the candidates that the settings, the file's
precision and the machine allow, each with why; and, under `VIT_ENGINE=auto`, the measurement
that picks the faster of two.

onnxruntime is always a candidate, since it is what every file is checked with; OpenVINO is one
on the CPU where it is installed, the load check ran the file on it, and the file's precision
is FP32 or bf16 (int8 files use onnxruntime's dynamic quantization, fp16 files the GPU).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from model_runtime.openvino_engine import ONNXRUNTIME, OPENVINO, cpu_runs_bf16, openvino_missing
from model_runtime.options import CPU, RuntimeOptions

TIMED_ROUNDS = 3
"""Rounds of every call at once that the measurement times, after one untimed round; fewer
where a round takes longer than TIMED_SECONDS / TIMED_ROUNDS."""
TIMED_SECONDS = 1.5
"""About how long the timed rounds of one engine take, at least one round."""
ONE_IMAGE_SERVES_FROM = 0.8
"""Where calls of one image each, side by side, do at least this share of the images/s of the
same calls batched, batching gains too little for the wait it adds, and every call holds one
image (a large model on a CPU, whose matrix products are already large with one image). At 16
clients a batch of several such images keeps the requests behind it waiting seconds: a
ViT-B/16's p99 was 4.5 times its p50 batched."""
ONE_IMAGE_PER_CALL_FROM_MS = 250.0
"""...and only where a call of a full batch takes at least this long, all calls at once. A
shorter batch holds its requests up little at any load, and a quick model's timings at load
are too close to tell the schedules apart: the bundled model (a batch call of 55-80 ms on 2
cores) measured its calls of one image at 65-90% of its batches from one load to the next."""
LONE_RUNS = 3
"""Timed runs of one image alone, after an untimed one; the fastest counts."""
TIMED_BATCH = 8
"""Images per timed call (or `max_batch_size`, if smaller): what a loaded server runs."""
NO_BF16_CPU = "this CPU computes no bf16 (AVX512_BF16 or AMX): the bf16 file runs at fp32"


@dataclass(frozen=True)
class Candidate:
    """One way to run the model: an engine and the precision it computes in, with why."""

    engine: str
    precision: str
    why: str


@dataclass(frozen=True)
class Candidates:
    """The ways to run the model, in order of preference, and what was given up, with why."""

    options: tuple[Candidate, ...]
    notes: tuple[str, ...]


def engine_candidates(
    options: RuntimeOptions, file_precision: str, provider: str, openvino_refused: str | None
) -> Candidates:
    """The candidates for a file of `file_precision` whose onnxruntime session runs on
    `provider`; `openvino_refused` says why the load check could not run the file on OpenVINO
    (None: it could, or it was not asked to)."""
    onnxruntime = Candidate(
        ONNXRUNTIME,
        "fp32" if file_precision == "bf16" else file_precision,
        "onnxruntime computes a bf16 file at fp32"
        if file_precision == "bf16"
        else f"the file's precision, {file_precision}",
    )
    if options.engine == ONNXRUNTIME:
        return Candidates((onnxruntime,), ())
    unusable = _openvino_unusable(options, file_precision, provider, openvino_refused)
    if unusable is not None:
        return Candidates((onnxruntime,), (f"engine {options.engine}: {unusable}; onnxruntime",))
    if file_precision == "bf16" and cpu_runs_bf16():
        openvino = Candidate(OPENVINO, "bf16", "the file passed the bf16 gate; this CPU has bf16")
    elif file_precision == "bf16":
        openvino = Candidate(OPENVINO, "fp32", NO_BF16_CPU)
    else:
        why = "an fp32 file always runs at fp32 (OpenVINO's bf16 is turned off)"
        openvino = Candidate(OPENVINO, "fp32", why)
    if options.engine == OPENVINO:
        return Candidates((openvino,), ())
    return Candidates((onnxruntime, openvino), ())


def _openvino_unusable(
    options: RuntimeOptions, file_precision: str, provider: str, openvino_refused: str | None
) -> str | None:
    """Why OpenVINO cannot run this model here, or None."""
    missing = openvino_missing()
    if missing is not None:
        return missing
    if file_precision in ("int8", "fp16"):
        return f"{file_precision} files run on onnxruntime, whose operators they were checked with"
    if options.engine == "auto" and provider != CPU:
        return f"the model runs on {provider}, and OpenVINO serves the CPU here"
    if options.engine == "auto" and (options.io_binding or options.cuda_graph):
        return "IO binding and CUDA graphs are onnxruntime's"
    if openvino_refused is not None:
        return f"OpenVINO could not run the file ({openvino_refused})"
    return None


@dataclass(frozen=True)
class Timing:
    """What one candidate did at load: images a second with every call at once, the same calls
    of one image each, and one image alone."""

    candidate: Candidate
    images_per_second: float
    lone_ms: float
    batch: int
    calls: int
    singles_per_second: float
    """Images a second with `calls` calls of one image each at once, each on its share of the
    cores (the batched rate where `batch` is 1)."""

    @property
    def alone_images_per_second(self) -> float:
        return 1000 / self.lone_ms

    @property
    def batch_call_ms(self) -> float:
        """How long one call of `batch` images took, all `calls` at once."""
        return 1000 * self.calls * self.batch / self.images_per_second

    def line(self) -> str:
        return (
            f"{self.candidate.engine} {self.candidate.precision}: "
            f"{self.images_per_second:.3g} images/s ({self.calls} calls of {self.batch} at once), "
            f"{self.singles_per_second:.3g} with one image each, "
            f"{self.lone_ms:.1f} ms for one image alone"
        )


def batches_serve(timing: Timing) -> bool:
    """Whether `timing`'s batches side by side beat the same calls of one image each by enough
    to be worth their wait (ONE_IMAGE_SERVES_FROM), or take too little time to be worth
    avoiding (ONE_IMAGE_PER_CALL_FROM_MS). A lone image gets every core in either
    case (`ModelSession.infer_alone`); calls of one image side by side, each on its share of
    the cores, are what a loaded server runs instead of one image at a time on every core,
    whose operators split over the cores wait for each other."""
    return (
        timing.batch_call_ms < ONE_IMAGE_PER_CALL_FROM_MS
        or timing.singles_per_second < ONE_IMAGE_SERVES_FROM * timing.images_per_second
    )


def time_candidate(
    candidate: Candidate,
    infer: Callable[[np.ndarray], object],
    infer_alone: Callable[[np.ndarray], object],
    image: np.ndarray,
    calls: int,
    batch: int,
) -> Timing:
    """`infer` timed as a loaded server runs it: `calls` calls of `batch` copies of `image` at
    once, TIMED_ROUNDS times after one untimed round, then the same calls of `image` alone;
    before them `infer_alone` on one image, the fastest of LONE_RUNS after one untimed run."""
    errors: list[BaseException] = []

    def rounds(images: np.ndarray, count: int) -> None:
        try:
            for _ in range(count):
                infer(images)
        except BaseException as error:  # raised again in the measuring thread
            errors.append(error)

    def all_at_once(images: np.ndarray, count: int) -> float:
        threads = [threading.Thread(target=rounds, args=(images, count)) for _ in range(calls)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return time.perf_counter() - started

    # One image alone first, as a lone request finds the machine: nothing else running.
    infer_alone(image)
    lone = []
    for _ in range(LONE_RUNS):
        started = time.perf_counter()
        infer_alone(image)
        lone.append(time.perf_counter() - started)

    def images_per_second(images: np.ndarray) -> float:
        warm = all_at_once(images, 1)
        # A large model's round takes seconds: fewer of them, so a load is not held up long.
        rounds_timed = max(1, min(TIMED_ROUNDS, round(TIMED_SECONDS / warm)))
        return calls * len(images) * rounds_timed / all_at_once(images, rounds_timed)

    batched = images_per_second(np.repeat(image, batch, axis=0))
    return Timing(
        candidate,
        images_per_second=batched,
        lone_ms=min(lone) * 1000,
        batch=batch,
        calls=calls,
        singles_per_second=images_per_second(image) if batch > 1 else batched,
    )
