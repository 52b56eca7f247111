"""The data-efficiency experiment's pieces: its plan, the crossover, the summary and the report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from benchmarks.data_efficiency import (  # noqa: E402
    MAX_STEPS,
    Run,
    build,
    crossover,
    expected_seconds,
    plan,
    plot,
    read_runs,
    report,
    summarise,
)


def row(
    model: str,
    size: int,
    seed: int,
    accuracy: float,
    dataset: str = "shapes",
    fit_accuracy: float = 0.99,
    steps: int = 1_000,
    converged: bool = True,
) -> dict[str, Any]:
    return {
        "model": model,
        "dataset": dataset,
        "train_size": size,
        "seed": seed,
        "steps": steps,
        "converged": converged,
        "epochs": steps * 64 / size,
        "test_accuracy": accuracy,
        "fit_accuracy": fit_accuracy,
        "train_seconds": 60.0 * (1 + seed),
        "started_at": 1_000.0,
        "finished_at": 1_000.0 + 0.6 * size,
    }


def test_the_plan_runs_every_set_for_both_models_a_whole_seed_at_a_time() -> None:
    runs = plan([0, 1, 2], (500, 2_000, 8_000, 30_000))
    assert len(runs) == 3 * 2 * 5
    assert [r.seed for r in runs] == [0] * 10 + [1] * 10 + [2] * 10
    assert [(r.model, r.dataset, r.train_size) for r in runs[:4]] == [
        ("vit", "shapes", 500),
        ("cnn", "shapes", 500),
        ("vit", "shapes", 2_000),
        ("cnn", "shapes", 2_000),
    ]
    assert {(r.dataset, r.train_size) for r in runs[8:10]} == {("digits", 1_297)}


def test_a_rerun_finds_every_run_already_made_and_how_long_each_took(tmp_path: Path) -> None:
    runs = plan([0, 1], (500,))
    rows = [row(r.model, r.train_size, r.seed, 0.5, dataset=r.dataset) for r in runs]
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = read_runs(tmp_path / "runs.jsonl")
    assert set(done) == {r.key for r in runs}
    assert read_runs(tmp_path / "absent.jsonl") == {}
    assert expected_seconds(Run("vit", "shapes", 500, 2), done) == pytest.approx(90.0)
    assert expected_seconds(Run("vit", "shapes", 2_000, 0), done) == 0.0


def test_both_models_are_built_alike_from_a_seed() -> None:
    vit, cnn = build("vit", 10, 0), build("cnn", 10, 0)
    count = [sum(p.numel() for p in m.parameters()) for m in (vit, cnn)]
    assert abs(count[0] / count[1] - 1) < 0.02
    again = build("cnn", 10, 0)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in cnn.state_dict().items())
    assert vit(torch.zeros(1, 3, 64, 64)).shape == (1, 10)
    assert cnn(torch.zeros(1, 3, 64, 64)).shape == (1, 10)


def test_the_crossover_is_interpolated_in_log_size() -> None:
    sizes = [500, 2_000, 8_000, 30_000]
    assert crossover(sizes, [-0.2, -0.1, 0.1, 0.2]) == pytest.approx(math.sqrt(2_000 * 8_000))
    assert crossover(sizes, [-0.2, -0.1, 0.0, 0.2]) == pytest.approx(8_000)
    assert crossover(sizes, [0.1, -0.1, 0.1, 0.2]) == 500
    assert crossover(sizes, [-0.3, -0.2, -0.1, -0.05]) is None


def test_the_summary_gives_each_seed_their_mean_and_half_their_range() -> None:
    rows = [
        row("vit", 500, 0, 0.5, steps=800),
        row("vit", 500, 1, 0.6, steps=1_200, converged=False),
        row("cnn", 500, 0, 0.8),
    ]
    vit = summarise(rows)["shapes"]["500"]["vit"]
    assert vit["accuracies"] == [0.5, 0.6] and vit["seeds"] == [0, 1]
    assert vit["mean"] == pytest.approx(0.55) and vit["spread"] == pytest.approx(0.05)
    assert vit["steps"] == [800, 1_200] and vit["mean_steps"] == 1_000
    assert vit["converged"] is False
    assert summarise(rows)["shapes"]["500"]["cnn"]["converged"] is True


def test_the_report_states_the_gap_and_where_the_vit_catches_up() -> None:
    accuracies = {500: (0.40, 0.60), 2_000: (0.70, 0.80), 8_000: (0.90, 0.85)}
    rows = [
        row(model, size, seed, accuracy + seed * 0.01)
        for size, (vit, cnn) in accuracies.items()
        for model, accuracy in (("vit", vit), ("cnn", cnn))
        for seed in (0, 1)
    ] + [row("vit", 1_297, 0, 0.9, "digits"), row("cnn", 1_297, 0, 0.95, "digits")]
    text = report(rows)
    assert "| shapes | 500 | **40.5%** ± 0.5% (40.0%, 41.0%) | **60.5%** ± 0.5%" in text
    assert "| -20.0 points | 1,000 (128) | 1,000 (128) | 99.0%, 99.0% |" in text
    assert "-20.0 at 500, -10.0 at 2,000, +5.0 at 8,000" in text
    assert f"caught it at about {round(2_000 * 4 ** (2 / 3)):,} training images" in text
    assert "**90.0%** (one seed)" in text
    assert "the ViT scored 90.0% and the CNN 95.0%: -5.0 points." in text
    assert "Planned" not in text and "Neither model fitted" not in text
    assert "(capped)" not in text and "reached the cap" not in text
    assert "The seeds agreed least for the ViT on 8,000 shapes (1.0 points apart)" in text


def test_the_report_says_when_the_vit_never_catches_up_and_counts_small_gaps_as_ties() -> None:
    accuracies = {500: (0.20, 0.21), 2_000: (0.30, 0.60), 30_000: (0.70, 0.90)}
    rows = [
        row(model, size, 0, accuracy, fit_accuracy=0.4)
        for size, (vit, cnn) in accuracies.items()
        for model, accuracy in (("vit", vit), ("cnn", cnn))
    ]
    text = report(rows, missing=plan([1], (500,))[:2])
    assert "-1.0 at 500 (a tie), -30.0 at 2,000, -20.0 at 30,000." in text
    assert "did not catch it within 30,000 images: no crossover" in text
    assert "widest at 2,000 images (30.0 points) and 20.0 at 30,000." in text
    assert "Neither model fitted every training set" in text and "ViT 40%, CNN 40%" in text
    assert "Planned and not yet run: 2 runs (2 of seed 1)" in text


def test_a_run_stopped_by_the_cap_is_marked_and_named() -> None:
    rows = [row("vit", 500, 0, 0.5, converged=False), row("cnn", 500, 0, 0.6)]
    text = report(rows)
    assert "**50.0%** (one seed) (capped)" in text
    assert f"reached the cap of {MAX_STEPS:,} steps" in text and "the ViT on 500 shapes" in text
    assert "the CNN on 500" not in text


def test_the_plot_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rows = [row(m, s, 0, a) for m, a in (("vit", 0.5), ("cnn", 0.6)) for s in (500, 2_000)]
    rows.append(row("vit", 1_297, 0, 0.9, "digits"))
    plot(rows, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
