"""`vit-export`: checkpoint -> one self-describing ONNX file, proven equal to PyTorch."""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from model_contract.metadata import ModelMetadata
from model_contract.preprocess import PreprocessSpec, preprocess
from model_export import shapes
from model_export.checkpoint import Checkpoint, NotACheckpoint, sha256_of
from model_export.evaluate import evaluate
from model_export.importing import staged
from model_export.quantize import Int8Report, compare, quantize
from model_export.vit import VisionTransformer
from service.runtime.options import IN_PROCESS
from service.runtime.session import ModelSession, softmax

logger = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
LOGIT_TOLERANCE = 1e-4
PARITY_BATCH_SIZES = (1, 8)
# Half precision keeps ~3 decimal digits: the FP16 file must agree with the FP32 model on nearly
# every held-out image and move no probability by more than this.
FP16_MIN_TOP1_AGREEMENT = 0.995
FP16_PROBABILITY_TOLERANCE = 1e-2
# The fewest held-out images the FP16 and int8 checks use, whatever --eval-count says.
PRECISION_MIN_IMAGES = 256


@dataclass(frozen=True)
class ParityCase:
    """PyTorch against onnxruntime on one batch."""

    name: str
    batch_size: int
    max_abs_diff: float
    top1_agree: int

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= LOGIT_TOLERANCE and self.top1_agree == self.batch_size

    def line(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        return (
            f"{self.name:<8} batch {self.batch_size:>2}  max |dlogit| {self.max_abs_diff:.2e}"
            f"  top-1 equal {self.top1_agree}/{self.batch_size}  {verdict}"
        )


@dataclass(frozen=True)
class PrecisionReport:
    """An FP16 file against the FP32 PyTorch model on the held-out images."""

    count: int
    top1_agreement: float
    max_probability_diff: float

    @property
    def passed(self) -> bool:
        return (
            self.top1_agreement >= FP16_MIN_TOP1_AGREEMENT
            and self.max_probability_diff <= FP16_PROBABILITY_TOLERANCE
        )

    def line(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        return (
            f"fp16 vs fp32 on {self.count} held-out images: top-1 agreement "
            f"{self.top1_agreement:.2%} (>= {FP16_MIN_TOP1_AGREEMENT:.1%}), max |dprobability| "
            f"{self.max_probability_diff:.2e} (<= {FP16_PROBABILITY_TOLERANCE:g})  {verdict}"
        )


class Float16Inside(nn.Module):
    """A model (images -> logits) in half precision behind a float32 input and output, so
    clients and the service's preprocessing see no difference."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).half()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.half()).float()


def to_onnx(model: nn.Module, path: Path, image_size: int) -> None:
    """Trace the model (images -> logits) to ONNX with a dynamic batch axis and named input
    and output."""
    example = torch.zeros(2, 3, image_size, image_size)
    torch.onnx.export(
        model.eval(),
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        opset_version=OPSET,
        dynamo=False,
    )


def write_metadata(path: Path, metadata: ModelMetadata, *, producer: str = "vit-export") -> None:
    """Store the metadata in the file (replacing any) and run onnx's full checker over it."""
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata.to_props())
    proto.producer_name = producer
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def parity_inputs(spec: PreprocessSpec, seed: int) -> list[tuple[str, np.ndarray]]:
    """Random tensors and real preprocessed images, at each parity batch size."""
    rng = np.random.default_rng(seed)
    cases = []
    for batch_size in PARITY_BATCH_SIZES:
        shape = (batch_size, 3, spec.input_size, spec.input_size)
        cases.append(("random", rng.standard_normal(shape).astype(np.float32)))
        images = [preprocess(s.data, spec) for s in shapes.samples(seed, batch_size)]
        cases.append(("images", np.concatenate(images)))
    return cases


def check_parity(model: VisionTransformer, session: ModelSession, seed: int) -> list[ParityCase]:
    results = []
    for name, batch in parity_inputs(session.metadata.preprocessing, seed):
        with torch.no_grad():
            expected = model(torch.from_numpy(batch)).numpy()
        actual = session.logits(batch)
        results.append(
            ParityCase(
                name=name,
                batch_size=len(batch),
                max_abs_diff=float(np.abs(expected - actual).max()),
                top1_agree=int((expected.argmax(1) == actual.argmax(1)).sum()),
            )
        )
    return results


def held_out(
    spec: PreprocessSpec, *, seed: int, count: int, batch_size: int = 64
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Held-out images preprocessed as the service does, with their class indices, in batches."""
    for start in range(0, count, batch_size):
        batch = list(shapes.samples(seed, min(batch_size, count - start), start))
        yield (
            np.concatenate([preprocess(s.data, spec) for s in batch]),
            np.array([s.label for s in batch]),
        )


def compare_precision(
    model: VisionTransformer, session: ModelSession, *, seed: int, count: int
) -> PrecisionReport:
    """Probabilities of the FP16 file against the FP32 PyTorch model, image by image."""
    agree, largest = 0, 0.0
    for batch, _ in held_out(session.metadata.preprocessing, seed=seed, count=count):
        with torch.no_grad():
            expected = softmax(model(torch.from_numpy(batch)).numpy())
        actual = session.predict(batch)
        agree += int((expected.argmax(1) == actual.argmax(1)).sum())
        largest = max(largest, float(np.abs(expected - actual).max()))
    return PrecisionReport(count=count, top1_agreement=agree / count, max_probability_diff=largest)


def export_int8(
    model: VisionTransformer,
    metadata: ModelMetadata,
    output: Path,
    *,
    image_size: int,
    eval_seed: int,
    count: int,
) -> list[ParityCase] | Int8Report:
    """The FP32 file, proven equal to PyTorch, quantized to int8 and compared with it on the
    held-out images; `output` is written only if both checks pass."""
    with staged(output) as fp32_path, staged(output) as int8_path:
        to_onnx(model, fp32_path, image_size)
        write_metadata(fp32_path, metadata)
        fp32 = ModelSession(fp32_path, IN_PROCESS)
        parity = check_parity(model, fp32, seed=eval_seed)
        if not all(case.passed for case in parity):
            return parity
        quantize(fp32_path, int8_path)
        write_metadata(int8_path, metadata.model_copy(update={"precision": "int8"}))
        int8 = ModelSession(int8_path, IN_PROCESS)
        batches = list(held_out(metadata.preprocessing, seed=eval_seed, count=count))
        report = compare(
            np.concatenate([fp32.logits(batch) for batch, _ in batches]),
            np.concatenate([int8.logits(batch) for batch, _ in batches]),
            np.concatenate([truth for _, truth in batches]),
        )
        if report.passed:
            held = {"held_out_seed": eval_seed, "held_out_count": count}
            stamped = {
                "precision": "int8",
                "held_out_accuracy": report.int8_accuracy,
                "dataset": {**metadata.dataset, **held},
            }
            write_metadata(int8_path, metadata.model_copy(update=stamped))
            int8_path.replace(output)
    return report


def export(
    checkpoint_path: Path,
    output: Path,
    *,
    version: str,
    eval_seed: int,
    eval_count: int,
    fp16: bool = False,
    int8: bool = False,
) -> tuple[list[ParityCase] | PrecisionReport | Int8Report, float | None]:
    """Write the ONNX file, check it against PyTorch, measure held-out accuracy and store it.

    FP32 files must match PyTorch to LOGIT_TOLERANCE; FP16 files are compared with the FP32
    model on the held-out images instead (`PrecisionReport`), and int8 files with the FP32 file
    (`Int8Report`, and no file unless it passes).
    """
    checkpoint = Checkpoint.load(checkpoint_path)
    model = checkpoint.build_model()
    metadata = ModelMetadata(
        name=checkpoint.name,
        version=version,
        labels=tuple(checkpoint.labels),
        preprocessing=checkpoint.preprocessing,
        output="logits",
        precision="fp16" if fp16 else "fp32",
        dataset={
            **checkpoint.dataset,
            "config": checkpoint.config.to_dict(),
            "train_command": checkpoint.command,
            **checkpoint.metrics,
        },
        checkpoint_sha256=sha256_of(checkpoint_path),
    )
    if int8:
        count = max(eval_count, PRECISION_MIN_IMAGES)
        report = export_int8(
            model,
            metadata,
            output,
            image_size=checkpoint.config.image_size,
            eval_seed=eval_seed,
            count=count,
        )
        return report, report.int8_accuracy if isinstance(report, Int8Report) else None
    output.parent.mkdir(parents=True, exist_ok=True)
    to_onnx(Float16Inside(model) if fp16 else model, output, checkpoint.config.image_size)
    write_metadata(output, metadata)
    session = ModelSession(output, IN_PROCESS)
    parity: list[ParityCase] | PrecisionReport
    if fp16:
        parity = compare_precision(
            model, session, seed=eval_seed, count=max(eval_count, PRECISION_MIN_IMAGES)
        )
    else:
        parity = check_parity(model, session, seed=eval_seed)
    accuracy = None
    if eval_count:
        accuracy = evaluate(session, seed=eval_seed, count=eval_count).accuracy
        held_out = {"held_out_seed": eval_seed, "held_out_count": eval_count}
        write_metadata(
            output,
            metadata.model_copy(
                update={"held_out_accuracy": accuracy, "dataset": {**metadata.dataset, **held_out}}
            ),
        )
    return parity, accuracy


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="vit-export", description=__doc__)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--version", default="1")
    parser.add_argument(
        "--eval-seed",
        type=int,
        default=1_000_003,
        help="Seed of the held-out images; never a training seed.",
    )
    parser.add_argument(
        "--eval-count",
        type=int,
        default=2000,
        help="Held-out images whose accuracy is stored in the file (0: skip).",
    )
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument(
        "--fp16",
        action="store_true",
        help="Half-precision weights and compute; input and output stay float32.",
    )
    precision.add_argument(
        "--int8",
        action="store_true",
        help="int8 weights, activations quantized per call; written only if it agrees with the "
        "FP32 model on >= 99%% of the held-out images and loses <= 0.5 points of accuracy.",
    )
    args = parser.parse_args(argv)
    try:
        parity, accuracy = export(
            args.checkpoint,
            args.output,
            version=args.version,
            eval_seed=args.eval_seed,
            eval_count=args.eval_count,
            fp16=args.fp16,
            int8=args.int8,
        )
    except NotACheckpoint as error:
        sys.exit(f"vit-export: {error}")
    if isinstance(parity, PrecisionReport | Int8Report):
        print(parity.line())
        passed = parity.passed
    else:
        print(f"parity, PyTorch vs onnxruntime (tolerance {LOGIT_TOLERANCE:g}):")
        for case in parity:
            print("  " + case.line())
        passed = all(case.passed for case in parity)
    if args.int8 and not passed:
        sys.exit(f"vit-export: the int8 model failed its check; {args.output} not written")
    if accuracy is not None:
        count = max(args.eval_count, PRECISION_MIN_IMAGES) if args.int8 else args.eval_count
        print(f"held-out accuracy {accuracy:.2%} on {count} images (seed {args.eval_seed})")
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.1f} MB)")
    if not passed:
        sys.exit(1)


if __name__ == "__main__":
    main()
