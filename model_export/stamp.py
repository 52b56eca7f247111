"""What a written model file carries besides its graph and labels, computed on the file itself:
the out-of-distribution calibration and the startup self-test set."""

from __future__ import annotations

import base64
import io
import logging
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx

from model_contract.decode import decode
from model_contract.metadata import OodCalibration, SelfTest
from model_contract.ood import GRAPH_SCORES, Score, ood_scores, threshold_accepting
from model_contract.outputs import EMBEDDING, PROBABILITIES
from model_contract.preprocess import (
    PreprocessSpec,
    crop_and_resize,
    preprocess,
    preprocess_upload,
)
from model_export.importing import decodable_image_files
from model_export.ood_features import (
    NoHead,
    Standardised,
    add_energy_to_score,
    add_ood_score,
    combined_scores,
    features_of,
    find_head,
    fit,
    ood_scores_of,
    strip_ood_score,
)
from model_runtime.session import ModelSession, Outputs

logger = logging.getLogger(__name__)

ACCEPT_RATE = 0.95
# The score of the classification output, where the graph's head cannot be found for the
# Mahalanobis score: for logits, on the bundled model it flags more photos than max_softmax at
# the same share of held-out shapes (docs/EXPLAIN.md).
DEFAULT_SCORE: Score = "energy"
SELF_TEST_IMAGES = 4
CALIBRATION_BATCH_SIZE = 16
# Of the user's calibration images, every this many-th is held out to measure the flag on.
HELD_OUT_EVERY = 5
# The self-test passes while every probability is within this many times the difference measured
# at export between the written file and the FP32 reference, and never less than the floor: other
# providers and thread counts move FP32 probabilities by ~1e-6, a wrong preprocessing, precision
# or model by far more than 1e-3.
TOLERANCE_MARGIN = 2.0
TOLERANCE_FLOOR = 1e-3


def calibrate(
    session: ModelSession,
    batches: Iterable[np.ndarray],
    *,
    source: str,
    accept_rate: float = ACCEPT_RATE,
) -> OodCalibration:
    """The threshold that accepts `accept_rate` of in-distribution images, on the file's
    outputs."""
    kind = session.metadata.output
    score: Score = DEFAULT_SCORE if kind == "logits" else "max_softmax"
    outputs = np.concatenate([session.logits(batch) for batch in batches])
    return OodCalibration(
        score=score,
        threshold=threshold_accepting(ood_scores(outputs, kind, score), accept_rate),
        accept_rate=accept_rate,
        calibration_images=len(outputs),
        calibration_source=source,
    )


def calibrate_mahalanobis(
    proto: onnx.ModelProto,
    *,
    output: str,
    input_size: int,
    fit_batches: Iterable[tuple[np.ndarray, np.ndarray | None]],
    threshold_batches: Iterable[np.ndarray],
    source: str,
    fit_source: str,
    accept_rate: float = ACCEPT_RATE,
) -> OodCalibration:
    """Append the Mahalanobis score to `proto` (in place, replacing any), its class means and
    covariance fitted on `fit_batches` (images with their class indices, or None: the model's
    predicted classes), and the threshold that accepts `accept_rate` of `threshold_batches`, other
    in-distribution images (fitting and thresholding on the same images would set it too high).
    `output` is the classification output; NoHead, before any image is read, where the graph's
    head on it cannot be found."""
    strip_ood_score(proto)
    head = find_head(proto, output, input_size=input_size)
    truths: list[np.ndarray | None] = []

    def images() -> Iterator[np.ndarray]:
        for batch, truth in fit_batches:
            truths.append(truth)
            yield batch

    features, outputs = features_of(proto, head, output, images())
    known = [t for t in truths if t is not None]
    classes = np.concatenate(known) if len(known) == len(truths) else outputs.argmax(axis=1)
    add_ood_score(proto, head, fit(features, classes))
    scores = ood_scores_of(proto, threshold_batches)
    return OodCalibration(
        score="mahalanobis",
        threshold=threshold_accepting(scores, accept_rate),
        accept_rate=accept_rate,
        calibration_images=len(scores),
        calibration_source=f"{source}; class means and covariance fitted on {fit_source}",
    )


def calibrate_best(
    proto: onnx.ModelProto,
    session: ModelSession,
    *,
    fit_batches: Iterable[tuple[np.ndarray, np.ndarray | None]],
    threshold_batches: Iterable[np.ndarray],
    source: str,
    fit_source: str,
    accept_rate: float = ACCEPT_RATE,
) -> OodCalibration:
    """The Mahalanobis score appended to `proto` and calibrated, or where the graph's head cannot
    be found, the score of the classification output (`calibrate`), saying why."""
    try:
        metadata = session.metadata
        return calibrate_mahalanobis(
            proto,
            output=metadata.output_name or proto.graph.output[0].name,
            input_size=metadata.preprocessing.input_size,
            fit_batches=fit_batches,
            threshold_batches=threshold_batches,
            source=source,
            fit_source=fit_source,
            accept_rate=accept_rate,
        )
    except NoHead as error:
        fallback = DEFAULT_SCORE if session.metadata.output == "logits" else "max_softmax"
        logger.warning("no mahalanobis out-of-distribution score (%s): %s instead", error, fallback)
        return calibrate(session, threshold_batches, source=source, accept_rate=accept_rate)


