"""The bundled model: small, self-describing, and as accurate on unseen images as it states."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from model_contract.preprocess import PreprocessSpec
from model_export import shapes
from model_export.evaluate import evaluate
from model_runtime.options import IN_PROCESS
from model_runtime.session import ModelSession
from tests.conftest import ROOT

# Never used by vit-train (seed 0) or vit-export (seed 1000003) for the bundled model.
UNSEEN_SEED = 31337
# The product's promise for the bundled model (README, "The bundled model": it measured 98.75%).
MINIMUM_ACCURACY = 0.97


@pytest.fixture(scope="module")
def session(served_model: Path) -> ModelSession:
    return ModelSession(served_model, IN_PROCESS)


def test_is_the_64_patch_vit_ti_under_25_mb(session: ModelSession, served_model: Path) -> None:
    assert served_model.stat().st_size < 25 * 1024 * 1024
    config = session.metadata.dataset["config"]
    assert isinstance(config, dict)
    assert (config["image_size"], config["patch_size"], config["width"]) == (128, 16, 192)
    assert config["depth"] == 6
    assert session.metadata.preprocessing == PreprocessSpec(input_size=128, jpeg_draft=True)
    assert session.labels == shapes.LABELS


def test_metadata_states_its_held_out_accuracy(session: ModelSession) -> None:
    accuracy = session.metadata.held_out_accuracy
    assert accuracy is not None and accuracy >= MINIMUM_ACCURACY
    assert session.metadata.dataset["held_out_count"] == 2000
    assert session.metadata.dataset["held_out_seed"] != session.metadata.dataset["seed"]


def test_unseen_images_confirm_the_stated_accuracy(session: ModelSession) -> None:
    seeds = (session.metadata.dataset["seed"], session.metadata.dataset["held_out_seed"])
    assert UNSEEN_SEED not in seeds
    result = evaluate(session, seed=UNSEEN_SEED, count=2000)
    stated = session.metadata.held_out_accuracy
    assert result.count == 2000 and stated is not None
    assert result.accuracy >= MINIMUM_ACCURACY, result.report()
    # Two independent samples of 2,000 at ~98.75%: the standard error of their difference is
    # 0.35 points, so 1.5 points is over four of them.
    assert abs(result.accuracy - stated) < 0.015, result.report()


def test_vit_eval_prints_accuracy_and_confusion(served_model: Path) -> None:
    output = subprocess.run(
        [
            sys.executable,
            "-m",
            "model_export.evaluate",
            str(served_model),
            "--dataset",
            "shapes",
            "--seed",
            "99",
            "--count",
            "64",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout
    engine, accuracy, *_ = output.splitlines()
    assert engine == "onnxruntime fp32: the file's precision, fp32"
    assert accuracy.startswith("accuracy ") and "(rows: true, columns: predicted)" in output
    assert all(label in output for label in shapes.LABELS)
