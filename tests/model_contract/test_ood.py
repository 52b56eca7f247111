"""The out-of-distribution score and threshold (model_contract/ood.py) and their place in the
metadata: the numbers a calibration stores and the service compares."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from model_contract.metadata import OodCalibration
from model_contract.ood import in_distribution, ood_scores, threshold_accepting
from tests.onnx_models import metadata_for

LOGITS = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [10.0, -5.0, 1.0]], np.float32)


def test_max_softmax_is_the_top_probability_from_logits_or_probabilities() -> None:
    probabilities = np.exp(LOGITS) / np.exp(LOGITS).sum(axis=1, keepdims=True)
    from_logits = ood_scores(LOGITS, "logits", "max_softmax")
    np.testing.assert_allclose(from_logits, probabilities.max(axis=1), rtol=1e-6)
    np.testing.assert_allclose(
        ood_scores(probabilities, "probabilities", "max_softmax"), from_logits, rtol=1e-6
    )
    assert from_logits[1] == pytest.approx(1 / 3)


def test_energy_is_logsumexp_and_needs_logits() -> None:
    expected = np.log(np.exp(LOGITS.astype(np.float64)).sum(axis=1))
    np.testing.assert_allclose(ood_scores(LOGITS, "logits", "energy"), expected, rtol=1e-12)
    big = np.array([[1000.0, 999.0]])  # no overflow
    assert ood_scores(big, "logits", "energy")[0] == pytest.approx(1000 + np.log1p(np.exp(-1)))
    with pytest.raises(ValueError, match="needs logits"):
        ood_scores(LOGITS, "probabilities", "energy")


def test_the_threshold_accepts_the_asked_share() -> None:
    scores = np.random.default_rng(0).normal(size=1000)
    threshold = threshold_accepting(scores, 0.95)
    assert in_distribution(scores, threshold).sum() == 950
    assert in_distribution(scores, np.nextafter(threshold, np.inf)).sum() == 949
    assert threshold_accepting(np.array([3.0]), 0.95) == 3.0


def test_a_probabilities_model_cannot_store_an_energy_threshold() -> None:
    calibration = OodCalibration(
        score="energy",
        threshold=1.0,
        accept_rate=0.95,
        calibration_images=10,
        calibration_source="test",
    )
    assert metadata_for(["a", "b"], 32, ood=calibration).ood == calibration
    with pytest.raises(ValidationError, match="needs logits"):
        metadata_for(["a", "b"], 32, ood=calibration, output="probabilities")


def test_the_mahalanobis_score_is_read_from_the_graph_not_computed_from_logits() -> None:
    with pytest.raises(ValueError, match="computed in the graph: read its output 'ood_score'"):
        ood_scores(LOGITS, "logits", "mahalanobis")
    calibration = OodCalibration(
        score="mahalanobis",
        threshold=-250.0,
        accept_rate=0.95,
        calibration_images=10,
        calibration_source="x",
    )
    assert metadata_for(["a", "b"], 32, ood=calibration, output="probabilities").ood == calibration
