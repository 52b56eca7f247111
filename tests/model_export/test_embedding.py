"""The embedding every written model serves (model_export/embedding.py): transformers' class token
within 1e-4 for ViT, DeiT with its distillation head and checkpoints without a head; every other
output bit for bit what it was without it; nearest its own photo after a resize and a JPEG
re-encode; absent, with a warning saying why, where the graph has no linear head."""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image, ImageOps

pytest.importorskip("transformers")
import torch  # noqa: E402
from onnx import helper  # noqa: E402
from transformers import (  # noqa: E402
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    Dinov2Config,
    Dinov2Model,
    ViTConfig,
    ViTImageProcessorPil,
)
from transformers.image_utils import load_image  # noqa: E402

from model_contract.metadata import ModelMetadata  # noqa: E402
from model_contract.outputs import EMBEDDING  # noqa: E402
from model_contract.preprocess import preprocess, preprocess_upload  # noqa: E402
from model_export.embedding import add_embedding, appended_embedding, strip_embedding  # noqa: E402
from model_export.import_hf import EMBEDDING_TOLERANCE, HEADLESS, import_hf  # noqa: E402
from model_export.import_onnx import import_onnx  # noqa: E402
from model_export.importing import PHOTOS, ImportRefused, image_files  # noqa: E402
from model_runtime.options import CPU, IN_PROCESS  # noqa: E402
from model_runtime.session import ModelSession  # noqa: E402
from tests.hf_checkpoints import (  # noqa: E402
    TINY,
    deit_with_teacher_shortest_edge,
    vit_imagenet_bicubic,
)
from tests.model_export.test_ood_features import SIZE, tiny  # noqa: E402
from tests.onnx_models import classifier  # noqa: E402


def vit_without_head(folder: Path) -> Path:
    """transformers' ViTModel, pooler and all, as AutoModel builds it for a ViTConfig."""
    torch.manual_seed(11)
    AutoModel.from_config(ViTConfig(image_size=64, **TINY)).eval().save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


def dinov2_without_head(folder: Path) -> Path:
    torch.manual_seed(12)
    fields = {k: v for k, v in TINY.items() if k != "intermediate_size"}  # Dinov2: mlp_ratio
    Dinov2Model(Dinov2Config(**{**fields, "patch_size": 8}, image_size=32)).eval().save_pretrained(
        folder
    )
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


CHECKPOINTS: dict[str, Callable[[Path], Path]] = {
    "vit": lambda folder: vit_imagenet_bicubic(folder).folder,
    "deit-teacher": lambda folder: deit_with_teacher_shortest_edge(folder).folder,
    "vit-headless": vit_without_head,
    "dinov2-headless": dinov2_without_head,
}


CLASSIFIERS = ["vit", "deit-teacher"]
WITHOUT_HEAD = ["vit-headless", "dinov2-headless"]

Imported = Callable[[str], tuple[Path, Path]]
"""A checkpoint of CHECKPOINTS by name, and the file `vit-import hf` wrote of it."""


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Imported:
    made: dict[str, tuple[Path, Path]] = {}

    def checkpoint_and_file(kind: str) -> tuple[Path, Path]:
        if kind not in made:
            folder = CHECKPOINTS[kind](tmp_path_factory.mktemp("hf") / kind)
            output = folder.parent / f"{kind}.onnx"
            report = import_hf(str(folder), output)
            assert report.passed, report.line()
            made[kind] = folder, output
        return made[kind]

    return checkpoint_and_file


def metadata_of(path: Path) -> ModelMetadata:
    return ModelMetadata.from_props({p.key: p.value for p in onnx.load(str(path)).metadata_props})


