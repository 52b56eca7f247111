"""Two variants of the service served side by side and measured in interleaved rounds.

Each round measures one variant, then the other, at 16 clients and at 1 client, with the load
generator in this process on the same cores (one server idle while the other is measured). The
result is the median of the rounds' ratios, since this machine's speed drifts by more than the
gaps measured.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks.run import DOCS, resident_mb, start
from harness.servers import free_port
from vit_tools.bench import Report, load

Variant = tuple[Path, dict[str, str]]
"""A model file and the environment the service runs it with."""


def measure(url: str, images: list[bytes], concurrency: int, seconds: float) -> Report:
    """One closed-loop run after a second of warm-up at the same concurrency."""
    bodies = [(data, "image/jpeg") for data in images]
    asyncio.run(
        load(url, bodies, concurrency=concurrency, count=0, duration=1.0, rate=None, progress=False)
    )
    return asyncio.run(
        load(
            url,
            bodies,
            concurrency=concurrency,
            count=0,
            duration=seconds,
            rate=None,
            progress=False,
        )
    )


def interleaved(
    urls: dict[str, str], images: list[bytes], rounds: int, seconds: float
) -> list[dict[str, Any]]:
    """Each round, each server in turn at 16 clients, then at 1: images/s and p50."""
    results: list[dict[str, Any]] = []
    for _ in range(rounds):
        result: dict[str, Any] = {}
        for name, url in urls.items():
            at_16 = measure(url, images, 16, seconds)
            at_1 = measure(url, images, 1, seconds)
            result[name] = {
                "images_per_second_16": at_16.images_per_second,
                "p50_ms_1": at_1.p50_ms,
            }
            print(f"{name:>18}: {at_16.line()}  |  {at_1.line()}", flush=True)
        results.append(result)
    return results


def compare(
    variants: dict[str, Variant], images: list[bytes], rounds: int, seconds: float, output: str
) -> dict[str, Any]:
    """Serve both `variants` (the first is the one judged), measure them in interleaved rounds
    and write the rounds and the medians of their ratios to docs/`output`."""
    urls, processes = {}, {}
    try:
        for name, (model, env) in variants.items():
            port = free_port()
            urls[name] = f"http://127.0.0.1:{port}"
            command = [sys.executable, "-m", "service.cli", "--model", str(model)]
            processes[name] = start([*command, "--port", str(port)], env, urls[name])
        results = interleaved(urls, images, rounds, seconds)
        memory = {name: resident_mb(process.pid) for name, process in processes.items()}
    finally:
        for process in processes.values():
            process.terminate()
            process.wait(timeout=30)
    judged, baseline = variants
    summary = {
        "throughput_ratio_16": statistics.median(
            r[judged]["images_per_second_16"] / r[baseline]["images_per_second_16"] for r in results
        ),
        "p50_difference_ms_1": statistics.median(
            r[judged]["p50_ms_1"] - r[baseline]["p50_ms_1"] for r in results
        ),
        "resident_mb": memory,
    }
    DOCS.mkdir(exist_ok=True)
    (DOCS / output).write_text(json.dumps({"rounds": results, "summary": summary}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary
