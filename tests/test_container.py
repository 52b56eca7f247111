"""The container image, built and run for real with podman through ../shared/container/smoke.sh."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.service_support import free_port, running_server

SMOKE = ROOT.parent / "shared" / "container" / "smoke.sh"


def why_podman_is_unavailable() -> str | None:
    """None when podman is here or smoke.sh can install it (root with apt-get), else the reason."""
    if shutil.which("podman"):
        return None
    if os.geteuid() != 0:
        return "podman is not installed and installing it needs root"
    if shutil.which("apt-get") is None:
        return "podman is not installed and there is no apt-get to install it"
    return None


def runtime_requirements(flavour: str) -> list[str]:
    script = ROOT / "docker" / "runtime_requirements.py"
    result = subprocess.run(
        [sys.executable, str(script), flavour, "--pyproject", str(ROOT / "pyproject.toml")],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.split()


def test_image_flavours_differ_only_in_the_onnxruntime_package() -> None:
    gpu, cpu = runtime_requirements("gpu"), runtime_requirements("cpu")
    assert [r for r in gpu if not r.startswith("onnxruntime")] == [
        r for r in cpu if not r.startswith("onnxruntime")
    ]
    assert [r for r in gpu if r.startswith("onnxruntime")] == ["onnxruntime-gpu[cuda,cudnn]>=1.21"]
    assert [r for r in cpu if r.startswith("onnxruntime")] == ["onnxruntime>=1.21"]
    assert not any("torch" in r or "onnx>" in r for r in gpu + cpu)


def healthcheck_command() -> list[str]:
    """The Dockerfile's HEALTHCHECK CMD (exec form), with this interpreter for `python3`."""
    (line,) = [
        line
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if "CMD [" in line and "health" in line
    ]
    command: list[str] = json.loads(line.split("CMD", 1)[1])
    assert command[0] == "python3"
    return [sys.executable, *command[1:]]


def test_the_images_healthcheck_passes_only_on_a_ready_server(served_model: Path) -> None:
    command = healthcheck_command()
    with running_server(served_model, ROOT) as url:
        port = url.rsplit(":", 1)[1]
        ready = subprocess.run(command, env={"VIT_PORT": port}, capture_output=True, timeout=30)
        assert ready.returncode == 0, ready.stderr
    nobody = subprocess.run(
        command, env={"VIT_PORT": str(free_port())}, capture_output=True, timeout=30
    )
    assert nobody.returncode != 0


@pytest.mark.skipif(not SMOKE.exists(), reason=f"{SMOKE} is not here")
def test_cpu_image_builds_serves_the_bundled_model_and_stops_on_sigterm() -> None:
    reason = why_podman_is_unavailable()
    if reason:
        pytest.skip(reason)
    env = {
        **os.environ,
        "IMAGE": "localhost/vit-inference:cpu-smoke",
        # docker format keeps the HEALTHCHECK, which OCI images cannot carry.
        "BUILD_ARGS": "--build-arg RUNTIME=cpu --format docker",
        "HEALTH_PATH": "/v2/health/ready",
        "HEALTH_TIMEOUT": "120",
        "STOP_TIMEOUT": "25",
        "PROBE_CMD": f"cd {ROOT} && {sys.executable} -m tests.container_probe",
    }
    result = subprocess.run(
        ["bash", str(SMOKE), str(ROOT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    output = result.stdout + result.stderr
    print(output)
    assert result.returncode == 0, output[-4000:]
    # The probe classified real images exactly as the model does in-process ...
    assert "done: probe" in output
    # ... and on SIGTERM the server drained and exited by itself: uvicorn finishes in-flight
    # requests, runs the lifespan shutdown, then re-raises the signal (143), never SIGKILL (137).
    stop = re.search(r"podman stop took [\d.]+s, exit code (\d+)", output)
    assert stop is not None and stop.group(1) in ("0", "143"), output[-2000:]
    assert "Application shutdown complete" in output
