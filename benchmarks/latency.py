"""One image at a time: p50 latency over HTTP (a real uvicorn) against the same work in-process.

    python benchmarks/latency.py --model models/shapes-vit.onnx --requests 300

Writes docs/latency.json. In-process = shared preprocessing + onnxruntime on the same bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request
from pathlib import Path

from model_export import shapes
from service.preprocess import preprocess
from service.session import CPU, ModelSession
from tests.conftest import ROOT
from tests.service_support import running_server


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "shapes-vit.onnx")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "latency.json")
    args = parser.parse_args()
    images = [shapes.sample(2024, i).data for i in range(32)]

    session = ModelSession(args.model, providers=(CPU,))
    spec = session.metadata.preprocessing
    in_process = []
    for i in range(args.requests):
        started = time.perf_counter()
        session.predict(preprocess(images[i % len(images)], spec))
        in_process.append((time.perf_counter() - started) * 1000)

    over_http = []
    with running_server(args.model, ROOT) as url:
        for i in range(args.requests):
            request = urllib.request.Request(
                f"{url}/v1/classify",
                data=images[i % len(images)],
                headers={"Content-Type": "image/jpeg"},
            )
            started = time.perf_counter()
            with urllib.request.urlopen(request) as response:
                response.read()
            over_http.append((time.perf_counter() - started) * 1000)

    result = {
        "requests": args.requests,
        "in_process_ms": {"p50": statistics.median(in_process), "p90": percentile(in_process, 0.9)},
        "http_ms": {"p50": statistics.median(over_http), "p90": percentile(over_http, 0.9)},
    }
    result["http_overhead_p50_ms"] = result["http_ms"]["p50"] - result["in_process_ms"]["p50"]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
