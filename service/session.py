"""The onnxruntime session behind one narrow call: predict(batch) -> probabilities."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.model_metadata import ModelMetadata

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class CudaUnavailable(RuntimeError):
    """CUDA was required but onnxruntime could not use it."""


def default_thread_count() -> int:
    """All cores this process may use: one session on one replica should own the machine."""
    return max(1, len(os.sched_getaffinity(0)))


def load_pip_cuda_libraries() -> None:
    """Load CUDA and cuDNN from the nvidia-* wheels (the GPU image's `onnxruntime-gpu[cuda,cudnn]`).

    The dynamic loader does not search site-packages, so without this the CUDA provider would
    fail to load there and the session would quietly run on the CPU.
    """
    if importlib.util.find_spec("nvidia") is not None:
        ort.preload_dlls()


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 for accuracy, returned as float32."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)


class ModelSession:
    """A loaded self-describing model: its metadata, its providers, and inference."""

    def __init__(
        self,
        path: Path,
        *,
        providers: tuple[str, ...] = (CUDA, CPU),
        intra_op_threads: int = 0,
        inter_op_threads: int = 1,
        require_cuda: bool = False,
    ) -> None:
        self.path = path
        model_bytes = path.read_bytes()
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads or default_thread_count()
        options.inter_op_num_threads = inter_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        available = set(ort.get_available_providers())
        wanted = [p for p in providers if p in available]
        if CUDA in wanted:
            load_pip_cuda_libraries()
        self._session = ort.InferenceSession(model_bytes, options, providers=wanted or [CPU])
        self.metadata = ModelMetadata.from_props(self._session.get_modelmeta().custom_metadata_map)
        self.providers: tuple[str, ...] = tuple(self._session.get_providers())
        self.provider = self.providers[0]
        if require_cuda and self.provider != CUDA:
            raise CudaUnavailable(f"CUDA was required but the session runs on {self.provider}")
        logger.info("model %s %s on %s", self.metadata.name, self.metadata.version, self.provider)
        model_input = self._session.get_inputs()[0]
        self.input_name = model_input.name
        self.output_name = self._session.get_outputs()[0].name

    @property
    def labels(self) -> tuple[str, ...]:
        return self.metadata.labels

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """The model's raw output for a float32 (N, 3, S, S) batch."""
        (output,) = self._session.run([self.output_name], {self.input_name: batch})
        return np.asarray(output)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities (N, classes), float32, each row summing to 1."""
        output = self.logits(batch)
        if self.metadata.output == "probabilities":
            return output.astype(np.float32)
        return softmax(output)