def most_flagging(
    scored: dict[Score, tuple[np.ndarray, np.ndarray]], accept_rate: float
) -> tuple[Score, dict[Score, float], dict[Score, float]]:
    """For each score's values on in-distribution images and on outliers, the threshold that
    accepts `accept_rate` of the first and the share of the second it flags; and the first named
    of the scores that flag the most. Shares closer to the largest than the outliers can tell
    apart (two binomial standard errors, and at least one image) count as a tie: near 100%, one
    image more on one set of outliers is chance, not a better score."""
    thresholds = {
        score: threshold_accepting(inside, accept_rate) for score, (inside, _) in scored.items()
    }
    shares = {
        score: float((outside < thresholds[score]).mean()) for score, (_, outside) in scored.items()
    }
    count = min(len(outside) for _, outside in scored.values())
    best = max(shares.values())
    margin = max(2 * math.sqrt(best * (1 - best) / count), 1 / count)
    chosen = next(score for score, share in shares.items() if share >= best - margin - 1e-12)
    return chosen, thresholds, shares


def choose_score(
    calibration: OodCalibration,
    proto: onnx.ModelProto,
    session: ModelSession,
    *,
    threshold_batches: list[np.ndarray],
    outlier_batches: list[np.ndarray],
    outlier_source: str,
    source: str,
) -> OodCalibration:
    """Of `calibration`'s score, those of the classification output and, beside a Mahalanobis
    score of logits, `mahalanobis_energy` (the two combined), each thresholded to accept the same
    share of `threshold_batches`, the one that flags the most of `outlier_batches`, images
    unlike the model's own: a choice made on data that never measures the flag. On a tie
    (`most_flagging`) the first named wins: the combination, the Mahalanobis score, then the
    logits' scores. Where a logit score wins, the graph's `ood_score`
    is removed from `proto` and `source` describes the threshold images alone; where the
    combination wins, it replaces the graph's `ood_score`."""
    kind = session.metadata.output
    inside = np.concatenate([session.logits(batch) for batch in threshold_batches])
    outside = np.concatenate([session.logits(batch) for batch in outlier_batches])
    logit_scores: tuple[Score, ...] = ("max_softmax",)
    if kind == "logits":
        logit_scores = ("energy", "max_softmax")
    of_logits: dict[Score, tuple[np.ndarray, np.ndarray]] = {
        score: (ood_scores(inside, kind, score), ood_scores(outside, kind, score))
        for score in logit_scores
    }
    scored: dict[Score, tuple[np.ndarray, np.ndarray]] = {}
    standardised = None
    if calibration.score == "mahalanobis":
        mahalanobis = (
            ood_scores_of(proto, threshold_batches),
            ood_scores_of(proto, outlier_batches),
        )
        if kind == "logits":
            energy = of_logits["energy"]
            standardised = (Standardised.of(mahalanobis[0]), Standardised.of(energy[0]))
            scored["mahalanobis_energy"] = (
                combined_scores(mahalanobis[0], energy[0], standardised),
                combined_scores(mahalanobis[1], energy[1], standardised),
            )
        scored["mahalanobis"] = mahalanobis
    scored.update(of_logits)
    best, thresholds, shares = most_flagging(scored, calibration.accept_rate)
    ranking = ", ".join(f"{score} {share:.1%}" for score, share in shares.items())
    logger.info("out-of-distribution score %s; %s flagged: %s", best, outlier_source, ranking)
    choice = f"flagged most of {len(outside)} {outlier_source}: {ranking}"
    if best == calibration.score:
        return calibration.model_copy(update={"choice": choice})
    if best == "mahalanobis_energy" and standardised is not None:
        output = session.metadata.output_name or proto.graph.output[0].name
        add_energy_to_score(proto, output, standardised)
        in_graph = ood_scores_of(proto, threshold_batches)  # float32, as served
        threshold = threshold_accepting(in_graph, calibration.accept_rate)
        return calibration.model_copy(
            update={"score": best, "threshold": threshold, "choice": choice}
        )
    strip_ood_score(proto)
    return calibration.model_copy(
        update={
            "score": best,
            "threshold": thresholds[best],
            "calibration_source": source,
            "choice": choice,
        }
    )


