"""int8 models: written only when they keep the FP32 model's answers, and served like any other."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model_contract.preprocess import preprocess
from model_export import quantize, shapes
from model_export.importing import PHOTOS, image_files, probability_diff
from model_export.quantize import Int8Report, compare
from model_runtime.options import IN_PROCESS
from model_runtime.session import ModelSession
from tests.images import encode
from tests.service_support import cpu_settings, ready_client

onnx = pytest.importorskip("onnx")
pytest.importorskip("torch")

from model_export.export import held_out, main  # noqa: E402
from model_export.sealing import write_metadata  # noqa: E402
from model_export.stamp import self_test  # noqa: E402


@pytest.fixture(scope="module")
def shapes_int8(served_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model quantized as `vit-export --int8` quantizes (its checkpoint is not in
    the repository; an undertrained tiny model's answers are near ties that int8 flips)."""
    path = tmp_path_factory.mktemp("int8") / "shapes-int8.onnx"
    quantize.quantize(served_model, path)
    fp32 = ModelSession(served_model, IN_PROCESS)
    # quantize() leaves out the FP32 file's out-of-distribution score, which `vit-export --int8`
    # fits again on the int8 graph; this file is served without one.
    metadata = fp32.metadata.model_copy(update={"precision": "int8", "ood": None})
    write_metadata(path, metadata)
    # The self-test expects the int8 file's own numbers, within what int8 moves them.
    assert fp32.metadata.self_test is not None
    golden = [base64.b64decode(image) for image in fp32.metadata.self_test.images]
    int8 = ModelSession(path, IN_PROCESS)
    spec = metadata.preprocessing
    batch = np.concatenate([preprocess(image, spec) for image in golden])
    moved = probability_diff(fp32.logits(batch), int8.logits(batch))
    write_metadata(
        path, metadata.model_copy(update={"self_test": self_test(int8, golden, measured=moved)})
    )
    return path


def test_the_bundled_model_passes_the_gate(served_model: Path, shapes_int8: Path) -> None:
    fp32 = ModelSession(served_model, IN_PROCESS)
    int8 = ModelSession(shapes_int8, IN_PROCESS)
    batches = list(held_out(fp32.metadata.preprocessing, seed=1_000_003, count=256))
    report = compare(
        np.concatenate([fp32.logits(batch) for batch, _ in batches]),
        np.concatenate([int8.logits(batch) for batch, _ in batches]),
        np.concatenate([truth for _, truth in batches]),
    )
    assert report.passed, report.line()
    assert report.int8_accuracy is not None and report.int8_accuracy > 0.95


def test_the_gate_counts_agreement_and_accuracy() -> None:
    fp32 = np.eye(4)[[0, 1, 2, 3] * 25]  # 100 images, all right
    int8 = fp32.copy()
    int8[0] = np.eye(4)[1]  # one answer changed: 99% agreement, one point of accuracy lost
    truth = np.array([0, 1, 2, 3] * 25)
    assert compare(fp32, int8).passed  # labels unknown: agreement alone
    report = compare(fp32, int8, truth)
    assert report.top1_agreement == 0.99 and report.accuracy_drop == pytest.approx(0.01)
    assert not report.passed and "FAIL" in report.line()


def test_half_a_point_of_accuracy_lost_passes_as_documented() -> None:
    truth = np.array([0, 1] * 100)
    fp32 = np.eye(2)[truth]
    int8 = fp32.copy()
    int8[0] = np.eye(2)[1]  # 199 of 200: 99.5% agreement, 0.5 points lost (1.0 - 0.995 in floats)
    assert compare(fp32, int8, truth).passed
    int8[1] = np.eye(2)[0]
    assert not compare(fp32, int8, truth).passed


def test_an_int8_files_answer_for_an_image_does_not_depend_on_its_neighbours(
    shapes_int8: Path,
) -> None:
    """Dynamic quantization takes one scale per call from the whole batch, so the images of one
    call would move each other's answers: each is run in a call of its own."""
    session = ModelSession(shapes_int8, IN_PROCESS)
    assert session.images_per_call == 1 and "1 image per call" in session.runtime["batch"]
    spec = session.metadata.preprocessing
    star = next(iter(shapes.samples(1_000_003, 1))).data
    bright = encode(Image.new("RGB", (9, 9), "white"))
    alone = session.infer(preprocess(star, spec))
    beside = session.infer(np.concatenate([preprocess(star, spec), preprocess(bright, spec)]))
    for name, rows in alone.items():
        np.testing.assert_array_equal(beside[name][:1], rows, err_msg=name)
    with ready_client(cpu_settings(shapes_int8)) as client:
        one = client.post("/v1/classify?probabilities=true", files={"file": ("s", star)})
        two = client.post(
            "/v1/classify?probabilities=true",
            files=[("file", ("s", star)), ("file", ("b", bright))],
        )
        metrics = client.get("/metrics").text
    assert one.status_code == two.status_code == 200, two.text
    (info,) = [line for line in metrics.splitlines() if line.startswith("vit_model_info{")]
    assert 'batch="dynamic"' in info and 'images_per_call="1"' in info  # identifiers, no phrase
    first = two.json()["predictions"][0]
    assert first["probabilities"] == one.json()["predictions"][0]["probabilities"]


