"""OIP tensors in protobuf: a ModelInferRequest into the request the data plane takes, and the
outputs into a ModelInferResponse (raw little-endian FP32, as Triton answers)."""

from __future__ import annotations

import numpy as np

from model_runtime.session import Outputs
from service.errors import InvalidRequest
from service.grpc import oip_pb2 as pb
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


def parse_request(request: pb.ModelInferRequest, spec: InputSpec) -> InferRequest:
    """Validate an infer request against the model's input; every flaw is INVALID_ARGUMENT with
    a reason. Counts (inputs, batch, elements) are checked before any per-element work."""
    check_input_count(len(request.inputs), spec)
    (tensor,) = request.inputs
    shape = list(tensor.shape)
    check_batch(shape, spec)
    raw = _raw_contents(request, tensor)
    if tensor.name == spec.pixels_name and tensor.datatype == FP32:
        pixels = (
            pixels_from_raw(raw, shape, spec) if raw is not None else _typed_pixels(tensor, spec)
        )
        return InferRequest(request.id or None, pixels, None, _outputs(request, spec))
    if tensor.name == IMAGE_INPUT and tensor.datatype == BYTES:
        count = check_image_shape(shape)
        images = (
            length_prefixed(raw, count)
            if raw is not None
            else list(tensor.contents.bytes_contents[: count + 1])
        )
        images = checked_images(images, shape, tensor.name)
        return InferRequest(request.id or None, None, images, _outputs(request, spec))
    raise spec.refuse_unknown(tensor.name, tensor.datatype)


def _raw_contents(
    request: pb.ModelInferRequest, tensor: pb.ModelInferRequest.InferInputTensor
) -> bytes | None:
    """The input's raw bytes where the request sends them raw: one entry per input, and then
    no typed contents beside them."""
    raw = request.raw_input_contents
    if not raw:
        return None
    if len(raw) != 1:
        raise InvalidRequest(f"raw_input_contents holds {len(raw)} entries for 1 input")
    if tensor.HasField("contents"):
        raise InvalidRequest(
            f"input {tensor.name!r} has both contents and raw_input_contents: send one"
        )
    return bytes(raw[0])


def _typed_pixels(tensor: pb.ModelInferRequest.InferInputTensor, spec: InputSpec) -> np.ndarray:
    count = check_pixel_shape(list(tensor.shape), spec)
    values = tensor.contents.fp32_contents
    if len(values) != count:
        raise InvalidRequest(f"shape {list(tensor.shape)} needs {count} values, got {len(values)}")
    return checked_pixels(np.asarray(values, dtype=np.float32), list(tensor.shape), spec)


def _outputs(request: pb.ModelInferRequest, spec: InputSpec) -> dict[str, bool]:
    """The outputs asked for by name (raw data whatever a parameter says: gRPC has no JSON)."""
    return requested_outputs([(output.name, True) for output in request.outputs], True, spec)


def encode_response(
    outputs: Outputs, *, model_name: str, model_version: str, request: InferRequest
) -> pb.ModelInferResponse:
    """The requested outputs, in the order asked, each as raw little-endian FP32."""
    response = pb.ModelInferResponse(
        model_name=model_name, model_version=model_version, id=request.id or ""
    )
    for name in request.outputs:
        data = np.ascontiguousarray(outputs[name], dtype="<f4")
        response.outputs.add(name=name, datatype=FP32, shape=data.shape)
        response.raw_output_contents.append(data.tobytes())
    return response
