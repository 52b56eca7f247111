"""The out-of-distribution benchmark's arithmetic and the table it writes into the docs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.ood import (
    HELD_OUT_SEEDS,
    PER_SEED,
    TABLE_END,
    TABLE_START,
    measure,
    table,
    write_table,
)


def sets() -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Logits whose max_softmax is exactly the first logit's share: in-distribution images are
    sure of class 0, outliers are not; seed k's shapes hold k unsure images."""
    rng = np.random.default_rng(0)

    def sure(count: int) -> np.ndarray:
        return np.column_stack([rng.uniform(6, 9, count), np.zeros((count, 7))])

    def unsure(count: int) -> np.ndarray:
        return rng.normal(0, 0.1, (count, 8))

    out: dict[str, tuple[np.ndarray, np.ndarray | None]] = {"calibration": (sure(1000), None)}
    for k, seed in enumerate(HELD_OUT_SEEDS):
        out[f"shapes {seed}"] = (np.vstack([sure(PER_SEED - k), unsure(k)]), None)
    for name, count in (("photos", 21), ("faces", 200), ("generated", 50)):
        out[name] = (np.vstack([unsure(count - 1), sure(1)]), None)
    return out


def test_each_set_is_counted_at_the_threshold_and_spread_over_seeds() -> None:
    result = measure(sets(), "max_softmax", threshold=0.5, accept_rate=0.98)
    assert result["threshold"] == 0.5
    assert list(result["shapes_flagged_by_seed"].values()) == list(range(len(HELD_OUT_SEEDS)))
    assert result["shapes_flagged_min"] == 0
    assert result["shapes_flagged_max"] == (len(HELD_OUT_SEEDS) - 1) / PER_SEED
    assert result["photos_flagged"] == 20 and result["faces_flagged"] == 199
    assert result["generated_flagged"] == 49 and result["generated"] == 50


def test_without_a_threshold_it_is_set_on_the_calibration_images() -> None:
    result = measure(sets(), "energy", threshold=None, accept_rate=0.9)
    calibration = sets()["calibration"][0]
    energies = np.log(np.exp(calibration).sum(axis=1))
    assert (energies >= result["threshold"]).mean() == pytest.approx(0.9, abs=1e-3)


def test_the_table_replaces_only_what_lies_between_its_markers(tmp_path: Path) -> None:
    results = {
        "stored_score": "energy",
        "scores": {"energy": measure(sets(), "energy", threshold=None, accept_rate=0.98)},
    }
    markdown = table(results)
    assert "**energy** (stored)" in markdown and "20 / 21 (95%)" in markdown
    doc = tmp_path / "doc.md"
    doc.write_text(f"before\n{TABLE_START}\nold\n{TABLE_END}\nafter\n")
    write_table(markdown, doc)
    assert doc.read_text() == f"before\n{TABLE_START}\n{markdown}\n{TABLE_END}\nafter\n"
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        write_table(markdown, doc)
