"""The out-of-distribution flag of the bundled model, measured: how many real photos it flags and
how many held-out shapes, with each score calibrated to accept 95% of other held-out shapes:
max_softmax and energy of the logits, and the Mahalanobis score of the file's `ood_score`
output (its class means and covariance as the file carries them).

    python -m benchmarks.ood            # about a minute on 2 cores (needs the bench extra)
    python -m benchmarks.ood --model OTHER.onnx

Photos: the project's own (model_export/photos) and those scikit-image ships inside its package
(no download), whole, and scikit-image's 200 small LFW face photos. Shapes: seed 1000003 (the
held-out seed vit-export evaluates on), never the calibration seed. Results go to docs/ood.json;
docs/EXPLAIN.md quotes them.
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from model_contract.ood import SCORE_OUTPUT, Score, ood_scores, threshold_accepting
from model_contract.preprocess import preprocess
from model_export.export import CALIBRATION_SEED, held_out
from model_export.importing import PHOTOS, image_files
from model_runtime.options import IN_PROCESS
from model_runtime.session import ModelSession

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "shapes-vit.onnx"
HELD_OUT_SEED = 1_000_003
COUNT = 2000
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ood", description=__doc__)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    args = parser.parse_args(argv)
    spec = ModelSession(args.model, IN_PROCESS).metadata.preprocessing
    session = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    photos = photo_files()
    sets = {
        "calibration": graph_outputs(
            session, (b for b, _ in held_out(spec, seed=CALIBRATION_SEED, count=COUNT))
        ),
        "shapes": graph_outputs(
            session, (b for b, _ in held_out(spec, seed=HELD_OUT_SEED, count=COUNT))
        ),
        "photos": graph_outputs(
            session, [np.concatenate([preprocess(d, spec) for d in photos.values()])]
        ),
        "faces": graph_outputs(session, [np.concatenate([preprocess(d, spec) for d in faces()])]),
    }
    results: dict[str, Any] = {
        "model": str(
            args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model
        ),
        "calibration": f"shapes seed {CALIBRATION_SEED}, images 0-{COUNT - 1}",
    }
    scores: list[Score] = ["max_softmax", "energy"]
    if sets["calibration"][1] is not None:
        scores.append("mahalanobis")
    for score in scores:
        values: dict[str, np.ndarray] = {
            name: ood_scores(logits, "logits", score)
            if graph is None or score != "mahalanobis"
            else graph
            for name, (logits, graph) in sets.items()
        }
        threshold = threshold_accepting(values["calibration"], 0.95)

        def flagged(name: str, v: dict[str, np.ndarray] = values, t: float = threshold) -> int:
            return int((v[name] < t).sum())

        results[score] = {
            "threshold": threshold,
            "shapes_flagged": flagged("shapes"),
            "shapes": len(values["shapes"]),
            "photos_flagged": flagged("photos"),
            "photos": len(values["photos"]),
            "faces_flagged": flagged("faces"),
            "faces": len(values["faces"]),
            "photo_scores": dict(
                zip(photos, np.round(values["photos"].astype(np.float64), 4).tolist(), strict=True)
            ),
        }
        r = results[score]
        print(
            f"{score}: threshold {threshold:.4f}; shapes flagged {r['shapes_flagged']}/"
            f"{r['shapes']} ({r['shapes_flagged'] / r['shapes']:.1%}), photos "
            f"{r['photos_flagged']}/{r['photos']} ({r['photos_flagged'] / r['photos']:.0%}), faces "
            f"{r['faces_flagged']}/{r['faces']} ({r['faces_flagged'] / r['faces']:.0%})"
        )
    (ROOT / "docs" / "ood.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
