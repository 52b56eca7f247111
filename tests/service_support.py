"""Helpers for service tests: an app client that waits for readiness, and a real uvicorn server."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from service.providers import CPU
from service.settings import Settings


def cpu_settings(model: Path, **overrides: object) -> Settings:
    return Settings(model=model, providers=(CPU,), **overrides)  # type: ignore[arg-type]


def wait_ready(client: TestClient, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/v2/health/ready").status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError("the app never became ready")
        time.sleep(0.01)


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


@contextmanager
def running_server(model: Path, cwd: Path, timeout: float = 60.0) -> Iterator[str]:
    """`vit-serve` in a subprocess on 127.0.0.1; yields its base URL and stops it afterwards."""
    port = free_port()
    command = [sys.executable, "-m", "service.cli", "--model", str(model), "--port", str(port)]
    env = {"VIT_PROVIDERS": '["CPUExecutionProvider"]', "PATH": "/usr/bin:/bin"}
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"vit-serve exited: {process.stdout.read() if process.stdout else ''}"
                )
            try:
                with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("vit-serve never became ready")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)
