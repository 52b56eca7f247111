"""A real uvicorn on 127.0.0.1: curl, vit-predict, a standard OIP client, and readiness."""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from harness.servers import free_port, running_server, served
from model_contract.metadata import InvalidModelMetadata
from model_contract.preprocess import preprocess
from model_export import shapes
from model_runtime.options import IN_PROCESS
from model_runtime.session import CudaUnavailable, ModelSession
from service.app import create_app
from service.inference.pipeline import Pipeline
from tests.conftest import ROOT
from tests.images import upload_variety
from tests.service_support import cpu_settings, ready_client, wait_ready

UPLOADS = upload_variety()


@pytest.fixture(scope="module")
def server(served_model: Path) -> Iterator[str]:
    with running_server(served_model, ROOT) as url:
        yield url


SAME_NUMBERS = 1e-6
"""The largest probability difference between the engines' float32 roundings (1.2e-7 on the
bundled model) with a margin; a swapped or mixed-up answer differs by far more."""


@pytest.fixture(scope="module")
def reference(served_model: Path, server: str) -> ModelSession:
    """The model in-process on the engine the server chose at load for its batches
    (VIT_ENGINE=auto); a lone image may run on the other, quicker alone, within float32
    rounding (SAME_NUMBERS)."""
    with urllib.request.urlopen(f"{server}/v1/models", timeout=10) as response:
        (model,) = json.load(response)["models"]
    engine = model["runtime"]["engine"]
    return ModelSession(served_model, IN_PROCESS.model_copy(update={"engine": engine}))


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
        [sys.executable, "-m", "vit_tools.client", str(tmp_path), "--url", server],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2  # the folder's image files only
    for line, name in zip(lines, ("jpeg", "webp"), strict=True):
        expected = reference.predict(
            preprocess(UPLOADS[name][0], reference.metadata.preprocessing)
        )[0]
        assert line.startswith(str(tmp_path / f"{name}.{name}"))
        assert reference.labels[int(expected.argmax())] in line
    named = subprocess.run(
        [sys.executable, "-m", "vit_tools.client", str(tmp_path / "notes.txt"), "--url", server],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert named.returncode == 1 and "Traceback" not in named.stderr
    assert named.stdout.startswith(f"{tmp_path / 'notes.txt'}\terror (unsupported_image_format):")


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
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), reference.predict(batch), atol=SAME_NUMBERS
    )

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
    original = Pipeline.start

    async def gated_start(self: Pipeline) -> None:
        while not gate.is_set():
            await asyncio.sleep(0.01)
        await original(self)

    monkeypatch.setattr(Pipeline, "start", gated_start)
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


