"""What a written model file carries besides its graph and labels, computed on the file itself:
the out-of-distribution calibration and the startup self-test set."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable

import numpy as np

from model_contract.decode import decode
from model_contract.metadata import OodCalibration, SelfTest
from model_contract.ood import Score, ood_scores, threshold_accepting
from model_contract.preprocess import PreprocessSpec, crop_and_resize, preprocess_upload
from service.runtime.session import ModelSession, softmax

ACCEPT_RATE = 0.95
# The score for models with logits: on the bundled model it flags more photos than max_softmax at
# the same share of held-out shapes (docs/EXPLAIN.md).
DEFAULT_SCORE: Score = "energy"
SELF_TEST_IMAGES = 4
# The self-test passes while every probability is within this many times the difference measured
# at export between the written file and the FP32 reference, and never less than the floor: other
# providers and thread counts move FP32 probabilities by ~1e-6, a wrong preprocessing, precision
# or model by far more than 1e-3.
TOLERANCE_MARGIN = 2.0
TOLERANCE_FLOOR = 1e-3


def calibrate(
    session: ModelSession, batches: Iterable[np.ndarray], *, source: str
) -> OodCalibration:
    """The threshold that accepts ACCEPT_RATE of in-distribution images, on the file's outputs."""
    kind = session.metadata.output
    score: Score = DEFAULT_SCORE if kind == "logits" else "max_softmax"
    outputs = np.concatenate([session.logits(batch) for batch in batches])
    return OodCalibration(
        score=score,
        threshold=threshold_accepting(ood_scores(outputs, kind, score), ACCEPT_RATE),
        accept_rate=ACCEPT_RATE,
        calibration_images=len(outputs),
        calibration_source=source,
    )


def golden_png(data: bytes, spec: PreprocessSpec) -> bytes:
    """An image as a PNG of the model's input size, cut as the preprocessing cuts it: small
    enough to live in the metadata, and still a real upload."""
    decoded = decode(data, alpha_background=spec.alpha_background)
    buffer = io.BytesIO()
    crop_and_resize(decoded.image, spec).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def served_probabilities(session: ModelSession, images: list[bytes]) -> np.ndarray:
    """What the service answers for each encoded image: its preprocessing, then the file."""
    spec = session.metadata.preprocessing
    batch = np.concatenate([preprocess_upload(data, spec)[0] for data in images])
    return session.predict(batch)


def tolerance_for(measured: float) -> float:
    return max(TOLERANCE_FLOOR, TOLERANCE_MARGIN * measured)


def self_test(session: ModelSession, images: list[bytes], *, measured: float) -> SelfTest:
    """The golden images (already PNGs at the input size) and the file's probabilities for them;
    `measured` is the largest probability difference of the file from the FP32 reference."""
    expected = served_probabilities(session, images)
    return SelfTest(
        images=tuple(base64.b64encode(png).decode() for png in images),
        probabilities=tuple(tuple(float(p) for p in row) for row in expected),
        tolerance=tolerance_for(measured),
    )


def probability_diff(reference_logits: np.ndarray, logits: np.ndarray) -> float:
    return float(np.abs(softmax(reference_logits) - softmax(logits)).max())
