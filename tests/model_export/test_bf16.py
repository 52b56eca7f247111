"""bf16 files: stamped only once the gate, measured here in bf16, passes; run in bf16 where the
CPU computes it and at FP32 elsewhere, their self-test holding either way."""

from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from model_export import bf16
from model_export.bf16 import (
    BF16_MAX_PROBABILITY_DIFF,
    Bf16Report,
    bf16_drift,
    bf16_gate,
    bf16_session,
)
from model_export.evaluate import ENGINES
from model_export.evaluate import main as vit_eval
from model_export.importing import PHOTOS, ImportRefused, image_files
from model_export.stamp import served_probabilities
from model_runtime.openvino_engine import ONNXRUNTIME, OPENVINO, cpu_runs_bf16
from model_runtime.options import IN_PROCESS
from model_runtime.session import ModelSession
from tests.service_support import cpu_settings, ready_client

pytest.importorskip("onnx")
pytest.importorskip("torch")

from model_export.export import export, held_out  # noqa: E402
from model_export.export import main as vit_export  # noqa: E402
from model_export.import_onnx import import_onnx  # noqa: E402
from model_export.importer import main as vit_import  # noqa: E402
from model_export.sealing import write_metadata  # noqa: E402
from tests.onnx_models import ranked_by_weights  # noqa: E402

needs_bf16 = pytest.mark.skipif(
    not cpu_runs_bf16(),
    reason="this machine cannot run bf16: no OpenVINO, or a CPU without AVX512_BF16 or AMX",
)

SEED = 1_000_003  # vit-export's held-out seed: the images docs/BF16.md measures on
# How far bf16 may move what the gate does not judge, on the bundled model's held-out images:
# 2 to 4 times the worst measured over four seeds of 2,000 images (docs/BF16.md).
ROLLOUT_TOLERANCE = 5e-3
OOD_SCORE_TOLERANCE = 15.0
OOD_RELATIVE_TOLERANCE = 0.15
FLAGS_CHANGED_SHARE = 0.005


@pytest.fixture(scope="module")
def shapes_bf16(
    served_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Bf16Report]:
    """The bundled model exported as `vit-export --bf16` exports it (from its own file: its
    checkpoint is not in the repository), on fewer images than by default."""
    if not cpu_runs_bf16():
        pytest.skip("this machine cannot run bf16: no OpenVINO, or a CPU without bf16")
    path = tmp_path_factory.mktemp("bf16") / "shapes-bf16.onnx"
    report, _ = export(
        served_model,
        path,
        version=None,
        eval_seed=SEED,
        eval_count=256,
        calibration_count=256,
        bf16=True,
    )
    assert isinstance(report, Bf16Report)
    return path, report


