"""Open Inference Protocol v2: health, metadata, FP32 and BYTES inference, JSON and binary."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from model_contract.preprocess import preprocess
from model_runtime.options import IN_PROCESS
from model_runtime.session import ModelSession
from tests.images import upload_variety
from tests.service_support import cpu_settings, ready_client

UPLOADS = upload_variety()


@pytest.fixture(scope="module")
def client(served_model: Path) -> Iterator[TestClient]:
    with ready_client(cpu_settings(served_model, max_images_per_request=8)) as client:
        yield client


@pytest.fixture(scope="module")
def reference(served_model: Path) -> ModelSession:
    return ModelSession(served_model, IN_PROCESS)


@pytest.fixture(scope="module")
def served_engine(client: TestClient, served_model: Path) -> ModelSession:
    """The model in-process on the engine the server chose at load for batches
    (VIT_ENGINE=auto): each engine's numbers for an image are the same whatever its batch."""
    (model,) = client.get("/v1/models").json()["models"]
    engine = model["runtime"]["engine"]
    return ModelSession(served_model, IN_PROCESS.model_copy(update={"engine": engine}))


def infer_url(reference: ModelSession) -> str:
    return f"/v2/models/{reference.metadata.name}/infer"


def pixels(reference: ModelSession, count: int) -> np.ndarray:
    spec = reference.metadata.preprocessing
    images = [UPLOADS[name][0] for name in sorted(UPLOADS)[:count]]
    return np.concatenate([preprocess(data, spec) for data in images])


def binary_request(header: dict[str, Any], payload: bytes) -> tuple[bytes, dict[str, str]]:
    encoded = json.dumps(header).encode()
    return encoded + payload, {
        "Inference-Header-Content-Length": str(len(encoded)),
        "content-type": "application/octet-stream",
    }


def binary_output(response: Any) -> tuple[dict[str, Any], np.ndarray]:
    length = int(response.headers["inference-header-content-length"])
    header = json.loads(response.content[:length])
    (output,) = header["outputs"]
    data = np.frombuffer(response.content[length:], dtype="<f4").reshape(output["shape"])
    assert output["parameters"]["binary_data_size"] == data.nbytes
    return header, data


def test_server_and_health(client: TestClient) -> None:
    assert client.get("/v2").json()["extensions"] == ["binary_tensor_data", "model_repository"]
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    # Probes and load balancers that ask with HEAD.
    assert client.head("/v2/health/live").status_code == 200
    assert client.head("/v2/health/ready").status_code == 200


def test_model_metadata_names_inputs_and_outputs(
    client: TestClient, reference: ModelSession
) -> None:
    name = reference.metadata.name
    body = client.get(f"/v2/models/{name}").json()
    size = reference.metadata.preprocessing.input_size
    assert body["name"] == name and body["versions"] == [reference.metadata.version]
    assert {"name": reference.input_name, "datatype": "FP32", "shape": [-1, 3, size, size]} in body[
        "inputs"
    ]
    assert {"name": "image", "datatype": "BYTES", "shape": [-1]} in body["inputs"]
    assert body["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 8]},
        {"name": "attention_rollout", "datatype": "FP32", "shape": [-1, 8, 8]},
        {"name": "ood_score", "datatype": "FP32", "shape": [-1]},
        {"name": "embedding", "datatype": "FP32", "shape": [-1, 192]},
    ]
    assert client.get(f"/v2/models/{name}/ready").json() == {"name": name, "ready": True}
    version = reference.metadata.version
    assert client.get(f"/v2/models/{name}/versions/{version}").status_code == 200


