"""Export: a real tiny training run, exported, checked, proven equal, its metadata readable."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from model_contract.metadata import InvalidModelMetadata, ModelMetadata
from model_contract.preprocess import PreprocessSpec

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from model_export.checkpoint import Checkpoint, sha256_of  # noqa: E402
from model_export.export import (  # noqa: E402
    LOGIT_TOLERANCE,
    OOD_ACCEPT_RATE,
    OPSET,
    ROLLOUT_TOLERANCE,
    check_parity,
)
from model_runtime.options import CPU, IN_PROCESS  # noqa: E402
from model_runtime.session import ModelSession  # noqa: E402


def test_checkpoint_holds_everything_needed_to_rebuild(tiny_checkpoint: Path) -> None:
    checkpoint = Checkpoint.load(tiny_checkpoint)
    assert checkpoint.config.depth == 2 and checkpoint.config.image_size == 64
    assert checkpoint.preprocessing == PreprocessSpec(input_size=64, jpeg_draft=True)
    assert checkpoint.labels[0] == "circle" and len(checkpoint.labels) == 8
    assert "--depth 2" in checkpoint.command and checkpoint.metrics["steps"] == 8
    assert torch.count_nonzero(checkpoint.state_dict["head.weight"]) > 0  # training moved it


def test_graph_is_valid_with_named_io_and_dynamic_batch(tiny_onnx: Path) -> None:
    proto = onnx.load(str(tiny_onnx))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version >= OPSET
    (model_input,) = proto.graph.input
    assert model_input.name == "pixel_values"
    assert model_input.type.tensor_type.shape.dim[0].dim_param == "batch"
    names = [output.name for output in proto.graph.output]
    assert names == ["logits", "attention_rollout", "ood_score", "embedding"]


def test_metadata_round_trips_through_onnxruntime_alone(
    tiny_onnx: Path, tiny_checkpoint: Path
) -> None:
    session = ort.InferenceSession(str(tiny_onnx), providers=[CPU])
    metadata = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
    assert metadata.name == "tiny-shapes" and metadata.version == "7"
    assert metadata.preprocessing == PreprocessSpec(input_size=64, jpeg_draft=True)
    assert metadata.output == "logits" and len(metadata.labels) == 8
    assert metadata.checkpoint_sha256 == sha256_of(tiny_checkpoint)
    assert metadata.held_out_accuracy is not None and 0 <= metadata.held_out_accuracy <= 1
    assert metadata.dataset["name"] == "shapes" and metadata.dataset["held_out_seed"] == 99


def test_onnxruntime_matches_pytorch_within_tolerance(
    tiny_onnx: Path, tiny_checkpoint: Path
) -> None:
    model = Checkpoint.load(tiny_checkpoint).build_model()
    cases = check_parity(model, ModelSession(tiny_onnx, IN_PROCESS), seed=5)
    assert {(case.name, case.batch_size) for case in cases} == {
        ("random", 1),
        ("random", 8),
        ("images", 1),
        ("images", 8),
    }
    for case in cases:
        assert case.max_abs_diff <= LOGIT_TOLERANCE and case.top1_agree == case.batch_size
        assert case.max_rollout_diff <= ROLLOUT_TOLERANCE


def test_parity_check_fails_loudly_when_the_graph_differs(
    tiny_onnx: Path, tiny_checkpoint: Path
) -> None:
    model = Checkpoint.load(tiny_checkpoint).build_model()
    with torch.no_grad():
        model.head.bias.add_(1e-3)
    cases = check_parity(model, ModelSession(tiny_onnx, IN_PROCESS), seed=5)
    assert not any(case.passed for case in cases)


def test_session_probabilities_are_the_softmax_of_the_logits(tiny_onnx: Path) -> None:
    session = ModelSession(tiny_onnx, IN_PROCESS)
    batch = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    logits = session.logits(batch).astype(np.float64)
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(session.predict(batch), expected, atol=1e-7)


def test_a_model_without_metadata_is_refused(tiny_onnx: Path, tmp_path: Path) -> None:
    proto = onnx.load(str(tiny_onnx))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(InvalidModelMetadata, match="lacks name, version, labels"):
        ModelSession(bare, IN_PROCESS)


@pytest.fixture(scope="module")
def tiny_fp16(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model_export.export import PrecisionReport, export

    path = tmp_path_factory.mktemp("fp16") / "tiny-fp16.onnx"
    report, _ = export(tiny_checkpoint, path, version="7", eval_seed=99, eval_count=64, fp16=True)
    assert isinstance(report, PrecisionReport) and report.passed, report
    return path


def test_fp16_export_keeps_float32_at_the_boundary_and_says_so(
    tiny_fp16: Path, tiny_onnx: Path
) -> None:
    session = ModelSession(tiny_fp16, IN_PROCESS)
    assert session.metadata.precision == "fp16" and session.runtime["precision"] == "fp16"
    assert ModelSession(tiny_onnx, IN_PROCESS).metadata.precision == "fp32"
    raw = ort.InferenceSession(str(tiny_fp16), providers=[CPU])
    assert raw.get_inputs()[0].type == raw.get_outputs()[0].type == "tensor(float)"
    initializers = onnx.load(str(tiny_fp16)).graph.initializer
    weights = [
        w
        for w in initializers
        if len(w.dims) == 2 and not w.name.startswith(("/attention_rollout/", "/ood_score/"))
    ]
    assert weights and all(w.data_type == onnx.TensorProto.FLOAT16 for w in weights)
    assert tiny_fp16.stat().st_size < 0.6 * tiny_onnx.stat().st_size


def test_fp16_probabilities_stay_close_to_fp32(tiny_fp16: Path, tiny_checkpoint: Path) -> None:
    from model_export.export import FP16_PROBABILITY_TOLERANCE, compare_precision

    model = Checkpoint.load(tiny_checkpoint).build_model()
    session = ModelSession(tiny_fp16, IN_PROCESS)
    report = compare_precision(model, session, seed=123, count=128)
    assert report.count == 128 and report.passed
    assert 0 < report.max_probability_diff <= FP16_PROBABILITY_TOLERANCE  # half, not float32
    # The same comparison catches a model that is not the one exported.
    with torch.no_grad():
        model.head.bias.add_(0.5 * torch.arange(8.0))
    assert not compare_precision(model, session, seed=123, count=128).passed


@pytest.mark.parametrize("kind", ["onnx", "foreign"])
def test_a_file_vit_train_did_not_write_is_refused_pointing_to_the_importer(
    tmp_path: Path, kind: str
) -> None:
    from model_export.export import main
    from tests.onnx_models import classifier

    if kind == "onnx":
        source, hint = tmp_path / "foreign.onnx", "vit-import onnx"
        classifier(source, size=64, classes=3)
    else:
        source, hint = tmp_path / "foreign.pt", "vit-import hf"
        torch.save({"model": {"w": torch.zeros(2)}}, source)
    with pytest.raises(SystemExit, match=hint):
        main([str(source), "-o", str(tmp_path / "out.onnx")])


def test_the_file_carries_rollout_ood_and_self_test(tiny_onnx: Path) -> None:
    session = ModelSession(tiny_onnx, IN_PROCESS)
    metadata = session.metadata
    assert metadata.output_name == "logits" and metadata.attention_output == "attention_rollout"
    raw = ort.InferenceSession(str(tiny_onnx), providers=[CPU])
    batch = np.random.default_rng(1).standard_normal((3, 3, 64, 64)).astype(np.float32)
    logits, rollout, score = raw.run(
        ["logits", "attention_rollout", "ood_score"], {"pixel_values": batch}
    )
    assert logits.shape == (3, 8) and rollout.shape == (3, 4, 4) and rollout.dtype == np.float32
    assert ((rollout > 0) & (rollout < 1)).all()
    assert score.shape == (3,) and score.dtype == np.float32 and (score < 0).all()
    ood = metadata.ood
    # The Mahalanobis score and its combination with the energy flag the most of the generated
    # outliers the score is chosen on, tied: the combination, named first, is kept.
    assert ood is not None and ood.score == "mahalanobis_energy"
    assert ood.accept_rate == OOD_ACCEPT_RATE
    assert ood.calibration_images == 64 and "seed 2000003, images 64-127" in ood.calibration_source
    assert ood.choice is not None and "32 generated non-shape images" in ood.choice
    names = ("mahalanobis_energy", "mahalanobis", "energy", "max_softmax")
    assert all(f"{score} " in ood.choice for score in names)
    # Measured on the held-out evaluation images, which neither fit nor set it.
    assert ood.held_out_images == 64 and ood.held_out_flagged is not None
    assert ood.held_out_flagged <= 64 * (1 - OOD_ACCEPT_RATE) + 8
    test = metadata.self_test
    assert test is not None and len(test.images) == 4 and test.tolerance >= 1e-3
    from model_export.stamp import served_probabilities

    images = [base64.b64decode(image) for image in test.images]
    assert all(image.startswith(b"\x89PNG") and len(image) < 20_000 for image in images)
    np.testing.assert_allclose(served_probabilities(session, images), test.probabilities, atol=1e-6)


def test_a_file_vit_export_wrote_is_brought_up_to_date_with_the_same_numbers(
    tiny_onnx: Path, tmp_path: Path
) -> None:
    from model_export.export import main
    from model_export.rollout import strip_rollout

    proto = onnx.load(str(tiny_onnx))
    strip_rollout(proto)
    metadata = ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    old = metadata.model_copy(
        update={"attention_output": None, "ood": None, "self_test": None, "output_name": None}
    )
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, old.to_props())
    before = tmp_path / "before.onnx"
    onnx.save(proto, str(before))
    after = tmp_path / "after.onnx"
    main([str(before), "-o", str(after), "--eval-seed", "99", "--eval-count", "64",
          "--calibration-count", "64"])  # fmt: skip
    batch = np.random.default_rng(2).standard_normal((5, 3, 64, 64)).astype(np.float32)
    old_logits = ModelSession(before, IN_PROCESS).logits(batch)
    new = ModelSession(after, IN_PROCESS)
    assert np.array_equal(new.logits(batch), old_logits)
    assert new.metadata.version == "7" and new.metadata.attention_output == "attention_rollout"
    assert new.metadata.ood == metadata.ood and new.metadata.self_test == metadata.self_test


@pytest.mark.parametrize("rate", ["0", "1.5", "-0.2"])
def test_an_acceptance_that_is_not_a_share_is_refused_before_any_work(
    tmp_path: Path, rate: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from model_export.export import main

    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                str(tmp_path / "missing.pt"),
                "-o",
                str(tmp_path / "out.onnx"),
                "--ood-accept-rate",
                rate,
            ]
        )
    assert exit_info.value.code == 2
    assert f"{rate} is not a share" in capsys.readouterr().err
