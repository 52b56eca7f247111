"""The preprocessing contract: encoded bytes or a PIL image -> normalised float32 NCHW tensor.

Training's evaluation, the export checks and the service all call `preprocess`; the spec that
parameterises it travels inside the ONNX file. Imports neither torch nor FastAPI.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from service.decode import DEFAULT_MAX_PIXELS, DecodedImage, decode, to_rgb, upright

_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class PreprocessSpec(BaseModel):
    """How an image becomes the model's input; stored with the model as JSON."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_size: int = Field(128, gt=0, description="Side of the square model input, in pixels.")
    resize: Literal["shorter_side", "squash"] = Field(
        "shorter_side",
        description="shorter_side keeps the aspect ratio, then crops; squash stretches.",
    )
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bilinear"
    crop: Literal["center"] = Field("center", description="Which square is kept after resizing.")
    crop_pct: float = Field(1.0, gt=0, le=1, description="Fraction of the shorter side kept.")
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    channel_order: Literal["RGB"] = "RGB"
    layout: Literal["NCHW"] = "NCHW"
    alpha_background: tuple[int, int, int] = Field(
        (255, 255, 255), description="Colour transparent pixels are composited onto."
    )


def preprocess(
    source: bytes | Image.Image, spec: PreprocessSpec, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """One image as the model's input, shape (1, 3, S, S), float32."""
    if isinstance(source, bytes):
        return preprocess_upload(source, spec, max_pixels=max_pixels)[0]
    image = to_rgb(upright(source), spec.alpha_background)
    return normalize(crop_and_resize(image, spec), spec)


def preprocess_upload(
    data: bytes, spec: PreprocessSpec, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, DecodedImage]:
    """`preprocess` of encoded bytes, also returning what decoding found (for the metrics)."""
    decoded = decode(
        data,
        max_pixels=max_pixels,
        alpha_background=spec.alpha_background,
        size_hint=lambda size: resized_size(size, spec),
    )
    return normalize(crop_and_resize(decoded.image, spec), spec), decoded


def resized_size(size: tuple[int, int], spec: PreprocessSpec) -> tuple[int, int]:
    """The whole image's size after the resize step, before the crop."""
    width, height = size
    if spec.resize == "squash":
        return spec.input_size, spec.input_size
    scale = spec.input_size / spec.crop_pct / min(width, height)
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))


def crop_and_resize(image: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """Resize and centre-crop in one resampling pass, by resizing only the kept box."""
    width, height = image.size
    if spec.resize == "squash":
        box = (0.0, 0.0, float(width), float(height))
    else:
        side = min(width, height) * spec.crop_pct
        left, top = (width - side) / 2, (height - side) / 2
        box = (left, top, left + side, top + side)
    resample = _RESAMPLING[spec.interpolation]
    return image.resize((spec.input_size, spec.input_size), resample, box=box, reducing_gap=None)


def normalize(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """uint8 HWC RGB -> float32 (1, 3, H, W), (x/255 - mean) / std per channel."""
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    chw = ((pixels - mean) / std).transpose(2, 0, 1)
    return np.ascontiguousarray(chw[None])
