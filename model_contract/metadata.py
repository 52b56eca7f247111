"""What an ONNX model says about itself: the `metadata_props` written by vit-export and
vit-import (docs/MODEL-FORMAT.md describes every key)."""

from __future__ import annotations

import json
import math
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from model_contract.preprocess import PreprocessSpec

_JSON_FIELDS = ("labels", "preprocessing", "dataset", "source", "ood", "self_test", "embedding")
REQUIRED_KEYS = ("name", "version", "labels", "preprocessing", "output")
# What vit-export wrote before the spec said how JPEGs are decoded: those files were always
# served with draft decoding, and keep it.
_LEGACY_SPEC_KEYS = frozenset(
    {
        "input_size",
        "resize",
        "interpolation",
        "crop",
        "crop_pct",
        "mean",
        "std",
        "channel_order",
        "layout",
        "alpha_background",
    }
)
# Bounds on what a file may say about itself: its metadata is untrusted input, and every
# /v1/models listing carries it. Each is far above what a real model needs: ImageNet-21k's
# 21,843 labels, WordNet's longest synonym lists (a few hundred characters), and vit-export's
# `dataset` (two levels, under a kilobyte). Validators check them, not field constraints, so
# that the documented JSON schema (docs/MODEL-FORMAT.md) stays the code's.
MAX_NAME_CHARS = 256
"""`name` and `version`: they reach URLs, metric labels and answers."""
MAX_LABELS = 100_000
MAX_LABEL_CHARS = 1_000
MAX_DATASET_DEPTH = 8
"""Levels of nesting in `dataset`: the dataset object itself is the first."""
MAX_DATASET_CHARS = 100_000
"""`dataset` as JSON."""
MAX_EMBEDDING_SIZE = 65_536
"""Floats in one image's embedding: ViT-g's is 1,536 wide."""


class InvalidModelMetadata(ValueError):
    """The model file lacks what the service needs to serve it."""


class OodCalibration(BaseModel):
    """How to tell an image unlike the model's training images: a score, of the classification
    output (`model_contract.ood.ood_scores`) or a graph output of its own (`ood_score`), and the
    threshold that accepts most in-distribution images."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    score: Literal["max_softmax", "energy", "mahalanobis", "mahalanobis_energy"] = Field(
        description="max_softmax: the top probability; energy: logsumexp of the logits (the "
        "negative energy); mahalanobis: the graph output ood_score, float32 [N], minus the "
        "smallest squared Mahalanobis distance of the classification head's input features to "
        "the class means (shared covariance); mahalanobis_energy: the graph output ood_score, "
        "the smaller of the mahalanobis and energy scores, each standardised on in-distribution "
        "images (0 at its median, -1 at its 1st percentile), so that either one finding an "
        "image unusual flags it. Higher is more in-distribution each way."
    )
    threshold: float = Field(description="An image is in distribution iff its score is >= this.")
    accept_rate: float = Field(
        gt=0, le=1, description="The fraction of the calibration images the threshold accepts."
    )
    calibration_images: int = Field(gt=0, description="How many images the threshold was set on.")
    calibration_source: str = Field(
        description="What the calibration images were (for mahalanobis, also the other "
        "in-distribution images the class means and covariance were fitted on)."
    )
    choice: str | None = Field(
        default=None,
        description="Why this score: the share of images unlike the model's own that each "
        "candidate score flagged at the same acceptance (None: the only candidate).",
    )
    held_out_images: int | None = Field(
        default=None,
        gt=0,
        description="In-distribution images used neither to fit the score nor to set the "
        "threshold, on which the flag was measured (None: too few images to keep any apart).",
    )
    held_out_flagged: int | None = Field(
        default=None, ge=0, description="How many of the held-out images the threshold flags."
    )


class SelfTest(BaseModel):
    """Golden images and what the written model answers for them, for a check at startup
    through the whole serving path: their probabilities, or for a model without classes, their
    embeddings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    images: tuple[str, ...] = Field(
        min_length=1, description="Small images (base64 PNG) at the model's input size."
    )
    probabilities: tuple[tuple[float, ...], ...] = Field(
        (),
        description="Expected probabilities, one row per image, one column per label: "
        "model_contract.preprocess.preprocess_upload, then the model as written. Empty for a "
        "model without classes.",
    )
    embeddings: tuple[tuple[float, ...], ...] = Field(
        (),
        description="Expected embeddings, one row per image, for a model without classes "
        "(output `embedding`); empty otherwise.",
    )
    tolerance: float = Field(
        gt=0,
        allow_inf_nan=False,  # an infinite tolerance would pass any numbers
        description="The largest |difference| of any expected value that still passes: the "
        "measured difference of the written file from the FP32 reference, with a margin.",
    )

    @model_validator(mode="after")
    def _one_row_per_image(self) -> SelfTest:
        if bool(self.probabilities) == bool(self.embeddings):
            raise ValueError("a self-test expects either probabilities or embeddings")
        if len(self.expected) != len(self.images):
            raise ValueError("the expected values must have one row per image")
        return self

    @property
    def expected(self) -> tuple[tuple[float, ...], ...]:
        """The expected rows, whichever output they are of."""
        return self.probabilities or self.embeddings


