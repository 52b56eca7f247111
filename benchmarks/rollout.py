"""What the attention rollout output costs onnxruntime, in-process on the CPU, for the bundled
model at batch 1 and 8, side by side in one run:

    a  the classification graph alone (the file with its rollout stripped)
    b  the file with its rollout, asked for the classification output only
    c  the file with its rollout, asked for both outputs

    python -m benchmarks.rollout        # about 2 minutes

Each round times a, b and c in turn, call after call, so a slow moment of the shared machine
falls on all three; medians of the rounds are quoted. onnxruntime's profiler then says which
nodes ran in (b). Results go to docs/rollout.json; docs/EXPLAIN.md quotes them.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from model_export.rollout import ROLLOUT_OUTPUT, strip_rollout
from model_runtime.options import CPU
from model_runtime.session import default_thread_count

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "shapes-vit.onnx"
BATCH_SIZES = (1, 8)
ROUNDS = 15
SECONDS_PER_TIMING = 0.5
PROFILED_CALLS = 50


def session(model: bytes, *, profile: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = default_thread_count()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(model, options, providers=[CPU])


def images_per_second(run: Any, batch: np.ndarray) -> float:
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < SECONDS_PER_TIMING:
        run(batch)
        calls += 1
    return calls * len(batch) / (time.perf_counter() - start)


def rollout_work_in_classification(model: bytes, batch: np.ndarray) -> dict[str, float]:
    """When only the logits are asked for: how many rollout nodes still ran, of how many, and
    their share of the kernel time (onnxruntime's profiler, over PROFILED_CALLS calls)."""
    with tempfile.TemporaryDirectory() as folder:
        profiled = session(model, profile=str(Path(folder) / "profile"))
        for _ in range(PROFILED_CALLS):
            profiled.run(["logits"], {"pixel_values": batch})
        events = json.loads(Path(profiled.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    ours = [e for e in kernels if "attention_rollout" in e["name"]]
    return {
        "rollout_nodes_run": len({e["name"] for e in ours}),
        "nodes_run": len({e["name"] for e in kernels}),
        "rollout_share_of_kernel_time": round(
            sum(e["dur"] for e in ours) / sum(e["dur"] for e in kernels), 4
        ),
        "rollout_microseconds_per_call": round(sum(e["dur"] for e in ours) / PROFILED_CALLS, 1),
    }


def main() -> None:
    with_rollout = DEFAULT_MODEL.read_bytes()
    proto = onnx.load_from_string(with_rollout)
    strip_rollout(proto)
    plain = session(proto.SerializeToString())
    full = session(with_rollout)
    variants = {
        "a_plain": lambda b: plain.run(["logits"], {"pixel_values": b}),
        "b_rollout_graph_logits_only": lambda b: full.run(["logits"], {"pixel_values": b}),
        "c_rollout_graph_both": lambda b: full.run(["logits", ROLLOUT_OUTPUT], {"pixel_values": b}),
    }
    results: dict[str, Any] = {"threads": default_thread_count(), "rounds": ROUNDS}
    rng = np.random.default_rng(0)
    for batch_size in BATCH_SIZES:
        batch = rng.standard_normal((batch_size, 3, 128, 128)).astype(np.float32)
        for run in variants.values():
            run(batch)
        rates: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(ROUNDS):
            for name, run in variants.items():
                rates[name].append(images_per_second(run, batch))
        medians = {name: statistics.median(values) for name, values in rates.items()}
        spread = {
            name: [round(min(values), 1), round(max(values), 1)] for name, values in rates.items()
        }
        profile = rollout_work_in_classification(with_rollout, batch)
        results[f"batch_{batch_size}"] = {
            "images_per_second": {k: round(v, 1) for k, v in medians.items()},
            "min_max": spread,
            "b_profile": profile,
        }
        print(
            f"batch {batch_size}: "
            + ", ".join(f"{name} {rate:.1f} images/s" for name, rate in medians.items())
            + f"; (b) ran {profile['rollout_nodes_run']} rollout nodes of {profile['nodes_run']}, "
            f"{profile['rollout_share_of_kernel_time']:.1%} of the kernel time"
        )
    (ROOT / "docs" / "rollout.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
