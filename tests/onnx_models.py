"""Small ONNX classifiers written with the `onnx` package, for load-time checks: any input size,
class count, batch axis and metadata, without torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from model_contract.metadata import Embedding, ModelMetadata
from model_contract.preprocess import PreprocessSpec
from model_runtime.model_file import SEAL_KEY


def metadata_for(labels: list[str], size: int, **fields: object) -> ModelMetadata:
    return ModelMetadata.model_validate(
        {
            "name": "foreign",
            "version": "1",
            "labels": labels,
            "preprocessing": PreprocessSpec(input_size=size),
            "output": "logits",
            **fields,
        }
    )


def classifier(
    path: Path,
    *,
    size: int | str = 32,
    classes: int | str = 3,
    batch: int | str = "batch",
    weights_classes: int = 3,
    input_type: int = TensorProto.FLOAT,
    metadata: ModelMetadata | None = None,
    extra_output: bool = False,
    width_from_input: bool = False,
    scale: float = 1.0,
    attention: bool = False,
    ood_score: bool = False,
    embedding: bool = False,
    headless: bool = False,
    padding_bytes: int = 0,
) -> Path:
    """Logits = mean colour per channel @ W: a real graph whose answer depends on the image.
    `classes` is the declared width (a name makes it symbolic); `weights_classes` the real one,
    or with `width_from_input` the input's width (known only when it runs). `scale` multiplies
    the weights, so that versions of a model answer differently. With `attention`, a second
    output `attention_rollout` [N, 2, 2]: the mean brightness of each quarter of the image (a
    stand-in map whose every cell depends on where the image is bright). With `ood_score`, an
    output `ood_score` [N]: the image's mean value (a stand-in score: brighter, higher). With
    `embedding`, an output `embedding` [N, 3]: the head's input, the mean colour per channel;
    `headless` makes it the only output (a model without classes). `padding_bytes` adds a table
    of that many bytes of zeros that every call reads a row of (so no optimizer drops it): a
    model that holds memory, answering as without it."""
    weights = scale * (
        np.arange(3 * weights_classes, dtype=np.float32).reshape(3, weights_classes) - 2
    )
    extra_initializers: list[onnx.TensorProto] = []
    nodes = [
        helper.make_node("Cast", ["pixels"], ["pixels32"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["pixels32", "axes"], ["means"], keepdims=0),
    ]
    if width_from_input:
        nodes += [
            helper.make_node("Shape", ["pixels"], ["shape"], start=3),
            helper.make_node("Slice", ["weights", "zero", "shape", "one"], ["used_weights"]),
            helper.make_node("MatMul", ["means", "used_weights"], ["logits"]),
        ]
    elif padding_bytes:
        rows = max(1, padding_bytes // (4 * 3))
        nodes += [
            helper.make_node("MatMul", ["means", "weights"], ["scores"]),
            helper.make_node("ArgMax", ["means"], ["row"], axis=1, keepdims=0),
            helper.make_node("Gather", ["padding", "row"], ["zeros"], axis=0),
            helper.make_node("MatMul", ["zeros", "weights"], ["nothing"]),
            helper.make_node("Add", ["scores", "nothing"], ["logits"]),
        ]
        padding = np.zeros((rows, 3), np.float32)
        extra_initializers = [numpy_helper.from_array(padding, "padding")]
    else:
        nodes.append(helper.make_node("MatMul", ["means", "weights"], ["logits"]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])]
    if embedding or headless:
        nodes.append(helper.make_node("Identity", ["means"], ["embedding"]))
        vector = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch, 3])
        outputs = [vector] if headless else [*outputs, vector]
    if extra_output:
        nodes.append(helper.make_node("Identity", ["means"], ["features"]))
        outputs.insert(0, helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, 3]))
    initializers = [*extra_initializers]
    if attention:
        assert isinstance(size, int) and isinstance(batch, str)
        half = size // 2
        nodes += [
            helper.make_node("ReduceMean", ["pixels32", "channel"], ["grey"], keepdims=1),
            helper.make_node(
                "AveragePool", ["grey"], ["pooled"], kernel_shape=[half, half], strides=[half, half]
            ),
            helper.make_node("Squeeze", ["pooled", "channel"], ["attention_rollout"]),
        ]
        outputs.append(
            helper.make_tensor_value_info("attention_rollout", TensorProto.FLOAT, [batch, 2, 2])
        )
        initializers.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "channel"))
    if ood_score:
        nodes.append(
            helper.make_node("ReduceMean", ["pixels32", "all_axes"], ["ood_score"], keepdims=0)
        )
        outputs.append(helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, [batch]))
        initializers.append(
            numpy_helper.from_array(np.array([1, 2, 3], dtype=np.int64), "all_axes")
        )
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("pixels", input_type, [batch, 3, size, size])],
        outputs,
        initializer=[
            *initializers,
            numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes"),
            numpy_helper.from_array(weights, "weights"),
            *(
                [
                    numpy_helper.from_array(np.array([n], dtype=np.int64), name)
                    for n, name in [(0, "zero"), (1, "one")]
                ]
                if width_from_input
                else []
            ),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    if metadata is not None:
        helper.set_model_props(model, metadata.to_props())
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def ranked_by_weights(path: Path, weights: list[float], *, size: int = 32) -> Path:
    """Logits = (1 + mean squared pixel) * `weights`: a feature of the image, always positive,
    times one weight per class, so the weights alone rank the classes, and how far apart they
    are decides each probability. Weights that bf16 rounds to one value tie in bf16."""
    nodes = [
        helper.make_node("Mul", ["pixels", "pixels"], ["squares"]),
        helper.make_node("ReduceMean", ["squares", "all_axes"], ["mean"], keepdims=1),
        helper.make_node("Flatten", ["mean"], ["flat"], axis=1),
        helper.make_node("Add", ["flat", "one"], ["feature"]),
        helper.make_node("MatMul", ["feature", "weights"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "ranked_by_weights",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(weights)])],
        initializer=[
            numpy_helper.from_array(np.array([1, 2, 3], dtype=np.int64), "all_axes"),
            numpy_helper.from_array(np.ones((1, 1), dtype=np.float32), "one"),
            numpy_helper.from_array(np.array([weights], dtype=np.float32), "weights"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def expected_attention(batch: np.ndarray) -> np.ndarray:
    """What `classifier(attention=True)` gives as its map, in numpy."""
    count, _, size, _ = batch.shape
    half = size // 2
    grey = batch.mean(axis=1).reshape(count, 2, half, 2, half)
    return np.asarray(grey.mean(axis=(2, 4)))


def headless_metadata(size: int, **fields: object) -> ModelMetadata:
    """The metadata of `classifier(headless=True)`: no classes, its embedding only."""
    return ModelMetadata.model_validate(
        {
            "name": "encoder",
            "version": "1",
            "labels": [],
            "preprocessing": PreprocessSpec(input_size=size),
            "output": "embedding",
            "embedding": EMBEDDING,
            **fields,
        }
    )


EMBEDDING = Embedding(output="embedding", size=3, source="the mean colour per channel")
"""What `classifier(embedding=True)` carries."""


def expected_logits(batch: np.ndarray, classes: int = 3, scale: float = 1.0) -> np.ndarray:
    """What `classifier` computes, in numpy."""
    weights = scale * (np.arange(3 * classes, dtype=np.float32).reshape(3, classes) - 2)
    return np.asarray(batch.mean(axis=(2, 3)) @ weights)


def restamped(path: Path, **props: str) -> Path:
    """`path` with `props` written into its metadata verbatim, over what it holds: metadata no
    exporter would write (broken JSON, values out of bounds) that `ModelMetadata` would refuse."""
    model = onnx.load(str(path))
    current = {prop.key: prop.value for prop in model.metadata_props}
    helper.set_model_props(model, {**current, **props})
    onnx.save(model, str(path))
    return path


def nested(levels: int) -> dict[str, object]:
    """`{"a": {"a": ... {}}}`, `levels` objects deep: a `dataset` deeper than any real one."""
    value: dict[str, object] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def unsealed(proto: onnx.ModelProto) -> onnx.ModelProto:
    """`proto` without its seal, as a file changed by hand after it was written would be once
    its seal was dropped: for tests of the checks behind the seal."""
    kept = [p for p in proto.metadata_props if p.key != SEAL_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    return proto
