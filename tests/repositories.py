"""Model repositories built for tests: colours classifiers as `<repo>/<name>/<version>/model.onnx`,
each version answering differently, and the probabilities each must give."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model_contract.preprocess import PreprocessSpec, preprocess
from model_runtime.session import softmax
from tests.images import asymmetric, encode
from tests.onnx_models import classifier, expected_logits, metadata_for

COLOURS = ["red", "green", "blue"]
TOKEN = "s3cret-admin"
PHOTO = encode(asymmetric((90, 60)), "PNG")


def add_version(
    repo: Path, name: str, version: int, *, scale: float = 1.0, padding_bytes: int = 0
) -> Path:
    """A colours classifier as `<repo>/<name>/<version>/model.onnx`, written then renamed into
    place as the docs ask (its metadata names another model and version: the layout wins);
    `padding_bytes` makes it hold that much more memory."""
    staging = repo / f".{name}-{version}"
    staging.mkdir(parents=True)
    classifier(
        staging / "model.onnx",
        scale=scale,
        metadata=metadata_for(COLOURS, 32),
        padding_bytes=padding_bytes,
    )
    target = repo / name / str(version)
    target.parent.mkdir(exist_ok=True)
    staging.rename(target)
    return target / "model.onnx"


def colours_probabilities(scale: float) -> np.ndarray:
    return softmax(expected_logits(preprocess(PHOTO, PreprocessSpec(input_size=32)), scale=scale))[
        0
    ]
