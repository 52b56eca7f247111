"""Print the service's runtime requirements for one container flavour, from pyproject.toml.

pyproject.toml chooses onnxruntime-gpu or plain onnxruntime by platform (environment markers); an
image's flavour is chosen by whoever builds it instead, whatever machine builds it. The GPU image
gets the `gpu` extra's onnxruntime-gpu with its `cuda` and `cudnn` extras (CUDA and cuDNN as pip
wheels, so no CUDA base image is needed); the CPU image gets the much smaller plain onnxruntime.
Each keeps its version bound from pyproject.toml and loses its marker. The list is read, never
copied, so the image cannot drift from pyproject.toml.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

RUNTIMES = {"gpu": "onnxruntime-gpu", "cpu": "onnxruntime"}
"""Each flavour's onnxruntime distribution."""


def _name(requirement: str) -> str:
    """The distribution a requirement names (no `packaging` here: the builder's bare Python)."""
    match = re.match(r"[A-Za-z0-9._-]+", requirement.strip())
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return match.group(0).lower().replace("_", "-")


def runtime_requirements(pyproject: Path, flavour: str) -> list[str]:
    """pyproject's dependencies with the onnxruntime entries replaced by the flavour's one:
    the `gpu` extra's for the GPU image, the base dependencies' onnxruntime for the CPU image."""
    project = tomllib.loads(pyproject.read_text())["project"]
    dependencies: list[str] = project["dependencies"]
    source = project["optional-dependencies"]["gpu"] if flavour == "gpu" else dependencies
    runtime = [r for r in source if _name(r) == RUNTIMES[flavour]]
    if len(runtime) != 1:
        raise ValueError(f"{pyproject} does not name {RUNTIMES[flavour]} exactly once there")
    chosen = runtime[0].split(";", 1)[0].strip()
    others = [r for r in dependencies if _name(r) not in RUNTIMES.values()]
    first = next(
        (i for i, r in enumerate(dependencies) if _name(r) in RUNTIMES.values()), len(others)
    )
    return [*others[:first], chosen, *others[first:]]  # where the first onnxruntime entry stood


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("flavour", choices=sorted(RUNTIMES))
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    args = parser.parse_args()
    print("\n".join(runtime_requirements(args.pyproject, args.flavour)))


if __name__ == "__main__":
    main()
