"""What carrying the `embedding` output costs a call that does not ask for it: the same graph with
and without that output, in-process onnxruntime on the CPU, at batch 1 and 8.

    python -m benchmarks.embedding_cost            # about 3 minutes on 2 cores

Models: the bundled model as shipped (its embedding appended) against its graph with the
embedding stripped, and a ViT-S/16 ViTForImageClassification at 224x224 with random weights
(speed only), exported as `vit-import hf` exports it, with and without the appended embedding.
The variants: without the output; with it, asking only for the outputs the service reads
otherwise; with it, asking for it too. Each round calls every variant once (`measure`); the
figures are the median call per image and the median of the rounds' ratios to the variant
without. Prints the table docs/EMBEDDINGS.md shows.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks.run import ROOT
from model_contract.outputs import EMBEDDING
from model_export.embedding import add_embedding, strip_embedding

MODEL = ROOT / "models" / "shapes-vit.onnx"
BATCH_SIZES = (1, 8)
VARIANTS = ("without", "with, unused", "with, asked for")
MIN_ROUNDS = 30


def vit_small(folder: Path) -> tuple[onnx.ModelProto, int]:
    """A ViT-S/16 classifier at 224x224 (1,000 classes), random weights, as ONNX."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from model_export.import_hf import LogitsOnly, exported

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=224,
        patch_size=16,
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
    )
    config.num_labels = 1000
    path = folder / "vit-s16.onnx"
    exported(LogitsOnly(ViTForImageClassification(config).eval()), path, 224)
    return onnx.load(str(path)), 224


def bundled() -> tuple[onnx.ModelProto, int]:
    proto = onnx.load(str(MODEL))
    strip_embedding(proto)
    return proto, 128


def sessions(plain: onnx.ModelProto, size: int) -> dict[str, Callable[[np.ndarray], object]]:
    """Each variant's call: `plain` (no embedding) and the graph with it appended."""
    carrying = onnx.ModelProto()
    carrying.CopyFrom(plain)
    add_embedding(carrying, output=plain.graph.output[0].name, input_size=size)
    served = [o.name for o in plain.graph.output]
    calls: dict[str, Callable[[np.ndarray], object]] = {}
    for variant, proto, names in (
        ("without", plain, served),
        ("with, unused", carrying, served),
        ("with, asked for", carrying, [*served, EMBEDDING]),
    ):
        session = ort.InferenceSession(
            proto.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        (name,) = [i.name for i in session.get_inputs()]
        calls[variant] = functools.partial(run, session, name, names)
    return calls


def run(
    session: ort.InferenceSession, input_name: str, names: list[str], batch: np.ndarray
) -> object:
    return session.run(names, {input_name: batch})


def measure(
    calls: dict[str, Callable[[np.ndarray], object]], batch: np.ndarray, seconds: float
) -> tuple[dict[str, float], dict[str, float]]:
    """Milliseconds per image of each variant, the median call, and each variant's time against
    the first's, the median of the rounds' ratios: each round calls every variant once, in an
    order turned by one each round, so that whatever else the machine does falls on all alike."""
    order = list(calls)
    start = time.perf_counter()
    for call in calls.values():  # warm-up, and the rounds that fit in `seconds`
        call(batch)
    rounds = max(MIN_ROUNDS, int(seconds / (time.perf_counter() - start)))
    times: dict[str, list[float]] = {variant: [] for variant in calls}
    for round_ in range(rounds):
        turn = round_ % len(order)
        for variant in order[turn:] + order[:turn]:
            start = time.perf_counter()
            calls[variant](batch)
            times[variant].append(time.perf_counter() - start)
    per_image = {v: 1000 * statistics.median(t) / len(batch) for v, t in times.items()}
    base = times[order[0]]
    ratios = {
        v: statistics.median(a / b for a, b in zip(t, base, strict=True)) for v, t in times.items()
    }
    return per_image, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--seconds", type=float, default=40.0, help="measuring time per model and batch size"
    )
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    ratio_columns = [f"{v} / without" for v in VARIANTS[1:]]
    print("| model | batch | " + " | ".join(f"{v}, ms/image" for v in VARIANTS), end=" | ")
    print(" | ".join(ratio_columns) + " |")
    print("| --- " * (2 + len(VARIANTS) + len(ratio_columns)) + "|")
    with tempfile.TemporaryDirectory() as folder:
        for label, (plain, size) in (
            ("bundled ViT-Ti/16 at 128 (6 blocks)", bundled()),
            ("ViT-S/16 at 224 (random)", vit_small(Path(folder))),
        ):
            calls = sessions(plain, size)
            for batch_size in BATCH_SIZES:
                batch = rng.standard_normal((batch_size, 3, size, size)).astype(np.float32)
                per_image, ratios = measure(calls, batch, args.seconds)
                cells = [f"{per_image[v]:.2f}" for v in VARIANTS]
                cells += [f"{ratios[v]:.3f}" for v in VARIANTS[1:]]
                print(f"| {label} | {batch_size} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
