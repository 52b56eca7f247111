"""The Vision Transformer: patches -> tokens -> pre-norm transformer blocks -> class-token head."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ViTConfig:
    """Every hyperparameter of the model; stored in the checkpoint so loading never guesses."""

    image_size: int = 128
    patch_size: int = 16
    width: int = 192
    depth: int = 6
    heads: int = 3
    mlp_ratio: float = 4.0
    num_classes: int = 8
    dropout: float = 0.0

    def __post_init__(self) -> None:
        assert self.image_size % self.patch_size == 0, "image size must be divisible by patch size"
        assert self.width % self.heads == 0, "width must be divisible by the number of heads"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Widths, depths and heads of ViT-Ti/S/B (Touvron et al., DeiT; Dosovitskiy et al.).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"width": 192, "depth": 12, "heads": 3},
    "small": {"width": 384, "depth": 12, "heads": 6},
    "base": {"width": 768, "depth": 12, "heads": 12},
}


def preset(name: str, **overrides: Any) -> ViTConfig:
    """A ViT-Ti/S/B configuration, with any field overridden (e.g. `depth=6`, `image_size=128`)."""
    return ViTConfig(**{**PRESETS[name], **overrides})


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """(grid*grid, width) sine/cosine codes of each patch's row and column (Vaswani et al.)."""
    assert width % 4 == 0, "width must be divisible by 4 for 2-D sin-cos position codes"
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    frequencies = 1.0 / 10000 ** (torch.arange(width // 4) / (width // 4))
    angles_r = rows.flatten()[:, None] * frequencies[None]  # (N, D/4)
    angles_c = cols.flatten()[:, None] * frequencies[None]
    return torch.cat([angles_r.sin(), angles_r.cos(), angles_c.sin(), angles_c.cos()], dim=1)


class PatchEmbed(nn.Module):
    """Cuts the image into non-overlapping patches and embeds each one linearly.

    Flattening each P x P x 3 patch and multiplying by a (3*P*P, D) matrix is exactly a
    convolution with kernel size P and stride P: the conv is just the fast way to write it.
    """

    def __init__(self, *, image_size: int, patch_size: int, width: int) -> None:
        super().__init__()
        self.grid = image_size // patch_size
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.proj(images)  # (B, D, H/P, W/P)
        return patches.flatten(2).transpose(1, 2)  # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention: every token attends to every token, the class token included."""

    def __init__(self, *, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.attn_drop = nn.Dropout(dropout)
        self.proj_drop = nn.Dropout(dropout)

    def attention_weights(self, tokens: torch.Tensor) -> torch.Tensor:
        """Softmaxed attention of each token over all tokens, (B, heads, N+1, N+1)."""
        q, k, _ = self._split_heads(tokens)
        return self._softmax_scores(q, k)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, width = tokens.shape
        q, k, v = self._split_heads(tokens)
        weights = self.attn_drop(self._softmax_scores(q, k))
        mixed = weights @ v  # (B, heads, N+1, head_dim)
        mixed = mixed.transpose(1, 2).reshape(batch, length, width)  # (B, N+1, D)
        return self.proj_drop(self.proj(mixed))

    def _split_heads(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, length, _ = tokens.shape
        qkv = self.qkv(tokens).reshape(batch, length, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N+1, head_dim)
        return q, k, v

    def _softmax_scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5  # (B, heads, N+1, N+1)
        return scores.softmax(dim=-1)


class MLP(nn.Module):
    """The position-wise feed-forward network of a transformer block."""

    def __init__(self, *, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(tokens)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, *, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width=width, heads=heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = MLP(width=width, hidden=int(width * mlp_ratio), dropout=dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.attn(self.norm1(tokens))
        return tokens + self.mlp(self.norm2(tokens))


class VisionTransformer(nn.Module):
    """ViT classifier: its logits' softmax is the class distribution."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.patch_embed = PatchEmbed(
            image_size=config.image_size, patch_size=config.patch_size, width=width
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, width))
        self.pos_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(
                width=width, heads=config.heads, mlp_ratio=config.mlp_ratio, dropout=config.dropout
            )
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, config.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # Learnable, but starting from 2-D sin-cos: every patch knows its row and column from
        # the first step, which shortens a small ViT's long initial plateau on a new task.
        grid = self.config.image_size // self.config.patch_size
        with torch.no_grad():
            self.pos_embed[0, 1:] = sincos_2d(grid, self.config.width)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        # The original ViT's initialisation: Xavier-uniform layers, LeCun-normal patch embedding,
        # zero head. The smaller std=0.02 of later recipes leaves the blocks nearly linear at the
        # start, and on shapes of random colour (no linear cue) training then never leaves chance.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        fan_in = 3 * self.config.patch_size**2
        nn.init.trunc_normal_(self.patch_embed.proj.weight, std=fan_in**-0.5)
        if self.patch_embed.proj.bias is not None:
            nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.zeros_(self.head.weight)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens with the class token prepended and position embeddings added."""
        patches = self.patch_embed(images)  # (B, N, D)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)  # (B, 1, D)
        tokens = torch.cat([cls, patches], dim=1)  # (B, N+1, D)
        return self.pos_drop(tokens + self.pos_embed)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(images)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)  # (B, N+1, D)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features[:, 0])  # (B, classes), from the class token

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))
