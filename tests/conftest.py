"""Fixtures shared across test modules: a tiny trained checkpoint and its exported ONNX file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Servers the tests start listen for gRPC only where a test asks for a port: the default 8001
# may be taken, and several servers run side by side.
os.environ.setdefault("VIT_GRPC_PORT", "0")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "shapes-vit.onnx"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-block ViT trained for a few steps: real training code, seconds of CPU."""
    pytest.importorskip("torch")
    from model_export.train import parse_args, train

    path = tmp_path_factory.mktemp("checkpoint") / "tiny.pt"
    args = parse_args(
        [
            "--depth",
            "2",
            "--image-size",
            "64",
            "--train-count",
            "256",
            "--val-count",
            "64",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--lr",
            "3e-3",
            "--workers",
            "1",
            "--no-bf16",
            "--name",
            "tiny-shapes",
            "-o",
            str(path),
        ]
    )
    train(args).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_onnx(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model_export.export import export

    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    parity, _ = export(
        tiny_checkpoint, path, version="7", eval_seed=99, eval_count=64, calibration_count=64
    )
    assert isinstance(parity, list)
    assert all(case.passed for case in parity), [case.line() for case in parity]
    return path


@pytest.fixture(scope="session")
def served_model() -> Path:
    """The bundled default model: what `make serve` serves."""
    assert DEFAULT_MODEL.exists(), "models/shapes-vit.onnx is part of the repository"
    return DEFAULT_MODEL
