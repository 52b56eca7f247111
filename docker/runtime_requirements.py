"""Print the service's runtime requirements for one container flavour, from pyproject.toml.

The distribution depends on onnxruntime-gpu. The GPU image adds its `cuda` and `cudnn` extras
(CUDA and cuDNN as pip wheels, so no CUDA base image is needed); the CPU image swaps it for the
much smaller plain onnxruntime at the same version bound. The list is read, never copied, so the
image cannot drift from pyproject.toml.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

GPU_RUNTIME = "onnxruntime-gpu"
FLAVOURS = {
    "gpu": f"{GPU_RUNTIME}[cuda,cudnn]",
    "cpu": "onnxruntime",
}


def runtime_requirements(pyproject: Path, flavour: str) -> list[str]:
    """pyproject's dependencies with onnxruntime-gpu replaced by the flavour's runtime."""
    dependencies: list[str] = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    replaced = [
        FLAVOURS[flavour] + requirement[len(GPU_RUNTIME) :]
        if re.match(rf"{GPU_RUNTIME}\b(?!-)", requirement)
        else requirement
        for requirement in dependencies
    ]
    if replaced == dependencies:
        raise ValueError(f"{pyproject} does not depend on {GPU_RUNTIME}")
    return replaced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("flavour", choices=sorted(FLAVOURS))
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    args = parser.parse_args()
    print("\n".join(runtime_requirements(args.pyproject, args.flavour)))


if __name__ == "__main__":
    main()
