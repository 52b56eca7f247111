"""Which engine serves: under VIT_ENGINE=auto both are timed at load and the faster whose
self-test passes is kept; a missing engine or one that fails its self-test is left out, saying
why; and an FP32 file never runs at reduced precision on either."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest

from model_contract.metadata import SelfTest
from model_contract.preprocess import preprocess_upload
from model_export.sealing import write_metadata
from model_runtime import engine_choice, load_check
from model_runtime.engine_choice import Candidate, Timing
from model_runtime.openvino_engine import openvino_missing
from model_runtime.options import CPU, IN_PROCESS, RuntimeOptions
from model_runtime.session import ModelSession

pytestmark = pytest.mark.skipif(openvino_missing() is not None, reason="no OpenVINO here")

AUTO = RuntimeOptions(providers=(CPU,))
NOT_INSTALLED = "the openvino package is not installed (no wheel for this platform)"


def image_shape(session: ModelSession) -> tuple[int, int, int]:
    side = session.metadata.preprocessing.input_size
    return (3, side, side)


def two_calls_of_8(candidate: Candidate, batched: float, *, singles: float) -> Timing:
    """A load-time timing of two calls at once: `batched` images/s on 8 images each, `singles`
    on one image each."""
    return Timing(
        candidate,
        images_per_second=batched,
        lone_ms=20.0,
        batch=8,
        calls=2,
        singles_per_second=singles,
    )


def golden(session: ModelSession) -> tuple[list[np.ndarray], np.ndarray]:
    """The file's golden images as the service decodes them, and its expectations."""
    test = session.metadata.self_test
    assert test is not None, "the bundled model carries a self-test"
    spec = session.metadata.preprocessing
    tensors = [preprocess_upload(base64.b64decode(image), spec)[0] for image in test.images]
    return tensors, np.asarray(test.probabilities, dtype=np.float64)


def test_auto_times_both_engines_and_keeps_the_one_it_names(served_model: Path) -> None:
    session = ModelSession(served_model, AUTO)
    assert session.choosing and session.engine == "onnxruntime"  # until measured
    session.choose_engine(*golden(session))
    assert not session.choosing
    choice = session.engine_choice
    assert choice.startswith(f"auto: {session.engine} is the faster that passed")
    for engine in ("onnxruntime fp32:", "openvino fp32:"):
        assert engine in choice and "images/s" in choice and "ms for one image alone" in choice
    assert session.runtime["engine"] == session.engine
    # A small model's batches are short: it batches at every load, however close the rates.
    assert not session.one_image_per_call and session.runtime["batch"] != "one image per call"
    # Whichever serves, the answers are the reference's, to float32 rounding.
    images = np.random.default_rng(0).random((5, *image_shape(session)), np.float32)
    reference = ModelSession(served_model, IN_PROCESS).predict(images)
    np.testing.assert_allclose(session.predict(images), reference, atol=1e-5)


