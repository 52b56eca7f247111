"""Upload bytes -> RGB: formats allowed and refused, limits, every mode, EXIF, animations."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from model_contract.decode import decode
from model_contract.errors import TooManyPixels, UndecodableImage, UnsupportedImageFormat
from tests.images import asymmetric, encode, with_orientation


def rgb_of(data: bytes) -> tuple[int, ...]:
    """The colour of the decoded image's top-left pixel."""
    pixel = decode(data).image.getpixel((0, 0))
    assert isinstance(pixel, tuple)
    return pixel


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_allowed_formats_decode_to_rgb(image_format: str) -> None:
    decoded = decode(encode(Image.new("RGB", (40, 30), (200, 30, 30)), image_format))
    assert decoded.image.mode == "RGB" and decoded.image.size == (40, 30)
    assert decoded.format == image_format


@pytest.mark.parametrize(
    "data",
    [
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
        b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF",
        b"8BPS\x00\x01" + b"\x00" * 40,
        b"SIMPLE  =                    T" + b" " * 50,
        b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>",
        b"just some text",
    ],
    ids=["eps", "pdf", "psd", "fits", "svg", "text"],
)
def test_other_formats_are_refused_before_decoding(data: bytes) -> None:
    with pytest.raises(UnsupportedImageFormat):
        decode(data)


def test_pixel_limit_is_checked_from_the_header() -> None:
    with pytest.raises(TooManyPixels):
        decode(encode(Image.new("RGB", (100, 100))), max_pixels=9_999)
    assert decode(encode(Image.new("RGB", (100, 100))), max_pixels=10_000).image.size == (100, 100)


def test_truncated_data_is_undecodable() -> None:
    data = encode(asymmetric((300, 200)), "JPEG")
    with pytest.raises(UndecodableImage):
        decode(data[: len(data) // 2])


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    levels = np.array([[0, 16 * 257, 128 * 257, 65535]], dtype=np.uint16)
    decoded = decode(encode(Image.fromarray(levels), "PNG")).image
    assert np.asarray(decoded)[0, :, 0].tolist() == [0, 16, 128, 255]


def test_float_images_in_unit_range_are_scaled_to_8_bit() -> None:
    image = Image.fromarray(np.array([[0.0, 0.25, 1.0]], dtype=np.float32))
    decoded = decode(encode(image, "TIFF")).image
    assert np.asarray(decoded)[0, :, 0].tolist() == [0, 64, 255]


def test_transparent_pixels_become_the_background_colour() -> None:
    image = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    image.putpixel((1, 0), (0, 0, 255, 0))
    decoded = decode(encode(image), alpha_background=(10, 20, 30)).image
    assert decoded.getpixel((0, 0)) == (255, 0, 0)
    assert decoded.getpixel((1, 0)) == (10, 20, 30)


def test_palette_transparency_and_grey_alpha_are_composited() -> None:
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    assert decode(encode(palette, "PNG")).image.getpixel((0, 0)) == (255, 255, 255)
    assert decode(encode(palette, "PNG")).image.getpixel((1, 0)) == (255, 0, 0)
    grey = Image.new("LA", (1, 1), (40, 0))
    assert rgb_of(encode(grey)) == (255, 255, 255)


def test_cmyk_is_converted() -> None:
    assert rgb_of(encode(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "JPEG", quality=100)) == (
        255,
        255,
        255,
    )
    assert rgb_of(encode(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "TIFF")) == (255, 0, 0)


def test_animations_give_their_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert rgb_of(data) == (255, 0, 0)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation: int) -> None:
    upright = asymmetric()
    decoded = decode(with_orientation(upright, orientation))
    assert decoded.exif_rotated == (orientation != 1)
    assert np.array_equal(np.asarray(decoded.image), np.asarray(upright))
