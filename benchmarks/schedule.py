"""Large models on a CPU: the schedule the service chooses at load, against one image at a time on
every core, the naive app and KServe's ModelServer, in alternating rounds.

    python -m benchmarks.schedule                 # about 30 minutes on 2 cores
    python -m benchmarks.schedule --seconds 20    # per load point (ViT-B gets 2x)

For a ViT-S/16 and a ViT-B/16 at 224 (imported from transformers, random weights, FP32): each
server in turn at 16 clients and at 1 (closed loop, 640x480 JPEG over loopback), the whole
sequence repeated, so each server's rounds sit between the others'. The service runs twice:
as it chooses (VIT_INFERENCE_WORKERS=0), and held to one call of one image at a time on every
core (VIT_INFERENCE_WORKERS=1, VIT_MAX_BATCH_SIZE=1). Results go to docs/schedule.json and
docs/SCHEDULE-BENCHMARK.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.engines import served
from benchmarks.run import DOCS, SIZES, photos
from benchmarks.run import servers as run_servers
from benchmarks.side_by_side import this_commit

MODELS = {"ViT-S/16": (384, 6), "ViT-B/16": (768, 12)}
"""Imported at 224 with random weights: (hidden size, heads)."""
SLOW = {"ViT-B/16"}
"""Models whose load points run twice as long: a few images a second."""
ROUNDS = 2
ONE_AT_A_TIME = "service, one at a time"


def servers(model: Path) -> dict[str, tuple[list[str], dict[str, str], str]]:
    """(command, environment, route) of each server measured: benchmarks/run.py's (the
    service, the naive app, KServe where installed), and the service held to one call of one
    image at a time on every core."""
    listed = {name: (command, env, route) for name, command, env, route in run_servers(model)}
    service = listed.pop("service")
    command, env, route = service
    one_at_a_time = {**env, "VIT_INFERENCE_WORKERS": "1", "VIT_MAX_BATCH_SIZE": "1"}
    return {"service": service, ONE_AT_A_TIME: (command, one_at_a_time, route), **listed}


def imported(folder: Path, title: str, hidden: int, heads: int) -> Path:
    """A ViT at 224 (random weights, 1,000 labels) imported in FP32 through its gate."""
    from benchmarks.int8 import imported_checkpoint
    from model_export.import_hf import import_hf

    checkpoint = imported_checkpoint(folder, title, hidden=hidden, heads=heads)
    path = folder / f"{title.replace('/', '-')}.FP32.onnx"
    report = import_hf(str(checkpoint), path)
    if not report.passed:
        raise SystemExit(f"{title}: {report.line()}")
    return path


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model and server: the medians over rounds, and ratios to KServe and the naive app."""
    result: dict[str, Any] = {}
    for title in MODELS:
        runs = [r for r in rounds if r["model"] == title]
        rows: dict[str, Any] = {}
        for name in dict.fromkeys(r["server"] for r in runs):
            mine = [r for r in runs if r["server"] == name]
            rows[name] = {
                "images_per_second_16": statistics.median(
                    r["16"]["images_per_second"] for r in mine
                ),
                "p50_ms_16": statistics.median(r["16"]["p50_ms"] for r in mine),
                "p99_ms_16": statistics.median(r["16"]["p99_ms"] for r in mine),
                "p50_ms_1": statistics.median(r["1"]["p50_ms"] for r in mine),
                "rounds": len(mine),
            }
        for peer in ("kserve", "naive"):
            if peer in rows:
                for row in rows.values():
                    row[f"vs_{peer}_16"] = (
                        row["images_per_second_16"] / rows[peer]["images_per_second_16"]
                    )
        result[title] = rows
    return result


def report(rounds: list[dict[str, Any]], table: dict[str, Any], command: str) -> str:
    lines = [
        "# Large models on a CPU: the service's schedule against its peers",
        "",
        f"Every figure on this page is from one run of `{command}` at commit {this_commit()}",
        "(benchmarks/schedule.py; raw results in [schedule.json](schedule.json)) on this",
        "project's 2-core CPU machine. Each server in turn, at 16 clients and then at 1 (closed",
        "loop, 640x480 JPEG over loopback), the whole sequence repeated "
        f"{ROUNDS} times; medians over the rounds.",
        "`service` is the service as it schedules itself at load; `service, one at a time` is",
        "the same service held to one call of one image at a time on every core",
        "(`VIT_INFERENCE_WORKERS=1`, `VIT_MAX_BATCH_SIZE=1`). What the schedule is and how it is",
        "chosen: [ENGINES.md](ENGINES.md).",
        "",
    ]
    for title, rows in table.items():
        lines += [
            f"## {title} FP32 (imported, random weights)",
            "",
            "| server | 16 clients img/s | p50 / p99 ms | p99 / p50 | vs KServe | vs naive "
            "| 1 client p50 ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, row in rows.items():
            lines.append(
                f"| {name} | {row['images_per_second_16']:.2f} | {row['p50_ms_16']:.0f} / "
                f"{row['p99_ms_16']:.0f} | {row['p99_ms_16'] / row['p50_ms_16']:.2f} | "
                f"{row.get('vs_kserve_16', float('nan')):.2f}x | "
                f"{row.get('vs_naive_16', float('nan')):.2f}x | {row['p50_ms_1']:.0f} |"
            )
        choices = [
            r["engine_choice"] for r in rounds if r["model"] == title and r["server"] == "service"
        ]
        lines += ["", "What the service measured at load and chose, each round:", ""]
        lines += [f"- {choice}" for choice in choices]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="per load point")
    args = parser.parse_args()
    rounds: list[dict[str, Any]] = []
    images = photos(SIZES["640x480"])
    with tempfile.TemporaryDirectory() as scratch:
        files = {
            title: imported(Path(scratch), title, hidden, heads)
            for title, (hidden, heads) in MODELS.items()
        }
        for title, model in files.items():
            seconds = args.seconds * (2 if title in SLOW else 1)
            for index in range(ROUNDS):
                for name, (command, env, route) in servers(model).items():
                    print(f"{title}, round {index + 1}: {name}", flush=True)
                    result = served(name, command, env, images, seconds, route)
                    rounds.append({"model": title, "server": name, "round": index} | result)
    table = summary(rounds)
    DOCS.mkdir(exist_ok=True)
    (DOCS / "schedule.json").write_text(
        json.dumps({"rounds": rounds, "summary": table}, indent=2) + "\n"
    )
    invoked = "python -m benchmarks.schedule" + (
        f" --seconds {args.seconds:g}" if args.seconds != 15.0 else ""
    )
    (DOCS / "SCHEDULE-BENCHMARK.md").write_text(report(rounds, table, invoked))
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
