"""The model repository on disk: `<repo>/<name>/<version>/model.onnx`, as Triton lays it out, or
one file, and what changed between two looks.

A version is a directory named by a positive integer holding `model.onnx`. Copy a new version in
under another name and rename it into place (`cp -r v3 repo/vit/.3 && mv repo/vit/.3 repo/vit/3`):
a rename is atomic, a copy is not. Files are also compared between two scans, so one still being
written is never loaded.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from model_runtime.graph_check import inspect_model

MODEL_FILE = "model.onnx"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
VERSION = re.compile(r"[1-9][0-9]*")
"""A positive integer written as one (ASCII digits, no leading zero): "01" is not "1", and
"²" is no number."""


@dataclass(frozen=True)
class VersionFile:
    """One version's file as the repository scan saw it: where, how big, when last written."""

    path: Path
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> VersionFile:
        stat = path.stat()
        return cls(path, stat.st_size, stat.st_mtime_ns)


Scan = dict[str, dict[int, VersionFile]]
"""name -> version -> file."""
Unreadable = dict[tuple[str, int | None], str]
"""(name, version or None for the model's folder) -> why it could not be read."""


def scan(root: Path, unreadable: Unreadable | None = None) -> Scan:
    """Every model and version under `root`; a single file is one model, named and versioned
    by its metadata (version 1 where its version is not a positive integer). A model or
    version folder that cannot be read (its permissions, say) is left out,
    and why is put in `unreadable`: one such folder never hides the others."""
    if root.is_file():
        file = VersionFile.of(root)
        name, version = single_file_identity(file)
        return {name: {version: file}}
    found: Scan = {}
    for model_dir in sorted(p for p in root.iterdir() if _NAME.fullmatch(p.name)):
        try:
            if not model_dir.is_dir():
                continue
            entries = [v for v in model_dir.iterdir() if VERSION.fullmatch(v.name)]
        except OSError as error:
            _note(unreadable, (model_dir.name, None), error)
            continue
        versions: dict[int, VersionFile] = {}
        for entry in entries:
            try:
                if entry.is_dir() and (entry / MODEL_FILE).is_file():
                    versions[int(entry.name)] = VersionFile.of(entry / MODEL_FILE)
            except OSError as error:
                _note(unreadable, (model_dir.name, int(entry.name)), error)
        if versions:
            found[model_dir.name] = versions
    return found


def _note(unreadable: Unreadable | None, where: tuple[str, int | None], error: OSError) -> None:
    if unreadable is not None:
        unreadable[where] = f"cannot be read: {error.strerror or error}"


@functools.lru_cache(maxsize=8)
def single_file_identity(file: VersionFile) -> tuple[str, int]:
    """A lone file's name and version, from its metadata (version 1 unless it is a positive
    integer); read once per file as written, not at every poll."""
    metadata, _ = inspect_model(file.path)
    version = int(metadata.version) if metadata.version.isdigit() else 1
    return metadata.name, max(version, 1)
