"""The service, the in-process ceiling and the naive baseline, measured side by side.

    python -m benchmarks.run            # about 15 minutes on 2 cores
    python -m benchmarks.run --quick    # fewer concurrencies, shorter runs

Everything runs on this machine over loopback: the servers as subprocesses, the load generator
(vit_tools.bench) in this process. Results go to docs/benchmarks.json, docs/BENCHMARKS.md and
docs/benchmarks.png.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from harness.servers import free_port
from model_export import shapes
from vit_tools.bench import Body, Report, ceiling, load, lone_image

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SIZES = {"640x480": (640, 480), "1920x1080": (1920, 1080)}
PAIRED_ROUNDS = 3
CEILING_IMAGES = 384  # a whole number of batches of 32 for each of two workers


def photos(size: tuple[int, int], count: int = 32) -> list[bytes]:
    """shapes pictures scaled to a camera-like size, as JPEG at quality 90."""
    result = []
    for index in range(count):
        image, _ = shapes.render(seed=4242, index=index)
        buffer = io.BytesIO()
        image.resize(size).save(buffer, format="JPEG", quality=90)
        result.append(buffer.getvalue())
    return result


SPEED_ONLY_CALIBRATION_IMAGES = 200
"""Shapes a random-weight file's out-of-distribution score is calibrated on: its flag means
nothing, and at 224 pixels the export's 2,000 kept a 2-core machine busy for more than 8
minutes, where with 200 the whole export takes about a minute."""


def random_vit_ti_224(path: Path) -> Path:
    """A ViT-Ti/16 at 224x224 with random weights (speed only), exported like the real model."""
    import torch

    from model_contract.preprocess import PreprocessSpec
    from model_export.checkpoint import Checkpoint
    from model_export.export import export
    from model_export.vit import VisionTransformer, preset

    config = preset("tiny", image_size=224, num_classes=len(shapes.LABELS))
    torch.manual_seed(0)
    model = VisionTransformer(config)
    checkpoint = Checkpoint(
        state_dict=model.state_dict(),
        config=config,
        labels=list(shapes.LABELS),
        preprocessing=PreprocessSpec(input_size=224),
        name="vit-ti-224-random",
        dataset={"name": "none: random weights"},
    )
    checkpoint_path = path.with_suffix(".pt")
    checkpoint.save(checkpoint_path)
    export(
        checkpoint_path,
        path,
        version="0",
        eval_seed=1,
        eval_count=0,
        calibration_count=SPEED_ONLY_CALIBRATION_IMAGES,
    )
    return path


def start(
    command: list[str],
    env: dict[str, str],
    url: str,
    ready_path: str = "/docs",
    cwd: Path = ROOT,
) -> subprocess.Popen[bytes]:
    """Start a server and wait until it answers (and, for vit-serve, until it is ready). Each
    vit-serve gets a gRPC port of its own unless `env` names one: servers run side by side."""
    if "service.cli" in command:
        env = {"VIT_GRPC_PORT": str(free_port()), **env}
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}{ready_path}", timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError(f"{command} did not start") from None
            time.sleep(0.2)
    if "service.cli" in command:  # wait for the warm-up too
        while True:
            try:
                with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
    return process


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def sweep(
    url: str,
    images: list[bytes],
    concurrencies: list[int],
    seconds: float,
    route: str = "/v1/classify",
) -> list[Report]:
    bodies: list[Body] = [(data, "image/jpeg") for data in images]
    reports = []
    for concurrency in concurrencies:
        report = closed_loop(url, bodies, concurrency, seconds, route)
        print("   ", report.line(), flush=True)
        reports.append(report)
    return reports


def closed_loop(
    url: str, bodies: Sequence[Body], concurrency: int, seconds: float, route: str
) -> Report:
    """`concurrency` clients for `seconds`, after a second that warms the connections and the
    server."""
    for duration in (1.0, seconds):
        report = asyncio.run(
            load(
                url,
                bodies,
                concurrency=concurrency,
                count=0,
                duration=duration,
                rate=None,
                progress=False,
                route=route,
            )
        )
    return report


def best_ceiling(model: Path, images: list[bytes], count: int = CEILING_IMAGES) -> Report:
    """The best the machine does in-process: batches of 8 to 32 (smaller ones never won),
    onnxruntime's busy-wait on and off, one call at a time or two."""
    return max(
        (
            report
            for spinning in (False, True)
            for workers in (1, 2)
            for report in ceiling(
                model,
                images,
                threads=0,
                decode_threads=2,
                batch_sizes=[8, 16, 32],
                count=count,
                spinning=spinning,
                workers=workers,
            )
        ),
        key=lambda r: r.images_per_second,
    )


