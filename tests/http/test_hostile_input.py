"""Hostile and odd input over HTTP: each case gets its status and error type, is counted in
`vit_rejections_total` by that type, and leaves the service ready."""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.service_support import cpu_settings, ready_client, rejections

MAX_BODY = 256 * 1024
MAX_FILES = 4


def png(width: int, height: int) -> bytes:
    """Noise, so that every part of the compressed data carries pixels."""
    noise = np.random.default_rng(width * 7 + height).integers(0, 256, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(noise.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height and carries no pixel data: a pixel bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


FORBIDDEN = {
    "pdf": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF\n",
    "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
    "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>',
    "psd": b"8BPS\x00\x01" + bytes(6) + b"\x00\x03\x00\x00\x00\x10\x00\x00\x00\x10\x00\x08\x00\x03",
    "fits": b"SIMPLE  =                    T" + b" " * 50 + b"END" + b" " * 2797,
    "text": b"just some text, not an image\n",
}


@pytest.fixture(scope="module")
def client(served_model: Path) -> Iterator[TestClient]:
    settings = cpu_settings(served_model, max_body_bytes=MAX_BODY, max_images_per_request=MAX_FILES)
    with ready_client(settings) as test_client:
        yield test_client


def refused(client: TestClient, status: int, kind: str, **request: Any) -> None:
    """POST `request`; assert the status, the error type, one more rejection of that type,
    and that the service is still ready."""
    url = request.pop("url", "/v1/classify")
    before = rejections(client, kind)
    response = client.post(url, **request)
    assert response.status_code == status, response.text
    assert response.json()["type"] == kind, response.text
    assert rejections(client, kind) == before + 1
    assert client.get("/v2/health/ready").status_code == 200


def raw(data: bytes, content_type: str = "image/png") -> dict[str, Any]:
    return {"content": data, "headers": {"content-type": content_type}}


def test_empty_body(client: TestClient) -> None:
    refused(client, 400, "empty_body", **raw(b""))


def test_over_the_byte_limit_declared_and_chunked(client: TestClient) -> None:
    big = bytes(MAX_BODY + 1)
    refused(client, 413, "payload_too_large", **raw(big))

    def chunks() -> Iterator[bytes]:
        for _ in range(64):
            yield bytes(16 * 1024)

    refused(client, 413, "payload_too_large", **raw(chunks()))  # type: ignore[arg-type]


def test_wrong_content_type(client: TestClient) -> None:
    refused(client, 415, "unsupported_media_type", **raw(png(8, 8), "text/plain"))


def test_multipart_without_the_file_field(client: TestClient) -> None:
    refused(client, 400, "invalid_request", files={"image": ("a.png", png(8, 8))})


def test_multipart_with_too_many_files(client: TestClient) -> None:
    files = [("file", (f"{i}.png", png(8, 8))) for i in range(MAX_FILES + 1)]
    refused(client, 413, "too_many_images", files=files)


def test_multipart_without_a_boundary(client: TestClient) -> None:
    body = b"--x\r\nContent-Disposition: form-data; name=file\r\n\r\nabc\r\n--x--\r\n"
    refused(client, 400, "invalid_request", **raw(body, "multipart/form-data"))


@pytest.mark.parametrize("kind", sorted(FORBIDDEN))
def test_forbidden_and_unknown_formats(client: TestClient, kind: str) -> None:
    refused(client, 415, "unsupported_image_format", files={"file": (f"x.{kind}", FORBIDDEN[kind])})


@pytest.mark.parametrize("side", [50_000, 200_000])
def test_header_only_pixel_bomb(client: TestClient, side: int) -> None:
    """Refused from the header alone, below and above Pillow's own bomb limit."""
    refused(client, 422, "too_many_pixels", **raw(png_header_only(side, side)))


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.99])
def test_truncated_png(client: TestClient, cut: float) -> None:
    data = png(64, 64)
    refused(client, 422, "undecodable_image", **raw(data[: int(len(data) * cut)]))


def test_corrupt_png(client: TestClient) -> None:
    data = bytearray(png(64, 64))
    data[60:80] = bytes(20)  # inside the compressed pixel data
    refused(client, 422, "undecodable_image", **raw(bytes(data)))


@pytest.mark.parametrize("size", [(1, 1), (1, 10_000), (10_000, 1)])
def test_extreme_aspect_ratios_are_classified(client: TestClient, size: tuple[int, int]) -> None:
    response = client.post("/v1/classify", **raw(png(*size)))
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 1


@pytest.mark.parametrize("name", ["x" * 4_000 + ".png", "фото-照片-📷.png"])
def test_long_and_non_ascii_filenames(client: TestClient, name: str) -> None:
    response = client.post("/v1/classify", files={"file": (name, png(16, 16))})
    assert response.status_code == 200, response.text


def test_a_part_header_over_the_multipart_parsers_limit(client: TestClient) -> None:
    """python-multipart bounds a part's headers (about 8 KB): a longer filename is a 400."""
    refused(client, 400, "invalid_request", files={"file": ("x" * 10_000 + ".png", png(8, 8))})


def test_top_k_far_above_the_labels_is_clamped(client: TestClient) -> None:
    response = client.post(f"/v1/classify?top_k={10**30}", **raw(png(16, 16)))
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"][0]["top"]) == 8


@pytest.mark.parametrize("top_k", ["0", "-3", "many", "1.5"])
def test_bad_top_k(client: TestClient, top_k: str) -> None:
    refused(client, 400, "invalid_request", url=f"/v1/classify?top_k={top_k}", **raw(png(8, 8)))


