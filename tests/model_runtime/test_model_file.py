"""A model file's bytes checked before onnxruntime sees them: nothing in it reaches another file,
its metadata is bounded, and a sealed file matches its seal."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from model_export.sealing import write_metadata
from model_runtime.model_file import (
    SEAL_KEY,
    UnsafeModelFile,
    check_model_bytes,
    content_digest,
    read_model_file,
)
from model_runtime.options import IN_PROCESS
from model_runtime.session import ModelSession
from tests.hostile_models import COLOURS, SIZE, epcontext, external_data
from tests.onnx_models import classifier, metadata_for

SECRET = b"the server's private key, not a model's weights"
BOUND = IN_PROCESS.max_metadata_bytes


def test_a_file_that_points_onnxruntime_at_another_file_is_refused_naming_the_tensor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "secret.txt").write_bytes(SECRET)
    monkeypatch.chdir(tmp_path)
    model = external_data(tmp_path / "repo" / "thief" / "1" / "model.onnx", "secret.txt", 3)
    # The attack is real: onnxruntime, given the bytes, reads the file beside the server.
    raw = ort.InferenceSession(model.read_bytes(), providers=["CPUExecutionProvider"])
    logits = raw.run(None, {"pixels": np.zeros((1, 3, SIZE, SIZE), np.float32)})[0]
    np.testing.assert_allclose(logits[0] * 100, list(SECRET[:3]), atol=1e-3)

    with pytest.raises(UnsafeModelFile, match="the tensor 'stolen' .* keeps its data in an"):
        ModelSession(model, IN_PROCESS)


def _one_node_graph(node: onnx.NodeProto, **graph: object) -> bytes:
    model = helper.make_model(
        helper.make_graph(
            [node],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.BOOL, [])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            **graph,  # type: ignore[arg-type]
        )
    )
    return bytes(model.SerializeToString())


def _external(name: str) -> onnx.TensorProto:
    tensor = numpy_helper.from_array(np.zeros(3, np.float32), name)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "/etc/passwd"
    return tensor


def _in_a_subgraph() -> bytes:
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["k"], value=_external("deep"))],
        "branch",
        [],
        [helper.make_tensor_value_info("k", TensorProto.FLOAT, [3])],
    )
    node = helper.make_node("If", ["x"], ["y"], then_branch=branch, else_branch=branch)
    return _one_node_graph(node)


def _sparse() -> bytes:
    values = _external("sparse_values")
    indices = numpy_helper.from_array(np.array([0, 1, 2], np.int64), "indices")
    sparse = helper.make_sparse_tensor(values, indices, [3])
    return _one_node_graph(
        helper.make_node("Identity", ["sparse_values"], ["y"]), sparse_initializer=[sparse]
    )


def _in_a_function() -> bytes:
    constant = helper.make_node("Constant", [], ["k"], value=_external("in_function"))
    function = helper.make_function("local", "Leak", [], ["k"], [constant], [])
    model = onnx.ModelProto()
    model.ParseFromString(_one_node_graph(helper.make_node("Leak", [], ["y"], domain="local")))
    model.functions.append(function)
    return bytes(model.SerializeToString())


def _a_functions_default() -> bytes:
    default = helper.make_attribute("weights", _external("default"))
    function = helper.make_function("local", "Leak", [], ["k"], [], [])
    function.attribute_proto.append(default)
    model = onnx.ModelProto()
    model.ParseFromString(_one_node_graph(helper.make_node("Leak", [], ["y"], domain="local")))
    model.functions.append(function)
    return bytes(model.SerializeToString())


@pytest.mark.parametrize(
    ("build", "tensor"),
    [
        (
            lambda: _one_node_graph(helper.make_node("Constant", [], ["y"], value=_external("c"))),
            "c",
        ),
        (_in_a_subgraph, "deep"),
        (_sparse, "sparse_values"),
        (_in_a_function, "in_function"),
        (_a_functions_default, "default"),
        (
            lambda: _one_node_graph(
                helper.make_node("Identity", ["w"], ["y"]), initializer=[_external("w")]
            ),
            "w",
        ),
    ],
    ids=["constant", "subgraph", "sparse", "function", "function-default", "initializer"],
)
def test_external_data_anywhere_in_the_file_is_refused(build: object, tensor: str) -> None:
    assert callable(build)
    with pytest.raises(UnsafeModelFile, match=f"the tensor '{tensor}'"):
        check_model_bytes(build(), max_metadata_bytes=BOUND)


def test_a_node_that_loads_an_engine_file_is_refused(tmp_path: Path) -> None:
    model = epcontext(tmp_path / "model.onnx", "/etc/passwd")
    with pytest.raises(UnsafeModelFile, match=r"\(EPContext\) in the main graph loads a file"):
        read_model_file(model, max_metadata_bytes=BOUND)


def test_metadata_over_its_bound_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    model = classifier(tmp_path / "model.onnx", metadata=metadata_for(COLOURS, 32))
    proto = onnx.load(str(model))
    notes = proto.metadata_props.add()  # any key counts, known or not
    notes.key, notes.value = "notes", "x" * 100_000
    onnx.save(proto, str(model))
    assert read_model_file(model, max_metadata_bytes=200_000).metadata_bytes > 100_000
    with pytest.raises(UnsafeModelFile, match="over VIT_MAX_METADATA_BYTES"):
        read_model_file(model, max_metadata_bytes=100_000)


@pytest.mark.parametrize("data", [b"", b"not a model", b"\xff" * 64])
def test_bytes_that_are_no_onnx_model_are_refused_in_one_line(data: bytes) -> None:
    with pytest.raises(UnsafeModelFile, match="not an ONNX model"):
        check_model_bytes(data, max_metadata_bytes=BOUND)


@pytest.fixture()
def sealed(tmp_path: Path) -> Path:
    """A model written as the exporters write one: sealed, with a self-test entry last."""
    model = classifier(tmp_path / "model.onnx", metadata=metadata_for(COLOURS, 32))
    metadata = metadata_for(COLOURS, 32, held_out_accuracy=0.5)
    write_metadata(model, metadata, producer="test")
    return model


def test_files_the_exporters_write_are_sealed_and_load(sealed: Path) -> None:
    checked = read_model_file(sealed, max_metadata_bytes=BOUND)
    assert checked.sealed
    props = [p.key for p in onnx.load(str(sealed)).metadata_props]
    assert props[0] == SEAL_KEY  # first, so that a copy cut short keeps it
    assert ModelSession(sealed, IN_PROCESS).metadata.held_out_accuracy == 0.5


def test_a_copy_cut_short_between_metadata_entries_is_refused(sealed: Path) -> None:
    data = sealed.read_bytes()
    # Cut just before the last metadata entry: what remains is a valid protobuf that
    # onnxruntime would load, less that entry.
    cut = data.rindex(b"held_out_accuracy") - 4
    while not _parses(data[:cut]):
        cut -= 1
    with pytest.raises(UnsafeModelFile, match=f"does not match its {SEAL_KEY}: it was cut short"):
        check_model_bytes(data[:cut], max_metadata_bytes=BOUND)


def _parses(data: bytes) -> bool:
    try:
        onnx.load_model_from_string(data)
    except Exception:
        return False
    return True


def test_a_changed_weight_is_refused(sealed: Path) -> None:
    data = bytearray(sealed.read_bytes())
    weights = numpy_helper.from_array(
        np.arange(9, dtype=np.float32).reshape(3, 3) - 2, "weights"
    ).raw_data
    at = bytes(data).index(weights)
    data[at] ^= 1
    assert content_digest(bytes(data)) != content_digest(sealed.read_bytes())
    with pytest.raises(UnsafeModelFile, match="does not match"):
        check_model_bytes(bytes(data), max_metadata_bytes=BOUND)


def test_an_unsealed_file_still_loads(tmp_path: Path) -> None:
    """Files stamped by hand (docs/MODEL-FORMAT.md) carry no seal: nothing to hold them to."""
    model = classifier(tmp_path / "model.onnx", metadata=metadata_for(COLOURS, 32))
    assert not read_model_file(model, max_metadata_bytes=BOUND).sealed
    assert ModelSession(model, IN_PROCESS).labels == tuple(COLOURS)


def test_no_session_opens_a_file_by_its_path(tmp_path: Path) -> None:
    """The file is read once and checked; onnxruntime gets those bytes, so a file swapped
    after the check is never what runs."""
    model = classifier(tmp_path / "model.onnx", metadata=metadata_for(COLOURS, 32))
    session = ModelSession(model, IN_PROCESS)
    os.remove(model)
    assert session.predict(np.zeros((1, 3, 32, 32), np.float32)).shape == (1, 3)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _length_field(tag: int, payload: bytes) -> bytes:
    return _varint(tag) + _varint(len(payload)) + payload


def test_a_tag_wider_than_32_bits_cannot_hide_a_field_from_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """protobuf's C++ parser keeps a tag's low 32 bits: an initializer tagged 5 + 2^32 is an
    initializer to onnxruntime and an unknown field to a reader that keeps them all."""
    (tmp_path / "secret.txt").write_bytes(SECRET)
    monkeypatch.chdir(tmp_path)
    model = onnx.load_model_from_string(
        external_data(tmp_path / "model.onnx", "secret.txt", 3).read_bytes()
    )
    (stolen,) = [t for t in model.graph.initializer if t.name == "stolen"]
    model.graph.initializer.remove(stolen)
    hidden = _length_field(((5 << 3) | 2) + (1 << 32), stolen.SerializeToString())
    graph = model.graph.SerializeToString() + hidden
    model.ClearField("graph")
    data = model.SerializeToString() + _length_field((7 << 3) | 2, graph)
    raw = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    logits = raw.run(None, {"pixels": np.zeros((1, 3, SIZE, SIZE), np.float32)})[0]
    np.testing.assert_allclose(logits[0] * 100, list(SECRET[:3]), atol=1e-3)  # a real attack

    with pytest.raises(UnsafeModelFile, match="a protobuf tag wider than 32 bits"):
        check_model_bytes(data, max_metadata_bytes=BOUND)


def test_any_data_location_but_the_default_is_refused() -> None:
    """onnxruntime keeps an enum's low 32 bits: 2^32 + 1 is EXTERNAL there."""
    tensor = numpy_helper.from_array(np.zeros(3, np.float32), "w")
    wide = tensor.SerializeToString() + _varint(14 << 3) + _varint((1 << 32) + 1)
    model = onnx.ModelProto()
    model.ParseFromString(_one_node_graph(helper.make_node("Identity", ["w"], ["y"])))
    graph = model.graph.SerializeToString() + _length_field((5 << 3) | 2, wide)
    model.ClearField("graph")
    data = model.SerializeToString() + _length_field((7 << 3) | 2, graph)
    with pytest.raises(UnsafeModelFile, match="the tensor 'w'"):
        check_model_bytes(data, max_metadata_bytes=BOUND)


def test_a_file_over_what_onnx_can_hold_is_refused_unread(tmp_path: Path) -> None:
    huge = tmp_path / "model.onnx"
    with huge.open("wb") as file:
        file.truncate(3 << 30)  # sparse: 3 GB claimed, no disk taken
    with pytest.raises(UnsafeModelFile, match="over the 2 GB one ONNX file can hold"):
        read_model_file(huge, max_metadata_bytes=BOUND)
