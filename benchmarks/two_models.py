"""Two models served at once, each under load: how much of its alone-throughput each keeps.

    python -m benchmarks.two_models        # about 2 minutes on 2 cores

One server, a repository of two models (the bundled model under two names, so the shares are
comparable). Each round measures model A alone, model B alone, then both at once, 16 closed-loop
clients per model, the load generator in this process on the same cores. Writes
docs/REPOSITORY-LOAD.md and docs/two_models.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.run import DOCS, ROOT, SIZES, photos, start
from harness.servers import free_port
from vit_tools.bench import Report, load

MODELS = ("model-a", "model-b")
CLIENTS = 16


async def measure(
    url: str, images: list[bytes], names: tuple[str, ...], seconds: float
) -> list[Report]:
    bodies = [(data, "image/jpeg") for data in images]
    return list(
        await asyncio.gather(
            *(
                load(
                    url,
                    bodies,
                    concurrency=CLIENTS,
                    count=0,
                    duration=seconds,
                    rate=None,
                    progress=False,
                    route=f"/v1/models/{name}/classify",
                )
                for name in names
            )
        )
    )


def report(rounds: list[dict[str, Any]], shares: dict[str, float]) -> str:
    """docs/REPOSITORY-LOAD.md: each round's images/s alone and together, and the median shares."""
    lines = [
        "# Two models under load at once",
        "",
        "For a platform engineer serving several models from one replica: how much of its own",
        "throughput each of two models keeps while the other is under load too.",
        "",
        "Every figure is from one run of `python -m benchmarks.two_models` (written by",
        "benchmarks/two_models.py; raw results in [two_models.json](two_models.json)) on this",
        "project's 2-core CPU reference machine: one server, a repository of two models (the",
        "bundled model under two names), 640x480 JPEGs, 16 closed-loop clients per model (each",
        "sends its next request when its answer arrives), the load generator on the same 2 cores.",
        "Each round measures each model alone, then both at once; a model's share is its images/s",
        "together divided by its images/s alone. With the cores split evenly each would keep",
        "about half. The machine's speed drifts between measurements, so single rounds vary; the",
        "median over the rounds is the figure to read.",
        "",
        "| round | model | alone img/s | together img/s | share |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    for number, result in enumerate(rounds, 1):
        for name in MODELS:
            r = result[name]
            lines.append(
                f"| {number} | {name} | {r['alone']:.1f} | {r['together']:.1f} | {r['share']:.0%} |"
            )
    lines += [
        "",
        "Median shares: "
        + ", ".join(f"{name} {share:.0%}" for name, share in shares.items())
        + ".",
        "",
        "The kernel gives models under load equal shares of the cores, and a model with no",
        'traffic costs nothing ([REPOSITORY.md](REPOSITORY.md), "Sharing the machine"). A model',
        "that must keep more than its share while others are busy belongs in a replica of its own.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    images = photos(SIZES["640x480"])
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        repo = Path(scratch)
        for name in MODELS:
            (repo / name / "1").mkdir(parents=True)
            shutil.copy(ROOT / "models" / "shapes-vit.onnx", repo / name / "1" / "model.onnx")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "service.cli", "--model", str(repo), "--port", str(port)]
        process = start(command, {"VIT_PROVIDERS": '["CPUExecutionProvider"]'}, url)
        try:
            asyncio.run(measure(url, images, MODELS, 1.0))  # warm both
            for _ in range(args.rounds):
                alone = {
                    name: asyncio.run(measure(url, images, (name,), args.seconds))[0]
                    for name in MODELS
                }
                together = dict(
                    zip(
                        MODELS, asyncio.run(measure(url, images, MODELS, args.seconds)), strict=True
                    )
                )
                result = {
                    name: {
                        "alone": alone[name].images_per_second,
                        "together": together[name].images_per_second,
                        "share": together[name].images_per_second / alone[name].images_per_second,
                        "statuses": together[name].statuses,
                    }
                    for name in MODELS
                }
                print(json.dumps(result), flush=True)
                rounds.append(result)
        finally:
            process.terminate()
            process.wait(timeout=30)
    shares = {name: statistics.median(r[name]["share"] for r in rounds) for name in MODELS}
    DOCS.mkdir(exist_ok=True)
    (DOCS / "two_models.json").write_text(
        json.dumps({"rounds": rounds, "shares": shares}, indent=2) + "\n"
    )
    (DOCS / "REPOSITORY-LOAD.md").write_text(report(rounds, shares))
    print(json.dumps(shares, indent=2))


if __name__ == "__main__":
    main()
