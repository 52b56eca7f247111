"""The Mahalanobis out-of-distribution score (Lee et al., 2018) appended to a classifier's ONNX
graph as the output `ood_score`: per image, minus the smallest squared Mahalanobis distance of its
features to the class means, under one shared covariance.

The features: where the classification head reads a token of a final LayerNormalization over
[N, tokens, D] (ViT, DeiT), the mean of the patch tokens before that normalisation; otherwise the
head's input itself. On the bundled model the head's input (the normalised class token) flagged
fewer photos than the energy of the logits, the pre-norm patch-token mean far more
(docs/EXPLAIN.md has the figures).

The class means and the covariance are fitted here, in numpy, on in-distribution images; the
graph carries them as constants. The appended nodes only read the head's input, so the
classification output is computed by exactly the nodes it was before, and `strip_ood_score`
removes them exactly. No torch here: it works on any graph, exported or foreign.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from model_contract.ood import SCORE_OUTPUT
from model_export.appended import BoundedSession, remove_appended, session_with_outputs

_PREFIX = "/ood_score"
_FEATURES = f"{_PREFIX}/features"
# Nodes between the head's matrix product and the classification output that act row by row:
# a bias, DeiT's average of its two heads, a softmax, casts of an FP16 graph, int8's rescaling.
_PASS_THROUGH = frozenset({"Add", "Sub", "Mul", "Div", "Cast", "Identity", "Softmax"})
# The least shrinkage of the covariance towards a multiple of the identity: keeps it invertible
# where the features have more dimensions than there are fitting images.
MIN_SHRINKAGE = 1e-3


class NoHead(ValueError):
    """The classification output is not a linear head on [N, D] features; one line says why."""


@dataclass(frozen=True)
class HeadFeatures:
    """Where the score's features come from. With `tokens` set: the mean of the last
    `patch_tokens` of that [N, T, D] tensor (the input of the final normalisation). Otherwise
    the tensors the classification head reads, one [N, D] per linear head (two for DeiT with its
    distillation head), concatenated in this order."""

    inputs: tuple[str, ...]
    elem_type: int
    tokens: str | None = None
    patch_tokens: int = 0


@dataclass(frozen=True)
class Gaussians:
    """Class-conditional Gaussians with one shared covariance: `means` (classes, dim) of the
    classes seen in fitting, and `whitening` = covariance^(-1/2), so that the squared Mahalanobis
    distance is ||(f - mean) @ whitening||^2."""

    means: np.ndarray
    whitening: np.ndarray


def find_head(proto: onnx.ModelProto, output: str, *, input_size: int) -> HeadFeatures:
    """The input features of the linear head(s) that compute `output`: walking back from it
    through row-wise nodes (`_PASS_THROUGH`) to each Gemm or MatMul (int8: MatMulInteger on a
    DynamicQuantizeLinear) with a constant weight, whose other input must be [N, D]."""
    producers = {name: node for node in proto.graph.node for name in node.output}
    constants = {i.name for i in proto.graph.initializer} | {
        name for node in proto.graph.node if node.op_type == "Constant" for name in node.output
    }
    found: list[str] = []
    pending, seen = [output], set()
    while pending:
        tensor = pending.pop()
        if tensor in seen or tensor in constants or not tensor:
            continue
        seen.add(tensor)
        node = producers.get(tensor)
        if node is None:
            raise NoHead(f"the classification output {output} depends on the input directly")
        if node.op_type in ("Gemm", "MatMul", "MatMulInteger"):
            found.append(_head_input(node, constants, producers))
        elif node.op_type == "DynamicQuantizeLinear":  # the scale of int8's rescaling
            found.append(node.input[0])
        elif node.op_type in _PASS_THROUGH:
            pending.extend(reversed(node.input))
        else:
            raise NoHead(
                f"the classification output {output} comes from a {node.op_type} node "
                f"({node.name}), not from a linear head"
            )
    inputs = tuple(dict.fromkeys(found))
    if not inputs:
        raise NoHead(f"no linear head computes the classification output {output}")
    norms = {_normalised_tokens(name, producers) for name in inputs}
    tokens = norms.pop() if len(norms) == 1 else None
    shapes = _probe(proto, [*inputs, *filter(None, [tokens])], input_size)
    if any(len(shapes[name][0]) != 2 for name in inputs):
        found_shapes = ", ".join(str(list(shapes[name][0])) for name in inputs)
        raise NoHead(f"the head's input is not [N, D] features (it is {found_shapes})")
    types = {shapes[name][1] for name in inputs}
    if len(types) != 1:
        raise NoHead("the heads' inputs differ in type")
    patch_tokens = 0
    if tokens is not None and len(shapes[tokens][0]) == 3:
        patch_tokens = math.isqrt(shapes[tokens][0][1] - 1) ** 2
    return HeadFeatures(
        inputs=inputs,
        elem_type=types.pop(),
        tokens=tokens if patch_tokens else None,
        patch_tokens=patch_tokens,
    )


def _normalised_tokens(head_input: str, producers: dict[str, onnx.NodeProto]) -> str | None:
    """The input of the LayerNormalization whose tokens the head reads (through the Gather,
    Slice, Squeeze or Reshape that picks its token), where it reads one."""
    tensor = head_input
    while (node := producers.get(tensor)) is not None:
        if node.op_type == "LayerNormalization":
            return node.input[0]
        if node.op_type not in ("Gather", "Slice", "Squeeze", "Reshape", "Flatten", "Cast"):
            return None
        tensor = node.input[0]
    return None


def _head_input(
    node: onnx.NodeProto, constants: set[str], producers: dict[str, onnx.NodeProto]
) -> str:
    """The data input of a head's matrix product, the other being its constant weight."""
    if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
        raise NoHead(f"the head {node.name} multiplies a transposed input")
    data, weight = node.input[0], node.input[1]
    if weight not in constants and not _from_constants(weight, constants, producers):
        raise NoHead(f"the head {node.name} multiplies two computed tensors")
    if node.op_type == "MatMulInteger":
        quantizer = producers.get(data)
        if quantizer is None or quantizer.op_type != "DynamicQuantizeLinear":
            raise NoHead(f"the int8 head {node.name} does not quantize its input per call")
        return quantizer.input[0]
    return data


