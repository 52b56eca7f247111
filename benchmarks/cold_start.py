"""What loading on demand costs a model's first request, against loading at start.

    python -m benchmarks.cold_start                        # imports a ViT-B/16 first (minutes)
    python -m benchmarks.cold_start --vit-b ViT-B-16.onnx  # one already imported

For the bundled model and a ViT-B/16 at 224 (imported from transformers, random weights, FP32),
each served alone from a repository: under VIT_MODEL_CONTROL=on_demand, the first request's
latency (the load: checks in a process of their own, the engine choice, the warm-up and the
self-test, then the answer) and the next request's; under none, the time from the server's
start to ready. Each measured `--runs` times on a fresh server; medians. Results go to
docs/cold-start.json and the table printed, which docs/REPOSITORY.md quotes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.run import DOCS, ROOT, photos
from benchmarks.side_by_side import this_commit
from harness.servers import served

BUNDLED = ROOT / "models" / "shapes-vit.onnx"


def repository(folder: Path, model: Path) -> Path:
    """A repository serving `model` as `model/1`."""
    version = folder / "repo" / "model" / "1"
    version.mkdir(parents=True)
    shutil.copyfile(model, version / "model.onnx")
    return folder / "repo"


def timed_classify(url: str, image: bytes) -> float:
    """Seconds for one classify request, answered 200."""
    request = urllib.request.Request(
        f"{url}/v1/models/model/classify",
        data=image,
        headers={"Content-Type": "image/jpeg"},
        method="POST",
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as answer:
        answer.read()
    return time.perf_counter() - started


def measure(model: Path, runs: int) -> dict[str, Any]:
    """On demand, the first and the next request; at start, the time to ready."""
    image = photos((640, 480), count=1)[0]
    first, warm, start = [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        repo = repository(Path(scratch), model)
        long = "600000"  # ms: the first request waits for the whole load
        for _ in range(runs):
            with served(
                repo, ROOT, timeout=600, model_control="on_demand", request_timeout_ms=long
            ) as server:
                first.append(timed_classify(server.url, image))
                warm.append(timed_classify(server.url, image))
            began = time.perf_counter()
            with served(repo, ROOT, timeout=600, model_control="none", request_timeout_ms=long):
                start.append(time.perf_counter() - began)
    return {
        "on_demand_first_request_s": statistics.median(first),
        "on_demand_next_request_s": statistics.median(warm),
        "none_start_to_ready_s": statistics.median(start),
        "runs": {"first": first, "next": warm, "start": start},
        "file_mb": model.stat().st_size / 2**20,
    }


def vit_b(folder: Path) -> Path:
    from benchmarks.int8 import imported_checkpoint
    from model_export.import_hf import import_hf

    checkpoint = imported_checkpoint(folder, "ViT-B/16", hidden=768, heads=12)
    path = folder / "ViT-B-16.onnx"
    report = import_hf(str(checkpoint), path)
    if not report.passed:
        raise SystemExit(f"the ViT-B/16 import failed: {report.line()}")
    return path


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| model | file | on_demand: first request | on_demand: next request "
        "| none: start to ready |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for title, r in results.items():
        lines.append(
            f"| {title} | {r['file_mb']:.0f} MB | {r['on_demand_first_request_s']:.2f} s "
            f"| {1000 * r['on_demand_next_request_s']:.0f} ms "
            f"| {r['none_start_to_ready_s']:.2f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vit-b", type=Path, help="a ViT-B/16 file vit-import hf wrote")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        big = args.vit_b or vit_b(Path(scratch))
        results = {
            "bundled shapes-vit": measure(BUNDLED, args.runs),
            "ViT-B/16 FP32 (imported)": measure(big, args.runs),
        }
    summary = {"commit": this_commit(), "runs": args.runs, "results": results}
    (DOCS / "cold-start.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
