"""/v1/embed and the OIP output `embedding`, on small graphs whose embedding is known exactly
(the mean colour per channel), and a model without classes."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from model_contract.metadata import SelfTest
from model_contract.preprocess import PreprocessSpec, preprocess
from service.app import create_app
from tests.images import encode
from tests.onnx_models import EMBEDDING, classifier, headless_metadata, metadata_for
from tests.service_support import cpu_settings, ready_client

LABELS = ["red", "green", "blue"]
SIZE = 32
SPEC = PreprocessSpec(input_size=SIZE)
BRIGHT = encode(Image.new("RGB", (40, 40), (250, 240, 230)))
DARK = encode(Image.new("RGB", (40, 40), (10, 20, 200)))
EXACT = 1e-5
"""The served embedding against numpy's mean of the same pixels: float32 sums of 1,024 pixels
in another order (either engine) differ by ~1e-6."""


def mean_colour(image: bytes) -> np.ndarray:
    """What the graphs' embedding is: the preprocessed image's mean per channel."""
    return np.asarray(preprocess(image, SPEC).mean(axis=(2, 3))[0], dtype=np.float32)


def embeddings_of(body: dict[str, object]) -> list[list[float]]:
    items = body["embeddings"]
    assert isinstance(items, list)
    return [item["embedding"] for item in items]


def counted(client: TestClient) -> float:
    families = text_string_to_metric_families(client.get("/metrics").text)
    return sum(
        sample.value
        for family in families
        if family.name == "vit_embeddings_served"
        for sample in family.samples
        if sample.name.endswith("_total")
    )


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    folder = tmp_path_factory.mktemp("embedding")
    model = classifier(
        folder / "model.onnx",
        embedding=True,
        metadata=metadata_for(LABELS, SIZE, embedding=EMBEDDING),
    )
    with ready_client(cpu_settings(model, max_images_per_request=4)) as test_client:
        yield test_client


def test_embed_answers_the_vector_the_head_reads_per_file(client: TestClient) -> None:
    before = counted(client)
    files = [("file", ("bright.png", BRIGHT)), ("file", ("dark.png", DARK))]
    response = client.post("/v1/embed", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": "foreign", "version": "1"}
    assert body["embedding"] == {"size": 3, "source": EMBEDDING.source, "normalized": False}
    assert [item["file"] for item in body["embeddings"]] == ["bright.png", "dark.png"]
    for vector, image in zip(embeddings_of(body), [BRIGHT, DARK], strict=True):
        np.testing.assert_allclose(vector, mean_colour(image), atol=EXACT)
    assert counted(client) == before + 2


def test_normalize_gives_unit_length_in_the_same_direction(client: TestClient) -> None:
    response = client.post("/v1/embed?normalize=true", files={"file": ("b.png", BRIGHT)})
    assert response.status_code == 200, response.text
    assert response.json()["embedding"]["normalized"] is True
    (vector,) = embeddings_of(response.json())
    raw = mean_colour(BRIGHT)
    assert abs(np.linalg.norm(vector) - 1) < 1e-6
    np.testing.assert_allclose(vector, raw / np.linalg.norm(raw), atol=EXACT)


def test_a_file_that_fails_has_its_own_error_and_is_not_counted(client: TestClient) -> None:
    before = counted(client)
    files = [("file", ("good.png", BRIGHT)), ("file", ("bad.png", b"not an image"))]
    response = client.post("/v1/models/foreign/versions/1/embed", files=files)
    assert response.status_code == 200, response.text
    good, bad = response.json()["embeddings"]
    np.testing.assert_allclose(good["embedding"], mean_colour(BRIGHT), atol=EXACT)
    assert "embedding" not in bad and bad["error"]["type"] == "unsupported_image_format"
    assert counted(client) == before + 1


def test_models_list_the_embedding_and_the_output(client: TestClient) -> None:
    (model,) = client.get("/v1/models").json()["models"]
    assert model["embedding"] == EMBEDDING.model_dump()
    assert model["outputs"][-1] == "embedding"


def test_oip_answers_the_embedding_only_when_asked_for_by_name(client: TestClient) -> None:
    image = {"name": "image", "datatype": "BYTES", "shape": [1]}
    data = base64.b64encode(DARK).decode()
    plain = client.post("/v2/models/foreign/infer", json={"inputs": [{**image, "data": [data]}]})
    assert [o["name"] for o in plain.json()["outputs"]] == ["probabilities"]
    metadata = client.get("/v2/models/foreign").json()
    assert {"name": "embedding", "datatype": "FP32", "shape": [-1, 3]} in metadata["outputs"]
    before = counted(client)
    asked = client.post(
        "/v2/models/foreign/infer",
        json={"inputs": [{**image, "data": [data]}], "outputs": [{"name": "embedding"}]},
    )
    assert asked.status_code == 200, asked.text
    (output,) = asked.json()["outputs"]
    assert output["name"] == "embedding" and output["shape"] == [1, 3]
    np.testing.assert_allclose(output["data"], mean_colour(DARK), atol=EXACT)
    assert counted(client) == before + 1
    binary = client.post(
        "/v2/models/foreign/infer",
        json={
            "inputs": [{**image, "data": [data]}],
            "outputs": [{"name": "embedding", "parameters": {"binary_data": True}}],
        },
    )
    length = int(binary.headers["inference-header-content-length"])
    header = json.loads(binary.content[:length])
    assert header["outputs"][0]["parameters"]["binary_data_size"] == 12
    values = np.frombuffer(binary.content[length:], dtype="<f4")
    np.testing.assert_array_equal(values, np.asarray(output["data"], dtype=np.float32))


def test_a_model_without_an_embedding_refuses_embed(tmp_path: Path) -> None:
    model = classifier(tmp_path / "plain.onnx", metadata=metadata_for(LABELS, SIZE))
    with ready_client(cpu_settings(model)) as plain:
        response = plain.post("/v1/embed", files={"file": ("b.png", BRIGHT)})
        assert response.status_code == 400
        assert response.json()["type"] == "no_embedding_output"
        assert plain.get("/v1/models").json()["models"][0]["embedding"] is None


def golden_embeddings(images: list[bytes], shift: float = 0.0) -> SelfTest:
    return SelfTest(
        images=tuple(base64.b64encode(image).decode() for image in images),
        embeddings=tuple(tuple(float(v) + shift for v in mean_colour(i)) for i in images),
        tolerance=1e-5,
    )


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """A model without classes, with a self-test of its embeddings."""
    path = tmp_path_factory.mktemp("encoder") / "encoder.onnx"
    metadata = headless_metadata(SIZE, self_test=golden_embeddings([BRIGHT, DARK]))
    model = classifier(path, headless=True, metadata=metadata)
    with ready_client(cpu_settings(model)) as test_client:
        yield test_client


def test_a_model_without_classes_embeds_and_refuses_classes(encoder: TestClient) -> None:
    (model,) = encoder.get("/v1/models").json()["models"]
    assert model["output"] == "embedding" and model["labels"] == []
    assert model["outputs"] == ["embedding"]
    assert model["self_test"]["status"] == "passed", model["self_test"]
    for route in ("/v1/classify", "/v1/explain", "/v1/models/encoder/classify"):
        refused = encoder.post(route, files={"file": ("b.png", BRIGHT)})
        assert refused.status_code == 400, route
        assert refused.json()["type"] == "no_classes"
        assert "embed" in refused.json()["error"]
    response = encoder.post("/v1/models/encoder/embed", files={"file": ("b.png", BRIGHT)})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(embeddings_of(response.json())[0], mean_colour(BRIGHT), atol=EXACT)


def test_oip_answers_a_model_without_classes_with_its_embedding(encoder: TestClient) -> None:
    data = base64.b64encode(BRIGHT).decode()
    response = encoder.post(
        "/v2/models/encoder/infer",
        json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [data]}]},
    )
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    assert output["name"] == "embedding"
    np.testing.assert_allclose(output["data"], mean_colour(BRIGHT), atol=EXACT)
    asked = encoder.post(
        "/v2/models/encoder/infer",
        json={
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [data]}],
            "outputs": [{"name": "probabilities"}],
        },
    )
    assert asked.status_code == 400 and "unknown output" in asked.json()["error"]


def test_a_wrong_embedding_self_test_keeps_the_model_from_serving(tmp_path: Path) -> None:
    metadata = headless_metadata(SIZE, self_test=golden_embeddings([BRIGHT], shift=0.01))
    model = classifier(tmp_path / "wrong.onnx", headless=True, metadata=metadata)
    with TestClient(create_app(cpu_settings(model))) as wrong:
        deadline = time.monotonic() + 30
        while (listed := wrong.get("/v1/models").json()["models"]) == [] or listed[0]["self_test"][
            "status"
        ] != "failed":
            assert time.monotonic() < deadline, listed
            time.sleep(0.02)
        assert "of its embedding differs by 1.00e-02" in listed[0]["self_test"]["detail"]
        assert wrong.get("/v2/health/ready").status_code == 503
