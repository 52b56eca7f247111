"""`create_app(settings)`: the FastAPI application, its lifespan and its one error body."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from starlette.exceptions import HTTPException

from model_runtime.decoding.pool import DecodeWorkers
from model_runtime.openvino_engine import ONNXRUNTIME, load_openvino
from service.errors import InvalidRequest, ServiceError
from service.grpc.server import GrpcFront
from service.http import v1, v2, web
from service.http.admission import Admission
from service.http.malformed_requests import RequestFraming
from service.http.middleware import RequestMetrics
from service.http.responses import error_response, service_error_response
from service.http.routers import inference_router
from service.http.schemas import OipInferenceRequest
from service.http.tracing import RequestTracing
from service.inference.data_plane import DataPlane
from service.inference.registry import ModelRegistry
from service.inference.repository import Repository
from service.metrics import Metrics
from service.observability.tracing import Tracing
from service.observability.tracing import wanted as tracing_wanted
from service.settings import Settings

logger = logging.getLogger(__name__)

_HTTP_ERROR_TYPES = {404: "not_found", 405: "method_not_allowed"}
OPENMETRICS = "application/openmetrics-text"


def package_version() -> str:
    try:
        return version("vit-inference")
    except PackageNotFoundError:
        return "0+unknown"


def _metrics(request: Request) -> Metrics | None:
    metrics = getattr(request.state, "metrics", None)
    return metrics if isinstance(metrics, Metrics) else None


async def _service_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ServiceError)
    return service_error_response(error, _metrics(request))


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    first = error.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    message = f"{where}: {first.get('msg', 'invalid')}"
    return error_response(_metrics(request), 400, message, InvalidRequest.type)


ROUTES_HINT = (
    "the routes: POST /v1/classify, GET /v1/models, GET /v2/health/ready, "
    "POST /v2/models/{name}/infer, GET /metrics; all of them, with a form to try each, at /docs"
)


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    kind = _HTTP_ERROR_TYPES.get(error.status_code, "http_error")
    message = str(error.detail)
    if error.status_code == 404:  # no route matched: a route's own 404s are ServiceErrors
        path = request.url.path
        near = f" (did you mean {path.rstrip('/')}?)" if path.endswith("/") and path != "/" else ""
        message = f"no route {request.method} {path}{near}; {ROUTES_HINT}"
    headers = dict(error.headers or {})
    if error.status_code == 405:
        allowed = headers.get("allow", headers.get("Allow", ""))
        message = f"{request.method} is not allowed on {request.url.path}; use {allowed}"
    return error_response(_metrics(request), error.status_code, message, kind, headers or None)


async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(_metrics(request), 500, "internal error", "internal_error")


def _stop_if_warm_up_failed(app: FastAPI, warm_up: asyncio.Task[None]) -> None:
    """Models that cannot load or answer their warm-up at start never will: stop the server
    (vit-serve sets `app.state.stop_server`) instead of answering "not ready" forever."""
    if warm_up.cancelled() or (error := warm_up.exception()) is None:
        return
    logger.error(
        "warm-up failed, stopping: %s (does the metadata describe this graph? "
        "docs/MODEL-FORMAT.md)",
        error,
    )
    stop = getattr(app.state, "stop_server", None)
    if stop is not None:
        stop()


def _lifespan(settings: Settings) -> Callable[[FastAPI], Any]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        # Models load and warm up while the server already answers liveness; readiness waits
        # for them (service/inference/repository.py).
        metrics = Metrics()
        tracing = Tracing.from_environment()
        if tracing is not None:
            metrics.traced = True
            metrics.registry.register(tracing)
        registry = ModelRegistry(settings, metrics)
        app.state.registry = registry  # for the server's SIGTERM handler (service/cli.py)
        # One pool of decoding workers for every model: a version loaded starts no process.
        decoders = DecodeWorkers(
            workers=settings.decode_workers,
            max_pixels=settings.max_pixels,
            memory_bytes=settings.decode_memory_bytes,
            timeout_s=settings.decode_timeout_s,
        )
        repository = Repository(settings, registry, metrics, decoders, tracing)
        # What the process takes once (the decoding workers' launcher, OpenVINO's libraries)
        # is taken before the first model loads, so that each model's memory is its own.
        await asyncio.to_thread(decoders.start)
        try:
            if settings.runtime.engine != ONNXRUNTIME:
                await asyncio.to_thread(load_openvino)
            prepared = await repository.open()  # a file that cannot load fails startup here
        except BaseException:
            await asyncio.to_thread(decoders.close)
            raise
        data_plane = DataPlane(registry, repository, settings)
        start = asyncio.create_task(repository.serve(prepared))
        start.add_done_callback(lambda task: _stop_if_warm_up_failed(app, task))
        grpc = None
        try:
            if settings.grpc_port:
                grpc = await GrpcFront.start(data_plane, metrics, settings, app.version, tracing)
            yield {
                "data_plane": data_plane,
                "settings": settings,
                "metrics": metrics,
                "tracing": tracing,
            }
        finally:
            start.cancel()
            if grpc is not None:
                await grpc.stop(settings.graceful_shutdown_s)
            await repository.close()
            await asyncio.to_thread(decoders.close)  # once no version decodes any more
            if tracing is not None:
                await asyncio.to_thread(tracing.shutdown)  # what is queued, within its bound

    return lifespan


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """The generated schema plus the OIP request schema the binary-capable route documents."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            request_schema = OipInferenceRequest.model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(request_schema.pop("$defs", {}))
            components["OipInferenceRequest"] = request_schema
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


async def metrics_endpoint(request: Request) -> Response:
    """The app's own registry in Prometheus' text format, or in OpenMetrics' where the scraper
    asks for it (Prometheus does with exemplar storage on): only OpenMetrics carries the
    exemplars that link a latency to its trace."""
    metrics: Metrics = request.state.metrics
    if OPENMETRICS in request.headers.get("accept", ""):
        exposition = openmetrics.generate_latest(metrics.registry)
        return Response(exposition, media_type=openmetrics.CONTENT_TYPE_LATEST)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(
        title="ViT inference service",
        version=package_version(),
        description="Image classification with a self-describing ONNX Vision Transformer. "
        "/v1 takes image uploads; /v2 speaks the Open Inference Protocol.",
        lifespan=_lifespan(settings),
        # /docs comes from service/http/web.py with swagger-ui served locally; ReDoc, which
        # only loads from a CDN, is off.
        docs_url=None,
        redoc_url=None,
        # /v1/classify/ answers 404 with a hint, not a bodiless 307 that POST clients lose.
        redirect_slashes=False,
        # FastAPI's OpenTelemetry bridge looked up its providers (and the environment) on every
        # request: ~3% of the event loop's samples at 16 clients, for nothing /metrics lacks.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    # Routing tries each router in turn: the inference routes, the hot ones, first. No two
    # routers share a path, so the order changes only what routing costs.
    app.include_router(inference_router)
    app.include_router(web.router)
    app.include_router(v1.router)
    app.include_router(v2.router)
    app.include_router(v2.repository_router)
    app.add_middleware(Admission, inference_routes=inference_router.routes)
    app.add_middleware(RequestFraming)
    app.add_middleware(RequestMetrics)  # outermost but for tracing: it sees refusals too
    if tracing_wanted(os.environ):
        app.add_middleware(RequestTracing)  # added last, so outermost of all
    app.add_api_route("/metrics", metrics_endpoint, include_in_schema=False)
    app.openapi = _openapi(app)  # type: ignore[method-assign]
    return app
