"""VIT_MODELS_MEMORY_BYTES against what serves and what loads hold back."""

from __future__ import annotations

import pytest

from service.errors import ModelLoadFailed
from service.inference.memory_budget import MemoryBudget

MB = 1 << 20


def test_no_budget_leaves_unbounded_room() -> None:
    budget = MemoryBudget(0)
    assert budget.room(("m", 1), held=10**12) is None
    budget.check(("m", 1), held=10**12, needed=10**12, what="anything")


def test_room_is_the_budget_less_what_serves_and_what_other_loads_hold_back() -> None:
    budget = MemoryBudget(100 * MB)
    budget.reserve(("a", 1), 30 * MB)
    budget.reserve(("b", 1), 10 * MB)
    assert budget.room(("a", 1), held=20 * MB) == 70 * MB  # its own reservation is not counted
    assert budget.room(("c", 1), held=20 * MB) == 40 * MB
    budget.release(("a", 1))
    assert budget.room(("c", 1), held=20 * MB) == 70 * MB


def test_a_version_that_does_not_fit_is_refused_with_the_figures() -> None:
    budget = MemoryBudget(100 * MB)
    budget.reserve(("other", 2), 50 * MB)
    with pytest.raises(ModelLoadFailed) as refused:
        budget.check(("m", 1), held=40 * MB, needed=20 * MB, what="20 MB measured after warm-up")
    assert str(refused.value) == (
        "would exceed VIT_MODELS_MEMORY_BYTES (100 MB): 20 MB measured after warm-up, and the "
        "versions serving or loading leave 10 MB"
    )
    budget.check(("m", 1), held=40 * MB, needed=10 * MB, what="fits exactly")
