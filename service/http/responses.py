"""Outputs -> response bodies; the one error body, and the documented errors of each route."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi.responses import JSONResponse
from opentelemetry import trace

from model_contract.metadata import ModelMetadata
from model_contract.ood import in_distribution
from model_contract.outputs import ATTENTION_ROLLOUT, EMBEDDING, OOD_SCORE, PROBABILITIES
from service.errors import ERROR_TYPES, Overloaded, ServiceError, Unauthorized
from service.http.schemas import (
    Attention,
    ClassifyResponse,
    EmbeddingInfo,
    EmbedResponse,
    ErrorBody,
    ImageEmbedding,
    ModelRef,
    Prediction,
    TopClass,
)
from service.inference.pipeline import Answer
from service.metrics import Metrics


def classify_response(
    outcomes: list[Answer | ServiceError],
    names: list[str | None],
    metadata: ModelMetadata,
    *,
    top_k: int,
    full: bool,
    attention: bool = False,
) -> ClassifyResponse:
    """Per file, in request order: top-k most probable first (ties in label order), all if
    asked, and where the model looked if asked; or the file's own error."""
    labels = metadata.labels
    k = min(top_k, len(labels))
    predictions = []
    for outcome, name in zip(outcomes, names, strict=True):
        if isinstance(outcome, ServiceError):
            error = ErrorBody(error=outcome.message, type=outcome.type)
            predictions.append(Prediction(file=name, error=error))
            continue
        row = outcome.outputs[PROBABILITIES][0]
        order = np.argsort(-row, kind="stable")[:k]
        top = [TopClass(label=labels[i], index=int(i), probability=float(row[i])) for i in order]
        score = float(outcome.outputs[OOD_SCORE][0]) if metadata.ood is not None else None
        predictions.append(
            Prediction(
                file=name,
                top=top,
                probabilities=row.tolist() if full else None,
                ood_score=score,
                in_distribution=None
                if metadata.ood is None or score is None
                else bool(in_distribution(outcome.outputs[OOD_SCORE], metadata.ood.threshold)[0]),
                attention=attention_of(outcome) if attention else None,
            )
        )
    return ClassifyResponse(
        model=ModelRef(name=metadata.name, version=metadata.version), predictions=predictions
    )


def embed_response(
    outcomes: list[Answer | ServiceError],
    names: list[str | None],
    metadata: ModelMetadata,
    *,
    normalize: bool,
) -> EmbedResponse:
    """Per file, in request order: its embedding as float32 (unit length with `normalize`), or
    the file's own error."""
    assert metadata.embedding is not None  # the route refuses a model without one
    items = []
    for outcome, name in zip(outcomes, names, strict=True):
        if isinstance(outcome, ServiceError):
            error = ErrorBody(error=outcome.message, type=outcome.type)
            items.append(ImageEmbedding(file=name, error=error))
            continue
        vector = outcome.outputs[EMBEDDING][0].astype(np.float32)
        items.append(ImageEmbedding(file=name, embedding=as_floats(vector, normalize=normalize)))
    return EmbedResponse(
        model=ModelRef(name=metadata.name, version=metadata.version),
        embedding=EmbeddingInfo(
            size=metadata.embedding.size, source=metadata.embedding.source, normalized=normalize
        ),
        embeddings=items,
    )


def as_floats(vector: np.ndarray, *, normalize: bool) -> list[float]:
    """A float32 vector as JSON numbers, scaled to unit length with `normalize` (a zero vector
    stays zero: it has no direction)."""
    if normalize:
        norm = float(np.linalg.norm(vector.astype(np.float64)))
        if norm > 0:
            vector = (vector.astype(np.float64) / norm).astype(np.float32)
    return [float(x) for x in vector]


def attention_of(answer: Answer) -> Attention:
    return Attention(
        grid=answer.outputs[ATTENTION_ROLLOUT][0].tolist(),
        box=answer.decoded.box,
        image_size=answer.decoded.upright_size,
    )


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the given statuses, each listing the error types that produce it."""
    documented: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        types = sorted(error.type for error in ERROR_TYPES if error.status_code == status)
        documented[status] = {"model": ErrorBody, "description": "Error: " + ", ".join(types)}
    return documented


def error_response(
    metrics: Metrics | None,
    status_code: int,
    message: str,
    error_type: str,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The one error body; every error is also counted as a rejection by its type, and while
    tracing is on, recorded on the request's span."""
    if metrics is not None:
        metrics.rejections.labels(error_type).inc()
        if metrics.traced:
            trace.get_current_span().set_attribute("error.type", error_type)
    return JSONResponse(
        {"error": message, "type": error_type}, status_code=status_code, headers=headers
    )


def service_error_response(error: ServiceError, metrics: Metrics | None) -> JSONResponse:
    return error_response(
        metrics, error.status_code, error.message, error.type, _headers_for(error)
    )


def _headers_for(error: ServiceError) -> dict[str, str] | None:
    """What HTTP says beside an error: when to retry, and how to authenticate (RFC 6750)."""
    if isinstance(error, Overloaded):
        return {"Retry-After": str(error.retry_after)}
    if isinstance(error, Unauthorized):
        return {"WWW-Authenticate": "Bearer"}
    return None
