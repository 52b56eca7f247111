"""The attention rollout output (model_export/rollout.py) against the PyTorch reference
(model_export/attention.py): the bundled model, rebuilt from its own weights, and imported
Hugging Face ViT and DeiT checkpoints; and what the graph function adds and removes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
import torch  # noqa: E402

from model_contract.metadata import ModelMetadata  # noqa: E402
from model_contract.preprocess import preprocess  # noqa: E402
from model_export.attention import vit_rollout  # noqa: E402
from model_export.export import ROLLOUT_TOLERANCE, rebuild  # noqa: E402
from model_export.importing import PHOTOS, image_files  # noqa: E402
from model_export.rollout import (  # noqa: E402
    ROLLOUT_OUTPUT,
    NoAttention,
    add_rollout,
    patch_grid,
    rollout_of,
    strip_rollout,
)
from model_export.shapes import samples  # noqa: E402
from model_runtime.options import IN_PROCESS  # noqa: E402
from model_runtime.session import ModelSession  # noqa: E402
from tests.onnx_models import classifier  # noqa: E402


def bundled_inputs(served_model: Path) -> np.ndarray:
    spec = ModelSession(served_model, IN_PROCESS).metadata.preprocessing
    photos = [preprocess(p.read_bytes(), spec) for p in image_files(PHOTOS)]
    shapes = [preprocess(s.data, spec) for s in samples(4242, 11)]
    return np.concatenate(photos + shapes)


def test_the_bundled_models_rollout_equals_pytorchs(served_model: Path) -> None:
    model, metadata, _ = rebuild(served_model)
    batch = bundled_inputs(served_model)
    expected = vit_rollout(model, torch.from_numpy(batch)).numpy()
    actual = rollout_of(served_model, batch)
    assert actual.shape == (16, 8, 8) and metadata.attention_output is None  # rebuild strips it
    assert ModelSession(served_model, IN_PROCESS).metadata.attention_output == ROLLOUT_OUTPUT
    assert np.abs(actual - expected).max() <= ROLLOUT_TOLERANCE
    # Not a constant map: what the class token draws on moves with the image.
    assert np.abs(actual - actual.mean(axis=0)).max() > 1e-2


def test_stripping_the_rollout_gives_back_the_graph_it_was_added_to(served_model: Path) -> None:
    proto = onnx.load(str(served_model))
    assert strip_rollout(proto) and not strip_rollout(proto)
    plain = proto.SerializeToString()
    maps = add_rollout(proto, input_size=128)
    assert (maps.heads, maps.tokens, maps.grid, len(maps.outputs)) == (3, 65, 8, 6)
    strip_rollout(proto)
    assert proto.SerializeToString() == plain


def test_a_graph_without_attention_has_no_rollout(tmp_path: Path) -> None:
    proto = onnx.load(str(classifier(tmp_path / "m.onnx", size=32)))
    with pytest.raises(NoAttention, match="no Softmax"):
        add_rollout(proto, input_size=32)


def test_a_graph_of_opset_9_gets_the_same_rollout(served_model: Path, tmp_path: Path) -> None:
    """Before opset 10 Slice takes its bounds as attributes: the rollout is built that way."""
    model, _, _ = rebuild(served_model)
    batch = bundled_inputs(served_model)[:4]
    path = tmp_path / "opset9.onnx"
    torch.onnx.export(
        model,
        (torch.from_numpy(batch),),
        str(path),
        input_names=["pixels"],
        output_names=["logits"],
        dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=9,
        dynamo=False,
    )
    proto = onnx.load(str(path))
    add_rollout(proto, input_size=128)
    onnx.save(proto, str(path))
    expected = vit_rollout(model, torch.from_numpy(batch)).numpy()
    assert np.abs(rollout_of(path, batch) - expected).max() <= ROLLOUT_TOLERANCE


@pytest.mark.parametrize(
    ("tokens", "input_size", "grid"),
    [
        (65, 128, 8),
        (198, 224, 14),
        (261, 224, 16),
        (17, 32, 4),
    ],  # class; + distillation; + 4 registers
)
def test_the_patch_grid_follows_the_class_token(tokens: int, input_size: int, grid: int) -> None:
    assert patch_grid(tokens, input_size) == grid


@pytest.mark.parametrize(
    ("tokens", "input_size"),
    [(16, 32), (64, 128), (17, 30), (2, 32)],  # no class token (twice); grid 4 on 30 pixels; 1x1
)
def test_tokens_that_fit_no_patch_grid_have_no_rollout(tokens: int, input_size: int) -> None:
    with pytest.raises(NoAttention, match="class token"):
        patch_grid(tokens, input_size)


def test_a_spatial_softmax_is_not_attention(tmp_path: Path) -> None:
    """A CNN's softmax over the width of [N, 8, 16, 16] feature maps is square, not attention."""

    class SpatialSoftmax(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.head = torch.nn.Linear(8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            features = self.conv(x)
            return self.head((features * features.softmax(-1)).sum((2, 3)))

    path = tmp_path / "cnn.onnx"
    torch.onnx.export(
        SpatialSoftmax(), (torch.rand(2, 3, 32, 32),), str(path), dynamo=False, opset_version=17
    )
    with pytest.raises(NoAttention, match="softmax over 16 x 16"):
        add_rollout(onnx.load(str(path)), input_size=32)


def test_old_files_without_the_new_fields_still_load(served_model: Path) -> None:
    proto = onnx.load(str(served_model))
    props = {p.key: p.value for p in proto.metadata_props}
    for key in ("attention_output", "ood", "self_test"):
        del props[key]
    metadata = ModelMetadata.from_props(props)
    assert metadata.attention_output is None and metadata.ood is None and metadata.self_test is None
