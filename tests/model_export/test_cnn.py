"""The CNN baseline: logits of the ViT's shape from as many parameters, blocks that start as the
identity."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from model_export.cnn import BasicBlock, ResNet, ResNetConfig  # noqa: E402
from model_export.vit import VisionTransformer, preset  # noqa: E402


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_logits_for_every_image_and_class() -> None:
    model = ResNet(ResNetConfig(image_size=64, num_classes=5)).eval()
    assert model(torch.randn(3, 3, 64, 64)).shape == (3, 5)


def test_features_are_pooled_from_a_4x4_grid_of_the_last_width() -> None:
    model = ResNet(ResNetConfig()).eval()
    images = torch.randn(2, 3, 128, 128)
    assert model.stem(images).shape == (2, 32, 32, 32)
    assert model.stages(model.stem(images)).shape == (2, 256, 4, 4)
    assert model.forward_features(images).shape == (2, 256)


def test_the_default_has_the_default_vits_parameter_count_within_2_percent() -> None:
    vit = VisionTransformer(preset("tiny", depth=6, image_size=128, num_classes=8))
    cnn = ResNet(ResNetConfig())
    assert parameters(cnn) == 2_801_304
    assert abs(parameters(cnn) / parameters(vit) - 1) < 0.02


def test_each_block_starts_as_the_identity_on_non_negative_inputs() -> None:
    block = BasicBlock(inputs=8, outputs=8, stride=1).train()
    features = torch.rand(2, 8, 6, 6)  # after a ReLU, as every block's input is
    assert torch.equal(block(features), features)


def test_a_strided_block_halves_the_grid_and_projects_the_shortcut() -> None:
    block = BasicBlock(inputs=8, outputs=16, stride=2)
    assert block(torch.rand(2, 8, 6, 6)).shape == (2, 16, 3, 3)


def test_the_image_size_must_survive_the_five_halvings() -> None:
    with pytest.raises(AssertionError, match="divisible by 32"):
        ResNetConfig(image_size=100)
