"""Generated images through the shared preprocessing, as tensors, made on every core: `shapes`
samples with their labels, or `outliers` (label -1) for outlier exposure."""

from __future__ import annotations

import hashlib
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np

from model_contract.preprocess import PreprocessSpec, preprocess
from model_export import outliers, shapes

_CHUNK = 256
OUTLIER_LABEL = -1
Source = Literal["shapes", "outliers"]


def _preprocessed_chunk(
    source: Source, seed: int, spec: PreprocessSpec, start: int, count: int
) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.empty((count, 3, spec.input_size, spec.input_size), dtype=np.float16)
    labels = np.full(count, OUTLIER_LABEL, dtype=np.int64)
    if source == "outliers":
        for row, data in enumerate(outliers.samples(seed, count, start)):
            pixels[row] = preprocess(data, spec)[0]
        return pixels, labels
    for row, sample in enumerate(shapes.samples(seed, count, start)):
        pixels[row] = preprocess(sample.data, spec)[0]
        labels[row] = sample.label
    return pixels, labels


def preprocessed(
    seed: int,
    count: int,
    spec: PreprocessSpec,
    *,
    start: int = 0,
    workers: int = 2,
    source: Source = "shapes",
) -> tuple[np.ndarray, np.ndarray]:
    """Samples start..start+count of `source` seeded `seed`: float16 inputs (N,3,S,S) and labels
    (OUTLIER_LABEL for outliers)."""
    starts = list(range(start, start + count, _CHUNK))
    counts = [min(_CHUNK, start + count - s) for s in starts]
    job = partial(_preprocessed_chunk, source, seed, spec)
    if workers <= 1:
        chunks = list(map(job, starts, counts))
    else:
        with ProcessPoolExecutor(workers) as pool:
            chunks = list(pool.map(job, starts, counts))
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


def cached_preprocessed(
    cache_dir: Path | None,
    seed: int,
    count: int,
    spec: PreprocessSpec,
    *,
    start: int = 0,
    workers: int = 2,
    source: Source = "shapes",
) -> tuple[np.ndarray, np.ndarray]:
    """`preprocessed`, kept on disk under a key of everything that determines it."""
    if cache_dir is None:
        return preprocessed(seed, count, spec, start=start, workers=workers, source=source)
    key = hashlib.sha256(f"{seed}:{start}:{count}:{spec.model_dump_json()}".encode()).hexdigest()
    path = cache_dir / f"{source}-{key[:16]}.npz"
    if path.exists():
        with np.load(path) as stored:
            return stored["pixels"], stored["labels"]
    pixels, labels = preprocessed(seed, count, spec, start=start, workers=workers, source=source)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(path, pixels=pixels, labels=labels)
    return pixels, labels
