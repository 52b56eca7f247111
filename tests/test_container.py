"""The CPU image, built, run and probed for real, and its size against the README's figure.

Through ../shared/container/smoke.sh where it sits beside the repository and the tests run as root
(rootful podman, for a host that cannot reach a registry), otherwise with docker or podman
straight from the repository.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.servers import free_port, running_server
from tests.conftest import ROOT
from tests.container_probe import probe

SMOKE = ROOT.parent / "shared" / "container" / "smoke.sh"
IMAGE = "localhost/vit-inference:cpu-test"
# The base smoke.sh builds from: Debian 12's python3, made with debootstrap.
SMOKE_BASE = "localhost/bookworm-py:latest"
BUILD_TIMEOUT_S = 1800
HEALTH_TIMEOUT_S = 120
STOP_TIMEOUT_S = 25
SIZE_TOLERANCE = 0.10
MB = 1e6


@dataclass(frozen=True)
class BuiltImage:
    """Sizes in MB of the image built and of the base it was built on."""

    total_mb: float
    base_mb: float
    # Whether the base is the one the README's sizes were measured on, Debian 12's python3.
    base_is_the_readmes: bool


def why_smoke_cannot_run() -> str | None:
    """None when smoke.sh is here and can run: as root (its podman is rootful), with podman or
    apt-get to install it; else the reason."""
    if not SMOKE.exists():
        return f"{SMOKE} is not here"
    if os.geteuid() != 0:
        return f"{SMOKE} runs podman as root"
    if shutil.which("podman") is None and shutil.which("apt-get") is None:
        return f"{SMOKE} finds neither podman nor apt-get to install it"
    return None


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no output"


def working_engine() -> tuple[str | None, str]:
    """The first of docker and podman that answers `info` here, or None and why neither does."""
    reasons = []
    for name in ("docker", "podman"):
        engine = shutil.which(name)
        if engine is None:
            reasons.append(f"{name} is not installed")
            continue
        info = subprocess.run([engine, "info"], capture_output=True, text=True, timeout=60)
        if info.returncode == 0:
            return engine, ""
        reasons.append(f"`{name} info` fails ({last_line(info.stderr)})")
    return None, "; ".join(reasons)


def image_mb(engine: str, image: str) -> float:
    inspect = [engine, "image", "inspect", "-f", "{{.Size}}", image]
    return int(subprocess.run(inspect, capture_output=True, text=True, check=True).stdout) / MB


def dockerfile_base() -> str:
    """The base image both stages of the Dockerfile start from unless `--build-arg BASE` says."""
    match = re.search(r"^ARG BASE=(\S+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert match is not None, "the Dockerfile declares ARG BASE=<default>"
    return match.group(1)


def assert_stopped_on_sigterm(exit_code: str, logs: str) -> None:
    # uvicorn finishes in-flight requests, runs the lifespan shutdown, then re-raises the signal
    # (143); 137 would mean the engine had to SIGKILL it.
    assert exit_code in ("0", "143"), f"exit code {exit_code}\n{logs[-2000:]}"
    assert "Application shutdown complete" in logs, logs[-2000:]


def build_and_run_with_smoke() -> BuiltImage:
    env = {
        **os.environ,
        "IMAGE": IMAGE,
        "BASE_IMAGE": SMOKE_BASE,
        # docker format keeps the HEALTHCHECK, which OCI images cannot carry.
        "BUILD_ARGS": "--build-arg RUNTIME=cpu --format docker",
        "HEALTH_PATH": "/v2/health/ready",
        "HEALTH_TIMEOUT": str(HEALTH_TIMEOUT_S),
        "STOP_TIMEOUT": str(STOP_TIMEOUT_S),
        "PROBE_CMD": f"cd {ROOT} && {sys.executable} -m tests.container_probe",
    }
    result = subprocess.run(
        ["bash", str(SMOKE), str(ROOT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    output = result.stdout + result.stderr
    print(output)
    assert result.returncode == 0, output[-4000:]
    # The probe classified real images exactly as the model does in-process.
    assert "done: probe" in output
    stop = re.search(r"podman stop took [\d.]+s, exit code (\d+)", output)
    assert stop is not None, output[-2000:]
    assert_stopped_on_sigterm(stop.group(1), output)
    built = re.search(rf"done: build {re.escape(IMAGE)} \((\d+) MB\)", output)
    assert built is not None, output[-2000:]
    return BuiltImage(float(built.group(1)), image_mb("podman", SMOKE_BASE), True)


def wait_healthy(engine: str, container: str, url: str) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2):
                return
        except OSError:
            state = [engine, "inspect", "-f", "{{.State.Status}}", container]
            status = subprocess.run(state, capture_output=True, text=True).stdout.strip()
            if status != "running" or time.monotonic() > deadline:
                logs = subprocess.run([engine, "logs", container], capture_output=True, text=True)
                pytest.fail(f"no ready answer from {url} (container {status})\n{logs.stderr}")
            time.sleep(0.5)


def dangling_images(engine: str) -> set[str]:
    listing = [engine, "images", "-q", "-f", "dangling=true"]
    return set(subprocess.run(listing, capture_output=True, text=True).stdout.split())


def build_and_run_with(engine: str) -> BuiltImage:
    """Build the CPU image from the repository alone, serve it, probe it and stop it."""
    base = dockerfile_base()
    name = os.path.basename(engine)
    present = subprocess.run([engine, "image", "inspect", base], capture_output=True)
    if present.returncode != 0:
        pull = subprocess.run([engine, "pull", base], capture_output=True, text=True, timeout=600)
        if pull.returncode != 0:
            pytest.skip(f"{name} cannot pull the base image {base} ({last_line(pull.stderr)})")
    # docker format keeps podman's HEALTHCHECK, which OCI images cannot carry.
    image_format = ["--format", "docker"] if name == "podman" else []
    dangling_before = dangling_images(engine)
    build = subprocess.run(
        [engine, "build", "--build-arg", "RUNTIME=cpu", *image_format, "-t", IMAGE, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    container = ""
    try:
        assert build.returncode == 0, (build.stdout + build.stderr)[-4000:]
        built = BuiltImage(image_mb(engine, IMAGE), image_mb(engine, base), False)
        port = free_port()
        run = [engine, "run", "-d", "-p", f"127.0.0.1:{port}:8000", IMAGE]
        container = subprocess.run(run, capture_output=True, text=True, check=True).stdout.strip()
        url = f"http://127.0.0.1:{port}"
        wait_healthy(engine, container, url)
        assert probe(url) == []
        stop = [engine, "stop", "-t", str(STOP_TIMEOUT_S), container]
        subprocess.run(stop, capture_output=True, check=True)
        state = [engine, "inspect", "-f", "{{.State.ExitCode}}", container]
        exit_code = subprocess.run(state, capture_output=True, text=True, check=True).stdout
        logs = subprocess.run([engine, "logs", container], capture_output=True, text=True)
        assert_stopped_on_sigterm(exit_code.strip(), logs.stdout + logs.stderr)
        return built
    finally:
        if container:
            subprocess.run([engine, "rm", "-f", container], capture_output=True)
        # The image and the untagged stages this build left, nothing older.
        leftovers = dangling_images(engine) - dangling_before
        subprocess.run([engine, "rmi", "-f", IMAGE, *leftovers], capture_output=True)


def readme_cpu_image_mb() -> tuple[float, float]:
    """The README's CPU image size and the size of the base it was measured on, in MB."""
    readme = (ROOT / "README.md").read_text()
    total = re.search(r"# CPU image: [^\n]*?, (\d+) MB", readme)
    base = re.search(r"as the base \((\d+) MB", readme)
    assert total is not None and base is not None, "the README's Deploy section gives both sizes"
    return float(total.group(1)), float(base.group(1))


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


