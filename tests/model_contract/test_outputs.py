"""The outputs a model serves are data of its metadata and graph: names and shapes per image."""

from __future__ import annotations

from model_contract.metadata import OodCalibration
from model_contract.outputs import ATTENTION_ROLLOUT, OOD_SCORE, PROBABILITIES, served_outputs
from tests.onnx_models import metadata_for


def test_a_plain_classifier_serves_its_probabilities_one_per_label() -> None:
    (only,) = served_outputs(metadata_for(["a", "b", "c"], 32), None)
    assert (only.name, only.per_image, only.shape) == (PROBABILITIES, (3,), (-1, 3))


def test_rollout_and_ood_score_follow_the_metadata_with_the_graphs_grid() -> None:
    ood = OodCalibration(
        score="max_softmax",
        threshold=0.5,
        accept_rate=0.95,
        calibration_images=10,
        calibration_source="held-out images",
    )
    metadata = metadata_for(["a", "b"], 32, attention_output="rollout", ood=ood)
    fixed = served_outputs(metadata, (4, 4))
    assert [(o.name, o.shape) for o in fixed] == [
        (PROBABILITIES, (-1, 2)),
        (ATTENTION_ROLLOUT, (-1, 4, 4)),
        (OOD_SCORE, (-1,)),
    ]
    open_grid = served_outputs(metadata, None)
    assert open_grid[1].shape == (-1, -1, -1)  # a grid the graph leaves symbolic
