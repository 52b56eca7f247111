"""The preprocessing contract: encoded bytes or a PIL image -> normalised float32 NCHW tensor.

Training's evaluation, the export checks and the service all call `preprocess`; the spec that
parameterises it travels inside the ONNX file. Imports neither torch nor FastAPI.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from model_contract.decode import DEFAULT_MAX_PIXELS, DecodedImage, SizeHint, decode, decode_opened

_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


class PreprocessSpec(BaseModel):
    """How an image becomes the model's input; stored with the model as JSON."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_size: int = Field(128, gt=0, description="Side of the square model input, in pixels.")
    resize: Literal["shorter_side", "squash"] = Field(
        "shorter_side",
        description="shorter_side keeps the aspect ratio, then crops; squash stretches.",
    )
    resize_size: int | None = Field(
        None,
        gt=0,
        description="Resize the whole image first (the shorter side, or both sides for squash, to "
        "this many pixels; the longer side rounded down), then cut the centre input_size square "
        "at whole-pixel offsets, as Hugging Face image processors do. null: one resampling pass "
        "over the centre box that crop_pct sets.",
    )
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"] = Field(
        "bilinear", description="Pillow's resampling filter for the resize."
    )
    crop: Literal["center"] = Field("center", description="Which square is kept after resizing.")
    crop_pct: float = Field(
        1.0, gt=0, le=1, description="Fraction of the shorter side kept (when resize_size is null)."
    )
    rescale_factor: float = Field(
        1 / 255, gt=0, description="Pixel values (0-255) are multiplied by this before mean/std."
    )
    mean: tuple[float, float, float] = Field(
        (0.5, 0.5, 0.5), description="Subtracted per RGB channel after rescaling."
    )
    std: tuple[float, float, float] = Field(
        (0.5, 0.5, 0.5), description="Divides each RGB channel after the mean."
    )
    channel_order: Literal["RGB"] = Field("RGB", description="Channel order of the input.")
    layout: Literal["NCHW"] = Field(
        "NCHW", description="Input layout: batch, channel, row, column."
    )
    alpha_background: tuple[int, int, int] | None = Field(
        (255, 255, 255),
        description="Colour transparent pixels are composited onto (and 16-bit or float "
        "samples are scaled to 8 bits); null: Pillow's own convert('RGB') for every mode, "
        "alpha dropped and high bit depths clipped, as Hugging Face pipelines load images.",
    )
    transparency_key_background: tuple[int, int, int] | None = Field(
        None,
        description="With alpha_background null: the colour of the pixels that match the "
        "image's transparency colour key (a PNG's tRNS, a GIF's or palette's transparent "
        "entry), as Hugging Face processors that convert to RGB (do_convert_rgb) paint them "
        "white; null: they keep their colour.",
    )
    jpeg_draft: bool = Field(
        False,
        description="Decode JPEG at a reduced scale (Pillow's draft mode) when the image is "
        "much larger than needed: faster, and what models trained on such decoding expect; "
        "models trained elsewhere expect full decoding.",
    )

    @model_validator(mode="after")
    def _one_crop_rule(self) -> PreprocessSpec:
        if 0.0 in self.std:
            raise ValueError(f"std {list(self.std)}: a channel divided by zero")
        if self.resize_size is not None:
            if self.crop_pct != 1.0:
                raise ValueError("give either resize_size or crop_pct, not both")
            if self.resize_size < self.input_size:
                raise ValueError("resize_size must be at least input_size")
        return self


def preprocess(
    source: bytes | Image.Image, spec: PreprocessSpec, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """One image as the model's input, shape (1, 3, S, S), float32."""
    if isinstance(source, bytes):
        return preprocess_upload(source, spec, max_pixels=max_pixels)[0]
    decoded = decode_opened(
        source,
        alpha_background=spec.alpha_background,
        key_background=spec.transparency_key_background,
        size_hint=_hint(spec),
    )
    return normalize(crop_and_resize(decoded.image, spec), spec)


def preprocess_upload(
    data: bytes, spec: PreprocessSpec, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, DecodedImage]:
    """`preprocess` of encoded bytes, also returning what decoding found (for the metrics)."""
    decoded = decode(
        data,
        max_pixels=max_pixels,
        alpha_background=spec.alpha_background,
        key_background=spec.transparency_key_background,
        size_hint=_hint(spec),
    )
    return normalize(crop_and_resize(decoded.image, spec), spec), decoded


def _hint(spec: PreprocessSpec) -> SizeHint | None:
    """What JPEG decoding may reduce the image to, if the spec allows it to reduce at all."""
    return (lambda size: resized_size(size, spec)) if spec.jpeg_draft else None


def resized_size(size: tuple[int, int], spec: PreprocessSpec) -> tuple[int, int]:
    """The whole image's size after the resize step, before the crop."""
    width, height = size
    if spec.resize_size is not None:
        return _whole_image_size(size, spec.resize, spec.resize_size)
    if spec.resize == "squash":
        return spec.input_size, spec.input_size
    scale = spec.input_size / spec.crop_pct / min(width, height)
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))


