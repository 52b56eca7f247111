"""An ONNX classifier made elsewhere (optimum, timm, torch.onnx.export) -> the self-describing file
the service loads: labels, preprocessing and provenance stamped into its metadata, the graph
checked against them, a smoke inference on real photos, and the file sealed as vit-export seals
its own. The file is untrusted input: it is checked on its bytes before anything else reads it."""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import onnx
from pydantic import ValidationError

from model_contract.errors import ImageError
from model_contract.metadata import (
    InvalidModelMetadata,
    ModelMetadata,
    last_line,
    one_line,
)
from model_contract.preprocess import PreprocessSpec, preprocess
from model_export.bf16 import Bf16Report, bf16_gate_on_files, bf16_session, refuse_unmeasurable_bf16
from model_export.embedding import strip_embedding
from model_export.hf_preprocessing import UnexpressibleProcessor, spec_from_processor
from model_export.importing import (
    ImportRefused,
    model_name,
    read_json,
    refuse_custom_code,
    served_logits,
    source_name,
    staged,
)
from model_export.ood_features import strip_ood_score
from model_export.rollout import ROLLOUT_OUTPUT, NoAttention, add_rollout, strip_rollout
from model_export.sealing import finish_model_file
from model_export.stamp import calibrate_on_folder, golden_files
from model_runtime.graph_check import check_output_width, inspect_model
from model_runtime.load_check import LoadCheckFailed, check_in_a_process
from model_runtime.model_file import UnsafeModelFile, check_model_bytes
from model_runtime.options import IN_PROCESS
from model_runtime.session import ModelSession

HF_CONFIG = "config.json"
HF_PREPROCESSOR = "preprocessor_config.json"
ONNX_FILE = "model.onnx"


@dataclass(frozen=True)
class SmokeReport:
    """One inference of the stamped file on real images."""

    images: int
    top: tuple[str, ...]
    row_sums: tuple[float, ...]
    warning: str | None
    bf16: Bf16Report | None = None
    """The bf16 gate, passed, where the file is stamped bf16."""

    def line(self) -> str:
        answers = ", ".join(self.top)
        return (
            f"smoke inference on {self.images} images: top-1 {answers}"
            + (f"\n{self.bf16.line()}" if self.bf16 else "")
            + (f"\nwarning: {self.warning}" if self.warning else "")
        )


