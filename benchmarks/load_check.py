"""What treating a model file as untrusted costs at load: the byte checks and the load check's
process, against the session the server builds, side by side for each file.

    python -m benchmarks.load_check            # the bundled model, a ViT-S/16 and a ViT-B/16

For each file, `ROUNDS` rounds of: reading and checking the bytes (`read_model_file`), the first
session and inferences in their own process (`check_in_a_process`), and the server's own
session (`ModelSession` less the check, as before it existed: onnxruntime given the bytes).
Medians go to docs/load_check.json and are quoted in docs/SECURITY.md.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort

from benchmarks.int8 import imported_checkpoint
from model_runtime.load_check import check_in_a_process
from model_runtime.model_file import read_model_file
from model_runtime.options import CPU, IN_PROCESS

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 5


def seconds(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def measure(path: Path) -> dict[str, Any]:
    """Median seconds of each stage over ROUNDS rounds, interleaved."""
    bound = IN_PROCESS.max_metadata_bytes
    data = read_model_file(path, max_metadata_bytes=bound).data
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    work: dict[str, Callable[[], object]] = {
        "bytes": lambda: read_model_file(path, max_metadata_bytes=bound),
        "check_process": lambda: check_in_a_process(data, IN_PROCESS),
        "session": lambda: ort.InferenceSession(data, options, providers=[CPU]),
    }
    stages: dict[str, list[float]] = {stage: [] for stage in work}
    for _ in range(ROUNDS):
        for stage, run in work.items():
            stages[stage].append(seconds(run))
    medians = {stage: statistics.median(values) for stage, values in stages.items()}
    return {
        "file_mb": round(path.stat().st_size / 1e6, 1),
        "median_s": {stage: round(value, 3) for stage, value in medians.items()},
        "checks_over_session": round(
            (medians["bytes"] + medians["check_process"]) / medians["session"], 2
        ),
    }


def main() -> None:
    results: dict[str, Any] = {"rounds": ROUNDS}
    results["bundled shapes-vit"] = measure(ROOT / "models" / "shapes-vit.onnx")
    with tempfile.TemporaryDirectory() as scratch:
        from model_export.import_hf import import_hf

        for title, hidden, heads in (("ViT-S/16", 384, 6), ("ViT-B/16", 768, 12)):
            checkpoint = imported_checkpoint(Path(scratch), title, hidden=hidden, heads=heads)
            model = Path(scratch) / f"{checkpoint.name}.onnx"
            report = import_hf(str(checkpoint), model)
            if not report.passed:
                raise SystemExit(f"{title}: {report.line()}")
            results[f"{title} 224 (random weights, 1,000 labels)"] = measure(model)
    (ROOT / "docs" / "load_check.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
