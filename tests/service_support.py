"""Helpers for service tests: an app client that waits for readiness, and a real uvicorn server."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.runtime.options import CPU
from service.settings import Settings


def cpu_settings(model: Path, **overrides: object) -> Settings:
    return Settings(model=model, providers=(CPU,), **overrides)  # type: ignore[arg-type]


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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Server:
    """A `vit-serve` subprocess: its URL, the process, and where its log goes."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def served(model: Path, cwd: Path, timeout: float = 60.0, **settings: str) -> Iterator[Server]:
    """`vit-serve` on 127.0.0.1 until it is ready (VIT_* `settings` in its environment); stopped
    afterwards. Its log goes to a file: a pipe nobody reads would block a chatty server."""
    port = free_port()
    command = [sys.executable, "-m", "service.cli", "--model", str(model), "--port", str(port)]
    env = {
        "VIT_PROVIDERS": '["CPUExecutionProvider"]',
        "PATH": "/usr/bin:/bin",
        **{f"VIT_{key.upper()}": value for key, value in settings.items()},
    }
    with tempfile.NamedTemporaryFile(prefix="vit-serve-", suffix=".log", delete=False) as log:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(url=f"http://127.0.0.1:{port}", process=process, log=Path(log.name))
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vit-serve exited: {server.output()}")
            try:
                with urllib.request.urlopen(f"{server.url}/v2/health/ready", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("vit-serve never became ready")
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        process.wait(timeout=30)
        server.log.unlink(missing_ok=True)


@contextmanager
def running_server(model: Path, cwd: Path, timeout: float = 60.0) -> Iterator[str]:
    """`vit-serve` in a subprocess on 127.0.0.1; yields its base URL and stops it afterwards."""
    with served(model, cwd, timeout) as server:
        yield server.url
