"""Probe a running container: classify real images over HTTP and compare with the model in-process.

Called by tests/test_container.py on a container it started itself, or run by
`../shared/container/smoke.sh` as its PROBE_CMD (`python -m tests.container_probe`, with the
container's base URL in $URL). Exits non-zero, saying why, unless every answer is the bundled
model's own result for those bytes.
"""

from __future__ import annotations

import os
import sys

import httpx
import numpy as np

from model_contract.preprocess import preprocess
from model_export import shapes
from model_runtime.options import IN_PROCESS
from model_runtime.session import ModelSession
from tests.conftest import DEFAULT_MODEL

PROBE_SEED = 777
PROBE_IMAGES = 4
TOLERANCE = 1e-5


def probe(url: str) -> list[str]:
    """Problems found (none when the container answers exactly as the model does in-process)."""
    reference = ModelSession(DEFAULT_MODEL, IN_PROCESS)
    problems: list[str] = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for sample in shapes.samples(PROBE_SEED, PROBE_IMAGES):
            response = client.post(
                "/v1/classify",
                params={"top_k": len(reference.labels), "probabilities": "true"},
                files={"file": ("probe.img", sample.data, "application/octet-stream")},
            )
            if response.status_code != 200:
                problems.append(f"status {response.status_code}: {response.text}")
                continue
            served = np.array(response.json()["predictions"][0]["probabilities"], np.float32)
            expected = reference.predict(preprocess(sample.data, reference.metadata.preprocessing))[
                0
            ]
            difference = float(np.abs(served - expected).max())
            if difference > TOLERANCE:
                problems.append(f"probabilities differ by {difference:.2e} > {TOLERANCE}")
            print(f"{shapes.LABELS[sample.label]:>8}: served {shapes.LABELS[int(served.argmax())]}")
    return problems


def main() -> None:
    problems = probe(os.environ["URL"])
    for problem in problems:
        print(problem, file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
