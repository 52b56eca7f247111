"""IO binding: bucketed preallocated buffers give the plain path's probabilities exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model_contract.preprocess import preprocess
from model_export import shapes
from model_runtime.io_binding import BucketedIoBinding, bucket_sizes
from model_runtime.options import IN_PROCESS
from model_runtime.session import ModelSession


def test_buckets_are_powers_of_two_up_to_the_largest_batch() -> None:
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(16) == (1, 2, 4, 8, 16)
    assert bucket_sizes(12) == (1, 2, 4, 8, 12)


@pytest.fixture(scope="module")
def plain(served_model: Path) -> ModelSession:
    return ModelSession(served_model, IN_PROCESS)


@pytest.fixture(scope="module")
def bound(served_model: Path) -> ModelSession:
    options = IN_PROCESS.model_copy(update={"io_binding": True, "max_batch_size": 8})
    return ModelSession(served_model, options)


@pytest.fixture(scope="module")
def images(plain: ModelSession) -> np.ndarray:
    spec = plain.metadata.preprocessing
    return np.concatenate([preprocess(s.data, spec) for s in shapes.samples(4242, 12)])


def test_bound_session_warms_up_every_bucket(bound: ModelSession) -> None:
    assert bound.warm_up_batch_sizes() == (1, 2, 4, 8)
    assert bound.runtime["io_binding"] == "on"


@pytest.mark.parametrize("count", [8, 5, 1, 3, 8, 12])
def test_io_binding_gives_the_plain_paths_probabilities(
    plain: ModelSession, bound: ModelSession, images: np.ndarray, count: int
) -> None:
    """Padded buckets (5 -> 8, 3 -> 4), stale rows from a larger batch before, and a batch
    over the largest bucket (12, in chunks of 8 and 4) all give each image its own numbers:
    bit for bit the plain path's for the same batch, and each image's alone within 1e-6."""
    batch = images[:count]
    expected = np.concatenate([plain.predict(batch[i : i + 1]) for i in range(count)])
    calls: list[int] = []
    original = BucketedIoBinding.run

    def counted(self: BucketedIoBinding, rows: np.ndarray, seconds: float) -> dict[str, np.ndarray]:
        calls.append(len(rows))
        return original(self, rows, seconds)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BucketedIoBinding, "run", counted)
        answer = bound.predict(batch)
    # The bound buffers did the work: batches above the largest bucket go in chunks.
    assert calls == [min(8, count - start) for start in range(0, count, 8)]
    if count <= 8:
        np.testing.assert_array_equal(answer, plain.predict(batch))
    np.testing.assert_allclose(answer, expected, rtol=0, atol=1e-6)
