"""Every onnxruntime call stopped past its bound, however its graph loops."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from model_runtime.watchdog import InferenceOverran, watchdog
from tests.hostile_models import SIZE, endless_loop
from tests.onnx_models import classifier


def test_a_call_past_its_bound_is_stopped_and_the_options_serve_again(tmp_path: Path) -> None:
    endless = ort.InferenceSession(
        endless_loop(tmp_path / "endless.onnx").read_bytes(), providers=["CPUExecutionProvider"]
    )
    feeds = {"pixels": np.zeros((1, 3, SIZE, SIZE), np.float32)}
    options = ort.RunOptions()
    began = time.monotonic()
    with pytest.raises(InferenceOverran, match="outlasted its 1 s bound"):
        with watchdog().bounded(1.0, options) as bounded:
            endless.run(None, feeds, bounded)
    assert 0.9 < time.monotonic() - began < 5
    assert not options.terminate  # reusable for the next call
    plain = ort.InferenceSession(
        classifier(tmp_path / "plain.onnx").read_bytes(), providers=["CPUExecutionProvider"]
    )
    with watchdog().bounded(1.0, options) as bounded:
        assert plain.run(None, {"pixels": feeds["pixels"]}, bounded)[0].shape == (1, 3)


def test_calls_at_once_each_keep_their_own_bound(tmp_path: Path) -> None:
    endless = ort.InferenceSession(
        endless_loop(tmp_path / "endless.onnx").read_bytes(), providers=["CPUExecutionProvider"]
    )
    feeds = {"pixels": np.zeros((1, 3, SIZE, SIZE), np.float32)}
    stopped: dict[float, float] = {}

    def call(seconds: float) -> None:
        began = time.monotonic()
        with pytest.raises(InferenceOverran), watchdog().bounded(seconds) as options:
            endless.run(None, feeds, options)
        stopped[seconds] = time.monotonic() - began

    threads = [threading.Thread(target=call, args=(s,)) for s in (2.0, 0.5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert 0.4 < stopped[0.5] < 1.5 and 1.9 < stopped[2.0] < 3.5
