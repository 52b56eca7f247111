"""The out-of-distribution score of a classification output (or the name of the graph output
that holds it), and the threshold that accepts a given share of in-distribution images; export
calibration and the service call the same code."""

from __future__ import annotations

from typing import Literal

import numpy as np

Score = Literal["max_softmax", "energy", "mahalanobis", "mahalanobis_energy"]
SCORE_OUTPUT = "ood_score"
"""The graph output holding the score where the graph computes it (`GRAPH_SCORES`): float32 [N],
higher is more in-distribution."""
GRAPH_SCORES: frozenset[Score] = frozenset({"mahalanobis", "mahalanobis_energy"})
"""Scores of features inside the graph, read from its output `SCORE_OUTPUT`."""


def ood_scores(
    outputs: np.ndarray, output_kind: Literal["logits", "probabilities", "embedding"], score: Score
) -> np.ndarray:
    """One float64 score per row of `outputs` (N, classes); higher means more like the training
    images. max_softmax: the top probability (Hendrycks & Gimpel, 2017). energy: logsumexp of
    the logits, the negative of Liu et al.'s (2020) energy. mahalanobis and mahalanobis_energy
    are no function of the classification output alone: the graph computes them
    (`SCORE_OUTPUT`)."""
    if score in GRAPH_SCORES:
        raise ValueError(
            f"the {score} score is computed in the graph: read its output {SCORE_OUTPUT!r}, "
            "not the classification output"
        )
    if output_kind == "embedding":
        raise ValueError("a model without classes has no out-of-distribution score")
    values = outputs.astype(np.float64)
    if score == "energy":
        if output_kind != "logits":
            raise ValueError("the energy score needs logits, not probabilities")
        top = values.max(axis=1)
        return top + np.log(np.exp(values - top[:, None]).sum(axis=1))
    if output_kind == "probabilities":
        return values.max(axis=1)
    shifted = values - values.max(axis=1, keepdims=True)
    return 1.0 / np.exp(shifted).sum(axis=1)  # exp(0) / sum: the top row's softmax


def threshold_accepting(scores: np.ndarray, rate: float) -> float:
    """The largest threshold t such that at least `rate` of `scores` are >= t."""
    ordered = np.sort(np.asarray(scores, np.float64))[::-1]
    keep = max(1, int(np.ceil(rate * len(ordered) - 1e-9)))
    return float(ordered[keep - 1])


def in_distribution(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Whether each score clears the threshold."""
    return np.asarray(scores) >= threshold
