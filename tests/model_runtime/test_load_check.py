"""A model's first session and inferences in a process of their own: bounded in time, measured
in memory, and each output one row per image, or the model is refused."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from model_runtime.load_check import LoadCheckFailed, check_in_a_process, time_bound
from model_runtime.options import IN_PROCESS, RuntimeOptions
from model_runtime.session import ModelSession, OutputRowsMismatch
from tests.hostile_models import (
    COLOURS,
    SIZE,
    batch_ignoring,
    batch_ignoring_when_bright,
    endless_loop,
    memory_bomb,
)
from tests.onnx_models import classifier, metadata_for

QUICK = IN_PROCESS.model_copy(update={"model_check_timeout_s": 2.0})


def test_a_graph_that_never_finishes_is_refused_within_the_bound(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(LoadCheckFailed, match="did not finish within 2 s"):
        ModelSession(endless_loop(tmp_path / "model.onnx"), QUICK)
    assert time.monotonic() - started < 10  # the bound, not the graph, decided


def test_an_output_that_ignores_the_batch_is_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(LoadCheckFailed, match=r"logits gives shape \[1, 3\] for a batch of 2"):
        ModelSession(batch_ignoring(tmp_path / "model.onnx"), IN_PROCESS)


def test_every_call_is_checked_for_one_row_per_image(tmp_path: Path) -> None:
    session = ModelSession(batch_ignoring_when_bright(tmp_path / "model.onnx"), IN_PROCESS)
    dark = np.zeros((2, 3, SIZE, SIZE), np.float32)
    assert session.predict(dark).shape == (2, 3)
    with pytest.raises(OutputRowsMismatch, match=r"logits gave \[1, 3\] for 2 images"):
        session.predict(dark + 1)


def test_memory_is_measured_and_a_bound_refuses_a_graph_over_it(tmp_path: Path) -> None:
    model = memory_bomb(tmp_path / "model.onnx", floats=100_000_000)  # 400 MB per call
    check = check_in_a_process(model.read_bytes(), IN_PROCESS)
    assert check.peak_bytes > 200 << 20
    with pytest.raises(LoadCheckFailed, match=r"took \d+ MB, over the 100 MB"):
        ModelSession(model, IN_PROCESS, max_memory_bytes=100 << 20)


def test_an_ordinary_model_passes_with_its_shapes_and_memory(tmp_path: Path) -> None:
    model = classifier(tmp_path / "model.onnx", metadata=metadata_for(["a", "b", "c"], 32))
    check = ModelSession(model, IN_PROCESS).load_check
    assert check.output_shapes == {1: {"logits": (1, 3)}, 2: {"logits": (2, 3)}}
    assert 0 <= check.peak_bytes < 100 << 20 and check.seconds < QUICK.model_check_timeout_s


def test_the_time_bound_grows_with_the_file() -> None:
    options = RuntimeOptions(model_check_timeout_s=10, model_check_seconds_per_gb=60)
    assert time_bound(options, 0) == 10
    assert time_bound(options, 500_000_000) == pytest.approx(40)


def test_a_model_asking_for_an_input_too_large_to_check_is_refused_unrun(tmp_path: Path) -> None:
    proto = onnx.load(str(endless_loop(tmp_path / "endless.onnx")))
    for dim in proto.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "side"  # symbolic: the metadata's input size is what is fed
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata_for(COLOURS, 4097).to_props())
    onnx.save(proto, str(tmp_path / "huge.onnx"))
    started = time.monotonic()
    with pytest.raises(LoadCheckFailed, match="input size 4097 is over the 4096 pixels"):
        ModelSession(tmp_path / "huge.onnx", QUICK)
    assert time.monotonic() - started < QUICK.model_check_timeout_s


def test_a_graph_the_checks_session_cannot_load_is_refused_there(tmp_path: Path) -> None:
    """Refused by the check itself: a session on another provider must not load what the check
    never ran."""
    proto = onnx.load(str(classifier(tmp_path / "m.onnx", metadata=metadata_for(COLOURS, 32))))
    proto.graph.node.append(onnx.helper.make_node("NoSuchOperator", ["logits"], ["unused"]))
    onnx.save(proto, str(tmp_path / "unknown.onnx"))
    with pytest.raises(LoadCheckFailed, match="not an ONNX model onnxruntime can load"):
        check_in_a_process((tmp_path / "unknown.onnx").read_bytes(), IN_PROCESS)
