"""The naive baseline: a plain FastAPI app, one onnxruntime call per request, no batching.

    VIT_MODEL=models/shapes-vit.onnx uvicorn benchmarks.naive_app:app --port 8001

Same model, same decode and preprocessing, same raw-body upload as /v1/classify, the work off
the event loop as FastAPI's docs advise; what it lacks is batching and everything around it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from model_contract.preprocess import PreprocessSpec, preprocess
from model_runtime.session import softmax

MODEL = Path(os.environ.get("VIT_MODEL", "models/shapes-vit.onnx"))
session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
metadata = session.get_modelmeta().custom_metadata_map
spec = PreprocessSpec.model_validate_json(metadata["preprocessing"])
labels: list[str] = json.loads(metadata["labels"])
input_name = session.get_inputs()[0].name
app = FastAPI()


def predict(data: bytes) -> dict[str, object]:
    logits = session.run(None, {input_name: preprocess(data, spec)})[0]
    probabilities = softmax(logits)[0]
    best = int(np.argmax(probabilities))
    return {"label": labels[best], "probability": float(probabilities[best])}


@app.post("/v1/classify")
async def classify(request: Request) -> dict[str, object]:
    return await run_in_threadpool(predict, await request.body())
