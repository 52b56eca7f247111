"""The out-of-distribution flag of the bundled model, measured: how many real photos it flags and
how many held-out shapes, with each score calibrated to accept 95% of other held-out shapes.

    python -m benchmarks.ood            # about 2 minutes on 2 cores (needs the bench extra)

Photos: the project's own (model_export/photos) and those scikit-image ships inside its package
(no download), whole, and scikit-image's 200 small LFW face photos. Shapes: seed 1000003 (the
held-out seed vit-export evaluates on), never the calibration seed. Results go to docs/ood.json;
docs/EXPLAIN.md quotes them.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from model_contract.ood import Score, ood_scores, threshold_accepting
from model_contract.preprocess import preprocess
from model_export.export import CALIBRATION_SEED, held_out
from model_export.importing import PHOTOS, image_files
from service.runtime.options import IN_PROCESS
from service.runtime.session import ModelSession

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


def main() -> None:
    session = ModelSession(DEFAULT_MODEL, IN_PROCESS)
    spec = session.metadata.preprocessing
    calibration = np.concatenate(
        [session.logits(b) for b, _ in held_out(spec, seed=CALIBRATION_SEED, count=COUNT)]
    )
    shapes = np.concatenate(
        [session.logits(b) for b, _ in held_out(spec, seed=HELD_OUT_SEED, count=COUNT)]
    )
    photos = photo_files()
    photo_logits = session.logits(np.concatenate([preprocess(d, spec) for d in photos.values()]))
    face_logits = session.logits(np.concatenate([preprocess(d, spec) for d in faces()]))
    results: dict[str, Any] = {"calibration": f"shapes seed {CALIBRATION_SEED}, {COUNT} images"}
    scores: tuple[Score, ...] = ("max_softmax", "energy")
    for score in scores:
        threshold = threshold_accepting(ood_scores(calibration, "logits", score), 0.95)

        def flagged(logits: np.ndarray, s: Score = score, t: float = threshold) -> int:
            return int((ood_scores(logits, "logits", s) < t).sum())

        results[score] = {
            "threshold": threshold,
            "shapes_flagged": flagged(shapes),
            "shapes": len(shapes),
            "photos_flagged": flagged(photo_logits),
            "photos": len(photo_logits),
            "faces_flagged": flagged(face_logits),
            "faces": len(face_logits),
            "photo_scores": dict(
                zip(photos, ood_scores(photo_logits, "logits", score).tolist(), strict=True)
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
