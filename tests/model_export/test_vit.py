"""The ViT's structure: patches, class token, position embeddings, attention over every patch."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from model_export.vit import PRESETS, Block, VisionTransformer, ViTConfig, preset  # noqa: E402


def small_model(**overrides: int) -> VisionTransformer:
    config = ViTConfig(
        **{
            "image_size": 64,
            "patch_size": 16,
            "width": 48,
            "depth": 2,
            "heads": 3,
            "num_classes": 5,
            **overrides,
        }
    )
    torch.manual_seed(0)
    model = VisionTransformer(config).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)  # the head starts at zero; make it visible
    return model


def test_default_config_is_the_64_patch_vit_ti() -> None:
    config = preset("tiny", depth=6)
    assert (config.image_size, config.patch_size, config.num_patches) == (128, 16, 64)
    assert (config.width, config.heads) == (192, 3)
    assert [PRESETS[name]["width"] for name in ("tiny", "small", "base")] == [192, 384, 768]


def test_logits_have_one_row_per_image_and_one_column_per_class() -> None:
    model = small_model()
    assert model(torch.randn(3, 3, 64, 64)).shape == (3, 5)


def test_tokens_are_the_patches_plus_a_class_token() -> None:
    model = small_model()
    tokens = model.embed(torch.randn(2, 3, 64, 64))
    assert tokens.shape == (2, 16 + 1, 48)
    assert model.pos_embed.shape == (1, 17, 48)
    assert "pos_embed" in model.state_dict() and "cls_token" in model.state_dict()


def test_patch_embedding_is_a_linear_map_of_each_flattened_patch() -> None:
    model = small_model()
    images = torch.randn(1, 3, 64, 64)
    conv = model.patch_embed.proj
    weight = conv.weight.reshape(48, -1)  # (D, 3*P*P)
    patch = images[0, :, 16:32, 32:48].reshape(-1)  # row 1, column 2 of the 4x4 grid
    expected = weight @ patch + conv.bias
    torch.testing.assert_close(model.patch_embed(images)[0, 1 * 4 + 2], expected)


def test_the_head_reads_the_class_token() -> None:
    model = small_model()
    images = torch.randn(2, 3, 64, 64)
    before = model(images)
    with torch.no_grad():
        model.cls_token.add_(torch.randn_like(model.cls_token))
    assert not torch.allclose(model(images), before)


def test_attention_sees_every_patch() -> None:
    model = small_model()
    tokens = model.embed(torch.randn(1, 3, 64, 64))
    block = model.blocks[0]
    assert isinstance(block, Block)
    weights = block.attn.attention_weights(block.norm1(tokens))
    assert weights.shape == (1, 3, 17, 17)
    assert bool((weights > 0).all())
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 3, 17))


def test_every_patch_influences_the_prediction() -> None:
    model = small_model()
    images = torch.randn(1, 3, 64, 64, requires_grad=True)
    model(images)[0, 0].backward()
    assert images.grad is not None
    per_patch = images.grad.abs().reshape(3, 4, 16, 4, 16).sum(dim=(0, 2, 4))  # (4, 4) grid
    assert bool((per_patch > 0).all())


def test_position_embeddings_make_patch_order_matter() -> None:
    model = small_model()
    with torch.no_grad():
        model.pos_embed.normal_(std=1.0)
    images = torch.randn(1, 3, 64, 64)
    swapped = images.clone()
    swapped[..., :16, :16], swapped[..., :16, 16:32] = (
        images[..., :16, 16:32],
        images[..., :16, :16],
    )
    assert not torch.allclose(model(images), model(swapped))


def test_image_size_must_divide_into_patches() -> None:
    with pytest.raises(AssertionError, match="divisible"):
        ViTConfig(image_size=100, patch_size=16)
