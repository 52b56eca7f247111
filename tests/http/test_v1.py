"""/v1/classify and /v1/models: the numbers the model gives, the errors the table promises."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from model_contract.preprocess import preprocess
from model_runtime.options import CPU, IN_PROCESS
from model_runtime.session import ModelSession
from tests.images import asymmetric, encode, upload_variety, with_orientation
from tests.onnx_models import classifier, metadata_for, nested, restamped
from tests.repositories import COLOURS, TOKEN, add_version
from tests.service_support import cpu_settings, ready_client

UPLOADS = upload_variety()


@pytest.fixture(scope="module")
def client(served_model: Path) -> Iterator[TestClient]:
    with ready_client(
        cpu_settings(
            served_model, max_body_bytes=2_000_000, max_pixels=1_000_000, max_images_per_request=8
        )
    ) as client:
        yield client


@pytest.fixture(scope="module")
def reference(served_model: Path) -> ModelSession:
    return ModelSession(served_model, IN_PROCESS)


def in_process(reference: ModelSession, data: bytes) -> np.ndarray:
    """The answer without HTTP: the shared preprocessing and the onnxruntime session."""
    return reference.predict(preprocess(data, reference.metadata.preprocessing))[0]


def probabilities_of(response_json: dict[str, object]) -> np.ndarray:
    predictions = response_json["predictions"]
    assert isinstance(predictions, list)
    return np.array([p["probabilities"] for p in predictions])


@pytest.mark.parametrize("name", sorted(UPLOADS))
def test_raw_body_equals_in_process_result(
    client: TestClient, reference: ModelSession, name: str
) -> None:
    data, media_type = UPLOADS[name]
    response = client.post(
        "/v1/classify?probabilities=true", content=data, headers={"content-type": media_type}
    )
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(
        probabilities_of(response.json())[0], in_process(reference, data), atol=1e-5
    )


def test_multipart_files_answer_in_request_order(
    client: TestClient, reference: ModelSession
) -> None:
    names = sorted(UPLOADS)
    files = [("file", (f"{name}.img", UPLOADS[name][0], UPLOADS[name][1])) for name in names]
    response = client.post("/v1/classify", params={"probabilities": True}, files=files)
    assert response.status_code == 200, response.text
    expected = np.stack([in_process(reference, UPLOADS[name][0]) for name in names])
    np.testing.assert_allclose(probabilities_of(response.json()), expected, atol=1e-5)


def test_response_shape_top_k_and_probabilities(
    client: TestClient, reference: ModelSession
) -> None:
    data, media_type = UPLOADS["jpeg"]
    body = client.post("/v1/classify", content=data, headers={"content-type": media_type}).json()
    labels = list(reference.labels)
    assert body["model"] == {"name": reference.metadata.name, "version": reference.metadata.version}
    (prediction,) = body["predictions"]
    assert "probabilities" not in prediction
    top = prediction["top"]
    assert len(top) == 5
    assert [entry["probability"] for entry in top] == sorted(
        (entry["probability"] for entry in top), reverse=True
    )
    assert all(labels[entry["index"]] == entry["label"] for entry in top)
    expected = in_process(reference, data)
    assert top[0]["index"] == int(expected.argmax())

    full = client.post(
        "/v1/classify?top_k=100&probabilities=true",
        content=data,
        headers={"content-type": media_type},
    ).json()["predictions"][0]
    assert len(full["top"]) == len(labels)
    assert len(full["probabilities"]) == len(labels)
    assert abs(sum(full["probabilities"]) - 1) < 1e-5


def test_exif_rotated_photo_gets_the_upright_answer(client: TestClient) -> None:
    upright = asymmetric((160, 120))
    answers = []
    for orientation in (1, 6, 3, 8):
        response = client.post(
            "/v1/classify?probabilities=true",
            content=with_orientation(upright, orientation),
            headers={"content-type": "image/png"},
        )
        answers.append(probabilities_of(response.json())[0])
    for answer in answers[1:]:
        np.testing.assert_allclose(answer, answers[0], atol=1e-6)


def test_models_describes_the_served_file(client: TestClient, served_model: Path) -> None:
    (model,) = client.get("/v1/models").json()["models"]
    assert model["sha256"] == hashlib.sha256(served_model.read_bytes()).hexdigest()
    assert model["providers"] == [CPU]
    engine = model["runtime"]["engine"]
    assert model["provider"] == {"onnxruntime": CPU, "openvino": "OpenVINO-CPU"}[engine]
    # Both engines are measured at load under VIT_ENGINE=auto, and the choice says so.
    assert model["engine_choice"].startswith(f"auto: {engine} is the faster that passed")
    assert "onnxruntime fp32:" in model["engine_choice"]
    assert "openvino fp32:" in model["engine_choice"]
    assert model["runtime"]["precision"] == "fp32"
    assert model["precision_choice"]
    assert model["input_size"] == model["preprocessing"]["input_size"]
    assert len(model["labels"]) == 8 and model["output"] == "logits"


def error_of(response: Any) -> tuple[int, str]:
    """Status and error type of a TestClient response (httpx's or httpx2's, whichever the
    installed Starlette uses)."""
    body = response.json()
    assert set(body) == {"error", "type"} and body["error"]
    return response.status_code, body["type"]


def png(size: tuple[int, int] = (32, 32)) -> bytes:
    return encode(Image.new("RGB", size, (10, 200, 30)))


def test_empty_body_is_400(client: TestClient) -> None:
    assert error_of(
        client.post("/v1/classify", content=b"", headers={"content-type": "image/png"})
    ) == (400, "empty_body")


def test_body_over_the_limit_is_413_declared_or_chunked(client: TestClient) -> None:
    big = b"\0" * 2_000_001
    assert error_of(
        client.post("/v1/classify", content=big, headers={"content-type": "image/png"})
    ) == (413, "payload_too_large")

    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"\0" * 100_000

    response = client.post("/v1/classify", content=chunks(), headers={"content-type": "image/png"})
    assert "content-length" not in response.request.headers
    assert error_of(response) == (413, "payload_too_large")


def test_wrong_content_type_is_415(client: TestClient) -> None:
    response = client.post(
        "/v1/classify", content=b"{}", headers={"content-type": "application/json"}
    )
    assert error_of(response) == (415, "unsupported_media_type")


def test_unsupported_image_format_is_415(client: TestClient) -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    response = client.post("/v1/classify", content=eps, headers={"content-type": "image/png"})
    assert error_of(response) == (415, "unsupported_image_format")


def test_corrupt_image_is_422(client: TestClient) -> None:
    data = encode(asymmetric((200, 200)), "JPEG")
    response = client.post(
        "/v1/classify", content=data[:300], headers={"content-type": "image/jpeg"}
    )
    assert error_of(response) == (422, "undecodable_image")


def test_too_many_pixels_is_422(client: TestClient) -> None:
    response = client.post(
        "/v1/classify", content=png((1001, 1000)), headers={"content-type": "image/png"}
    )
    assert error_of(response) == (422, "too_many_pixels")


def test_multipart_without_the_file_field_is_400(client: TestClient) -> None:
    response = client.post("/v1/classify", files=[("image", ("a.png", png(), "image/png"))])
    assert error_of(response) == (400, "invalid_request")


def test_too_many_files_is_413_saying_the_limit(client: TestClient) -> None:
    files = [("file", (f"{i}.png", png(), "image/png")) for i in range(9)]
    response = client.post("/v1/classify", files=files)
    assert error_of(response) == (413, "too_many_images")
    assert "at most 8 images in one request" in response.json()["error"]


@pytest.mark.parametrize("top_k", ["0", "-3", "many"])
def test_bad_top_k_is_400(client: TestClient, top_k: str) -> None:
    response = client.post(
        f"/v1/classify?top_k={top_k}", content=png(), headers={"content-type": "image/png"}
    )
    assert error_of(response) == (400, "invalid_request")


def test_unknown_route_has_the_error_body(client: TestClient) -> None:
    assert error_of(client.get("/v1/nothing")) == (404, "not_found")


def test_errors_leave_the_service_ready(client: TestClient) -> None:
    client.post("/v1/classify", content=b"garbage", headers={"content-type": "image/png"})
    assert client.get("/v2/health/ready").status_code == 200
    response = client.post("/v1/classify", content=png(), headers={"content-type": "image/png"})
    assert response.status_code == 200


def test_every_status_is_documented_in_openapi(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    classify = schema["paths"]["/v1/classify"]["post"]
    assert {"200", "400", "413", "415", "422", "503"} <= set(classify["responses"])
    assert {"multipart/form-data", "image/*"} <= set(classify["requestBody"]["content"])
    assert client.get("/docs").status_code == 200


def test_a_post_with_nothing_at_all_is_400_empty_body(client: TestClient) -> None:
    assert error_of(client.post("/v1/classify")) == (400, "empty_body")
    assert error_of(client.post("/v1/classify", content=b"x")) == (415, "unsupported_media_type")


@pytest.mark.parametrize("path", ["/classify", "/health", "/v1/classify/"])
def test_unknown_routes_point_to_the_real_ones(client: TestClient, path: str) -> None:
    response = client.post(path)
    assert error_of(response) == (404, "not_found")
    message = response.json()["error"]
    assert f"no route POST {path}" in message and "POST /v1/classify" in message
    assert "/docs" in message
    if path.endswith("/"):
        assert "did you mean /v1/classify?" in message


def test_a_wrong_method_says_which_one_to_use(client: TestClient) -> None:
    response = client.get("/v1/classify")
    assert error_of(response) == (405, "method_not_allowed")
    assert response.json()["error"] == "GET is not allowed on /v1/classify; use POST"
    assert response.headers["allow"] == "POST"


def test_each_file_of_several_has_its_own_outcome_and_name(
    client: TestClient, reference: ModelSession
) -> None:
    good = encode(asymmetric((80, 60)), "JPEG")
    files = [
        ("file", ("first.jpg", good, "image/jpeg")),
        ("file", ("broken.png", b"\x89PNG\r\n\x1a\n truncated", "image/png")),
        ("file", ("notes.txt", b"plain words", "text/plain")),
        ("file", ("last.png", png(), "image/png")),
    ]
    before = client.get("/metrics").text
    response = client.post("/v1/classify?top_k=1", files=files)
    assert response.status_code == 200, response.text
    first, broken, notes, last = response.json()["predictions"]
    assert [p["file"] for p in (first, broken, notes, last)] == [
        "first.jpg",
        "broken.png",
        "notes.txt",
        "last.png",
    ]
    assert broken == {"file": "broken.png", "error": broken["error"]}
    assert broken["error"]["type"] == "undecodable_image"
    assert notes["error"]["type"] == "unsupported_image_format"
    for answer, data in ((first, good), (last, png())):
        expected = in_process(reference, data)
        assert answer["top"][0]["index"] == int(expected.argmax())
        assert abs(answer["top"][0]["probability"] - float(expected.max())) < 1e-5
        assert "error" not in answer
    after = client.get("/metrics").text
    for reason in ("undecodable_image", "unsupported_image_format"):
        assert _counter(after, reason) == _counter(before, reason) + 1


def _counter(metrics: str, reason: str) -> float:
    prefix = f'vit_rejections_total{{reason="{reason}"}} '
    lines = metrics.splitlines()
    return sum(float(line[len(prefix) :]) for line in lines if line.startswith(prefix))


def test_a_single_bad_file_keeps_its_status(client: TestClient) -> None:
    files = {"file": ("broken.png", b"\x89PNG\r\n\x1a\n truncated", "image/png")}
    assert error_of(client.post("/v1/classify", files=files)) == (422, "undecodable_image")


VIT_CONFIG = {"image_size": 32, "patch_size": 16, "width": 4, "depth": 1, "mlp_ratio": 2.0}


def test_a_versions_bad_metadata_never_breaks_the_listing_of_the_others(tmp_path: Path) -> None:
    """Refused at load where it could break something (the index says why); served where it is
    harmless, a config that describes no runnable ViT reported without a cost."""
    repo = tmp_path / "repo"
    for name, version, config in [
        ("colours", 1, VIT_CONFIG),
        ("colours", 2, VIT_CONFIG),
        ("zero-patch", 1, {**VIT_CONFIG, "patch_size": 0}),
        ("huge-ratio", 1, {**VIT_CONFIG, "mlp_ratio": 1e308}),
    ]:
        (repo / name / str(version)).mkdir(parents=True)
        metadata = metadata_for(COLOURS, 32, dataset={"config": config})
        classifier(repo / name / str(version) / "model.onnx", metadata=metadata)
    restamped(repo / "colours" / "2" / "model.onnx", dataset=json.dumps(nested(300)))
    settings = cpu_settings(repo, admin_token=TOKEN, model_control="explicit")
    with ready_client(settings) as client:
        response = client.get("/v1/models")
        index = client.post("/v2/repository/index", headers={"authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    costs = {(m["name"], m["version"]): m["cost"] for m in response.json()["models"]}
    assert set(costs) == {("colours", "1"), ("zero-patch", "1"), ("huge-ratio", "1")}
    assert costs[("colours", "1")]["tokens"] == 5
    assert costs[("zero-patch", "1")] is None and costs[("huge-ratio", "1")] is None
    (refused,) = [e for e in index.json() if (e["name"], e["version"]) == ("colours", "2")]
    assert refused["state"] == "UNAVAILABLE"
    assert "dataset: Value error, more than 8 levels of nesting" in refused["reason"]


def test_a_version_that_cannot_be_described_is_left_out_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = tmp_path / "repo"
    add_version(repo, "colours", 1)
    add_version(repo, "other", 1)
    with ready_client(cpu_settings(repo)) as client:
        (other,) = [
            p
            for p in client.app_state["data_plane"].registry.pipelines()
            if p.session.metadata.name == "other"
        ]
        # Metadata that load now refuses, set past validation: the listing's last line of
        # defence, should some metadata still fail to serialise.
        other.session.metadata = other.session.metadata.model_copy(update={"dataset": nested(300)})
        for _ in range(2):
            response = client.get("/v1/models")
            assert response.status_code == 200, response.text
            assert [m["name"] for m in response.json()["models"]] == ["colours"]
        assert client.get("/v1/models/other").json() == {"models": [], "not_loaded": []}
        assert client.get("/v1/models/colours").json()["models"][0]["name"] == "colours"
    logged = [r for r in caplog.records if "cannot be described" in r.getMessage()]
    assert len(logged) == 1 and "model other version 1" in logged[0].getMessage()
