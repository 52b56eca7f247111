"""The out-of-distribution flag of a model file, measured on images it was never trained,
calibrated or chosen on: how many held-out shapes it flags (which should pass), over several
seeds, and how many real photos and faces (which should be flagged), with the threshold the file
stores. Beside the stored score, the scores of the logits, each calibrated as vit-export
calibrates it (the file's acceptance, the same calibration images), for comparison.

    python -m benchmarks.ood            # a few minutes on 2 cores (needs the bench extra)
    python -m benchmarks.ood --model OTHER.onnx

Photos: the project's own (model_export/photos) and those scikit-image ships inside its package
(no download), whole, and scikit-image's 200 small LFW face photos. Shapes: 1,000 images of each
of five seeds that neither train (0), calibrate (2000003) nor choose anything. Generated
non-shapes (model_export/outliers.py) of a seed neither trained (3000003) nor chosen (4000003)
on. Results go to docs/ood.json, and the table between the markers in docs/EXPLAIN.md.
"""

from __future__ import annotations

import argparse
import io
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from model_contract.ood import GRAPH_SCORES, SCORE_OUTPUT, Score, ood_scores, threshold_accepting
from model_contract.preprocess import PreprocessSpec, preprocess
from model_export.dataset import preprocessed
from model_export.export import CALIBRATION_SEED, held_out
from model_export.importing import PHOTOS, image_files
from model_runtime.options import IN_PROCESS
from model_runtime.session import ModelSession

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "shapes-vit.onnx"
EXPLAIN = ROOT / "docs" / "EXPLAIN.md"
# 1000003 is vit-export's held-out seed, 20261126 the README's vit-eval seed.
HELD_OUT_SEEDS = (1_000_003, 20_261_126, 5_000_011, 6_000_011, 7_000_011)
PER_SEED = 1000
CALIBRATION_COUNT = 2000
GENERATED_SEED = 5_000_003
GENERATED_COUNT = 1000
TABLE_START, TABLE_END = "<!-- ood-table -->", "<!-- /ood-table -->"
# scikit-image's bundled files that are photographs (its others are drawings, charts, a logo).
SKIMAGE_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
    "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
    "microaneurysms.png", "moon.png", "motorcycle_left.png", "motorcycle_right.png", "page.png",
    "retina.jpg", "rocket.jpg", "text.png",
)  # fmt: skip


def photo_files() -> dict[str, bytes]:
    """Every real photo on this machine's packages, by name (duplicates of the same picture
    kept once: the project's photos are reduced copies of four of scikit-image's)."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    photos = {f"skimage/{name}": (folder / name).read_bytes() for name in SKIMAGE_PHOTOS}
    for path in image_files(PHOTOS):
        if path.stem not in ("cat", "coffee", "astronaut", "rocket"):
            photos[f"photos/{path.name}"] = path.read_bytes()
    return photos


def faces() -> list[bytes]:
    import skimage

    stack = np.load(Path(skimage.__file__).parent / "data" / "lfw_subset.npy")
    out = []
    for face in stack:
        buffer = io.BytesIO()
        Image.fromarray((face * 255).round().astype(np.uint8)).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def graph_outputs(
    session: ort.InferenceSession, batches: Iterable[np.ndarray]
) -> tuple[np.ndarray, np.ndarray | None]:
    """The logits and, where the file computes it, the graph's `ood_score`, for every image."""
    names = [o.name for o in session.get_outputs()]
    wanted = ["logits", *([SCORE_OUTPUT] if SCORE_OUTPUT in names else [])]
    (input_name,) = [i.name for i in session.get_inputs()]
    runs = [session.run(wanted, {input_name: batch}) for batch in batches]
    logits = np.concatenate([run[0] for run in runs])
    graph = np.concatenate([run[1] for run in runs]) if len(wanted) == 2 else None
    return logits, graph


