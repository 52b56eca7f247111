"""The /v1 routes: classify uploads, explain them (where the model looked), describe the
loaded models."""

from __future__ import annotations

import asyncio
import logging
import string
import weakref
from collections.abc import Iterable
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel

from model_contract.outputs import ATTENTION_ROLLOUT, PROBABILITIES
from model_contract.vit_cost import cost_of
from model_runtime.decoding.shared_file import PICTURE_SIDE
from service.errors import InvalidRequest, NoAttention, NoClasses, NotAcceptable, ServiceError
from service.http.body import FILE_FIELD, OCTET_STREAM, unless_disconnected, uploaded_images
from service.http.dependencies import DataPlaneDep, Inference, InferenceDep
from service.http.negotiation import preferred
from service.http.overlay import overlay_png
from service.http.responses import classify_response, embed_response, error_responses
from service.http.routers import inference_router
from service.http.schemas import (
    ClassifyResponse,
    EmbedResponse,
    ModelDescription,
    ModelList,
    NotLoaded,
    SelfTestInfo,
)
from service.inference.data_plane import require_embedding
from service.inference.pipeline import Answer, Pipeline

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["v1"])

TopK = Annotated[int | None, Query(description="Classes in `top`; clamped to the labels.")]
Full = Annotated[bool, Query(description="Also return the full distribution.")]
Normalize = Annotated[bool, Query(description="Scale each embedding to unit length.")]

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
            OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}},
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
    top_k: TopK = None,
    probabilities: Full = False,
) -> Response:
    require_classes(inference.pipeline)
    answers, names = await _answers(request, inference, top_k, pictures=False)
    body = classify_response(
        answers,
        names,
        inference.pipeline.session.metadata,
        top_k=top_k or inference.settings.default_top_k,
        full=probabilities,
    )
    return json_response(body)


def json_response(body: BaseModel) -> Response:
    """`body` as the route's JSON, written by pydantic at once: FastAPI's own path would
    check the model it was just built as against its schema again (`response_model` still
    documents the routes)."""
    return Response(body.model_dump_json(exclude_none=True), media_type=JSON)


def require_classes(pipeline: Pipeline) -> None:
    """400 before the body is read where the model serves embeddings only."""
    metadata = pipeline.session.metadata
    if not metadata.has_classes:
        raise NoClasses(
            f"model {metadata.name} version {metadata.version} has no classes: it serves "
            f"embeddings only (POST /v1/models/{metadata.name}/embed)"
        )


_EMBED: dict[str, Any] = {**_CLASSIFY, "response_model": EmbedResponse}


@inference_router.post(
    "/v1/models/{name}/versions/{version}/embed",
    summary="Embed uploads with one version of a model",
    **_EMBED,
)
@inference_router.post(
    "/v1/models/{name}/embed", summary="Embed uploads with a model's latest version", **_EMBED
)
@inference_router.post(
    "/v1/embed", summary="Embed one or more uploaded images (the default model)", **_EMBED
)
async def embed(
    request: Request, inference: InferenceDep, normalize: Normalize = False
) -> Response:
    """Per file, the vector the model's classification head reads (`embedding.source` says
    which), for search, deduplication and few-shot classifiers."""
    require_embedding(inference.pipeline)
    images, names = await _uploads(request, inference, pictures=False)
    work = inference.data_plane.embed_uploads(inference.admitted, images, inference.deadline)
    outcomes = await unless_disconnected(request, work)
    metadata = inference.pipeline.session.metadata
    return json_response(embed_response(outcomes, names, metadata, normalize=normalize))


JSON, PNG = "application/json", "image/png"
EXPLAIN_MEDIA_TYPES = (JSON, PNG)
"""What explain answers with, JSON first: the answer where the client accepts both alike."""

