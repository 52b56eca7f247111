"""Writing the one file the service serves: its metadata, onnx's full checker, and its seal
(torch-free, so the ONNX importer does without it)."""

from __future__ import annotations

from pathlib import Path

import onnx

from model_contract.metadata import ModelMetadata
from model_runtime.model_file import SEAL_KEY, SEAL_PLACEHOLDER, check_model_bytes, seal
from model_runtime.options import IN_PROCESS


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