@pytest.mark.parametrize("faster", ["onnxruntime", "openvino"])
def test_auto_serves_whichever_measured_faster(
    served_model: Path, faster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def timed(candidate: Candidate, *args: object) -> Timing:
        rate = 300.0 if candidate.engine == faster else 100.0
        return two_calls_of_8(candidate, rate, singles=rate / 2)

    monkeypatch.setattr("model_runtime.session.time_candidate", timed)
    session = ModelSession(served_model, AUTO)
    session.choose_engine(*golden(session))
    assert session.engine == faster and session.runtime["engine"] == faster
    assert "300 images/s" in session.engine_choice and "100 images/s" in session.engine_choice


@pytest.mark.parametrize(
    ("batched", "singles", "one_image"),
    [(10.0, 5.0, False), (10.0, 7.9, False), (10.0, 9.5, True), (100.0, 95.0, False)],
)
def test_one_image_per_call_serves_where_batching_gains_too_little(
    served_model: Path,
    batched: float,
    singles: float,
    one_image: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A large model on a CPU: two calls of one image each side by side do nearly what two
    batches of 8 side by side do (10 images/s here, 1.6 s a batch), so every call holds one
    image; where batches do far better, they serve. A quick model's batches (160 ms at 100
    images/s) serve however close the rates. The calls at once and their threads stay as
    planned."""

    def timed(candidate: Candidate, *args: object) -> Timing:
        return two_calls_of_8(candidate, batched, singles=singles)

    monkeypatch.setattr("model_runtime.session.time_candidate", timed)
    session = ModelSession(served_model, AUTO)
    planned = session.runtime
    session.choose_engine(*golden(session))
    assert one_image == (
        singles >= engine_choice.ONE_IMAGE_SERVES_FROM * batched
        and 2 * 8 * 1000 / batched >= engine_choice.ONE_IMAGE_PER_CALL_FROM_MS
    )
    assert session.one_image_per_call == one_image
    assert (session.runtime["batch"] == "one image per call") == one_image
    assert ("one image per call, 2 at once" in session.engine_choice) == one_image
    assert session.inference_workers == 2
    if session.engine == "onnxruntime":
        assert session.runtime["intra_op_threads"] == planned["intra_op_threads"]
    images = np.random.default_rng(2).random((3, *image_shape(session)), np.float32)
    reference = ModelSession(
        served_model, IN_PROCESS.model_copy(update={"engine": session.engine})
    ).predict(images)
    np.testing.assert_array_equal(session.predict(images), reference)


@pytest.mark.parametrize("faster", ["onnxruntime", "openvino"])
def test_auto_compares_engines_by_what_they_would_serve_under_load(
    served_model: Path, faster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where batching gains too little, an engine serves calls of one image each: the engine
    with more such images a second is kept, though the other runs batches faster."""

    def timed(candidate: Candidate, *args: object) -> Timing:
        singles = 9.5 if candidate.engine == faster else 8.5
        batched = 9.0 if candidate.engine == faster else 10.0
        return two_calls_of_8(candidate, batched, singles=singles)

    monkeypatch.setattr("model_runtime.session.time_candidate", timed)
    session = ModelSession(served_model, AUTO)
    session.choose_engine(*golden(session))
    assert session.engine == faster and session.one_image_per_call
    assert session.engine_choice.endswith(
        "one image per call, 2 at once: 9.5 images/s against 9 batched"
    )


def test_without_openvino_auto_is_onnxruntime_and_says_why(
    served_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in (engine_choice, load_check):
        monkeypatch.setattr(module, "openvino_missing", lambda: NOT_INSTALLED)
    for wanted in ("auto", "openvino"):
        session = ModelSession(served_model, AUTO.model_copy(update={"engine": wanted}))
        assert session.engine == "onnxruntime"
        assert f"engine {wanted}: {NOT_INSTALLED}; onnxruntime" in session.fallbacks
        session.choose_engine(*golden(session))
        assert session.runtime["engine"] == "onnxruntime"
        why = f"engine {wanted}: {NOT_INSTALLED}; onnxruntime (onnxruntime fp32: "
        assert session.engine_choice.startswith(why)
        assert "openvino fp32" not in session.engine_choice


def test_an_engine_that_fails_the_self_test_is_not_served(
    served_model: Path, tmp_path: Path
) -> None:
    """A file whose expectations are onnxruntime's own numbers with no tolerance at all:
    OpenVINO's float32 rounding differs in the last bits, so it fails the self-test and
    onnxruntime serves, however fast OpenVINO was."""
    reference = ModelSession(served_model, IN_PROCESS)
    tensors, _ = golden(reference)
    exact = np.concatenate([reference.predict(t) for t in tensors])
    openvino = ModelSession(served_model, IN_PROCESS.model_copy(update={"engine": "openvino"}))
    on_openvino = np.concatenate([openvino.predict(t) for t in tensors])
    assert not np.array_equal(exact, on_openvino), "the engines round differently"
    test = reference.metadata.self_test
    assert test is not None
    strict = SelfTest(
        images=test.images,
        probabilities=tuple(tuple(float(p) for p in row) for row in exact),
        tolerance=1e-12,
    )
    path = tmp_path / "strict.onnx"
    path.write_bytes(served_model.read_bytes())
    write_metadata(path, reference.metadata.model_copy(update={"self_test": strict}))
    session = ModelSession(path, AUTO)
    session.choose_engine(tensors, np.asarray(strict.probabilities, dtype=np.float64))
    assert session.engine == "onnxruntime"
    assert "openvino fp32 failed the self-test" in session.engine_choice
    assert "onnxruntime fp32:" in session.engine_choice


def test_an_fp32_file_runs_at_fp32_on_openvino(served_model: Path) -> None:
    """OpenVINO would choose bf16 by itself on this CPU; bf16 would move these probabilities
    by around 1e-2, float32 by under 1e-6."""
    session = ModelSession(served_model, IN_PROCESS.model_copy(update={"engine": "openvino"}))
    assert session.engine == "openvino" and session.precision == "fp32"
    assert session.runtime["precision"] == "fp32"
    images = np.random.default_rng(1).random((8, *image_shape(session)), np.float32)
    reference = ModelSession(served_model, IN_PROCESS).infer(images)
    served = session.infer(images)
    np.testing.assert_allclose(served["probabilities"], reference["probabilities"], atol=1e-5)
    np.testing.assert_allclose(
        served["attention_rollout"], reference["attention_rollout"], atol=1e-5
    )
    np.testing.assert_allclose(served["ood_score"], reference["ood_score"], rtol=1e-5)


def test_a_bf16_file_runs_at_fp32_where_the_cpu_has_no_bf16(
    served_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = ModelSession(served_model, IN_PROCESS)
    path = tmp_path / "bf16.onnx"
    path.write_bytes(served_model.read_bytes())
    write_metadata(path, reference.metadata.model_copy(update={"precision": "bf16"}))
    monkeypatch.setattr(engine_choice, "cpu_runs_bf16", lambda: False)
    session = ModelSession(path, IN_PROCESS.model_copy(update={"engine": "openvino"}))
    assert session.precision == "fp32" and session.precision_why == engine_choice.NO_BF16_CPU
    assert session.runtime["file_precision"] == "bf16"
    on_onnxruntime = ModelSession(path, IN_PROCESS)
    assert on_onnxruntime.precision == "fp32"
    assert on_onnxruntime.precision_why == "onnxruntime computes a bf16 file at fp32"
