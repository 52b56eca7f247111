"""The in-flight budget: image places and body bytes held per request, refused over the bounds,
all given back on release."""

from __future__ import annotations

import pytest

from service.errors import Overloaded
from service.inference.budget import Budget


def budget(max_images: int = 10, max_body_bytes: int = 1000) -> Budget:
    return Budget(
        max_images=max_images, max_body_bytes=max_body_bytes, retry_after=lambda held: held
    )


def test_a_request_holds_a_place_from_admission_and_its_images_once_known() -> None:
    places = budget()
    first, second = places.admit(), places.admit()
    assert places.images == 2
    first.hold_images(8)
    assert places.images == 9
    with pytest.raises(Overloaded) as refused:
        second.hold_images(3)  # 8 + 3 > 10
    assert refused.value.retry_after == 9
    assert places.images == 9 and second.images == 1
    second.hold_images(2)
    with pytest.raises(Overloaded):
        places.admit()
    first.release()
    second.release()
    assert places.images == 0


def test_body_bytes_are_refused_before_the_budget_is_passed() -> None:
    places = budget()
    first, second = places.admit(), places.admit()
    first.hold_bytes(600)
    assert second.can_hold_bytes(400) and not second.can_hold_bytes(401)
    with pytest.raises(Overloaded):
        second.hold_bytes(401)
    second.hold_bytes(400)
    assert places.body_bytes == 1000
    first.release()
    assert places.body_bytes == 400
    second.release()
    assert (places.body_bytes, places.images) == (0, 0)
