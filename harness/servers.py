"""A real `vit-serve` on 127.0.0.1 in a process of its own, started until ready and stopped."""

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
    grpc_target: str
    """host:port of its gRPC service."""
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def served(
    model: Path,
    cwd: Path,
    timeout: float = 60.0,
    environment: dict[str, str] | None = None,
    **settings: str,
) -> Iterator[Server]:
    """`vit-serve` on 127.0.0.1 until it is ready (VIT_* `settings` and any other `environment`
    variables, OTEL_* say, in its environment); stopped afterwards. Its log goes to a file: a
    pipe nobody reads would block a chatty server."""
    port = free_port()
    settings.setdefault("grpc_port", str(free_port()))
    command = [sys.executable, "-m", "service.cli", "--model", str(model), "--port", str(port)]
    env = {
        "VIT_PROVIDERS": '["CPUExecutionProvider"]',
        "PATH": "/usr/bin:/bin",
        **{f"VIT_{key.upper()}": value for key, value in settings.items()},
        **(environment or {}),
    }
    with tempfile.NamedTemporaryFile(prefix="vit-serve-", suffix=".log", delete=False) as log:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(
        url=f"http://127.0.0.1:{port}",
        process=process,
        log=Path(log.name),
        grpc_target=f"127.0.0.1:{settings['grpc_port']}",
    )
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
