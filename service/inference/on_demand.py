"""VIT_MODEL_CONTROL=on_demand: a model of the repository that no version of serves is loaded
by its first request, which waits for it within its deadline; concurrent requests for it share
the one load. Where the load would not fit VIT_MODELS_MEMORY_BYTES, the least recently used
versions that no request is using are unloaded first (never a pinned model's).

Loads on demand run one at a time: each makes room for itself and loads, so two loads never
count the same free memory twice, and two models' warm-ups never share the cores.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import weakref

from service.errors import DeadlineExceeded, NotReady, ServiceError
from service.inference.memory_budget import VersionKey
from service.inference.pipeline import Pipeline
from service.inference.repository import Repository
from service.inference.repository_layout import VersionFile
from service.inference.served_model import ServedModel
from service.metrics import Metrics
from service.settings import Settings

logger = logging.getLogger(__name__)

BUSY_POLL_S = 0.05
"""How often a load waiting for memory held by requests in flight looks again."""


class OnDemandLoading:
    """Loads a model on its first request, unloading least recently used versions to make
    room."""

    def __init__(self, repository: Repository, settings: Settings, metrics: Metrics) -> None:
        self.repository = repository
        self.registry = repository.registry
        self.loader = repository.loader
        self.settings = settings
        self.metrics = metrics
        self._loads: dict[str, asyncio.Task[None]] = {}
        """The load under way (or queued) of each model, shared by the requests waiting."""
        self._one_at_a_time = asyncio.Lock()
        self._waiting: collections.Counter[str] = collections.Counter()
        """Requests waiting for each model's load: it is not unloaded under them."""
        self.loader.make_room = self._make_room
        self._last_used: weakref.WeakKeyDictionary[Pipeline, float] = weakref.WeakKeyDictionary()
        """When a request was last admitted to each version (let go with its pipeline)."""

    def used(self, pipeline: Pipeline) -> None:
        """A request was admitted to `pipeline`: it is the most recently used."""
        self._last_used[pipeline] = time.monotonic()

    async def ensure(self, name: str, deadline: float) -> None:
        """Return once `name` has a version serving, loading it if need be; NotReady where its
        load failed, DeadlineExceeded where it did not finish by `deadline` (it goes on). A
        name the repository lacks returns at once: routing then says it is not served. While
        a request waits, its model is not unloaded to make room for another."""
        started = time.monotonic()
        outcome, waited = "loaded", False
        self._waiting[name] += 1
        try:
            while not self._serving(name):
                versions = self.repository.last_scan.get(name)
                if not versions:
                    return
                waited = True
                await self._wait_for_load(name, versions, deadline)
        except DeadlineExceeded:
            outcome = "timed_out"
            raise
        except ServiceError:
            outcome = "failed"
            raise
        except Exception as error:  # the load's own trouble: said, not a server error
            outcome = "failed"
            raise NotReady(f"model {name!r} could not be loaded: {error}") from error
        finally:
            self._waiting[name] -= 1
            if waited:
                seconds = time.monotonic() - started
                self.metrics.load_waits.labels(name, outcome).observe(seconds)

    def _serving(self, name: str) -> bool:
        model = self.registry.known(name)
        return model is not None and bool(model.serving)

    async def _wait_for_load(
        self, name: str, versions: dict[int, VersionFile], deadline: float
    ) -> None:
        """Wait for the load of `name` (started here where none is under way) until `deadline`."""
        load = self._loads.get(name)
        if load is None:
            load = asyncio.create_task(self._load(name, versions), name=f"load-{name}")
            self._loads[name] = load
            load.add_done_callback(lambda _: self._loads.pop(name, None))
        left = deadline - time.monotonic()
        try:
            async with asyncio.timeout(max(0.0, left)):
                await asyncio.shield(load)
        except TimeoutError:
            raise DeadlineExceeded(
                f"model {name!r} is loading on demand and was not ready within this request's "
                f"deadline; its load goes on: retry"
            ) from None

    async def _load(self, name: str, versions: dict[int, VersionFile]) -> None:
        """Load what the version policy chooses of `name`, after making room for it."""
        async with self._one_at_a_time:
            model = self.registry.model(name)
            if not model.serving:
                logger.info("model %s: loading on demand", name)
                await self.repository.sync(model, versions)
            if not model.serving:
                failures = model.failures()
                why = failures[0].reason if failures else "no version the policy chooses"
                raise NotReady(f"model {name!r} could not be loaded: {why}")
            for pipeline in model.serving.values():
                self.used(pipeline)  # the most recently used: its requests are about to come

    async def _make_room(self, name: str, key: VersionKey, needed: int) -> None:
        """Unload least recently used versions that no request is using until `needed` bytes
        for the version `key` of `name` fit the budget (before it loads, for its estimate;
        after its warm-up, for what it was measured to hold); where versions in use hold the
        rest, wait for them to be let go, up to the longest a request may take. What still
        does not fit is refused by the load, with the figures."""
        budget = self.loader.budget
        if not budget.budget_bytes:
            return
        patience = time.monotonic() + self.settings.request_timeout_ms / 1000
        while (
            room := budget.room(key, self.registry.memory_bytes())
        ) is not None and room < needed:
            victims = self._evictable(name)
            idle = [(model, version) for model, version, busy in victims if not busy]
            if idle:
                model, version = idle[0]
                logger.info(
                    "model %s version %d: least recently used, unloaded to make room for %s",
                    model.name,
                    version,
                    name,
                )
                # Closed, its memory given back, before the new version measures its own.
                await self.loader.retire(model, version, "evicted")
            elif victims and time.monotonic() < patience:
                await asyncio.sleep(BUSY_POLL_S)
            else:
                return

    def _evictable(self, name: str) -> list[tuple[ServedModel, int, bool]]:
        """Every serving version but `name`'s and the pinned models', least recently used
        first, each with whether it is in use now: a request admitted to it, or requests
        waiting for its model's load to be admitted."""
        pinned = set(self.settings.pinned_models)
        found = [
            (model, version, pipeline)
            for model in self.registry.models()
            if model.name != name and model.name not in pinned
            for version, pipeline in model.serving.items()
        ]
        found.sort(key=lambda item: self._last_used.get(item[2], 0.0))
        return [
            (model, version, pipeline.budget.images > 0 or self._waiting[model.name] > 0)
            for model, version, pipeline in found
        ]
