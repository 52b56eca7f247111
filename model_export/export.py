"""`vit-export`: checkpoint -> one self-describing ONNX file, proven equal to PyTorch, with its
attention rollout, out-of-distribution calibration and self-test set."""

from __future__ import annotations

import argparse
import copy
import logging
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from model_contract.metadata import InvalidModelMetadata, ModelMetadata, OodCalibration
from model_contract.preprocess import PreprocessSpec, preprocess, preprocess_upload
from model_export import shapes
from model_export.attention import vit_rollout
from model_export.bf16 import (
    BF16_MAX_PROBABILITY_DIFF,
    BF16_MIN_TOP1_AGREEMENT,
    Bf16Report,
    Bf16Unmeasurable,
    bf16_drift,
    bf16_gate,
    bf16_session,
    refuse_unmeasurable_bf16,
)
from model_export.checkpoint import Checkpoint, NotACheckpoint, sha256_of, state_dict_from_onnx
from model_export.dataset import preprocessed
from model_export.embedding import strip_embedding
from model_export.evaluate import evaluate
from model_export.importing import probability_diff, staged
from model_export.ood_features import strip_ood_score
from model_export.outliers import CHOICE_SEED
from model_export.quantize import Int8Report, compare, quantize
from model_export.rollout import ROLLOUT_OUTPUT, add_rollout_to_file, rollout_of, strip_rollout
from model_export.sealing import finish_model_file, read_checked, write_metadata
from model_export.stamp import (
    SELF_TEST_IMAGES,
    calibrate_best,
    choose_score,
    golden_png,
    served_probabilities,
    with_held_out,
)
from model_export.vit import VisionTransformer, ViTConfig
from model_runtime.options import IN_PROCESS
from model_runtime.session import ModelSession, softmax

logger = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
LOGIT_TOLERANCE = 1e-4
# The attention rollout of the file against PyTorch's (max |difference|): beyond it the graph's
# rollout is not the one the paper defines.
ROLLOUT_TOLERANCE = 1e-5
PARITY_BATCH_SIZES = (1, 8)
# Half precision keeps ~3 decimal digits: the FP16 file must agree with the FP32 model on nearly
# every held-out image and move no probability by more than this.
FP16_MIN_TOP1_AGREEMENT = 0.995
FP16_PROBABILITY_TOLERANCE = 1e-2
# The fewest held-out images the FP16 and int8 checks use, whatever --eval-count says.
PRECISION_MIN_IMAGES = 256
# Held-out shapes for the out-of-distribution threshold (images 0 to CALIBRATION_COUNT - 1),
# the class means and covariance of the Mahalanobis score (as many images after those) and the
# self-test images: never the training seed (0 for the bundled model), the held-out evaluation
# seed (1000003) nor the seeds the README and the tests evaluate on.
CALIBRATION_SEED = 2_000_003
CALIBRATION_COUNT = 2000
# The share of in-distribution images the flag accepts: of the model's own kind of images, about
# 1 - OOD_ACCEPT_RATE are flagged (docs/EXPLAIN.md measures it on held-out shapes).
OOD_ACCEPT_RATE = 0.98


