"""Content negotiation: the media type a route answers with, as the `Accept` header ranks it."""

from __future__ import annotations

import pytest

from service.http.negotiation import preferred

OFFERED = ("application/json", "image/png")


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        ("", "application/json"),
        ("  ", "application/json"),
        ("image/png", "image/png"),
        ("IMAGE/PNG", "image/png"),
        ("Image/Png; Q=0.9", "image/png"),
        ("image/*", "image/png"),
        ("*/*", "application/json"),
        ("application/json, image/png", "application/json"),
        ("image/png, application/json", "application/json"),  # a tie: the server's first
        ("image/png;q=0.5, application/json;q=0.5", "application/json"),
        ("image/png, application/json;q=0.9", "image/png"),
        ("image/png;q=0", None),
        ("image/png;q=0, */*", "application/json"),
        ("image/png;q=0, */*;q=0.1", "application/json"),
        ("*/*;q=0.1, image/png", "image/png"),
        ("image/*;q=0.8, */*;q=0.1", "image/png"),
        ("image/png;q=0.0, image/*", None),  # the most specific range decides
        ("image/*;q=0, image/png", "image/png"),
        ("text/html, */*;q=0.8", "application/json"),
        ("image/png;charset=x;q=0.7;ext=1, application/json;q=0.6", "image/png"),
        ("image/jpeg", None),
        ("image/webp, text/*", None),
        ("*/*;q=0", None),
        ("image/png;q=2, application/json;q=0.1", "application/json"),  # q above 1: malformed
        ("image/png;q=abc", None),
        ("image/png;q=0.1234", None),
        ("png, image/", None),
        ("*/png", None),
        ("image/png,,", "image/png"),
    ],
)
def test_the_best_ranked_acceptable_type_is_chosen(accept: str, chosen: str | None) -> None:
    assert preferred(accept, OFFERED) == chosen
