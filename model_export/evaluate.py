"""`vit-eval`: held-out accuracy of an ONNX model, with the shared preprocessing and onnxruntime
(or OpenVINO, where a bf16 file runs in bf16), on the `shapes` dataset or on the user's own images
(a folder per label).

No torch here: this is exactly the path the service takes from upload bytes to probabilities.
"""

from __future__ import annotations

import argparse
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_contract.errors import ImageError
from model_contract.metadata import InvalidModelMetadata
from model_contract.preprocess import PreprocessSpec, preprocess
from model_export import shapes
from model_export.importing import ImportRefused, image_files
from model_runtime.graph_check import inspect_model
from model_runtime.openvino_engine import ONNXRUNTIME, OPENVINO
from model_runtime.options import IN_PROCESS, RuntimeOptions
from model_runtime.session import ModelSession

DATASETS = {"shapes": shapes}
ENGINES: dict[str, RuntimeOptions] = {
    ONNXRUNTIME: IN_PROCESS,
    OPENVINO: IN_PROCESS.model_copy(update={"engine": OPENVINO}),
}
"""A model run once in process by each engine: onnxruntime, the reference (a bf16 file at FP32),
or OpenVINO (a bf16 file in bf16 where the CPU computes it)."""


class UnlabelledImages(ValueError):
    """The folder is not laid out as one subfolder per label of the model."""


@dataclass(frozen=True)
class Evaluation:
    """Accuracy and the confusion matrix (rows: true class, columns: predicted)."""

    labels: tuple[str, ...]
    confusion: np.ndarray

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.confusion) / self.confusion.sum())

    def recall(self) -> dict[str, float]:
        """Per class with images: the share of its images predicted as it."""
        totals = self.confusion.sum(axis=1)
        return {
            label: float(self.confusion[i, i] / totals[i])
            for i, label in enumerate(self.labels)
            if totals[i]
        }

    def report(self) -> str:
        width = max(len(label) for label in self.labels) + 1
        # Each column as wide as its whole label or its largest count: a cut label can read
        # as another (`golden retriever` and `golden eagle`).
        columns = [
            max(len(label), len(str(int(most)))) + 1
            for label, most in zip(self.labels, self.confusion.max(axis=0), strict=True)
        ]
        header = " " * width + "".join(
            f"{label:>{column}}" for label, column in zip(self.labels, columns, strict=True)
        )
        rows = [
            f"{label:<{width}}"
            + "".join(f"{int(n):>{column}}" for n, column in zip(row, columns, strict=True))
            for label, row in zip(self.labels, self.confusion, strict=True)
        ]
        summary = f"accuracy {self.accuracy:.2%} ({np.trace(self.confusion)}/{self.count})"
        recall = [f"  {label:<{width}} {share:.2%}" for label, share in self.recall().items()]
        return "\n".join(
            [
                summary,
                "recall per class",
                *recall,
                "confusion (rows: true, columns: predicted)",
                header,
                *rows,
            ]
        )


def evaluate(session: ModelSession, *, seed: int, count: int, batch_size: int = 64) -> Evaluation:
    """Classify `count` samples of `seed`, as uploads exactly as the service receives them."""
    if session.labels != shapes.LABELS:
        raise ValueError(f"the model's labels {session.labels} are not the shapes labels")
    spec = session.metadata.preprocessing
    confusion = np.zeros((len(shapes.LABELS),) * 2, dtype=np.int64)
    for start in range(0, count, batch_size):
        batch = list(shapes.samples(seed, min(batch_size, count - start), start))
        inputs = np.concatenate([preprocess(sample.data, spec) for sample in batch])
        predicted = session.logits(inputs).argmax(axis=1)
        for sample, guess in zip(batch, predicted, strict=True):
            confusion[sample.label, guess] += 1
    return Evaluation(labels=shapes.LABELS, confusion=confusion)


