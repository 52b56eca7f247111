"""Over HTTP: a full queue gives 503 with Retry-After, an expired deadline 504; health stays up."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import Message

from model_runtime.session import ModelSession, Outputs
from tests.images import upload_variety
from tests.service_support import cpu_settings, ready_client

JPEG = upload_variety()["jpeg"][0]
SessionCall = Callable[[ModelSession, np.ndarray], Outputs]


class Gate:
    """Holds every inference call (after the warm-up) until opened; records batch sizes."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.open.set()
        self.batch_sizes: list[int] = []


@pytest.fixture()
def gate(monkeypatch: pytest.MonkeyPatch) -> Gate:
    gate = Gate()
    for name in ("infer", "infer_alone"):  # lone images take the second path
        original = getattr(ModelSession, name)

        def gated(
            self: ModelSession, batch: np.ndarray, original: SessionCall = original
        ) -> Outputs:
            gate.open.wait(timeout=30)
            gate.batch_sizes.append(len(batch))
            return original(self, batch)

        monkeypatch.setattr(ModelSession, name, gated)
    return gate


@pytest.fixture()
def client(served_model: Path, gate: Gate) -> Iterator[TestClient]:
    # One call at a time, so one held request is enough to make the next one wait.
    settings = cpu_settings(served_model, max_queue=2, max_batch_size=1, inference_workers=1)
    with ready_client(settings) as client:
        yield client


def classify(client: TestClient, **headers: str) -> tuple[int, dict[str, str], dict[str, str]]:
    response = client.post(
        "/v1/classify", content=JPEG, headers={"content-type": "image/jpeg", **headers}
    )
    return response.status_code, dict(response.headers), response.json()


def wait_for_depth(client: TestClient, depth: int) -> None:
    deadline = time.monotonic() + 10
    series = f'vit_queue_depth_images{{model="shapes-vit",version="1"}} {depth}.0'
    while series not in client.get("/metrics").text:
        assert time.monotonic() < deadline, "the queue never reached the expected depth"
        time.sleep(0.01)


