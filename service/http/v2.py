"""Open Inference Protocol v2 routes (KServe / Triton REST), binary tensor data included."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from model_runtime.session import Outputs
from service.http import oip
from service.http.admission import authorization
from service.http.body import read_body, unless_disconnected
from service.http.dependencies import DataPlaneDep, Inference, InferenceDep
from service.http.responses import error_responses
from service.http.routers import inference_router
from service.http.schemas import (
    OipInferenceResponse,
    OipLive,
    OipModelMetadata,
    OipModelReady,
    OipReady,
    OipServerMetadata,
    OipTensorMetadata,
    RepositoryModel,
)
from service.inference.data_plane import DataPlane

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])
repository_router = APIRouter(prefix="/v2/repository", tags=["model repository"])
"""The model-repository extension: changes what the server runs, so behind VIT_ADMIN_TOKEN."""
SERVER_NAME = "vit-inference"
JSON_PARSE_EXPANSION = 4
"""Bytes of Python objects parsing makes per byte of an OIP JSON body, beyond the body: a
number of ~9 characters becomes a float, a list slot and two array elements (~44 bytes)."""
PARSE_ON_LOOP_BYTES = 64 * 1024
"""Bodies smaller than this are parsed on the event loop (~1 ms at most); larger ones in a
thread, so health checks keep being answered."""


def _json_bytes(body: bytes, request: Request) -> int:
    """How much of `body` is JSON, which parsing expands: all of it, or the part the binary
    extension's header length names (which may be all of it, too)."""
    named = request.headers.get(oip.HEADER_LENGTH, "")
    if named.isdigit() and len(named) <= 12:  # otherwise parse_request refuses it
        return min(len(body), int(named))
    return len(body)


@router.get("", response_model=OipServerMetadata)
async def server_metadata(request: Request) -> OipServerMetadata:
    return OipServerMetadata(
        name=SERVER_NAME,
        version=request.app.version,
        extensions=["binary_tensor_data", "model_repository"],
    )


@router.get("/health/live", response_model=OipLive)
@router.head("/health/live", include_in_schema=False)  # probes and load balancers that use HEAD
async def live() -> OipLive:
    return OipLive(live=True)


@router.get("/health/ready", response_model=OipReady, responses={503: {"model": OipReady}})
@router.head("/health/ready", include_in_schema=False)
async def ready(data_plane: DataPlaneDep) -> Response:
    """Ready when every model version served is ready."""
    ready = data_plane.ready
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


def _model_metadata(data_plane: DataPlane, name: str, version: str | None) -> OipModelMetadata:
    signature = data_plane.signature(name, version)
    return OipModelMetadata(
        name=signature.name,
        versions=signature.versions,
        platform=signature.platform,
        inputs=[OipTensorMetadata(**t.as_dict()) for t in signature.inputs],
        outputs=[OipTensorMetadata(**t.as_dict()) for t in signature.outputs],
    )


@router.get("/models/{name}", response_model=OipModelMetadata, responses=error_responses(404))
async def model_metadata(name: str, data_plane: DataPlaneDep) -> OipModelMetadata:
    return _model_metadata(data_plane, name, None)


@router.get(
    "/models/{name}/versions/{version}",
    response_model=OipModelMetadata,
    responses=error_responses(404),
)
async def model_version_metadata(
    name: str, version: str, data_plane: DataPlaneDep
) -> OipModelMetadata:
    return _model_metadata(data_plane, name, version)


@router.get(
    "/models/{name}/versions/{version}/ready",
    response_model=OipModelReady,
    responses={**error_responses(404), 503: {"model": OipModelReady}},
)
@router.get(
    "/models/{name}/ready",
    response_model=OipModelReady,
    responses={**error_responses(404), 503: {"model": OipModelReady}},
)
async def model_ready(name: str, data_plane: DataPlaneDep, version: str | None = None) -> Response:
    ready = data_plane.model_ready(name, version)
    return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)


_INFER_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/OipInferenceRequest"}},
            oip.BINARY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


async def _infer(request: Request, inference: Inference) -> Response:
    settings, admitted = inference.settings, inference.admitted
    with admitted.stage("read_body"):
        body = await read_body(
            request, settings.max_body_bytes, settings.body_timeout_s, admitted.ticket
        )
    admitted.ticket.hold_bytes(JSON_PARSE_EXPANSION * _json_bytes(body, request))
    pipeline = admitted.pipeline
    parse = functools.partial(
        oip.parse_request, body, request.headers.get(oip.HEADER_LENGTH), pipeline.input_spec
    )
    # Parsing is per-element Python work: a large body would hold the event loop for seconds.
    parsed = parse() if len(body) < PARSE_ON_LOOP_BYTES else await asyncio.to_thread(parse)
    work = inference.data_plane.infer(admitted, parsed, inference.deadline)
    outputs: Outputs = await unless_disconnected(request, work)
    metadata = pipeline.session.metadata
    encoded = oip.encode_response(
        outputs, model_name=metadata.name, model_version=metadata.version, request=parsed
    )
    return Response(encoded.body, media_type=encoded.media_type, headers=encoded.headers)


_INFER: dict[str, Any] = {
    "tags": ["Open Inference Protocol v2"],
    "response_model": OipInferenceResponse,
    "responses": error_responses(400, 404, 408, 413, 415, 422, 500, 503, 504),
    "openapi_extra": _INFER_DOC,
}


@inference_router.post("/v2/models/{name}/infer", **_INFER)
async def infer(name: str, request: Request, inference: InferenceDep) -> Response:
    """The model's latest version (admission resolved it from the path)."""
    return await _infer(request, inference)


@inference_router.post("/v2/models/{name}/versions/{version}/infer", **_INFER)
async def infer_version(
    name: str,
    version: str,
    request: Request,
    inference: InferenceDep,
) -> Response:
    return await _infer(request, inference)


@repository_router.post(
    "/index",
    response_model=list[RepositoryModel],
    responses=error_responses(401, 403),
    summary="Every model version the repository holds and its state",
)
async def repository_index(request: Request, data_plane: DataPlaneDep) -> list[RepositoryModel]:
    return [
        RepositoryModel(
            name=entry.name,
            version="" if entry.version is None else str(entry.version),
            state=entry.state,
            reason=entry.reason,
            memory_bytes=entry.memory_bytes,
        )
        for entry in await data_plane.index(authorization(request.scope))
    ]


@repository_router.post(
    "/models/{name}/load",
    responses=error_responses(400, 401, 403, 404),
    summary="Load a model, or reload it from the repository as it is now",
)
async def load_model(name: str, request: Request, data_plane: DataPlaneDep) -> JSONResponse:
    await data_plane.load(name, authorization(request.scope))
    return JSONResponse({})


@repository_router.post(
    "/models/{name}/unload",
    responses=error_responses(401, 403, 404),
    summary="Stop serving a model once the requests it has taken are answered",
)
async def unload_model(name: str, request: Request, data_plane: DataPlaneDep) -> JSONResponse:
    await data_plane.unload(name, authorization(request.scope))
    return JSONResponse({})
