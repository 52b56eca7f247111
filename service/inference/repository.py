"""The repository's control: what is served follows what is on disk, as the control mode says
(none: what the start loaded; poll: every scan's changes; explicit: the load and unload calls),
and the repository index reports every model and version, loaded or not."""

from __future__ import annotations

import asyncio
import functools
import logging

from model_contract.metadata import InvalidModelMetadata, last_line
from model_runtime.decoding.pool import DecodeWorkers
from model_runtime.model_file import UnsafeModelFile
from model_runtime.session import CudaUnavailable
from service.errors import Forbidden, ModelLoadFailed, ModelNotFound, ServiceError
from service.inference.registry import ModelRegistry
from service.inference.repository_layout import Scan, Unreadable, VersionFile, scan
from service.inference.served_model import NEW_FILE_FAILED, IndexEntry, ServedModel
from service.inference.version_loading import Prepared, UnloadReason, VersionLoader
from service.inference.version_policy import VersionPolicy
from service.metrics import Metrics
from service.observability.tracing import Tracing
from service.settings import Settings

logger = logging.getLogger(__name__)

SAYS_WHAT_FAILED = (ServiceError, InvalidModelMetadata, CudaUnavailable)
"""Load failures whose message names the model and what is wrong with it."""


class Repository:
    """Scan, start, poll, load, unload and sync the models of `settings.model`."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        metrics: Metrics,
        decoders: DecodeWorkers,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.policy = VersionPolicy.parse(settings.version_policy)
        self.loader = VersionLoader(settings, metrics, registry, decoders, tracing)
        self._unreadable: Unreadable = {}
        self._last_scan: Scan = {}
        self._poller: asyncio.Task[None] | None = None
        self._polling: dict[str, asyncio.Task[None]] = {}
        """Each model's poll under way, by name."""

    async def index(self) -> list[IndexEntry]:
        """Every version loaded, loading or failed, and, as Triton lists them, each model of
        the repository with none of those (never loaded, or unloaded): no version, "not loaded";
        a folder that cannot be read, with why."""
        found = await self.scan()
        models = self.registry.models()
        idle = self.not_loaded(found)
        unreadable = [
            IndexEntry(name, version, "UNAVAILABLE", why)
            for (name, version), why in self._unreadable.items()
            if version is None
            or (m := self.registry.known(name)) is None
            or version not in m.entries
        ]
        entries = [e for model in models for e in model.entries.values()]
        return sorted([*entries, *idle, *unreadable], key=lambda e: (e.name, e.version or 0))

    def not_loaded(self, found: Scan) -> list[IndexEntry]:
        """The models of `found` with no version loaded, loading or failed, each saying why."""
        entries = []
        for name in found:
            model = self.registry.known(name)
            if model is None or not model.entries:
                entries.append(IndexEntry(name, None, "UNAVAILABLE", self.idle_reason(model)))
        return entries

    def idle_reason(self, model: ServedModel | None) -> str:
        """Why a model of the repository with nothing loaded, loading or failed has none."""
        if model is not None and model.unloaded:
            return model.unloaded
        return "not loaded: loads on its first request" if self.on_demand else "not loaded"

    async def scan(self) -> Scan:
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

    async def open(self) -> list[Prepared]:
        """The sessions of what the repository holds, loaded and checked (an error here, in
        none mode, ends startup at once); `serve` warms them up and starts serving them."""
        found = await self.scan()
        self._last_scan = found
        if not found:
            root = self.settings.model
            raise ModelLoadFailed(f"no model under {root} (<name>/<version>/model.onnx)")
        strict = self.settings.model_control == "none"
        prepared = []
        for name, versions in self._loaded_at_start(found).items():
            chosen = self.policy.choose(list(versions))
            if not chosen:
                on_disk = ", ".join(str(v) for v in sorted(versions))
                policy = self.settings.version_policy
                why = f"VIT_VERSION_POLICY={policy} chooses none of {name}'s versions ({on_disk})"
                if strict:
                    raise ModelLoadFailed(why)
                logger.warning("%s", why)
            model = self.registry.model(name)
            if chosen:
                model.awaited = True
            for version in chosen:
                file = versions[version]
                try:
                    prepared.append(await self.loader.prepare(model, version, file))
                except Exception as error:
                    if strict and _says_what_failed(error):
                        raise
                    if strict:  # onnxruntime's errors and the file checks' do not name it
                        raise ModelLoadFailed(
                            f"{name} version {version} ({file.path}): {last_line(error)}"
                        ) from error
                    self.loader.failed(model, version, error)
                    model.unloadable[version] = file
                    continue
                model.entries[version] = IndexEntry(name, version, "LOADING")
        return prepared

    async def serve(self, prepared: list[Prepared]) -> None:
        """Warm up and serve what `open` loaded; in poll and explicit modes, where a chosen
        version failed, choose among the others as later scans do; in poll mode, then keep
        watching."""
        strict = self.settings.model_control == "none"
        for item in prepared:
            async with item.model.changes:
                await self.loader.load(
                    item.model, item.version, item.file, strict=strict, prepared=item
                )
        if not strict:
            for name, versions in self._loaded_at_start(self._last_scan).items():
                await self._sync(self.registry.model(name), versions)
        serving = self.registry.serving_names()
        if self.on_demand and len(self._last_scan) == 1:
            serving = list(self._last_scan)  # the one model, loaded or not
        if len(serving) == 1:
            self.registry.alone_at_start = serving[0]
        self.registry.started = True
        if self.settings.model_control in ("poll", "on_demand"):
            self._poller = asyncio.create_task(self._poll(), name="repository-poll")

    @property
    def on_demand(self) -> bool:
        return self.settings.model_control == "on_demand"

    @property
    def last_scan(self) -> Scan:
        """The repository as the last scan saw it (every repository_poll_s in poll and
        on_demand modes)."""
        return self._last_scan

    def _loaded_at_start(self, found: Scan) -> Scan:
        """What the start loads: every model, or in on_demand mode the pinned ones only."""
        if not self.on_demand:
            return found
        pinned = self.settings.pinned_models
        for name in pinned:
            if name not in found:
                logger.warning("VIT_PINNED_MODELS names %s, which the repository lacks", name)
        return {name: versions for name, versions in found.items() if name in pinned}

    async def load(self, name: str) -> None:
        """Load (or reload) `name` from the repository as it is now; 400 if any version it
        chooses fails to load (as Triton answers), saying which versions serve on."""
        self._require_explicit("load")
        found = await self.scan()
        if name not in found:
            raise ModelNotFound(f"no model {name!r} in the repository")
        model = self.registry.model(name)
        await self._sync(model, found[name], reload=True)
        failed = model.failures()
        if failed:
            serving = ", ".join(str(v) for v in sorted(model.serving)) or "none"
            reason = failed[0].reason.removeprefix(NEW_FILE_FAILED)
            raise ModelLoadFailed(
                f"{name} version {failed[0].version} could not be loaded: {reason}; "
                f"serving versions: {serving}"
            )

    async def unload(self, name: str) -> None:
        """Stop serving `name`; a model of the repository that is not loaded is unloaded
        already (as Triton answers), and only a name known nowhere is 404."""
        self._require_explicit("unload")
        model = self.registry.known(name)
        if model is None or not model.serving:
            found = await self.scan()
            if name not in found:
                raise ModelNotFound(f"no model {name!r} is loaded or in the repository")
            return
        await self._sync(model, {}, reason="explicit")

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
        for model in self.registry.models():
            for pipeline in model.serving.values():
                await pipeline.close()
            model.serving.clear()
        await self.loader.retirement.close_all()

    async def _poll(self) -> None:
        """Every repository_poll_s: act on what changed, once a file is the same in two scans
        in a row (one still being copied is not); each model on its own, so that one slow or
        failing load holds up no other model's."""
        while True:
            await asyncio.sleep(self.settings.repository_poll_s)
            try:
                found = await self.scan()
            except Exception as error:  # a repository being rearranged: the next poll sees it
                logger.warning("repository scan failed: %s", error)
                continue
            previous, self._last_scan = self._last_scan, found
            watched = set(self.registry.serving_names())
            if not self.on_demand:  # on demand, a model not loaded waits for its request
                watched |= set(found)
            for name in sorted(watched):
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
        model = self.registry.model(name)
        before = previous.get(name, {})
        stable = {v: f for v, f in found.get(name, {}).items() if before.get(v) == f}
        settling = set(found.get(name, {})) - set(stable)
        unreadable = {v for n, v in self._unreadable if n == name and v is not None}
        for version in (settling | unreadable) & set(model.serving):
            # Being rewritten, or unreadable for now: chosen as the file it serves, until the
            # new one settles (or the policy would pick another version for the meantime).
            served = model.files.get(version) or found.get(name, {}).get(version)
            if served is not None:
                stable[version] = served
        try:
            await self._sync(model, stable, keep=settling | unreadable)
        except Exception:  # one model's trouble must not stop the polling of all
            logger.exception("repository poll of model %s failed", name)

    async def sync(self, model: ServedModel, versions: dict[int, VersionFile]) -> None:
        """Serve what the policy chooses of `versions` of `model` (a load on demand)."""
        await self._sync(model, versions)

    async def _sync(
        self,
        model: ServedModel,
        versions: dict[int, VersionFile],
        *,
        reload: bool = False,
        keep: set[int] | None = None,
        reason: UnloadReason = "removed",
    ) -> None:
        """Make what is served of `model` what the policy chooses of `versions`: load new and
        changed files (all chosen ones with `reload`), retire the others (except `keep`) for
        `reason`."""
        keep = keep or set()
        async with model.changes:
            # A file that failed to load is not tried again until it changes, and never
            # displaces a version that serves: the policy chooses among the others, and a
            # serving version whose new file failed stays chosen, as the file it serves.
            candidates: dict[int, VersionFile] = {}
            for v, f in versions.items():
                if reload or model.unloadable.get(v) != f:
                    candidates[v] = f
                elif v in model.serving:
                    candidates[v] = model.files.get(v, f)
            tried: set[int] = set()
            while True:
                wanted = self.policy.choose(list(candidates))
                pending = [
                    v
                    for v in wanted
                    if v not in tried and (reload or model.files.get(v) != candidates[v])
                ]
                if not pending:
                    break
                for version in pending:
                    tried.add(version)
                    file = candidates[version]
                    await self.loader.load(model, version, file, strict=False)
                    failed = model.files.get(version) != file
                    if failed and version not in model.serving:
                        del candidates[version]  # nothing of it serves: choose among the rest
            for version in list(model.serving):
                if version not in wanted and version not in keep:
                    self.loader.retire(model, version, reason)
            if not versions:  # unloaded, or gone from the repository
                model.awaited = False
            for version in list(model.entries):
                gone = version not in versions and version not in keep
                if gone and model.entries[version].state == "UNAVAILABLE":
                    del model.entries[version]
                    model.unloadable.pop(version, None)


def _says_what_failed(error: Exception) -> bool:
    """Whether a load failure's message names the model and what is wrong with it (the checks
    of a file's bytes and first inferences speak of the file alone)."""
    return isinstance(error, SAYS_WHAT_FAILED) and not isinstance(error, UnsafeModelFile)