def _whole_image_size(size: tuple[int, int], resize: str, target: int) -> tuple[int, int]:
    """Hugging Face's rule: the shorter side to `target`, the longer one `int(target * long /
    short)`; or a `target` square for squash."""
    width, height = size
    if resize == "squash":
        return target, target
    if width <= height:
        return target, int(target * height / width)
    return int(target * width / height), target


Box = tuple[float, float, float, float]


def crop_and_resize(image: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """Resize and centre-crop: in one resampling pass over the kept box, or (with
    `resize_size`) the whole image, then a centre crop at whole-pixel offsets."""
    resample = _RESAMPLING[spec.interpolation]
    if spec.resize_size is not None:
        whole, crop = _resized_then_cropped(image.size, spec)
        resized = image.resize(whole, resample, reducing_gap=None)
        return resized.crop(crop)
    box = _kept_box(image.size, spec)
    return image.resize((spec.input_size, spec.input_size), resample, box=box, reducing_gap=None)


def _resized_then_cropped(
    size: tuple[int, int], spec: PreprocessSpec
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """With `resize_size`: the whole image's resized size, and the crop in it."""
    assert spec.resize_size is not None
    whole = _whole_image_size(size, spec.resize, spec.resize_size)
    x, y = (whole[0] - spec.input_size) // 2, (whole[1] - spec.input_size) // 2
    return whole, (x, y, x + spec.input_size, y + spec.input_size)


def _kept_box(size: tuple[int, int], spec: PreprocessSpec) -> Box:
    """Without `resize_size`: the box of the image resampled into the input."""
    width, height = size
    if spec.resize == "squash":
        return 0.0, 0.0, float(width), float(height)
    side = min(width, height) * spec.crop_pct
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def seen_box(decoded: DecodedImage, spec: PreprocessSpec) -> Box:
    """The box (left, top, right, bottom) of the upright original, in its own pixels, that
    `crop_and_resize` turns into the model's input: where a map over the patches belongs."""
    width, height = decoded.image.size
    if spec.resize_size is not None:
        whole, crop = _resized_then_cropped((width, height), spec)
        sx, sy = width / whole[0], height / whole[1]
        box = (crop[0] * sx, crop[1] * sy, crop[2] * sx, crop[3] * sy)
    else:
        box = _kept_box((width, height), spec)
    # A draft-decoded JPEG is smaller than the original by a whole factor per axis.
    fx, fy = decoded.upright_size[0] / width, decoded.upright_size[1] / height
    return box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy


def normalize(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """uint8 HWC RGB -> float32 (1, 3, H, W), (x * rescale_factor - mean) / std per channel.

    A channel has 256 possible values: each is computed once, in float32 as it would be per
    pixel (so every number is the same to the bit), and the pixels are looked up: a 128x128
    image in ~55 us against ~130 us computing every pixel."""
    table = _normalized_levels(spec.rescale_factor, spec.mean, spec.std)
    pixels = np.asarray(image)  # (H, W, 3) uint8
    out = np.empty((1, 3, *pixels.shape[:2]), np.float32)
    for channel in range(3):
        np.take(table[channel], pixels[:, :, channel], out=out[0, channel])
    return out


@functools.cache
def _normalized_levels(
    rescale_factor: float, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> np.ndarray:
    """(3, 256) float32: each channel's normalised value of each 8-bit level."""
    levels = np.arange(256, dtype=np.float32) * np.float32(rescale_factor)
    table = (levels - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]
    table.flags.writeable = False
    return table
