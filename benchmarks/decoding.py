"""Throughput at 16 clients with decoding in worker processes, against a revision that decodes
in a thread pool, measured in adjacent pairs (this machine's speed drifts between minutes).

    git archive <revision> | tar -x -C /tmp/base
    python -m benchmarks.decoding --baseline /tmp/base    # about 3 minutes on 2 cores

More `--rounds` give a steadier median where other work shares the cores.

Both servers run from this virtual environment, each from its own tree, with default settings.
Results go to docs/decoding.json; docs/RELIABILITY.md quotes them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.run import photos
from harness.servers import served
from vit_tools.bench import Report, load

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "shapes-vit.onnx"
ROUNDS = 3
SIZES = {"640x480": (640, 480), "1920x1080": (1920, 1080)}


def measure(tree: Path, images: list[bytes], seconds: float) -> Report:
    """16 clients for `seconds` against a server started from `tree`, after a 2 s warm-up."""
    bodies = [(image, "image/jpeg") for image in images]
    with served(MODEL, tree) as server:
        options: dict[str, Any] = {"concurrency": 16, "count": 0, "rate": None, "progress": False}
        asyncio.run(load(server.url, bodies, duration=2, **options))
        return asyncio.run(load(server.url, bodies, duration=seconds, **options))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baseline", type=Path, required=True, help="tree decoding in threads")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="adjacent pairs per size")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    for size_name, size in SIZES.items():
        images = photos(size)
        rounds = []
        for _ in range(args.rounds):
            threads = measure(args.baseline, images, args.seconds)
            workers = measure(ROOT, images, args.seconds)
            print(f"{size_name} threads  {threads.line()}", flush=True)
            print(f"{size_name} workers  {workers.line()}", flush=True)
            rounds.append({"threads": asdict(threads), "workers": asdict(workers)})
        ratios = [
            r["workers"]["images_per_second"] / r["threads"]["images_per_second"] for r in rounds
        ]
        results[size_name] = {
            "rounds": rounds,
            "threads_images_per_second_median": statistics.median(
                r["threads"]["images_per_second"] for r in rounds
            ),
            "workers_images_per_second_median": statistics.median(
                r["workers"]["images_per_second"] for r in rounds
            ),
            "workers_vs_threads_median": statistics.median(ratios),
        }
        print(size_name, {k: v for k, v in results[size_name].items() if k != "rounds"})
    out = ROOT / "docs" / "decoding.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
