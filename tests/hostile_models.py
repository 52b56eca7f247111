"""Model files crafted as an attacker would, written with the `onnx` package: each a 32x32
three-colour classifier like `tests.onnx_models.classifier` with one hostile part, so that every
check the service makes of an ordinary model passes but the one meant to stop it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.onnx_models import metadata_for

COLOURS = ["red", "green", "blue"]
SIZE = 32


def _save(nodes: list[onnx.NodeProto], path: Path, initializers: list[onnx.TensorProto]) -> Path:
    """The graph: `means` [N, 3] of the pixels feed `nodes`, which must give `logits`."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["pixels", "spatial"], ["means"], keepdims=0),
            *nodes,
        ],
        "hostile",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        initializer=[
            numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "spatial"),
            numpy_helper.from_array(np.eye(3, dtype=np.float32), "weights"),
            *initializers,
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    helper.set_model_props(model, metadata_for(COLOURS, SIZE).to_props())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def external_data(path: Path, location: str, length: int) -> Path:
    """Logits that spell out `length` bytes of the file at `location`, which onnxruntime reads
    as the uint8 initializer `stolen`: 0.01 * byte, three at a time."""
    stolen = TensorProto(name="stolen", data_type=TensorProto.UINT8, dims=[length])
    stolen.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = stolen.external_data.add()
        entry.key, entry.value = key, value
    nodes = [
        helper.make_node("Cast", ["stolen"], ["bytes"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["bytes", "hundredth"], ["scaled"]),
        helper.make_node("Slice", ["scaled", "zero", "three"], ["row"]),
        helper.make_node("MatMul", ["means", "weights"], ["plain"]),
        helper.make_node("Add", ["plain", "row"], ["logits"]),
    ]
    return _save(
        nodes,
        path,
        [
            stolen,
            numpy_helper.from_array(np.array(0.01, dtype=np.float32), "hundredth"),
            numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
            numpy_helper.from_array(np.array([3], dtype=np.int64), "three"),
        ],
    )


def _counting_loop(trips: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes and constants of a Loop of `trips` trips that adds one at each, started from the
    image's values (so no optimisation can fold it away), its total times zero added to the
    logits: the answer is an ordinary classifier's, once the loop ends."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["total_in", "step"], ["total_out"]),
        ],
        "counting",
        [
            helper.make_tensor_value_info("trip", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("total_in", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("total_out", TensorProto.FLOAT, []),
        ],
        initializer=[numpy_helper.from_array(np.array(1.0, dtype=np.float32), "step")],
    )
    nodes = [
        helper.make_node("ReduceSum", ["means"], ["start"], keepdims=0),
        helper.make_node("Loop", [trips, "always", "start"], ["total"], body=body),
        helper.make_node("Mul", ["total", "nothing"], ["zero_total"]),
        helper.make_node("MatMul", ["means", "weights"], ["plain"]),
        helper.make_node("Add", ["plain", "zero_total"], ["logits"]),
    ]
    constants = [
        numpy_helper.from_array(np.array(True), "always"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "nothing"),
    ]
    return nodes, constants


def endless_loop(path: Path) -> Path:
    """A Loop of 2^63 - 1 trips: the first inference never finishes."""
    nodes, constants = _counting_loop("trips")
    trips = numpy_helper.from_array(np.array(2**63 - 1, dtype=np.int64), "trips")
    return _save(nodes, path, [trips, *constants])


def batch_ignoring(path: Path) -> Path:
    """Logits averaged over the batch too: [1, 3] whatever the batch, a common export mistake
    (its declared shape still says [batch, 3])."""
    nodes = [
        helper.make_node("MatMul", ["means", "weights"], ["per_image"]),
        helper.make_node("ReduceMean", ["per_image", "first"], ["logits"], keepdims=1),
    ]
    first = numpy_helper.from_array(np.array([0], dtype=np.int64), "first")
    return _save(nodes, path, [first])


def memory_bomb(path: Path, floats: int) -> Path:
    """A graph of a few hundred bytes that expands the image's mean into `floats` float32 values
    at every call (computed from the input, so never folded away)."""
    nodes = [
        helper.make_node("ReduceMean", ["means"], ["mean"], keepdims=1),
        helper.make_node("Expand", ["mean", "huge"], ["expanded"]),
        helper.make_node("ReduceSum", ["expanded"], ["total"], keepdims=0),
        helper.make_node("Mul", ["total", "nothing"], ["zero_total"]),
        helper.make_node("MatMul", ["means", "weights"], ["plain"]),
        helper.make_node("Add", ["plain", "zero_total"], ["logits"]),
    ]
    return _save(
        nodes,
        path,
        [
            numpy_helper.from_array(np.array([1, floats], dtype=np.int64), "huge"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "nothing"),
        ],
    )


def epcontext(path: Path, cache: str) -> Path:
    """A node that asks an execution provider to load a compiled engine from `cache`."""
    nodes = [
        helper.make_node("MatMul", ["means", "weights"], ["logits"]),
        helper.make_node(
            "EPContext",
            ["means"],
            ["engine"],
            domain="com.microsoft",
            embed_mode=0,
            ep_cache_context=cache,
        ),
    ]
    return _save(nodes, path, [])


def batch_ignoring_when_bright(path: Path) -> Path:
    """One row per image for dark batches (the zeros of every load-time check), but a single
    row for the whole batch once its mean brightness passes one half: only a check of every
    call's rows can catch it."""
    per_image = helper.make_graph(
        [helper.make_node("Identity", ["plain"], ["rows"])],
        "per_image",
        [],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, None)],
    )
    pooled = helper.make_graph(
        [helper.make_node("ReduceMean", ["plain", "first"], ["rows"], keepdims=1)],
        "pooled",
        [],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("MatMul", ["means", "weights"], ["plain"]),
        helper.make_node("ReduceMean", ["means"], ["brightness"], keepdims=0),
        helper.make_node("Greater", ["brightness", "half"], ["bright"]),
        helper.make_node("If", ["bright"], ["logits"], then_branch=pooled, else_branch=per_image),
    ]
    return _save(
        nodes,
        path,
        [
            numpy_helper.from_array(np.array([0], dtype=np.int64), "first"),
            numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half"),
        ],
    )


