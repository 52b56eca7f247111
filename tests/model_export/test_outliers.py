"""The generated non-shape images: deterministic, every kind, encoded as uploads are."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
from PIL import Image

from model_contract.preprocess import PreprocessSpec
from model_export import outliers
from model_export.dataset import OUTLIER_LABEL, preprocessed


def test_an_outlier_is_a_pure_function_of_seed_and_index() -> None:
    assert outliers.sample(3, 17) == outliers.sample(3, 17)
    assert outliers.sample(3, 17) != outliers.sample(4, 17)
    assert outliers.sample(3, 17) != outliers.sample(3, 18)


def test_every_kind_is_drawn() -> None:
    kinds = Counter(outliers.render(5, index)[1] for index in range(300))
    assert set(kinds) == set(outliers.KINDS)
    assert min(kinds.values()) > 300 / len(outliers.KINDS) / 3


def test_outliers_are_jpeg_or_png_files_of_varied_sizes_and_content() -> None:
    formats, sizes, means = set(), set(), []
    for data in outliers.samples(9, 60):
        image = Image.open(io.BytesIO(data))
        formats.add(image.format)
        sizes.add(image.size)
        means.append(np.asarray(image.convert("RGB"), np.float32).mean())
    assert formats == {"JPEG", "PNG"}
    assert len(sizes) > 40
    assert np.std(means) > 20  # dark, light and everything between


def test_the_training_and_choice_sets_differ() -> None:
    assert outliers.OUTLIER_SEED != outliers.CHOICE_SEED
    assert outliers.sample(outliers.OUTLIER_SEED, 0) != outliers.sample(outliers.CHOICE_SEED, 0)


def test_outliers_are_preprocessed_like_shapes_with_no_class() -> None:
    spec = PreprocessSpec(input_size=32)
    pixels, labels = preprocessed(2, 5, spec, workers=1, source="outliers")
    assert pixels.shape == (5, 3, 32, 32) and pixels.dtype == np.float16
    assert (labels == OUTLIER_LABEL).all()
    again, _ = preprocessed(2, 2, spec, start=3, workers=1, source="outliers")
    assert np.array_equal(again, pixels[3:])