def _from_constants(tensor: str, constants: set[str], producers: dict[str, onnx.NodeProto]) -> bool:
    """Whether `tensor` is computed from constants alone (a weight transposed in the graph)."""
    node = producers.get(tensor)
    if node is None:
        return tensor in constants
    return all(i in constants or _from_constants(i, constants, producers) for i in node.input)


def _probe(
    proto: onnx.ModelProto, names: list[str], input_size: int
) -> dict[str, tuple[tuple[int, ...], int]]:
    """The shape and ONNX element type of each named tensor on one blank image."""
    session, input_name, fixed = session_with_outputs(proto, names)
    blank = np.zeros((1, 3, input_size, input_size), np.float32)
    values = _run(session, input_name, fixed, names, blank)
    return {
        name: (tuple(value.shape), helper.np_dtype_to_tensor_dtype(value.dtype))
        for name, value in zip(names, values, strict=True)
    }


def _run(
    session: BoundedSession,
    input_name: str,
    fixed: int | None,
    names: list[str],
    batch: np.ndarray,
) -> list[np.ndarray]:
    """The named tensors for `batch`; a graph with a fixed batch size gets exactly that many
    rows per call (the last call padded with zeros, which are never returned)."""
    if fixed is None or len(batch) == fixed:
        return [np.asarray(v) for v in session.run(names, {input_name: batch})]
    parts = []
    for start in range(0, len(batch), fixed):
        chunk = batch[start : start + fixed]
        padded = np.zeros((fixed, *batch.shape[1:]), batch.dtype)
        padded[: len(chunk)] = chunk
        parts.append(
            [np.asarray(v)[: len(chunk)] for v in session.run(names, {input_name: padded})]
        )
    return [np.concatenate(values) for values in zip(*parts, strict=True)]