def transformers_class_tokens(folder: Path, files: list[Path]) -> np.ndarray:
    """transformers on its own (its image loading and processor): the base model's
    last_hidden_state[:, 0], the classifier's or the headless model's."""
    (architecture,) = json.loads((folder / "config.json").read_text())["architectures"]
    auto = AutoModel if architecture in HEADLESS else AutoModelForImageClassification
    base = auto.from_pretrained(folder).eval().base_model
    processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    rows = []
    for path in files:
        pixels = processor(images=[load_image(str(path))], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            rows.append(base(pixel_values=pixels).last_hidden_state[:, 0].numpy())
    return np.concatenate(rows)


def run_file(data: bytes, batch: np.ndarray, names: list[str] | None = None) -> list[np.ndarray]:
    session = ort.InferenceSession(data, providers=[CPU])
    (name,) = [i.name for i in session.get_inputs()]
    return [np.asarray(v) for v in session.run(names, {name: batch})]


def photo_batch(path: Path, datas: list[bytes]) -> np.ndarray:
    spec = metadata_of(path).preprocessing
    return np.concatenate([preprocess(data, spec) for data in datas])


@pytest.mark.parametrize("kind", CLASSIFIERS + WITHOUT_HEAD)
def test_the_served_embedding_is_transformers_class_token(imported: Imported, kind: str) -> None:
    folder, path = imported(kind)
    files = image_files(PHOTOS)
    expected = transformers_class_tokens(folder, files)
    batch = photo_batch(path, [p.read_bytes() for p in files])
    (served,) = run_file(path.read_bytes(), batch, [EMBEDDING])
    assert served.dtype == np.float32 and served.shape == (len(files), 48)
    assert np.abs(served - expected).max() <= EMBEDDING_TOLERANCE
    metadata = metadata_of(path)
    embedding = metadata.embedding
    assert embedding is not None and (embedding.output, embedding.size) == (EMBEDDING, 48)
    assert "class token" in embedding.source
    if kind == "deit-teacher":
        assert "distillation token" in embedding.source and "teacher" in embedding.source


@pytest.mark.parametrize("kind", WITHOUT_HEAD)
def test_a_model_without_a_head_serves_its_embedding_alone(imported: Imported, kind: str) -> None:
    _, path = imported(kind)
    metadata = metadata_of(path)
    assert metadata.output == "embedding" and metadata.labels == ()
    assert metadata.ood is None and metadata.attention_output is None
    proto = onnx.load(str(path))
    assert [o.name for o in proto.graph.output] == [EMBEDDING]
    assert not strip_embedding(proto)  # its own output: a re-export never removes it
    assert metadata.embedding is not None and "last_hidden_state[:, 0]" in metadata.embedding.source
    test = metadata.self_test
    assert test is not None and not test.probabilities and len(test.embeddings) == 4
    assert test.tolerance == 1e-3  # the floor: the measured difference is ~1e-6
    golden = [base64.b64decode(image) for image in test.images]
    batch = np.concatenate([preprocess_upload(data, metadata.preprocessing)[0] for data in golden])
    served = ModelSession(path, IN_PROCESS).infer(batch)[EMBEDDING]
    assert np.abs(served - np.array(test.embeddings)).max() <= 1e-6


def outputs_with_and_without_embedding(
    path: Path, batch: np.ndarray
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every output of the file but the embedding, and the same of its graph without it."""
    proto = onnx.load(str(path))
    names = [o.name for o in proto.graph.output if o.name != EMBEDDING]
    with_it = run_file(proto.SerializeToString(), batch, names)
    assert strip_embedding(proto) and [o.name for o in proto.graph.output] == names
    return with_it, run_file(proto.SerializeToString(), batch, names)


@pytest.mark.parametrize("kind", CLASSIFIERS)
def test_the_appended_embedding_changes_no_other_output(imported: Imported, kind: str) -> None:
    _, path = imported(kind)
    batch = photo_batch(path, [p.read_bytes() for p in image_files(PHOTOS)])
    with_it, without = outputs_with_and_without_embedding(path, batch)
    assert len(with_it) == 2  # the logits and the attention rollout
    for served, plain in zip(with_it, without, strict=True):
        assert np.array_equal(served, plain)


def test_the_bundled_model_carries_its_embedding_and_the_same_other_outputs(
    served_model: Path,
) -> None:
    metadata = metadata_of(served_model)
    assert metadata.embedding is not None and metadata.embedding.size == 192
    assert metadata.embedding.source.startswith("the class token (token 0) after the final")
    batch = photo_batch(served_model, [p.read_bytes() for p in image_files(PHOTOS)])
    with_it, without = outputs_with_and_without_embedding(served_model, batch)
    assert len(with_it) == 3  # logits, rollout, ood_score
    for served, plain in zip(with_it, without, strict=True):
        assert np.array_equal(served, plain)


def smaller_and_recompressed(data: bytes) -> bytes:
    """The photo at 0.6 of its size, saved again as a JPEG of quality 70."""
    with Image.open(io.BytesIO(data)) as image:
        upright = ImageOps.exif_transpose(image).convert("RGB")
    size = (round(upright.width * 0.6), round(upright.height * 0.6))
    buffer = io.BytesIO()
    upright.resize(size, Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=70)
    return buffer.getvalue()


def unit_embeddings(path: Path, datas: list[bytes]) -> np.ndarray:
    (embedding,) = run_file(path.read_bytes(), photo_batch(path, datas), [EMBEDDING])
    rows = embedding.astype(np.float64)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def nearest_originals(path: Path) -> np.ndarray:
    """For each photo's smaller, re-compressed copy, the photo its embedding is nearest
    (cosine)."""
    photos = [p.read_bytes() for p in image_files(PHOTOS)]
    originals = unit_embeddings(path, photos)
    copies = unit_embeddings(path, [smaller_and_recompressed(data) for data in photos])
    result: np.ndarray = (copies @ originals.T).argmax(axis=1)
    return result


def test_a_smaller_recompressed_photo_is_nearest_its_original(served_model: Path) -> None:
    assert (nearest_originals(served_model) == np.arange(len(image_files(PHOTOS)))).all()


def test_so_too_for_a_random_vit(imported: Imported) -> None:
    _, path = imported("vit")
    assert (nearest_originals(path) == np.arange(len(image_files(PHOTOS)))).all()


def test_deits_class_head_is_told_by_the_token_it_picks_not_by_order() -> None:
    proto = tiny("deit")
    average = next(n for n in proto.graph.node if n.op_type == "Add")
    average.input[:] = list(reversed(average.input))  # the distillation head found first
    embedding = add_embedding(proto, output="logits", input_size=SIZE)
    assert "tensor cls" in embedding.source and "(dist)" in embedding.source
    batch = np.random.default_rng(0).standard_normal((4, 3, SIZE, SIZE)).astype(np.float32)
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.append(helper.make_empty_tensor_value_info("cls"))
    served, cls = run_file(probe.SerializeToString(), batch, [EMBEDDING, "cls"])
    assert np.array_equal(served, cls)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ("relu", "comes from a Relu node"),
        ("no-class-token", "which of them reads the class token (token 0) cannot be told"),
    ],
)
def test_without_a_linear_head_there_is_no_embedding_and_a_warning_says_why(
    change: str, says: str, caplog: pytest.LogCaptureFixture
) -> None:
    proto = tiny("gemm" if change == "relu" else "deit")
    if change == "relu":
        proto.graph.node[-1].op_type = "Relu"
    else:  # both heads read the distillation token
        first = next(i for i in proto.graph.initializer if i.name == "first")
        first.CopyFrom(onnx.numpy_helper.from_array(np.array(1, np.int64), "first"))
    plain = proto.SerializeToString()
    with caplog.at_level(logging.WARNING):
        assert appended_embedding(proto, output="logits", input_size=SIZE) is None
    assert proto.SerializeToString() == plain
    assert says in caplog.text and "no embedding output" in caplog.text


def test_an_imported_graph_without_a_linear_head_is_written_without_an_embedding(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proto = onnx.load(str(classifier(tmp_path / "m.onnx")))
    product = next(n for n in proto.graph.node if n.op_type == "MatMul")
    product.output[0] = "scores"
    proto.graph.node.append(helper.make_node("Relu", ["scores"], ["logits"]))
    source = tmp_path / "relu.onnx"
    onnx.save(proto, str(source))
    (tmp_path / "labels.txt").write_text("red\ngreen\nblue\n")
    output = tmp_path / "out.onnx"
    with caplog.at_level(logging.WARNING):
        import_onnx(
            source,
            output,
            labels=tmp_path / "labels.txt",
            check_images=image_files(PHOTOS),
            rollout=False,
        )
    assert metadata_of(output).embedding is None
    assert [o.name for o in onnx.load(str(output)).graph.output] == ["logits"]
    assert "no embedding output: the classification output logits comes from a Relu" in caplog.text


def test_the_precisions_of_a_model_without_a_head_are_refused_in_one_line(tmp_path: Path) -> None:
    folder = vit_without_head(tmp_path / "vit")
    with pytest.raises(ImportRefused, match="ViTModel has no classification head.*--fp16"):
        import_hf(str(folder), tmp_path / "m.onnx", fp16=True)
    assert not (tmp_path / "m.onnx").exists()


def test_vit_exports_embedding_is_pytorchs_class_token(
    tiny_onnx: Path, tiny_checkpoint: Path
) -> None:
    from model_export.checkpoint import Checkpoint

    model = Checkpoint.load(tiny_checkpoint).build_model().eval()
    batch = np.random.default_rng(3).standard_normal((3, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        expected = model.forward_features(torch.from_numpy(batch))[:, 0].numpy()  # (B, D)
    (served,) = run_file(tiny_onnx.read_bytes(), batch, [EMBEDDING])
    assert np.abs(served - expected).max() <= EMBEDDING_TOLERANCE
    embedding = metadata_of(tiny_onnx).embedding
    assert embedding is not None and embedding.size == model.config.width


def test_another_model_without_a_head_is_refused_naming_those_that_are_served(
    tmp_path: Path,
) -> None:
    from model_export.import_hf import headless_architecture

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"architectures": ["BeitModel"]}))
    with pytest.raises(ImportRefused, match="BeitModel has no classification head.*ViTModel"):
        headless_architecture(config)
    config.write_text(json.dumps({"architectures": ["BeitForImageClassification"]}))
    assert headless_architecture(config) is None


def test_a_model_without_classes_is_not_restamped_as_a_classifier(
    imported: Imported, tmp_path: Path
) -> None:
    _, path = imported("vit-headless")
    with pytest.raises(ImportRefused, match="serves an embedding and no classes.*vit-import hf"):
        import_onnx(path, tmp_path / "m.onnx", check_images=image_files(PHOTOS))
