"""The README's picture of the web page shows the page, model and photo as they are now."""

from __future__ import annotations

from pathlib import Path

from benchmarks.screenshot import (
    PHOTO,
    SCREENSHOT,
    fingerprint,
    stored_fingerprint,
    with_fingerprint,
)


def test_the_readme_screenshot_is_of_the_current_page_and_model() -> None:
    assert stored_fingerprint() == fingerprint(), (
        "the web page, the bundled model or the photo changed since docs/web-page.png was "
        "drawn: run `python -m benchmarks.screenshot`"
    )


def test_any_change_to_what_is_shown_changes_the_fingerprint(tmp_path: Path) -> None:
    changed = tmp_path / PHOTO.name
    changed.write_bytes(PHOTO.read_bytes() + b"\0")
    assert fingerprint(photo=changed) != fingerprint()
    png = tmp_path / "shot.png"
    png.write_bytes(with_fingerprint(SCREENSHOT.read_bytes(), "abc"))
    assert stored_fingerprint(png) == "abc"
