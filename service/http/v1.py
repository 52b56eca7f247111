"""The /v1 routes: classify uploads, describe the loaded model."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from model_contract.vit_cost import cost_of
from service.errors import InvalidRequest, ServiceError
from service.http.body import FILE_FIELD, unless_disconnected, uploaded_images
from service.http.dependencies import InferenceDep, RegistryDep
from service.http.responses import classify_response, error_responses
from service.http.routers import inference_router
from service.http.schemas import ClassifyResponse, ModelInfo, ModelList
from service.inference.pipeline import Pipeline

router = APIRouter(prefix="/v1", tags=["v1"])

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FILE_FIELD],
                    "properties": {
                        FILE_FIELD: {
                            "type": "array",
                            "minItems": 1,
                            "items": {"type": "string", "format": "binary"},
                            "description": "One or more image files (repeat the field).",
                        }
                    },
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


_CLASSIFY: dict[str, Any] = {
    "tags": ["v1"],
    "response_model": ClassifyResponse,
    "response_model_exclude_none": True,
    "responses": error_responses(400, 401, 404, 408, 413, 415, 422, 500, 503, 504),
    "openapi_extra": _UPLOAD_BODY,
}


@inference_router.post(
    "/v1/models/{name}/versions/{version}/classify",
    summary="Classify uploads with one version of a model",
    **_CLASSIFY,
)
@inference_router.post(
    "/v1/models/{name}/classify",
    summary="Classify uploads with a model's latest version",
    **_CLASSIFY,
)
@inference_router.post(
    "/v1/classify", summary="Classify one or more uploaded images (the default model)", **_CLASSIFY
)
async def classify(
    request: Request,
    inference: InferenceDep,
    top_k: Annotated[
        int | None, Query(description="Classes in `top`; clamped to the labels.")
    ] = None,
    probabilities: Annotated[bool, Query(description="Also return the full distribution.")] = False,
) -> ClassifyResponse:
    pipeline, settings = inference.pipeline, inference.settings
    if top_k is not None and top_k < 1:
        raise InvalidRequest(f"top_k must be at least 1, got {top_k}")
    with pipeline.metrics.stage_seconds.labels("read_body").time():
        images = await uploaded_images(
            request,
            limit=settings.max_body_bytes,
            timeout=settings.body_timeout_s,
            max_files=settings.max_images_per_request,
            ticket=inference.ticket,
        )
    inference.ticket.hold_images(len(images))
    work = pipeline.classify_each([image.data for image in images], inference.deadline)
    outcomes = await unless_disconnected(request, work)
    failed = [outcome for outcome in outcomes if isinstance(outcome, ServiceError)]
    if len(outcomes) == 1 and failed:
        raise failed[0]  # one file: its error is the request's, with its status
    for error in failed:
        pipeline.metrics.rejections.labels(error.type).inc()
    return classify_response(
        outcomes,
        [image.name for image in images],
        pipeline.session.metadata,
        top_k=top_k or settings.default_top_k,
        full=probabilities,
    )


def model_info(pipeline: Pipeline) -> ModelInfo:
    session = pipeline.session
    metadata = session.metadata
    return ModelInfo(
        name=metadata.name,
        version=metadata.version,
        labels=list(metadata.labels),
        input_size=metadata.preprocessing.input_size,
        preprocessing=metadata.preprocessing,
        output=metadata.output,
        provider=session.provider,
        providers=list(session.providers),
        runtime=session.runtime,
        fallbacks=list(session.fallbacks),
        sha256=session.sha256,
        held_out_accuracy=metadata.held_out_accuracy,
        dataset=metadata.dataset,
        source=metadata.source,
        cost=(
            cost.as_dict()
            if (cost := cost_of(metadata.dataset.get("config"), len(metadata.labels)))
            else None
        ),
    )


@router.get("/models", response_model=ModelList, summary="The models served and how they run")
async def models(registry: RegistryDep) -> ModelList:
    return ModelList(models=[model_info(pipeline) for pipeline in registry.pipelines()])


@router.get(
    "/models/{name}",
    response_model=ModelList,
    responses=error_responses(404),
    summary="The versions of one model served",
)
async def model(name: str, registry: RegistryDep) -> ModelList:
    registry.get(name)  # 404 unless served
    pipelines = [p for p in registry.pipelines() if p.session.metadata.name == name]
    return ModelList(models=[model_info(pipeline) for pipeline in pipelines])
