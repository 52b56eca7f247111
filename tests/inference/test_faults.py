"""Faults: onnxruntime raising or returning NaN gives a counted 500; repeated failures take the
replica out of readiness until inference works again."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from model_contract.outputs import PROBABILITIES
from model_export import shapes
from model_runtime.session import ModelSession, Outputs
from tests.service_support import cpu_settings, ready_client, rejections

FAILURES_UNTIL_UNREADY = 3
IMAGE = shapes.sample(21, 0).data
SessionCall = Callable[[ModelSession, np.ndarray], Outputs]


class Fault:
    """What the next onnxruntime calls do: work, raise, or return NaN."""

    mode = "work"


@pytest.fixture
def client(served_model: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    for name in ("infer", "infer_alone"):  # lone images take the second path
        original = getattr(ModelSession, name)

        def faulty(
            self: ModelSession, batch: np.ndarray, original: SessionCall = original
        ) -> Outputs:
            if Fault.mode == "raise":
                raise RuntimeError("injected onnxruntime failure")
            output = original(self, batch)
            if Fault.mode == "nan":
                output[PROBABILITIES][:, 0] = np.nan
            return output

        monkeypatch.setattr(ModelSession, name, faulty)
    Fault.mode = "work"
    settings = cpu_settings(
        served_model,
        unready_after_failures=FAILURES_UNTIL_UNREADY,
        recovery_probe_interval_s=0.05,
    )
    with ready_client(settings) as test_client:
        yield test_client
    Fault.mode = "work"


def classify(client: TestClient) -> tuple[int, dict[str, object]]:
    response = client.post("/v1/classify", content=IMAGE, headers={"content-type": "image/png"})
    body: dict[str, object] = response.json()
    return response.status_code, body


def test_a_failed_inference_is_a_counted_500_and_the_next_request_works(
    client: TestClient,
) -> None:
    Fault.mode = "raise"
    status, body = classify(client)
    assert status == 500 and body["type"] == "inference_failed"
    assert rejections(client, "inference_failed") == 1
    Fault.mode = "work"
    status, body = classify(client)
    assert status == 200 and "predictions" in body
    assert client.get("/v2/health/ready").status_code == 200


def test_nan_from_the_model_never_reaches_a_client(client: TestClient) -> None:
    Fault.mode = "nan"
    status, body = classify(client)
    assert status == 500 and body["type"] == "inference_failed"
    assert "predictions" not in body
    assert rejections(client, "inference_failed") == 1


def test_repeated_failures_turn_readiness_off_until_inference_recovers(
    client: TestClient,
) -> None:
    Fault.mode = "raise"
    for _ in range(FAILURES_UNTIL_UNREADY - 1):
        assert classify(client)[0] == 500
        assert client.get("/v2/health/ready").status_code == 200
    assert classify(client)[0] == 500
    assert client.get("/v2/health/ready").status_code == 503
    status, body = classify(client)
    assert status == 503 and body["type"] == "not_ready"
    assert client.get("/v2/health/live").status_code == 200
    # Still failing: the recovery probes fail too, and readiness stays off.
    time.sleep(0.3)
    assert client.get("/v2/health/ready").status_code == 503
    Fault.mode = "work"
    deadline = time.monotonic() + 10
    while client.get("/v2/health/ready").status_code != 200:
        assert time.monotonic() < deadline, "readiness never came back"
        time.sleep(0.02)
    assert classify(client)[0] == 200
