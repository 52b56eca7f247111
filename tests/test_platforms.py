"""The service on each platform it runs on: its runtime dependencies resolve from wheels there,
to the onnxruntime that platform should get (pip's dry run, nothing installed), and it serves
without the Linux mechanisms macOS lacks.

pip evaluates environment markers against the interpreter running it, never against
`--platform`, so the markers are evaluated here for each platform and pip is given the
requirements they select, markers removed."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from model_runtime import platform
from model_runtime.decoding import pool as decoding_pool
from tests.conftest import ROOT
from tests.service_support import cpu_settings, ready_client

PYTHON = "3.11"
"""The oldest Python the project supports (its requires-python), whose wheels must exist."""

UNREACHABLE = (
    "Could not fetch URL",
    "connection broken by",
    "NewConnectionError",
    "NameResolutionError",
    "Failed to establish a new connection",
    "Network is unreachable",
    "ProxyError",
)
"""What pip says when it cannot reach the package index."""


def manylinux(machine: str) -> list[str]:
    """The wheel platforms of a glibc 2.28 host (RHEL 8, Debian 10 and later), onnxruntime's
    floor: pip does not widen `manylinux_2_28` to the older tags such a host also runs."""
    tags = [f"manylinux_2_{minor}_{machine}" for minor in range(28, 4, -1)]
    return [*tags, f"manylinux2014_{machine}"]  # pip widens this one to manylinux2010 and 1


@dataclass(frozen=True)
class Target:
    name: str
    markers: dict[str, str]
    """What environment markers see there."""
    platforms: list[str]
    """Its wheel platforms (pip adds the older macOS releases itself)."""
    runtime: str
    """The onnxruntime distribution it must get."""
    openvino: bool
    """Whether it gets OpenVINO, the second CPU engine."""


TARGETS = [
    Target(
        "Linux x86_64",
        {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"},
        manylinux("x86_64"),
        "onnxruntime-gpu",
        openvino=True,
    ),
    Target(
        "Linux aarch64",
        {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64"},
        manylinux("aarch64"),
        "onnxruntime",
        openvino=False,
    ),
    # The oldest macOS releases current onnxruntime publishes for: 14 on Apple silicon, and 13
    # on Intel, whose last wheels are onnxruntime 1.23's.
    Target(
        "macOS arm64",
        {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64"},
        ["macosx_14_0_arm64"],
        "onnxruntime",
        openvino=True,
    ),
    Target(
        "macOS x86_64",
        {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "x86_64"},
        ["macosx_13_0_x86_64"],
        "onnxruntime",
        openvino=True,
    ),
]
RUNTIMES = {"onnxruntime", "onnxruntime-gpu"}
GPU_TARGET = TARGETS[0]


def project() -> dict:
    loaded: dict = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return loaded


def requirements(target: Target, extras: tuple[str, ...] = ()) -> list[str]:
    """The project's runtime requirements (and `extras`') that apply on `target`, markers
    evaluated for it and removed."""
    environment = {
        "python_version": PYTHON,
        "python_full_version": f"{PYTHON}.0",
        "implementation_name": "cpython",
        "implementation_version": f"{PYTHON}.0",
        "platform_python_implementation": "CPython",
        "os_name": "posix",
        "platform_release": "",
        "platform_version": "",
        **target.markers,
    }
    lines = project()["dependencies"] + [
        line for extra in extras for line in project()["optional-dependencies"][extra]
    ]
    chosen = []
    for line in lines:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(environment):
            requirement.marker = None
            chosen.append(str(requirement))
    return chosen


@dataclass(frozen=True)
class Resolution:
    installed: dict[str, str]
    """Distribution name -> version, as pip would install them."""
    error: str
    """pip's last words where it failed ("" where it did not)."""
    unreachable: bool
    """pip failed because it could not reach the package index."""


def resolve(target: Target, extras: tuple[str, ...], scratch: Path) -> Resolution:
    report = scratch / "report.json"
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--ignore-installed",
        "--only-binary=:all:",
        *(option for tag in target.platforms for option in ("--platform", tag)),
        "--python-version",
        PYTHON,
        "--implementation",
        "cp",
        "--target",
        str(scratch / "target"),
        "--report",
        str(report),
        "--quiet",
        "--disable-pip-version-check",
        "--retries",
        "1",
        "--timeout",
        "30",
        *requirements(target, extras),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        lines = done.stderr.splitlines()
        unreachable = [line for line in lines if any(words in line for words in UNREACHABLE)]
        errors = [line for line in lines if line.startswith("ERROR")] or ["pip failed"]
        return Resolution({}, (unreachable or errors)[-1].strip(), bool(unreachable))
    installed = json.loads(report.read_text())["install"]
    return Resolution(
        {
            canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
            for item in installed
        },
        "",
        False,
    )


