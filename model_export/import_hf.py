"""A Hugging Face image classifier -> one self-describing ONNX file, proven equal to transformers.

The parity check is end to end: transformers' own model on its own processor's output, against
onnxruntime on this project's preprocessing of the same image files, as the service would run it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import pickle
import shutil
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn
from torch.jit._trace import TracerWarning

from model_contract.metadata import Embedding, ModelMetadata, last_line
from model_contract.outputs import ATTENTION_ROLLOUT, EMBEDDING
from model_contract.preprocess import preprocess
from model_export.attention import hf_rollout
from model_export.bf16 import Bf16Report, bf16_gate_on_files, bf16_session, refuse_unmeasurable_bf16
from model_export.checkpoint import sha256_of
from model_export.export import (
    FP16_MIN_TOP1_AGREEMENT,
    FP16_PROBABILITY_TOLERANCE,
    LOGIT_TOLERANCE,
    OUTPUT_NAME,
    ROLLOUT_TOLERANCE,
    Float16Inside,
    to_onnx,
    with_rollout,
)
from model_export.hf_preprocessing import UnexpressibleProcessor, spec_from_processor
from model_export.import_onnx import rollout_refusals
from model_export.importing import (
    ImportRefused,
    chunks,
    decodable_image_files,
    model_name,
    probability_diff,
    read_json,
    refuse_custom_code,
    served_embeddings,
    served_logits,
    source_name,
    staged,
)
from model_export.quantize import Int8Report, check_on_images, quantize
from model_export.sealing import finish_model_file, write_metadata
from model_export.stamp import calibrate_on_folder, golden_files
from model_runtime.options import IN_PROCESS
from model_runtime.session import ModelSession

logger = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
CHECKPOINT_JSON = ("config.json", "preprocessor_config.json", "processor_config.json")
"""The files from which transformers chooses a checkpoint's model and image processor classes."""
HEADLESS = {
    "ViTModel": "transformers' ViTModel last_hidden_state[:, 0]: the class token after the final "
    "LayerNorm, as ViTForImageClassification's head reads it; not its pooler_output, a dense "
    "layer and tanh on that token",
    "Dinov2Model": "transformers' Dinov2Model last_hidden_state[:, 0], its pooler_output: the "
    "class token after the final LayerNorm",
}
"""Checkpoints without a classification head that are imported as models without classes, and
what their embedding is: each one's class token after its final normalisation."""
EMBEDDING_TOLERANCE = 1e-4
"""The largest |difference| of any embedding float from transformers' that a model without
classes may have."""


class LogitsOnly(nn.Module):
    """A transformers classifier as pixel_values -> logits, the graph the service runs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(pixel_values=pixel_values).logits
        return logits


class ClassToken(nn.Module):
    """A transformers model without a classification head as pixel_values -> its embedding, the
    class token of last_hidden_state (HEADLESS), the graph the service runs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor = self.model(pixel_values=pixel_values).last_hidden_state  # (B, T, D)
        return hidden[:, 0]  # (B, D)


@dataclass(frozen=True)
class EmbeddingParity:
    """transformers against onnxruntime for a model without classes, each on its own
    preprocessing, on the same files."""

    images: int
    max_embedding_diff: float

    @property
    def passed(self) -> bool:
        return self.max_embedding_diff <= EMBEDDING_TOLERANCE

    def line(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        return (
            f"transformers vs onnxruntime on {self.images} images: max |dembedding| "
            f"{self.max_embedding_diff:.2e} (<= {EMBEDDING_TOLERANCE:g})  {verdict}"
        )


@dataclass(frozen=True)
class ParityReport:
    """transformers against onnxruntime, each on its own preprocessing, on the same files."""

    images: int
    max_logit_diff: float
    max_probability_diff: float
    top1_agree: int
    fp16: bool
    max_rollout_diff: float | None
    """None: the file has no attention rollout (--no-rollout)."""

    @property
    def passed(self) -> bool:
        if self.fp16:
            return (
                self.top1_agree / self.images >= FP16_MIN_TOP1_AGREEMENT
                and self.max_probability_diff <= FP16_PROBABILITY_TOLERANCE
            )
        return (
            self.max_logit_diff <= LOGIT_TOLERANCE
            and self.top1_agree == self.images
            and (self.max_rollout_diff is None or self.max_rollout_diff <= ROLLOUT_TOLERANCE)
        )

    def line(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        if self.fp16:
            return (
                f"fp16 onnxruntime vs fp32 transformers on {self.images} images: top-1 equal "
                f"{self.top1_agree}/{self.images} (>= {FP16_MIN_TOP1_AGREEMENT:.1%}), "
                f"max |dprobability| {self.max_probability_diff:.2e} "
                f"(<= {FP16_PROBABILITY_TOLERANCE:g})  {verdict}"
            )
        rollout = (
            "no attention rollout"
            if self.max_rollout_diff is None
            else f"max |drollout| {self.max_rollout_diff:.2e} (<= {ROLLOUT_TOLERANCE:g})"
        )
        return (
            f"transformers vs onnxruntime on {self.images} images: max |dlogit| "
            f"{self.max_logit_diff:.2e} (<= {LOGIT_TOLERANCE:g}), top-1 equal "
            f"{self.top1_agree}/{self.images}, {rollout}  {verdict}"
        )


def weights_sha256(source: str) -> str:
    """sha256 of the weights file (or of the weight files' digests, in name order)."""
    folder = Path(source)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source, local_files_only=True))
    files = sorted({f for pattern in WEIGHT_PATTERNS for f in folder.glob(pattern)})
    if len(files) == 1:
        return sha256_of(files[0])
    return hashlib.sha256("".join(sha256_of(f) for f in files).encode()).hexdigest()


