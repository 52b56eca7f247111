"""The analytic cost of a plain ViT against a count by hand, and as /v1/models reports it."""

from __future__ import annotations

from pathlib import Path

from model_contract.vit_cost import cost_of, vit_cost
from tests.service_support import cpu_settings, ready_client


def test_the_formula_against_a_hand_count() -> None:
    # 32x32 image, 16x16 patches: 4 patches + the class token = 5 tokens of width 4; one layer,
    # MLP 4 -> 8 -> 4; 3 classes. A multiply-add is 2 FLOPs.
    cost = vit_cost(image_size=32, patch_size=16, width=4, depth=1, mlp_ratio=2.0, num_classes=3)
    assert cost.tokens == 5 and cost.attention_pairs_per_layer == 25
    assert cost.attention_flops == 2 * (5 * 5 * 4) * 2  # QK^T (5x4 @ 4x5) and AV (5x5 @ 5x4)
    assert cost.projection_flops == 2 * 4 * (5 * 4 * 4)  # Q, K, V, out: each 5x4 @ 4x4
    assert cost.mlp_flops == 2 * (5 * 4 * 8 + 5 * 8 * 4)  # 5x4 @ 4x8, then 5x8 @ 8x4
    assert cost.embedding_and_head_flops == 2 * 4 * (3 * 16 * 16) * 4 + 2 * 4 * 3
    assert cost.total_flops == 400 + 640 + 640 + 24576 + 24


def test_attention_overtakes_the_rest_past_2_plus_r_times_the_width() -> None:
    def attention_share(size: int) -> float:
        c = vit_cost(
            image_size=size, patch_size=16, width=192, depth=6, mlp_ratio=4.0, num_classes=8
        )
        return c.attention_flops / (c.projection_flops + c.mlp_flops)

    assert attention_share(512) < 1 < attention_share(1024)  # 1,025 and 4,097 tokens vs 1,152


def test_models_report_the_cost_where_the_metadata_describes_a_vit(served_model: Path) -> None:
    assert cost_of({"image_size": 128}, 8) is None
    with ready_client(cpu_settings(served_model)) as client:
        (model,) = client.get("/v1/models").json()["models"]
    assert model["cost"]["tokens"] == 65 and model["cost"]["attention_pairs_per_layer"] == 65**2
    expected = vit_cost(
        image_size=128, patch_size=16, width=192, depth=6, mlp_ratio=4.0, num_classes=8
    )
    assert model["cost"]["total_flops"] == expected.total_flops
