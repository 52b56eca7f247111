"""The analytic cost of a plain ViT against a count by hand, as /v1/models reports it, and none
for a config that describes no ViT that could run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


CONFIG = {"image_size": 32, "patch_size": 16, "width": 4, "depth": 1, "mlp_ratio": 2.0}


NOT_RUNNABLE = {
    "zero patch": {"patch_size": 0},
    "negative patch": {"patch_size": -16},
    "patch over the image": {"patch_size": 64},
    "fractional width": {"width": 4.5},
    "boolean depth": {"depth": True},
    "size as text": {"image_size": "32"},
    "size of 400 digits": {"image_size": 10**400},
    "ratio 1e308": {"mlp_ratio": 1e308},
    "infinite ratio": {"mlp_ratio": math.inf},
    "NaN ratio": {"mlp_ratio": math.nan},
    "zero ratio": {"mlp_ratio": 0},
    "ratio of 400 digits": {"mlp_ratio": 10**400},
    "FLOPs past 64 bits": {"depth": 2**62},  # each size fits, the product does not
}


@pytest.mark.parametrize("change", NOT_RUNNABLE.values(), ids=NOT_RUNNABLE.keys())
def test_a_config_that_describes_no_runnable_vit_has_no_cost(change: dict[str, object]) -> None:
    assert cost_of(CONFIG, 3) is not None
    assert cost_of({**CONFIG, **change}, 3) is None


def test_whole_numbers_written_as_floats_are_sizes() -> None:
    assert cost_of({**CONFIG, "image_size": 32.0, "mlp_ratio": 2}, 3) == cost_of(CONFIG, 3)


JSON_SCALARS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
)


@given(
    st.dictionaries(
        st.sampled_from(["image_size", "patch_size", "width", "depth", "mlp_ratio"]),
        JSON_SCALARS,
    )
)
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # a busy 2-core machine
def test_any_config_gets_a_cost_or_none_never_an_error(config: dict[str, object]) -> None:
    cost = cost_of(config, 1000)
    if cost is not None:
        figures = cost.as_dict().values()
        assert all(0 <= figure <= 2**63 - 1 for figure in figures)
