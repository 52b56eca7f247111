"""The attention rollout computed in PyTorch from a model's own attention maps: the reference the
graph's `attention_rollout` output is checked against (model_export/rollout.py builds that one)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from model_export.vit import Attention, Block, VisionTransformer


def rollout(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Abnar & Zuidema's rollout, written as the paper does: per layer the heads' mean plus the
    identity, rows renormalised, the layers multiplied from the first up; the class token's row
    over the last grid x grid tokens (the patches), as (B, grid, grid)."""
    joint: torch.Tensor | None = None
    for weights in attentions:  # each (B, heads, T, T), first layer first
        mixed = weights.float().mean(dim=1)  # (B, T, T)
        mixed = mixed + torch.eye(mixed.shape[-1], dtype=mixed.dtype)
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        joint = mixed if joint is None else mixed @ joint
    assert joint is not None, "a rollout needs at least one layer"
    tokens = joint.shape[-1]
    grid = math.isqrt(tokens - 1)
    patches = joint[:, 0, tokens - grid * grid :]  # (B, grid*grid)
    return patches.reshape(-1, grid, grid)


def vit_attentions(model: VisionTransformer, images: torch.Tensor) -> list[torch.Tensor]:
    """Each block's softmaxed attention, (B, heads, N+1, N+1), caught by hooks on a forward."""
    maps: list[torch.Tensor] = []

    def keep(module: nn.Module, inputs: tuple[torch.Tensor, ...], _: torch.Tensor) -> None:
        assert isinstance(module, Attention)
        maps.append(module.attention_weights(inputs[0]))

    handles = [
        block.attn.register_forward_hook(keep) for block in model.blocks if isinstance(block, Block)
    ]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return maps


def vit_rollout(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    return rollout(vit_attentions(model, images))


def hf_rollout(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """A transformers classifier's rollout from `output_attentions=True`, with its eager attention
    (the implementation that returns the maps)."""
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(pixel_values=pixel_values, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(implementation)
    return rollout(attentions)
