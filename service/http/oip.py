"""Open Inference Protocol v2 tensors: JSON or binary tensor data in; the probabilities, and the
attention rollout when asked for by name, out.

The binary tensor data extension puts a JSON header first (its length in the
`Inference-Header-Content-Length` header) and raw tensor bytes after it, in input order.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from model_runtime.session import PROBABILITIES
from service.errors import EmptyBody, InvalidRequest
from service.http.schemas import (
    OipInferenceRequest,
    OipInferenceResponse,
    OipRequestInput,
    OipResponseOutput,
)

HEADER_LENGTH = "inference-header-content-length"
BINARY_MEDIA_TYPE = "application/octet-stream"
FP32 = "FP32"
BYTES = "BYTES"
IMAGE_INPUT = "image"
PROBABILITIES_OUTPUT = PROBABILITIES
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
class InferRequest:
    """A parsed request: either preprocessed pixels or encoded image files, and how to answer."""

    id: str | None
    pixels: np.ndarray | None
    images: list[bytes] | None
    outputs: dict[str, bool]
    """The outputs to answer with, in order, each with whether its data goes as binary."""


@dataclass(frozen=True)
class EncodedResponse:
    body: bytes
    media_type: str
    headers: dict[str, str]


def parse_request(
    body: bytes,
    header_length: str | None,
    *,
    pixels_name: str,
    input_shape: tuple[int, int, int],
    value_range: PixelRange,
    max_batch: int,
    outputs: tuple[str, ...] = (PROBABILITIES_OUTPUT,),
) -> InferRequest:
    """Validate an infer request against the model's input; every flaw is a 400 with a reason.
    Counts (inputs, batch, elements) are checked before any per-element work."""
    header, binary = _split(body, header_length)
    try:
        request = OipInferenceRequest.model_validate_json(header)
    except ValidationError as error:
        raise InvalidRequest(f"malformed inference request: {_first_error(error)}") from error
    if len(request.inputs) != 1:
        raise InvalidRequest(
            f"expected exactly one input ({pixels_name!r} FP32 or {IMAGE_INPUT!r} BYTES), "
            f"got {len(request.inputs)}"
        )
    (tensor,) = request.inputs
    raw = _binary_part(tensor, binary)
    batch = tensor.shape[0] if tensor.shape else 0
    if not 1 <= batch <= max_batch:
        raise InvalidRequest(f"batch size must be 1..{max_batch}, got shape {tensor.shape}")
    pixels, images = None, None
    if tensor.name == pixels_name and tensor.datatype == FP32:
        pixels = _pixels(tensor, raw, input_shape, value_range)
    elif tensor.name == IMAGE_INPUT and tensor.datatype == BYTES:
        images = _images(tensor, raw)
    else:
        raise InvalidRequest(
            f"unknown input {tensor.name!r} of type {tensor.datatype}: "
            f"send {pixels_name!r} as FP32 "
            f"[N,{','.join(map(str, input_shape))}] or {IMAGE_INPUT!r} as BYTES [N]"
        )
    return InferRequest(
        id=request.id, pixels=pixels, images=images, outputs=_requested(request, outputs)
    )


def encode_response(
    outputs: dict[str, np.ndarray], *, model_name: str, model_version: str, request: InferRequest
) -> EncodedResponse:
    """The requested FP32 outputs (the [N, classes] probabilities; the [N, grid_h, grid_w]
    rollout), each as JSON data or as binary tensor data, in the order asked."""
    encoded, binary = [], []
    for name, as_binary in request.outputs.items():
        data = np.ascontiguousarray(outputs[name], dtype="<f4")
        output = OipResponseOutput(name=name, shape=list(data.shape), datatype=FP32)
        if as_binary:
            output.parameters = {"binary_data_size": data.nbytes}
            binary.append(data.tobytes())
        else:
            output.data = data.ravel().tolist()
        encoded.append(output)
    response = OipInferenceResponse(
        model_name=model_name, model_version=model_version, id=request.id, outputs=encoded
    )
    header = response.model_dump_json(exclude_none=True).encode()
    if not binary:
        return EncodedResponse(header, "application/json", {})
    return EncodedResponse(
        header + b"".join(binary), BINARY_MEDIA_TYPE, {HEADER_LENGTH: str(len(header))}
    )


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError as error:
        raise InvalidRequest("Inference-Header-Content-Length must be an integer") from error
    if not 0 < length <= len(body):
        raise InvalidRequest(
            f"Inference-Header-Content-Length {length} does not fit a body of {len(body)} bytes"
        )
    return body[:length], body[length:]


def _binary_part(tensor: OipRequestInput, binary: bytes) -> bytes | None:
    """The input's raw bytes from the binary section, which must hold exactly them."""
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is None:
        if binary:
            raise InvalidRequest("binary data follows the header but no input declares it")
        if tensor.data is None:
            raise InvalidRequest(f"input {tensor.name!r} has neither data nor binary_data_size")
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
        raise InvalidRequest(
            f"input {tensor.name!r} declares binary_data_size {size!r}, "
            f"but {len(binary)} bytes follow the header"
        )
    return binary


