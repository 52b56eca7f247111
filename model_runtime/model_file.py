"""A model file read as untrusted input: one self-contained ONNX file, its metadata bounded, its
content matching its seal, checked on the bytes before onnxruntime sees them.

onnxruntime resolves an initializer's external data against the working directory when it is
given a model as bytes (and against the model's folder when given a path), so a 1 KB graph could
serve any file the server can read as its weights. The served format is one file: any tensor
that keeps its data elsewhere is refused, and so is a node that loads a file of its own (an
execution provider's `EPContext` cache). Reading the protobuf wire format directly keeps the
serving path free of the `onnx` package and costs one pass over the file's structure (weights are
skipped, not read).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from model_contract.metadata import InvalidModelMetadata

SEAL_KEY = "content_sha256"
"""The metadata entry holding the sha256 of everything else in the file (see `content_digest`).
Files written by vit-export and vit-import carry it first among their metadata, so a copy cut
short anywhere after the graph no longer matches it."""
SEAL_PLACEHOLDER = "0" * 64
ONNX_FORMAT_ONLY = ("session.load_model_format", "ONNX")
"""The session option that makes onnxruntime read the bytes as ONNX only, never as its own ORT
format, which the checks here do not read."""

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5

# Field numbers of onnx.proto3 that can hold a tensor, a graph or a file reference.
_MODEL_GRAPH, _MODEL_METADATA, _MODEL_TRAINING, _MODEL_FUNCTIONS = 7, 14, 20, 25
_TRAINING_GRAPHS = (1, 2)  # TrainingInfoProto: initialization, algorithm
_GRAPH_NODES, _GRAPH_INITIALIZERS, _GRAPH_SPARSE = 1, 5, 15
_NODE_NAME, _NODE_OP_TYPE, _NODE_ATTRIBUTES = 3, 4, 5
_FUNCTION_NODES, _FUNCTION_DEFAULTS = 7, 11  # FunctionProto: node, attribute_proto
_ATTRIBUTE_TENSOR, _ATTRIBUTE_GRAPH, _ATTRIBUTE_TENSORS, _ATTRIBUTE_GRAPHS = 5, 6, 10, 11
_ATTRIBUTE_SPARSE, _ATTRIBUTE_SPARSES = 22, 23
_SPARSE_PARTS = (1, 2)  # SparseTensorProto: values, indices
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_ENUM_BITS = 0xFFFFFFFF
_MAX_TAG = 1 << 32
_MAX_LENGTH = 1 << 31
MAX_FILE_BYTES = 1 << 31
"""protobuf's limit on one message, so on one ONNX file."""

FILE_LOADING_OPS = frozenset({"EPContext"})
"""Operators that read a file named in their attributes (a compiled engine beside the model)."""
MAX_NESTING = 64
"""Subgraphs within subgraphs a file may nest (Loop in If in Scan ...); deeper is no ViT."""


class UnsafeModelFile(InvalidModelMetadata):
    """The file is not one self-contained, intact model the service may load."""


@dataclass(frozen=True)
class _Field:
    number: int
    wire_type: int
    start: int
    """Where the field's tag begins (for hashing whole fields)."""
    value_start: int
    end: int
    varint: int = 0