def ceiling_again(
    model: Path, images: list[bytes], best: Report, count: int = CEILING_IMAGES
) -> Report:
    """The best configuration found, measured once more."""
    (report,) = ceiling(
        model,
        images,
        threads=0,
        decode_threads=2,
        batch_sizes=[best.batch_size or 1],
        count=count,
        spinning=best.mode.endswith("+spin"),
        workers=best.concurrency,
    )
    return report


def single_image(model: Path, images: list[bytes]) -> Report:
    """A lone image's in-process time, bytes to probabilities, the faster of busy-wait on and
    off."""
    return min(
        (lone_image(model, images, count=200, spinning=spinning) for spinning in (False, True)),
        key=lambda r: r.p50_ms,
    )


def paired_rounds(
    url: str,
    model: Path,
    images: list[bytes],
    best: Report,
    seconds: float,
    count: int = CEILING_IMAGES,
) -> list[dict[str, float]]:
    """The two targets' measurements in adjacent pairs, several times: the ceiling next to the
    service at 16 clients, a lone image in-process next to the service at 1 client. This
    machine's speed drifts by more than the gaps measured, so only adjacent runs compare."""
    rounds = []
    for _ in range(PAIRED_ROUNDS):
        ceiling_now = ceiling_again(model, images, best, count)
        (at_16,) = sweep(url, images, [16], seconds)
        single = single_image(model, images)
        (at_1,) = sweep(url, images, [1], seconds)
        rounds.append(
            {
                "ceiling": ceiling_now.images_per_second,
                "service_16": at_16.images_per_second,
                "service_vs_ceiling": at_16.images_per_second / ceiling_now.images_per_second,
                "single_image_ms": single.p50_ms,
                "service_1_p50_ms": at_1.p50_ms,
                "c1_overhead_ms": at_1.p50_ms - single.p50_ms,
            }
        )
    return rounds


def measure(
    model: Path,
    images: list[bytes],
    concurrencies: list[int],
    seconds: float,
    ceiling_images: int = CEILING_IMAGES,
) -> dict[str, Any]:
    best = best_ceiling(model, images, ceiling_images)
    single = single_image(model, images)
    print("   ", best.line(), f"(batch {best.batch_size})", flush=True)
    results: dict[str, Any] = {"ceiling": asdict(best), "single_image_ms": single.p50_ms}
    for name, command, env, route in servers(model):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        print(f"  {name}", flush=True)
        ready = "/docs" if name != "kserve" else "/v1/models"
        process = start([*command, *port_flag(name, port)], env, url, ready)
        try:
            reports = sweep(url, images, concurrencies, seconds, route)
            results[name] = {
                "runs": [asdict(r) for r in reports],
                "resident_mb": resident_mb(process.pid),
            }
            if name == "service":
                print("  paired rounds", flush=True)
                results["paired"] = paired_rounds(url, model, images, best, seconds, ceiling_images)
        finally:
            process.terminate()
            process.wait(timeout=30)
    return results


def servers(model: Path) -> list[tuple[str, list[str], dict[str, str], str]]:
    """(name, command, environment, route) of each server measured: the service, the naive
    app, and KServe's ModelServer where kserve is installed (the bench extra)."""
    listed = [
        (
            "service",
            [sys.executable, "-m", "service.cli", "--model", str(model)],
            {"VIT_PROVIDERS": '["CPUExecutionProvider"]'},
            "/v1/classify",
        ),
        (
            "naive",
            [sys.executable, "-m", "uvicorn", "benchmarks.naive_app:app", "--log-level", "warning"],
            {"VIT_MODEL": str(model)},
            "/v1/classify",
        ),
    ]
    if importlib.util.find_spec("kserve") is not None:
        from benchmarks import kserve_app

        listed.append(
            (
                "kserve",
                [sys.executable, "-m", "benchmarks.kserve_app"],
                {"VIT_MODEL": str(model)},
                kserve_app.ROUTE,
            )
        )
    else:
        print("kserve is not installed: no KServe row (pip install -e '.[bench]')")
    return listed


def port_flag(name: str, port: int) -> list[str]:
    return ["--http_port", str(port)] if name == "kserve" else ["--port", str(port)]


def ratio(results: dict[str, Any], concurrency: int) -> dict[str, float]:
    """The targets' figures: medians of the paired rounds; the naive ratio from the sweeps."""

    def at(name: str) -> dict[str, Any]:
        return next(r for r in results[name]["runs"] if r["concurrency"] == concurrency)

    paired = results["paired"]
    ratios = {
        "service_vs_ceiling": statistics.median(r["service_vs_ceiling"] for r in paired),
        "c1_overhead_ms": statistics.median(r["c1_overhead_ms"] for r in paired),
        "service_vs_naive": at("service")["images_per_second"] / at("naive")["images_per_second"],
    }
    if "kserve" in results:
        service = at("service")["images_per_second"]
        ratios["service_vs_kserve"] = service / at("kserve")["images_per_second"]
    return ratios