def _pixels(
    tensor: OipRequestInput,
    raw: bytes | None,
    input_shape: tuple[int, int, int],
    value_range: PixelRange,
) -> np.ndarray:
    if tuple(tensor.shape[1:]) != input_shape or len(tensor.shape) != 4:
        raise InvalidRequest(
            f"FP32 input must have shape [N,{','.join(map(str, input_shape))}], got {tensor.shape}"
        )
    count = math.prod(tensor.shape)
    if raw is not None:
        if len(raw) != count * 4:
            raise InvalidRequest(f"shape {tensor.shape} needs {count * 4} bytes, got {len(raw)}")
        values = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    else:
        data = tensor.data or []
        if len(data) not in (count, tensor.shape[0]):  # flat, or nested as the shape
            raise InvalidRequest(f"shape {tensor.shape} needs {count} values, got {len(data)}")
        values = _numbers(data)
        if values.size != count:
            raise InvalidRequest(f"shape {tensor.shape} needs {count} values, got {values.size}")
    if not np.isfinite(values).all():
        raise InvalidRequest("FP32 data contains NaN or infinity")
    pixels = values.reshape(tensor.shape)
    low, high = value_range
    channels = pixels.transpose(1, 0, 2, 3).reshape(len(low), -1)
    if (channels.min(axis=1) < low).any() or (channels.max(axis=1) > high).any():
        ranges = ", ".join(f"{lo:.3g}..{hi:.3g}" for lo, hi in zip(low, high, strict=True))
        raise InvalidRequest(
            f"FP32 data outside what the model's preprocessing can give (per channel {ranges})"
        )
    return pixels


def _numbers(data: list[Any]) -> np.ndarray:
    """JSON numbers (flat or nested) as float32; strings, booleans, nulls and integers beyond
    any float are refused, not converted."""
    try:
        values = np.asarray(data)
    except ValueError as error:  # ragged nesting
        raise InvalidRequest("FP32 data must be numbers, flat or nested as the shape") from error
    if values.dtype.kind not in "iuf" or _has_bool(data):
        raise InvalidRequest("FP32 data must be JSON numbers within float range, flat or nested")
    with np.errstate(over="ignore"):  # beyond float32 becomes infinity, refused after
        return values.astype(np.float32).ravel()


def _has_bool(data: list[Any]) -> bool:
    """numpy turns true and false among numbers into 1 and 0; JSON booleans are not numbers."""
    kinds = set(map(type, data))
    return bool in kinds or (list in kinds and any(_has_bool(x) for x in data if type(x) is list))


def _images(tensor: OipRequestInput, raw: bytes | None) -> list[bytes]:
    if math.prod(tensor.shape) != tensor.shape[0] or len(tensor.shape) > 2:
        raise InvalidRequest(f"BYTES input must have shape [N] or [N,1], got {tensor.shape}")
    count = tensor.shape[0]
    if raw is None and len(tensor.data or []) != count:
        raise InvalidRequest(
            f"shape {tensor.shape} needs {count} images, got {len(tensor.data or [])}"
        )
    images = (
        _length_prefixed(raw, count) if raw is not None else _base64_elements(tensor.data or [])
    )
    if len(images) != count:
        got = "more" if len(images) > count else str(len(images))
        raise InvalidRequest(f"shape {tensor.shape} needs {count} images, got {got}")
    for number, image in enumerate(images, 1):
        if not image:
            raise EmptyBody(
                f"BYTES element {number} of {tensor.name!r} is empty: send an image file"
            )
    return images


def _length_prefixed(raw: bytes, count: int) -> list[bytes]:
    """BYTES elements in binary form: each a 4-byte little-endian length, then that many bytes.
    Stops at one more than `count`: millions of empty elements cost no more than a few."""
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


def _base64_elements(data: list[object]) -> list[bytes]:
    """BYTES elements in JSON: image files cannot be JSON text, so they travel base64-encoded."""
    elements = []
    for element in data:
        if not isinstance(element, str):
            raise InvalidRequest("BYTES data in JSON must be base64 strings of image files")
        try:
            elements.append(base64.b64decode(element, validate=True))
        except binascii.Error as error:
            raise InvalidRequest(
                "BYTES data in JSON must be base64 strings of image files"
            ) from error
    return elements


def _requested(request: OipInferenceRequest, available: tuple[str, ...]) -> dict[str, bool]:
    """The outputs asked for by name (none named: the probabilities alone, so that plain
    classification carries nothing more), each binary if it asks, else if the request asks
    for all outputs to be."""
    every = _flag((request.parameters or {}).get("binary_data_output", False), "binary_data_output")
    if not request.outputs:
        return {PROBABILITIES_OUTPUT: every}
    requested: dict[str, bool] = {}
    for output in request.outputs:
        if output.name not in available:
            raise InvalidRequest(
                f"unknown output {output.name!r}; the model has {', '.join(available)}"
            )
        binary = every
        if output.parameters and "binary_data" in output.parameters:
            binary = _flag(output.parameters["binary_data"], "binary_data")
        requested[output.name] = binary
    return requested


def _flag(value: object, name: str) -> bool:
    """A JSON boolean: the string "false" would otherwise be taken as true."""
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be true or false, got {value!r}")
    return value


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    return (
        f"{'.'.join(map(str, first['loc']))}: {first['msg']}"
        if first["loc"]
        else json.dumps(first["msg"])
    )
