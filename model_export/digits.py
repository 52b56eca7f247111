"""scikit-learn's handwritten digits (1,797 real 8x8 scans) through the shared preprocessing.

The scans ship inside scikit-learn, so nothing is downloaded. Each is drawn as dark ink on white
paper and upscaled by `preprocess` exactly as an upload would be.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from model_contract.preprocess import PreprocessSpec, preprocess

LABELS: tuple[str, ...] = tuple(str(digit) for digit in range(10))
_LEVELS = 16  # the scans' grey levels run 0..16, 16 the darkest


def scans() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 scans as (N, 8, 8) uint8 images, 255 for paper and 0 for ink, and their labels."""
    bunch = load_digits()
    paper = 255 - np.rint(bunch.images * (255 / _LEVELS))
    return paper.astype(np.uint8), bunch.target.astype(np.int64)


def split(labels: np.ndarray, held_out: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a training and a held-out set, `held_out` images split evenly over the classes
    as far as it goes, the same for a given seed."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    quota = held_out // len(classes)
    test = [indices[:quota] for indices in per_class]
    rest = np.concatenate([indices[quota:] for indices in per_class])
    extra = rng.permutation(rest)[: held_out - quota * len(classes)]
    test_index = np.sort(np.concatenate([*test, extra]))
    train_index = np.setdiff1d(np.arange(len(labels)), test_index)
    return train_index, test_index


def preprocessed(
    spec: PreprocessSpec, *, held_out: int = 500, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training inputs and labels, then held-out inputs and labels: float16 (N,3,S,S) and int64."""
    images, labels = scans()
    pixels = np.stack(
        [preprocess(Image.fromarray(image).convert("RGB"), spec)[0] for image in images]
    ).astype(np.float16)
    train_index, test_index = split(labels, held_out, seed)
    return pixels[train_index], labels[train_index], pixels[test_index], labels[test_index]