def metric_value(client: TestClient, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return sample.value
    return 0.0


def decoded_images(client: TestClient) -> float:
    return metric_value(client, "vit_stage_duration_seconds_count", stage="decode_preprocess")


def refusals(client: TestClient, route: str) -> tuple[float, float]:
    """(requests answered 503 on `route`, rejections counted as overloaded)."""
    return (
        metric_value(client, "vit_requests_total", route=route, code="503"),
        metric_value(client, "vit_rejections_total", reason="overloaded"),
    )


def test_full_queue_is_503_with_retry_after_and_health_keeps_answering(
    client: TestClient, gate: Gate
) -> None:
    gate.open.clear()
    with ThreadPoolExecutor(2) as pool:
        held = [pool.submit(classify, client) for _ in range(2)]
        wait_for_depth(client, 2)
        decoded_before = decoded_images(client)
        refused_before = refusals(client, "/v1/classify")
        status, headers, body = classify(client)
        assert status == 503 and body["type"] == "overloaded"
        # Refused at admission: its upload was never decoded, and it is counted on its route.
        assert decoded_images(client) == decoded_before
        assert refusals(client, "/v1/classify") == tuple(n + 1 for n in refused_before)
        assert int(headers["retry-after"]) >= 1
        # Refused ahead of routing (service/http/admission.py): not even its headers are validated.
        assert classify(client, **{"X-Request-Timeout-Ms": "soon"})[2]["type"] == "overloaded"
        oip_before = refusals(client, "/v2/models/{name}/infer")
        name = client.get("/v1/models").json()["models"][0]["name"]
        oip = client.post(f"/v2/models/{name}/infer", json={"inputs": []})
        assert oip.status_code == 503 and oip.json()["type"] == "overloaded"
        assert "retry-after" in oip.headers
        assert refusals(client, "/v2/models/{name}/infer") == tuple(n + 1 for n in oip_before)
        assert decoded_images(client) == decoded_before
        assert client.get("/v2/health/ready").status_code == 200
        assert client.get("/v2/health/live").status_code == 200
        assert "vit_rejections_total" in client.get("/metrics").text
        gate.open.set()
        assert [future.result()[0] for future in held] == [200, 200]
    assert classify(client)[0] == 200


def test_expired_deadline_is_504_and_never_reaches_the_model(
    client: TestClient, gate: Gate
) -> None:
    gate.open.clear()
    calls_before = len(gate.batch_sizes)
    with ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(classify, client)
        wait_for_depth(client, 1)
        status, _, body = classify(client, **{"X-Request-Timeout-Ms": "100"})
        assert status == 504 and body["type"] == "deadline_exceeded"
        gate.open.set()
        assert blocker.result()[0] == 200
    assert gate.batch_sizes[calls_before:] == [1]  # only the blocker ran


def test_bad_timeout_header_is_400(client: TestClient) -> None:
    status, _, body = classify(client, **{"X-Request-Timeout-Ms": "soon"})
    assert status == 400 and body["type"] == "invalid_request"


def test_every_image_of_an_admitted_request_holds_a_place_until_it_has_left(
    served_model: Path, gate: Gate
) -> None:
    """Three images of one request, held in inference, leave one place of four: a request of
    two is refused once its body is read, a request of one is served."""
    settings = cpu_settings(served_model, max_queue=4, max_batch_size=4, inference_workers=1)
    files = [("file", (f"{i}.jpg", JPEG, "image/jpeg")) for i in range(3)]
    with ready_client(settings) as client, ThreadPoolExecutor(2) as pool:
        gate.open.clear()
        held = pool.submit(client.post, "/v1/classify", files=files)
        deadline = time.monotonic() + 10
        while metric_value(client, "vit_images_in_flight") != 3:
            assert time.monotonic() < deadline, "the three images never held their places"
            time.sleep(0.01)
        two = client.post("/v1/classify", files=files[:2])
        assert two.status_code == 503 and two.json()["type"] == "overloaded"
        assert int(two.headers["retry-after"]) >= 1
        one = pool.submit(classify, client)
        gate.open.set()
        assert held.result().status_code == 200 and one.result()[0] == 200
        assert metric_value(client, "vit_images_in_flight") == 0


def test_bodies_over_the_in_flight_budget_are_503_and_multipart_never_touches_disk(
    served_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_disk(self: object) -> None:
        raise AssertionError("a multipart file was spooled to disk")

    monkeypatch.setattr("tempfile.SpooledTemporaryFile.rollover", no_disk)
    settings = cpu_settings(served_model, max_body_bytes_in_flight=3 * 1024 * 1024)
    big = JPEG + b"\0" * (2 * 1024 * 1024)  # trailing bytes after a JPEG's end are ignored
    with ready_client(settings) as client:
        declared = client.post(
            "/v1/classify", content=big * 2, headers={"content-type": "image/jpeg"}
        )
        assert declared.status_code == 503 and declared.json()["type"] == "overloaded"
        assert "retry-after" in declared.headers
        raw = client.post("/v1/classify", content=big, headers={"content-type": "image/jpeg"})
        assert raw.status_code == 200
        # The multipart body and the file parsed from it count twice: over 3 MiB.
        form = client.post("/v1/classify", files=[("file", ("big.jpg", big, "image/jpeg"))])
        assert form.status_code == 503 and form.json()["type"] == "overloaded"
        small = JPEG + b"\0" * (1024 * 1024)
        form = client.post("/v1/classify", files=[("file", ("small.jpg", small, "image/jpeg"))])
        assert form.status_code == 200
        assert metric_value(client, "vit_body_in_flight_bytes") == 0


def test_an_oip_json_body_holds_what_parsing_it_takes_whatever_its_headers_say(
    served_model: Path,
) -> None:
    settings = cpu_settings(served_model, max_body_bytes_in_flight=3 * 1024 * 1024)
    with ready_client(settings) as client:
        metadata = client.get("/v2/models/shapes-vit").json()
        tensor = metadata["inputs"][0]  # the pixels (the other takes encoded images)
        shape = [4, *tensor["shape"][1:]]
        request = {
            "inputs": [
                {
                    "name": tensor["name"],
                    "shape": shape,
                    "datatype": "FP32",
                    "data": [0.0] * int(np.prod(shape)),
                }
            ]
        }
        body = json.dumps(request).encode()
        assert 512 * 1024 < len(body) < 1024 * 1024  # 5 times it is over the 3 MiB budget
        for headers in ({}, {"inference-header-content-length": str(len(body))}):
            answer = client.post(
                "/v2/models/shapes-vit/infer",
                content=body,
                headers={"content-type": "application/json", **headers},
            )
            assert answer.status_code == 503 and answer.json()["type"] == "overloaded", headers
        assert metric_value(client, "vit_body_in_flight_bytes") == 0


def test_a_client_that_never_reads_its_answer_holds_no_place_once_it_starts(
    served_model: Path,
) -> None:
    """The work is done once the answer starts: a client too slow to read it (or that never
    does) must not keep the request's places from others."""
    with ready_client(cpu_settings(served_model)) as client:
        assert client.portal is not None
        budget = client.app_state["data_plane"].registry.get().budget
        answer_started = threading.Event()

        async def never_read() -> tuple[int, int]:
            messages = [{"type": "http.request", "body": JPEG, "more_body": False}]
            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": "/v1/classify",
                "raw_path": b"/v1/classify",
                "query_string": b"",
                "root_path": "",
                "headers": [(b"content-type", b"image/jpeg")],
                "client": ("127.0.0.1", 1),
                "server": ("127.0.0.1", 80),
                "state": dict(client.app_state),
            }
            never = asyncio.Event()
            held: list[tuple[int, int]] = []

            async def receive() -> Message:
                if messages:
                    return messages.pop()
                await never.wait()
                return {"type": "http.disconnect"}

            async def send(message: Message) -> None:
                if message["type"] == "http.response.body":
                    held.append((budget.images, budget.body_bytes))
                    answer_started.set()
                    await never.wait()  # the transport's buffers are full: the write waits

            task = asyncio.ensure_future(client.app(scope, receive, send))
            while not held:
                await asyncio.sleep(0.01)
            task.cancel()
            return held[0]

        assert client.portal.call(never_read) == (0, 0)
        assert answer_started.is_set()
