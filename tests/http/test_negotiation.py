"""Content negotiation, both ways: what a request body is taken as (its Content-Type, or for
bytes of no image type, their content), and the media type a route answers with, as the `Accept`
header ranks it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.http.negotiation import preferred
from tests.images import upload_variety
from tests.service_support import cpu_settings, ready_client, rejections

UPLOADS = upload_variety()
OCTET_STREAM = "application/octet-stream"
ROUNDING = 1e-6
"""One image's probabilities through the engine that runs batches and the one that runs a lone
image: float32 rounding apart."""


@pytest.fixture(scope="module")
def client(served_model: Path) -> Iterator[TestClient]:
    with ready_client(cpu_settings(served_model)) as client:
        yield client


def classify(client: TestClient, data: bytes, content_type: str | None) -> dict[str, object]:
    headers = {} if content_type is None else {"content-type": content_type}
    response = client.post("/v1/classify?probabilities=true", content=data, headers=headers)
    assert response.status_code == 200, response.text
    answer: dict[str, object] = response.json()
    return answer


def only_prediction(answer: dict[str, object]) -> dict[str, Any]:
    predictions = answer["predictions"]
    assert isinstance(predictions, list) and len(predictions) == 1
    prediction: dict[str, Any] = predictions[0]
    return prediction


@pytest.mark.parametrize("name", sorted(UPLOADS))
@pytest.mark.parametrize("content_type", [OCTET_STREAM, None], ids=["octet-stream", "none"])
def test_image_bytes_of_no_image_type_are_known_by_their_content(
    client: TestClient, name: str, content_type: str | None
) -> None:
    data, declared = UPLOADS[name]
    taken = only_prediction(classify(client, data, content_type))
    expected = only_prediction(classify(client, data, declared))
    assert [t["label"] for t in taken["top"]] == [t["label"] for t in expected["top"]]
    # A lone image and one in a batch may run on different engines (float32 rounding apart).
    np.testing.assert_allclose(taken["probabilities"], expected["probabilities"], atol=ROUNDING)
    assert taken["in_distribution"] == expected["in_distribution"]


@pytest.mark.parametrize("content_type", [OCTET_STREAM, None], ids=["octet-stream", "none"])
def test_bytes_that_are_no_image_are_415_saying_what_is_accepted(
    client: TestClient, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    before = rejections(client, "unsupported_media_type")
    for body in (b"garbage", b'{"image": "cat.jpg"}', bytes(4096)):
        response = client.post("/v1/classify", content=body, headers=headers)
        assert response.status_code == 415
        error = response.json()
        assert error["type"] == "unsupported_media_type"
        for accepted in ("multipart/form-data", "image/*", OCTET_STREAM, "JPEG", "PNG", "WEBP"):
            assert accepted in error["error"]
    assert rejections(client, "unsupported_media_type") == before + 3


def test_an_image_signature_over_corrupt_bytes_is_still_refused_by_the_decoder(
    client: TestClient,
) -> None:
    data, _ = UPLOADS["jpeg"]
    response = client.post(
        "/v1/classify", content=data[:300], headers={"content-type": OCTET_STREAM}
    )
    assert (response.status_code, response.json()["type"]) == (422, "undecodable_image")


def test_other_media_types_stay_415_even_for_image_bytes(client: TestClient) -> None:
    data, _ = UPLOADS["png-rgba"]
    for media_type in ("text/plain", "application/json", "application/x-www-form-urlencoded"):
        response = client.post("/v1/classify", content=data, headers={"content-type": media_type})
        assert (response.status_code, response.json()["type"]) == (415, "unsupported_media_type")
        assert OCTET_STREAM in response.json()["error"]


OFFERED = ("application/json", "image/png")


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        ("", "application/json"),
        ("  ", "application/json"),
        ("image/png", "image/png"),
        ("IMAGE/PNG", "image/png"),
        ("Image/Png; Q=0.9", "image/png"),
        ("image/*", "image/png"),
        ("*/*", "application/json"),
        ("application/json, image/png", "application/json"),
        ("image/png, application/json", "application/json"),  # a tie: the server's first
        ("image/png;q=0.5, application/json;q=0.5", "application/json"),
        ("image/png, application/json;q=0.9", "image/png"),
        ("image/png;q=0", None),
        ("image/png;q=0, */*", "application/json"),
        ("image/png;q=0, */*;q=0.1", "application/json"),
        ("*/*;q=0.1, image/png", "image/png"),
        ("image/*;q=0.8, */*;q=0.1", "image/png"),
        ("image/png;q=0.0, image/*", None),  # the most specific range decides
        ("image/*;q=0, image/png", "image/png"),
        ("text/html, */*;q=0.8", "application/json"),
        ("image/png;charset=x;q=0.7;ext=1, application/json;q=0.6", "image/png"),
        ("image/jpeg", None),
        ("image/webp, text/*", None),
        ("*/*;q=0", None),
        ("image/png;q=2, application/json;q=0.1", "application/json"),  # q above 1: malformed
        ("image/png;q=abc", None),
        ("image/png;q=0.1234", None),
        ("png, image/", None),
        ("*/png", None),
        ("image/png,,", "image/png"),
    ],
)
def test_the_best_ranked_acceptable_type_is_chosen(accept: str, chosen: str | None) -> None:
    assert preferred(accept, OFFERED) == chosen