def build_context_admits(path: str) -> bool:
    """Whether `.dockerignore` (which excludes everything, then re-admits paths) lets `path` in."""
    admitted = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = line.removeprefix("!").rstrip("/")
        if pattern == "*" or path == pattern or path.startswith(pattern + "/"):
            admitted = keep
    return admitted


def test_the_build_context_holds_everything_the_dockerfile_copies_and_installs() -> None:
    copied = [
        source
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ") and "--from=" not in line
        for source in line.split()[1:-1]
    ]
    refused = [source for source in copied if not build_context_admits(source.rstrip("/"))]
    assert not refused, f".dockerignore keeps these out of the image's build context: {refused}"
    include = re.search(r"include = \[(.*?)\]", (ROOT / "pyproject.toml").read_text())
    assert include
    packages = [name.strip('" *') for name in include.group(1).split(",")]
    assert [p for p in packages if f"{p}/" not in copied] == []


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


def test_cpu_image_builds_serves_the_bundled_model_and_stops_on_sigterm() -> None:
    smoke_missing = why_smoke_cannot_run()
    if smoke_missing is None:
        built = build_and_run_with_smoke()
    else:
        engine, engine_missing = working_engine()
        if engine is None:
            pytest.skip(f"{engine_missing}; {smoke_missing}")
        built = build_and_run_with(engine)
    added = built.total_mb - built.base_mb
    print(f"CPU image: {built.total_mb:.0f} MB, {added:.0f} MB over a {built.base_mb:.0f} MB base")
    readme_total, readme_base = readme_cpu_image_mb()
    # What the Dockerfile adds is the same on any base; the total only on the README's.
    readme_added = readme_total - readme_base
    assert abs(added - readme_added) <= SIZE_TOLERANCE * readme_added, (
        f"the README's CPU image adds {readme_added:.0f} MB to its base, this build {added:.0f} MB"
    )
    if built.base_is_the_readmes:
        assert abs(built.total_mb - readme_total) <= SIZE_TOLERANCE * readme_total, (
            f"the README says {readme_total:.0f} MB, this build is {built.total_mb:.0f} MB"
        )
