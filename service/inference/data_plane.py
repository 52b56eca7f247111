"""The one data plane every protocol front calls: HTTP's /v1 and /v2 routes and the gRPC
service alike.

A front parses its own encoding, makes one call here and shapes the answer. What the call does
is the same whichever front made it: the token check, the model's lookup, admission against
the replica's budget, the deadline, decoding and batching, and the metrics of each stage. So
a refusal, a number or a counted rejection never depends on the protocol that carried it.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from pydantic import SecretStr

from model_contract.outputs import EMBEDDING
from model_runtime.session import Outputs
from service.errors import (
    Forbidden,
    InvalidRequest,
    ModelNotFound,
    NoEmbedding,
    ServiceError,
    Unauthorized,
)
from service.inference.budget import Ticket
from service.inference.on_demand import OnDemandLoading
from service.inference.pipeline import Answer, Pipeline
from service.inference.registry import ModelRegistry
from service.inference.repository import Repository
from service.inference.served_model import IndexEntry
from service.inference.tensors import BYTES, FP32, IMAGE_INPUT, InferRequest
from service.settings import Settings


def bearer_matches(authorization: str | None, token: SecretStr) -> bool:
    """Whether an `Authorization` value is `Bearer <token>` (constant-time compare)."""
    if authorization is None:
        return False
    scheme, _, given = authorization.partition(" ")
    expected = token.get_secret_value().encode()
    return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), expected)


@dataclass(frozen=True)
class Admitted:
    """A request let in: the model version it stays with (even if a new one takes over
    meanwhile) and what it holds of that version's budget until `ticket.release()`."""

    pipeline: Pipeline
    ticket: Ticket
    deadline: float
    """The monotonic time by which it must have left the queue, set as it arrived: a wait
    for its model's load counts against it."""

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time one stage of the request (reading its body, say) in the model's metrics, and
        while tracing is on, as a span of the request."""
        pipeline = self.pipeline
        span = None
        if pipeline.tracing is not None and trace.get_current_span().is_recording():
            span = pipeline.tracing.tracer.start_span(name, attributes=pipeline.span_attributes)
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            pipeline.metrics.stage_seconds.labels(name).observe(
                seconds, pipeline.metrics.exemplar()
            )
            if span is not None:
                span.end()


@dataclass(frozen=True)
class TensorSignature:
    name: str
    datatype: str
    shape: tuple[int, ...]
    """-1 where the batch or the graph leaves a dimension open."""

    def as_dict(self) -> dict[str, Any]:
        """The fields as OIP's tensor metadata names them, in HTTP's JSON and gRPC's protobuf."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ModelSignature:
    """What OIP's model metadata says of a model: its versions, inputs and outputs."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorSignature]
    outputs: list[TensorSignature]


PLATFORM = "onnxruntime_onnx"


def require_embedding(pipeline: Pipeline) -> None:
    """400 where the model version carries no embedding: before its request's body is read."""
    metadata = pipeline.session.metadata
    if metadata.embedding is None:
        raise NoEmbedding(
            f"model {metadata.name} version {metadata.version} carries no embedding: it was "
            "written before files carried one, or its classification output is not a linear "
            "head on features (export or import it again to add it)"
        )


