"""A model file's metadata is untrusted: out of bounds, it is refused at load in one line that
names the field and the bound; within them, a real model's metadata still loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model_contract.metadata import (
    MAX_DATASET_CHARS,
    MAX_LABEL_CHARS,
    MAX_LABELS,
    MAX_NAME_CHARS,
    InvalidModelMetadata,
    ModelMetadata,
)
from model_runtime.options import IN_PROCESS
from model_runtime.session import ModelSession
from tests.onnx_models import classifier, metadata_for, nested, restamped

LABELS = ["red", "green", "blue"]


@pytest.mark.parametrize(
    ("props", "says"),
    [
        ({"dataset": json.dumps(nested(300))}, "dataset: Value error, more than 8 levels"),
        ({"dataset": '{"accuracy": NaN}'}, "dataset.accuracy is nan; numbers must be finite"),
        ({"dataset": '{"n": ' + "9" * 5000 + "}"}, "dataset: Exceeds the limit (4300 digits)"),
        ({"dataset": "[" * 100_000}, "dataset: maximum recursion depth exceeded"),
        (
            {"labels": json.dumps(["red", "green", "b" * (MAX_LABEL_CHARS + 1)])},
            "labels: Value error, label 2 has 1,001 characters; at most 1,000",
        ),
        ({"name": "n" * (MAX_NAME_CHARS + 1)}, "name: Value error, 257 characters; at most 256"),
        ({"version": "9" * 1000}, "version: Value error, 1,000 characters; at most 256"),
    ],
    ids=["dataset-300-deep", "nan", "huge-int", "deep-array", "long-label", "name", "version"],
)
def test_metadata_out_of_bounds_is_refused_at_load_in_one_line(
    tmp_path: Path, props: dict[str, str], says: str
) -> None:
    path = classifier(tmp_path / "m.onnx", metadata=metadata_for(LABELS, 32))
    restamped(path, **props)
    with pytest.raises(InvalidModelMetadata) as refused:
        ModelSession(path, IN_PROCESS)
    message = str(refused.value)
    assert "\n" not in message and says in message, message


def test_the_bounds_on_counts_and_sizes_name_the_field_and_the_bound() -> None:
    props = metadata_for(LABELS, 32).to_props()
    too_many = [f"class {i}" for i in range(MAX_LABELS + 1)]
    too_big = {"notes": "x" * MAX_DATASET_CHARS}
    for key, value, says in [
        ("labels", too_many, "labels: Value error, 100,001 labels; at most 100,000"),
        ("dataset", too_big, "dataset: Value error, 100,013 characters as JSON; at most 100,000"),
    ]:
        with pytest.raises(InvalidModelMetadata, match=says.replace("(", r"\(")):
            ModelMetadata.from_props({**props, key: json.dumps(value)})


def test_a_real_models_metadata_is_within_the_bounds(tmp_path: Path) -> None:
    # ImageNet-21k's 21,843 classes, WordNet synonym lists as long as theirs get, and a dataset
    # as deep as the bound allows beside what vit-export writes.
    labels = [f"class {i}, " + "a synonym, " * 20 for i in range(21_843)]
    dataset = {
        "name": "imagenet-21k",
        "config": {"image_size": 224, "patch_size": 16, "width": 768, "depth": 12},
        "deep": nested(7),
        "splits": [[0, 1_000_000], [1_000_000, 1_050_000]],
        "val_accuracy": 0.84,
        "note": None,
    }
    stated = metadata_for(labels, 32, name="v" * MAX_NAME_CHARS, dataset=dataset)
    assert ModelMetadata.from_props(stated.to_props()) == stated


def embedding_only(**fields: object) -> dict[str, str]:
    """The props of a model without classes that serves a 4-float embedding, with `fields`
    (JSON-encoded) replacing its own."""
    test = {"images": ["iVBORw0KGgo="], "embeddings": [[0.5, -1.0, 2.0, 0.0]], "tolerance": 1e-3}
    props = metadata_for(
        [],
        32,
        output="embedding",
        embedding={"output": "embedding", "size": 4, "source": "the class token"},
        self_test=test,
    ).to_props()
    return {**props, **{key: json.dumps(value) for key, value in fields.items()}}


def test_a_model_without_classes_round_trips_through_its_props() -> None:
    metadata = ModelMetadata.from_props(embedding_only())
    assert metadata.output == "embedding" and metadata.labels == () and not metadata.has_classes
    assert metadata.embedding is not None and metadata.embedding.size == 4
    assert metadata.self_test is not None and metadata.self_test.probabilities == ()
    assert metadata.self_test.expected == ((0.5, -1.0, 2.0, 0.0),)
    assert ModelMetadata.from_props(metadata.to_props()) == metadata
    classifier = metadata_for(LABELS, 32, embedding=metadata.embedding)
    assert ModelMetadata.from_props(classifier.to_props()).embedding == metadata.embedding


OOD = {
    "score": "max_softmax",
    "threshold": 0.5,
    "accept_rate": 0.95,
    "calibration_images": 10,
    "calibration_source": "held-out images",
}


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"labels": LABELS}, "a model whose output is its embedding has no labels"),
        ({"embedding": None}, "output embedding needs the embedding's description"),
        ({"ood": OOD}, "a model without classes has no OOD score or attention rollout"),
        (
            {"self_test": {"images": ["x"], "embeddings": [[1.0, 2.0]], "tolerance": 1e-3}},
            "self_test.embeddings must have one column per embedding float",
        ),
        (
            {"self_test": {"images": ["x"], "probabilities": [[1.0]], "tolerance": 1e-3}},
            "self_test.embeddings must have one column per embedding float",
        ),
        (
            {
                "self_test": {
                    "images": ["x"],
                    "probabilities": [[1.0]],
                    "embeddings": [[1.0]],
                    "tolerance": 1e-3,
                }
            },
            "a self-test expects either probabilities or embeddings",
        ),
        (
            {"embedding": {"output": "embedding", "size": 0, "source": ""}},
            "embedding.size: Input should be greater than 0",
        ),
    ],
    ids=["labels", "no-description", "ood", "width", "probabilities", "both", "size"],
)
def test_a_model_without_classes_is_refused_where_its_fields_disagree(
    fields: dict[str, object], says: str
) -> None:
    props = embedding_only(**fields)
    if "embedding" in fields and fields["embedding"] is None:
        del props["embedding"]
    with pytest.raises(InvalidModelMetadata, match=says.replace("(", r"\(")):
        ModelMetadata.from_props(props)


def test_a_classifier_has_classes_and_its_self_test_probabilities() -> None:
    test = {"images": ["x"], "embeddings": [[1.0, 2.0, 3.0]], "tolerance": 1e-3}
    props = metadata_for(LABELS, 32).to_props()
    with pytest.raises(InvalidModelMetadata, match="self_test.embeddings is for a model without"):
        ModelMetadata.from_props({**props, "self_test": json.dumps(test)})
    with pytest.raises(InvalidModelMetadata, match="a classifier needs at least 2 labels"):
        ModelMetadata.from_props({**embedding_only(), "output": "logits"})