def _read_varint(data: memoryview, position: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= end or shift > 63:
            raise UnsafeModelFile("not an ONNX model: a malformed protobuf varint")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7


def _fields(data: memoryview, start: int, end: int) -> Iterator[_Field]:
    """The protobuf fields of the message in data[start:end], in file order."""
    position = start
    while position < end:
        tag, value_start = _read_varint(data, position, end)
        if tag >= _MAX_TAG:
            # protobuf's C++ parser, onnxruntime's, keeps a tag's low 32 bits: a wider one
            # would be one field here and another there.
            raise UnsafeModelFile("not an ONNX model: a protobuf tag wider than 32 bits")
        number, wire_type = tag >> 3, tag & 7
        varint = 0
        if wire_type == _VARINT:
            varint, field_end = _read_varint(data, value_start, end)
        elif wire_type == _FIXED64:
            field_end = value_start + 8
        elif wire_type == _FIXED32:
            field_end = value_start + 4
        elif wire_type == _LENGTH:
            length, value_start = _read_varint(data, value_start, end)
            if length >= _MAX_LENGTH:
                raise UnsafeModelFile("not an ONNX model: a protobuf field over 2 GB")
            field_end = value_start + length
        else:
            raise UnsafeModelFile(f"not an ONNX model: protobuf wire type {wire_type}")
        if number == 0 or field_end > end:
            raise UnsafeModelFile("not an ONNX model: a protobuf field runs past its message")
        yield _Field(number, wire_type, position, value_start, field_end, varint)
        position = field_end


def _messages(data: memoryview, start: int, end: int, number: int) -> Iterator[_Field]:
    for field in _fields(data, start, end):
        if field.number == number and field.wire_type == _LENGTH:
            yield field


def _text(data: memoryview, field: _Field) -> str:
    return bytes(data[field.value_start : field.end]).decode("utf-8", "replace")


def _entry(data: memoryview, entry: _Field) -> tuple[str, str, _Field | None]:
    """A StringStringEntryProto's key, value and the value's field."""
    key, value, value_field = "", "", None
    for field in _fields(data, entry.value_start, entry.end):
        if field.wire_type != _LENGTH:
            continue
        if field.number == _ENTRY_KEY:
            key = _text(data, field)
        elif field.number == _ENTRY_VALUE:
            value, value_field = _text(data, field), field
    return key, value, value_field


def _check_tensor(data: memoryview, tensor: _Field, where: str) -> None:
    name = ""
    external = False
    for field in _fields(data, tensor.value_start, tensor.end):
        if field.number == _TENSOR_NAME and field.wire_type == _LENGTH:
            name = _text(data, field)
        elif field.number == _TENSOR_EXTERNAL_DATA:
            external = True
        elif field.number == _TENSOR_DATA_LOCATION and field.varint & _ENUM_BITS:
            external = True  # an enum is 32 bits there: anything but DEFAULT (0) is refused
    if external:
        raise UnsafeModelFile(
            f"the tensor {name or '(unnamed)'!r} ({where}) keeps its data in another file; the "
            "service loads one self-contained file and never reads files beside it: save the "
            "model as one file with every weight inside it"
        )


def _check_graph(data: memoryview, graph: _Field, where: str, depth: int) -> None:
    if depth > MAX_NESTING:
        raise UnsafeModelFile(f"the graph nests subgraphs over {MAX_NESTING} deep ({where})")
    for field in _fields(data, graph.value_start, graph.end):
        if field.wire_type != _LENGTH:
            continue
        if field.number == _GRAPH_INITIALIZERS:
            _check_tensor(data, field, f"an initializer of {where}")
        elif field.number == _GRAPH_SPARSE:
            for part in _SPARSE_PARTS:
                for tensor in _messages(data, field.value_start, field.end, part):
                    _check_tensor(data, tensor, f"a sparse initializer of {where}")
        elif field.number == _GRAPH_NODES:
            _check_node(data, field, where, depth)


def _check_node(data: memoryview, node: _Field, where: str, depth: int) -> None:
    name = op_type = ""
    attributes = []
    for field in _fields(data, node.value_start, node.end):
        if field.wire_type != _LENGTH:
            continue
        if field.number == _NODE_NAME:
            name = _text(data, field)
        elif field.number == _NODE_OP_TYPE:
            op_type = _text(data, field)
        elif field.number == _NODE_ATTRIBUTES:
            attributes.append(field)
    here = f"node {name or '(unnamed)'!r} ({op_type}) in {where}"
    if op_type in FILE_LOADING_OPS:
        raise UnsafeModelFile(
            f"the {here} loads a file of its own; the service serves one self-contained file"
        )
    for attribute in attributes:
        _check_attribute(data, attribute, f"the {here}", depth)


def _check_attribute(data: memoryview, attribute: _Field, owner: str, depth: int) -> None:
    for field in _fields(data, attribute.value_start, attribute.end):
        if field.wire_type != _LENGTH:
            continue
        if field.number in (_ATTRIBUTE_TENSOR, _ATTRIBUTE_TENSORS):
            _check_tensor(data, field, f"an attribute of {owner}")
        elif field.number in (_ATTRIBUTE_SPARSE, _ATTRIBUTE_SPARSES):
            for part in _SPARSE_PARTS:
                for tensor in _messages(data, field.value_start, field.end, part):
                    _check_tensor(data, tensor, f"an attribute of {owner}")
        elif field.number in (_ATTRIBUTE_GRAPH, _ATTRIBUTE_GRAPHS):
            _check_graph(data, field, f"a subgraph of {owner}", depth + 1)


@dataclass(frozen=True)
class ModelFile:
    """A model file's bytes, checked: self-contained, its metadata within bounds and, where it
    carries a seal, intact."""

    data: bytes = dataclasses.field(repr=False)
    metadata_bytes: int
    sealed: bool


def check_model_bytes(data: bytes, *, max_metadata_bytes: int) -> ModelFile:
    """`data` as a `ModelFile`, or UnsafeModelFile naming what is wrong: a tensor or node that
    reaches another file, metadata over `max_metadata_bytes`, or content that does not match
    the file's seal."""
    view = memoryview(data)
    graphs = 0
    metadata_bytes = 0
    seal: str | None = None
    for field in _fields(view, 0, len(view)):
        if field.wire_type != _LENGTH:
            continue
        if field.number == _MODEL_GRAPH:
            graphs += 1
            _check_graph(view, field, "the main graph", 0)
        elif field.number == _MODEL_METADATA:
            metadata_bytes += field.end - field.value_start
            key, value, _ = _entry(view, field)
            if key == SEAL_KEY:
                seal = value
        elif field.number == _MODEL_TRAINING:
            for number in _TRAINING_GRAPHS:
                for graph in _messages(view, field.value_start, field.end, number):
                    _check_graph(view, graph, "a training graph", 0)
        elif field.number == _MODEL_FUNCTIONS:
            for node in _messages(view, field.value_start, field.end, _FUNCTION_NODES):
                _check_node(view, node, "a function", 0)
            for default in _messages(view, field.value_start, field.end, _FUNCTION_DEFAULTS):
                _check_attribute(view, default, "a function's defaults", 0)
    if not graphs:
        raise UnsafeModelFile("not an ONNX model: the file holds no graph")
    if metadata_bytes > max_metadata_bytes:
        raise UnsafeModelFile(
            f"the model's metadata holds {metadata_bytes} bytes, over VIT_MAX_METADATA_BYTES "
            f"({max_metadata_bytes})"
        )
    if seal is not None and seal != content_digest(data):
        raise UnsafeModelFile(
            f"the file's content does not match its {SEAL_KEY}: it was cut short or changed "
            "after it was written; copy it again, or export or import it afresh"
        )
    return ModelFile(data, metadata_bytes, seal is not None)


def read_model_file(path: Path, *, max_metadata_bytes: int) -> ModelFile:
    """The file at `path`, checked (see `check_model_bytes`); never more than one ONNX file can
    hold is read (a sparse file may claim any size and cost no disk)."""
    with path.open("rb") as file:
        too_big = os.fstat(file.fileno()).st_size > MAX_FILE_BYTES
        data = b"" if too_big else file.read(MAX_FILE_BYTES + 1)
    if too_big or len(data) > MAX_FILE_BYTES:
        raise UnsafeModelFile(
            f"the file is over the {MAX_FILE_BYTES >> 30} GB one ONNX file can hold"
        )
    return check_model_bytes(data, max_metadata_bytes=max_metadata_bytes)


def content_digest(data: bytes) -> str:
    """sha256 of every top-level field of the file but its seal entry, in file order: the
    graph, the opsets, the functions and every other metadata entry."""
    view = memoryview(data)
    digest = hashlib.sha256()
    for field in _fields(view, 0, len(view)):
        if field.number == _MODEL_METADATA and field.wire_type == _LENGTH:
            if _entry(view, field)[0] == SEAL_KEY:
                continue
        digest.update(view[field.start : field.end])
    return digest.hexdigest()


def seal(data: bytes) -> bytes:
    """`data` with its seal entry, written with `SEAL_PLACEHOLDER` as its value, filled in."""
    view = memoryview(data)
    for field in _messages(view, 0, len(view), _MODEL_METADATA):
        key, value, value_field = _entry(view, field)
        if key == SEAL_KEY and value == SEAL_PLACEHOLDER and value_field is not None:
            digest = content_digest(data).encode()
            start = value_field.value_start
            return data[:start] + digest + data[start + len(digest) :]
    raise ValueError(f"the model has no {SEAL_KEY} entry holding the placeholder to fill in")