def plot(all_results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(all_results)
    figure, axes = plt.subplots(2, len(cases), figsize=(4.5 * len(cases), 7), squeeze=False)
    for column, case in enumerate(cases):
        results = all_results[case]
        for name, style in (("service", "-o"), ("naive", "--s"), ("kserve", "-.^")):
            if name not in results:
                continue
            runs = results[name]["runs"]
            x = [r["concurrency"] for r in runs]
            axes[0][column].plot(x, [r["images_per_second"] for r in runs], style, label=name)
            axes[1][column].plot(x, [r["p99_ms"] for r in runs], style, label=name)
        axes[0][column].axhline(
            results["ceiling"]["images_per_second"],
            color="grey",
            linestyle=":",
            label="in-process ceiling",
        )
        axes[0][column].set_title(case, fontsize=9)
        for row, label in ((0, "images/s"), (1, "p99 latency (ms)")):
            axes[row][column].set_xscale("log", base=2)
            axes[row][column].set_xlabel("concurrent clients")
            axes[row][column].set_ylabel(label)
            axes[row][column].grid(alpha=0.3)
        axes[1][column].set_yscale("log")
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def peers(results: dict[str, Any]) -> list[str]:
    return [name for name in ("service", "naive", "kserve") if name in results]


def in_process_setup(mode: str) -> str:
    """A ceiling's mode (`ceiling w2+spin`) in words."""
    workers = int(mode.removeprefix("ceiling w").split("+")[0])
    calls = f"{workers} onnxruntime calls at once" if workers > 1 else "one call at a time"
    return calls + (", busy-wait on" if mode.endswith("+spin") else "")


def report(all_results: dict[str, Any], command: str) -> str:
    """docs/BENCHMARKS.md: per case, the in-process figures, then each server per concurrency."""
    lines = [
        "# Benchmarks (CPU)",
        "",
        "For anyone comparing this service with another model server, or sizing a CPU deployment:",
        "images/s and latency of the service, a plain FastAPI app and KServe's ModelServer serving",
        "the same model file, beside what the model does in-process. What the figures mean, where",
        "the service is slower, and which settings move them:",
        "[BENCHMARKS-analysis.md](BENCHMARKS-analysis.md).",
        "",
        f"Every figure on this page is from one run of `{command}` (written by",
        "benchmarks/run.py; raw results in [benchmarks.json](benchmarks.json)) on this project's",
        "2-core CPU reference machine.",
        "",
        "- Load: `vit_tools.bench`, a closed loop (each client sends its next request when its",
        "  answer arrives), raw JPEG bodies to `/v1/classify`, over loopback on the same two cores",
        "  as the server.",
        "- In-process throughput (the plot's \"in-process ceiling\"): the model's own images/s",
        "  with no HTTP: the same decoding, preprocessing and onnxruntime session in one process,",
        "  decoding the next batch while the current one runs; the best of batch sizes 8, 16 and",
        "  32, onnxruntime's busy-wait on and off, and one or two onnxruntime calls at once. A",
        "  lone image in-process: one image decoded, then run, nothing overlapped.",
        "- Measured three times, alternately: this machine's speed drifts between minutes by",
        "  more than the gaps measured, so the in-process throughput and the service at 16",
        "  clients were measured one after the other, three times over, and so were a lone image",
        "  in-process and the service at 1 client. The figure is the median of the three; each",
        "  one is in brackets.",
        "- Naive: `benchmarks/naive_app.py`, plain FastAPI, one onnxruntime call per request.",
        "- KServe: `benchmarks/kserve_app.py`, KServe's Python ModelServer with its defaults,",
        "  the same model, decoding and preprocessing in a thread per request (an async",
        "  `predict`), the raw body to its v1 predict route.",
        "- The ratios to the naive app and KServe are those of the tables' rows at 16 clients.",
        "",
        "![throughput and p99 against concurrency](benchmarks.png)",
        "",
    ]
    for case, results in all_results.items():
        best = results["ceiling"]
        ratios = results["ratios_at_16"]
        paired = results["paired"]
        to_ceiling = ", ".join(f"{r['service_vs_ceiling']:.0%}" for r in paired)
        overheads = ", ".join(
            f"{r['service_1_p50_ms']:.1f} vs {r['single_image_ms']:.1f}" for r in paired
        )
        against = f"**{ratios['service_vs_naive']:.2f}x** the naive app's images/s"
        if "service_vs_kserve" in ratios:
            against += f" and **{ratios['service_vs_kserve']:.2f}x** KServe's"
        if min(ratios["service_vs_naive"], ratios.get("service_vs_kserve", 1.0)) < 1:
            against += " (below 1x: the service is slower)"
        lines += [
            f"## {case}",
            "",
            f"- In-process throughput: **{best['images_per_second']:.1f} images/s**"
            f" ({in_process_setup(best['mode'])}, batch {best['batch_size']}); a lone image"
            f" in-process: {results['single_image_ms']:.2f} ms (p50).",
            f"- At 16 clients the service serves **{ratios['service_vs_ceiling']:.0%}** of the"
            f" in-process throughput ({to_ceiling}), {against}.",
            f"- At 1 client the service's p50 is **{ratios['c1_overhead_ms']:.1f} ms** above a lone"
            f" image in-process (service vs in-process p50 ms: {overheads}).",
            "- Resident memory after the sweep: "
            + ", ".join(f"{name} {results[name]['resident_mb']:.0f} MB" for name in peers(results))
            + ".",
        ]
        header = " | ".join(f"{name} img/s | p50 ms | p99 ms" for name in peers(results))
        lines += [
            "",
            f"| clients | {header} |",
            "| ---: |" + " ---: | ---: | ---: |" * len(peers(results)),
        ]
        for index, run in enumerate(results["service"]["runs"]):
            cells = []
            for name in peers(results):
                other = results[name]["runs"][index]
                cells.append(
                    f"{other['images_per_second']:.1f} | {other['p50_ms']:.1f} | "
                    f"{other['p99_ms']:.1f}"
                )
            lines.append(f"| {run['concurrency']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


VIT_B_CEILING_IMAGES = 64
"""ViT-B/16 does ~5-10 images/s on 2 cores: a ceiling of 64 images is ~10 s per configuration."""


def imported_vit_b16(folder: Path) -> dict[str, Path]:
    """A ViT-B/16 at 224 (random weights, 1,000 labels) imported in FP32 and int8."""
    from benchmarks.int8 import imported_checkpoint
    from model_export.import_hf import import_hf

    checkpoint = imported_checkpoint(folder, "vit-b16", hidden=768, heads=12)
    files = {"FP32": folder / "vit-b16.fp32.onnx", "int8": folder / "vit-b16.int8.onnx"}
    for precision, path in files.items():
        report = import_hf(str(checkpoint), path, int8=precision == "int8")
        if not report.passed:
            raise SystemExit(f"ViT-B/16 {precision}: {report.line()}")
    return files


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--vit-b", action="store_true", help="add ViT-B/16 224 rows, FP32 and int8 (slow)"
    )
    parser.add_argument(
        "--seconds", type=float, help="per load point (default 5, or 2 with --quick)"
    )
    args = parser.parse_args()
    concurrencies = [1, 4, 16, 64] if args.quick else [1, 2, 4, 8, 16, 32, 64]
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    models = {"shapes-vit (128px, depth 6)": ROOT / "models" / "shapes-vit.onnx"}
    with tempfile.TemporaryDirectory() as scratch:
        try:
            models["ViT-Ti/16 224px (depth 12)"] = random_vit_ti_224(Path(scratch) / "ti224.onnx")
        except ImportError:
            print("torch is not installed: skipping the 224px ViT-Ti (pip install -e '.[export]')")
        all_results: dict[str, Any] = {}
        for model_name, model in models.items():
            for size_name, size in SIZES.items():
                case = f"{model_name}, {size_name} JPEG"
                print(case, flush=True)
                all_results[case] = measure(model, photos(size), concurrencies, seconds)
                all_results[case]["ratios_at_16"] = ratio(all_results[case], 16)
        if args.vit_b:
            for precision, model in imported_vit_b16(Path(scratch)).items():
                case = f"ViT-B/16 224px {precision} (imported, random weights), 640x480 JPEG"
                print(case, flush=True)
                all_results[case] = measure(
                    model, photos(SIZES["640x480"]), [1, 4, 16], seconds, VIT_B_CEILING_IMAGES
                )
                all_results[case]["ratios_at_16"] = ratio(all_results[case], 16)
    DOCS.mkdir(exist_ok=True)
    (DOCS / "benchmarks.json").write_text(json.dumps(all_results, indent=2) + "\n")
    plot(all_results, DOCS / "benchmarks.png")
    command = (
        "python -m benchmarks.run"
        + (" --quick" if args.quick else "")
        + (" --vit-b" if args.vit_b else "")
        + (f" --seconds {args.seconds:g}" if args.seconds else "")
    )
    (DOCS / "BENCHMARKS.md").write_text(report(all_results, command))
    print(json.dumps({case: r["ratios_at_16"] for case, r in all_results.items()}, indent=2))


if __name__ == "__main__":
    main()
