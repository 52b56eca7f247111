"""A model file's first session and inferences, run in a process of its own with a time bound,
before the server (or a model tool) loads it: a graph that never finishes, or that allocates
without bound, is killed there and refused, where a thread stuck in onnxruntime could never be
stopped.

The process gets the file's bytes on stdin (never a path, which could change in between),
builds a CPU session as the service does and runs a batch of one and of two zeros through
every output, then reports the graph's declared inputs and outputs, its metadata, each output's
shape per batch, its peak memory and its time as one JSON line on stdout. What it reports is
what the server plans its own sessions from, so it builds each of them once.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_contract.metadata import InvalidModelMetadata, ModelMetadata, last_line
from model_runtime.graph_check import GraphDeclarations
from model_runtime.model_file import ONNX_FORMAT_ONLY, UnsafeModelFile
from model_runtime.openvino_engine import ONNXRUNTIME, OpenVinoCalls, openvino_missing
from model_runtime.options import CPU, RuntimeOptions
from model_runtime.platform import child_environment
from model_runtime.watchdog import InferenceOverran, watchdog

CHECK_BATCH_SIZES = (1, 2)
"""Batch sizes every output must answer with one row per image (a graph that fixes its batch
gets that size alone)."""
MAX_CHECK_INPUT_SIZE = 4096
"""The largest input side a model may ask for: 18 times a ViT's usual 224, and 200 MB an image in
float32."""


WITH_OPENVINO = "--with-openvino"
"""The child's flag to run the file on OpenVINO too."""
UNBOUNDED_HERE = 24 * 3600.0
"""A call's bound inside the child, which its parent kills at the checks' own bound."""


class LoadCheckFailed(UnsafeModelFile):
    """The model's first session or inferences overran their time, failed or crashed."""


@dataclass(frozen=True)
class LoadCheck:
    """What the model's first session and inferences showed, in a process of their own."""

    declared: GraphDeclarations
    """The graph's inputs and outputs."""
    metadata_props: dict[str, str]
    """The file's metadata, as string pairs."""
    output_shapes: dict[int, dict[str, tuple[int, ...]]]
    """batch size -> output name -> shape; empty where the input could not be fed zeros."""
    peak_bytes: int
    """The most memory the session and its inferences held at once."""
    seconds: float
    openvino_refused: str | None = None
    """Why OpenVINO could not run the file as onnxruntime did (None: it could, or it was not
    asked to)."""

    def check_rows(self, outputs: tuple[str, ...]) -> None:
        """LoadCheckFailed unless each of `outputs` gave one row per image in every batch."""
        for batch_size, shapes in self.output_shapes.items():
            for name in outputs:
                shape = shapes.get(name)
                if shape is None or not shape or shape[0] != batch_size:
                    raise LoadCheckFailed(
                        f"the graph's output {name} gives shape {list(shape or ())} for a batch "
                        f"of {batch_size}: not one row per image, so batched requests would get "
                        "other images' answers; export it with the batch as its first axis"
                    )


def time_bound(options: RuntimeOptions, file_bytes: int) -> float:
    """Seconds the load-time checks of a file of `file_bytes` may take."""
    return options.model_check_timeout_s + options.model_check_seconds_per_gb * file_bytes / 1e9


def check_in_a_process(data: bytes, options: RuntimeOptions) -> LoadCheck:
    """`data`'s first session and inferences in a child process, killed past `time_bound`;
    LoadCheckFailed saying why where they overran, failed or crashed. `data` must have passed
    `check_model_bytes`: the child gives onnxruntime exactly these bytes."""
    bound = time_bound(options, len(data))
    command = [sys.executable, "-m", __name__]
    if options.engine != ONNXRUNTIME and openvino_missing() is None:
        command.append(WITH_OPENVINO)
    try:
        done = subprocess.run(
            command,
            input=data,
            capture_output=True,
            timeout=bound,
            check=False,
            env=child_environment({"PYTHONPATH": os.pathsep.join(sys.path)}),
        )
    except subprocess.TimeoutExpired:
        raise LoadCheckFailed(
            f"the model's first session and inferences did not finish within {bound:.0f} s "
            "(VIT_MODEL_CHECK_TIMEOUT_S, plus VIT_MODEL_CHECK_SECONDS_PER_GB per GB of file): "
            "a graph that runs this long is refused"
        ) from None
    lines = done.stdout.decode("utf-8", "replace").strip().splitlines()
    if done.returncode != 0 or not lines:
        why = last_line(Exception(done.stderr.decode("utf-8", "replace")))
        raise LoadCheckFailed(
            f"the model's first session and inferences crashed (exit {done.returncode}: {why})"
        )
    report = json.loads(lines[-1])
    if "error" in report:
        if report.get("batch_size", 1) > 1:
            raise LoadCheckFailed(
                f"the graph's batch axis is dynamic, but it fails on a batch of "
                f"{report['batch_size']} ({report['error']}): export it with the batch fixed to "
                "1, which the service serves one image at a time"
            )
        raise LoadCheckFailed(f"the model's first session or inferences failed: {report['error']}")
    return LoadCheck(
        declared=GraphDeclarations.from_json(report["declared"]),
        metadata_props={str(k): str(v) for k, v in report["metadata"].items()},
        output_shapes={
            int(size): {name: tuple(shape) for name, shape in shapes.items()}
            for size, shapes in report["output_shapes"].items()
        },
        peak_bytes=int(report["peak_bytes"]),
        seconds=float(report["seconds"]),
        openvino_refused=report.get("openvino_refused"),
    )