def slow_for_big_batches(path: Path, trips: int) -> Path:
    """`_counting_loop` of `trips` trips for a batch of three images or more and one trip below:
    the load check's batches of one and two pass, a warm-up of bigger batches (IO binding's
    buckets) does not finish in time."""
    loop, constants = _counting_loop("trips")
    nodes = [
        helper.make_node("Shape", ["pixels"], ["shape"], start=0, end=1),
        helper.make_node("Greater", ["shape", "two"], ["big"]),
        helper.make_node("Where", ["big", "many", "one"], ["trip_row"]),
        helper.make_node("Squeeze", ["trip_row"], ["trips"]),
        *loop,
    ]
    return _save(
        nodes,
        path,
        [
            numpy_helper.from_array(np.array([2], dtype=np.int64), "two"),
            numpy_helper.from_array(np.array([trips], dtype=np.int64), "many"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
            *constants,
        ],
    )


def endless_on_real_images(path: Path) -> Path:
    """`_counting_loop` of 2^62 trips for any input but zeros (the load-time checks'): it passes
    every check at load and never finishes on a client's image."""
    loop, constants = _counting_loop("trips")
    nodes = [
        helper.make_node("ReduceMax", ["means"], ["brightest"], keepdims=0),
        helper.make_node("Abs", ["brightest"], ["size"]),
        helper.make_node("Greater", ["size", "nothing"], ["real"]),
        helper.make_node("Where", ["real", "many", "none"], ["trips"]),
        *loop,
    ]
    return _save(
        nodes,
        path,
        [
            numpy_helper.from_array(np.array(2**62, dtype=np.int64), "many"),
            numpy_helper.from_array(np.array(0, dtype=np.int64), "none"),
            *constants,
        ],
    )
