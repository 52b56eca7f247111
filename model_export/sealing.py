"""Writing the one file the service serves: its metadata, onnx's full checker, and its seal
(torch-free, so the ONNX importer does without it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx

from model_contract.metadata import ModelMetadata, OodCalibration
from model_export.embedding import appended_embedding
from model_export.stamp import self_test
from model_runtime.model_file import SEAL_KEY, SEAL_PLACEHOLDER, check_model_bytes, seal
from model_runtime.options import IN_PROCESS
from model_runtime.session import ModelSession

Calibrator = Callable[[onnx.ModelProto, ModelSession], OodCalibration | None]
"""Appends an out-of-distribution score to the graph and calibrates it (None: no calibration)."""


def read_checked(path: Path) -> onnx.ModelProto:
    """The ONNX file at `path`, its bytes checked as the service checks them before it is parsed
    (UnsafeModelFile): parsed from those bytes, nothing else is ever opened."""
    data = path.read_bytes()
    check_model_bytes(data, max_metadata_bytes=IN_PROCESS.max_metadata_bytes)
    return onnx.load_model_from_string(data)


def write_metadata(path: Path, metadata: ModelMetadata, *, producer: str = "vit-export") -> None:
    """Store the metadata in the file (replacing any), checked and sealed (`save_sealed`)."""
    save_sealed(onnx.load_model_from_string(path.read_bytes()), path, metadata, producer=producer)


def save_sealed(
    proto: onnx.ModelProto, path: Path, metadata: ModelMetadata, *, producer: str
) -> None:
    """Write `proto` to `path` as the one file the service serves: `metadata` replacing any,
    onnx's full checker passed, every weight inside, and sealed with the sha256 of its content
    (first among the metadata, so a copy cut short anywhere after the graph is refused)."""
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {SEAL_KEY: SEAL_PLACEHOLDER, **metadata.to_props()})
    proto.producer_name = producer
    onnx.checker.check_model(proto, full_check=True)
    path.write_bytes(seal(proto.SerializeToString()))


def finish_model_file(
    proto: onnx.ModelProto,
    path: Path,
    session: ModelSession,
    metadata: ModelMetadata,
    *,
    calibrate: Calibrator,
    golden: list[bytes],
    measured: float,
    producer: str,
) -> None:
    """The steps that end every tool writing a model file (vit-export and both importers), in
    one place: the out-of-distribution score appended to `proto` and calibrated, the embedding
    appended to a classifier (a model without classes serves its own), the self-test of the
    `golden` images (PNGs at the input size) with the tolerance that `measured`, the file's
    largest difference from its reference (of a probability, or of an embedding for a model
    without classes), allows; then the file saved, checked and sealed. `session` is the checked
    file's, before the score and the embedding were appended."""
    ood = calibrate(proto, session)
    embedding = metadata.embedding
    if metadata.has_classes:
        embedding = appended_embedding(
            proto,
            output=metadata.output_name or proto.graph.output[0].name,
            input_size=metadata.preprocessing.input_size,
        )
    tested = self_test(session, golden, measured=measured)
    finished = metadata.model_copy(update={"ood": ood, "self_test": tested, "embedding": embedding})
    save_sealed(proto, path, finished, producer=producer)
