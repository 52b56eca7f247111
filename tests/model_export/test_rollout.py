"""The attention rollout output (model_export/rollout.py) against the PyTorch reference
(model_export/attention.py): the bundled model, rebuilt from its own weights, and imported
Hugging Face ViT and DeiT checkpoints; and what the graph function adds and removes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from model_contract.metadata import ModelMetadata  # noqa: E402
from model_contract.preprocess import preprocess  # noqa: E402
from model_export.attention import vit_rollout  # noqa: E402
from model_export.export import ROLLOUT_TOLERANCE, rebuild  # noqa: E402
from model_export.importing import PHOTOS, image_files  # noqa: E402
from model_export.rollout import (  # noqa: E402
    ROLLOUT_OUTPUT,
    NoAttention,
    add_rollout,
    rollout_of,
    strip_rollout,
)
from model_export.shapes import samples  # noqa: E402
from service.runtime.options import IN_PROCESS  # noqa: E402
from service.runtime.session import ModelSession  # noqa: E402
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


def test_old_files_without_the_new_fields_still_load(served_model: Path) -> None:
    proto = onnx.load(str(served_model))
    props = {p.key: p.value for p in proto.metadata_props}
    for key in ("attention_output", "ood", "self_test"):
        del props[key]
    metadata = ModelMetadata.from_props(props)
    assert metadata.attention_output is None and metadata.ood is None and metadata.self_test is None
