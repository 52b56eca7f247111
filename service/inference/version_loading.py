"""Loading one version of a model into service, and taking one out.

A version takes traffic only once it has loaded, passed the load-time checks and warmed up; the
swap is one dictionary assignment on the event loop, so every request is admitted to either the
old pipeline or the new, never to none. The old one finishes everything admitted to it, then
closes and gives its memory back. A version that fails to load leaves the one serving in place.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from model_runtime.decoding.pool import DecodeWorkers
from model_runtime.heap import give_back_free_memory
from model_runtime.platform import resident_bytes
from model_runtime.session import ModelSession
from service.errors import ModelLoadFailed
from service.inference.memory_budget import MemoryBudget, OverBudget, VersionKey
from service.inference.pipeline import Pipeline, SelfTestFailed, WarmUpOverran
from service.inference.registry import ModelRegistry
from service.inference.repository_layout import VersionFile
from service.inference.retirement import Retirement
from service.inference.served_model import NEW_FILE_FAILED, IndexEntry, ServedModel
from service.metrics import Metrics
from service.observability.tracing import Tracing
from service.settings import Settings

logger = logging.getLogger(__name__)

MEMORY_ESTIMATE_FACTOR = 3
"""A version's resident memory before it is measured: this many times its file's size."""
UnloadReason = Literal["evicted", "explicit", "replaced", "removed"]
"""Why a version stopped serving (vit_model_unloads_total's reason)."""
RoomMaker = Callable[[str, VersionKey, int], Awaitable[None]]
"""Makes room for `needed` bytes of the version `key` of model `name`."""
UNLOADED_BECAUSE: dict[UnloadReason, str] = {
    "evicted": "evicted: least recently used, unloaded to make room under "
    "VIT_MODELS_MEMORY_BYTES; loads again on its next request",
    "explicit": "unloaded by the repository API",
    "replaced": "replaced by a new file of the same version",
    "removed": "unloaded: gone from the repository, or no longer chosen by VIT_VERSION_POLICY",
}
"""What the index says of a model whose last version stopped serving, by why."""
LOAD_WAIT_OUTCOMES = ("loaded", "failed", "timed_out")
"""How a request's wait for its model's load ended (vit_model_load_wait_seconds' outcome)."""


@dataclass(frozen=True)
class Prepared:
    """A version whose session is loaded and checked, not yet warmed up."""

    model: ServedModel
    version: int
    file: VersionFile
    session: ModelSession
    resident_before: int
    """The process's resident memory before the session loaded (to measure what it took)."""


def settled_resident_bytes() -> int:
    """The process's resident memory once the heap's free pages are given back: before and
    after a load, so that its growth is what it holds, not what freed memory it reused or
    what a closed version left in the heap."""
    give_back_free_memory()
    return resident_bytes()


class VersionLoader:
    """Loads, swaps in and retires versions within the memory budget."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        registry: ModelRegistry,
        decoders: DecodeWorkers,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.tracing = tracing
        self.registry = registry
        self.decoders = decoders
        """The server's decoding workers, which every version it loads shares."""
        self.budget = MemoryBudget(settings.models_memory_bytes)
        self.retirement = Retirement(settings.request_timeout_ms / 1000, registry.labels_in_use)
        self.make_room: RoomMaker | None = None
        """Unloads other versions until a version's memory fits the budget, where the control
        mode does (on_demand); without it, a load that does not fit is refused."""
        self._measured: dict[VersionFile, int] = {}
        """What each file loaded so far was measured to hold once serving."""

    def estimate(self, file: VersionFile) -> int:
        """The memory `file` will hold once serving: as measured when it last served (or its
        first inferences' peak, where higher), else MEMORY_ESTIMATE_FACTOR times its size."""
        return self._measured.get(file, MEMORY_ESTIMATE_FACTOR * file.size)

    async def _made_room(self, name: str, key: VersionKey, needed: int) -> int:
        """`make_room` for `needed` bytes, and how much the process shrank meanwhile (what the
        versions unloaded gave back), so that a load's own growth is still measured."""
        assert self.make_room is not None
        shrunk = await asyncio.to_thread(settled_resident_bytes)
        await self.make_room(name, key, needed)
        return max(0, shrunk - await asyncio.to_thread(settled_resident_bytes))

    async def prepare(self, model: ServedModel, version: int, file: VersionFile) -> Prepared:
        """The version's session, loaded and checked (not warmed up, not serving)."""
        before = await asyncio.to_thread(settled_resident_bytes)
        room = self.budget.room((model.name, version), self._held_besides(model, version))
        session = await self._session(model.name, version, file.path, room)
        return Prepared(model, version, file, session, before)

    async def load(
        self,
        model: ServedModel,
        version: int,
        file: VersionFile,
        *,
        strict: bool,
        prepared: Prepared | None = None,
    ) -> None:
        """Load `file` as `version` and swap it in; a failure is recorded (and raised when
        `strict`), and whatever served the version before serves on."""
        name, key = model.name, (model.name, version)
        previous = model.entries.get(version)
        model.entries[version] = IndexEntry(name, version, "LOADING")
        started = time.monotonic()
        try:
            estimate = self.estimate(file)
            if self.make_room is not None:
                await self.make_room(name, key, estimate)
            held = self._held_besides(model, version)
            self.budget.check(
                key, held, estimate, f"~{estimate >> 20} MB estimated for this version"
            )
            self.budget.reserve(key, estimate)
            if prepared is not None:
                before, session = prepared.resident_before, prepared.session
            else:
                before = await asyncio.to_thread(settled_resident_bytes)
                room = self.budget.room(key, held)
                if self.make_room is not None and room is not None:
                    room = self.budget.budget_bytes  # others make room once it is known
                session = await self._session(name, version, file.path, room)
            peak = session.load_check.peak_bytes
            if self.make_room is not None:
                before -= await self._made_room(name, key, peak)
            self.budget.reserve(key, max(estimate, peak))
            pipeline = Pipeline(session, self.settings, self.metrics, self.decoders, self.tracing)
            try:
                await pipeline.start()
            except WarmUpOverran:
                # Its inference may never return: closing waits for it, so never here.
                self.retirement.retire(pipeline)
                raise
            except SelfTestFailed as failed:
                if not strict:
                    await self.retirement.close(pipeline)
                    raise
                # At start there is nothing else to serve: the version stays, unready, and
                # says why (readiness, the index, the log and the metric).
                model.serving[version] = pipeline
                pipeline.publish_metrics()
                model.entries[version] = IndexEntry(name, version, "UNAVAILABLE", str(failed))
                logger.error("model %s version %d is not ready: %s", name, version, failed)
                return
            except BaseException:
                await self.retirement.close(pipeline)
                raise
            after = await asyncio.to_thread(settled_resident_bytes)  # off the event loop
            measured = max(after - before, file.size)
            if self.make_room is not None:
                await self._made_room(name, key, measured)
            try:
                what = f"{measured >> 20} MB measured after warm-up"
                self.budget.check(key, self._held_besides(model, version), measured, what)
            except ModelLoadFailed:
                await self.retirement.close(pipeline)
                raise
        except Exception as error:
            self.failed(model, version, error, previous)
            if not (self.make_room is not None and isinstance(error, OverBudget)):
                # Not tried again until the file changes; on demand, a version that did not
                # fit beside others is tried again by its next request.
                model.unloadable[version] = file
            if strict:
                raise
            return
        finally:
            self.budget.release(key)
        model.unloadable.pop(version, None)
        model.unloaded = ""
        old = model.serving.get(version)
        model.serving[version] = pipeline  # the swap: new requests go to the new one
        model.awaited = False
        pipeline.publish_metrics()
        model.files[version] = file
        model.entries[version] = IndexEntry(name, version, "READY", memory_bytes=measured)
        self._measured[file] = max(measured, peak)
        pipeline.metrics.memory_bytes.set(measured)
        seconds = time.monotonic() - started
        self.metrics.model_loads.labels(name).inc()
        for reason in UNLOADED_BECAUSE:  # at zero from the first load: rate() sees the first
            self.metrics.model_unloads.labels(name, reason)
        for outcome in LOAD_WAIT_OUTCOMES:
            self.metrics.load_waits.labels(name, outcome)
        self.metrics.model_load_seconds.labels(name).observe(seconds)
        logger.info(
            "model %s version %d serving (%.1f s, %d MB)", name, version, seconds, measured >> 20
        )
        if old is not None:
            self.metrics.model_unloads.labels(name, "replaced").inc()
            self.retirement.retire(old)

    def retire(self, model: ServedModel, version: int, reason: UnloadReason) -> asyncio.Task[None]:
        """Stop serving `version`: new requests no longer reach it, those admitted finish
        (`reason` is counted); the task that closes it once they have."""
        pipeline = model.serving.pop(version)
        model.files.pop(version, None)
        model.entries.pop(version, None)
        if not model.serving:
            model.unloaded = UNLOADED_BECAUSE[reason]
        logger.info("model %s version %d unloaded (%s)", model.name, version, reason)
        self.metrics.model_unloads.labels(model.name, reason).inc()
        return self.retirement.retire(pipeline)

    def failed(
        self,
        model: ServedModel,
        version: int,
        error: Exception,
        previous: IndexEntry | None = None,
    ) -> None:
        """Record a load that failed; a version already serving keeps serving."""
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        logger.error("model %s version %d did not load: %s", model.name, version, reason)
        self.metrics.model_load_failures.labels(model.name).inc()
        entry = IndexEntry(model.name, version, "UNAVAILABLE", reason)
        if version in model.serving and previous is not None:
            reason = f"{NEW_FILE_FAILED}{reason}"
            entry = IndexEntry(model.name, version, "READY", reason, previous.memory_bytes)
        model.entries[version] = entry

    def _held_besides(self, model: ServedModel, version: int) -> int:
        """What the versions serving hold, less the one `version` of `model` would replace."""
        replaced = model.entries.get(version)
        return self.registry.memory_bytes() - (replaced.memory_bytes if replaced else 0)

    async def _session(
        self, name: str, version: int, path: Path, max_memory_bytes: int | None
    ) -> ModelSession:
        """A loaded, checked session for one version, named as the repository names it."""
        settings = self.settings
        session = await asyncio.to_thread(
            ModelSession, path, settings.runtime, max_memory_bytes=max_memory_bytes
        )
        stated = session.metadata
        if not settings.model.is_dir():
            return session
        if (stated.name, stated.version) != (name, str(version)):
            logger.info(  # as designed: the folders name a repository's models
                "%s: the metadata says %s version %s; the repository's %s version %d wins",
                path,
                stated.name,
                stated.version,
                name,
                version,
            )
        session.metadata = stated.model_copy(update={"name": name, "version": str(version)})
        return session
