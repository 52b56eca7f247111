"""OpenVINO on the CPU, the second engine: a model's calls at the precision its file allows
(float32 always for an FP32 file: OpenVINO would otherwise choose bf16 by itself on CPUs that
have it), each bounded in time and cancelled past its bound."""

from __future__ import annotations

import functools
import importlib.util
import threading
from typing import Any, Literal

import numpy as np

from model_runtime.watchdog import InferenceOverran

OPENVINO = "openvino"
ONNXRUNTIME = "onnxruntime"

Precision = Literal["fp32", "bf16"]
_HINTS: dict[Precision, str] = {"fp32": "f32", "bf16": "bf16"}
_NAMES: dict[Precision, tuple[str, ...]] = {
    "fp32": ("f32", "float32"),
    "bf16": ("bf16", "bfloat16"),
}
"""How OpenVINO names each precision when it reports what it compiled for."""


def openvino_missing() -> str | None:
    """Why OpenVINO cannot serve here, or None where it can: its wheels exist for Linux, macOS
    and Windows on x86_64 and arm64, not everywhere."""
    if importlib.util.find_spec("openvino") is None:
        return "the openvino package is not installed (no wheel for this platform)"
    return None


@functools.cache
def cpu_runs_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512_BF16 or AMX), as OpenVINO sees it."""
    if openvino_missing() is not None:
        return False
    import openvino as ov

    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "BF16" in capabilities


def load_openvino() -> None:
    """Load OpenVINO's libraries and its CPU plugin, compiling a one-operation model: what the
    first model compiled in a process would otherwise take on top of its own memory (~50 MB),
    so that each model's measured memory is its own."""
    if openvino_missing() is not None:
        return
    import numpy as np
    import openvino as ov

    pixel = ov.opset13.parameter([1], np.float32, name="x")
    model = ov.Model([ov.opset13.relu(pixel)], [pixel], "load_openvino")
    ov.Core().compile_model(model, "CPU")


class OpenVinoCalls:
    """A model compiled by OpenVINO for the CPU: `streams` calls may run at once, sharing
    `threads` threads; each call is one infer request, reused."""

    def __init__(
        self, model_bytes: bytes, *, precision: Precision, streams: int, threads: int
    ) -> None:
        import openvino as ov

        core = ov.Core()
        # From the bytes alone, with no weights beside them: the file was checked to hold all
        # of its weights, and no path is given from which anything else could be read.
        model = core.read_model(model_bytes, ov.Tensor(np.empty(0, np.uint8)))
        self._compiled = core.compile_model(
            model,
            "CPU",
            {
                "INFERENCE_PRECISION_HINT": _HINTS[precision],
                "NUM_STREAMS": streams,
                "INFERENCE_NUM_THREADS": threads,
            },
        )
        chosen = str(self._compiled.get_property("INFERENCE_PRECISION_HINT")).lower()
        if not any(name in chosen for name in _NAMES[precision]):
            raise RuntimeError(f"OpenVINO compiled for {chosen}, not the {precision} asked for")
        self.precision: Precision = precision
        self.streams = int(self._compiled.get_property("NUM_STREAMS"))
        self.threads = int(self._compiled.get_property("INFERENCE_NUM_THREADS"))
        self._idle: list[Any] = []
        self._lock = threading.Lock()

    def run(
        self, names: list[str], feeds: dict[str, np.ndarray], seconds: float
    ) -> list[np.ndarray]:
        """The outputs `names` for `feeds`, each a copy the caller owns; InferenceOverran where
        the call outlasted `seconds` and was cancelled."""
        request = self._request()
        try:
            request.start_async(feeds)
            if not request.wait_for(max(1, int(seconds * 1000))):
                request.cancel()
                try:
                    request.wait()
                except RuntimeError:  # "Infer Request was canceled"
                    pass
                raise InferenceOverran(
                    f"an inference outlasted its {seconds:.0f} s bound and was stopped"
                )
            return [np.array(request.get_tensor(name).data) for name in names]
        finally:
            with self._lock:
                self._idle.append(request)

    def _request(self) -> Any:
        """An idle infer request, or a new one: as many exist as calls ever ran at once."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._compiled.create_infer_request()
