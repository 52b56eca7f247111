"""What tracing costs: the server with tracing off, beside a build from before tracing existed;
with tracing on at 100% and at 10% sampling, exporting to a collector on loopback; and at 100%
with its collector down (nothing listens on the endpoint).

    python -m benchmarks.tracing_cost --baseline <commit>     # about 8 minutes on 2 cores

Five servers run side by side, each measured in turn in every round (every other round in the
reverse order) at 16 clients and at 1 client with raw 640x480 JPEG uploads; the clients send no
trace context, so the sampler decides at the root. The collector is an OTLP/HTTP receiver in a
process of its own (harness/otlp_receiver.py) that decodes every export. The result is the
median of the rounds, and of the rounds' ratios. Writes docs/tracing_cost.json.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.run import ROOT, SIZES, closed_loop, photos, resident_mb, start
from benchmarks.side_by_side import remove_worktree, this_commit, worktree, write_results
from harness.servers import free_port
from vit_tools.bench import Body, Report


def serve(cwd: Path, environment: dict[str, str]) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "service.cli", "--model", "models/shapes-vit.onnx"]
    env = {
        "VIT_PROVIDERS": '["CPUExecutionProvider"]',
        "VIT_GRPC_PORT": "0",
        "PYTHONPATH": str(cwd),
        **environment,
    }
    return url, start([*command, "--port", str(port)], env, url, cwd=cwd)


def measure(url: str, bodies: list[Body], concurrency: int, seconds: float) -> Report:
    closed_loop(url, bodies, concurrency, 1.0, "/v1/classify")  # warm-up
    return closed_loop(url, bodies, concurrency, seconds, "/v1/classify")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", required=True, help="a commit from before tracing")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    bodies: list[Body] = [(data, "image/jpeg") for data in photos(SIZES["640x480"])]
    collector = subprocess.Popen(
        [sys.executable, "-m", "harness.otlp_receiver"], stdout=subprocess.PIPE, cwd=ROOT
    )
    assert collector.stdout is not None
    endpoint = collector.stdout.readline().decode().strip()
    traced = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
    sampled_10 = {**traced, "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
    dead = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    with tempfile.TemporaryDirectory() as scratch:
        old = worktree(args.baseline, Path(scratch) / "baseline")
        servers: dict[str, tuple[str, subprocess.Popen[bytes]]] = {}
        try:
            servers["off"] = serve(ROOT, {})
            servers["off, baseline"] = serve(old, {})
            servers["on, 100%"] = serve(ROOT, traced)
            servers["on, 10%"] = serve(ROOT, sampled_10)
            servers["on, collector down"] = serve(ROOT, dead)
            rounds = []
            for number in range(args.rounds):
                result: dict[str, dict[str, float]] = {}
                order = list(servers.items())
                for name, (url, _) in order if number % 2 == 0 else reversed(order):
                    at_16 = measure(url, bodies, 16, args.seconds)
                    at_1 = measure(url, bodies, 1, args.seconds)
                    assert set(at_16.statuses) == {"200"} and set(at_1.statuses) == {"200"}, name
                    result[name] = {
                        "images_per_second_16": at_16.images_per_second,
                        "p50_ms_1": at_1.p50_ms,
                        "p99_ms_16": at_16.p99_ms,
                    }
                    print(f"{name:>18}: {at_16.line()}  |  {at_1.line()}", flush=True)
                rounds.append(result)
            memory = {name: resident_mb(process.pid) for name, (_, process) in servers.items()}
        finally:
            for _, process in servers.values():
                process.terminate()
                process.wait(timeout=30)
            collector.terminate()
            collector.wait(timeout=30)
            remove_worktree(old)

    def ratio(judged: str, baseline: str, key: str = "images_per_second_16") -> float:
        return statistics.median(r[judged][key] / r[baseline][key] for r in rounds)

    def spread(judged: str, baseline: str) -> list[float]:
        ratios = [
            r[judged]["images_per_second_16"] / r[baseline]["images_per_second_16"] for r in rounds
        ]
        return [round(min(ratios), 3), round(max(ratios), 3)]

    summary: dict[str, Any] = {
        "baseline": args.baseline,
        "this_tree": this_commit(),
        "medians": {
            name: {
                key: round(statistics.median(r[name][key] for r in rounds), 2)
                for key in ("images_per_second_16", "p50_ms_1", "p99_ms_16")
            }
            for name in servers
        },
        "ratios_16": {
            f"{judged} over {baseline}": [
                round(ratio(judged, baseline), 3),
                spread(judged, baseline),
            ]
            for judged, baseline in (
                ("off", "off, baseline"),
                ("on, 100%", "off"),
                ("on, 10%", "off"),
                ("on, collector down", "on, 100%"),
            )
        },
        "p50_ms_1_over_off": {
            name: round(ratio(name, "off", "p50_ms_1"), 3)
            for name in ("on, 100%", "on, 10%", "on, collector down")
        },
        "resident_mb": memory,
    }
    write_results("tracing_cost", rounds, summary)


if __name__ == "__main__":
    main()
