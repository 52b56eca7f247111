"""The shared preprocessing contract: resize, crop, normalise, and one function for everyone."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from model_contract.preprocess import PreprocessSpec, normalize, preprocess
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


@pytest.mark.parametrize(
    ("rescale_factor", "mean", "std"),
    [
        (1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        (1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        (1 / 127.5, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),
    ],
)
def test_normalisation_is_the_per_pixel_formula_to_the_bit(
    rescale_factor: float, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> None:
    spec = PreprocessSpec(rescale_factor=rescale_factor, mean=mean, std=std)
    levels = np.arange(256, dtype=np.uint8)
    pixels = np.stack([levels, levels[::-1], np.roll(levels, 100)], axis=-1).reshape(16, 16, 3)
    scaled = pixels.astype(np.float32) * np.float32(rescale_factor)
    per_pixel = (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    expected = per_pixel.transpose(2, 0, 1)[None]
    tensor = normalize(Image.fromarray(pixels), spec)
    assert tensor.dtype == np.float32 and tensor.flags["C_CONTIGUOUS"]
    assert tensor.tobytes() == np.ascontiguousarray(expected).tobytes()


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


@pytest.mark.parametrize("jpeg_draft", [True, False])
def test_bytes_and_opened_jpeg_give_the_same_tensor(jpeg_draft: bool) -> None:
    from io import BytesIO

    data = encode(asymmetric((640, 480)), "JPEG")
    spec = PreprocessSpec(input_size=64, jpeg_draft=jpeg_draft)
    assert np.array_equal(preprocess(data, spec), preprocess(Image.open(BytesIO(data)), spec))


def test_jpeg_draft_is_reduced_decoding_and_off_means_full_decoding() -> None:
    from io import BytesIO

    data = encode(asymmetric((640, 480)), "JPEG")
    full = Image.open(BytesIO(data)).convert("RGB")
    expected = preprocess(full, PreprocessSpec(input_size=64))
    assert np.array_equal(preprocess(data, PreprocessSpec(input_size=64)), expected)
    drafted = preprocess(data, PreprocessSpec(input_size=64, jpeg_draft=True))
    assert not np.array_equal(drafted, expected)
    assert np.abs(drafted - expected).mean() < 0.05  # the same picture, decoded coarser


@pytest.mark.parametrize(("size", "resize"), [((300, 200), "shorter_side"), ((201, 333), "squash")])
def test_resize_size_is_a_whole_image_resize_then_a_whole_pixel_centre_crop(
    size: tuple[int, int], resize: str
) -> None:
    image = asymmetric(size)
    spec = PreprocessSpec.model_validate(
        {"input_size": 32, "resize_size": 37, "resize": resize, "interpolation": "bicubic"}
    )
    width, height = size
    if resize == "squash":
        whole = (37, 37)
    else:
        short, long = min(size), max(size)
        whole = (37, int(37 * long / short)) if width <= height else (int(37 * long / short), 37)
    resized = np.asarray(image.resize(whole, Image.Resampling.BICUBIC), dtype=np.float32)
    top, left = (whole[1] - 32) // 2, (whole[0] - 32) // 2
    expected = (resized[top : top + 32, left : left + 32] / 255 - 0.5) / 0.5
    np.testing.assert_allclose(preprocess(image, spec)[0], expected.transpose(2, 0, 1), atol=1e-6)


def test_rescale_factor_scales_pixels_before_mean_and_std() -> None:
    spec = PreprocessSpec(input_size=4, rescale_factor=1.0, mean=(0, 0, 0), std=(1, 1, 1))
    tensor = preprocess(Image.new("RGB", (8, 8), (200, 10, 0)), spec)
    assert tensor[0, :, 0, 0].tolist() == [200.0, 10.0, 0.0]


def test_transparency_is_composited_or_dropped_as_the_spec_says() -> None:
    image = Image.new("RGBA", (8, 8), (200, 10, 0, 0))  # fully transparent red
    composited = preprocess(image, PreprocessSpec(input_size=4, alpha_background=(0, 0, 255)))
    assert composited[0, :, 0, 0].tolist() == [-1.0, -1.0, 1.0]
    dropped = preprocess(image, PreprocessSpec(input_size=4, alpha_background=None))
    expected = [200 / 127.5 - 1, 10 / 127.5 - 1, -1.0]
    np.testing.assert_allclose(dropped[0, :, 0, 0], expected, atol=1e-6)


def test_a_spec_refuses_two_crop_rules_or_a_resize_smaller_than_the_input() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="either resize_size or crop_pct"):
        PreprocessSpec(input_size=32, resize_size=40, crop_pct=0.875)
    with pytest.raises(ValidationError, match="at least input_size"):
        PreprocessSpec(input_size=32, resize_size=16)


def test_without_a_background_every_mode_converts_as_pillow_does() -> None:
    deep = Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 16-bit
    spec = PreprocessSpec(input_size=8, alpha_background=None, resize="squash")
    expected = normalize(deep.convert("RGB"), spec)  # clipped at 255, as pipelines see it
    assert np.array_equal(preprocess(deep, spec), expected)
    scaled = preprocess(deep, PreprocessSpec(input_size=8, resize="squash"))
    assert not np.array_equal(scaled, expected)  # the service's own choice: scaled, not clipped
