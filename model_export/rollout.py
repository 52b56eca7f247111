"""Attention rollout (Abnar & Zuidema, 2020) appended to a ViT's ONNX graph as a second output:
per image, how much the class token draws on each patch through all the layers, as the patch grid.

Per layer the heads' attention is averaged, the identity added for the residual path and the rows
renormalised; the layers multiply through and the class token's row over the patch tokens is kept.
The nodes only read the graph's attention softmaxes, so the classification output is computed by
exactly the nodes it was before. No torch here: it works on any graph, exported or foreign.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from model_export.appended import CPU, remove_appended, session_with_outputs
from model_runtime.load_check import run_bounded, time_bound
from model_runtime.model_file import read_model_file
from model_runtime.options import IN_PROCESS

ROLLOUT_OUTPUT = "attention_rollout"
_PREFIX = "/attention_rollout"


class NoAttention(ValueError):
    """The graph has no attention softmax the rollout can read; one line says why."""


@dataclass(frozen=True)
class AttentionMaps:
    """The graph's attention softmaxes, in layer order, and their shape."""

    outputs: tuple[str, ...]
    heads: int
    tokens: int
    grid: int
    elem_type: int

    @property
    def patch_tokens(self) -> int:
        return self.grid * self.grid


def find_attention(proto: onnx.ModelProto, *, input_size: int) -> AttentionMaps:
    """Every Softmax whose output is [N, heads, T, T] (the attention of T tokens over T tokens),
    in the graph's order, which ONNX requires to be topological: layer order.

    Shapes are measured by running the graph once on blank images, so symbolic reshapes of
    foreign exporters need no shape inference. The patch tokens are taken to be the last
    grid x grid of the T tokens, after a class token and any others (`patch_grid`).
    """
    softmaxes = [node.output[0] for node in proto.graph.node if node.op_type == "Softmax"]
    if not softmaxes:
        raise NoAttention("the graph has no Softmax node, so no attention map to roll out")
    batch, shapes = _probe_shapes(proto, softmaxes, input_size)
    attention = [
        name
        for name in softmaxes
        if len(shapes[name][0]) == 4 and shapes[name][0][2] == shapes[name][0][3]
    ]
    if not attention:
        found = ", ".join(str(list(shapes[name][0])) for name in softmaxes)
        raise NoAttention(
            f"no Softmax gives a [N, heads, T, T] attention map (their outputs are {found})"
        )
    if any(shapes[name][0][0] != batch for name in attention):
        found = ", ".join(str(list(shapes[name][0])) for name in attention)
        raise NoAttention(
            f"the attention maps of {batch} images are {found}: not one map per image "
            "(windowed attention, as Swin's), which the rollout cannot read"
        )
    kinds = {(shapes[name][0][1], shapes[name][0][2], shapes[name][1]) for name in attention}
    if len(kinds) != 1:
        raise NoAttention(
            "the attention softmaxes differ in heads, tokens or type: not one ViT's layers"
        )
    ((heads, tokens, elem_type),) = kinds
    grid = patch_grid(tokens, input_size)
    return AttentionMaps(
        outputs=tuple(attention), heads=heads, tokens=tokens, grid=grid, elem_type=elem_type
    )


MAX_EXTRA_TOKENS = 5
"""Tokens before the patches: a class token, and a distillation token (DeiT) or up to four
registers (DINOv2 with registers)."""


def patch_grid(tokens: int, input_size: int) -> int:
    """The side of the patch grid `tokens` attention tokens hold: a class token and at most
    MAX_EXTRA_TOKENS - 1 others before grid x grid patches (at least 2 x 2) that tile the
    input exactly; or NoAttention. A softmax that only looks square (a CNN's spatial softmax
    over 16 x 16, a pooled ViT with no class token) fits no such grid: its rollout would mean
    nothing."""
    grid = math.isqrt(max(tokens - 1, 0))
    extra = tokens - grid * grid
    if grid < 2 or not 1 <= extra <= MAX_EXTRA_TOKENS or input_size % grid:
        raise NoAttention(
            f"a softmax over {tokens} x {tokens} is not a ViT's attention the rollout can read: "
            f"that needs a class token (and at most {MAX_EXTRA_TOKENS - 1} more) before a square "
            f"grid of patches that tiles the {input_size}-pixel input"
        )
    return grid


def _probe_shapes(
    proto: onnx.ModelProto, names: list[str], input_size: int
) -> tuple[int, dict[str, tuple[tuple[int, ...], int]]]:
    """The batch size probed (two blank images, or the graph's fixed batch) and the shape and
    ONNX element type of each named tensor on it."""
    session, input_name, fixed = session_with_outputs(proto, names)
    batch = fixed or 2
    blank = np.zeros((batch, 3, input_size, input_size), np.float32)
    values = session.run(names, {input_name: blank})
    return batch, {
        name: (tuple(value.shape), helper.np_dtype_to_tensor_dtype(value.dtype))
        for name, value in zip(names, values, strict=True)
    }


