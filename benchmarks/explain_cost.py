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
import tempfile
from pathlib import Path

import onnx
from onnx import helper

from benchmarks.pairs import compare
from benchmarks.run import ROOT, SIZES, photos
from model_export.embedding import strip_embedding
from model_export.ood_features import strip_ood_score
from model_export.rollout import strip_rollout

MODEL = ROOT / "models" / "shapes-vit.onnx"


def classification_only(model: Path, output: Path) -> Path:
    """`model` without what export appended to it (the rollout, the score the graph computes,
    the embedding): the graph it was traced to, node for node; its metadata kept, less those."""
    proto = onnx.load(str(model))
    strip_rollout(proto)
    strip_ood_score(proto)
    strip_embedding(proto)
    props = {p.key: p.value for p in proto.metadata_props}
    for key in ("attention_output", "ood", "embedding"):
        props.pop(key, None)
    helper.set_model_props(proto, props)
    onnx.save(proto, str(output))
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    cpu = {"VIT_PROVIDERS": '["CPUExecutionProvider"]'}
    with tempfile.TemporaryDirectory() as folder:
        variants = {
            "as shipped": (MODEL, cpu),
            "classification": (classification_only(MODEL, Path(folder) / "plain.onnx"), cpu),
        }
        compare(variants, photos(SIZES["640x480"]), args.rounds, args.seconds, "explain_cost.json")


if __name__ == "__main__":
    main()
