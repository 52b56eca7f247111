"""The models being served: name -> version -> pipeline, the one object routes ask for; loading,
swapping and retiring versions as the repository and its control mode say.

A version takes traffic only once it has loaded, passed the load-time checks and warmed up; the
swap is one dictionary assignment on the event loop, so every request is admitted to either the
old pipeline or the new, never to none. The old one finishes everything admitted to it, then
closes and gives its memory back. A version that fails to load leaves the one serving in place.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from model_contract.metadata import InvalidModelMetadata, last_line
from model_runtime.heap import give_back_free_memory
from model_runtime.model_file import UnsafeModelFile
from model_runtime.platform import resident_bytes
from model_runtime.session import CudaUnavailable, ModelSession
from service.errors import Forbidden, ModelLoadFailed, ModelNotFound, NotReady, ServiceError
from service.inference.pipeline import Pipeline, SelfTestFailed, WarmUpOverran
from service.inference.repository import Scan, Unreadable, VersionFile, VersionPolicy, scan
from service.metrics import Metrics
from service.settings import Settings

logger = logging.getLogger(__name__)

State = Literal["LOADING", "READY", "UNAVAILABLE", "UNLOADING"]
MEMORY_ESTIMATE_FACTOR = 3
"""A version's resident memory before it is measured: this many times its file's size."""
RETIRE_POLL_S = 0.05
NEW_FILE_FAILED = "a new file failed to load: "
"""The index's reason for a version that serves on while its new file would not load."""
SAYS_WHAT_FAILED = (ServiceError, InvalidModelMetadata, CudaUnavailable)
"""Load failures whose message names the model and what is wrong with it."""


@dataclass(frozen=True)
class Prepared:
    """A version whose session is loaded and checked, not yet warmed up."""

    name: str
    version: int
    file: VersionFile
    session: ModelSession
    resident_before: int
    """The process's resident memory before the session loaded (to measure what it took)."""


@dataclass
class IndexEntry:
    """One version as the repository index reports it."""

    name: str
    version: int | None
    """None: a model of the repository with no version loaded."""
    state: State
    reason: str = ""
    memory_bytes: int = 0