def checkpoint_json(source: str) -> Path:
    """The folder holding the checkpoint's CHECKPOINT_JSON files: `source` itself, or for a hub
    id those files alone, downloaded (the weights come later, through transformers)."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=list(CHECKPOINT_JSON)))
    except (OSError, ValueError) as error:  # the hub's errors; ValueError: not a repository id
        raise ImportRefused(
            f"{source}: neither a checkpoint folder nor a hub checkpoint ({last_line(error)})"
        ) from error


def load(source: str) -> tuple[nn.Module, Any]:
    """transformers' classifier (or a model without a classification head, HEADLESS) and its
    PIL-backend image processor, as the pipeline loads them, or a refusal where the checkpoint
    would run code of its own: Python it ships (refused before transformers reads it) or
    pickled weights holding more than tensors."""
    folder = checkpoint_json(source)
    for name in CHECKPOINT_JSON:
        if (folder / name).is_file():
            refuse_custom_code(read_json(folder / name), folder / name)
    headless = headless_architecture(folder / "config.json")

    from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

    if importlib.util.find_spec("torchvision") is not None:
        logger.warning(
            "torchvision is installed, so pipeline() defaults to transformers' torchvision "
            "backend; the served numbers are those of its PIL backend (pass "
            "image_processor=AutoImageProcessor.from_pretrained(SOURCE, backend='pil'))"
        )
    auto = AutoModel if headless else AutoModelForImageClassification
    try:
        model = auto.from_pretrained(source, trust_remote_code=False).eval()
    except pickle.UnpicklingError as error:  # torch.load(weights_only=True) met an object
        raise ImportRefused(
            f"{source}: its pickled weights hold objects other than tensors, which could run "
            "code as they are unpickled; vit-import loads tensors only: use safetensors weights"
        ) from error
    processor = AutoImageProcessor.from_pretrained(source, backend="pil", trust_remote_code=False)
    config = model.config
    if headless is None and (
        config.problem_type == "multi_label_classification" or config.num_labels < 2
    ):
        raise ImportRefused(
            f"problem_type {config.problem_type!r} with {config.num_labels} labels: the service "
            "serves one softmax over two or more classes"
        )
    return model, processor


def headless_architecture(config_file: Path) -> str | None:
    """The architecture of a checkpoint without a classification head (one of HEADLESS, as
    config.json's `architectures` names it), None for a classifier, or a refusal for another
    model without a head: its class token is not an embedding this importer knows."""
    fields = read_json(config_file) if config_file.is_file() else {}
    names = fields.get("architectures") if isinstance(fields, dict) else None
    if not isinstance(names, list) or len(names) != 1:
        return None
    (name,) = names
    if name in HEADLESS:
        return str(name)
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    bases = {n for v in MODEL_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}
    if name in bases:
        raise ImportRefused(
            f"{config_file}: {name} has no classification head; of the models without one, "
            f"vit-import serves the embedding of {' and '.join(HEADLESS)} only, whose "
            "last_hidden_state[:, 0] is the class token after the final normalisation"
        )
    return None


def labels_of(config: Any) -> tuple[str, ...]:
    """The class names in output order, from `id2label`."""
    id2label = {int(k): str(v) for k, v in config.id2label.items()}
    if sorted(id2label) != list(range(config.num_labels)):
        raise ImportRefused(f"id2label does not name each of the {config.num_labels} outputs")
    return tuple(id2label[i] for i in range(config.num_labels))


def architecture(config: Any) -> dict[str, Any] | None:
    """A plain ViT's shape, in vit-export's names (for the cost /v1/models reports)."""
    try:
        return {
            "image_size": int(config.image_size),
            "patch_size": int(config.patch_size),
            "width": int(config.hidden_size),
            "depth": int(config.num_hidden_layers),
            "heads": int(config.num_attention_heads),
            "mlp_ratio": config.intermediate_size / config.hidden_size,
        }
    except (AttributeError, TypeError):
        return None


def framework_outputs(graph: nn.Module, processor: Any, files: list[Path]) -> np.ndarray:
    """transformers on its own: its image loading, its processor, its model as exported
    (`LogitsOnly` or `ClassToken` of it), in float32."""
    from transformers.image_utils import load_image

    rows = []
    for path in files:
        inputs = processor(images=[load_image(str(path))], return_tensors="pt")
        with torch.no_grad():
            rows.append(graph(inputs["pixel_values"]).numpy())
    return np.concatenate(rows)


def check_parity(
    model: nn.Module, processor: Any, session: ModelSession, files: list[Path], *, fp16: bool
) -> ParityReport:
    """Logits end to end (each side's own preprocessing); the attention rollout of the graph
    against transformers' own attention maps on the same input tensors."""
    expected = framework_outputs(LogitsOnly(model), processor, files)
    actual = served_logits(session, files, session.metadata.preprocessing)
    return ParityReport(
        images=len(files),
        max_logit_diff=float(np.abs(expected - actual).max()),
        max_probability_diff=probability_diff(expected, actual),
        top1_agree=int((expected.argmax(1) == actual.argmax(1)).sum()),
        fp16=fp16,
        max_rollout_diff=None
        if session.attention_output is None
        else rollout_difference(model, session, files),
    )


def check_embedding_parity(
    model: nn.Module, processor: Any, session: ModelSession, files: list[Path]
) -> EmbeddingParity:
    """The embedding of a model without classes end to end (each side's own preprocessing)."""
    expected = framework_outputs(ClassToken(model), processor, files)
    actual = served_embeddings(session, files, session.metadata.preprocessing)
    return EmbeddingParity(
        images=len(files), max_embedding_diff=float(np.abs(expected - actual).max())
    )


def rollout_difference(model: nn.Module, session: ModelSession, files: list[Path]) -> float:
    """The graph's attention rollout against transformers' own attention maps on the same
    input tensors: the largest difference."""
    worst = 0.0
    for chunk in chunks(files):  # attention maps for every image at once would not fit
        batch = np.concatenate(
            [preprocess(p.read_bytes(), session.metadata.preprocessing) for p in chunk]
        )
        reference = hf_rollout(model, torch.from_numpy(batch)).numpy()
        graph = session.infer(batch)[ATTENTION_ROLLOUT]
        worst = max(worst, float(np.abs(reference - graph).max()))
    return worst


def exported(graph: nn.Module, path: Path, input_size: int, output: str = OUTPUT_NAME) -> None:
    """`graph` as ONNX at `path` (its output named `output`), or a one-line refusal where it
    does not export (an operator ONNX lacks, or a model fixed to another input size than its
    processor's)."""
    try:
        with warnings.catch_warnings(), native_stdout_discarded():
            warnings.simplefilter("ignore", TracerWarning)  # notes on shape checks it folds away
            to_onnx(graph, path, input_size, output=output)
    except Exception as error:  # torch's exporter raises many types
        raise ImportRefused(
            f"the model does not export to ONNX at {input_size}x{input_size}: {last_line(error)}"
        ) from error


@contextmanager
def native_stdout_discarded() -> Iterator[None]:
    """The process's standard output (file descriptor 1) sent nowhere: torch's exporter writes
    its whole graph there, in C++, when an export fails, hundreds of lines before the refusal."""
    sys.stdout.flush()
    kept = os.dup(1)
    with open(os.devnull, "wb") as nowhere:
        os.dup2(nowhere.fileno(), 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(kept, 1)
        os.close(kept)


def stamp_graph(path: Path, metadata: ModelMetadata, *, rollout: bool) -> ModelMetadata:
    """The file at `path` with `metadata` written into it, and the attention rollout appended
    unless not wanted."""
    if rollout:
        return rollout_appended(path, metadata)
    write_metadata(path, metadata, producer="vit-import")
    return metadata


def rollout_appended(path: Path, metadata: ModelMetadata) -> ModelMetadata:
    """The file at `path` with the attention rollout, or a one-line refusal."""
    with rollout_refusals(metadata.preprocessing.input_size):
        named = with_rollout(path, metadata, producer="vit-import")
    return named


def import_hf(
    source: str,
    output: Path,
    *,
    name: str | None = None,
    version: str = "1",
    check_images: Path | None = None,
    fp16: bool = False,
    int8: bool = False,
    bf16: bool = False,
    jpeg_draft: bool = False,
    calibration_images: Path | None = None,
    rollout: bool = True,
) -> ParityReport | Int8Report | Bf16Report | EmbeddingParity:
    """Write the ONNX file with its metadata and attention rollout, then check it against
    transformers; with `int8`, quantize the FP32 file once it passes and check the int8 file
    against it instead; with `bf16`, check the FP32 file run in bf16 against its FP32 run. The
    self-test set is cut from the check images; the out-of-distribution threshold is calibrated
    on `calibration_images` where given (otherwise the file has none). A checkpoint without a
    classification head (HEADLESS) becomes a model without classes (`import_headless`)."""
    if fp16 + int8 + bf16 > 1:
        raise ValueError("a file is fp16, int8 or bf16, not two of them")
    if bf16:
        refuse_unmeasurable_bf16()  # before the checkpoint is read and exported
    model, processor = load(source)
    files = decodable_image_files(check_images)
    try:
        spec = spec_from_processor(processor, jpeg_draft=jpeg_draft, images=files)
    except UnexpressibleProcessor as error:
        raise ImportRefused(f"the image processor cannot be expressed: {error}") from error
    config: Any = model.config
    embedding = HEADLESS.get(type(model).__name__)
    if embedding is not None and (fp16 or int8 or bf16 or calibration_images):
        raise ImportRefused(
            f"{type(model).__name__} has no classification head: it is imported at FP32, "
            "without --fp16, --int8, --bf16 or --calibration-images, whose checks are on classes"
        )
    metadata = ModelMetadata(
        name=name or model_name(output),
        version=version,
        labels=() if embedding else labels_of(config),
        preprocessing=spec,
        output="embedding" if embedding else "logits",
        precision="fp16" if fp16 else "bf16" if bf16 else "fp32",
        checkpoint_sha256=weights_sha256(source),
        dataset={"config": architecture(config)} if architecture(config) else {},
        source={
            "importer": "vit-import hf",
            "source": source_name(source),
            "model_type": str(config.model_type),
            "architecture": type(model).__name__,
            "image_processor": type(processor).__name__,
        },
        embedding=Embedding(output=EMBEDDING, size=int(config.hidden_size), source=embedding)
        if embedding
        else None,
    )
    if embedding is not None:
        return import_headless(model, processor, metadata, output, files)
    graph = LogitsOnly(model)
    with staged(output) as plain, staged(output) as staged_path:
        exported(Float16Inside(graph) if fp16 else graph, plain, spec.input_size)
        shutil.copyfile(plain, staged_path)
        metadata = stamp_graph(staged_path, metadata, rollout=rollout)
        session = ModelSession(staged_path, IN_PROCESS)
        report = check_parity(model, processor, session, files, fp16=fp16)
        if not report.passed:
            return report
        measured = report.max_probability_diff
        result: ParityReport | Int8Report | Bf16Report = report
        if bf16:
            # FP32 weights, run at FP32 by `session`: its self-test expects the FP32
            # probabilities, within what bf16 moves them.
            result = bf16_gate_on_files(session, bf16_session(staged_path), files)
            if not result.passed:
                return result
            measured += result.max_probability_diff
        if int8:
            fp32 = session
            quantize(plain, staged_path)
            int8_metadata = metadata.model_copy(update={"precision": "int8"})
            metadata = stamp_graph(staged_path, int8_metadata, rollout=rollout)
            session = ModelSession(staged_path, IN_PROCESS)
            result = check_on_images(fp32, session, check_images)
            if not result.passed:
                return result
            spec = metadata.preprocessing
            measured += probability_diff(
                served_logits(fp32, files, spec), served_logits(session, files, spec)
            )
        finish_model_file(
            onnx.load_model_from_string(staged_path.read_bytes()),
            staged_path,
            session,
            metadata,
            calibrate=functools.partial(calibrate_on_folder, folder=calibration_images),
            golden=golden_files(files, spec),
            measured=measured,
            producer="vit-import",
        )
        staged_path.replace(output)
    return result


def import_headless(
    model: nn.Module, processor: Any, metadata: ModelMetadata, output: Path, files: list[Path]
) -> EmbeddingParity:
    """Write a model without classes (its one output the embedding, `ClassToken`), checked
    against transformers' embedding of the check images, with the self-test set cut from them;
    no attention rollout, no out-of-distribution score (both are about classes)."""
    with staged(output) as staged_path:
        exported(ClassToken(model), staged_path, metadata.preprocessing.input_size, EMBEDDING)
        write_metadata(staged_path, metadata, producer="vit-import")
        session = ModelSession(staged_path, IN_PROCESS)
        report = check_embedding_parity(model, processor, session, files)
        if not report.passed:
            return report
        finish_model_file(
            onnx.load_model_from_string(staged_path.read_bytes()),
            staged_path,
            session,
            metadata,
            calibrate=lambda proto, session: None,
            golden=golden_files(files, metadata.preprocessing),
            measured=report.max_embedding_diff,
            producer="vit-import",
        )
        staged_path.replace(output)
    return report