def features_of(
    proto: onnx.ModelProto, head: HeadFeatures, output: str, batches: Iterable[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """The score's features (N, D), as the appended nodes compute them, and the classification
    output (N, classes) of every image in `batches`."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    nodes, initializers = _feature_nodes(head, _opset(proto))
    probe.graph.node.extend(nodes)
    probe.graph.initializer.extend(initializers)
    names = [_FEATURES, output]
    session, input_name, fixed = session_with_outputs(probe, names)
    features, outputs = [], []
    for batch in batches:
        values, scores = _run(session, input_name, fixed, names, batch)
        features.append(np.asarray(values, np.float64))
        outputs.append(np.asarray(scores, np.float32))
    return np.concatenate(features), np.concatenate(outputs)


def _opset(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _feature_nodes(
    head: HeadFeatures, opset: int
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes computing the float32 features (N, D) as the tensor `_FEATURES`."""
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    if head.tokens is not None:
        # The patch tokens are the last grid x grid (after a class, or class and distillation,
        # token), as for the attention rollout.
        for name, value in (("patch_start", -head.patch_tokens), ("token_axis", 1)):
            initializers.append(numpy_helper.from_array(np.array([value], np.int64), _at(name)))
        end = np.array([np.iinfo(np.int64).max], np.int64)
        initializers.append(numpy_helper.from_array(end, _at("patch_end")))
        patches = _at("patches")
        slice_inputs = [head.tokens, _at("patch_start"), _at("patch_end"), _at("token_axis")]
        nodes.append(helper.make_node("Slice", slice_inputs, [patches], name=patches))
        features = _at("patch_mean")  # (N, D)
        if opset >= 18:
            mean = helper.make_node(
                "ReduceMean", [patches, _at("token_axis")], [features], keepdims=0
            )
        else:
            mean = helper.make_node("ReduceMean", [patches], [features], axes=[1], keepdims=0)
        mean.name = features
        nodes.append(mean)
    elif len(head.inputs) > 1:
        features = _at("heads")
        concat = helper.make_node("Concat", list(head.inputs), [features], name=features, axis=1)
        nodes.append(concat)
    else:
        features = head.inputs[0]
    if head.elem_type != TensorProto.FLOAT:
        nodes.append(
            helper.make_node("Cast", [features], [_FEATURES], name=_FEATURES, to=TensorProto.FLOAT)
        )
    else:
        nodes.append(helper.make_node("Identity", [features], [_FEATURES], name=_FEATURES))
    return nodes, initializers


def _at(name: str) -> str:
    return f"{_PREFIX}/{name}"


def ledoit_wolf(centred: np.ndarray) -> tuple[np.ndarray, float]:
    """The sample covariance of rows already centred, and the shrinkage towards a multiple of
    the identity that Ledoit & Wolf's (2004) formula gives for it (in [0, 1])."""
    n, dim = centred.shape
    covariance = centred.T @ centred / n
    mu = np.trace(covariance) / dim
    squared = centred**2
    beta = (squared.T @ squared).sum() / n - (covariance**2).sum()
    beta /= dim * n
    delta = ((covariance - mu * np.eye(dim)) ** 2).sum() / dim
    shrinkage = 0.0 if delta == 0 else min(beta, delta) / delta
    return covariance, float(shrinkage)


def fit(features: np.ndarray, classes: np.ndarray) -> Gaussians:
    """Each class's mean (classes absent from `classes` get none) and the shared covariance of
    the features around their class means, shrunk (Ledoit-Wolf, at least MIN_SHRINKAGE)."""
    labels = np.unique(classes)
    means = np.stack([features[classes == c].mean(axis=0) for c in labels])
    index = np.searchsorted(labels, classes)
    residuals = features - means[index]
    if not residuals.any():  # every class seen once: no spread around a class mean to measure
        residuals = features - features.mean(axis=0)
    covariance, shrinkage = ledoit_wolf(residuals)
    shrinkage = max(shrinkage, MIN_SHRINKAGE)
    dim = covariance.shape[0]
    scale = float(np.trace(covariance)) / dim
    scale = scale if scale > 0 else 1.0  # a single image: no spread at all
    shrunk = (1 - shrinkage) * covariance + shrinkage * scale * np.eye(dim)
    values, vectors = np.linalg.eigh(shrunk)
    values = np.maximum(values, MIN_SHRINKAGE * scale)  # rounding can leave one at or below 0
    whitening = (vectors / np.sqrt(values)) @ vectors.T
    return Gaussians(means=means, whitening=whitening)


def mahalanobis_scores(features: np.ndarray, gaussians: Gaussians) -> np.ndarray:
    """The score in float64, as the paper writes it: minus the smallest squared Mahalanobis
    distance to a class mean (the reference the graph's output is tested against)."""
    z = np.asarray(features, np.float64) @ gaussians.whitening
    m = gaussians.means @ gaussians.whitening
    distances = ((z[:, None, :] - m[None, :, :]) ** 2).sum(axis=2)
    result: np.ndarray = -distances.min(axis=1)
    return result


def add_ood_score(proto: onnx.ModelProto, head: HeadFeatures, gaussians: Gaussians) -> None:
    """Append the score to `proto` (in place) as the output `ood_score`, float32 [N]; the
    graph's other outputs stay first and unchanged.

    With z = (f - c) W and m_k = (mu_k - c) W (c the mean of the class means, which keeps the
    numbers small in float32): ||z - m_k||^2 = ||z||^2 - 2 z.m_k + ||m_k||^2, one matrix product
    over the classes instead of an (N, classes, dim) difference.
    """
    if any(output.name == SCORE_OUTPUT for output in proto.graph.output):
        raise NoHead(f"the graph already has an output called {SCORE_OUTPUT}")
    opset = _opset(proto)
    centre = gaussians.means.mean(axis=0)
    whitened_means = (gaussians.means - centre) @ gaussians.whitening  # (classes, dim)
    constants = {
        "centre": centre.astype(np.float32),
        "whitening": gaussians.whitening.astype(np.float32),
        "minus_twice_means": (-2 * whitened_means.T).astype(np.float32),  # (dim, classes)
        "mean_norms": (whitened_means**2).sum(axis=1).astype(np.float32),  # (classes,)
        "feature_axis": np.array([1], np.int64),
    }
    nodes, initializers = _feature_nodes(head, opset)
    initializers += [numpy_helper.from_array(v, _at(k)) for k, v in constants.items()]

    def node(op: str, inputs: list[str], name: str, output: str = "", **attributes: Any) -> str:
        output = output or f"{_PREFIX}/{name}"
        nodes.append(helper.make_node(op, inputs, [output], name=f"{_PREFIX}/{name}", **attributes))
        return output

    def reduce(op: str, tensor: str, name: str, keepdims: int, output: str = "") -> str:
        # ReduceSum takes its axes as an input from opset 13, ReduceMin from opset 18.
        if opset >= (13 if op == "ReduceSum" else 18):
            inputs = [tensor, f"{_PREFIX}/feature_axis"]
            return node(op, inputs, name, output, keepdims=keepdims)
        return node(op, [tensor], name, output, axes=[1], keepdims=keepdims)

    centred = node("Sub", [_FEATURES, f"{_PREFIX}/centre"], "centred")
    z = node("MatMul", [centred, f"{_PREFIX}/whitening"], "whitened")  # (N, dim)
    norms = reduce("ReduceSum", node("Mul", [z, z], "squared"), "norms", 1)  # (N, 1)
    cross = node("MatMul", [z, f"{_PREFIX}/minus_twice_means"], "cross")  # (N, classes)
    partial = node("Add", [norms, cross], "partial")
    distances = node("Add", [partial, f"{_PREFIX}/mean_norms"], "distances")  # (N, classes)
    nearest = reduce("ReduceMin", distances, "nearest", 0)  # (N,)
    node("Neg", [nearest], "score", output=SCORE_OUTPUT)
    proto.graph.node.extend(nodes)
    proto.graph.initializer.extend(initializers)
    batch = proto.graph.output[0].type.tensor_type.shape.dim[0]
    batch_dim: str | int = batch.dim_param or batch.dim_value or "batch"
    proto.graph.output.append(
        helper.make_tensor_value_info(SCORE_OUTPUT, TensorProto.FLOAT, [batch_dim])
    )


@dataclass(frozen=True)
class Standardised:
    """Where a score's in-distribution values lie: (value - location) / scale is 0 at their
    median and -1 at their 1st percentile, whatever the score's units."""

    location: float
    scale: float

    @classmethod
    def of(cls, values: np.ndarray) -> Standardised:
        median, low = np.percentile(np.asarray(values, np.float64), [50, 1])
        return cls(location=float(median), scale=float(median - low) or 1.0)

    def apply(self, values: np.ndarray) -> np.ndarray:
        result: np.ndarray = (np.asarray(values, np.float64) - self.location) / self.scale
        return result


def combined_scores(
    mahalanobis: np.ndarray,
    energy: np.ndarray,
    standardised: tuple[Standardised, Standardised],
) -> np.ndarray:
    """The `mahalanobis_energy` score in float64 (the reference the graph's is tested against):
    the smaller of the two standardised scores."""
    return np.minimum(standardised[0].apply(mahalanobis), standardised[1].apply(energy))


def add_energy_to_score(
    proto: onnx.ModelProto, logits: str, standardised: tuple[Standardised, Standardised]
) -> None:
    """Turn the Mahalanobis `ood_score` that `add_ood_score` appended into `mahalanobis_energy`
    (in place): the smaller of it and the energy of `logits` (logsumexp), each standardised
    (mahalanobis first). Its nodes carry the score's prefix, so `strip_ood_score` removes them
    too."""
    (score_node,) = [n for n in proto.graph.node if SCORE_OUTPUT in n.output]
    mahalanobis = f"{_PREFIX}/mahalanobis"
    score_node.output[:] = [mahalanobis if o == SCORE_OUTPUT else o for o in score_node.output]
    opset = _opset(proto)
    constants: dict[str, np.ndarray | np.float32] = {
        "m_location": np.float32(standardised[0].location),
        "m_scale": np.float32(standardised[0].scale),
        "e_location": np.float32(standardised[1].location),
        "e_scale": np.float32(standardised[1].scale),
    }
    if opset >= 18:  # ReduceLogSumExp takes its axes as an input from opset 18
        constants["axis"] = np.array([1], np.int64)
    proto.graph.initializer.extend(
        numpy_helper.from_array(np.asarray(v), _at(f"combined/{k}")) for k, v in constants.items()
    )
    nodes: list[onnx.NodeProto] = []

    def node(op: str, inputs: list[str], name: str, output: str = "", **attributes: Any) -> str:
        output = output or f"{_PREFIX}/combined/{name}"
        nodes.append(
            helper.make_node(op, inputs, [output], name=f"{_PREFIX}/combined/{name}", **attributes)
        )
        return output

    def at(name: str) -> str:
        return _at(f"combined/{name}")

    as_float = node("Cast", [logits], "logits", to=TensorProto.FLOAT)
    if opset >= 18:
        energy = node("ReduceLogSumExp", [as_float, at("axis")], "energy", keepdims=0)
    else:
        energy = node("ReduceLogSumExp", [as_float], "energy", axes=[1], keepdims=0)
    e = node("Div", [node("Sub", [energy, at("e_location")], "e_centred"), at("e_scale")], "e")
    m = node("Div", [node("Sub", [mahalanobis, at("m_location")], "m_centred"), at("m_scale")], "m")
    node("Min", [m, e], "score", output=SCORE_OUTPUT)
    proto.graph.node.extend(nodes)


def strip_ood_score(proto: onnx.ModelProto) -> bool:
    """Remove what `add_ood_score` appended (in place), leaving the graph it was added to, node
    for node; whether there was a score to remove."""
    return remove_appended(proto, SCORE_OUTPUT, _PREFIX)


def ood_scores_of(proto: onnx.ModelProto, batches: Iterable[np.ndarray]) -> np.ndarray:
    """The graph's `ood_score` for every image in `batches`, float32, on the CPU."""
    session, input_name, fixed = session_with_outputs(proto, [SCORE_OUTPUT])
    return np.concatenate([_run(session, input_name, fixed, [SCORE_OUTPUT], b)[0] for b in batches])
