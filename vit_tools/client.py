"""`vit-predict`: send image files or folders to a running service and print each file's answer."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
import uuid
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


class Unreachable(Exception):
    """The service did not answer at all: nothing more to try."""


def multipart(path: Path, data: bytes) -> tuple[bytes, str]:
    """One file as a multipart form (field `file`): the service decides what the bytes are."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="{path.name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
    )
    body = head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def classify_file(url: str, path: Path, top_k: int, timeout: float) -> dict[str, object]:
    """POST one file; the service's JSON answer, its JSON error, or a local error in the same
    shape (`{"error", "type"}`) for a file that cannot be read."""
    try:
        data = path.read_bytes()
    except OSError as error:
        return {"error": error.strerror or str(error), "type": "unreadable_file"}
    body, content_type = multipart(path, data)
    request = urllib.request.Request(
        f"{url.rstrip('/')}/v1/classify?top_k={top_k}",
        data=body,
        headers={"Content-Type": content_type},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer: dict[str, object] = json.load(response)
    except urllib.error.HTTPError as error:
        try:
            answer = json.load(error)
        except ValueError:
            answer = {"error": f"HTTP {error.code} {error.reason}", "type": "http_error"}
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise Unreachable(
            f"cannot reach the service at {url} ({reason}); start it with `make serve` "
            "or pass --url"
        ) from error
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
        try:
            answer = classify_file(args.url, path, args.top_k, args.timeout)
        except Unreachable as error:
            sys.exit(f"vit-predict: {error}")
        failed |= "predictions" not in answer
        sys.stdout.write(f"{path}\t{describe(answer)}\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