_EXPLAIN: dict[str, Any] = {
    **_CLASSIFY,
    "responses": {
        **_CLASSIFY["responses"],
        **error_responses(406),
        200: {
            "description": "JSON, or where `Accept` prefers `image/png` (by q; JSON on a tie) "
            f"the one file's upright photo, at most {PICTURE_SIDE} pixels on its longest side, "
            "with the attention map over the part the model saw and the rest dimmed. An "
            "`Accept` that takes neither is a 406.",
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        },
    },
}


@inference_router.post(
    "/v1/models/{name}/versions/{version}/explain",
    summary="Classify uploads with one version of a model, and show where it looked",
    **_EXPLAIN,
)
@inference_router.post(
    "/v1/models/{name}/explain",
    summary="Classify uploads with a model's latest version, and show where it looked",
    **_EXPLAIN,
)
@inference_router.post(
    "/v1/explain",
    summary="Classify uploads with the default model, and show where it looked",
    **_EXPLAIN,
)
async def explain(
    request: Request,
    inference: InferenceDep,
    top_k: TopK = None,
    probabilities: Full = False,
) -> Response:
    """Each prediction with `attention`: the class token's attention rollout over the patch
    grid and the box of the upright original it covers, to lay the map over the photo."""
    session = inference.pipeline.session
    require_classes(inference.pipeline)
    if session.attention_output is None:
        raise NoAttention(
            f"model {session.metadata.name} version {session.metadata.version} carries no "
            "attention rollout: it was imported with --no-rollout (a model without attention "
            "the rollout can read), or written before files carried one (export or import it "
            "again to add it)"
        )
    accept = ", ".join(request.headers.getlist("accept"))  # repeated headers are one list
    answer_as = preferred(accept, EXPLAIN_MEDIA_TYPES)
    if answer_as is None:
        raise NotAcceptable(
            f"explain answers with {JSON}, or {PNG} for one file; the request's Accept "
            "header takes neither (send one of them, or */*)"
        )
    png = answer_as == PNG
    answers, names = await _answers(request, inference, top_k, pictures=png)
    if not png:
        body = classify_response(
            answers,
            names,
            session.metadata,
            top_k=top_k or inference.settings.default_top_k,
            full=probabilities,
            attention=True,
        )
        return json_response(body)
    (answer,) = answers  # one file: `_answers` refuses more before decoding
    if isinstance(answer, ServiceError):
        raise answer
    decoded = answer.decoded
    assert decoded.picture is not None  # asked for above
    grid = answer.outputs[ATTENTION_ROLLOUT][0]
    png_bytes = await asyncio.to_thread(
        overlay_png, decoded.picture, grid, decoded.box, decoded.upright_size
    )
    top = int(answer.outputs[PROBABILITIES][0].argmax())
    headers = {
        "X-Model": header_value(f"{session.metadata.name}/{session.metadata.version}"),
        "X-Top-Label": header_value(session.labels[top]),
        "X-Top-Index": str(top),
    }
    return Response(png_bytes, media_type=PNG, headers=headers)


HEADER_SAFE = "".join(c for c in string.printable if c not in string.whitespace + "%") + " "


def header_value(text: str) -> str:
    """`text` as an HTTP header value: printable ASCII as it is, anything else (non-Latin
    labels, line breaks a label could smuggle in) percent-encoded as UTF-8."""
    return quote(text, safe=HEADER_SAFE)


async def _answers(
    request: Request, inference: Inference, top_k: int | None, *, pictures: bool
) -> tuple[list[Answer | ServiceError], list[str | None]]:
    """The uploads' outcomes, one per file; a single file's error is the request's. With
    `pictures` (a PNG answer) only one file is taken, refused before any is decoded."""
    if top_k is not None and top_k < 1:
        raise InvalidRequest(f"top_k must be at least 1, got {top_k}")
    images, names = await _uploads(request, inference, pictures=pictures)
    work = inference.data_plane.classify_uploads(
        inference.admitted, images, inference.deadline, pictures=pictures
    )
    outcomes = await unless_disconnected(request, work)
    return outcomes, names