class ModelRegistry:
    """Serving versions by name, their index entries, and the repository's control loop."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.policy = VersionPolicy.parse(settings.version_policy)
        self._serving: dict[str, dict[int, Pipeline]] = {}
        self._files: dict[tuple[str, int], VersionFile] = {}
        self._unloadable: dict[tuple[str, int], VersionFile] = {}
        self._index: dict[tuple[str, int], IndexEntry] = {}
        self._changes: dict[str, asyncio.Lock] = {}
        """One lock per model name: a load, however long, holds up only its own model's."""
        self._reserved: dict[tuple[str, int], int] = {}
        """Memory held back for versions being loaded, against the budget."""
        self._unreadable: Unreadable = {}
        self._poller: asyncio.Task[None] | None = None
        self._polling: dict[str, asyncio.Task[None]] = {}
        """Each model's poll under way, by name."""
        self._retiring: dict[asyncio.Task[None], Pipeline] = {}
        self._last_scan: Scan = {}
        self._awaited: set[str] = set()
        """Models the policy chose versions of at start that no version serves yet: readiness
        waits for them until one serves, or they are unloaded or leave the repository."""
        metrics.models_memory_bytes.set_function(lambda: float(self.memory_bytes()))
        self._started = False
        self._alone_at_start: str | None = None
        """The one model served when startup ended, where there was one: the default model."""
        self.draining = False
        """Set on SIGTERM: readiness turns false while requests are still answered."""

    # What routes ask.

    def get(self, name: str | None = None, version: str | None = None) -> Pipeline:
        """The pipeline serving `name` (the default model when None) at `version` (the latest
        served and ready when None), or 404."""
        if not self._serving and any(e.state == "LOADING" for e in self._index.values()):
            raise NotReady("the models are still loading")
        name = name or self.default_name()
        versions = self._serving.get(name)
        if not versions and self._loading(name):
            raise NotReady(f"model {name!r} is still loading")
        if not versions:
            known = ", ".join(sorted(self._serving)) or "none"
            raise ModelNotFound(f"no model {name!r} is served (serving: {known})")
        if version is None:  # the latest that is ready; the latest, to say why, if none is
            ready = [v for v, pipeline in versions.items() if pipeline.ready]
            return versions[max(ready or versions)]
        for pipeline in versions.values():
            if pipeline.session.metadata.version == version:
                return pipeline
        served = ", ".join(p.session.metadata.version for p in versions.values())
        raise ModelNotFound(f"model {name!r} has no version {version!r} (serving: {served})")

    def _loading(self, name: str) -> bool:
        return any(e.name == name and e.state == "LOADING" for e in self._index.values())

    def default_name(self) -> str:
        """The model routes without a name serve: VIT_DEFAULT_MODEL, or the one model served at
        start, for good (unloaded, it is a 404; never another model's labels); while starting,
        the one served so far."""
        if self.settings.default_model:
            return self.settings.default_model
        if self._alone_at_start is not None:
            return self._alone_at_start
        if not self._started and len(self._serving) == 1:
            return next(iter(self._serving))
        names = ", ".join(sorted(self._serving)) or "none"
        raise ModelNotFound(
            f"no default model (serving: {names}): name one, /v1/models/{{name}}/classify, or "
            "set VIT_DEFAULT_MODEL"
        )

    def pipelines(self) -> list[Pipeline]:
        return [p for versions in self._serving.values() for p in versions.values()]

    @property
    def ready(self) -> bool:
        """Every model that should be loaded at start has loaded, some model is served, and
        every version served is ready (later loads and swaps do not take readiness away)."""
        serving = self.pipelines()
        return (
            self._started
            and bool(serving)
            and not self._awaited
            and not self.draining
            and all(p.ready for p in serving)
        )

    async def index(self) -> list[IndexEntry]:
        """Every version loaded, loading or failed, and, as Triton lists them, each model of
        the repository with none of those (never loaded, or unloaded): no version, "not loaded";
        a folder that cannot be read, with why."""
        found = await self._scan()
        known = {name for name, _ in self._index}
        idle = [
            IndexEntry(name, None, "UNAVAILABLE", "not loaded")
            for name in found
            if name not in known
        ]
        unreadable = [
            IndexEntry(name, version, "UNAVAILABLE", why)
            for (name, version), why in self._unreadable.items()
            if version is None or (name, version) not in self._index
        ]
        entries = [*self._index.values(), *idle, *unreadable]
        return sorted(entries, key=lambda e: (e.name, e.version or 0))

    async def _scan(self) -> Scan:
        """The repository as it is now; each folder that cannot be read is logged once and
        reported in the index until it can."""
        unreadable: Unreadable = {}
        found = await asyncio.to_thread(scan, self.settings.model, unreadable)
        for (name, version), why in unreadable.items():
            if self._unreadable.get((name, version)) != why:
                folder = name if version is None else f"{name}/{version}"
                logger.warning("repository folder %s %s: skipped", folder, why)
        self._unreadable = unreadable
        return found

    def _lock(self, name: str) -> asyncio.Lock:
        return self._changes.setdefault(name, asyncio.Lock())

    def memory_bytes(self) -> int:
        return sum(e.memory_bytes for e in self._index.values() if e.state == "READY")

    # Control.

    async def open(self) -> list[Prepared]:
        """The sessions of what the repository holds, loaded and checked (an error here, in
        none mode, ends startup at once); `serve` warms them up and starts serving them."""
        found = await self._scan()
        self._last_scan = found
        if not found:
            root = self.settings.model
            raise ModelLoadFailed(f"no model under {root} (<name>/<version>/model.onnx)")
        prepared = []
        for name, versions in found.items():
            chosen = self.policy.choose(list(versions))
            if not chosen:
                on_disk = ", ".join(str(v) for v in sorted(versions))
                policy = self.settings.version_policy
                why = f"VIT_VERSION_POLICY={policy} chooses none of {name}'s versions ({on_disk})"
                if self.settings.model_control == "none":
                    raise ModelLoadFailed(why)
                logger.warning("%s", why)
            if chosen:
                self._awaited.add(name)
            for version in chosen:
                file = versions[version]
                before = resident_bytes()
                try:
                    room = self._room((name, version))
                    session = await self._session(name, version, file.path, room)
                except Exception as error:
                    if self.settings.model_control == "none":
                        # The checks of a file's bytes and first inferences speak of the file
                        # alone, not naming it.
                        names = not isinstance(error, UnsafeModelFile)
                        if isinstance(error, SAYS_WHAT_FAILED) and names:
                            raise
                        raise ModelLoadFailed(  # onnxruntime's, which do not name the file
                            f"{name} version {version} ({file.path}): {last_line(error)}"
                        ) from error
                    self._failed(name, version, error)
                    self._unloadable[(name, version)] = file
                    continue
                prepared.append(Prepared(name, version, file, session, before))
                self._index[(name, version)] = IndexEntry(name, version, "LOADING")
        return prepared

    async def serve(self, prepared: list[Prepared]) -> None:
        """Warm up and serve what `open` loaded; in poll and explicit modes, where a chosen
        version failed, choose among the others as later scans do; in poll mode, then keep
        watching."""
        strict = self.settings.model_control == "none"
        for item in prepared:
            async with self._lock(item.name):
                await self._load(item.name, item.version, item.file, strict=strict, prepared=item)
        if not strict:
            for name, versions in self._last_scan.items():
                await self._sync(name, versions)
        if len(self._serving) == 1:
            self._alone_at_start = next(iter(self._serving))
        self._started = True
        if self.settings.model_control == "poll":
            self._poller = asyncio.create_task(self._poll(), name="repository-poll")

    async def load(self, name: str) -> None:
        """Load (or reload) `name` from the repository as it is now; 400 if any version it
        chooses fails to load (as Triton answers), saying which versions serve on."""
        self._require_explicit("load")
        found = await self._scan()
        if name not in found:
            raise ModelNotFound(f"no model {name!r} in the repository")
        await self._sync(name, found[name], reload=True)
        failed = [
            e
            for e in self._index.values()
            if e.name == name and (e.state == "UNAVAILABLE" or e.reason.startswith(NEW_FILE_FAILED))
        ]
        if failed:
            serving = ", ".join(str(v) for v in sorted(self._serving.get(name, {}))) or "none"
            raise ModelLoadFailed(
                f"{name} version {failed[0].version} could not be loaded: "
                f"{failed[0].reason.removeprefix(NEW_FILE_FAILED)}; serving versions: {serving}"
            )

    async def unload(self, name: str) -> None:
        """Stop serving `name`; a model of the repository that is not loaded is unloaded
        already (as Triton answers), and only a name known nowhere is 404."""
        self._require_explicit("unload")
        if name not in self._serving:
            found = await self._scan()
            if name not in found:
                raise ModelNotFound(f"no model {name!r} is loaded or in the repository")
            return
        await self._sync(name, {})

    def _require_explicit(self, action: str) -> None:
        """403 outside explicit mode, as Triton refuses: in poll mode the repository decides
        what is served (the next scan would undo the call), in none mode the start did."""
        mode = self.settings.model_control
        if mode != "explicit":
            decides = "the repository's contents decide" if mode == "poll" else "the start decided"
            raise Forbidden(
                f"{action} needs VIT_MODEL_CONTROL=explicit: in {mode} mode {decides} what is "
                "served"
            )

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        for task in list(self._polling.values()):
            task.cancel()
        for pipeline in self.pipelines():
            await pipeline.close()
        self._serving.clear()
        for task, pipeline in list(self._retiring.items()):
            task.cancel()  # the server is stopping: close now, whatever is left
            await pipeline.close()

    async def _poll(self) -> None:
        """Every repository_poll_s: act on what changed, once a file is the same in two scans
        in a row (one still being copied is not); each model on its own, so that one slow or
        failing load holds up no other model's."""
        while True:
            await asyncio.sleep(self.settings.repository_poll_s)
            try:
                found = await self._scan()
            except Exception as error:  # a repository being rearranged: the next poll sees it
                logger.warning("repository scan failed: %s", error)
                continue
            previous, self._last_scan = self._last_scan, found
            for name in sorted(set(found) | set(self._serving)):
                if name in self._polling:
                    continue  # still acting on an earlier scan: the next one after that
                task = asyncio.create_task(self._poll_model(name, found, previous))
                self._polling[name] = task
                task.add_done_callback(functools.partial(self._polled, name))

    def _polled(self, name: str, _: asyncio.Task[None]) -> None:
        self._polling.pop(name, None)

    async def _poll_model(self, name: str, found: Scan, previous: Scan) -> None:
        if (name, None) in self._unreadable:
            return  # its folder cannot be read now: what it serves serves on
        before = previous.get(name, {})
        stable = {v: f for v, f in found.get(name, {}).items() if before.get(v) == f}
        settling = set(found.get(name, {})) - set(stable)
        unreadable = {v for n, v in self._unreadable if n == name and v is not None}
        for version in (settling | unreadable) & set(self._serving.get(name, {})):
            # Being rewritten, or unreadable for now: chosen as the file it serves, until the
            # new one settles (or the policy would pick another version for the meantime).
            served = self._files.get((name, version)) or found.get(name, {}).get(version)
            if served is not None:
                stable[version] = served
        try:
            await self._sync(name, stable, keep=settling | unreadable)
        except Exception:  # one model's trouble must not stop the polling of all
            logger.exception("repository poll of model %s failed", name)

    async def _sync(
        self,
        name: str,
        versions: dict[int, VersionFile],
        *,
        strict: bool = False,
        reload: bool = False,
        keep: set[int] | None = None,
    ) -> None:
        """Make what is served of `name` what the policy chooses of `versions`: load new and
        changed files (all chosen ones with `reload`), retire the others (except `keep`)."""
        async with self._lock(name):
            # A file that failed to load is not tried again until it changes, and never
            # displaces a version that serves: the policy chooses among the others, and a
            # serving version whose new file failed stays chosen, as the file it serves.
            candidates: dict[int, VersionFile] = {}
            for v, f in versions.items():
                if reload or self._unloadable.get((name, v)) != f:
                    candidates[v] = f
                elif v in self._serving.get(name, {}):
                    candidates[v] = self._files.get((name, v), f)
            tried: set[int] = set()
            while True:
                wanted = self.policy.choose(list(candidates))
                pending = [
                    v
                    for v in wanted
                    if v not in tried and (reload or self._files.get((name, v)) != candidates[v])
                ]
                if not pending:
                    break
                for version in pending:
                    tried.add(version)
                    file = candidates[version]
                    await self._load(name, version, file, strict=strict)
                    failed = self._files.get((name, version)) != file
                    if failed and version not in self._serving.get(name, {}):
                        del candidates[version]  # nothing of it serves: choose among the rest
            for version in list(self._serving.get(name, {})):
                if version not in wanted and version not in (keep or set()):
                    self._retire(name, version)
            if not versions:  # unloaded, or gone from the repository
                self._awaited.discard(name)
            for key in [k for k in self._index if k[0] == name]:
                gone = key[1] not in versions and key[1] not in (keep or set())
                if gone and self._index[key].state == "UNAVAILABLE":
                    del self._index[key]
                    self._unloadable.pop(key, None)

    async def _load(
        self,
        name: str,
        version: int,
        file: VersionFile,
        *,
        strict: bool,
        prepared: Prepared | None = None,
    ) -> None:
        key = (name, version)
        previous = self._index.get(key)
        self._index[key] = IndexEntry(name, version, "LOADING")
        started = time.monotonic()
        try:
            estimate = MEMORY_ESTIMATE_FACTOR * file.size
            self._check_memory(key, estimate, f"~{estimate >> 20} MB estimated for this version")
            self._reserved[key] = estimate
            if prepared is not None:
                before, session = prepared.resident_before, prepared.session
            else:
                before = resident_bytes()
                session = await self._session(name, version, file.path, self._room(key))
            self._reserved[key] = max(estimate, session.load_check.peak_bytes)
            pipeline = Pipeline(session, self.settings, self.metrics)
            try:
                await pipeline.start()
            except WarmUpOverran:
                # Its inference may never return: closing waits for it, so never here.
                self._retire_pipeline(pipeline)
                raise
            except SelfTestFailed as failed:
                if not strict:
                    await pipeline.close(keep_metrics=self._labels_in_use(pipeline))
                    raise
                # At start there is nothing else to serve: the version stays, unready, and
                # says why (readiness, the index, the log and the metric).
                self._serving.setdefault(name, {})[version] = pipeline
                pipeline.publish_metrics()
                self._index[key] = IndexEntry(name, version, "UNAVAILABLE", str(failed))
                logger.error("model %s version %d is not ready: %s", name, version, failed)
                return
            except BaseException:
                await pipeline.close(keep_metrics=self._labels_in_use(pipeline))
                raise
            measured = max(resident_bytes() - before, file.size)
            try:
                self._check_memory(key, measured, f"{measured >> 20} MB measured after warm-up")
            except ModelLoadFailed:
                await pipeline.close(keep_metrics=self._labels_in_use(pipeline))
                raise
        except Exception as error:
            self._failed(name, version, error, previous)
            self._unloadable[key] = file
            if strict:
                raise
            return
        finally:
            self._reserved.pop(key, None)
        self._unloadable.pop(key, None)
        old = self._serving.setdefault(name, {}).get(version)
        self._serving[name][version] = pipeline  # the swap: new requests go to the new one
        self._awaited.discard(name)
        pipeline.publish_metrics()
        self._files[key] = file
        self._index[key] = IndexEntry(name, version, "READY", memory_bytes=measured)
        pipeline.metrics.memory_bytes.set(measured)
        logger.info(
            "model %s version %d serving (%.1f s, %d MB)",
            name,
            version,
            time.monotonic() - started,
            measured >> 20,
        )
        if old is not None:
            self._retire_pipeline(old)

    def _failed(
        self, name: str, version: int, error: Exception, previous: IndexEntry | None = None
    ) -> None:
        """Record a load that failed; a version already serving keeps serving."""
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        logger.error("model %s version %d did not load: %s", name, version, reason)
        self.metrics.model_load_failures.labels(name).inc()
        entry = IndexEntry(name, version, "UNAVAILABLE", reason)
        if version in self._serving.get(name, {}) and previous is not None:
            entry = IndexEntry(
                name, version, "READY", f"{NEW_FILE_FAILED}{reason}",
                previous.memory_bytes,
            )  # fmt: skip
        self._index[(name, version)] = entry

    def _room(self, key: tuple[str, int]) -> int | None:
        """Memory the budget leaves for one more version (None: no budget): what the versions
        serving (but the one `key` would replace) and the loads under way do not hold."""
        budget = self.settings.models_memory_bytes
        if not budget:
            return None
        replaced = self._index.get(key)
        held = self.memory_bytes() - (replaced.memory_bytes if replaced is not None else 0)
        reserved = sum(size for other, size in self._reserved.items() if other != key)
        return budget - held - reserved

    def _check_memory(self, key: tuple[str, int], needed: int, what: str) -> None:
        room = self._room(key)
        if room is not None and needed > room:
            budget = self.settings.models_memory_bytes
            raise ModelLoadFailed(
                f"would exceed VIT_MODELS_MEMORY_BYTES ({budget >> 20} MB): {what}, and the "
                f"versions serving or loading leave {max(room, 0) >> 20} MB"
            )

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

    def _retire(self, name: str, version: int) -> None:
        pipeline = self._serving[name].pop(version)
        if not self._serving[name]:
            del self._serving[name]
        self._files.pop((name, version), None)
        self._index.pop((name, version), None)
        logger.info("model %s version %d unloaded", name, version)
        self._retire_pipeline(pipeline)

    def _retire_pipeline(self, pipeline: Pipeline) -> None:
        task = asyncio.create_task(self._finish_then_close(pipeline))
        self._retiring[task] = pipeline
        task.add_done_callback(self._retired)

    def _retired(self, task: asyncio.Task[None]) -> None:
        """A closed pipeline's objects refer to one another (its tasks, callbacks and
        batcher), so only a full garbage collection frees them and the sessions they hold,
        and an idle server may never run one: it runs here, once the pipeline is let go; then
        what the sessions' memory freed goes back to the system."""
        self._retiring.pop(task, None)
        gc.collect()
        give_back_free_memory()

    async def _finish_then_close(self, pipeline: Pipeline) -> None:
        """Let every request admitted to `pipeline` be answered, then close it."""
        deadline = time.monotonic() + self.settings.request_timeout_ms / 1000 + 5
        while pipeline.budget.images and time.monotonic() < deadline:
            await asyncio.sleep(RETIRE_POLL_S)
        await pipeline.close(keep_metrics=self._labels_in_use(pipeline))

    def _labels_in_use(self, pipeline: Pipeline) -> bool:
        """Whether a serving pipeline other than `pipeline` has its name and version: the
        metric series they share must outlive the one closed."""
        stated = pipeline.session.metadata
        return any(
            other is not pipeline
            and (other.session.metadata.name, other.session.metadata.version)
            == (stated.name, stated.version)
            for other in self.pipelines()
        )
