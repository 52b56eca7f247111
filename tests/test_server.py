"""A real uvicorn on 127.0.0.1: curl, vit-predict, a standard OIP client, and readiness."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.model_metadata import InvalidModelMetadata
from service.pipeline import Pipeline
from service.preprocess import preprocess
from service.session import CPU, CudaUnavailable, ModelSession
from tests.conftest import ROOT
from tests.images import upload_variety
from tests.service_support import cpu_settings, ready_client, running_server, wait_ready

UPLOADS = upload_variety()


@pytest.fixture(scope="module")
def server(served_model: Path) -> Iterator[str]:
    with running_server(served_model, ROOT) as url:
        yield url


@pytest.fixture(scope="module")
def reference(served_model: Path) -> ModelSession:
    return ModelSession(served_model, providers=(CPU,))


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_multipart_upload(server: str, tmp_path: Path, reference: ModelSession) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(UPLOADS["jpeg-640x480"][0])
    result = subprocess.run(
        ["curl", "-sS", "-F", f"file=@{photo}", f"{server}/v1/classify"],
        capture_output=True,
        text=True,
        check=True,
    )
    body = json.loads(result.stdout)
    expected = reference.predict(preprocess(photo.read_bytes(), reference.metadata.preprocessing))[
        0
    ]
    top = body["predictions"][0]["top"]
    assert top[0]["index"] == int(expected.argmax())
    assert abs(top[0]["probability"] - float(expected.max())) < 1e-5
    assert body["model"]["name"] == reference.metadata.name


def test_vit_predict_prints_each_file(server: str, tmp_path: Path, reference: ModelSession) -> None:
    for name in ("jpeg", "webp"):
        (tmp_path / f"{name}.{name}").write_bytes(UPLOADS[name][0])
    (tmp_path / "notes.txt").write_text("not an image")
    result = subprocess.run(
        [sys.executable, "-m", "service.client", str(tmp_path), "--url", server],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    for line, name in zip(lines, ("jpeg", "webp"), strict=True):
        expected = reference.predict(
            preprocess(UPLOADS[name][0], reference.metadata.preprocessing)
        )[0]
        assert line.startswith(str(tmp_path / f"{name}.{name}"))
        assert reference.labels[int(expected.argmax())] in line


def test_tritonclient_with_default_settings(server: str, reference: ModelSession) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    client = httpclient.InferenceServerClient(server.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    name = reference.metadata.name
    assert client.is_model_ready(name)
    metadata = client.get_model_metadata(name)
    assert metadata["outputs"][0]["name"] == "probabilities"

    spec = reference.metadata.preprocessing
    batch = np.concatenate([preprocess(UPLOADS[n][0], spec) for n in ("jpeg", "webp")])
    pixels = httpclient.InferInput(reference.input_name, list(batch.shape), "FP32")
    pixels.set_data_from_numpy(batch)
    result = client.infer(name, [pixels])
    assert np.array_equal(result.as_numpy("probabilities"), reference.predict(batch))

    files = np.array([UPLOADS["jpeg"][0], UPLOADS["png-rgba"][0]], dtype=np.object_)
    images = httpclient.InferInput("image", [2], "BYTES")
    images.set_data_from_numpy(files)
    result = client.infer(
        name, [images], outputs=[httpclient.InferRequestedOutput("probabilities")]
    )
    expected = np.concatenate([reference.predict(preprocess(f, spec)) for f in files])
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)


def test_ready_only_after_warm_up(served_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    original = Pipeline.warm_up

    async def gated_warm_up(self: Pipeline) -> None:
        while not gate.is_set():
            await asyncio.sleep(0.01)
        await original(self)

    monkeypatch.setattr(Pipeline, "warm_up", gated_warm_up)
    with TestClient(create_app(cpu_settings(served_model))) as client:
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 503
        response = client.post(
            "/v1/classify", content=UPLOADS["jpeg"][0], headers={"content-type": "image/jpeg"}
        )
        assert response.status_code == 503 and response.json()["type"] == "not_ready"
        gate.set()
        wait_ready(client)
        assert (
            client.post(
                "/v1/classify", content=UPLOADS["jpeg"][0], headers={"content-type": "image/jpeg"}
            ).status_code
            == 200
        )


def test_a_model_without_metadata_fails_startup(tmp_path: Path, served_model: Path) -> None:
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(served_model))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(InvalidModelMetadata, match="lacks"), ready_client(cpu_settings(bare)):
        pass


def test_require_cuda_refuses_a_cpu_only_session(served_model: Path) -> None:
    with (
        pytest.raises(CudaUnavailable),
        ready_client(cpu_settings(served_model, require_cuda=True)),
    ):
        pass
