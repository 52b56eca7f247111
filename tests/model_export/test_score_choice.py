"""Choosing the out-of-distribution score on images unlike the model's own."""

from __future__ import annotations

import numpy as np
import pytest

from model_contract.ood import Score
from model_export.stamp import most_flagging

RNG = np.random.default_rng(0)
INSIDE = RNG.normal(0.0, 1.0, 1000)


def test_the_score_flagging_most_outliers_at_the_same_acceptance_wins() -> None:
    # "energy" separates outliers by two standard deviations, "max_softmax" by one: each threshold
    # accepts 95% of its own in-distribution values, so energy flags more.
    scored: dict[Score, tuple[np.ndarray, np.ndarray]] = {
        "max_softmax": (INSIDE, RNG.normal(-1.0, 1.0, 500)),
        "energy": (INSIDE * 10, RNG.normal(-20.0, 10.0, 500)),
    }
    best, thresholds, shares = most_flagging(scored, 0.95)
    assert best == "energy"
    assert (INSIDE * 10 >= thresholds["energy"]).mean() == 0.95
    assert shares["energy"] > shares["max_softmax"] + 0.2
    assert 0 < shares["max_softmax"] < 1


def test_shares_the_outliers_cannot_tell_apart_are_a_tie() -> None:
    """999 and 998 of 1,000 outliers: one image apart, within two standard errors."""
    inside = np.arange(1000.0)
    one_more = np.r_[np.full(999, -1.0), [500.0]]
    one_fewer = np.r_[np.full(998, -1.0), [500.0, 500.0]]
    far_fewer = np.r_[np.full(980, -1.0), np.full(20, 500.0)]
    scored: dict[Score, tuple[np.ndarray, np.ndarray]] = {
        "mahalanobis_energy": (inside, one_fewer),
        "energy": (inside, one_more),
    }
    assert most_flagging(scored, 0.98)[0] == "mahalanobis_energy"
    scored["mahalanobis_energy"] = (inside, far_fewer)
    assert most_flagging(scored, 0.98)[0] == "energy"


def test_a_tie_keeps_the_first_score_named() -> None:
    outliers = INSIDE - 100  # every score flags every outlier
    scored: dict[Score, tuple[np.ndarray, np.ndarray]] = {
        "mahalanobis": (INSIDE, outliers),
        "energy": (INSIDE, outliers),
    }
    assert most_flagging(scored, 0.98)[0] == "mahalanobis"


def test_the_scale_of_a_score_does_not_decide() -> None:
    # The same separation at a thousand times the scale flags the same outliers.
    outliers = RNG.normal(-3.0, 1.0, 500)
    scored: dict[Score, tuple[np.ndarray, np.ndarray]] = {
        "energy": (INSIDE, outliers),
        "max_softmax": (INSIDE * 1000, outliers * 1000),
    }
    _, _, shares = most_flagging(scored, 0.98)
    assert shares["energy"] == pytest.approx(shares["max_softmax"])