def test_an_int8_file_is_restamped_and_a_foreign_one_is_known_as_int8(
    shapes_int8: Path, tmp_path: Path
) -> None:
    from model_export.import_onnx import import_onnx

    restamped = tmp_path / "restamped.onnx"
    import_onnx(
        shapes_int8,
        restamped,
        preprocessing={"jpeg_draft": False},
        check_images=image_files(PHOTOS),
    )
    metadata = ModelSession(restamped, IN_PROCESS).metadata
    assert metadata.precision == "int8" and not metadata.preprocessing.jpeg_draft
    proto = onnx.load(str(shapes_int8))
    del proto.metadata_props[:]  # as onnxruntime's quantize_dynamic leaves a file
    proto.producer_name = "onnx.quantize"
    foreign = tmp_path / "foreign.onnx"
    onnx.save(proto, str(foreign))
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(shapes.LABELS))
    import_onnx(foreign, tmp_path / "out.onnx", labels=labels, check_images=image_files(PHOTOS))
    assert ModelSession(tmp_path / "out.onnx", IN_PROCESS).metadata.precision == "int8"


def test_an_int8_file_is_not_exported_again(shapes_int8: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([str(shapes_int8), "-o", str(tmp_path / "again.onnx")])
    assert "holds int8 weights" in str(exit_.value.code)


def test_an_int8_file_is_smaller_quantized_and_says_so(
    shapes_int8: Path, served_model: Path
) -> None:
    proto = onnx.load(str(shapes_int8))
    assert "MatMulInteger" in {node.op_type for node in proto.graph.node}
    assert shapes_int8.stat().st_size < 0.3 * served_model.stat().st_size
    session = ModelSession(shapes_int8, IN_PROCESS)
    assert session.metadata.precision == "int8" and session.runtime["precision"] == "int8"


def test_a_failed_gate_exits_non_zero_and_writes_nothing(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "model.onnx"
    output.write_bytes(b"the model in service")
    monkeypatch.setattr(quantize, "INT8_MIN_TOP1_AGREEMENT", 1.01)  # no model can agree more
    with pytest.raises(SystemExit) as exit_:
        main([str(tiny_checkpoint), "-o", str(output), "--int8", "--eval-count", "64"])
    assert exit_.value.code not in (0, None) and "not written" in str(exit_.value.code)
    assert output.read_bytes() == b"the model in service"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no staged file left


def test_the_service_serves_an_int8_file(shapes_int8: Path) -> None:
    (star,) = [s for s in shapes.samples(1_000_003, 16) if shapes.LABELS[s.label] == "star"][:1]
    with ready_client(cpu_settings(shapes_int8)) as client:
        (model,) = client.get("/v1/models").json()["models"]
        answer = client.post("/v1/classify", files={"file": ("star", star.data)})
    assert model["runtime"]["precision"] == "int8"
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"][0]["top"][0]["label"] == "star"


def test_hf_import_int8_is_gated_on_the_check_images(tmp_path: Path) -> None:
    from model_export.import_hf import import_hf
    from tests.hf_checkpoints import vit_imagenet_bicubic

    checkpoint = vit_imagenet_bicubic(tmp_path / "vit")
    mine = tmp_path / "mine"  # a folder per label: accuracy is measured too
    for label, photo in zip(checkpoint.labels, image_files(PHOTOS), strict=False):
        (mine / label).mkdir(parents=True)
        (mine / label / photo.name).write_bytes(photo.read_bytes())
    output = tmp_path / "vit-int8.onnx"
    report = import_hf(str(checkpoint.folder), output, check_images=mine, int8=True)
    assert isinstance(report, Int8Report) and report.passed, report.line()
    assert report.images == 5 and report.fp32_accuracy is not None
    assert ModelSession(output, IN_PROCESS).metadata.precision == "int8"


def test_a_mistyped_label_folder_is_said_where_accuracy_is_not_measured(
    served_model: Path, shapes_int8: Path, tmp_path: Path
) -> None:
    from model_export.quantize import check_on_images

    folder = tmp_path / "mine"
    (folder / "sqaure").mkdir(parents=True)  # a typo: no such label
    photo = image_files(PHOTOS)[0]
    (folder / "sqaure" / photo.name).write_bytes(photo.read_bytes())
    fp32, int8 = ModelSession(served_model, IN_PROCESS), ModelSession(shapes_int8, IN_PROCESS)
    report = check_on_images(fp32, int8, folder)
    assert report.fp32_accuracy is None
    assert "sqaure not among the model's labels" in report.line()


def test_hf_import_int8_that_fails_its_gate_exits_non_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from model_export.importer import main as vit_import
    from tests.hf_checkpoints import vit_imagenet_bicubic

    checkpoint = vit_imagenet_bicubic(tmp_path / "vit")
    output = tmp_path / "out" / "models" / "vit-int8.onnx"
    monkeypatch.setattr(quantize, "INT8_MIN_TOP1_AGREEMENT", 1.01)
    with pytest.raises(SystemExit) as exit_:
        vit_import(["hf", str(checkpoint.folder), "-o", str(output), "--int8"])
    assert "not written" in str(exit_.value.code)
    assert not (tmp_path / "out").exists()  # nor the folders made for it
