"""Helpers for service tests: an app client that waits for readiness, and a real uvicorn server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from model_runtime.options import CPU
from service.app import create_app
from service.settings import Settings


def cpu_settings(model: Path, **overrides: object) -> Settings:
    return Settings(model=model, providers=(CPU,), **overrides)


def wait_ready(client: TestClient, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/v2/health/ready").status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError("the app never became ready")
        time.sleep(0.01)


def rejections(client: TestClient, reason: str) -> float:
    """The service's count of requests refused for `reason`, read as Prometheus reads it."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "vit_rejections_total" and sample.labels["reason"] == reason:
                return sample.value
    return 0.0


@contextmanager
def ready_client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        yield client
