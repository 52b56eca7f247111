"""What both importers share: their refusal, the images they check with, and model names."""

from __future__ import annotations

import re
from pathlib import Path

PHOTOS = Path(__file__).resolve().parent / "photos"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImportRefused(ValueError):
    """What was given cannot be served with the numbers its framework gives; one line says why."""


def image_files(folder: Path | None) -> list[Path]:
    """Every image file under `folder` (the shipped photos when None), in a stable order."""
    folder = folder or PHOTOS
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ImportRefused(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return files


def model_name(source: str) -> str:
    """A name fit for URLs (/v2/models/{name}) from a path or hub id: its last part."""
    last = Path(source.rstrip("/")).name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", last).strip("-.") or "model"
