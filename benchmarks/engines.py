"""Each engine and precision on this CPU, in-process and served, all in one run.

    python -m benchmarks.engines                # about 15 minutes on 2 cores
    python -m benchmarks.engines --seconds 10   # per load point (ViT-B gets 3x)

For the bundled model, a ViT-S/16 and a ViT-B/16 at 224 (imported from transformers, random
weights, 1,000 labels) in FP32, bf16 and int8: the in-process ceiling on onnxruntime and on
OpenVINO (two calls of 8 images at once, decoding overlapped, as benchmarks/run.py measures
it), a lone image in-process on each, then the service (VIT_ENGINE=auto, which chooses at
load) at 16 clients and at 1, and the naive FastAPI app beside each FP32 file. Results go to
docs/engines.json and docs/ENGINES-BENCHMARK.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.run import DOCS, ROOT, SIZES, photos, port_flag, start, sweep
from benchmarks.side_by_side import this_commit
from harness.servers import free_port
from model_runtime.openvino_engine import ONNXRUNTIME, OPENVINO, openvino_missing
from vit_tools.bench import ceiling, lone_image

CEILING_IMAGES = {"shapes-vit": 384, "ViT-S/16": 96, "ViT-B/16": 48}
"""Images per ceiling measurement: a few seconds each on 2 cores."""
SLOW = {"ViT-B/16"}
"""Models whose load points run three times as long: a few images a second."""


def imported(
    folder: Path, title: str, hidden: int, heads: int, refused: list[str]
) -> dict[str, Path]:
    """A ViT at 224 (random weights) imported in FP32, bf16 and int8, each through its gate;
    a precision whose gate refuses the random weights is left out, and its gate's line added
    to `refused`."""
    from benchmarks.int8 import imported_checkpoint
    from model_export.import_hf import import_hf

    checkpoint = imported_checkpoint(folder, title, hidden=hidden, heads=heads)
    files = {}
    for precision in ("FP32", "bf16", "int8"):
        path = folder / f"{title.replace('/', '-')}.{precision}.onnx"
        report = import_hf(
            str(checkpoint), path, int8=precision == "int8", bf16=precision == "bf16"
        )
        print(f"  {title} {precision}: {report.line()}", flush=True)
        if report.passed:
            files[precision] = path
        else:
            refused.append(f"{title} {precision}: {report.line()}")
    return files


def in_process(model: Path, images: list[bytes], count: int) -> dict[str, Any]:
    """Each engine's ceiling (two calls of 8 at once) and lone image, as benchmarks/run.py
    measures onnxruntime's."""
    engines = [ONNXRUNTIME] + ([OPENVINO] if openvino_missing() is None else [])
    results: dict[str, Any] = {}
    for engine in engines:
        (best,) = ceiling(
            model,
            images,
            threads=0,
            decode_threads=2,
            batch_sizes=[8],
            count=count,
            workers=2,
            engine=engine,
        )
        lone = lone_image(model, images, count=max(16, count // 8), spinning=True, engine=engine)
        print("   ", best.line(), "|", lone.line(), flush=True)
        results[engine] = {"ceiling": asdict(best), "lone": asdict(lone)}
    return results


def served(
    name: str,
    command: list[str],
    env: dict[str, str],
    images: list[bytes],
    seconds: float,
    route: str = "/v1/classify",
) -> dict[str, Any]:
    """A server at 16 clients, then at 1; for the service, what it chose at load."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ready = "/v1/models" if name == "kserve" else "/docs"
    process = start([*command, *port_flag(name, port)], env, url, ready)
    try:
        at_16, at_1 = (sweep(url, images, [clients], seconds, route)[0] for clients in (16, 1))
        result: dict[str, Any] = {"16": asdict(at_16), "1": asdict(at_1)}
        if name.startswith("service"):
            with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as response:
                (model,) = json.load(response)["models"]
            result["engine"] = model["runtime"]["engine"]
            result["precision"] = model["runtime"]["precision"]
            result["engine_choice"] = model["engine_choice"]
        return result
    finally:
        process.terminate()
        process.wait(timeout=30)


def measure(title: str, model: Path, precision: str, seconds: float) -> dict[str, Any]:
    images = photos(SIZES["640x480"])
    print(f"{title} {precision}", flush=True)
    result: dict[str, Any] = {"in_process": in_process(model, images, CEILING_IMAGES[title])}
    service = [sys.executable, "-m", "service.cli", "--model", str(model)]
    result["service"] = served(
        "service", service, {"VIT_PROVIDERS": '["CPUExecutionProvider"]'}, images, seconds
    )
    print(f"    service chose {result['service']['engine_choice']}", flush=True)
    if precision == "FP32":
        naive = [sys.executable, "-m", "uvicorn", "benchmarks.naive_app:app"]
        result["naive"] = served(
            "naive", [*naive, "--log-level", "warning"], {"VIT_MODEL": str(model)}, images, seconds
        )
    return result


def report(results: dict[str, Any], refused: list[str], command: str, commit: str) -> str:
    """docs/ENGINES-BENCHMARK.md: one row per file."""
    lines = [
        "# Engines and precisions (CPU)",
        "",
        f"Every figure on this page is from one run of `{command}` at commit {commit}",
        "(benchmarks/engines.py; raw results in [engines.json](engines.json)) on this project's",
        "2-core CPU reference machine. In-process: two calls of 8 images at once, decoding",
        "overlapped (images/s), and a lone image decoded and run (p50 ms). Served: the service",
        "with `VIT_ENGINE=auto`, which times both engines at load and keeps the faster, at 16",
        "clients and at 1 (closed loop, 640x480 JPEG over loopback); the naive FastAPI app",
        "(one onnxruntime call per request) beside each FP32 file. What the engines are and how",
        "the service chooses: [ENGINES.md](ENGINES.md).",
        "",
        "| file | onnxruntime img/s | OpenVINO img/s | lone ms (ort / ov) | served by "
        "| 16 clients img/s | p50 / p99 ms | 1 client p50 ms | naive 16 img/s | naive 1 p50 ms |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case, result in results.items():
        inside = result["in_process"]
        ort, ov = inside[ONNXRUNTIME], inside.get(OPENVINO)
        service = result["service"]
        naive = result.get("naive")
        lone = f"{ort['lone']['p50_ms']:.1f}" + (f" / {ov['lone']['p50_ms']:.1f}" if ov else "")
        cells = [
            case,
            f"{ort['ceiling']['images_per_second']:.1f}",
            f"{ov['ceiling']['images_per_second']:.1f}" if ov else "-",
            lone,
            f"{service['engine']} {service['precision']}",
            f"{service['16']['images_per_second']:.1f}",
            f"{service['16']['p50_ms']:.0f} / {service['16']['p99_ms']:.0f}",
            f"{service['1']['p50_ms']:.1f}",
            f"{naive['16']['images_per_second']:.1f}" if naive else "-",
            f"{naive['1']['p50_ms']:.1f}" if naive else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if refused:
        lines += ["", "Not written, their gate refusing the random weights:", ""]
        lines += [f"- {line}" for line in refused]
    lines += ["", "What the service measured at load for each file:", ""]
    lines += [f"- {case}: {result['service']['engine_choice']}" for case, result in results.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="per load point")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    refused: list[str] = []
    with tempfile.TemporaryDirectory() as scratch:
        models = {"shapes-vit": {"FP32": ROOT / "models" / "shapes-vit.onnx"}}
        models["ViT-S/16"] = imported(Path(scratch), "ViT-S/16", 384, 6, refused)
        models["ViT-B/16"] = imported(Path(scratch), "ViT-B/16", 768, 12, refused)
        for title, files in models.items():
            seconds = args.seconds * (3 if title in SLOW else 1)
            for precision, path in files.items():
                results[f"{title} {precision}"] = measure(title, path, precision, seconds)
    command = f"python -m benchmarks.engines --seconds {args.seconds:g}"
    DOCS.mkdir(exist_ok=True)
    (DOCS / "engines.json").write_text(
        json.dumps({"results": results, "refused": refused}, indent=2) + "\n"
    )
    (DOCS / "ENGINES-BENCHMARK.md").write_text(report(results, refused, command, this_commit()))
    print((DOCS / "ENGINES-BENCHMARK.md").read_text())


if __name__ == "__main__":
    main()
