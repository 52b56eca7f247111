"""Metadata against the graph, at load: a model that disagrees with its metadata never serves, and
`vit-serve` says why in one line and exits within seconds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto

from harness.servers import free_port
from model_contract.metadata import InvalidModelMetadata
from model_contract.preprocess import PreprocessSpec, preprocess
from model_runtime.graph_check import ModelMismatch, inspect_model
from model_runtime.options import IN_PROCESS
from model_runtime.session import ModelSession, softmax
from tests.conftest import ROOT
from tests.images import asymmetric, encode
from tests.onnx_models import classifier, expected_logits, metadata_for
from tests.service_support import cpu_settings, ready_client

LABELS = ["red", "green", "blue"]


def serve_exit(model: Path, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run vit-serve on a model that must be refused; it has to exit by itself."""
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "--model", str(model), "--port", str(free_port())],
        cwd=ROOT,
        env={"VIT_PROVIDERS": '["CPUExecutionProvider"]', "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_refused_in_one_line(model: Path, *needles: str) -> None:
    result = serve_exit(model)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_an_onnx_file_without_metadata_is_refused_naming_the_fix(tmp_path: Path) -> None:
    model = classifier(tmp_path / "plain.onnx")
    assert_refused_in_one_line(model, "lacks name, version, labels", "vit-import onnx")


def test_an_input_size_unlike_the_graphs_is_refused(tmp_path: Path) -> None:
    model = classifier(tmp_path / "m.onnx", size=32, metadata=metadata_for(LABELS, 64))
    assert_refused_in_one_line(model, "input_size 64", "--input-size 32", "[batch, 3, 32, 32]")


def test_fewer_labels_than_the_output_is_wide_are_refused(tmp_path: Path) -> None:
    model = classifier(tmp_path / "m.onnx", metadata=metadata_for(["a", "b"], 32))
    assert_refused_in_one_line(model, "2 labels", "3 classes", "--labels")


def test_a_file_that_is_not_onnx_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not a model")
    assert_refused_in_one_line(model, "not an ONNX model")


def test_an_output_width_the_graph_declares_is_checked_at_load(tmp_path: Path) -> None:
    model = classifier(
        tmp_path / "m.onnx", classes="classes", weights_classes=4, metadata=metadata_for(LABELS, 32)
    )
    with pytest.raises(ModelMismatch, match="3 labels but the graph's output has 4 classes"):
        inspect_model(model)


def test_a_width_known_only_at_run_time_fails_the_warm_up_which_ends_the_process(
    tmp_path: Path,
) -> None:
    model = classifier(
        tmp_path / "m.onnx",
        size="s",
        classes="classes",
        weights_classes=64,
        width_from_input=True,
        metadata=metadata_for(LABELS, 32),
    )
    assert inspect_model(model)[1].output_width is None  # nothing to see in the graph alone
    result = serve_exit(model)
    assert result.returncode != 0
    assert "warm-up failed" in result.stderr and "32 classes" in result.stderr


def test_logits_stamped_as_probabilities_fail_the_warm_up_which_ends_the_process(
    tmp_path: Path,
) -> None:
    model = classifier(
        tmp_path / "m.onnx", metadata=metadata_for(LABELS, 32, output="probabilities")
    )
    result = serve_exit(model)
    assert result.returncode != 0
    assert "says the output is probabilities" in result.stderr, result.stderr
    assert "--output-kind logits" in result.stderr


def test_a_float16_input_is_refused(tmp_path: Path) -> None:
    model = classifier(
        tmp_path / "m.onnx", input_type=TensorProto.FLOAT16, metadata=metadata_for(LABELS, 32)
    )
    with pytest.raises(ModelMismatch, match=r"is tensor\(float16\); the service sends float32"):
        inspect_model(model)


def test_symbolic_batch_and_sizes_are_accepted(tmp_path: Path) -> None:
    model = classifier(tmp_path / "m.onnx", size="s", metadata=metadata_for(LABELS, 32))
    assert inspect_model(model)[1].fixed_batch_size is None


def test_the_output_named_in_the_metadata_is_served(tmp_path: Path) -> None:
    metadata = metadata_for(LABELS, 32, output_name="logits")
    model = classifier(tmp_path / "m.onnx", extra_output=True, metadata=metadata)
    session = ModelSession(model, IN_PROCESS)
    batch = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(session.logits(batch), expected_logits(batch), atol=1e-5)
    missing = classifier(tmp_path / "n.onnx", metadata=metadata_for(LABELS, 32, output_name="x"))
    with pytest.raises(InvalidModelMetadata, match="names the output 'x'"):
        inspect_model(missing)


def test_a_fixed_batch_of_one_serves_multi_image_requests(tmp_path: Path) -> None:
    model = classifier(tmp_path / "m.onnx", batch=1, metadata=metadata_for(LABELS, 32))
    session = ModelSession(model, IN_PROCESS)
    assert session.fixed_batch_size == 1
    images = [asymmetric((64 + 8 * i, 48)) for i in range(5)]
    spec = PreprocessSpec(input_size=32)
    batch = np.concatenate([preprocess(image, spec) for image in images])
    expected = softmax(expected_logits(batch))
    with ready_client(cpu_settings(model)) as client:
        files = [
            ("file", (f"{i}.png", encode(image), "image/png")) for i, image in enumerate(images)
        ]
        response = client.post("/v1/classify?probabilities=true", files=files)
    assert response.status_code == 200, response.text
    got = np.array([p["probabilities"] for p in response.json()["predictions"]])
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_a_non_square_input_is_refused_as_such(tmp_path: Path) -> None:
    import onnx

    model = classifier(tmp_path / "m.onnx", metadata=metadata_for(LABELS, 32))
    proto = onnx.load(str(model))
    proto.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 40
    onnx.save(proto, str(model))
    with pytest.raises(ModelMismatch, match=r"\[batch, 3, 32, 40\] is not square"):
        inspect_model(model)


def test_a_float16_output_is_served_without_the_float32_bound_buffers(tmp_path: Path) -> None:
    import onnx
    from onnx import helper

    model = classifier(tmp_path / "m.onnx", metadata=metadata_for(LABELS, 32))
    proto = onnx.load(str(model))
    proto.graph.node[-1].output[0] = "logits32"
    proto.graph.node.append(
        helper.make_node("Cast", ["logits32"], ["logits"], to=TensorProto.FLOAT16)
    )
    proto.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.save(proto, str(model))
    session = ModelSession(model, IN_PROCESS.model_copy(update={"io_binding": True}))
    assert session.runtime["io_binding"] == "off"
    assert any("tensor(float16)" in fallback for fallback in session.fallbacks)
    batch = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    probabilities = session.predict(batch)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, softmax(expected_logits(batch)), atol=2e-3)


def test_files_from_before_jpeg_draft_existed_keep_draft_decoding() -> None:
    from model_contract.metadata import ModelMetadata

    legacy = {
        "input_size": 128, "resize": "shorter_side", "interpolation": "bilinear",
        "crop": "center", "crop_pct": 1.0, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
        "channel_order": "RGB", "layout": "NCHW", "alpha_background": [255, 255, 255],
    }  # fmt: skip
    props = metadata_for(LABELS, 128).to_props()
    old = ModelMetadata.from_props({**props, "preprocessing": json.dumps(legacy)})
    assert old.preprocessing.jpeg_draft is True
    by_hand = {"input_size": 128, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    new = ModelMetadata.from_props({**props, "preprocessing": json.dumps(by_hand)})
    assert new.preprocessing.jpeg_draft is False