def image_sets(
    session: ort.InferenceSession, spec: PreprocessSpec
) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Every set's graph outputs, by name: the calibration images, each held-out seed's shapes,
    the photos, the faces and the generated non-shapes."""

    def shapes_of(seed: int, count: int) -> tuple[np.ndarray, np.ndarray | None]:
        return graph_outputs(session, (b for b, _ in held_out(spec, seed=seed, count=count)))

    def encoded(images: Iterable[bytes]) -> tuple[np.ndarray, np.ndarray | None]:
        return graph_outputs(session, [np.concatenate([preprocess(d, spec) for d in images])])

    generated, _ = preprocessed(GENERATED_SEED, GENERATED_COUNT, spec, source="outliers")
    return {
        "calibration": shapes_of(CALIBRATION_SEED, CALIBRATION_COUNT),
        **{f"shapes {seed}": shapes_of(seed, PER_SEED) for seed in HELD_OUT_SEEDS},
        "photos": encoded(photo_files().values()),
        "faces": encoded(faces()),
        "generated": graph_outputs(session, np.array_split(generated.astype(np.float32), 16)),
    }


def measure(
    sets: dict[str, tuple[np.ndarray, np.ndarray | None]],
    score: Score,
    threshold: float | None,
    accept_rate: float,
) -> dict[str, Any]:
    """How many of each set `score` flags, at `threshold` (the file's), or None: the threshold
    accepting `accept_rate` of the calibration images."""
    values = {
        name: graph
        if score in GRAPH_SCORES and graph is not None
        else ood_scores(logits, "logits", score)
        for name, (logits, graph) in sets.items()
    }
    if threshold is None:
        threshold = threshold_accepting(values["calibration"], accept_rate)
    flagged = {name: int((v < threshold).sum()) for name, v in values.items()}
    shares = [flagged[f"shapes {seed}"] / PER_SEED for seed in HELD_OUT_SEEDS]
    return {
        "threshold": threshold,
        "shapes_flagged_by_seed": {str(s): flagged[f"shapes {s}"] for s in HELD_OUT_SEEDS},
        "shapes_per_seed": PER_SEED,
        "shapes_flagged_mean": float(np.mean(shares)),
        "shapes_flagged_min": min(shares),
        "shapes_flagged_max": max(shares),
        **{f"{name}_flagged": flagged[name] for name in ("photos", "faces", "generated")},
        **{name: len(values[name]) for name in ("photos", "faces", "generated")},
        "photo_scores": values["photos"].astype(np.float64).round(4).tolist(),
    }


def table(results: dict[str, Any]) -> str:
    """The markdown table docs/EXPLAIN.md shows."""
    rows = [
        "| score | threshold | held-out shapes flagged: mean (lowest-highest of 5 seeds) "
        "| photos flagged | faces flagged | generated non-shapes flagged |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for score, r in results["scores"].items():
        name = f"**{score}** (stored)" if score == results["stored_score"] else score
        rows.append(
            f"| {name} | {r['threshold']:.4g} | {r['shapes_flagged_mean']:.1%} "
            f"({r['shapes_flagged_min']:.1%}-{r['shapes_flagged_max']:.1%}) "
            f"| {r['photos_flagged']} / {r['photos']} ({r['photos_flagged'] / r['photos']:.0%}) "
            f"| {r['faces_flagged']} / {r['faces']} ({r['faces_flagged'] / r['faces']:.1%}) "
            f"| {r['generated_flagged']} / {r['generated']} "
            f"({r['generated_flagged'] / r['generated']:.1%}) |"
        )
    return "\n".join(rows)


def write_table(markdown: str, path: Path = EXPLAIN) -> None:
    """Replace what lies between the table markers in `path`."""
    text = path.read_text()
    pattern = re.compile(re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"{path} has no {TABLE_START} ... {TABLE_END} markers")
    path.write_text(pattern.sub(f"{TABLE_START}\n{markdown}\n{TABLE_END}", text))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ood", description=__doc__)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument(
        "--no-docs", action="store_true", help="Print the results; write nothing under docs/."
    )
    args = parser.parse_args(argv)
    metadata = ModelSession(args.model, IN_PROCESS).metadata
    if metadata.ood is None:
        raise SystemExit(f"{args.model} has no out-of-distribution calibration")
    session = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    sets = image_sets(session, metadata.preprocessing)
    stored, accept_rate = metadata.ood.score, metadata.ood.accept_rate
    scores: list[Score] = ["max_softmax", "energy"]
    if stored in GRAPH_SCORES:
        scores.append(stored)
    results: dict[str, Any] = {
        "model": str(
            args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model
        ),
        "stored_score": stored,
        "accept_rate": accept_rate,
        "calibration": f"shapes seed {CALIBRATION_SEED}, images 0-{CALIBRATION_COUNT - 1}",
        "choice": metadata.ood.choice,
        "held_out_accuracy": metadata.held_out_accuracy,
        "photo_names": list(photo_files()),
        "scores": {
            score: measure(
                sets, score, metadata.ood.threshold if score == stored else None, accept_rate
            )
            for score in scores
        },
    }
    markdown = table(results)
    print(markdown)
    if not args.no_docs:
        (ROOT / "docs" / "ood.json").write_text(json.dumps(results, indent=2) + "\n")
        write_table(markdown)


if __name__ == "__main__":
    main()
