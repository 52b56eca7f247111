"""VIT_MODELS_MEMORY_BYTES: the memory the loaded versions may hold together, against what the
versions serving were measured to hold and what the loads under way hold back."""

from __future__ import annotations

from service.errors import ModelLoadFailed

VersionKey = tuple[str, int]


class OverBudget(ModelLoadFailed):
    """A version that does not fit beside the versions serving now: it may once they go."""


class MemoryBudget:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        """0: no bound."""
        self._reserved: dict[VersionKey, int] = {}
        """Memory held back for versions being loaded."""

    def reserve(self, key: VersionKey, size: int) -> None:
        self._reserved[key] = size

    def release(self, key: VersionKey) -> None:
        self._reserved.pop(key, None)

    def room(self, key: VersionKey, held: int) -> int | None:
        """Memory left for the version `key` (None: no budget), given that the versions serving
        (but the one `key` would replace) hold `held`, and less what the other loads under way
        hold back."""
        if not self.budget_bytes:
            return None
        reserved = sum(size for other, size in self._reserved.items() if other != key)
        return self.budget_bytes - held - reserved

    def check(self, key: VersionKey, held: int, needed: int, what: str) -> None:
        """Refuse the load of `key` if `needed` (`what` says how it was found) does not fit."""
        room = self.room(key, held)
        if room is not None and needed > room:
            raise OverBudget(
                f"would exceed VIT_MODELS_MEMORY_BYTES ({self.budget_bytes >> 20} MB): {what}, "
                f"and the versions serving or loading leave {max(room, 0) >> 20} MB"
            )
