"""`vit-predict`: send image files or folders to a running service and print each file's answer."""

from __future__ import annotations

import argparse
import json
import mimetypes
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def image_files(paths: list[Path]) -> Iterator[Path]:
    """The files named, and the image files inside the folders named, in sorted order."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield path


def classify_file(url: str, path: Path, top_k: int, timeout: float) -> dict[str, object]:
    """POST one file as a raw image body; the service's JSON answer (or its JSON error)."""
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    request = urllib.request.Request(
        f"{url.rstrip('/')}/v1/classify?top_k={top_k}",
        data=path.read_bytes(),
        headers={"Content-Type": content_type},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer: dict[str, object] = json.load(response)
    except urllib.error.HTTPError as error:
        answer = json.load(error)
    return answer


def describe(answer: dict[str, object]) -> str:
    predictions = answer.get("predictions")
    if not isinstance(predictions, list):
        return f"error ({answer.get('type')}): {answer.get('error')}"
    top = predictions[0]["top"]
    return "  ".join(f"{entry['label']} {entry['probability']:.4f}" for entry in top)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vit-predict", description=__doc__)
    parser.add_argument("paths", type=Path, nargs="+", help="image files or folders")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    failed = False
    for path in image_files(args.paths):
        answer = classify_file(args.url, path, args.top_k, args.timeout)
        failed |= "predictions" not in answer
        sys.stdout.write(f"{path}\t{describe(answer)}\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