def test_concurrent_requests_each_get_exactly_their_own_result(
    server: str, reference: ModelSession
) -> None:
    spec = reference.metadata.preprocessing
    images = [shapes.sample(777, i).data for i in range(48)]
    expected = [reference.predict(preprocess(data, spec))[0] for data in images]

    def post(data: bytes) -> list[float]:
        request = urllib.request.Request(
            f"{server}/v1/classify?probabilities=true",
            data=data,
            headers={"Content-Type": "image/jpeg"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer: list[float] = json.load(response)["predictions"][0]["probabilities"]
            return answer

    before = batch_histogram(server)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(post, images))
    for index, answer in enumerate(answers):
        # Its own numbers, and nearer them than any other image's: no answer was swapped.
        distances = [np.abs(np.array(answer) - other).max() for other in expected]
        assert min(distances) == distances[index] <= SAME_NUMBERS
    after = batch_histogram(server)
    batches = after["count"] - before["count"]
    single = after["le=1.0"] - before["le=1.0"]
    assert after["sum"] - before["sum"] == len(images)
    assert batches - single > 0, "no call carried more than one image"


def batch_histogram(server: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{server}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "vit_batch_size_images_bucket" and sample.labels["le"] == "1.0":
                values["le=1.0"] = sample.value
            elif sample.name == "vit_batch_size_images_count":
                values["count"] = sample.value
            elif sample.name == "vit_batch_size_images_sum":
                values["sum"] = sample.value
    return values


def requests_in_flight(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    (family,) = [
        f for f in text_string_to_metric_families(text) if f.name == "vit_requests_in_flight"
    ]
    return family.samples[0].value - 1  # not counting this scrape


def ready_status(url: str) -> int | None:
    """/v2/health/ready's status, or None once the server refuses connections."""
    try:
        return httpx.get(f"{url}/v2/health/ready", timeout=5).status_code
    except httpx.TransportError:
        return None


def test_sigterm_lets_in_flight_requests_finish_then_exits(served_model: Path) -> None:
    files = [("file", (f"{i}.img", shapes.sample(99, i).data)) for i in range(24)]
    requests = 6

    with served(served_model, ROOT, graceful_shutdown_s="20") as server:

        def post() -> int:
            return httpx.post(f"{server.url}/v1/classify", files=files, timeout=60).status_code

        with ThreadPoolExecutor(requests) as pool:
            answers = [pool.submit(post) for _ in range(requests)]
            deadline = time.monotonic() + 20
            while requests_in_flight(server.url) < requests:
                assert time.monotonic() < deadline, "the requests never were in flight together"
            server.process.send_signal(signal.SIGTERM)
            # Readiness turns false first: from the signal on, it never says 200 again, while
            # the requests in flight still complete.
            readiness = [ready_status(server.url) for _ in range(20)]
            statuses = [answer.result() for answer in answers]
            exit_code = server.process.wait(timeout=25)
        log = server.output()

    assert statuses == [200] * requests
    assert 200 not in readiness, readiness
    # uvicorn drains, runs the lifespan shutdown, then re-raises SIGTERM.
    assert exit_code in (0, -signal.SIGTERM)
    assert log.index("Shutting down") < log.index("Application shutdown complete")
    # The signal found the requests' connections open, and uvicorn waited for them.
    assert "Waiting for connections to close" in log
    assert "Finished server process" in log


def test_an_over_limit_chunked_body_is_refused_long_before_it_ends(served_model: Path) -> None:
    """The byte limit is enforced while the body streams: the 413 arrives while the client is
    still sending, so the server never holds more than about the limit."""
    limit = 256 * 1024
    chunk = bytes(64 * 1024)
    with served(served_model, ROOT, max_body_bytes=str(limit)) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            connection.sendall(
                b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            sent, answer = 0, b""
            while sent < 64 * limit and not answer:
                try:
                    connection.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += len(chunk)
                if select.select([connection], [], [], 0)[0]:
                    answer = connection.recv(4096)
            answer = answer or connection.recv(4096)
            if b"\r\n\r\n" in answer and answer.endswith(b"\r\n\r\n"):  # the body came apart
                answer += connection.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"type":"payload_too_large"' in answer
    assert sent < 32 * limit, f"the server answered only after {sent} bytes"


@pytest.mark.parametrize("access_log", ["false", "true"])
def test_access_log_only_when_asked(served_model: Path, access_log: str) -> None:
    with served(served_model, ROOT, access_log=access_log) as server:
        upload = UPLOADS["jpeg-640x480"][0]
        answer = httpx.post(
            f"{server.url}/v1/classify", content=upload, headers={"content-type": "image/jpeg"}
        )
        assert answer.status_code == 200
        time.sleep(0.2)  # let the log line reach the file
        logged = '"POST /v1/classify HTTP/1.1" 200' in server.output()
    assert logged == (access_log == "true")


def vit_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("VIT_MAX_QUEUE", "abc", "VIT_MAX_QUEUE='abc': Input should be a valid integer"),
        ("VIT_MODEL_CONTROL", "sometimes", "VIT_MODEL_CONTROL='sometimes': Input should be"),
        ("VIT_INTRA_OP_SPINNING", "maybe", "VIT_INTRA_OP_SPINNING='maybe'"),
        ("VIT_PROVIDERS", "CPU", "lists are JSON"),
    ],
)
def test_a_wrong_setting_is_one_line_naming_it(variable: str, value: str, says: str) -> None:
    result = vit_serve("--port", "1", env={variable: value})
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith("vit-serve: ") and says in result.stderr, result.stderr


def test_a_port_in_use_is_one_line_before_any_model_loads(served_model: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = vit_serve("--model", str(served_model), "--port", str(port))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"vit-serve: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "startup" not in result.stderr  # refused before the app started


def test_a_model_that_fails_at_startup_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "repo" / "broken" / "1").mkdir(parents=True)
    (tmp_path / "repo" / "broken" / "1" / "model.onnx").write_text("not a model")
    (tmp_path / "empty").mkdir()
    for folder, says in [
        (tmp_path / "repo", "broken version 1 ("),
        (tmp_path / "empty", "no model under"),
    ]:
        port = free_port()
        result = vit_serve("--model", str(folder), "--port", str(port))
        assert result.returncode != 0
        assert "Traceback" not in result.stderr, result.stderr
        assert f"vit-serve: cannot start: {says}" in result.stderr, result.stderr
