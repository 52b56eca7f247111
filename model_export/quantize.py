"""FP32 ONNX -> int8 ONNX with onnxruntime's quantization tools, and the gate the int8 file must
pass before anything serves it. No torch here."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process

from model_contract.metadata import ModelMetadata
from model_export.evaluate import UnlabelledImages, labelled_images
from model_export.importing import image_files, served_logits
from model_export.ood_features import strip_ood_score
from model_export.rollout import add_rollout_to_file, strip_rollout
from model_runtime.session import ModelSession

# An int8 file must give the FP32 model's answer on nearly every image and lose at most half
# a point of accuracy where the images' labels are known.
INT8_MIN_TOP1_AGREEMENT = 0.99
INT8_MAX_ACCURACY_DROP = 0.005


@dataclass(frozen=True)
class Int8Report:
    """The int8 file against the FP32 file on the same images, each as the service runs it."""

    images: int
    top1_agree: int
    fp32_accuracy: float | None
    int8_accuracy: float | None
    unlabelled: str = "no labels"
    """Why accuracy was not measured, where it was not."""

    @property
    def top1_agreement(self) -> float:
        return self.top1_agree / self.images

    @property
    def accuracy_drop(self) -> float | None:
        if self.fp32_accuracy is None or self.int8_accuracy is None:
            return None
        return self.fp32_accuracy - self.int8_accuracy

    @property
    def passed(self) -> bool:
        drop = self.accuracy_drop
        # Rounded: 1.0 - 0.995 is 0.0050000000000000044 in floats, and half a point is allowed.
        return self.top1_agreement >= INT8_MIN_TOP1_AGREEMENT and (
            drop is None or round(drop, 9) <= INT8_MAX_ACCURACY_DROP
        )

    def line(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        accuracy = (
            f"accuracy not measured ({self.unlabelled})"
            if self.fp32_accuracy is None or self.int8_accuracy is None
            else f"accuracy {self.int8_accuracy:.2%} vs {self.fp32_accuracy:.2%} "
            f"(at most {INT8_MAX_ACCURACY_DROP * 100:.1f} points lower)"
        )
        return (
            f"int8 vs fp32 on {self.images} images: top-1 equal {self.top1_agree}/{self.images} "
            f"= {self.top1_agreement:.2%} (>= {INT8_MIN_TOP1_AGREEMENT:.0%}), {accuracy}  {verdict}"
        )


def compare(
    fp32_logits: np.ndarray, int8_logits: np.ndarray, truth: np.ndarray | None = None
) -> Int8Report:
    """Top-1 agreement of the two models' outputs, and their accuracies where `truth` (class
    indices) is known."""
    fp32_top1, int8_top1 = fp32_logits.argmax(axis=1), int8_logits.argmax(axis=1)
    return Int8Report(
        images=len(fp32_top1),
        top1_agree=int((fp32_top1 == int8_top1).sum()),
        fp32_accuracy=None if truth is None else float((fp32_top1 == truth).mean()),
        int8_accuracy=None if truth is None else float((int8_top1 == truth).mean()),
    )


def quantize(fp32: Path, int8: Path) -> None:
    """Write `fp32` with int8 weights; activations are quantized per call (dynamic quantization).

    Dynamic rather than static: on the bundled model it kept 99.95% top-1 agreement where static
    quantization calibrated on held-out images kept 98.6-98.9%, below the gate, and on the 224
    ViTs it is the faster of the two (docs/INT8.md). Input and output stay float32.
    """
    with tempfile.TemporaryDirectory() as folder:
        prepared = Path(folder) / "prepared.onnx"
        # The attention rollout stays float32: the graph is quantized without it, and it is
        # appended to the int8 graph, where it reads the same (float) attention softmaxes.
        proto = onnx.load(str(fp32))
        rollout = strip_rollout(proto)
        strip_ood_score(proto)  # calibrated again on the int8 graph's own features
        plain = Path(folder) / "plain.onnx"
        onnx.save(proto, str(plain))
        # Shape inference and onnxruntime's graph clean-up first, as its quantizer asks (it
        # warns otherwise): the same MatMuls are quantized, in a graph of 40% fewer nodes.
        with root_logger_quiet():
            quant_pre_process(str(plain), str(prepared))
            quantize_dynamic(prepared, int8, weight_type=QuantType.QInt8)
        if rollout:
            props = {p.key: p.value for p in proto.metadata_props}
            size = ModelMetadata.from_props(props).preprocessing.input_size
            add_rollout_to_file(int8, input_size=size)


@contextmanager
def root_logger_quiet() -> Iterator[None]:
    """Warnings only, for a while: onnxruntime.quantization writes a line per tensor on the root
    logger at INFO, which vit-export shows."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(level)


def check_on_images(fp32: ModelSession, int8: ModelSession, folder: Path | None) -> Int8Report:
    """The two files on the check images (the shipped photos when None), as the service computes
    them; accuracy too where the folder holds one subfolder per label, as `vit-eval --images`."""
    files, truth, unlabelled = image_files(folder), None, None
    if folder is not None:
        try:
            labelled = labelled_images(folder, fp32.labels)
        except UnlabelledImages as error:
            unlabelled = str(error)  # a mistyped label folder must not pass unseen
        else:
            files, truth = [path for path, _ in labelled], np.array([t for _, t in labelled])
    spec = fp32.metadata.preprocessing
    report = compare(served_logits(fp32, files, spec), served_logits(int8, files, spec), truth)
    return report if unlabelled is None else replace(report, unlabelled=unlabelled)