@pytest.fixture(scope="module")
def bundled_in_bf16(served_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model itself, its rollout and out-of-distribution calibration untouched,
    stamped bf16: what bf16 does to them, measured."""
    path = tmp_path_factory.mktemp("bundled") / "shapes-bf16.onnx"
    shutil.copyfile(served_model, path)
    metadata = ModelSession(served_model, IN_PROCESS).metadata
    write_metadata(path, metadata.model_copy(update={"precision": "bf16"}))
    return path


@needs_bf16
def test_the_bundled_model_passes_the_gate_and_runs_in_bf16(
    shapes_bf16: tuple[Path, Bf16Report],
) -> None:
    path, report = shapes_bf16
    assert report.passed and report.images == 256, report.line()
    assert 0 < report.max_probability_diff <= BF16_MAX_PROBABILITY_DIFF  # bf16 really ran
    in_bf16 = ModelSession(path, ENGINES[OPENVINO])
    in_fp32 = ModelSession(path, IN_PROCESS)
    assert in_bf16.metadata.precision == "bf16"
    assert (in_bf16.engine, in_bf16.precision) == (OPENVINO, "bf16")
    assert (in_fp32.engine, in_fp32.precision) == (ONNXRUNTIME, "fp32")


@needs_bf16
def test_the_self_test_expects_fp32_and_tolerates_bf16(
    shapes_bf16: tuple[Path, Bf16Report],
) -> None:
    path, report = shapes_bf16
    test = ModelSession(path, IN_PROCESS).metadata.self_test
    assert test is not None
    golden = [base64.b64decode(image) for image in test.images]
    expected = np.array(test.probabilities)
    worst = {
        engine: float(
            np.abs(served_probabilities(ModelSession(path, options), golden) - expected).max()
        )
        for engine, options in ENGINES.items()
    }
    assert worst[ONNXRUNTIME] < 1e-6  # the expectations are the FP32 probabilities
    assert 1e-6 < worst[OPENVINO] <= test.tolerance  # bf16 moves them, within the tolerance
    assert test.tolerance >= 2 * report.max_probability_diff


@needs_bf16
def test_the_service_serves_a_bf16_file_in_bf16_once_its_self_test_passes(
    shapes_bf16: tuple[Path, Bf16Report],
) -> None:
    path, _ = shapes_bf16
    with ready_client(cpu_settings(path, engine=OPENVINO)) as client:
        (model,) = client.get("/v1/models").json()["models"]
    assert model["runtime"]["engine"] == OPENVINO and model["runtime"]["precision"] == "bf16"
    assert model["self_test"]["status"] == "passed", model["self_test"]


@needs_bf16
def test_held_out_accuracy_in_bf16_is_within_a_third_of_a_point_of_fp32(
    shapes_bf16: tuple[Path, Bf16Report], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = shapes_bf16
    right = {}
    for engine in (ONNXRUNTIME, OPENVINO):
        vit_eval([str(path), "--seed", str(SEED), "--count", "1000", "--engine", engine])
        out = capsys.readouterr().out
        ran = out.splitlines()[0]
        assert ran.startswith(f"{engine} {'bf16' if engine == OPENVINO else 'fp32'}:"), ran
        found = re.search(r"accuracy [\d.]+% \((\d+)/1000\)", out)
        assert found is not None, out
        right[engine] = int(found.group(1))
    assert right[ONNXRUNTIME] > 950  # a trained model, not chance
    assert abs(right[OPENVINO] - right[ONNXRUNTIME]) / 1000 <= 0.003, right


@needs_bf16
def test_bf16_moves_the_rollout_and_the_ood_score_within_the_stated_tolerances(
    bundled_in_bf16: Path,
) -> None:
    fp32 = ModelSession(bundled_in_bf16, IN_PROCESS)
    spec = fp32.metadata.preprocessing
    batches = [batch for batch, _ in held_out(spec, seed=SEED, count=512)]
    drift = bf16_drift(fp32, bf16_session(bundled_in_bf16), batches)
    assert drift.images == 512 and drift.max_rollout_diff is not None and drift.ood is not None
    assert 0 < drift.max_rollout_diff <= ROLLOUT_TOLERANCE, drift.line()
    assert 0 < drift.ood.max_diff <= OOD_SCORE_TOLERANCE, drift.line()
    assert drift.ood.max_relative_diff <= OOD_RELATIVE_TOLERANCE, drift.line()
    assert drift.ood.flags_changed <= FLAGS_CHANGED_SHARE * drift.images, drift.line()


def test_the_gate_counts_agreement_and_the_largest_probability_difference() -> None:
    fp32 = np.zeros((100, 2), dtype=np.float32)
    fp32[:, 0] = 1.0  # every image class 0, at probability 0.731
    moved = fp32.copy()
    moved[0] = [0.0, 1.0]  # one answer flipped: 99% agreement, a probability 0.46 off
    report = bf16_gate(fp32, moved)
    assert report.top1_agreement == 0.99 and report.max_probability_diff == pytest.approx(
        0.462, 1e-3
    )
    assert not report.passed and "a probability 0.462 off FP32's" in report.refusal()
    nudged = fp32.copy()
    nudged[:, 0] = 1.1  # every answer kept, each probability 0.02 higher
    assert bf16_gate(fp32, nudged).passed


def tie_and_shift(folder: Path) -> dict[str, Path]:
    """Two classifiers whose weights bf16 rounds: the first's two classes tie in bf16 (64.05 is
    64 in bf16) where FP32 ranks them; the second keeps its ranking but its gap doubles (128.45
    is 128), moving each probability by about 0.1."""
    return {
        "tie": ranked_by_weights(folder / "tie.onnx", [64.0, 64.05]),
        "shift": ranked_by_weights(folder / "shift.onnx", [129.0, 128.45]),
    }


@needs_bf16
@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("tie", "top-1 equal to FP32's on 0.00% of 5 images, under 99%"),
        ("shift", "a probability 0.1"),
    ],
)
def test_a_model_that_bf16_moves_too_far_is_refused(tmp_path: Path, name: str, says: str) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("first\nsecond\n")
    output = tmp_path / "out.onnx"
    with pytest.raises(ImportRefused) as refused:
        import_onnx(
            tie_and_shift(tmp_path)[name],
            output,
            labels=labels,
            check_images=image_files(PHOTOS),
            rollout=False,
            bf16=True,
        )
    assert str(refused.value).startswith("bf16 moves this model's answers too far (")
    assert says in str(refused.value) and str(refused.value).endswith("serve it in FP32")
    assert not output.exists()
    # The same graph without --bf16 is an FP32 file like any other.
    import_onnx(
        tie_and_shift(tmp_path)[name],
        output,
        labels=labels,
        check_images=image_files(PHOTOS),
        rollout=False,
    )
    assert ModelSession(output, IN_PROCESS).metadata.precision == "fp32"


@needs_bf16
def test_the_import_refusal_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("first\nsecond\n")
    output = tmp_path / "out" / "tie.onnx"
    model = tie_and_shift(tmp_path)["tie"]
    with pytest.raises(SystemExit) as exit_:
        vit_import(
            [
                "onnx",
                str(model),
                "--labels",
                str(labels),
                "--no-rollout",
                "--bf16",
                "-o",
                str(output),
            ]
        )
    line = str(exit_.value.code)
    assert line.startswith("vit-import: bf16 moves this model's answers too far (top-1 equal")
    assert "\n" not in line
    assert not (tmp_path / "out").exists()


@needs_bf16
def test_the_export_refusal_is_one_line_and_writes_nothing(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "model.onnx"
    output.write_bytes(b"the model in service")
    # A bound no bf16 run meets: the refusal's path end to end, on the gate's real numbers.
    monkeypatch.setattr(bf16, "BF16_MAX_PROBABILITY_DIFF", 0.0)
    with pytest.raises(SystemExit) as exit_:
        vit_export([str(tiny_checkpoint), "-o", str(output), "--bf16", "--eval-count", "64"])
    line = str(exit_.value.code)
    assert line.startswith("vit-export: bf16 moves this model's answers too far (")
    assert line.endswith(f"serve it in FP32; {output} not written") and "\n" not in line
    assert output.read_bytes() == b"the model in service"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no staged file left


@needs_bf16
def test_a_file_stamped_bf16_before_is_measured_again_when_restamped(
    shapes_bf16: tuple[Path, Bf16Report], tmp_path: Path
) -> None:
    """Its self-test tolerance follows from the gate: restamped without it, the bf16 run would
    fail its self-test."""
    path, _ = shapes_bf16
    report = import_onnx(path, tmp_path / "again.onnx", check_images=image_files(PHOTOS))
    assert report.bf16 is not None and report.bf16.passed and report.bf16.images == 5
    assert "bf16 (OpenVINO) vs fp32 (onnxruntime) on 5 images" in report.line()
    assert ModelSession(tmp_path / "again.onnx", IN_PROCESS).metadata.precision == "bf16"


def test_bf16_is_refused_where_this_machine_cannot_measure_it(
    served_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bf16, "openvino_missing", lambda: None)
    monkeypatch.setattr(bf16, "cpu_runs_bf16", lambda: False)
    output = tmp_path / "out" / "model.onnx"
    reason = "--bf16 cannot be checked on this machine (this CPU computes no bf16 (AVX512_BF16 "
    for command, argv in [
        (vit_export, [str(served_model), "-o", str(output), "--bf16"]),
        (vit_import, ["onnx", str(served_model), "-o", str(output), "--bf16"]),
    ]:
        with pytest.raises(SystemExit) as exit_:
            command(argv)
        line = str(exit_.value.code)
        assert reason in line and line.endswith(f"{output} not written") and "\n" not in line
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["--bf16", "--int8"],
        ["--bf16", "--fp16"],
    ],
)
def test_bf16_int8_and_fp16_are_exclusive(
    served_model: Path, tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    output = str(tmp_path / "model.onnx")
    for command, args in [
        (vit_export, [str(served_model), "-o", output, *argv]),
        (vit_import, ["hf", "checkpoint", "-o", output, *argv]),
    ]:
        with pytest.raises(SystemExit) as exit_:
            command(args)
        assert exit_.value.code == 2
        assert "not allowed with argument" in capsys.readouterr().err
