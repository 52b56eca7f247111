"""The KServe peer: KServe's Python ModelServer serving the same ONNX file with the same decoding
and preprocessing, the raw image body to its v1 predict route.

    VIT_MODEL=models/shapes-vit.onnx python -m benchmarks.kserve_app --http_port 8002
    curl --data-binary @examples/star.jpg -H 'content-type: image/jpeg' \\
        127.0.0.1:8002/v1/models/vit:predict

As a KServe user would write it: the work off the event loop (an async `predict` that runs
decoding, preprocessing and onnxruntime in a thread), one onnxruntime call per request; KServe
has no dynamic batching of its own. Needs `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import kserve
import numpy as np
import onnxruntime as ort

from model_contract.preprocess import PreprocessSpec, preprocess
from model_runtime.session import softmax

MODEL = Path(os.environ.get("VIT_MODEL", "models/shapes-vit.onnx"))
NAME = "vit"
ROUTE = f"/v1/models/{NAME}:predict"


class ViT(kserve.Model):  # type: ignore[misc]
    """The model behind KServe's v1 predict route."""

    def __init__(self, name: str, path: Path) -> None:
        super().__init__(name)
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.spec = PreprocessSpec.model_validate_json(metadata["preprocessing"])
        self.labels: list[str] = json.loads(metadata["labels"])
        self.input_name = self.session.get_inputs()[0].name
        self.ready = True

    def _predict(self, data: bytes) -> dict[str, Any]:
        logits = self.session.run(None, {self.input_name: preprocess(data, self.spec)})[0]
        probabilities = softmax(logits)[0]
        best = int(np.argmax(probabilities))
        return {"label": self.labels[best], "probability": float(probabilities[best])}

    async def predict(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        return await asyncio.to_thread(self._predict, bytes(payload))


if __name__ == "__main__":
    kserve.ModelServer().start([ViT(NAME, MODEL)])
