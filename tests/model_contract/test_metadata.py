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
