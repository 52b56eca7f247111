"""The embedding appended to a classifier's graph as the output `embedding`: the features its
classification head reads (for a ViT or DeiT, the class token after the final LayerNorm), for
search, deduplication and few-shot classifiers built on the model.

The appended node only reads a tensor the graph computes anyway, so every other output is
computed by exactly the nodes it was before, and `strip_embedding` removes it exactly. No torch
here: it works on any graph, exported or foreign.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from model_contract.metadata import Embedding
from model_contract.outputs import EMBEDDING
from model_export.appended import remove_appended, session_with_outputs
from model_export.ood_features import HeadFeatures, NoHead, find_head

logger = logging.getLogger(__name__)

# Not the output's own name, as the other appended outputs' prefixes are: a module called
# `embedding` in the exported model would have its nodes named so.
_PREFIX = "/served_embedding"
# Nodes between a picked token and the head that keep it the same vector.
_SAME_VECTOR = frozenset({"Squeeze", "Reshape", "Flatten", "Cast", "Identity"})


def add_embedding(proto: onnx.ModelProto, *, output: str, input_size: int) -> Embedding:
    """Append the input of the linear head computing `output` (the classification output) to
    `proto` (in place) as the output `embedding`, float32 [N, D], and describe it; NoHead, the
    graph unchanged, where there is no such head or which of two heads reads the class token
    cannot be told from the graph."""
    if any(o.name == EMBEDDING for o in proto.graph.output):
        raise NoHead(f"the graph already has an output called {EMBEDDING}")
    features, source = _class_features(proto, find_head(proto, output, input_size=input_size))
    session, input_name, fixed = session_with_outputs(proto, [features])
    blank = np.zeros((fixed or 1, 3, input_size, input_size), np.float32)
    (value,) = session.run([features], {input_name: blank})  # (N, D), as find_head checked
    name = f"{_PREFIX}/features"
    if value.dtype != np.float32:  # an FP16 graph's head reads half-precision features
        node = helper.make_node("Cast", [features], [EMBEDDING], name=name, to=TensorProto.FLOAT)
    else:
        node = helper.make_node("Identity", [features], [EMBEDDING], name=name)
    proto.graph.node.append(node)
    batch = proto.graph.output[0].type.tensor_type.shape.dim[0]
    batch_dim: str | int = batch.dim_param or batch.dim_value or "batch"
    size = int(value.shape[1])
    proto.graph.output.append(
        helper.make_tensor_value_info(EMBEDDING, TensorProto.FLOAT, [batch_dim, size])
    )
    return Embedding(output=EMBEDDING, size=size, source=source)


def appended_embedding(proto: onnx.ModelProto, *, output: str, input_size: int) -> Embedding | None:
    """`add_embedding`, or where the graph's head cannot be found, None and a warning saying
    why: the file is written without an embedding."""
    strip_embedding(proto)
    try:
        return add_embedding(proto, output=output, input_size=input_size)
    except NoHead as error:
        logger.warning("no embedding output: %s", error)
        return None


def strip_embedding(proto: onnx.ModelProto) -> bool:
    """Remove what `add_embedding` appended (in place), leaving the graph it was added to, node
    for node; whether there was one. An output `embedding` this module did not append (a model
    without classes serves its own) is kept."""
    ours = f"{_PREFIX}/"
    if not any(node.name.startswith(ours) for node in proto.graph.node):
        return False
    return remove_appended(proto, EMBEDDING, _PREFIX)


def _class_features(proto: onnx.ModelProto, head: HeadFeatures) -> tuple[str, str]:
    """The head input to serve and its description: the one head's, or of two heads (DeiT's
    class and distillation heads, averaged) the one reading the class token, token 0, as the
    Gather or Slice picking it says (not the order the heads come in)."""
    producers = {name: node for node in proto.graph.node for name in node.output}
    constants = _constants(proto)
    picked = {name: _picked_token(name, producers, constants) for name in head.inputs}
    if len(head.inputs) == 1:
        (features,) = head.inputs
        token = picked[features]
        if token is None or token[0] != 0:
            return features, f"the input of the linear classification head (tensor {features})"
        return features, (
            f"the class token (token 0){_after_norm(token[1])}, which the linear classification "
            f"head reads (tensor {features})"
        )
    class_heads = [
        (name, token[1]) for name, token in picked.items() if token is not None and token[0] == 0
    ]
    if len(class_heads) != 1:
        raise NoHead(
            f"the classification output combines {len(head.inputs)} heads and which of them "
            "reads the class token (token 0) cannot be told from the graph"
        )
    ((features, normalised),) = class_heads
    others = ", ".join(name for name in head.inputs if name != features)
    return features, (
        f"the class token (token 0){_after_norm(normalised)}, which the class head reads "
        f"(tensor {features}), of the {len(head.inputs)} heads the classification averages: "
        "for DeiT, transformers' last_hidden_state[:, 0], the token trained on the labels; not "
        f"the distillation token the other head reads ({others}), which is trained to match a "
        "teacher's predictions"
    )


def _after_norm(normalised: bool) -> str:
    return " after the final LayerNormalization" if normalised else ""


def _picked_token(
    tensor: str, producers: dict[str, onnx.NodeProto], constants: dict[str, onnx.TensorProto]
) -> tuple[int, bool] | None:
    """Which token of an [N, T, D] tensor `tensor` is, picked by a Gather or a one-token Slice on
    axis 1 (through squeezes and casts), and whether that tensor is a LayerNormalization's
    output; None where `tensor` is not one token picked so."""
    node = producers.get(tensor)
    while node is not None and node.op_type in _SAME_VECTOR:
        node = producers.get(node.input[0])
    if node is None:
        return None
    index = _picked_index(node, constants)
    if index is None:
        return None
    tokens = producers.get(node.input[0])
    return index, tokens is not None and tokens.op_type == "LayerNormalization"


def _picked_index(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> int | None:
    """The one index on axis 1 a Gather or Slice node picks, where its constants say so."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Gather":
        index = _value(constants, node.input[1])
        if attributes.get("axis", 0) != 1 or index is None:
            return None
        return int(index.reshape(()))
    if node.op_type != "Slice" or len(node.input) < 4:
        return None
    starts, ends, axes = (_value(constants, name) for name in node.input[1:4])
    steps = _value(constants, node.input[4]) if len(node.input) > 4 and node.input[4] else None
    if starts is None or ends is None or axes is None:
        return None
    if int(axes.reshape(())) != 1 or (steps is not None and int(steps.reshape(())) != 1):
        return None
    start = int(starts.reshape(()))
    return start if start >= 0 and int(ends.reshape(())) == start + 1 else None


def _constants(proto: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """The graph's constant tensors by name: its initializers and its Constant nodes' values."""
    tensors = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    tensors[node.output[0]] = attribute.t
    return tensors


def _value(constants: dict[str, onnx.TensorProto], name: str) -> np.ndarray | None:
    """A constant's value where it is one number (an index or an axis), else None."""
    tensor = constants.get(name)
    if tensor is None or int(np.prod(tensor.dims)) != 1:
        return None
    return numpy_helper.to_array(tensor)