class Embedding(BaseModel):
    """The vector the classification head reads (for a ViT, the class token after the final
    normalisation), served as the output `embedding` for search, deduplication and few-shot
    classifiers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    output: str = Field(min_length=1, description="The graph output holding it, float32 [N, size].")
    size: int = Field(gt=0, le=MAX_EMBEDDING_SIZE, description="Floats per image.")
    source: str = Field(
        max_length=MAX_LABEL_CHARS,
        description="What it is, in words: which tensor of the graph, and for a model with two "
        "heads, which head's and why.",
    )


class ModelMetadata(BaseModel):
    """Everything the service needs to serve a model, stored as string pairs in the file:
    JSON for labels, preprocessing, dataset, source, ood and self_test, plain strings for the
    rest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, description="The model's name in URLs and answers.")
    version: str = Field(min_length=1, description="The model's version, a string.")
    labels: tuple[str, ...] = Field(
        description="Class names, in the order of the output's columns: at least two; none "
        "for a model without classes (output `embedding`)."
    )
    preprocessing: PreprocessSpec = Field(description="How an upload becomes the model's input.")
    output: Literal["logits", "probabilities", "embedding"] = Field(
        description="What the output holds: softmax is applied to logits, never twice; "
        "embedding: the model has no classes and serves its embedding only."
    )
    output_name: str | None = Field(
        None, description="The graph output to serve, where it has several; null: the first."
    )
    precision: Literal["fp32", "fp16", "int8", "bf16"] = Field(
        "fp32",
        description="The weights' precision (int8: activations quantized per call, so each "
        "image is run in a call of its own; bf16: FP32 weights that passed the bf16 accuracy "
        "gate, run in bf16 where the CPU computes it, at FP32 elsewhere); input and output are "
        "float32 either way.",
    )
    dataset: dict[str, object] = Field(
        default_factory=dict, description="What the model was trained and evaluated on."
    )
    held_out_accuracy: float | None = Field(
        None, description="Top-1 accuracy on images never seen in training, where measured."
    )
    checkpoint_sha256: str = Field(
        "", description="sha256 of the checkpoint or weights file the graph was made from."
    )
    source: dict[str, str] = Field(
        default_factory=dict,
        description="Where an imported model came from: importer, model_type, source.",
    )
    attention_output: str | None = Field(
        None,
        description="The graph output holding the class token's attention rollout over the "
        "patches, float32 [N, grid, grid]; null: the model has none.",
    )
    ood: OodCalibration | None = Field(
        None, description="The out-of-distribution score and threshold; null: not calibrated."
    )
    self_test: SelfTest | None = Field(
        None, description="Golden images and expected probabilities for a startup check."
    )
    embedding: Embedding | None = Field(
        None, description="The embedding the model serves beside its classes; null: none."
    )

    @field_validator("name", "version")
    @classmethod
    def _short_name(cls, value: str) -> str:
        if len(value) > MAX_NAME_CHARS:
            raise ValueError(f"{len(value):,} characters; at most {MAX_NAME_CHARS}")
        return value

    @field_validator("labels")
    @classmethod
    def _bounded_labels(cls, labels: tuple[str, ...]) -> tuple[str, ...]:
        if len(labels) > MAX_LABELS:
            raise ValueError(f"{len(labels):,} labels; at most {MAX_LABELS:,}")
        for index, label in enumerate(labels):
            if len(label) > MAX_LABEL_CHARS:
                raise ValueError(
                    f"label {index} has {len(label):,} characters; at most {MAX_LABEL_CHARS:,}"
                )
        return labels

    @field_validator("dataset")
    @classmethod
    def _bounded_dataset(cls, dataset: dict[str, object]) -> dict[str, object]:
        _check_json_value(dataset, "dataset", 1)
        size = len(json.dumps(dataset, ensure_ascii=False))
        if size > MAX_DATASET_CHARS:
            raise ValueError(f"{size:,} characters as JSON; at most {MAX_DATASET_CHARS:,}")
        return dataset

    @model_validator(mode="after")
    def _consistent(self) -> ModelMetadata:
        if self.output == "embedding":
            self._check_embedding_only()
        elif len(self.labels) < 2:
            raise ValueError("labels: a classifier needs at least 2 labels")
        if self.ood is not None and self.ood.score == "energy" and self.output != "logits":
            raise ValueError("the energy score needs logits; probabilities use max_softmax")
        test = self.self_test
        if test is not None and test.embeddings and self.output != "embedding":
            raise ValueError("self_test.embeddings is for a model without classes")
        if test is not None and any(len(row) != len(self.labels) for row in test.probabilities):
            raise ValueError("self_test.probabilities must have one column per label")
        return self

    def _check_embedding_only(self) -> None:
        """A model without classes: its one output is the embedding, and nothing reads classes."""
        if self.labels:
            raise ValueError("a model whose output is its embedding has no labels")
        if self.embedding is None:
            raise ValueError("output embedding needs the embedding's description")
        if self.ood is not None or self.attention_output is not None:
            raise ValueError("a model without classes has no OOD score or attention rollout")
        test = self.self_test
        if test is not None and (
            test.probabilities or any(len(row) != self.embedding.size for row in test.embeddings)
        ):
            raise ValueError("self_test.embeddings must have one column per embedding float")

    @property
    def has_classes(self) -> bool:
        """Whether the model classifies (otherwise it serves embeddings only)."""
        return self.output != "embedding"

    @property
    def images_per_call(self) -> int | None:
        return images_per_call(self.precision)

    def to_props(self) -> dict[str, str]:
        props: dict[str, str] = {}
        for key, value in self.model_dump(mode="json").items():
            if value is None:
                continue
            props[key] = json.dumps(value) if key in _JSON_FIELDS else str(value)
        return props

    @classmethod
    def from_props(cls, props: dict[str, str]) -> ModelMetadata:
        missing = [key for key in REQUIRED_KEYS if key not in props]
        if missing:
            raise InvalidModelMetadata(
                f"the model's metadata lacks {', '.join(missing)}; stamp it with "
                "`vit-import onnx MODEL.onnx --labels LABELS -o MODEL.onnx` "
                "(docs/BRING-YOUR-OWN-MODEL.md)"
            )
        known = {key: value for key, value in props.items() if key in cls.model_fields}
        try:
            decoded = {k: _decoded(k, v) if k in _JSON_FIELDS else v for k, v in known.items()}
            spec = decoded["preprocessing"]
            if isinstance(spec, dict) and set(spec) == _LEGACY_SPEC_KEYS:
                decoded["preprocessing"] = {**spec, "jpeg_draft": True}
            return cls.model_validate(decoded)
        except ValueError as error:  # ValidationError is one
            reason = one_line(error) if isinstance(error, ValidationError) else str(error)
            raise InvalidModelMetadata(
                f"the model's metadata is malformed ({reason}); see docs/MODEL-FORMAT.md"
            ) from error


