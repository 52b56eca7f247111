"""The shared preprocessing contract: resize, crop, normalise, and one function for everyone."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from service.preprocess import PreprocessSpec, preprocess
from tests.images import asymmetric, encode, with_orientation


def test_output_is_float32_nchw_of_the_input_size() -> None:
    tensor = preprocess(encode(asymmetric((300, 200))), PreprocessSpec(input_size=128))
    assert tensor.shape == (1, 3, 128, 128) and tensor.dtype == np.float32
    assert tensor.flags["C_CONTIGUOUS"]


def test_normalisation_is_per_channel_mean_and_std() -> None:
    spec = PreprocessSpec(input_size=8, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    tensor = preprocess(Image.new("RGB", (50, 30), (255, 0, 51)), spec)
    expected = [(1.0 - 0.5) / 0.5, (0.0 - 0.25) / 0.25, (0.2 - 0.0) / 2.0]
    for channel, value in enumerate(expected):
        np.testing.assert_allclose(tensor[0, channel], value, atol=1e-6)


def test_centre_crop_keeps_the_middle_of_a_wide_image() -> None:
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    image.paste((0, 255, 0), (40, 0, 160, 100))  # the kept middle, plus the filter's reach
    tensor = preprocess(image, PreprocessSpec(input_size=16))
    np.testing.assert_allclose(tensor[0, 1], 1.0, atol=1e-6)  # all green
    np.testing.assert_allclose(tensor[0, 0], -1.0, atol=1e-6)  # no red at the edges


def test_squash_keeps_the_whole_image() -> None:
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    image.paste((0, 255, 0), (50, 0, 150, 100))
    tensor = preprocess(image, PreprocessSpec(input_size=16, resize="squash"))
    assert tensor[0, 0, 8, 0] > 0.9 and tensor[0, 1, 8, 8] > 0.9


def test_bytes_and_decoded_image_give_the_same_tensor() -> None:
    data = encode(asymmetric((120, 90)), "PNG")
    spec = PreprocessSpec(input_size=32)
    from io import BytesIO

    assert np.array_equal(preprocess(data, spec), preprocess(Image.open(BytesIO(data)), spec))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_upload_gives_the_upright_tensor(orientation: int) -> None:
    spec = PreprocessSpec(input_size=32)
    upright = asymmetric()
    expected = preprocess(encode(upright), spec)
    assert np.array_equal(preprocess(with_orientation(upright, orientation), spec), expected)


def test_spec_survives_json() -> None:
    spec = PreprocessSpec(input_size=224, interpolation="bicubic", crop_pct=0.875)
    assert PreprocessSpec.model_validate_json(spec.model_dump_json()) == spec


def test_training_evaluation_and_export_share_this_function() -> None:
    from model_export import dataset, evaluate, shapes

    assert vars(dataset)["preprocess"] is preprocess
    assert vars(evaluate)["preprocess"] is preprocess
    spec = PreprocessSpec(input_size=64)
    pixels, labels = dataset.preprocessed(21, 3, spec, workers=1)
    for row, sample in enumerate(shapes.samples(21, 3)):
        expected = preprocess(sample.data, spec)[0].astype(np.float16)
        assert np.array_equal(pixels[row], expected) and labels[row] == sample.label
