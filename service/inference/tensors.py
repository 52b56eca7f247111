"""Open Inference Protocol tensors, whatever carries them: what an infer request may hold (one
input, preprocessed pixels or encoded image files) and which outputs it asks for.

Each front decodes its own encoding (JSON, binary tensor data, protobuf) into shapes and values;
the checks here are the ones every front applies, so HTTP and gRPC refuse the same requests
for the same reasons.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from service.errors import EmptyBody, InvalidRequest, TooManyImages

FP32 = "FP32"
BYTES = "BYTES"
IMAGE_INPUT = "image"
"""The input that takes encoded image files (BYTES, one element per image)."""
RANGE_TOLERANCE = 0.01
"""Slack on each channel's range, as a fraction of its width (rounding in other clients'
preprocessing); values outside it cannot come from any image."""

PixelRange = tuple[np.ndarray, np.ndarray]


def pixel_range(
    mean: tuple[float, ...], std: tuple[float, ...], rescale_factor: float = 1 / 255
) -> PixelRange:
    """Per channel, the lowest and highest value preprocessing can give: (0 - mean) / std and
    (255 * rescale_factor - mean) / std, widened by RANGE_TOLERANCE of the width."""
    low = (0 - np.asarray(mean)) / np.asarray(std)
    high = (255 * rescale_factor - np.asarray(mean)) / np.asarray(std)
    slack = RANGE_TOLERANCE * np.abs(high - low)
    return np.minimum(low, high) - slack, np.maximum(low, high) + slack


@dataclass(frozen=True)
class InputSpec:
    """What a model version accepts: its pixel input's name, one image's shape, the values
    its preprocessing can give, and how many images one request may hold."""

    pixels_name: str
    image_shape: tuple[int, int, int]
    value_range: PixelRange
    max_batch: int
    outputs: tuple[str, ...]

    def refuse_unknown(self, name: str, datatype: str) -> InvalidRequest:
        return InvalidRequest(
            f"unknown input {name!r} of type {datatype}: send {self.pixels_name!r} as FP32 "
            f"[N,{','.join(map(str, self.image_shape))}] or {IMAGE_INPUT!r} as BYTES [N]"
        )


@dataclass(frozen=True)
class InferRequest:
    """A parsed request: either preprocessed pixels or encoded image files, and how to answer."""

    id: str | None
    pixels: np.ndarray | None
    images: list[bytes] | None
    outputs: dict[str, bool]
    """The outputs to answer with, in order, each with whether its data goes as binary (a
    front without a choice ignores it)."""


def check_input_count(count: int, spec: InputSpec) -> None:
    if count != 1:
        raise InvalidRequest(
            f"expected exactly one input ({spec.pixels_name!r} FP32 or {IMAGE_INPUT!r} BYTES), "
            f"got {count}"
        )


def check_batch(shape: list[int], spec: InputSpec) -> int:
    """The batch size the shape names (before any data is read): 400 under 1, 413 over
    VIT_MAX_IMAGES_PER_REQUEST, as for files uploaded to /v1."""
    batch = shape[0] if shape else 0
    if batch < 1:
        raise InvalidRequest(f"batch size must be 1..{spec.max_batch}, got shape {shape}")
    if batch > spec.max_batch:
        raise TooManyImages(
            f"{batch} images in one request; VIT_MAX_IMAGES_PER_REQUEST allows {spec.max_batch}"
        )
    return batch


def check_pixel_shape(shape: list[int], spec: InputSpec) -> int:
    """The element count of an FP32 input of `shape`, which must be [N, *image_shape]."""
    if len(shape) != 4 or tuple(shape[1:]) != spec.image_shape:
        raise InvalidRequest(
            f"FP32 input must have shape [N,{','.join(map(str, spec.image_shape))}], got {shape}"
        )
    return math.prod(shape)


def pixels_from_raw(raw: bytes, shape: list[int], spec: InputSpec) -> np.ndarray:
    """An FP32 input sent as raw little-endian bytes, checked against its shape and range."""
    count = check_pixel_shape(shape, spec)
    if len(raw) != count * 4:
        raise InvalidRequest(f"shape {shape} needs {count * 4} bytes, got {len(raw)}")
    return checked_pixels(np.frombuffer(raw, dtype="<f4").astype(np.float32), shape, spec)


def checked_pixels(values: np.ndarray, shape: list[int], spec: InputSpec) -> np.ndarray:
    """`values` (float32, flat) as the batch `shape`: finite, and within what the model's
    preprocessing can give per channel."""
    count = math.prod(shape)
    if values.size != count:
        raise InvalidRequest(f"shape {shape} needs {count} values, got {values.size}")
    if not np.isfinite(values).all():
        raise InvalidRequest("FP32 data contains NaN or infinity")
    pixels = values.reshape(shape)
    low, high = spec.value_range
    channels = pixels.transpose(1, 0, 2, 3).reshape(len(low), -1)
    if (channels.min(axis=1) < low).any() or (channels.max(axis=1) > high).any():
        ranges = ", ".join(f"{lo:.3g}..{hi:.3g}" for lo, hi in zip(low, high, strict=True))
        raise InvalidRequest(
            f"FP32 data outside what the model's preprocessing can give (per channel {ranges})"
        )
    return pixels


def check_image_shape(shape: list[int]) -> int:
    """The image count of a BYTES input of `shape`, which must be [N] or [N, 1]."""
    if math.prod(shape) != shape[0] or len(shape) > 2:
        raise InvalidRequest(f"BYTES input must have shape [N] or [N,1], got {shape}")
    return shape[0]


def checked_images(images: list[bytes], shape: list[int], name: str) -> list[bytes]:
    """BYTES elements as image files: as many as the shape says, none empty."""
    count = shape[0]
    if len(images) != count:
        got = "more" if len(images) > count else str(len(images))
        raise InvalidRequest(f"shape {shape} needs {count} images, got {got}")
    for number, image in enumerate(images, 1):
        if not image:
            raise EmptyBody(f"BYTES element {number} of {name!r} is empty: send an image file")
    return images


def length_prefixed(raw: bytes, count: int) -> list[bytes]:
    """BYTES elements in binary form (the binary extension's and gRPC's raw contents): each a
    4-byte little-endian length, then that many bytes. Stops at one more than `count`: millions
    of empty elements cost no more than a few."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw) and len(elements) <= count:
        if offset + 4 > len(raw):
            raise InvalidRequest("BYTES binary data ends inside an element's length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidRequest("BYTES binary data ends inside an element")
        elements.append(raw[offset : offset + length])
        offset += length
    return elements


def requested_outputs(
    names: list[tuple[str, bool]], every_binary: bool, spec: InputSpec
) -> dict[str, bool]:
    """The outputs asked for by name, each with its binary flag (none named: the model's first
    output alone, its probabilities, or a model without classes its embedding: plain
    classification carries nothing more)."""
    if not names:
        return {spec.outputs[0]: every_binary}
    requested: dict[str, bool] = {}
    for name, binary in names:
        if name not in spec.outputs:
            raise InvalidRequest(
                f"unknown output {name!r}; the model has {', '.join(spec.outputs)}"
            )
        requested[name] = binary
    return requested