def run_bounded(session: Any, names: list[str], feeds: dict[str, Any], seconds: float) -> list[Any]:
    """`session.run` for a model tool's own inferences of an untrusted graph (calibration, the
    rollout's probe), stopped after `seconds`: LoadCheckFailed if it had to be."""
    try:
        with watchdog().bounded(seconds) as options:
            return list(session.run(names, feeds, options))
    except InferenceOverran as error:
        raise LoadCheckFailed(
            f"an inference of the model did not finish within {seconds:.0f} s "
            "(VIT_MODEL_CHECK_TIMEOUT_S): a graph that runs this long is refused"
        ) from error


def _memory_bytes(field: str) -> int:
    """This process's resident memory now (`VmRSS`) or at its peak (`VmHWM`). Linux's
    `ru_maxrss` keeps the peak of the process that forked this one across exec, so a large
    server would hide a child's growth; /proc's counts start afresh. Elsewhere, `ru_maxrss`."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB elsewhere


class _Unfeedable(Exception):
    """The model asks for an input the check will not make: it is refused, never run."""


def _input_shape(session: Any, props: dict[str, str]) -> tuple[list[int], int] | None:
    """Batch sizes to run and the input's side; None where the file is no image classifier the
    service would run (not one image batch [N, 3, S, S], or metadata it refuses), which its
    own checks refuse before any inference."""
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].type != "tensor(float)" or len(inputs[0].shape) != 4:
        return None
    batch, channels, *spatial = inputs[0].shape
    fixed = [d for d in spatial if isinstance(d, int)]
    if isinstance(channels, int) and channels != 3 or len(set(fixed)) > 1:
        return None
    try:
        side = ModelMetadata.from_props(props).preprocessing.input_size
    except InvalidModelMetadata:
        return None
    if fixed and fixed[0] != side:
        return None
    if side > MAX_CHECK_INPUT_SIZE:
        raise _Unfeedable(
            f"its input size {side} is over the {MAX_CHECK_INPUT_SIZE} pixels the service feeds"
        )
    sizes = [batch] if isinstance(batch, int) and batch > 0 else list(CHECK_BATCH_SIZES)
    return sizes, side


def _run_check(data: bytes, with_openvino: bool) -> dict[str, Any]:
    """The child's work: the session as the service builds it, then one call per batch size;
    with `with_openvino`, the same calls on OpenVINO too, where the file's precision lets it
    serve there."""
    import numpy as np
    import onnxruntime as ort

    started = time.monotonic()
    baseline = _memory_bytes("VmRSS")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry(*ONNX_FORMAT_ONLY)
    try:
        session = ort.InferenceSession(data, options, providers=[CPU])
    except Exception as error:  # onnxruntime's own, untyped
        # Refused here, not left to the caller's session: one on another provider might load
        # what no check has run.
        return {"error": f"not an ONNX model onnxruntime can load: {last_line(error)}"}
    shapes: dict[str, dict[str, list[int]]] = {}
    props = session.get_modelmeta().custom_metadata_map
    try:
        fed = _input_shape(session, props)
    except _Unfeedable as error:
        return {"error": str(error)}
    names = [output.name for output in session.get_outputs()]
    sizes, side = fed if fed is not None else ([], 0)
    for batch_size in sizes:
        zeros = np.zeros((batch_size, 3, side, side), np.float32)
        try:
            values = session.run(names, {session.get_inputs()[0].name: zeros})
        except Exception as error:  # onnxruntime's own, untyped
            return {"error": last_line(error), "batch_size": batch_size}
        shapes[str(batch_size)] = {
            name: list(np.shape(value)) for name, value in zip(names, values, strict=True)
        }
    # The memory one engine's session and calls take, as the budget counts a version's: the
    # OpenVINO run below, in the same process, would add its own copy of the weights.
    peak = max(0, _memory_bytes("VmHWM") - baseline)
    seconds = time.monotonic() - started
    refused = None
    if with_openvino and props.get("precision", "fp32") in ("fp32", "bf16") and fed is not None:
        refused = _openvino_refusal(data, session.get_inputs()[0].name, names, shapes, side)
    return {
        "declared": GraphDeclarations.of(session).as_json(),
        "metadata": props,
        "output_shapes": shapes,
        "peak_bytes": peak,
        "seconds": seconds,
        "openvino_refused": refused,
    }


def _openvino_refusal(
    data: bytes,
    input_name: str,
    names: list[str],
    shapes: dict[str, dict[str, list[int]]],
    side: int,
) -> str | None:
    """Why OpenVINO cannot run the file as onnxruntime just did (every output, each batch
    size, the same shapes), or None where it can."""
    import numpy as np

    try:
        calls = OpenVinoCalls(data, precision="fp32", streams=1, threads=1)
        for size, expected in shapes.items():
            zeros = np.zeros((int(size), 3, side, side), np.float32)
            values = calls.run(names, {input_name: zeros}, UNBOUNDED_HERE)
            got = {name: list(np.shape(v)) for name, v in zip(names, values, strict=True)}
            if got != expected:
                return f"its outputs' shapes {got} differ from onnxruntime's {expected}"
    except Exception as error:  # OpenVINO's own, untyped
        return last_line(error)
    return None


def main() -> None:
    """The child: the bytes its parent read and checked (`check_model_bytes`) on stdin."""
    print(json.dumps(_run_check(sys.stdin.buffer.read(), WITH_OPENVINO in sys.argv[1:])))


if __name__ == "__main__":
    main()