def _decoded(key: str, text: str) -> object:
    """`text` as JSON, or a ValueError naming `key`: json refuses malformed text, integers of
    over 4,300 digits (ValueError) and arrays nested thousands deep (RecursionError)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        raise ValueError(f"{key}: {error}") from error


def _check_json_value(value: object, path: str, depth: int) -> None:
    """Refuse anything in `dataset` that is not plain JSON (string keys, finite numbers) or that
    nests deeper than MAX_DATASET_DEPTH, saying where (`path`, cut short: keys may be long)."""
    where = path if len(path) <= 120 else f"{path[:117]}..."
    if isinstance(value, dict | list | tuple) and depth > MAX_DATASET_DEPTH:
        raise ValueError(f"more than {MAX_DATASET_DEPTH} levels of nesting, at {where}")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} has a key of type {type(key).__name__}, not a string")
            _check_json_value(item, f"{path}.{key}", depth + 1)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_json_value(item, f"{path}[{index}]", depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is {value}; numbers must be finite")
    elif not isinstance(value, str | int | float | None):  # bool is an int
        raise ValueError(f"{where} is of type {type(value).__name__}, not a JSON value")


def images_per_call(precision: str | None) -> int | None:
    """Images one onnxruntime call may hold at `precision`: one for int8, whose activations take
    one scale per call from the whole batch (an image's answer would move with its neighbours',
    other clients' images); None: any number."""
    return 1 if precision == "int8" else None


def last_line(error: BaseException) -> str:
    """An error's last line (its message, where a tool's traceback text precedes it), for
    one-line refusals."""
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__


def one_line(error: ValidationError) -> str:
    """A validation error as `field: message; ...`, for one-line refusals."""
    return "; ".join(
        f"{'.'.join(str(part) for part in e['loc']) or 'value'}: {e['msg']}" for e in error.errors()
    )