async def _uploads(
    request: Request, inference: Inference, *, pictures: bool
) -> tuple[list[bytes], list[str | None]]:
    """The request's uploaded files and their names; with `pictures`, exactly one."""
    settings, admitted = inference.settings, inference.admitted
    with admitted.stage("read_body"):
        images = await uploaded_images(
            request,
            limit=settings.max_body_bytes,
            timeout=settings.body_timeout_s,
            max_files=settings.max_images_per_request,
            ticket=admitted.ticket,
        )
    if pictures and len(images) != 1:
        raise InvalidRequest(f"a PNG answer shows one image; this request has {len(images)}")
    return [image.data for image in images], [image.name for image in images]


def describe(pipeline: Pipeline) -> ModelDescription:
    session = pipeline.session
    metadata = session.metadata
    return ModelDescription(
        name=metadata.name,
        version=metadata.version,
        labels=list(metadata.labels),
        input_size=metadata.preprocessing.input_size,
        preprocessing=metadata.preprocessing,
        output=metadata.output,
        embedding=metadata.embedding,
        provider=session.runtime["provider"],
        providers=list(session.providers),
        runtime=session.runtime,
        engine_choice=session.engine_choice,
        precision_choice=session.precision_why,
        fallbacks=list(session.fallbacks),
        sha256=session.sha256,
        held_out_accuracy=metadata.held_out_accuracy,
        dataset=metadata.dataset,
        source=metadata.source,
        outputs=list(session.output_names),
        ood=metadata.ood,
        cost=(
            cost.as_dict()
            if (cost := cost_of(metadata.dataset.get("config"), len(metadata.labels)))
            else None
        ),
    )


_descriptions: weakref.WeakKeyDictionary[Pipeline, str | None] = weakref.WeakKeyDictionary()
"""Each served version's description as JSON, built on its first listing (None: it could not
be built), and let go with its pipeline: serialising every version's labels and metadata per
request made each unauthenticated listing cost what the files' metadata weighs."""


def description_json(pipeline: Pipeline) -> str | None:
    if pipeline not in _descriptions:
        try:
            _descriptions[pipeline] = describe(pipeline).model_dump_json()
        except Exception:  # one version's metadata must not take the listing of all down
            metadata = pipeline.session.metadata
            logger.exception(
                "model %s version %s cannot be described: /v1/models leaves it out",
                metadata.name,
                metadata.version,
            )
            _descriptions[pipeline] = None
    return _descriptions[pipeline]


def model_list(pipelines: Iterable[Pipeline], not_loaded: Iterable[NotLoaded] = ()) -> Response:
    """A ModelList: each version's description as built once, and its self-test as it
    stands now (it passes or fails after the version is listed), spliced in as the last field;
    then the models not loaded."""
    models = []
    for pipeline in pipelines:
        described = description_json(pipeline)
        if described is None:
            continue
        test = pipeline.self_test
        self_test = SelfTestInfo(status=test.status, detail=test.detail).model_dump_json()
        models.append(f'{described[:-1]},"self_test":{self_test}}}')
    idle = ",".join(model.model_dump_json() for model in not_loaded)
    return Response(f'{{"models":[{",".join(models)}],"not_loaded":[{idle}]}}', media_type=JSON)


@router.get("/models", response_model=ModelList, summary="The models served and how they run")
async def models(data_plane: DataPlaneDep) -> Response:
    idle = [NotLoaded(name=e.name, state=e.state, reason=e.reason) for e in data_plane.not_loaded()]
    return model_list(data_plane.registry.pipelines(), idle)


@router.get(
    "/models/{name}",
    response_model=ModelList,
    responses=error_responses(404),
    summary="The versions of one model served",
)
async def model(name: str, data_plane: DataPlaneDep) -> Response:
    data_plane.model(name)  # 404 unless served
    pipelines = data_plane.registry.pipelines()
    return model_list(p for p in pipelines if p.session.metadata.name == name)