def test_fp32_json_equals_the_session_exactly(
    client: TestClient, reference: ModelSession, served_engine: ModelSession
) -> None:
    batch = pixels(reference, 3)
    request = {
        "id": "r1",
        "inputs": [
            {
                "name": reference.input_name,
                "shape": list(batch.shape),
                "datatype": "FP32",
                "data": batch.ravel().tolist(),
            }
        ],
    }
    response = client.post(infer_url(reference), json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "r1" and body["model_name"] == reference.metadata.name
    (output,) = body["outputs"]
    assert output["name"] == "probabilities" and output["shape"] == [3, 8]
    returned = np.array(output["data"], dtype=np.float32).reshape(3, 8)
    assert np.array_equal(returned, served_engine.predict(batch))


def test_fp32_binary_in_and_out_equals_the_session_exactly(
    client: TestClient, reference: ModelSession, served_engine: ModelSession
) -> None:
    batch = pixels(reference, 2)
    payload = batch.astype("<f4").tobytes()
    header = {
        "inputs": [
            {
                "name": reference.input_name,
                "shape": list(batch.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(payload)},
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }
    content, headers = binary_request(header, payload)
    response = client.post(infer_url(reference), content=content, headers=headers)
    assert response.status_code == 200, response.text
    _, data = binary_output(response)
    assert np.array_equal(data, served_engine.predict(batch))


def test_bytes_binary_input_decodes_and_preprocesses(
    client: TestClient, reference: ModelSession
) -> None:
    names = sorted(UPLOADS)[:4]
    files = [UPLOADS[name][0] for name in names]
    payload = b"".join(struct.pack("<I", len(f)) + f for f in files)
    header = {
        "inputs": [
            {
                "name": "image",
                "shape": [len(files)],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(payload)},
            }
        ],
        "parameters": {"binary_data_output": True},
    }
    content, headers = binary_request(header, payload)
    response = client.post(infer_url(reference), content=content, headers=headers)
    assert response.status_code == 200, response.text
    _, data = binary_output(response)
    spec = reference.metadata.preprocessing
    expected = np.concatenate([reference.predict(preprocess(f, spec)) for f in files])
    np.testing.assert_allclose(data, expected, atol=1e-5)


def test_bytes_json_input_is_base64(client: TestClient, reference: ModelSession) -> None:
    data = UPLOADS["jpeg"][0]
    request = {
        "inputs": [
            {
                "name": "image",
                "shape": [1],
                "datatype": "BYTES",
                "data": [base64.b64encode(data).decode()],
            }
        ]
    }
    response = client.post(infer_url(reference), json=request)
    assert response.status_code == 200, response.text
    returned = np.array(response.json()["outputs"][0]["data"])
    expected = reference.predict(preprocess(data, reference.metadata.preprocessing))[0]
    np.testing.assert_allclose(returned, expected, atol=1e-5)


def test_an_empty_bytes_element_is_an_empty_body_as_in_v1(
    client: TestClient, reference: ModelSession
) -> None:
    good = base64.b64encode(UPLOADS["jpeg"][0]).decode()
    request = {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": [good, ""]}]}
    response = client.post(infer_url(reference), json=request)
    assert response.status_code == 400, response.text
    assert response.json()["type"] == "empty_body"
    assert "element 2" in response.json()["error"]


def fp32_request(reference: ModelSession, shape: list[int], data: list[Any]) -> dict[str, Any]:
    return {
        "inputs": [{"name": reference.input_name, "shape": shape, "datatype": "FP32", "data": data}]
    }


def test_protocol_errors(client: TestClient, reference: ModelSession) -> None:
    size = reference.metadata.preprocessing.input_size
    url = infer_url(reference)
    full = [1, 3, size, size]
    cases: list[tuple[Any, int]] = [
        (fp32_request(reference, [1, 3, 8, 8], [0.0] * 192), 400),  # wrong shape
        (fp32_request(reference, full, [0.0] * 10), 400),  # wrong length
        (fp32_request(reference, full, ["x"] * (3 * size * size)), 400),  # not numbers
        (
            {
                "inputs": [
                    {
                        "name": reference.input_name,
                        "shape": full,
                        "datatype": "INT64",
                        "data": [0] * (3 * size * size),
                    }
                ]
            },
            400,
        ),  # wrong datatype
        ({"inputs": []}, 400),
        ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]}, 400),
        (
            {
                "inputs": [
                    {
                        "name": "image",
                        "shape": [1],
                        "datatype": "BYTES",
                        "data": [base64.b64encode(b"not an image").decode()],
                    }
                ]
            },
            415,
        ),
        (
            {
                "inputs": [
                    {"name": "image", "shape": [9], "datatype": "BYTES", "data": ["AA=="] * 9}
                ]
            },
            413,  # more than VIT_MAX_IMAGES_PER_REQUEST, as for /v1's files
        ),
        (
            {
                **fp32_request(reference, full, [0.0] * (3 * size * size)),
                "outputs": [{"name": "logits"}],
            },
            400,
        ),  # unknown output
    ]
    for request, status in cases:
        response = client.post(url, json=request)
        assert response.status_code == status, (request.get("inputs"), response.text)
        assert response.json()["error"]
    nan_data = [0.0] * (3 * size * size)
    nan_data[5] = float("nan")
    response = client.post(
        url,
        content=json.dumps(fp32_request(reference, full, nan_data)),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400 and "NaN" in response.json()["error"]
    assert client.post(url, content=b"{not json").status_code == 400
    content, headers = binary_request(fp32_request(reference, full, []), b"\0" * 12)
    assert client.post(url, content=content, headers=headers).status_code == 400


def test_unknown_model_is_404(client: TestClient, reference: ModelSession) -> None:
    assert client.get("/v2/models/nope").status_code == 404
    assert client.post("/v2/models/nope/infer", json={"inputs": []}).status_code == 404
    version_url = f"/v2/models/{reference.metadata.name}/versions/999/infer"
    assert client.post(version_url, json={"inputs": []}).json()["type"] == "model_not_found"


def test_fp32_data_no_image_could_give_is_400(client: TestClient, reference: ModelSession) -> None:
    size = reference.metadata.preprocessing.input_size
    count = 3 * size * size
    url = infer_url(reference)
    edge = np.zeros(count, np.float32)  # mean 0.5, std 0.5: every channel spans -1..1
    edge[:2] = (-1.0, 1.0)
    assert client.post(
        url, json=fp32_request(reference, [1, 3, size, size], edge.tolist())
    ).is_success
    for value in (3e38, -3e38, 1.05, -1.05):
        data = np.zeros(count, np.float32)
        data[count // 2] = value
        response = client.post(url, json=fp32_request(reference, [1, 3, size, size], data.tolist()))
        assert response.status_code == 400, value
        assert "outside what the model's preprocessing can give" in response.json()["error"]
    assert client.get("/v2/health/ready").status_code == 200


@pytest.mark.parametrize(
    ("element", "why"),
    [(10**400, "an integer beyond any float"), ("0.5", "a string"), (True, "a boolean")],
)
def test_fp32_data_must_be_json_numbers(
    client: TestClient, reference: ModelSession, element: object, why: str
) -> None:
    size = reference.metadata.preprocessing.input_size
    data: list[object] = [0.0] * (3 * size * size)
    data[5] = element
    body = json.dumps(fp32_request(reference, [1, 3, size, size], data))
    response = client.post(
        infer_url(reference), content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, why
    assert response.json()["type"] == "invalid_request"


def test_binary_data_output_must_be_a_boolean(client: TestClient, reference: ModelSession) -> None:
    request = {
        "parameters": {"binary_data_output": "false"},
        "inputs": [
            {
                "name": "image",
                "shape": [1],
                "datatype": "BYTES",
                "data": [base64.b64encode(UPLOADS["jpeg"][0]).decode()],
            }
        ],
    }
    response = client.post(infer_url(reference), json=request)
    assert response.status_code == 400
    assert "binary_data_output must be true or false" in response.json()["error"]


def test_millions_of_bytes_elements_are_refused_at_the_declared_count(
    client: TestClient, reference: ModelSession
) -> None:
    payload = b"\0\0\0\0" * 4_000_000  # 4 M empty elements, 16 MB
    tensor = {"name": "image", "shape": [2], "datatype": "BYTES"}
    header = {"inputs": [{**tensor, "parameters": {"binary_data_size": len(payload)}}]}
    body, headers = binary_request(header, payload)
    response = client.post(infer_url(reference), content=body, headers=headers)
    assert response.status_code == 400
    assert response.json()["error"].endswith("needs 2 images, got more")