def read_labels(path: Path) -> tuple[str, ...]:
    """Labels from a text file (one per line), a JSON list, or an HF config.json (id2label)."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is no part of a label
    except OSError as error:
        raise ImportRefused(f"{path}: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise ImportRefused(f"{path}: not UTF-8 text (byte {error.start})") from error
    if path.suffix.lower() != ".json":
        return tuple(line.strip() for line in text.splitlines() if line.strip())
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ImportRefused(f"{path}: not JSON ({error})") from error
    if isinstance(data, list):
        return tuple(str(label) for label in data)
    if isinstance(data, dict) and "id2label" in data:
        return numbered_labels(data["id2label"], path)
    raise ImportRefused(f"{path}: neither a JSON list of labels nor a config.json with id2label")


def numbered_labels(id2label: object, path: Path) -> tuple[str, ...]:
    """The labels of an `id2label` object, in class order, or a refusal saying what is wrong."""
    if not isinstance(id2label, dict):
        raise ImportRefused(f"{path}: id2label is not an object of class numbers to names")
    try:
        numbered = {int(number): str(label) for number, label in id2label.items()}
    except ValueError as error:
        keys = ", ".join(list(id2label)[:3])
        raise ImportRefused(f"{path}: id2label's keys ({keys}) are not class numbers") from error
    if sorted(numbered) != list(range(len(numbered))):
        raise ImportRefused(f"{path}: id2label does not number the classes 0..N-1")
    return tuple(numbered[i] for i in range(len(numbered)))


DEFAULTED_FIELDS = ("resize", "interpolation", "mean", "std")
"""The preprocessing a graph does not say and a flag or a preprocessor_config.json should."""

PROCESSOR_TYPES = ("image_processor_type", "feature_extractor_type")
"""The keys by which transformers knows which image processor a preprocessor_config.json is."""


def spec_from_preprocessor_config(
    path: Path, *, jpeg_draft: bool, images: Sequence[Path]
) -> PreprocessSpec:
    """The spec a Hugging Face `preprocessor_config.json` describes, read by transformers itself
    (so its class defaults apply), or a refusal naming the field that cannot be expressed (a
    processor with its own step loop checked on `images`)."""
    from transformers import AutoImageProcessor

    fields = read_json(path)
    if not isinstance(fields, dict) or not any(key in fields for key in PROCESSOR_TYPES):
        raise ImportRefused(
            f"{path}: not an image processor's preprocessor_config.json "
            f"(it has no {' or '.join(PROCESSOR_TYPES)})"
        )
    refuse_custom_code(fields, path)
    with tempfile.TemporaryDirectory() as folder:
        try:
            shutil.copy(path, Path(folder) / HF_PREPROCESSOR)
            processor = AutoImageProcessor.from_pretrained(
                folder, backend="pil", trust_remote_code=False
            )
        except Exception as error:  # transformers' own errors for a config it cannot use, untyped
            # Its first sentence: an unknown type's error goes on to list every known one.
            reason = last_line(error).replace(folder, str(path.parent)).split(". ")[0]
            kind = next(str(fields[key]) for key in PROCESSOR_TYPES if key in fields)
            raise ImportRefused(
                f"{path}: not a readable image processor ({kind}: {reason})"
            ) from error
    try:
        return spec_from_processor(processor, jpeg_draft=jpeg_draft, images=images)
    except UnexpressibleProcessor as error:
        raise ImportRefused(f"{path}: cannot be expressed: {error}") from error


def existing_metadata(proto: onnx.ModelProto) -> dict[str, Any]:
    """The file's own metadata where it already has valid metadata (stamping it again): its
    fields only, so a seal (of the old content) is not carried, and a source path an earlier
    version stamped keeps only its last part."""
    props = {p.key: p.value for p in proto.metadata_props}
    try:
        old = ModelMetadata.from_props(props).model_dump()
    except InvalidModelMetadata:
        return {}
    path = PurePath(old["source"].get("source", ""))
    if path.is_absolute():
        old["source"] = {**old["source"], "source": path.name}
    return old


ONE_FILE = (
    "; vit-import reads no other file either: export the model as one file "
    "(torch.onnx.export(..., external_data=False)), or where it is over 2 GB, import its "
    "checkpoint with half-precision weights (vit-import hf --fp16)"
)
"""How to make a model whose weights are kept beside it (torch.onnx.export's default) one file."""


def read_model(model_file: Path) -> onnx.ModelProto:
    """The file parsed from its bytes, read once, or a refusal where they are not one intact,
    self-contained model (`check_model_bytes`): a tensor kept in another file may name any file
    (`..`, a link), and onnx.load would read it into the output. Parsed from the bytes, onnx
    opens no file a tensor names. Its first session and inferences run bounded in a process of
    their own (`check_in_a_process`) before any of the importer's."""
    try:
        data = model_file.read_bytes()
    except OSError as error:
        raise ImportRefused(f"{model_file}: {error.strerror or error}") from error
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as error:  # protobuf's decode errors and onnx's own, untyped
        raise ImportRefused(f"{model_file}: not an ONNX file ({last_line(error)})") from error
    try:
        check_model_bytes(data, max_metadata_bytes=IN_PROCESS.max_metadata_bytes)
    except UnsafeModelFile as error:
        external = any(
            t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer
        )
        raise ImportRefused(f"{model_file}: {error}{ONE_FILE if external else ''}") from error
    try:  # before any inference of its own: a graph that never finishes is stopped there
        check_in_a_process(data, IN_PROCESS)
    except LoadCheckFailed as error:
        raise ImportRefused(f"{model_file}: {error}") from error
    return proto


def graph_input_size(proto: onnx.ModelProto) -> int | None:
    """The square side the graph's input fixes, if it fixes one; a refusal where the input is
    not an image batch [N, 3, S, S] at all (channels last, say), which no size would fix."""
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        return None  # the load-time check names the inputs
    dims = [
        d.dim_value if d.HasField("dim_value") else None
        for d in inputs[0].type.tensor_type.shape.dim
    ]
    if len(dims) != 4 or dims[1] not in (3, None):
        shape = ", ".join("?" if d is None else str(d) for d in dims)
        layout = " (channels last)" if len(dims) == 4 and dims[3] == 3 else ""
        raise ImportRefused(
            f"the graph's input {inputs[0].name} is [{shape}]{layout}; the service feeds an image "
            "batch [N, 3, S, S] (channels first, RGB): export the model so"
        )
    sides = {d for d in dims[2:] if d is not None}
    return sides.pop() if len(sides) == 1 else None


def choose_output(proto: onnx.ModelProto, named: str | None) -> str | None:
    """The output to serve: the one named, the only one, or one called `logits`."""
    names = [o.name for o in proto.graph.output]
    if named is not None or len(names) == 1:
        return named
    if "logits" in names:
        return "logits"
    raise ImportRefused(
        f"the graph has several outputs ({', '.join(names)}): pick one with --output-name"
    )


def smoke(session: ModelSession, files: list[Path], *, kind_given: bool) -> SmokeReport:
    """Real images through the stamped file, alone and in batches; a refusal where the output
    kind looks wrong and was not given, or where the graph cannot be served in batches."""
    try:
        raw = served_logits(session, files, session.metadata.preprocessing)
        check_batches(session, files)
    except ImageError as error:
        raise ImportRefused(f"a check image could not be used: {error}") from error
    except ImportRefused:
        raise
    except Exception as error:  # onnxruntime's own errors, untyped
        raise ImportRefused(
            f"the model failed on the check images ({last_line(error)}); does the input size "
            "match what the graph computes?"
        ) from error
    check_output_width(raw.shape[1], session.metadata, session.path)
    if not np.isfinite(raw).all():
        raise ImportRefused("the model returned NaN or Inf on ordinary photos")
    sums = raw.sum(axis=1)
    looks_like_probabilities = bool(
        ((raw >= 0) & (raw <= 1)).all() and np.allclose(sums, 1, atol=1e-3)
    )
    warning = None
    if session.metadata.output == "logits" and looks_like_probabilities:
        if not kind_given:
            raise ImportRefused(
                "every row the model returned is >= 0 and sums to 1, as probabilities do: say "
                "which the output is with --output-kind probabilities (or --output-kind logits)"
            )
        warning = "every row is >= 0 and sums to 1, yet the output is served as logits"
    if session.metadata.output == "probabilities" and not looks_like_probabilities:
        raise ImportRefused(
            "--output-kind probabilities, but the rows do not sum to 1 (they are logits)"
        )
    top = tuple(session.labels[i] for i in raw.argmax(axis=1))
    return SmokeReport(
        images=len(files), top=top, row_sums=tuple(float(s) for s in sums), warning=warning
    )


BATCH_TOLERANCE = 1e-3
"""How far an image's logits may move with another image beside it in the batch, relative to
the largest: the width of onnxruntime's kernels choosing other paths for other batch sizes."""


PER_CALL_QUANTIZATION = frozenset({"DynamicQuantizeLinear", "DynamicQuantizeMatMul"})
"""Operators that quantize activations with one scale per call: onnxruntime's quantize_dynamic
writes them."""


def precision_of(proto: onnx.ModelProto) -> str:
    """`int8` for a graph whose activations are quantized per call, which the service must run
    one image a call; `fp32` otherwise (the weights' precision says nothing else to it)."""
    ops = {node.op_type for node in proto.graph.node}
    return "int8" if ops & PER_CALL_QUANTIZATION else "fp32"


def check_batches(session: ModelSession, files: list[Path]) -> None:
    """One image alone and beside another, where the batch axis is dynamic: the service batches
    clients' images together, so a graph that runs one image at a time or mixes a batch's
    images (a batch norm left in training mode) is refused."""
    if session.fixed_batch_size is not None or session.images_per_call is not None:
        return  # served in batches of exactly that size, or one image a call, as checked
    spec = session.metadata.preprocessing
    first = preprocess(files[0].read_bytes(), spec)
    if len(files) > 1:
        other = preprocess(files[1].read_bytes(), spec)
    else:  # noise: unlike the first image in every way a graph could mix them
        other = np.random.default_rng(0).standard_normal(first.shape).astype(np.float32)
    alone = session.logits(first)
    # A graph that fails on a batch of 2 was refused by the session's load check already.
    paired = session.logits(np.concatenate([first, other]))
    gap = float(np.abs(paired[0] - alone[0]).max())
    if gap > BATCH_TOLERANCE * max(1.0, float(np.abs(alone).max())):
        raise ImportRefused(
            f"an image's logits change by {gap:.3g} with another image beside it in the batch: "
            "the graph mixes a batch's images (a batch norm in training mode, or activations "
            "quantized per call: dynamic int8, which the service runs one image a call when "
            "the metadata says `precision: int8`), so one client's answer would depend on "
            "another's images"
        )


def import_onnx(
    source: Path,
    output: Path,
    *,
    labels: Path | None = None,
    preprocessor_config: Path | None = None,
    preprocessing: dict[str, Any] | None = None,
    output_kind: str | None = None,
    output_name: str | None = None,
    name: str | None = None,
    version: str | None = None,
    check_images: list[Path],
    calibration_images: Path | None = None,
    rollout: bool = True,
    bf16: bool = False,
) -> SmokeReport:
    """Stamp `source` (a file, or an optimum-style directory) and write it to `output`.

    Each field comes from, in order: the flags, the files given or found beside the model
    (config.json, preprocessor_config.json), the file's own metadata, the graph; a name none
    of them gives is the output file's (`model_name`). The attention rollout is appended
    (refused where the graph has no attention softmax, unless `rollout` is off), the self-test
    set cut from the check images, and the out-of-distribution threshold calibrated on
    `calibration_images` where given (otherwise the file has none). A file stamped bf16 (`bf16`,
    or a file stamped so before) is written only once the bf16 gate passes on the check images.
    """
    folder = source if source.is_dir() else None
    model_file = source / ONNX_FILE if folder else source
    if not model_file.is_file():
        raise ImportRefused(f"{model_file}: no such file")
    proto = read_model(model_file)
    graph_size = graph_input_size(proto)
    old = existing_metadata(proto)
    precision = old.get("precision") or precision_of(proto)
    if bf16 or precision == "bf16":
        if precision not in ("fp32", "bf16"):
            raise ImportRefused(
                f"{model_file} holds {precision} weights: bf16 is a way to run FP32 weights"
            )
        # Before anything else is run: a file stamped bf16 before is measured again, since its
        # self-test tolerance follows from what the gate measures.
        refuse_unmeasurable_bf16()
        precision = "bf16"
    if old.get("output") == "embedding":
        raise ImportRefused(
            f"{model_file} serves an embedding and no classes: import it again from its "
            "checkpoint with `vit-import hf`"
        )
    # A file stamped before: its rollout, score and embedding are made again below.
    strip_rollout(proto)
    strip_ood_score(proto)
    strip_embedding(proto)
    config_file = folder / HF_CONFIG if folder and (folder / HF_CONFIG).is_file() else None
    try:
        config = json.loads(config_file.read_text()) if config_file else {}
    except json.JSONDecodeError as error:
        raise ImportRefused(f"{config_file}: not JSON ({error})") from error

    labels_file = labels or config_file
    label_names = read_labels(labels_file) if labels_file else old.get("labels")
    if not label_names:
        raise ImportRefused("no labels: give --labels (a text file, a JSON list or a config.json)")

    unsaid: list[str] = []  # preprocessing fields that fall back to the spec's defaults
    preprocessor_file = preprocessor_config or (
        folder / HF_PREPROCESSOR if folder and (folder / HF_PREPROCESSOR).is_file() else None
    )
    overrides = dict(preprocessing or {})
    if preprocessor_file:
        draft = bool(overrides.pop("jpeg_draft", False))
        spec = spec_from_preprocessor_config(
            preprocessor_file, jpeg_draft=draft, images=check_images
        ).model_dump()
    elif old:
        spec = dict(old["preprocessing"])
    else:
        if graph_size is None and "input_size" not in overrides:
            raise ImportRefused("the graph does not fix its input size: give --input-size")
        # Pillow's convert("RGB"), as torchvision's, timm's and transformers' loaders decode.
        spec = {"input_size": graph_size, "alpha_background": None}
        unsaid = [field for field in DEFAULTED_FIELDS if field not in overrides]
    try:
        merged_spec = PreprocessSpec.model_validate({**spec, **overrides})
        metadata = ModelMetadata.model_validate(
            {
                **old,
                "name": name or old.get("name") or model_name(output),
                "version": version or old.get("version") or "1",
                "labels": label_names,
                "preprocessing": merged_spec,
                "output": output_kind or old.get("output") or "logits",
                "precision": precision,
                "output_name": choose_output(proto, output_name or old.get("output_name")),
                "source": old.get("source")
                or {
                    "importer": "vit-import onnx",
                    "source": source_name(source),
                    "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
                    **({"model_type": str(config["model_type"])} if "model_type" in config else {}),
                },
            }
        )
    except ValidationError as error:
        raise ImportRefused(f"the metadata would be invalid: {one_line(error)}") from error

    metadata = metadata.model_copy(
        update={
            "output_name": metadata.output_name or proto.graph.output[0].name,
            "attention_output": None,
            "ood": None,
            "self_test": None,
            "embedding": None,
        }
    )
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata.to_props())
    # Until it is sealed, the file is not ours: a file our tools wrote that carries neither its
    # seal nor its self-test is refused as cut short (a file stamped before says they wrote it).
    proto.producer_name = ""
    with staged(output) as staged_path:
        onnx.save(proto, str(staged_path))
        try:
            inspect_model(staged_path)
        except InvalidModelMetadata as error:
            raise refusal_of(error, staged_path, source, output) from error
        if rollout:
            metadata = with_rollout(proto, metadata)
            onnx.save(proto, str(staged_path))
        try:
            session = ModelSession(staged_path, IN_PROCESS)
            report = smoke(session, check_images, kind_given=output_kind is not None or bool(old))
        except InvalidModelMetadata as error:
            raise refusal_of(error, staged_path, source, output) from error
        # No other framework to compare with: the file at FP32 is the reference, and bf16's
        # difference from it is what its self-test tolerates beyond.
        measured = 0.0
        if precision == "bf16":
            gate = bf16_gate_on_files(session, bf16_session(staged_path), check_images)
            if not gate.passed:
                raise ImportRefused(gate.refusal())
            report, measured = replace(report, bf16=gate), gate.max_probability_diff
        try:
            finish_model_file(
                proto,
                staged_path,
                session,
                metadata,
                calibrate=functools.partial(calibrate_on_folder, folder=calibration_images),
                golden=golden_files(check_images, metadata.preprocessing),
                measured=measured,
                producer="vit-import",
            )
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
            # Its first line: the ones after it are what follows from the first.
            reason = str(error).strip().splitlines()[0]
            raise ImportRefused(
                f"{model_file}: onnx's checker refuses the graph ({reason})"
            ) from error
        staged_path.replace(output)
    if unsaid:
        defaults = ", ".join(f"{field} {getattr(merged_spec, field)}" for field in unsaid)
        note = (
            f"no preprocessor_config.json: {defaults} are defaults, not read from the model; "
            "give them as flags if it was trained otherwise"
        )
        return replace(report, warning="\nwarning: ".join(filter(None, [report.warning, note])))
    return report