def add_rollout(proto: onnx.ModelProto, *, input_size: int) -> AttentionMaps:
    """Append the rollout to `proto` (in place) as the output `attention_rollout`, float32
    [N, grid, grid]; the graph's other outputs stay first and unchanged."""
    if any(output.name == ROLLOUT_OUTPUT for output in proto.graph.output):
        raise NoAttention(f"the graph already has an output called {ROLLOUT_OUTPUT}")
    maps = find_attention(proto, input_size=input_size)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    nodes: list[onnx.NodeProto] = []
    ints = {
        "heads_axis": [1],
        "last_axis": [-1],
        "zero": [0],
        "one": [1],
        "tokens": [maps.tokens],
        "first_patch": [maps.tokens - maps.patch_tokens],
        "grid_shape": [-1, maps.grid, maps.grid],
    }
    initializers = [
        numpy_helper.from_array(np.eye(maps.tokens, dtype=np.float32), f"{_PREFIX}/identity"),
        *(
            numpy_helper.from_array(np.array(v, np.int64), f"{_PREFIX}/{k}")
            for k, v in ints.items()
        ),
    ]

    def node(op: str, inputs: list[str], name: str, **attributes: Any) -> str:
        output = f"{_PREFIX}/{name}"
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def reduce(op: str, tensor: str, axes: str, name: str, keepdims: int) -> str:
        # ReduceSum takes its axes as an input from opset 13, ReduceMean from opset 18.
        if opset >= (13 if op == "ReduceSum" else 18):
            return node(op, [tensor, f"{_PREFIX}/{axes}"], name, keepdims=keepdims)
        return node(op, [tensor], name, axes=ints[axes], keepdims=keepdims)

    def slice_along(tensor: str, start: str, end: str, axis: str, name: str) -> str:
        # Slice takes its bounds as inputs from opset 10, as attributes before.
        if opset >= 10:
            bounds = [f"{_PREFIX}/{bound}" for bound in (start, end, axis)]
            return node("Slice", [tensor, *bounds], name)
        return node("Slice", [tensor], name, starts=ints[start], ends=ints[end], axes=ints[axis])

    layers = []
    for index, attention in enumerate(maps.outputs):
        if maps.elem_type != TensorProto.FLOAT:
            attention = node("Cast", [attention], f"layer{index}/cast", to=TensorProto.FLOAT)
        mean = reduce("ReduceMean", attention, "heads_axis", f"layer{index}/head_mean", 0)
        residual = node("Add", [mean, f"{_PREFIX}/identity"], f"layer{index}/residual")
        row_sums = reduce("ReduceSum", residual, "last_axis", f"layer{index}/row_sums", 1)
        layers.append(node("Div", [residual, row_sums], f"layer{index}/normalised"))  # (N, T, T)
    # The class token's row of A_L ... A_1, carried as one row through the layers from the last
    # down: T^2 per layer rather than the T^3 of multiplying whole matrices.
    row = slice_along(layers[-1], "zero", "one", "one", "class_row")  # (N, 1, T)
    for index in range(len(layers) - 2, -1, -1):
        row = node("MatMul", [row, layers[index]], f"through_layer{index}")
    patches = slice_along(row, "first_patch", "tokens", "last_axis", "patches")  # (N, 1, g*g)
    nodes.append(
        helper.make_node(
            "Reshape", [patches, f"{_PREFIX}/grid_shape"], [ROLLOUT_OUTPUT], name=f"{_PREFIX}/grid"
        )
    )  # (N, grid, grid)
    proto.graph.node.extend(nodes)
    used = {name for n in nodes for name in n.input}
    proto.graph.initializer.extend(i for i in initializers if i.name in used)
    batch = proto.graph.output[0].type.tensor_type.shape.dim[0]
    batch_dim: str | int = batch.dim_param or batch.dim_value or "batch"
    proto.graph.output.append(
        helper.make_tensor_value_info(
            ROLLOUT_OUTPUT, TensorProto.FLOAT, [batch_dim, maps.grid, maps.grid]
        )
    )
    return maps


def strip_rollout(proto: onnx.ModelProto) -> bool:
    """Remove what `add_rollout` appended (in place), leaving the graph it was added to, node for
    node; whether there was a rollout to remove.

    onnxruntime runs every node of a graph whatever outputs a call asks for, so a caller that
    never wants the rollout saves its cost by running this graph."""
    return remove_appended(proto, ROLLOUT_OUTPUT, _PREFIX)


def add_rollout_to_file(path: Path, *, input_size: int) -> AttentionMaps:
    """`add_rollout` on the file at `path`, in place (any rollout it had is replaced)."""
    proto = onnx.load(str(path))
    strip_rollout(proto)
    maps = add_rollout(proto, input_size=input_size)
    onnx.save(proto, str(path))
    return maps


def rollout_of(path: Path, batch: np.ndarray) -> np.ndarray:
    """The file's `attention_rollout` for a batch of model inputs, on the CPU."""
    data = read_model_file(path, max_metadata_bytes=IN_PROCESS.max_metadata_bytes).data
    session = ort.InferenceSession(data, providers=[CPU])
    (name,) = [i.name for i in session.get_inputs()]
    (rollout,) = run_bounded(
        session, [ROLLOUT_OUTPUT], {name: batch}, time_bound(IN_PROCESS, len(data))
    )
    return np.asarray(rollout)