class DataPlane:
    """Lookup, admission, deadlines, inference and the repository, for every front."""

    def __init__(self, registry: ModelRegistry, repository: Repository, settings: Settings) -> None:
        self.registry = registry
        self.repository = repository
        self.settings = settings
        self.on_demand = (
            OnDemandLoading(repository, settings, repository.loader.metrics)
            if settings.model_control == "on_demand"
            else None
        )

    @property
    def ready(self) -> bool:
        return self.registry.ready

    def model(self, name: str | None, version: str | None = None) -> Pipeline:
        """The version serving `name` (the default model for None or ""), or 404/503."""
        return self.registry.get(name or None, version or None)

    def model_ready(self, name: str, version: str | None = None) -> bool:
        return self.model(name, version).ready

    async def admit(
        self,
        name: str | None,
        version: str | None,
        authorization: str | None,
        timeout_s: float | None = None,
    ) -> Admitted:
        """Let an inference request in, before its body is read or parsed: 401 without the
        inference token where one is set, 404 for no such model, 503 not ready or overloaded.
        Under overload most requests end here, so it costs a lookup and a few reads. In
        on_demand mode a model not loaded is loaded first, within the request's deadline (the
        server's, or `timeout_s` where the client allows less)."""
        self.authorize(authorization)
        deadline = self.deadline(timeout_s)
        if self.on_demand is None:
            pipeline = self.model(name, version)
        else:
            await self.on_demand.ensure(self._named(name), deadline)
            pipeline = self.model(name, version)
            self.on_demand.used(pipeline)
        return Admitted(pipeline, pipeline.admit(), deadline)

    def _named(self, name: str | None) -> str:
        """The model a request names, or the default model ("" where there is none)."""
        if name:
            return name
        try:
            return self.registry.default_name()
        except ModelNotFound:
            return ""

    def authorize(self, authorization: str | None) -> None:
        """401 unless the inference token, where one is set, is the request's."""
        token = self.settings.api_token
        if token is not None and not bearer_matches(authorization, token):
            raise Unauthorized("this server requires Authorization: Bearer <VIT_API_TOKEN>")

    def deadline(self, seconds: float | None = None) -> float:
        """The monotonic time by which a request must have left the queue: the server's
        VIT_REQUEST_TIMEOUT_MS, or what the client allows if that is sooner."""
        limit = self.settings.request_timeout_ms / 1000
        if seconds is not None:
            if not seconds > 0:
                raise InvalidRequest("a request's timeout must be a positive time")
            limit = min(limit, seconds)
        return time.monotonic() + limit

    async def classify_uploads(
        self, admitted: Admitted, images: list[bytes], deadline: float, *, pictures: bool
    ) -> list[Answer | ServiceError]:
        """One outcome per uploaded file (its outputs, or the error its file alone caused,
        counted); a single file's error is the request's. `pictures`: keep each upright
        image too, for an overlay."""
        admitted.ticket.hold_images(len(images))
        pipeline = admitted.pipeline
        outcomes = await pipeline.classify_each(images, deadline, pictures=pictures)
        failed = [outcome for outcome in outcomes if isinstance(outcome, ServiceError)]
        if len(outcomes) == 1 and failed:
            raise failed[0]  # one file: its error is the request's, with its status
        for error in failed:
            pipeline.metrics.rejections.labels(error.type).inc()
        return outcomes

    async def embed_uploads(
        self, admitted: Admitted, images: list[bytes], deadline: float
    ) -> list[Answer | ServiceError]:
        """`classify_uploads` for embeddings: the model must carry one (400 otherwise, before
        any image is decoded; the route checks it before the body is read), and the embeddings
        answered are counted."""
        pipeline = admitted.pipeline
        require_embedding(pipeline)
        outcomes = await self.classify_uploads(admitted, images, deadline, pictures=False)
        served = sum(not isinstance(outcome, ServiceError) for outcome in outcomes)
        pipeline.metrics.observe_embeddings(served)
        return outcomes

    async def infer(self, admitted: Admitted, request: InferRequest, deadline: float) -> Outputs:
        """The outputs for an OIP infer request: its pixels batched as they are, or its image
        files decoded first; any file that fails fails the request."""
        pipeline, ticket = admitted.pipeline, admitted.ticket
        if request.pixels is not None:
            ticket.hold_images(len(request.pixels))
            outputs = await pipeline.infer(request.pixels, deadline)
        else:
            ticket.hold_images(len(request.images or []))
            outputs = await pipeline.classify(request.images or [], deadline)
        if EMBEDDING in request.outputs:
            pipeline.metrics.observe_embeddings(len(outputs[EMBEDDING]))
        return outputs

    def signature(self, name: str, version: str | None = None) -> ModelSignature:
        """OIP model metadata: all versions served (or the one asked for), the pixel input
        and the image-file input, and every output with its shape."""
        pipeline = self.model(name, version)
        session, metadata = pipeline.session, pipeline.session.metadata
        versions = (
            [metadata.version]
            if version
            else [
                p.session.metadata.version
                for p in self.registry.pipelines()
                if p.session.metadata.name == metadata.name
            ]
        )
        spec = pipeline.input_spec
        return ModelSignature(
            name=metadata.name,
            versions=versions,
            platform=PLATFORM,
            inputs=[
                TensorSignature(spec.pixels_name, FP32, (-1, *spec.image_shape)),
                TensorSignature(IMAGE_INPUT, BYTES, (-1,)),
            ],
            outputs=[
                TensorSignature(output.name, FP32, output.shape) for output in session.outputs
            ],
        )

    def not_loaded(self) -> list[IndexEntry]:
        """The repository's models with no version serving (as its last scan saw them), each
        with why: for listings anyone may read, so no scan of the disk per call."""
        listed = []
        for name in sorted(self.repository.last_scan):
            model = self.registry.known(name)
            if model is not None and model.serving:
                continue
            if model is not None and model.loading:
                listed.append(IndexEntry(name, None, "LOADING", "a version is loading"))
            elif model is not None and model.failures():
                # Why, in the admin's repository index: a failure can name the server's paths.
                why = "its last load failed (the repository index says why)"
                listed.append(IndexEntry(name, None, "UNAVAILABLE", why))
            else:
                why = self.repository.idle_reason(model)
                listed.append(IndexEntry(name, None, "UNAVAILABLE", why))
        return listed

    def require_admin(self, authorization: str | None) -> None:
        """The repository API changes what the server runs: the admin token, or nothing."""
        token = self.settings.admin_token
        if token is None:
            raise Forbidden(
                "the repository API is off: set VIT_ADMIN_TOKEN to enable it, then send "
                "Authorization: Bearer <token>"
            )
        if not bearer_matches(authorization, token):
            raise Unauthorized(
                "the repository API requires Authorization: Bearer <VIT_ADMIN_TOKEN>"
            )

    async def index(self, authorization: str | None) -> list[IndexEntry]:
        self.require_admin(authorization)
        return await self.repository.index()

    async def load(self, name: str, authorization: str | None) -> None:
        self.require_admin(authorization)
        await self.repository.load(name)

    async def unload(self, name: str, authorization: str | None) -> None:
        self.require_admin(authorization)
        await self.repository.unload(name)
