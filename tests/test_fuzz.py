"""Fuzzing: decode + preprocess, and OIP request parsing, either succeed or raise one of the
service's closed error types; anything else is a bug.

`make test` runs a short pass (the examples below). A longer one:

    HYPOTHESIS_PROFILE=long .venv/bin/pytest tests/test_fuzz.py    # 20,000 examples each
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from model_contract.errors import ImageError
from model_contract.outputs import PROBABILITIES
from model_contract.preprocess import PreprocessSpec, preprocess_upload
from service.errors import InvalidRequest, TooManyImages
from service.http import oip
from service.inference.tensors import InputSpec, pixel_range

settings.register_profile(
    "short", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "long", max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "short"))

SPEC = PreprocessSpec(input_size=32)


def encoded(format_name: str, mode: str) -> bytes:
    pixels = np.random.default_rng(3).integers(0, 256, (12, 10, len(mode)), dtype=np.uint8)
    image = Image.fromarray(pixels.squeeze(), mode)
    buffer = io.BytesIO()
    image.save(buffer, format=format_name)
    return buffer.getvalue()


SEEDS = [
    encoded("PNG", "RGB"),
    encoded("PNG", "RGBA"),
    encoded("JPEG", "RGB"),
    encoded("GIF", "L"),
    encoded("WEBP", "RGB"),
    encoded("BMP", "RGB"),
    encoded("TIFF", "RGB"),
]


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid small image with bytes flipped, cut or inserted: near-miss inputs."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if action == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
    return bytes(data)


@given(st.one_of(mutated_images(), st.binary(max_size=512)))
def test_decode_and_preprocess_stay_in_the_closed_error_set(data: bytes) -> None:
    try:
        tensor, _ = preprocess_upload(data, SPEC, max_pixels=4_000_000)
    except ImageError:
        return
    assert tensor.shape == (1, 3, 32, 32) and tensor.dtype == np.float32
    assert np.isfinite(tensor).all()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def oip_requests(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """Infer requests that are nearly right: real field names, wrong or odd values."""
    tensor: dict[str, Any] = {
        "name": draw(st.sampled_from(["pixel_values", "image", "x"])),
        "shape": draw(st.lists(st.integers(-2, 5), max_size=5) | JSON_VALUES),
        "datatype": draw(st.sampled_from(["FP32", "BYTES", "INT64", "fp32"]) | JSON_VALUES),
    }
    if draw(st.booleans()):
        tensor["data"] = draw(
            st.lists(st.floats() | st.text(max_size=12) | st.integers(), max_size=16) | JSON_VALUES
        )
    if draw(st.booleans()):
        tensor["parameters"] = {"binary_data_size": draw(st.integers(-5, 4000) | JSON_VALUES)}
    request: dict[str, Any] = {"inputs": draw(st.sampled_from([[tensor], [], [tensor, tensor]]))}
    if draw(st.booleans()):
        request["outputs"] = draw(JSON_VALUES)
    header = json.dumps(request).encode()
    binary = draw(st.binary(max_size=64))
    if draw(st.booleans()):
        return header, None
    length = draw(st.sampled_from([str(len(header)), "-1", "x", str(len(header) + 3), "0"]))
    return header + binary, length


FUZZ_SPEC = InputSpec(
    pixels_name="pixel_values",
    image_shape=(3, 2, 2),
    value_range=pixel_range((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    max_batch=4,
    outputs=(PROBABILITIES,),
)


@given(st.one_of(oip_requests(), st.tuples(st.binary(max_size=256), st.none())))
def test_oip_parsing_stays_in_the_closed_error_set(case: tuple[bytes, str | None]) -> None:
    body, header_length = case
    try:
        request = oip.parse_request(body, header_length, FUZZ_SPEC)
    except (InvalidRequest, TooManyImages):
        return
    if request.pixels is not None:
        assert request.pixels.shape[1:] == (3, 2, 2) and np.isfinite(request.pixels).all()
    else:
        assert request.images and all(isinstance(image, bytes) for image in request.images)
