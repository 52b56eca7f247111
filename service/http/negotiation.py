"""Content negotiation: which of the media types a route answers with the request's `Accept`
header prefers (RFC 9110, section 12.5.1)."""

from __future__ import annotations

import re

_TOKEN = r"[!#$%&'*+.^_`|~0-9a-z-]+"
_RANGE = re.compile(rf"(?:\*/\*|{_TOKEN}/\*|{_TOKEN}/{_TOKEN})")
_QVALUE = re.compile(r"0(?:\.\d{0,3})?|1(?:\.0{0,3})?")

MediaRange = tuple[str, float]


def preferred(accept: str, offered: tuple[str, ...]) -> str | None:
    """The type of `offered` (lower case, the server's preference first) that `accept` gives
    the highest q, the first of them on a tie; None when `accept` makes every one of them
    unacceptable (q=0, or no range matches). A blank header accepts anything, as a missing
    one does.

    Each offered type takes the q of the most specific range matching it (`image/png`, then
    `image/*`, then `*/*`). Types are compared case-insensitively; parameters other than q are
    ignored, and a range that does not parse (or whose q does not) matches nothing."""
    if not accept.strip():
        return offered[0]
    ranges = _parse(accept)
    best, best_q = None, 0.0
    for media_type in offered:
        q = _quality(media_type, ranges)
        if q > best_q:
            best, best_q = media_type, q
    return best


def _parse(accept: str) -> list[MediaRange]:
    ranges = []
    for part in accept.lower().split(","):
        media_range, *parameters = (piece.strip() for piece in part.split(";"))
        q = _q(parameters)
        if _RANGE.fullmatch(media_range) and q is not None:
            ranges.append((media_range, q))
    return ranges


def _q(parameters: list[str]) -> float | None:
    """A range's q: 1 without one, None where it is malformed. Parameters after q are
    extensions, not the media type's."""
    for parameter in parameters:
        name, _, value = (side.strip() for side in parameter.partition("="))
        if name == "q":
            return float(value) if _QVALUE.fullmatch(value) else None
    return 1.0


def _quality(media_type: str, ranges: list[MediaRange]) -> float:
    """The q of the most specific range that matches `media_type` (the highest among equally
    specific ones); 0 where none does."""
    kind = media_type.split("/")[0]
    for candidate in (media_type, f"{kind}/*", "*/*"):
        matching = [q for media_range, q in ranges if media_range == candidate]
        if matching:
            return max(matching)
    return 0.0
