"""uvicorn's HTTP stacks A/B: httptools + uvloop against h11 + asyncio, in interleaved pairs.

    python -m benchmarks.http_stack            # about 3 minutes on 2 cores

Both servers run side by side (one idle while the other is measured), the load generator in
this process on the same cores. Each round measures one stack then the other at 16 clients and
at 1 client; the result is the median of the rounds' ratios, since this machine's speed drifts
by more than the gaps measured. Writes docs/http_stack.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from typing import Any

from benchmarks.run import DOCS, ROOT, SIZES, photos, resident_mb, start
from tests.service_support import free_port
from vit_tools.bench import Report, load

STACKS = {"httptools+uvloop": ("httptools", "uvloop"), "h11+asyncio": ("h11", "asyncio")}


def measure(url: str, images: list[bytes], concurrency: int, seconds: float) -> Report:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    model = ROOT / "models" / "shapes-vit.onnx"
    images = photos(SIZES["640x480"])
    urls, processes = {}, {}
    for name, (http_parser, loop) in STACKS.items():
        port = free_port()
        urls[name] = f"http://127.0.0.1:{port}"
        env = {
            "VIT_PROVIDERS": '["CPUExecutionProvider"]',
            "VIT_HTTP_PARSER": http_parser,
            "VIT_EVENT_LOOP": loop,
        }
        command = [sys.executable, "-m", "service.cli", "--model", str(model)]
        processes[name] = start([*command, "--port", str(port)], env, urls[name])
    try:
        rounds = interleaved(urls, images, args.rounds, args.seconds)
        memory = {name: resident_mb(process.pid) for name, process in processes.items()}
    finally:
        for process in processes.values():
            process.terminate()
            process.wait(timeout=30)
    fast, plain = STACKS
    summary = {
        "throughput_ratio_16": statistics.median(
            r[fast]["images_per_second_16"] / r[plain]["images_per_second_16"] for r in rounds
        ),
        "p50_difference_ms_1": statistics.median(
            r[fast]["p50_ms_1"] - r[plain]["p50_ms_1"] for r in rounds
        ),
        "resident_mb": memory,
    }
    DOCS.mkdir(exist_ok=True)
    (DOCS / "http_stack.json").write_text(
        json.dumps({"rounds": rounds, "summary": summary}, indent=2) + "\n"
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