def with_held_out(
    calibration: OodCalibration,
    proto: onnx.ModelProto,
    session: ModelSession,
    batches: Iterable[np.ndarray],
) -> OodCalibration:
    """`calibration` with how many of `batches`, in-distribution images used for nothing else,
    its threshold flags: the share a user should expect on their own images."""
    if calibration.score in GRAPH_SCORES:
        scores = ood_scores_of(proto, batches)
    else:
        outputs = np.concatenate([session.logits(batch) for batch in batches])
        scores = ood_scores(outputs, session.metadata.output, calibration.score)
    flagged = int((scores < calibration.threshold).sum())
    logger.info(
        "out-of-distribution flag on %d held-out in-distribution images: %d flagged (%.1f%%)",
        len(scores),
        flagged,
        100 * flagged / max(1, len(scores)),
    )
    return calibration.model_copy(
        update={"held_out_images": len(scores), "held_out_flagged": flagged}
    )


def calibrate_on_files(
    proto: onnx.ModelProto, session: ModelSession, files: list[Path], *, folder: Path
) -> OodCalibration:
    """`calibrate_best` on the user's unlabelled in-distribution images: every fifth file is held
    out to measure the flag on (`with_held_out`); of the others, every other one fits the class
    means (of the model's predicted classes) and covariance, the rest set the threshold. The
    description names `folder` by its last part: the folders above it are the importing
    machine's, and /v1/models shows it to anyone."""
    spec = session.metadata.preprocessing
    where = f"under {folder.resolve().name}/"

    def batches(chosen: list[Path]) -> Iterator[np.ndarray]:
        for start in range(0, len(chosen), CALIBRATION_BATCH_SIZE):
            chunk = chosen[start : start + CALIBRATION_BATCH_SIZE]
            yield np.concatenate([preprocess(p.read_bytes(), spec) for p in chunk])

    held = files[HELD_OUT_EVERY - 1 :: HELD_OUT_EVERY]
    kept = [
        path for index, path in enumerate(files) if index % HELD_OUT_EVERY != HELD_OUT_EVERY - 1
    ]
    fitting, thresholding = kept[0::2], kept[1::2]
    if not thresholding:
        calibration = calibrate(session, batches(kept), source=f"{len(kept)} images {where}")
    else:
        calibration = calibrate_best(
            proto,
            session,
            fit_batches=((batch, None) for batch in batches(fitting)),
            threshold_batches=batches(thresholding),
            source=f"{len(thresholding)} images {where} (the 2nd, 4th, ... of those not held out)",
            fit_source=f"{len(fitting)} others (their predicted classes)",
        )
    if not held:
        return calibration
    return with_held_out(calibration, proto, session, batches(held))


def golden_png(data: bytes, spec: PreprocessSpec) -> bytes:
    """An image as a PNG of the model's input size, cut as the preprocessing cuts it: small
    enough to live in the metadata, and still a real upload."""
    decoded = decode(
        data,
        alpha_background=spec.alpha_background,
        key_background=spec.transparency_key_background,
    )
    buffer = io.BytesIO()
    crop_and_resize(decoded.image, spec).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def golden_files(files: list[Path], spec: PreprocessSpec) -> list[bytes]:
    """The self-test images an importer takes from the user's check images: the first few."""
    return [golden_png(path.read_bytes(), spec) for path in files[:SELF_TEST_IMAGES]]


def calibrate_on_folder(
    proto: onnx.ModelProto, session: ModelSession, folder: Path | None
) -> OodCalibration | None:
    """`calibrate_on_files` on the images under `folder`; None without one."""
    if folder is None:
        return None
    return calibrate_on_files(proto, session, decodable_image_files(folder), folder=folder)


def served_probabilities(session: ModelSession, images: list[bytes]) -> np.ndarray:
    """What the service answers for each encoded image: its preprocessing, then the file."""
    return served(session, images)[PROBABILITIES]


def served(session: ModelSession, images: list[bytes]) -> Outputs:
    """Every output the service serves for the encoded images, by name."""
    spec = session.metadata.preprocessing
    return session.infer(np.concatenate([preprocess_upload(data, spec)[0] for data in images]))


def tolerance_for(measured: float) -> float:
    return max(TOLERANCE_FLOOR, TOLERANCE_MARGIN * measured)


def self_test(session: ModelSession, images: list[bytes], *, measured: float) -> SelfTest:
    """The golden images (already PNGs at the input size) and the file's answers for them: its
    probabilities, or for a model without classes its embeddings; `measured` is the largest
    difference of those answers from the FP32 reference."""
    classes = session.metadata.has_classes
    expected = served(session, images)[PROBABILITIES if classes else EMBEDDING]
    rows = tuple(tuple(float(v) for v in row) for row in expected)
    return SelfTest(
        images=tuple(base64.b64encode(png).decode() for png in images),
        probabilities=rows if classes else (),
        embeddings=() if classes else rows,
        tolerance=tolerance_for(measured),
    )