def refusal_of(
    error: InvalidModelMetadata, staged_path: Path, source: Path, output: Path
) -> ImportRefused:
    """The load-time check's refusal of the file being written, said of the import: the fix it
    names is this import again, from `source`, with the flag it names."""
    restamp = f"vit-import onnx {staged_path} -o {staged_path}"
    text = str(error).replace(restamp, f"vit-import onnx {source} -o {output}")
    return ImportRefused(text.replace(str(staged_path), str(output)))


NO_ROLLOUT = "import it without the rollout with --no-rollout"


@contextmanager
def rollout_refusals(input_size: int) -> Iterator[None]:
    """Appending the attention rollout, its failures as one-line refusals: a graph with no
    attention the rollout can read (none, as a CNN's, or windowed, as Swin's) names
    --no-rollout."""
    try:
        yield
    except NoAttention as error:
        raise ImportRefused(f"{error}; {NO_ROLLOUT}") from error
    except Exception as error:  # onnxruntime's own errors, untyped
        raise ImportRefused(
            f"the graph failed on a blank {input_size}x{input_size} image ({last_line(error)})"
        ) from error


def with_rollout(proto: onnx.ModelProto, metadata: ModelMetadata) -> ModelMetadata:
    """The attention rollout appended to the graph, and the metadata naming it, or a refusal."""
    with rollout_refusals(metadata.preprocessing.input_size):
        add_rollout(proto, input_size=metadata.preprocessing.input_size)
    metadata = metadata.model_copy(update={"attention_output": ROLLOUT_OUTPUT})
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata.to_props())
    return metadata
