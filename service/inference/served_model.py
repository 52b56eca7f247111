"""One model name and its versions: which serve and from which files, which files failed, how
each version is reported in the repository index, and which version a request gets."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

from service.errors import ModelNotFound
from service.inference.pipeline import Pipeline
from service.inference.repository_layout import VersionFile

State = Literal["LOADING", "READY", "UNAVAILABLE", "UNLOADING"]
NEW_FILE_FAILED = "a new file failed to load: "
"""The index's reason for a version that serves on while its new file would not load."""


@dataclass
class IndexEntry:
    """One version as the repository index reports it."""

    name: str
    version: int | None
    """None: a model of the repository with no version loaded."""
    state: State
    reason: str = ""
    memory_bytes: int = 0


class ServedModel:
    """Everything the server holds of one model name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.serving: dict[int, Pipeline] = {}
        """The versions that take requests (a version that failed its self-test at start
        stays here, unready, to say why)."""
        self.files: dict[int, VersionFile] = {}
        """The file each serving version was loaded from."""
        self.unloadable: dict[int, VersionFile] = {}
        """Files that failed to load: not tried again until they change."""
        self.entries: dict[int, IndexEntry] = {}
        """The versions loaded, loading or failed, as the index reports them."""
        self.changes = asyncio.Lock()
        """Held while the versions change: a load, however long, holds up only this model."""
        self.unloaded = ""
        """Why no version serves where one did (evicted, unloaded, removed); empty otherwise."""
        self.awaited = False
        """Chosen at start and not served yet: readiness waits for it until a version serves,
        or it is unloaded or leaves the repository."""

    @property
    def loading(self) -> bool:
        return any(entry.state == "LOADING" for entry in self.entries.values())

    def get(self, version: str | None) -> Pipeline:
        """The pipeline serving `version` (the latest served and ready when None; the latest,
        to say why, if none is ready), or 404. Only for a model with a version serving."""
        if version is None:
            ready = [v for v, pipeline in self.serving.items() if pipeline.ready]
            return self.serving[max(ready or self.serving)]
        for pipeline in self.serving.values():
            if pipeline.session.metadata.version == version:
                return pipeline
        served = ", ".join(p.session.metadata.version for p in self.serving.values())
        raise ModelNotFound(f"model {self.name!r} has no version {version!r} (serving: {served})")

    def memory_bytes(self) -> int:
        """What the versions serving were measured to hold."""
        return sum(e.memory_bytes for e in self.entries.values() if e.state == "READY")

    def failures(self) -> list[IndexEntry]:
        """Versions whose last load failed, serving on from an older file or not at all."""
        return [
            entry
            for entry in self.entries.values()
            if entry.state == "UNAVAILABLE" or entry.reason.startswith(NEW_FILE_FAILED)
        ]