def test_unknown_model(client: TestClient) -> None:
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}
    refused(client, 404, "model_not_found", url="/v2/models/nope/infer", json=body)
    assert client.get("/v2/models/nope/ready").status_code == 404


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN"])
def test_oip_non_finite_values(client: TestClient, value: str) -> None:
    (model,) = client.get("/v1/models").json()["models"]
    size = model["input_size"]
    data = ["0.0"] * (3 * size * size)
    data[7] = value
    tensor = f'"shape": [1, 3, {size}, {size}], "datatype": "FP32", "data": [{", ".join(data)}]'
    body = '{"inputs": [{"name": "pixel_values", ' + tensor + "}]}"
    refused(
        client,
        400,
        "invalid_request",
        url=f"/v2/models/{model['name']}/infer",
        **raw(body.encode(), "application/json"),
    )


def test_oip_binary_data_shorter_than_declared(client: TestClient) -> None:
    (model,) = client.get("/v1/models").json()["models"]
    size = model["input_size"]
    header = {
        "inputs": [
            {
                "name": "pixel_values",
                "shape": [1, 3, size, size],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 3 * size * size * 4},
            }
        ]
    }
    encoded = json.dumps(header).encode()
    refused(
        client,
        400,
        "invalid_request",
        url=f"/v2/models/{model['name']}/infer",
        content=encoded + bytes(100),
        headers={
            "content-type": "application/octet-stream",
            "inference-header-content-length": str(len(encoded)),
        },
    )


def test_multipart_with_too_many_fields(client: TestClient) -> None:
    fields = {f"note{i}": "x" for i in range(20)}
    refused(client, 400, "invalid_request", data=fields, files={"file": ("a.png", png(8, 8))})


def test_multipart_with_an_oversized_text_field(client: TestClient) -> None:
    refused(
        client,
        400,
        "invalid_request",
        data={"note": "x" * 100_000},
        files={"file": ("a.png", png(8, 8))},
    )


def with_preamble(size: int) -> dict[str, Any]:
    boundary = "b0undary"
    body = (
        b"p" * size
        + f"\r\n--{boundary}\r\n".encode()
        + b'Content-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        + png(8, 8)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return raw(body, f"multipart/form-data; boundary={boundary}")


@pytest.mark.parametrize("size", [1, 200_000])
def test_a_multipart_preamble_is_refused_at_its_first_byte(client: TestClient, size: int) -> None:
    """python-multipart expects the boundary first: any preamble, however large, is a 400
    found at the first unexpected byte, so its size costs no CPU."""
    refused(client, 400, "invalid_request", **with_preamble(size))


def animation(format_name: str, frames: int) -> bytes:
    images = [Image.new("RGB", (16, 16), (i % 256, 0, 0)) for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format=format_name, save_all=True, append_images=images[1:])
    return buffer.getvalue()


@pytest.mark.parametrize("format_name", ["GIF", "WEBP"])
def test_animations_with_hundreds_of_frames(client: TestClient, format_name: str) -> None:
    response = client.post("/v1/classify", **raw(animation(format_name, 300), "image/*"))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("mode", "values"), [("I", (0, 70_000)), ("F", (-5.0, 400.0)), ("I;16", (0, 65_535))]
)
def test_wide_integer_and_float_tiffs(
    client: TestClient, mode: str, values: tuple[float, float]
) -> None:
    image = Image.new(mode, (16, 16), values[0])
    image.paste(values[1], (0, 0, 8, 16))
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF")
    response = client.post("/v1/classify", **raw(buffer.getvalue(), "image/tiff"))
    assert response.status_code == 200, response.text


def test_no_external_decoder_ever_runs(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    started: list[object] = []

    def forbidden(*args: object, **kwargs: object) -> None:
        started.append(args)
        raise AssertionError("an external program was started")

    monkeypatch.setattr(subprocess, "Popen", forbidden)
    for kind in ("eps", "pdf", "psd"):
        refused(client, 415, "unsupported_image_format", **raw(FORBIDDEN[kind], "image/*"))
    assert started == []


def jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png(width, height))).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("cut", [0.3, 0.7])
def test_truncated_jpeg(client: TestClient, cut: float) -> None:
    data = jpeg(64, 64)
    refused(client, 422, "undecodable_image", **raw(data[: int(len(data) * cut)], "image/jpeg"))


def test_a_real_pixel_bomb_below_pillows_own_limit(client: TestClient) -> None:
    """48 M pixels of zeros: a 50 KB PNG, under Pillow's 89 M bomb limit but over the
    service's 40 M, refused from its header before any pixel is decompressed."""
    buffer = io.BytesIO()
    Image.new("L", (8000, 6000)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < MAX_BODY
    refused(client, 422, "too_many_pixels", **raw(buffer.getvalue()))


def oip_pixels(size: int, shape: list[int], datatype: str, count: int) -> dict[str, Any]:
    tensor = {"name": "pixel_values", "shape": shape, "datatype": datatype, "data": [0.0] * count}
    return {"inputs": [tensor]}


@pytest.mark.parametrize("flaw", ["shape", "datatype", "length", "batch"])
def test_oip_malformed_tensors(client: TestClient, flaw: str) -> None:
    (model,) = client.get("/v1/models").json()["models"]
    size = model["input_size"]
    full = 3 * size * size
    body = {
        "shape": oip_pixels(size, [1, 3, 8, 8], "FP32", 192),
        "datatype": oip_pixels(size, [1, 3, size, size], "INT64", full),
        "length": oip_pixels(size, [1, 3, size, size], "FP32", full - 1),
        "batch": oip_pixels(size, [0, 3, size, size], "FP32", 0),
    }[flaw]
    refused(client, 400, "invalid_request", url=f"/v2/models/{model['name']}/infer", json=body)
