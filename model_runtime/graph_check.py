"""The model's graph against its metadata, checked at load: what the service feeds and reads must
be what the graph takes and gives, or the model is refused before it takes traffic."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from model_contract.metadata import InvalidModelMetadata, ModelMetadata
from model_contract.ood import GRAPH_SCORES, SCORE_OUTPUT
from model_runtime.model_file import ONNX_FORMAT_ONLY, read_model_file
from model_runtime.options import CPU, RuntimeOptions

FLOAT_TYPES = ("tensor(float)", "tensor(float16)")


class ModelMismatch(InvalidModelMetadata):
    """The metadata describes a different graph from the one in the file."""


@dataclass(frozen=True)
class Declared:
    """One input or output as the graph declares it (onnxruntime's `NodeArg`, as plain data)."""

    name: str
    type: str
    shape: tuple[int | str | None, ...]
    """Each dimension: its size, its symbol, or None where the graph says nothing."""


@dataclass(frozen=True)
class GraphDeclarations:
    """The graph's inputs and outputs, as a session of it declares them."""

    inputs: tuple[Declared, ...]
    outputs: tuple[Declared, ...]

    @classmethod
    def of(cls, session: ort.InferenceSession) -> GraphDeclarations:
        def declared(args: list[ort.NodeArg]) -> tuple[Declared, ...]:
            return tuple(Declared(a.name, a.type, tuple(a.shape)) for a in args)

        return cls(declared(session.get_inputs()), declared(session.get_outputs()))

    def as_json(self) -> dict[str, list[list[object]]]:
        return {
            kind: [[d.name, d.type, list(d.shape)] for d in getattr(self, kind)]
            for kind in ("inputs", "outputs")
        }

    @classmethod
    def from_json(cls, value: dict[str, list[list[object]]]) -> GraphDeclarations:
        def declared(entries: list[list[object]]) -> tuple[Declared, ...]:
            return tuple(
                Declared(str(name), str(kind), tuple(shape))  # type: ignore[arg-type]
                for name, kind, shape in entries
            )

        return cls(declared(value["inputs"]), declared(value["outputs"]))


@dataclass(frozen=True)
class GraphContract:
    """The one input and the one output the service uses, as the graph declares them."""

    input_name: str
    output_name: str
    fixed_batch_size: int | None
    """The batch axis's size where the graph fixes it; None where it is dynamic."""
    output_width: int | None
    """The output's class axis where the graph fixes it; None where it is symbolic."""
    output_type: str
    """The output's element type: tensor(float) or tensor(float16)."""
    attention_output: str | None = None
    """The output holding the attention rollout [N, grid_h, grid_w], where the model has one."""
    attention_grid: tuple[int, int] | None = None
    """The rollout's grid where the graph fixes it; None where it is symbolic."""
    ood_output: str | None = None
    """The output holding each image's out-of-distribution score [N], where the graph
    computes it (the `mahalanobis` score)."""
    embedding_output: str | None = None
    """The output holding each image's embedding [N, size] beside the classes, where the model
    carries one (a model without classes serves it as `output_name`)."""


def _dims(shape: list[int | str | None] | tuple[int | str | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def check_graph(declared: GraphDeclarations, metadata: ModelMetadata, path: Path) -> GraphContract:
    """The graph's input and output, or ModelMismatch naming what disagrees and the fix."""
    restamp = f"vit-import onnx {path} -o {path}"
    inputs = declared.inputs
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise ModelMismatch(
            f"the graph has {len(inputs)} inputs ({names}); the service feeds exactly "
            "one image tensor [N, 3, S, S]: export the model with one input"
        )
    model_input = inputs[0]
    shape = list(model_input.shape)
    where = f"the graph's input {model_input.name} {_dims(shape)}"
    if model_input.type != "tensor(float)":
        raise ModelMismatch(
            f"{where} is {model_input.type}; the service sends float32 pixels: export it with a "
            "float32 input (vit-import --fp16 keeps float32 at the boundary)"
        )
    if len(shape) != 4 or isinstance(shape[1], int) and shape[1] != 3:
        raise ModelMismatch(
            f"{where} is not an image batch [N, 3, S, S] (channels first, RGB); export it so"
        )
    size = metadata.preprocessing.input_size
    spatial = [d for d in shape[2:] if isinstance(d, int)]
    if len(set(spatial)) > 1:
        raise ModelMismatch(f"{where} is not square; the service feeds S x S images")
    if any(d != size for d in spatial):
        graph_size = spatial[0]
        raise ModelMismatch(
            f"{where} disagrees with the metadata's preprocessing.input_size {size}; "
            f"fix the metadata with `{restamp} --input-size {graph_size}`"
        )
    batch = shape[0]
    fixed_batch_size = batch if isinstance(batch, int) and batch > 0 else None

    outputs = {o.name: o for o in declared.outputs}
    embedding = metadata.embedding
    only_embedding = embedding.output if embedding and not metadata.has_classes else None
    output_name = metadata.output_name or only_embedding or declared.outputs[0].name
    if output_name not in outputs:
        raise ModelMismatch(
            f"the metadata names the output {output_name!r}, the graph has "
            f"{', '.join(outputs)}; fix it with `{restamp} --output-name NAME`"
        )
    output = outputs[output_name]
    out_shape = list(output.shape)
    out_where = f"the graph's output {output_name} {_dims(out_shape)}"
    if only_embedding is not None:
        if output_name != only_embedding:
            raise ModelMismatch(
                f"the metadata serves the embedding {only_embedding!r} but names the output "
                f"{output_name!r}; re-stamp it with `{restamp}`"
            )
        _check_embedding(outputs, metadata, restamp)
        return GraphContract(
            input_name=model_input.name,
            output_name=output_name,
            fixed_batch_size=fixed_batch_size,
            output_width=out_shape[1] if isinstance(out_shape[1], int) else None,
            output_type=output.type,
        )
    if output.type not in FLOAT_TYPES:
        raise ModelMismatch(f"{out_where} is {output.type}, not float scores per class")
    if len(out_shape) != 2:
        raise ModelMismatch(
            f"{out_where} is not one row of class scores per image [N, classes]"
            + (f"; choose another with `{restamp} --output-name NAME`" if len(outputs) > 1 else "")
        )
    width = out_shape[1] if isinstance(out_shape[1], int) else None
    check_output_width(width, metadata, path)
    grid = _attention_grid(outputs, metadata, restamp)
    ood_output = _ood_output(outputs, metadata, restamp)
    return GraphContract(
        input_name=model_input.name,
        output_name=output_name,
        fixed_batch_size=fixed_batch_size,
        output_width=width,
        output_type=output.type,
        attention_output=metadata.attention_output,
        attention_grid=grid,
        ood_output=ood_output,
        embedding_output=_check_embedding(outputs, metadata, restamp),
    )


def _check_embedding(
    outputs: dict[str, Declared], metadata: ModelMetadata, restamp: str
) -> str | None:
    """The embedding output the metadata names, checked: one float vector of its size per
    image."""
    embedding = metadata.embedding
    if embedding is None:
        return None
    if embedding.output not in outputs:
        raise ModelMismatch(
            f"the metadata names the embedding output {embedding.output!r}, the graph has "
            f"{', '.join(outputs)}; re-stamp it with `{restamp}`"
        )
    output = outputs[embedding.output]
    shape = list(output.shape)
    width = shape[1] if len(shape) == 2 else None
    if (
        output.type not in FLOAT_TYPES
        or len(shape) != 2
        or isinstance(width, int)
        and width != embedding.size
    ):
        raise ModelMismatch(
            f"the graph's embedding output {embedding.output} {_dims(shape)} is not one float "
            f"vector of the metadata's size {embedding.size} per image [N, {embedding.size}]"
        )
    return embedding.output


def _ood_output(outputs: dict[str, Declared], metadata: ModelMetadata, restamp: str) -> str | None:
    """The score output a `mahalanobis` calibration reads, checked: one float per image."""
    if metadata.ood is None or metadata.ood.score not in GRAPH_SCORES:
        return None
    if SCORE_OUTPUT not in outputs:
        raise ModelMismatch(
            f"the metadata's out-of-distribution score is computed by the graph, which has no "
            f"output {SCORE_OUTPUT!r} (it has {', '.join(outputs)}); re-stamp it with `{restamp}`"
        )
    output = outputs[SCORE_OUTPUT]
    if output.type not in FLOAT_TYPES or len(output.shape) != 1:
        raise ModelMismatch(
            f"the graph's output {SCORE_OUTPUT} {_dims(list(output.shape))} is not one float "
            "score per image [N]"
        )
    return SCORE_OUTPUT


def _attention_grid(
    outputs: dict[str, Declared], metadata: ModelMetadata, restamp: str
) -> tuple[int, int] | None:
    """The rollout output the metadata names, checked: one float grid per image."""
    name = metadata.attention_output
    if name is None:
        return None
    if name not in outputs:
        raise ModelMismatch(
            f"the metadata names the attention output {name!r}, the graph has "
            f"{', '.join(outputs)}; re-stamp it with `{restamp}`"
        )
    shape = list(outputs[name].shape)
    if outputs[name].type not in FLOAT_TYPES or len(shape) != 3:
        raise ModelMismatch(
            f"the graph's attention output {name} {_dims(shape)} is not one float grid per "
            "image [N, grid_h, grid_w]"
        )
    rows, columns = shape[1], shape[2]
    return (rows, columns) if isinstance(rows, int) and isinstance(columns, int) else None


def check_output_width(width: int | None, metadata: ModelMetadata, path: Path) -> None:
    """The class axis against the labels (at load where the graph fixes it, else at warm-up)."""
    if not metadata.has_classes:
        return
    labels = len(metadata.labels)
    if width is not None and width != labels:
        raise ModelMismatch(
            f"the metadata has {labels} labels but the graph's output has {width} "
            f"classes; fix the labels with `vit-import onnx {path} -o {path} --labels FILE`"
        )


PROBABILITY_SUM_TOLERANCE = 1e-2
"""How far a row of a graph said to give probabilities may sum from 1: float16 rounding of a
thousand classes stays well inside it, logits almost never fall inside it."""


def check_output_kind(rows: np.ndarray, metadata: ModelMetadata, path: Path) -> None:
    """A graph said to give probabilities must give rows >= 0 that sum to 1 (checked on the
    warm-up's answers): logits served as probabilities would be numbers without meaning."""
    if metadata.output != "probabilities":
        return
    sums = rows.astype(np.float64).sum(axis=1)
    worst = float(sums[np.abs(sums - 1.0).argmax()])
    negative = bool((rows < 0).any())
    if negative or abs(worst - 1.0) > PROBABILITY_SUM_TOLERANCE:
        raise ModelMismatch(
            f"the metadata says the output is probabilities but the graph's rows are not (one "
            f"sums to {worst:.4g}{', with negative values' if negative else ''}); if it "
            f"gives logits, fix it with `vit-import onnx {path} -o {path} --output-kind logits`"
        )


def inspect_model(path: Path) -> tuple[ModelMetadata, GraphContract]:
    """The file's metadata and graph, checked against each other in about the time it takes to
    read the file (no graph optimisation, CPU only): for refusing a model before serving."""
    data = read_model_file(path, max_metadata_bytes=RuntimeOptions().max_metadata_bytes).data
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # errors only: the verdict is the one line that matters
    options.add_session_config_entry(*ONNX_FORMAT_ONLY)
    try:
        session = ort.InferenceSession(data, options, providers=[CPU])
    except Exception as error:  # onnxruntime raises its own untyped errors
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error)
        raise InvalidModelMetadata(f"not an ONNX model onnxruntime can load: {reason}") from error
    metadata = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
    return metadata, check_graph(GraphDeclarations.of(session), metadata, path)
