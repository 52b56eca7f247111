"""What the attention rollout and the out-of-distribution score cost plain classification: the
bundled model as shipped (both outputs computed on every call) against the same graph cut down
to the classification output alone, both served, /v1/classify measured in interleaved rounds.

    python -m benchmarks.explain_cost            # about 3 minutes on 2 cores

Both servers run side by side (one idle while the other is measured); each round measures one
then the other at 16 clients and at 1 client, and the result is the median of the rounds'
ratios. Writes docs/explain_cost.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import onnx
from onnx import helper

from benchmarks.http_stack import interleaved
from benchmarks.run import DOCS, ROOT, SIZES, photos, start
from model_export.ood_features import strip_ood_score
from model_export.rollout import strip_rollout
from tests.service_support import free_port

MODEL = ROOT / "models" / "shapes-vit.onnx"


def classification_only(model: Path, output: Path) -> Path:
    """`model` without what export appended to it (the rollout, the score the graph computes):
    the graph it was traced to, node for node; its metadata kept, less those two."""
    proto = onnx.load(str(model))
    strip_rollout(proto)
    strip_ood_score(proto)
    props = {p.key: p.value for p in proto.metadata_props}
    props.pop("attention_output", None)
    props.pop("ood", None)
    helper.set_model_props(proto, props)
    onnx.save(proto, str(output))
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    images = photos(SIZES["640x480"])
    with tempfile.TemporaryDirectory() as folder:
        models = {
            "as shipped": MODEL,
            "classification": classification_only(MODEL, Path(folder) / "plain.onnx"),
        }
        urls, processes = {}, {}
        for name, path in models.items():
            port = free_port()
            urls[name] = f"http://127.0.0.1:{port}"
            command = [sys.executable, "-m", "service.cli", "--model", str(path)]
            env = {"VIT_PROVIDERS": '["CPUExecutionProvider"]'}
            processes[name] = start([*command, "--port", str(port)], env, urls[name])
        try:
            rounds = interleaved(urls, images, args.rounds, args.seconds)
        finally:
            for process in processes.values():
                process.terminate()
                process.wait(timeout=30)
    shipped, plain = models
    summary = {
        "throughput_ratio_16": statistics.median(
            r[shipped]["images_per_second_16"] / r[plain]["images_per_second_16"] for r in rounds
        ),
        "p50_difference_ms_1": statistics.median(
            r[shipped]["p50_ms_1"] - r[plain]["p50_ms_1"] for r in rounds
        ),
    }
    DOCS.mkdir(exist_ok=True)
    (DOCS / "explain_cost.json").write_text(
        json.dumps({"rounds": rounds, "summary": summary}, indent=2) + "\n"
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