@dataclass(frozen=True)
class ParityCase:
    """PyTorch against onnxruntime on one batch."""

    name: str
    batch_size: int
    max_abs_diff: float
    top1_agree: int
    max_rollout_diff: float
    max_probability_diff: float

    @property
    def passed(self) -> bool:
        return (
            self.max_abs_diff <= LOGIT_TOLERANCE
            and self.top1_agree == self.batch_size
            and self.max_rollout_diff <= ROLLOUT_TOLERANCE
        )

    def line(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        return (
            f"{self.name:<8} batch {self.batch_size:>2}  max |dlogit| {self.max_abs_diff:.2e}"
            f"  top-1 equal {self.top1_agree}/{self.batch_size}"
            f"  max |drollout| {self.max_rollout_diff:.2e}  {verdict}"
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


Report = PrecisionReport | Int8Report | Bf16Report
"""What an FP16, int8 or bf16 file was checked with, in place of the FP32 parity cases."""


class Float16Inside(nn.Module):
    """A model (images -> logits) in half precision behind a float32 input and output, so
    clients and the service's preprocessing see no difference."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).half()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.half()).float()


def to_onnx(model: nn.Module, path: Path, image_size: int, *, output: str = OUTPUT_NAME) -> None:
    """Trace the model (images -> logits, or another [N, ...] `output`) to ONNX with a dynamic
    batch axis and named input and output."""
    example = torch.zeros(2, 3, image_size, image_size)
    torch.onnx.export(
        model.eval(),
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[output],
        dynamic_axes={INPUT_NAME: {0: "batch"}, output: {0: "batch"}},
        opset_version=OPSET,
        dynamo=False,
    )


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
    """Logits and attention rollout of the file against PyTorch's, on the same batches."""
    results = []
    for name, batch in parity_inputs(session.metadata.preprocessing, seed):
        images = torch.from_numpy(batch)
        with torch.no_grad():
            expected = model(images).numpy()
        actual = session.logits(batch)
        rollout = rollout_of(session.path, batch)
        results.append(
            ParityCase(
                name=name,
                batch_size=len(batch),
                max_abs_diff=float(np.abs(expected - actual).max()),
                top1_agree=int((expected.argmax(1) == actual.argmax(1)).sum()),
                max_rollout_diff=float(np.abs(vit_rollout(model, images).numpy() - rollout).max()),
                max_probability_diff=probability_diff(expected, actual),
            )
        )
    return results


def held_out(
    spec: PreprocessSpec, *, seed: int, count: int, batch_size: int = 64, first: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Held-out images `first` to `first + count - 1` of `seed`, preprocessed as the service
    does, with their class indices, in batches."""
    for start in range(first, first + count, batch_size):
        batch = list(shapes.samples(seed, min(batch_size, first + count - start), start))
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


def logits_of(session: ModelSession, batches: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The file's classification output for held-out batches (images, class indices)."""
    return np.concatenate([session.logits(batch) for batch, _ in batches])


def with_rollout(
    path: Path, metadata: ModelMetadata, *, producer: str = "vit-export"
) -> ModelMetadata:
    """The attention rollout appended to the file's graph, and the metadata naming both outputs
    written into it."""
    add_rollout_to_file(path, input_size=metadata.preprocessing.input_size)
    named = metadata.model_copy(
        update={
            "output_name": metadata.output_name or OUTPUT_NAME,
            "attention_output": ROLLOUT_OUTPUT,
        }
    )
    write_metadata(path, named, producer=producer)
    return named


def rebuild(path: Path) -> tuple[VisionTransformer, ModelMetadata, onnx.ModelProto]:
    """A file vit-export wrote, as its PyTorch model (from the graph's weights), its metadata
    and its classification graph (any rollout, score and embedding removed); NotACheckpoint for
    any other file."""
    refusal = f"{path} is an ONNX file vit-export did not write: stamp it with `vit-import onnx`"
    proto = read_checked(path)
    try:
        metadata = ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props})
        config = ViTConfig(**metadata.dataset["config"])  # type: ignore[arg-type]
    except (InvalidModelMetadata, KeyError, TypeError) as error:
        raise NotACheckpoint(refusal) from error
    if proto.producer_name != "vit-export":
        raise NotACheckpoint(refusal)
    if metadata.precision not in ("fp32", "bf16"):  # a bf16 file holds FP32 weights
        raise NotACheckpoint(
            f"{path} holds {metadata.precision} weights, which cannot be exported again "
            "exactly: export from the FP32 file or the checkpoint it came from"
        )
    strip_rollout(proto)
    strip_ood_score(proto)
    strip_embedding(proto)
    model = VisionTransformer(config)
    model.load_state_dict(state_dict_from_onnx(proto.graph))
    plain = metadata.model_copy(
        update={"attention_output": None, "ood": None, "self_test": None, "embedding": None}
    )
    return model.eval(), plain, proto


def golden_images(spec: PreprocessSpec) -> list[bytes]:
    """The self-test images: held-out shapes of the calibration seed, as PNGs at input size."""
    return [golden_png(s.data, spec) for s in shapes.samples(CALIBRATION_SEED, SELF_TEST_IMAGES)]


def golden_diff(model: VisionTransformer, session: ModelSession, images: list[bytes]) -> float:
    """The largest probability difference of the file from PyTorch's FP32 on the golden images."""
    spec = session.metadata.preprocessing
    batch = np.concatenate([preprocess_upload(data, spec)[0] for data in images])
    with torch.no_grad():
        expected = softmax(model(torch.from_numpy(batch)).numpy())
    return float(np.abs(expected - served_probabilities(session, images)).max())


def finish(
    path: Path,
    model: VisionTransformer,
    session: ModelSession,
    *,
    measured: float,
    calibration_count: int,
    accept_rate: float,
    held_out_seed: int,
    held_out_count: int,
    update: dict[str, object],
) -> None:
    """The out-of-distribution score and its calibration, and the self-test set, written into
    the checked file with `update`; `measured` is the file's largest probability difference from
    FP32. The score is the one of the Mahalanobis score and the classification output's that
    flags the most generated non-shape images (`choose_score`); the flag is then measured on
    `held_out_count` shapes of `held_out_seed`."""
    spec = session.metadata.preprocessing
    count = calibration_count

    def calibrate(proto: onnx.ModelProto, session: ModelSession) -> OodCalibration:
        threshold_batches = [b for b, _ in held_out(spec, seed=CALIBRATION_SEED, count=count)]
        source = f"shapes seed {CALIBRATION_SEED}, images 0-{count - 1} (held out)"
        calibration = calibrate_best(
            proto,
            session,
            fit_batches=held_out(spec, seed=CALIBRATION_SEED, count=count, first=count),
            threshold_batches=threshold_batches,
            source=source,
            fit_source=f"shapes seed {CALIBRATION_SEED}, images {count}-{2 * count - 1} (held out)",
            accept_rate=accept_rate,
        )
        choice_count = max(1, count // 2)
        generated, _ = preprocessed(CHOICE_SEED, choice_count, spec, workers=1, source="outliers")
        calibration = choose_score(
            calibration,
            proto,
            session,
            threshold_batches=threshold_batches,
            outlier_batches=[
                batch.astype(np.float32)
                for batch in np.array_split(generated, 1 + choice_count // 64)
            ],
            outlier_source=f"generated non-shape images (outliers seed {CHOICE_SEED})",
            source=source,
        )
        if not held_out_count:
            return calibration
        shapes_held_out = (b for b, _ in held_out(spec, seed=held_out_seed, count=held_out_count))
        return with_held_out(calibration, proto, session, shapes_held_out)

    images = golden_images(spec)
    finish_model_file(
        onnx.load_model_from_string(path.read_bytes()),
        path,
        session,
        session.metadata.model_copy(update=update),
        calibrate=calibrate,
        golden=images,
        measured=max(measured, golden_diff(model, session, images)),
        producer="vit-export",
    )


def export_model(
    model: VisionTransformer,
    metadata: ModelMetadata,
    output: Path,
    *,
    graph: onnx.ModelProto | None = None,
    eval_seed: int,
    eval_count: int,
    calibration_count: int = CALIBRATION_COUNT,
    ood_accept_rate: float = OOD_ACCEPT_RATE,
    fp16: bool = False,
    int8: bool = False,
    bf16: bool = False,
) -> tuple[list[ParityCase] | Report, float | None]:
    """Write `model` (or `graph`, the ONNX graph it was traced to before) with its rollout,
    metadata, out-of-distribution calibration and self-test set, once checked.

    FP32 files must match PyTorch to LOGIT_TOLERANCE and ROLLOUT_TOLERANCE; FP16 files are
    compared with the FP32 model on the held-out images instead (`PrecisionReport`); int8 files
    with the checked FP32 file (`Int8Report`), and bf16 files with the same file run in bf16
    (`Bf16Report`); nothing is written unless that passes.
    """
    if fp16 + int8 + bf16 > 1:
        raise ValueError("a file is fp16, int8 or bf16, not two of them")
    if bf16:
        refuse_unmeasurable_bf16()  # before the minutes of export, not after them
        metadata = metadata.model_copy(update={"precision": "bf16"})
    with staged(output) as plain, staged(output) as path:
        if graph is not None:
            onnx.save(graph, str(plain))
        else:
            to_onnx(
                Float16Inside(model) if fp16 else model, plain, metadata.preprocessing.input_size
            )
        shutil.copyfile(plain, path)
        metadata = with_rollout(path, metadata)
        session = ModelSession(path, IN_PROCESS)
        report: list[ParityCase] | Report
        if fp16:
            count = max(eval_count, PRECISION_MIN_IMAGES)
            report = compare_precision(model, session, seed=eval_seed, count=count)
            measured = report.max_probability_diff
        else:
            parity = check_parity(model, session, seed=eval_seed)
            report, measured = parity, max(case.max_probability_diff for case in parity)
        held: dict[str, object] = {"held_out_seed": eval_seed, "held_out_count": eval_count}
        accuracy = None
        gated = int8 or bf16
        if gated and not all(case.passed for case in parity):
            return report, None
        count = max(eval_count, PRECISION_MIN_IMAGES)
        spec = metadata.preprocessing
        batches = list(held_out(spec, seed=eval_seed, count=count)) if gated else []
        if int8:
            fp32 = session
            quantize(plain, path)
            metadata = with_rollout(path, metadata.model_copy(update={"precision": "int8"}))
            session = ModelSession(path, IN_PROCESS)
            fp32_logits, int8_logits = logits_of(fp32, batches), logits_of(session, batches)
            report = compare(fp32_logits, int8_logits, np.concatenate([t for _, t in batches]))
            if not report.passed:
                return report, None
            measured += probability_diff(fp32_logits, int8_logits)
            accuracy, held["held_out_count"] = report.int8_accuracy, count
        elif bf16:
            # The self-test expects the FP32 probabilities, within what bf16 moves them: the
            # file passes it at FP32 on any CPU and in bf16 where the CPU computes it.
            report = bf16_gate(logits_of(session, batches), logits_of(bf16_session(path), batches))
            if not report.passed:
                return report, None
            measured += report.max_probability_diff
        if not int8 and eval_count:
            accuracy = evaluate(session, seed=eval_seed, count=eval_count).accuracy
        update: dict[str, object] = {}
        if accuracy is not None:
            update = {"held_out_accuracy": accuracy, "dataset": {**metadata.dataset, **held}}
        finish(
            path,
            model,
            session,
            measured=measured,
            calibration_count=calibration_count,
            accept_rate=ood_accept_rate,
            held_out_seed=eval_seed,
            held_out_count=eval_count,
            update=update,
        )
        if bf16:
            # The rollout and the out-of-distribution calibration are the FP32 file's: say how
            # far bf16 moves them on the same images, now that the file carries both.
            in_bf16, images = bf16_session(path), [batch for batch, _ in batches]
            logger.info("%s", bf16_drift(ModelSession(path, IN_PROCESS), in_bf16, images).line())
        path.replace(output)
    return report, accuracy


def export(
    checkpoint_path: Path,
    output: Path,
    *,
    version: str | None,
    eval_seed: int,
    eval_count: int,
    calibration_count: int = CALIBRATION_COUNT,
    ood_accept_rate: float = OOD_ACCEPT_RATE,
    fp16: bool = False,
    int8: bool = False,
    bf16: bool = False,
) -> tuple[list[ParityCase] | Report, float | None]:
    """Write the ONNX file of a vit-train checkpoint, or bring a file vit-export wrote before up
    to the current format: its classification graph kept node for node (the same numbers), the
    PyTorch model for the checks rebuilt from its weights."""
    graph = None
    if checkpoint_path.suffix.lower() == ".onnx":
        model, metadata, traced = rebuild(checkpoint_path)
        graph = None if fp16 or int8 else traced
        metadata = metadata.model_copy(
            update={"precision": "fp16" if fp16 else "fp32", "version": version or metadata.version}
        )
    else:
        checkpoint = Checkpoint.load(checkpoint_path)
        model = checkpoint.build_model()
        metadata = ModelMetadata(
            name=checkpoint.name,
            version=version or "1",
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
    return export_model(
        model,
        metadata,
        output,
        graph=graph,
        eval_seed=eval_seed,
        eval_count=eval_count,
        calibration_count=calibration_count,
        ood_accept_rate=ood_accept_rate,
        fp16=fp16,
        int8=int8,
        bf16=bf16,
    )


def share(text: str) -> float:
    """An argument that is a share: above 0, at most 1."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a share (above 0, at most 1)")
    return value


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="vit-export", description=__doc__)
    parser.add_argument(
        "checkpoint",
        type=Path,
        help="a vit-train checkpoint, or an ONNX file vit-export wrote (brought up to date)",
    )
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--version", help="default: 1, or the ONNX file's own")
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
    parser.add_argument(
        "--calibration-count",
        type=int,
        default=CALIBRATION_COUNT,
        help=f"Held-out shapes (seed {CALIBRATION_SEED}) the out-of-distribution threshold is "
        "calibrated on; as many others fit the Mahalanobis score's class means and covariance.",
    )
    parser.add_argument(
        "--ood-accept-rate",
        type=share,
        default=OOD_ACCEPT_RATE,
        help="The share of the calibration shapes the out-of-distribution flag accepts.",
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
    precision.add_argument(
        "--bf16",
        action="store_true",
        help="FP32 weights the service runs in bf16 where the CPU computes it (OpenVINO, "
        f"docs/BF16.md); written only if, run so here, it agrees with FP32 on >= "
        f"{BF16_MIN_TOP1_AGREEMENT * 100:.0f}%% of the held-out images and moves no probability by "
        f"more than {BF16_MAX_PROBABILITY_DIFF:g}.",
    )
    args = parser.parse_args(argv)
    try:
        parity, accuracy = export(
            args.checkpoint,
            args.output,
            version=args.version,
            eval_seed=args.eval_seed,
            eval_count=args.eval_count,
            calibration_count=args.calibration_count,
            ood_accept_rate=args.ood_accept_rate,
            fp16=args.fp16,
            int8=args.int8,
            bf16=args.bf16,
        )
    except NotACheckpoint as error:
        sys.exit(f"vit-export: {error}")
    except Bf16Unmeasurable as error:
        sys.exit(f"vit-export: {error}; {args.output} not written")
    if not isinstance(parity, list):
        print(parity.line())
        passed = parity.passed
    else:
        print(
            f"parity, PyTorch vs onnxruntime (tolerance {LOGIT_TOLERANCE:g}, rollout "
            f"{ROLLOUT_TOLERANCE:g}):"
        )
        for case in parity:
            print("  " + case.line())
        passed = all(case.passed for case in parity)
    if isinstance(parity, Bf16Report) and not passed:
        sys.exit(f"vit-export: {parity.refusal()}; {args.output} not written")
    if (args.int8 or args.bf16) and not passed:
        failed = "the FP32 parity or the int8 check" if args.int8 else "the FP32 parity check"
        sys.exit(f"vit-export: {failed} failed; {args.output} not written")
    if accuracy is not None:
        count = max(args.eval_count, PRECISION_MIN_IMAGES) if args.int8 else args.eval_count
        print(f"held-out accuracy {accuracy:.2%} on {count} images (seed {args.eval_seed})")
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.1f} MB)")
    if not passed:
        sys.exit(1)


if __name__ == "__main__":
    main()
