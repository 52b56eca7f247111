"""Upload bytes -> an upright RGB Pillow image, safely: allowlisted formats, pixel limit first."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model_contract.errors import TooManyPixels, UndecodableImage, UnsupportedImageFormat

ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
DEFAULT_MAX_PIXELS = 40_000_000

RGB = tuple[int, int, int]
SizeHint = Callable[[tuple[int, int]], tuple[int, int]]


@dataclass(frozen=True)
class DecodedImage:
    """The RGB picture and what it took to get there (for the input metrics)."""

    image: Image.Image
    format: str
    original_mode: str
    exif_rotated: bool
    upright_size: tuple[int, int]
    """The stored image's full size, as seen upright: `image` is smaller where JPEG draft
    decoding reduced it."""


def decode(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    alpha_background: RGB | None = (255, 255, 255),
    key_background: RGB | None = None,
    size_hint: SizeHint | None = None,
) -> DecodedImage:
    """Decode the first frame of an allowlisted image, upright and in RGB.

    The pixel count is read from the header and checked before any pixel is decoded.
    `size_hint` maps the stored size to the smallest size the caller needs, which lets JPEG
    decode at a reduced scale (Pillow's draft mode): several times faster for large photos.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError as error:
        raise UnsupportedImageFormat(
            f"not an image in an accepted format ({', '.join(ALLOWED_FORMATS)})"
        ) from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # Pillow's own guard, at a size far past any limit here: say the limit that applies.
        raise TooManyPixels(f"image has more pixels than the limit {max_pixels}") from error
    except Exception as error:  # Pillow's plugins raise many types on malformed headers.
        raise UndecodableImage(f"cannot read the image header: {error}") from error
    width, height = image.size
    if width * height > max_pixels:
        raise TooManyPixels(f"image has {width}x{height} pixels, more than the limit {max_pixels}")
    if width == 0 or height == 0:
        raise UndecodableImage("image has no pixels")
    return decode_opened(
        image, alpha_background=alpha_background, key_background=key_background, size_hint=size_hint
    )


def image_format(data: bytes) -> str | None:
    """The allowlisted format whose signature `data` starts with, or None: the test Pillow's
    `open` applies first, so bytes sent without an image media type are known for an image
    (or refused) without decoding them. A signature says nothing of the rest: `decode` still
    refuses what is corrupt."""
    prefix = data[:16]  # as much as Pillow's `open` shows each format's test
    for name in ALLOWED_FORMATS:
        if name not in Image.OPEN:
            Image.init()
        _, accept = Image.OPEN[name]
        verdict = accept(prefix) if accept is not None else True
        if verdict and not isinstance(verdict, str):  # a string: a plugin this Pillow lacks
            return name
    return None


def decode_opened(
    image: Image.Image,
    *,
    alpha_background: RGB | None = (255, 255, 255),
    key_background: RGB | None = None,
    size_hint: SizeHint | None = None,
) -> DecodedImage:
    """Decode an opened (header-checked) image: the one path for uploads and for PIL images, so
    both give the same pixels. A JPEG not yet loaded is decoded at a reduced scale when
    `size_hint` is given; an image already loaded is used as it is."""
    image_format, original_mode = str(image.format), image.mode
    width, height = image.size
    try:
        if size_hint is not None and image_format == "JPEG":
            image.draft(None, size_hint(image.size))
        image.load()
        rotated = upright(image)
        turned = rotated.size != image.size  # a quarter turn swaps the axes
        return DecodedImage(
            image=to_rgb(rotated, alpha_background, key_background),
            format=image_format,
            original_mode=original_mode,
            exif_rotated=rotated is not image,
            upright_size=(height, width) if turned else (width, height),
        )
    except Exception as error:  # truncated or corrupt data surfaces as many exception types
        raise UndecodableImage(f"cannot decode the image: {error}") from error


def upright(image: Image.Image) -> Image.Image:
    """The image as the camera's EXIF orientation says it should be seen (itself if already so)."""
    orientation = image.getexif().get(0x0112, 1)
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(image)
    return image


def to_rgb(
    image: Image.Image, alpha_background: RGB | None, key_background: RGB | None = None
) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: high bit depths scaled, transparency composited onto
    `alpha_background`; or with None, Pillow's own `convert("RGB")` for every mode (alpha
    dropped, 16-bit and float samples clipped), which is how Hugging Face pipelines load
    images, and then, with a `key_background`, the pixels of a transparency colour key that
    conversion kept (a PNG's tRNS, a palette's transparent entry) painted that colour, as
    processors that convert to RGB (`do_convert_rgb`) paint them."""
    mode = image.mode
    if alpha_background is None:
        rgb = image if mode == "RGB" else image.convert("RGB")
        if key_background is None or rgb.info.get("transparency") is None:
            return rgb
        keyed = rgb.convert("RGBA")
        painted = Image.new("RGB", keyed.size, key_background)
        painted.paste(keyed, mask=keyed.getchannel("A"))
        return painted
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit samples span 0..65535 (Pillow widens 16-bit PNGs to I); scale, never clip.
        samples = np.asarray(image, dtype=np.float64)
        levels = np.clip(np.round(samples / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(levels).convert("RGB")
    if mode == "F":
        samples = np.nan_to_num(np.asarray(image, dtype=np.float64))
        full_scale = 1.0 if samples.max(initial=0.0) <= 1.0 else 255.0
        levels = np.clip(np.round(samples * (255.0 / full_scale)), 0, 255).astype(np.uint8)
        return Image.fromarray(levels).convert("RGB")
    if mode == "La":  # premultiplied alpha has no direct path to RGBA
        image = image.convert("LA")
    if mode == "P" and "transparency" in image.info or image.mode in ("PA", "LA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, alpha_background)
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")
