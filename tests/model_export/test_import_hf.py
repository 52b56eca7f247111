"""`vit-import hf`: tiny ViT, DeiT and DeiT-with-teacher checkpoints made here, imported, served by
a real server, and answering with transformers' own pipeline's numbers (1e-4, same top-1)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps

pytest.importorskip("transformers")
from harness.servers import served  # noqa: E402
from model_contract.metadata import ModelMetadata  # noqa: E402
from model_contract.preprocess import PreprocessSpec, preprocess  # noqa: E402
from model_export.importing import PHOTOS, image_files  # noqa: E402
from model_runtime.model_file import check_model_bytes  # noqa: E402
from model_runtime.options import IN_PROCESS  # noqa: E402
from model_runtime.session import ModelSession  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.hf_checkpoints import (  # noqa: E402
    CHECKPOINTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PROBABILITY_TOLERANCE,
    TINY,
    Checkpoint,
    classify_v1,
    classify_v2,
    deit_resize_then_crop,
    deit_with_teacher_shortest_edge,
    labelled,
    pipeline_probabilities,
    post,
    run_import,
    save,
    vit_imagenet_bicubic,
)


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def imported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Checkpoint, Path]]:
    folder = tmp_path_factory.mktemp("hf") / request.param
    checkpoint = CHECKPOINTS[request.param](folder)
    output = folder.parent / f"served-{request.param}.onnx"
    result = run_import("hf", str(folder), "-o", str(output))
    assert result.returncode == 0, result.stderr
    assert re.search(r"top-1 equal 5/5, max \|drollout\|.*  ok$", result.stdout, re.M)
    yield checkpoint, output


def test_served_probabilities_equal_the_transformers_pipeline(
    imported: tuple[Checkpoint, Path],
) -> None:
    checkpoint, model = imported
    files = image_files(PHOTOS)
    expected = pipeline_probabilities(checkpoint.folder, files, checkpoint.labels)
    assert len({int(i) for i in expected.argmax(1)}) > 1, (
        "a model that answers one class proves little"
    )
    with served(model, ROOT) as server:
        v1, answer = classify_v1(server.url, files)
        v2 = classify_v2(server.url, answer["model"]["name"], files)
        photo = files[0].read_bytes()
        explained = post(f"{server.url}/v1/explain", photo, "image/jpeg")["predictions"][0]
    session = ModelSession(model, IN_PROCESS)
    spec = session.metadata.preprocessing
    expected_grid = session.infer(preprocess(photo, spec))["attention_rollout"][0]
    np.testing.assert_allclose(explained["attention"]["grid"], expected_grid, atol=1e-6)
    assert len(explained["attention"]["grid"]) == spec.input_size // TINY["patch_size"]
    with Image.open(files[0]) as image:
        assert explained["attention"]["image_size"] == list(ImageOps.exif_transpose(image).size)
    for served_probabilities in (v1, v2):
        assert np.abs(served_probabilities - expected).max() <= PROBABILITY_TOLERANCE
        assert (served_probabilities.argmax(1) == expected.argmax(1)).all()
    tops = [p["top"][0]["label"] for p in answer["predictions"]]
    assert tops == [checkpoint.labels[i] for i in expected.argmax(1)]


def test_the_file_says_where_it_came_from(imported: tuple[Checkpoint, Path]) -> None:
    import onnx

    checkpoint, model = imported
    props = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    metadata = ModelMetadata.from_props(props)
    assert metadata.labels == tuple(checkpoint.labels)
    assert metadata.name == f"served-{checkpoint.folder.name}"  # the file's, not the folder's
    assert metadata.source["importer"] == "vit-import hf"
    assert metadata.source["source"] == checkpoint.folder.name  # not the importing machine's path
    assert not [value for value in props.values() if str(checkpoint.folder.parent) in value]
    sealed = check_model_bytes(model.read_bytes(), max_metadata_bytes=IN_PROCESS.max_metadata_bytes)
    assert sealed.sealed
    assert metadata.source["model_type"] in ("vit", "deit")
    assert (
        metadata.preprocessing.jpeg_draft is False
        and metadata.preprocessing.alpha_background is None
    )

    weights = (checkpoint.folder / "model.safetensors").read_bytes()
    assert metadata.checkpoint_sha256 == hashlib.sha256(weights).hexdigest()


def test_the_processors_become_the_specs_they_describe(tmp_path: Path) -> None:
    from transformers import AutoImageProcessor

    from model_export.hf_preprocessing import spec_from_processor

    def spec_of(build: Any) -> PreprocessSpec:
        folder = build(tmp_path / build.__name__).folder
        return spec_from_processor(AutoImageProcessor.from_pretrained(folder, backend="pil"))

    vit = spec_of(vit_imagenet_bicubic)
    assert (vit.input_size, vit.resize, vit.resize_size, vit.interpolation) == (
        64,
        "squash",
        64,
        "bicubic",
    )
    assert vit.mean == tuple(IMAGENET_MEAN) and vit.std == tuple(IMAGENET_STD)
    deit = spec_of(deit_resize_then_crop)
    assert (deit.input_size, deit.resize, deit.resize_size) == (48, "squash", 56)
    teacher = spec_of(deit_with_teacher_shortest_edge)
    assert (teacher.input_size, teacher.resize, teacher.resize_size) == (64, "shorter_side", 70)
    assert teacher.interpolation == "bilinear"


def test_fp16_import_keeps_the_answers(tmp_path: Path) -> None:
    checkpoint = deit_resize_then_crop(tmp_path / "deit")
    output = tmp_path / "deit-fp16.onnx"
    result = run_import("hf", str(checkpoint.folder), "-o", str(output), "--fp16")
    assert result.returncode == 0, result.stderr
    assert "fp16 onnxruntime vs fp32 transformers" in result.stdout and "ok" in result.stdout
    import onnx

    props = {p.key: p.value for p in onnx.load(str(output)).metadata_props}
    assert ModelMetadata.from_props(props).precision == "fp16"


def test_the_users_own_check_images_and_name_are_used(tmp_path: Path) -> None:
    checkpoint = vit_imagenet_bicubic(tmp_path / "vit")
    mine = tmp_path / "mine"
    mine.mkdir()
    for photo in image_files(PHOTOS)[:2]:
        (mine / photo.name).write_bytes(photo.read_bytes())
    output = tmp_path / "m.onnx"
    result = run_import(
        "hf", str(checkpoint.folder), "-o", str(output), "--check-images", str(mine), "--name", "my"
    )
    assert result.returncode == 0, result.stderr
    assert "on 2 images" in result.stdout
    assert ModelSession(output, IN_PROCESS).metadata.name == "my"


@pytest.mark.parametrize(
    ("processor", "field"),
    [
        ({"size": {"height": 64, "width": 48}}, "size 64x48: not square"),
        (
            {"size": {"shortest_edge": 64}, "do_center_crop": False},
            "shortest_edge without a centre crop",
        ),
        ({"do_resize": False}, "do_resize: false"),
        ({"rescale_factor": -1 / 255}, "rescale_factor: Input should be greater than 0"),
        ({"image_std": [0.5, 0.0, 0.5]}, "image_std [0.5, 0.0, 0.5]: a channel divided by zero"),
        ({"resample": None}, "resample: null"),
    ],
)
def test_a_processor_that_cannot_be_expressed_is_refused_in_one_line(
    tmp_path: Path, processor: dict[str, Any], field: str
) -> None:
    checkpoint = vit_imagenet_bicubic(tmp_path / "vit")
    config_file = checkpoint.folder / "preprocessor_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **processor}))
    result = run_import("hf", str(checkpoint.folder), "-o", str(tmp_path / "m.onnx"))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert field in lines[-1] and lines[-1].startswith("vit-import: "), result.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_a_model_specific_processor_step_is_refused(tmp_path: Path) -> None:
    from transformers import ConvNextImageProcessorPil

    checkpoint = vit_imagenet_bicubic(tmp_path / "vit")
    (checkpoint.folder / "preprocessor_config.json").unlink()
    ConvNextImageProcessorPil(size={"shortest_edge": 64}).save_pretrained(checkpoint.folder)
    result = run_import("hf", str(checkpoint.folder), "-o", str(tmp_path / "m.onnx"))
    assert result.returncode != 0
    assert "ConvNextImageProcessorPil" in result.stderr and "model-specific step" in result.stderr


def beit_with_its_processor(folder: Path) -> Checkpoint:
    """BEiT: its processor runs its own step loop (label reduction, off for images)."""
    import torch
    from transformers import BeitConfig, BeitForImageClassification, BeitImageProcessorPil

    labels = ["mug", "kettle", "teapot"]
    torch.manual_seed(6)
    config = BeitConfig(**{**TINY, "patch_size": 8}, image_size=32, **labelled(labels))
    processor = BeitImageProcessorPil(
        size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32}
    )
    return save(folder, BeitForImageClassification(config), processor, labels)


def test_a_processor_with_its_own_step_loop_is_served_when_its_pixels_agree(
    tmp_path: Path,
) -> None:
    checkpoint = beit_with_its_processor(tmp_path / "beit")
    model = tmp_path / "m.onnx"
    result = run_import("hf", str(checkpoint.folder), "-o", str(model))
    assert result.returncode == 0, result.stderr
    files = image_files(PHOTOS)
    expected = pipeline_probabilities(checkpoint.folder, files, checkpoint.labels)
    with served(model, ROOT) as server:
        served_probabilities, _ = classify_v1(server.url, files)
    np.testing.assert_allclose(served_probabilities, expected, atol=PROBABILITY_TOLERANCE)
    assert (served_probabilities.argmax(1) == expected.argmax(1)).all()


def test_a_step_loop_that_changes_the_pixels_is_refused_naming_it() -> None:
    from transformers import ViTImageProcessorPil

    from model_export.hf_preprocessing import UnexpressibleProcessor, spec_from_processor

    class Brighter(ViTImageProcessorPil):
        def _preprocess(self, images: list[Any], **kwargs: Any) -> Any:  # type: ignore[override]
            return super()._preprocess([image + 1 for image in images], **kwargs)

    processor = Brighter(size={"height": 32, "width": 32})
    files = image_files(PHOTOS)
    with pytest.raises(UnexpressibleProcessor, match=r"Brighter\._preprocess: .* differ .* by"):
        spec_from_processor(processor, images=files)
    with pytest.raises(UnexpressibleProcessor, match="no images to check it on"):
        spec_from_processor(processor)
    plain = spec_from_processor(ViTImageProcessorPil(size={"height": 32, "width": 32}))
    assert plain.input_size == 32


def test_a_multi_label_classifier_is_refused(tmp_path: Path) -> None:
    checkpoint = vit_imagenet_bicubic(tmp_path / "vit")
    config_file = checkpoint.folder / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "problem_type": "multi_label_classification"}))
    result = run_import("hf", str(checkpoint.folder), "-o", str(tmp_path / "m.onnx"))
    assert result.returncode != 0 and "multi_label_classification" in result.stderr


def test_the_parity_check_fails_when_the_preprocessing_differs(tmp_path: Path) -> None:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from model_export.import_hf import check_parity
    from model_runtime.options import IN_PROCESS
    from model_runtime.session import ModelSession

    checkpoint = vit_imagenet_bicubic(tmp_path / "vit")
    model = tmp_path / "m.onnx"
    assert run_import("hf", str(checkpoint.folder), "-o", str(model)).returncode == 0
    bilinear = tmp_path / "bilinear.onnx"
    restamp = run_import("onnx", str(model), "-o", str(bilinear), "--interpolation", "bilinear")
    assert restamp.returncode == 0, restamp.stderr
    report = check_parity(
        AutoModelForImageClassification.from_pretrained(checkpoint.folder).eval(),
        AutoImageProcessor.from_pretrained(checkpoint.folder, backend="pil"),
        ModelSession(bilinear, IN_PROCESS),
        image_files(PHOTOS),
        fp16=False,
    )
    assert not report.passed and report.max_logit_diff > 1e-2
    assert "FAIL" in report.line()


def test_a_failed_check_leaves_no_file_and_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from model_export import import_hf

    checkpoint = vit_imagenet_bicubic(tmp_path / "vit")
    output = tmp_path / "model.onnx"
    output.write_bytes(b"the model in service")
    monkeypatch.setattr(import_hf, "LOGIT_TOLERANCE", -1.0)  # no graph can pass
    report = import_hf.import_hf(str(checkpoint.folder), output)
    assert not report.passed
    assert output.read_bytes() == b"the model in service"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "vit"]


def test_the_rollout_equals_transformers_own(imported: tuple[Checkpoint, Path]) -> None:
    import torch
    from transformers import AutoModelForImageClassification

    from model_contract.preprocess import preprocess
    from model_export.attention import hf_rollout
    from model_export.export import ROLLOUT_TOLERANCE
    from model_export.rollout import rollout_of
    from model_runtime.options import IN_PROCESS
    from model_runtime.session import ModelSession

    checkpoint, model_file = imported
    model = AutoModelForImageClassification.from_pretrained(checkpoint.folder).eval()
    metadata = ModelSession(model_file, IN_PROCESS).metadata
    assert metadata.attention_output == "attention_rollout" and metadata.ood is None
    spec = metadata.preprocessing
    batch = np.concatenate([preprocess(p.read_bytes(), spec) for p in image_files(PHOTOS)])
    expected = hf_rollout(model, torch.from_numpy(batch)).numpy()
    actual = rollout_of(model_file, batch)
    grid = spec.input_size // 16
    assert actual.shape == expected.shape == (len(batch), grid, grid)
    assert np.abs(actual - expected).max() <= ROLLOUT_TOLERANCE


def transparent_keyed(folder: Path) -> list[Path]:
    """Images whose transparency is a colour key, not an alpha channel: an RGB PNG with tRNS,
    a palette PNG and a GIF with a transparent entry, each key a colour the picture uses."""
    photo = Image.open(image_files(PHOTOS)[0]).convert("RGB").resize((80, 60))
    palette = photo.quantize(colors=16)
    counts: list[tuple[int, int]] = palette.getcolors() or []  # type: ignore[assignment]
    common = max(counts)[1]  # the most used palette entry
    key = tuple((palette.getpalette() or [])[3 * common : 3 * common + 3])
    folder.mkdir()
    files = {
        "rgb-trns.png": lambda path: palette.convert("RGB").save(path, transparency=key),
        "palette.png": lambda path: palette.save(path, transparency=common),
        "palette.gif": lambda path: palette.save(path, transparency=common),
    }
    for name, write in files.items():
        write(folder / name)
    return [folder / name for name in files]


def test_a_processor_that_converts_to_rgb_paints_a_transparency_key_white_as_transformers_does(
    tmp_path: Path,
) -> None:
    checkpoint = vit_imagenet_bicubic(tmp_path / "vit")
    config_file = checkpoint.folder / "preprocessor_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "do_convert_rgb": True}))
    model = tmp_path / "m.onnx"
    assert run_import("hf", str(checkpoint.folder), "-o", str(model)).returncode == 0
    files = transparent_keyed(tmp_path / "keyed")
    expected = pipeline_probabilities(checkpoint.folder, files, checkpoint.labels)
    with served(model, ROOT) as server:
        served_probabilities, _ = classify_v1(server.url, files)
    np.testing.assert_allclose(served_probabilities, expected, atol=PROBABILITY_TOLERANCE)


def convnext_with_a_vit_processor(folder: Path) -> Checkpoint:
    """A classifier with no attention at all: a tiny ConvNeXt."""
    import torch
    from transformers import ConvNextConfig, ConvNextForImageClassification, ViTImageProcessorPil

    labels = ["round", "pointy", "flat"]
    torch.manual_seed(4)
    config = ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], **labelled(labels))
    model = ConvNextForImageClassification(config)
    processor = ViTImageProcessorPil(size={"height": 64, "width": 64})
    return save(folder, model, processor, labels)


def swin_with_a_vit_processor(folder: Path) -> Checkpoint:
    """Attention within windows of the image: several maps per image, no one rollout."""
    import torch
    from transformers import SwinConfig, SwinForImageClassification, ViTImageProcessorPil

    labels = ["near", "far"]
    torch.manual_seed(5)
    config = SwinConfig(
        image_size=32,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1],
        num_heads=[2, 2],
        window_size=4,
        **labelled(labels),
    )
    model = SwinForImageClassification(config)
    processor = ViTImageProcessorPil(size={"height": 32, "width": 32})
    return save(folder, model, processor, labels)


@pytest.mark.parametrize(
    ("build", "why"),
    [(convnext_with_a_vit_processor, "no Softmax"), (swin_with_a_vit_processor, "windowed")],
)
def test_a_model_without_readable_attention_is_refused_with_the_flag_that_imports_it(
    tmp_path: Path, build: Callable[[Path], Checkpoint], why: str
) -> None:
    checkpoint = build(tmp_path / "checkpoint")
    model = tmp_path / "m.onnx"
    refused = run_import("hf", str(checkpoint.folder), "-o", str(model))
    assert refused.returncode != 0 and not model.exists()
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("vit-import: ") and "--no-rollout" in line and why in line, line
    imported = run_import("hf", str(checkpoint.folder), "-o", str(model), "--no-rollout")
    assert imported.returncode == 0, imported.stderr
    assert "top-1 equal 5/5, no attention rollout  ok" in imported.stdout
    files = image_files(PHOTOS)
    expected = pipeline_probabilities(checkpoint.folder, files, checkpoint.labels)
    with served(model, ROOT) as server:
        served_probabilities, _ = classify_v1(server.url, files)
        explain = httpx.post(
            f"{server.url}/v1/explain", files={"file": files[0].read_bytes()}, timeout=30
        )
    np.testing.assert_allclose(served_probabilities, expected, atol=PROBABILITY_TOLERANCE)
    assert explain.status_code == 400 and "--no-rollout" in explain.json()["error"]


def test_a_model_that_does_not_export_at_its_processors_size_is_refused_in_one_line(
    tmp_path: Path,
) -> None:
    checkpoint = vit_imagenet_bicubic(tmp_path / "vit")  # a 64x64 model
    config_file = checkpoint.folder / "preprocessor_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "size": {"height": 48, "width": 48}}))
    result = run_import("hf", str(checkpoint.folder), "-o", str(tmp_path / "m.onnx"))
    assert result.returncode != 0
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("vit-import: the model does not export to ONNX at 48x48"), result.stderr


def test_an_operator_onnx_lacks_is_refused_in_one_line_and_nothing_else(tmp_path: Path) -> None:
    """Dinov2 with registers resizes its position embeddings with antialiased bicubic, which
    ONNX has no operator for; torch's exporter prints its whole graph as it fails."""
    import torch
    from transformers import (
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersForImageClassification,
        ViTImageProcessorPil,
    )

    labels = ["a", "b"]
    torch.manual_seed(7)
    config = Dinov2WithRegistersConfig(
        **{**TINY, "patch_size": 8}, image_size=32, **labelled(labels)
    )
    processor = ViTImageProcessorPil(size={"height": 32, "width": 32})
    checkpoint = save(
        tmp_path / "dinov2", Dinov2WithRegistersForImageClassification(config), processor, labels
    )
    result = run_import("hf", str(checkpoint.folder), "-o", str(tmp_path / "m.onnx"))
    assert result.returncode != 0 and result.stdout == "", result.stdout[:500]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("vit-import: the model does not export to ONNX at 32x32"), line