def labelled_images(folder: Path, labels: tuple[str, ...]) -> list[tuple[Path, int]]:
    """(file, class index) for `folder/<label>/*`; every visible subfolder must name a label."""
    # Compared in one Unicode form: macOS writes file names decomposed ("e" + accent).
    index = {unicodedata.normalize("NFC", label): i for i, label in enumerate(labels)}
    classes = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    unknown = [d.name for d in classes if unicodedata.normalize("NFC", d.name) not in index]
    if unknown or not classes:
        raise UnlabelledImages(
            f"{folder} needs one folder per label; {', '.join(unknown) or 'none found'} "
            f"not among the model's labels: {', '.join(labels)}"
        )
    samples = []
    for class_folder in classes:
        try:
            label = index[unicodedata.normalize("NFC", class_folder.name)]
            samples += [(path, label) for path in image_files(class_folder)]
        except ImportRefused:
            continue  # a label without images yet: nothing to count
    if not samples:
        raise UnlabelledImages(f"no image files in the label folders of {folder}")
    return samples


def evaluate_folder(
    session: ModelSession, folder: Path, spec: PreprocessSpec, *, batch_size: int = 64
) -> tuple[Evaluation, list[str]]:
    """Classify the user's labelled images as uploads; files that fail to decode are reported,
    not counted."""
    samples = labelled_images(folder, session.labels)
    confusion = np.zeros((len(session.labels),) * 2, dtype=np.int64)
    skipped = []
    for start in range(0, len(samples), batch_size):
        tensors, truths = [], []
        for path, truth in samples[start : start + batch_size]:
            try:
                tensors.append(preprocess(path.read_bytes(), spec))
            except ImageError as error:
                skipped.append(f"{path}: {error}")
                continue
            truths.append(truth)
        if tensors:
            predicted = session.logits(np.concatenate(tensors)).argmax(axis=1)
            for truth, guess in zip(truths, predicted, strict=True):
                confusion[truth, guess] += 1
    return Evaluation(labels=session.labels, confusion=confusion), skipped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vit-eval", description=__doc__)
    parser.add_argument("model", type=Path)
    parser.add_argument("--images", type=Path, help="DIR/<label>/* (instead of a dataset)")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="shapes")
    parser.add_argument("--seed", type=int, help="the dataset's seed (never a training seed)")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument(
        "--engine",
        choices=sorted(ENGINES),
        default=ONNXRUNTIME,
        help="what runs the model: onnxruntime, the reference, or openvino, which runs a bf16 "
        "file in bf16 where the CPU computes it (the first line says what ran)",
    )
    parser.add_argument(
        "--jpeg-draft",
        choices=("on", "off"),
        help="override the model's JPEG decoding, to see whether reduced decoding keeps accuracy",
    )
    args = parser.parse_args(argv)
    if args.images is None and args.seed is None:
        parser.error("give --images DIR (your images, DIR/<label>/*) or --seed N (a dataset's)")
    if not args.model.is_file():
        sys.exit(f"vit-eval: {args.model}: no such model file")
    if args.images is not None and not args.images.is_dir():
        sys.exit(f"vit-eval: {args.images}: no such folder (images as DIR/<label>/*)")
    try:
        inspect_model(args.model)  # a file that is not a servable model, in one line
        session = ModelSession(args.model, ENGINES[args.engine])
    except InvalidModelMetadata as error:
        sys.exit(f"vit-eval: cannot evaluate {args.model}: {error}")
    print(f"{session.engine} {session.precision}: {session.precision_why}")
    if args.images is None:
        print(evaluate(session, seed=args.seed, count=args.count).report())
        return
    spec = session.metadata.preprocessing
    if args.jpeg_draft is not None:
        spec = spec.model_copy(update={"jpeg_draft": args.jpeg_draft == "on"})
    try:
        evaluation, skipped = evaluate_folder(session, args.images, spec)
    except UnlabelledImages as error:
        sys.exit(f"vit-eval: {error}")
    for line in skipped:
        print(f"skipped {line}")
    print(evaluation.report())


if __name__ == "__main__":
    main()
