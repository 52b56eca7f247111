"""The models being served, by name: the one object requests are routed through, and what
readiness means for all of them together."""

from __future__ import annotations

from service.errors import ModelNotFound, NotReady
from service.inference.pipeline import Pipeline
from service.inference.served_model import ServedModel
from service.metrics import Metrics
from service.settings import Settings


class ModelRegistry:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self._models: dict[str, ServedModel] = {}
        self.started = False
        """Set once every model chosen at start has been tried."""
        self.alone_at_start: str | None = None
        """The one model served when startup ended, where there was one: the default model."""
        self.draining = False
        """Set on SIGTERM: readiness turns false while requests are still answered."""
        metrics.models_memory_bytes.set_function(lambda: float(self.memory_bytes()))

    def model(self, name: str) -> ServedModel:
        """The model `name`, known from now on (with nothing served yet, if it is new)."""
        model = self._models.get(name)
        if model is None:
            model = self._models[name] = ServedModel(name)
        return model

    def known(self, name: str) -> ServedModel | None:
        return self._models.get(name)

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def serving_names(self) -> list[str]:
        return sorted(name for name, model in self._models.items() if model.serving)

    def get(self, name: str | None = None, version: str | None = None) -> Pipeline:
        """The pipeline serving `name` (the default model when None) at `version` (the latest
        served and ready when None), or 404."""
        models = self._models.values()
        if not any(m.serving for m in models) and any(m.loading for m in models):
            raise NotReady("the models are still loading")
        name = name or self.default_name()
        model = self._models.get(name)
        if model is None or not model.serving:
            if model is not None and model.loading:
                raise NotReady(f"model {name!r} is still loading")
            known = ", ".join(self.serving_names()) or "none"
            raise ModelNotFound(f"no model {name!r} is served (serving: {known})")
        return model.get(version)

    def default_name(self) -> str:
        """The model routes without a name serve: VIT_DEFAULT_MODEL, or the one model served at
        start, for good (unloaded, it is a 404; never another model's labels); while starting,
        the one served so far."""
        if self.settings.default_model:
            return self.settings.default_model
        if self.alone_at_start is not None:
            return self.alone_at_start
        serving = self.serving_names()
        if not self.started and len(serving) == 1:
            return serving[0]
        names = ", ".join(serving) or "none"
        raise ModelNotFound(
            f"no default model (serving: {names}): name one, /v1/models/{{name}}/classify, or "
            "set VIT_DEFAULT_MODEL"
        )

    def pipelines(self) -> list[Pipeline]:
        return [p for model in self._models.values() for p in model.serving.values()]

    @property
    def ready(self) -> bool:
        """Every model that should be loaded at start has loaded, some model is served (on
        demand, none need be), and every version served is ready (later loads and swaps do not
        take readiness away)."""
        serving = self.pipelines()
        return (
            self.started
            and (bool(serving) or self.settings.model_control == "on_demand")
            and not any(model.awaited for model in self._models.values())
            and not self.draining
            and all(p.ready for p in serving)
        )

    def memory_bytes(self) -> int:
        return sum(model.memory_bytes() for model in self._models.values())

    def labels_in_use(self, pipeline: Pipeline) -> bool:
        """Whether a serving pipeline other than `pipeline` has its name and version: the
        metric series they share must outlive the one closed."""
        stated = pipeline.session.metadata
        return any(
            other is not pipeline
            and (other.session.metadata.name, other.session.metadata.version)
            == (stated.name, stated.version)
            for other in self.pipelines()
        )
