"""scikit-learn's handwritten digits as model inputs: every scan, a fixed held-out split."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

from model_contract.preprocess import PreprocessSpec  # noqa: E402
from model_export.digits import LABELS, preprocessed, scans, split  # noqa: E402


def test_all_1797_scans_dark_ink_on_white_paper() -> None:
    images, labels = scans()
    assert images.shape == (1_797, 8, 8) and images.dtype == np.uint8
    assert sorted(set(labels.tolist())) == list(range(len(LABELS)))
    assert (images[:, :, 0] == 255).mean() > 0.9  # the left column is mostly blank paper
    assert images.min() == 0


def test_the_split_holds_out_50_of_each_digit_and_trains_on_the_rest() -> None:
    _, labels = scans()
    train, test = split(labels, 500, seed=0)
    assert len(test) == 500 and len(train) == 1_297
    assert not set(train.tolist()) & set(test.tolist())
    assert np.bincount(labels[test]).tolist() == [50] * 10


def test_the_split_is_fixed_by_its_seed() -> None:
    _, labels = scans()
    assert np.array_equal(split(labels, 505, seed=3)[1], split(labels, 505, seed=3)[1])
    assert not np.array_equal(split(labels, 505, seed=3)[1], split(labels, 505, seed=4)[1])
    assert len(split(labels, 505, seed=3)[1]) == 505


def test_inputs_are_the_shared_preprocessing_of_the_upscaled_scans() -> None:
    spec = PreprocessSpec(input_size=32)
    train_x, train_y, test_x, test_y = preprocessed(spec, held_out=500)
    assert train_x.shape == (1_297, 3, 32, 32) and test_x.shape == (500, 3, 32, 32)
    assert train_x.dtype == np.float16 and train_y.shape == (1_297,) and test_y.shape == (500,)
    assert train_x.max() == 1.0  # white paper, normalised by mean 0.5 and std 0.5
    assert np.array_equal(train_x[:, 0], train_x[:, 2])  # grey: all three channels alike
