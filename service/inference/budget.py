"""What admitted requests hold, in images and in body bytes, against the replica's bounds.

Every inference request holds one image place from admission, grows it to its real image count
once its body is parsed, and counts its body bytes while they are read; all of it is released
only when the request has left. So `VIT_MAX_QUEUE` bounds the images anywhere in the replica
(being read, decoded, queued or in inference), not only those queued. Runs on the event loop.
"""

from __future__ import annotations

from collections.abc import Callable

from service.errors import Overloaded


class Budget:
    """The replica's bounds and what the admitted requests hold of them."""

    def __init__(
        self, *, max_images: int, max_body_bytes: int, retry_after: Callable[[int], int]
    ) -> None:
        self.max_images = max_images
        self.max_body_bytes = max_body_bytes
        self._retry_after = retry_after
        """Seconds until the work for this many images should be done (for Retry-After)."""
        self.images = 0
        self.body_bytes = 0

    def admit(self) -> Ticket:
        """One image place for a new request, or 503 `overloaded` when none is left."""
        ticket = Ticket(self)
        ticket.hold_images(1)
        return ticket

    def refuse(self, what: str) -> Overloaded:
        return Overloaded(what, retry_after=self._retry_after(self.images))


class Ticket:
    """What one admitted request holds; `release` gives all of it back."""

    def __init__(self, budget: Budget) -> None:
        self._budget = budget
        self.images = 0
        self.body_bytes = 0

    def hold_images(self, count: int) -> None:
        """Hold `count` image places in all (503 if the others' and these exceed the bound)."""
        budget = self._budget
        if budget.images - self.images + count > budget.max_images:
            raise budget.refuse(f"{count} images would exceed the {budget.max_images} in flight")
        budget.images += count - self.images
        self.images = count

    def can_hold_bytes(self, count: int) -> bool:
        return self._budget.body_bytes + count <= self._budget.max_body_bytes

    def hold_bytes(self, count: int) -> None:
        """Count `count` more bytes of request bodies held (503 over the budget)."""
        if not self.can_hold_bytes(count):
            raise self._budget.refuse("the request bodies in flight are over their byte budget")
        self._budget.body_bytes += count
        self.body_bytes += count

    def release(self) -> None:
        self._budget.images -= self.images
        self._budget.body_bytes -= self.body_bytes
        self.images = self.body_bytes = 0
