"""What a plain ViT costs per image, analytically: tokens, attention pairs, and FLOPs split into
attention (the QK^T and AV products), projections (QKV and output) and the MLP.

A multiply-add counts as 2 FLOPs. Per layer, with N tokens (the patches plus the class token) of
width D and an MLP of ratio r:

    attention    QK^T: N*N*D multiply-adds, AV: N*N*D           -> 4 N^2 D
    projections  Q, K, V and the output: 4 N D^2               -> 8 N D^2
    MLP          D -> rD -> D: 2 r N D^2                        -> 4 r N D^2

plus the patch embedding (N-1 patches, each P*P*3 -> D) and the head, which do not depend on the
layer count. Attention grows with N^2, the rest with N: attention overtakes the projections and
the MLP together once N > (2 + r) D.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

_INT64_MAX = 2**63 - 1
"""The largest size, ratio or figure taken: what a client reading the cost as int64 holds."""


@dataclass(frozen=True)
class ViTCost:
    """Per image, for one forward pass."""

    tokens: int
    attention_pairs_per_layer: int
    """Token pairs each head scores in one layer: N^2."""
    attention_flops: int
    projection_flops: int
    mlp_flops: int
    embedding_and_head_flops: int

    @property
    def total_flops(self) -> int:
        return (
            self.attention_flops
            + self.projection_flops
            + self.mlp_flops
            + self.embedding_and_head_flops
        )

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total_flops": self.total_flops}


def vit_cost(
    *,
    image_size: int,
    patch_size: int,
    width: int,
    depth: int,
    mlp_ratio: float,
    num_classes: int,
) -> ViTCost:
    patches = (image_size // patch_size) ** 2
    n, d = patches + 1, width
    mlp_hidden = int(width * mlp_ratio)
    return ViTCost(
        tokens=n,
        attention_pairs_per_layer=n * n,
        attention_flops=depth * 4 * n * n * d,
        projection_flops=depth * 8 * n * d * d,
        mlp_flops=depth * 4 * n * d * mlp_hidden,
        embedding_and_head_flops=2 * patches * (3 * patch_size * patch_size) * d
        + 2 * d * num_classes,
    )


def cost_of(config: Any, num_classes: int) -> ViTCost | None:
    """The cost of a model whose metadata describes its architecture (`dataset.config`, as
    vit-export and vit-import hf write it); None when it does not, or describes none that could
    run (metadata is untrusted: a listing must not fail on it): sizes that are not positive
    integers, a patch larger than the image, an MLP ratio that is not a positive finite number,
    or a figure past what a 64-bit integer holds."""
    if not isinstance(config, dict):
        return None
    image_size, patch_size, width, depth = (
        _size(config.get(key)) for key in ("image_size", "patch_size", "width", "depth")
    )
    ratio = _ratio(config.get("mlp_ratio"))
    if image_size is None or patch_size is None or width is None or depth is None:
        return None
    if ratio is None or patch_size > image_size:
        return None
    cost = vit_cost(
        image_size=image_size,
        patch_size=patch_size,
        width=width,
        depth=depth,
        mlp_ratio=ratio,
        num_classes=num_classes,
    )
    return cost if cost.total_flops <= _INT64_MAX else None


def _size(value: object) -> int | None:
    """A positive integer (written as one, or as a whole float) up to _INT64_MAX, else None."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= _INT64_MAX:
        return value
    return None


def _ratio(value: object) -> float | None:
    """A positive finite number up to _INT64_MAX, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if 0 < value <= _INT64_MAX else None  # NaN compares false
