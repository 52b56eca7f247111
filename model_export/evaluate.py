"""`vit-eval`: held-out accuracy of an ONNX model, with onnxruntime and the shared preprocessing.

No torch here: this is exactly the path the service takes from upload bytes to probabilities.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_export import shapes
from service.preprocess import preprocess
from service.providers import CPU
from service.session import ModelSession

DATASETS = {"shapes": shapes}


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

    def report(self) -> str:
        width = max(len(label) for label in self.labels) + 1
        header = " " * width + "".join(f"{label[:6]:>7}" for label in self.labels)
        rows = [
            f"{label:<{width}}" + "".join(f"{int(n):>7}" for n in row)
            for label, row in zip(self.labels, self.confusion, strict=True)
        ]
        summary = f"accuracy {self.accuracy:.2%} ({np.trace(self.confusion)}/{self.count})"
        return "\n".join([summary, "confusion (rows: true, columns: predicted)", header, *rows])


def evaluate(session: ModelSession, *, seed: int, count: int, batch_size: int = 64) -> Evaluation:
    """Classify `count` samples of `seed`, as uploads exactly as the service receives them."""
    if session.labels != shapes.LABELS:
        raise ValueError(f"the model's labels {session.labels} are not the shapes labels")
    spec = session.metadata.preprocessing
    confusion = np.zeros((len(shapes.LABELS),) * 2, dtype=np.int64)
    for start in range(0, count, batch_size):
        batch = list(shapes.samples(seed, min(batch_size, count - start), start))
        inputs = np.concatenate([preprocess(sample.data, spec) for sample in batch])
        predicted = session.predict(inputs).argmax(axis=1)
        for sample, guess in zip(batch, predicted, strict=True):
            confusion[sample.label, guess] += 1
    return Evaluation(labels=shapes.LABELS, confusion=confusion)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vit-eval", description=__doc__)
    parser.add_argument("model", type=Path)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="shapes")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--count", type=int, default=2000)
    args = parser.parse_args(argv)
    session = ModelSession(args.model, providers=(CPU,))
    print(evaluate(session, seed=args.seed, count=args.count).report())


if __name__ == "__main__":
    main()
