"""What a model serves, by name: each output one row per image, with its shape per image.

The names are the service's, not the graph's (the graph's names are in the metadata): the
session answers with them, the batcher and the pipeline carry them as one mapping, and both
protocol fronts describe and return them as this module lists them. A new output is a new
entry here, not a new path through the code.
"""

from __future__ import annotations

from dataclasses import dataclass

from model_contract.metadata import ModelMetadata

PROBABILITIES = "probabilities"
"""Class probabilities, one per label, summing to 1."""
ATTENTION_ROLLOUT = "attention_rollout"
"""The attention rollout over the patch grid, where the model carries one."""
OOD_SCORE = "ood_score"
"""The out-of-distribution score, where the model is calibrated for one."""
EMBEDDING = "embedding"
"""The vector the classification head reads, where the model carries it (model_contract.metadata.
Embedding); a model without classes serves it alone."""


@dataclass(frozen=True)
class OutputSpec:
    """One output the service serves: float32, one row per image."""

    name: str
    per_image: tuple[int, ...]
    """Its shape for one image; -1 where the graph leaves a dimension open."""

    @property
    def shape(self) -> tuple[int, ...]:
        """Its shape for a batch: -1, the batch, first."""
        return (-1, *self.per_image)


def served_outputs(
    metadata: ModelMetadata, attention_grid: tuple[int, int] | None
) -> tuple[OutputSpec, ...]:
    """The outputs a model with `metadata` serves, in order: the probabilities of a classifier,
    the rollout where it carries one (its grid where the graph fixes it), the OOD score where it
    is calibrated, the embedding where it carries one (a model without classes serves it
    alone)."""
    embedding = metadata.embedding
    if not metadata.has_classes and embedding is not None:
        return (OutputSpec(EMBEDDING, (embedding.size,)),)
    outputs = [OutputSpec(PROBABILITIES, (len(metadata.labels),))]
    if metadata.attention_output is not None:
        outputs.append(OutputSpec(ATTENTION_ROLLOUT, attention_grid or (-1, -1)))
    if metadata.ood is not None:
        outputs.append(OutputSpec(OOD_SCORE, ()))
    if embedding is not None:
        outputs.append(OutputSpec(EMBEDDING, (embedding.size,)))
    return tuple(outputs)