@pytest.fixture(scope="module")
def resolved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Resolution]]:
    """Each target's runtime dependencies, and the GPU target's with the `gpu` extra (key
    "<name>[gpu]"), resolved at once: each dry run waits on the index, not on the CPU."""
    jobs = [(target, ()) for target in TARGETS] + [(GPU_TARGET, ("gpu",))]
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {
            target.name + "".join(f"[{extra}]" for extra in extras): pool.submit(
                resolve, target, extras, tmp_path_factory.mktemp("pip")
            )
            for target, extras in jobs
        }
        results = {key: future.result() for key, future in futures.items()}
    unreachable = [r.error for r in results.values() if r.unreachable]
    if unreachable:
        pytest.skip(f"the package index is unreachable: {unreachable[0]}")
    yield results


def test_the_platforms_resolved_are_for_the_oldest_python_supported() -> None:
    assert project()["requires-python"] == f">={PYTHON}"


@pytest.mark.network
@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
def test_the_runtime_dependencies_resolve_to_the_platforms_onnxruntime(
    target: Target, resolved: dict[str, Resolution]
) -> None:
    resolution = resolved[target.name]
    assert not resolution.error, f"{target.name}: {resolution.error}"
    installed = resolution.installed
    assert RUNTIMES & set(installed) == {target.runtime}
    assert ("openvino" in installed) == target.openvino
    # Every runtime dependency has a wheel there; the CUDA libraries come only with the extra.
    wanted = {canonicalize_name(Requirement(line).name) for line in requirements(target)}
    assert wanted <= set(installed)
    assert not [name for name in installed if name.startswith("nvidia-")]


@pytest.mark.network
def test_the_gpu_extra_brings_cuda_and_cudnn_where_onnxruntime_gpu_is_the_runtime(
    resolved: dict[str, Resolution],
) -> None:
    resolution = resolved[f"{GPU_TARGET.name}[gpu]"]
    assert not resolution.error, resolution.error
    installed = set(resolution.installed)
    assert RUNTIMES & installed == {"onnxruntime-gpu"}
    for library in ("nvidia-cuda-runtime", "nvidia-cublas", "nvidia-cudnn"):
        assert any(name.startswith(library) for name in installed), (library, sorted(installed))


@pytest.mark.parametrize("target", TARGETS[1:], ids=[t.name for t in TARGETS[1:]])
def test_the_gpu_extra_adds_nothing_where_the_runtime_is_plain_onnxruntime(
    target: Target,
) -> None:
    # Were it to add onnxruntime-gpu, both would own the one onnxruntime module.
    assert requirements(target, ("gpu",)) == requirements(target)


def classify(model: Path) -> dict:
    heart = (ROOT / "examples" / "heart.png").read_bytes()
    with ready_client(cpu_settings(model)) as client:
        answer: dict = client.post("/v1/classify", files={"file": ("heart.png", heart)}).json()
    return answer


def test_the_service_serves_without_linuxs_mechanisms(
    served_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """What macOS lacks, taken away: memfd, eventfd, the affinity mask, /proc and a kernel
    that enforces RLIMIT_AS. The bundled model answers as it does with them, and the one
    protection lost is said in one line."""
    expected = classify(served_model)
    for name in ("memfd_create", "eventfd", "sched_getaffinity"):
        monkeypatch.delattr(os, name, raising=False)
    monkeypatch.setattr(platform, "STATM", Path("/nonexistent/statm"))
    monkeypatch.setattr(decoding_pool, "enforces_memory_limits", lambda: False)
    monkeypatch.setattr(platform, "_said", set())
    caplog.set_level(logging.WARNING, logger=platform.__name__)
    answer = classify(served_model)
    assert answer["model"] == expected["model"]
    (got,), (shown,) = answer["predictions"], expected["predictions"]
    assert [t["label"] for t in got["top"]] == [t["label"] for t in shown["top"]]
    for entry, shown_entry in zip(got["top"], shown["top"], strict=True):
        assert entry["probability"] == pytest.approx(shown_entry["probability"], abs=1e-6)
    said = [r.getMessage() for r in caplog.records if r.name == platform.__name__]
    assert len(said) == 1 and said[0].startswith("decoding workers run without a memory limit")
