"""Open Inference Protocol v2 tensors: JSON or binary tensor data in; the probabilities, and the
attention rollout when asked for by name, out.

The binary tensor data extension puts a JSON header first (its length in the
`Inference-Header-Content-Length` header) and raw tensor bytes after it, in input order.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from service.errors import InvalidRequest
from service.http.schemas import (
    OipInferenceRequest,
    OipInferenceResponse,
    OipRequestInput,
    OipResponseOutput,
)
from service.inference.tensors import (
    BYTES,
    FP32,
    IMAGE_INPUT,
    InferRequest,
    InputSpec,
    check_batch,
    check_image_shape,
    check_input_count,
    check_pixel_shape,
    checked_images,
    checked_pixels,
    length_prefixed,
    pixels_from_raw,
    requested_outputs,
)

HEADER_LENGTH = "inference-header-content-length"
BINARY_MEDIA_TYPE = "application/octet-stream"


@dataclass(frozen=True)
class EncodedResponse:
    body: bytes
    media_type: str
    headers: dict[str, str]


def parse_request(body: bytes, header_length: str | None, spec: InputSpec) -> InferRequest:
    """Validate an infer request against the model's input; every flaw is a 400 with a reason.
    Counts (inputs, batch, elements) are checked before any per-element work."""
    header, binary = _split(body, header_length)
    try:
        request = OipInferenceRequest.model_validate_json(header)
    except ValidationError as error:
        raise InvalidRequest(f"malformed inference request: {_first_error(error)}") from error
    check_input_count(len(request.inputs), spec)
    (tensor,) = request.inputs
    raw = _binary_part(tensor, binary)
    check_batch(tensor.shape, spec)
    pixels, images = None, None
    if tensor.name == spec.pixels_name and tensor.datatype == FP32:
        pixels = _pixels(tensor, raw, spec)
    elif tensor.name == IMAGE_INPUT and tensor.datatype == BYTES:
        images = _images(tensor, raw)
    else:
        raise spec.refuse_unknown(tensor.name, tensor.datatype)
    return InferRequest(
        id=request.id, pixels=pixels, images=images, outputs=_requested(request, spec)
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


def _pixels(tensor: OipRequestInput, raw: bytes | None, spec: InputSpec) -> np.ndarray:
    if raw is not None:
        return pixels_from_raw(raw, tensor.shape, spec)
    count = check_pixel_shape(tensor.shape, spec)
    data = tensor.data or []
    if len(data) not in (count, tensor.shape[0]):  # flat, or nested as the shape
        raise InvalidRequest(f"shape {tensor.shape} needs {count} values, got {len(data)}")
    return checked_pixels(_numbers(data), tensor.shape, spec)


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
    count = check_image_shape(tensor.shape)
    if raw is None and len(tensor.data or []) != count:
        raise InvalidRequest(
            f"shape {tensor.shape} needs {count} images, got {len(tensor.data or [])}"
        )
    images = length_prefixed(raw, count) if raw is not None else _base64_elements(tensor.data or [])
    return checked_images(images, tensor.shape, tensor.name)


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


def _requested(request: OipInferenceRequest, spec: InputSpec) -> dict[str, bool]:
    """The outputs asked for, each binary if it asks, else if the request asks for all outputs
    to be."""
    every = _flag((request.parameters or {}).get("binary_data_output", False), "binary_data_output")
    names = []
    for output in request.outputs or []:
        binary = every
        if output.parameters and "binary_data" in output.parameters:
            binary = _flag(output.parameters["binary_data"], "binary_data")
        names.append((output.name, binary))
    return requested_outputs(names, every, spec)


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
