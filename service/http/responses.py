"""Probabilities -> response bodies; the one error body, and the documented errors of each route."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi.responses import JSONResponse

from model_contract.metadata import ModelMetadata
from service.errors import ERROR_TYPES, Overloaded, ServiceError
from service.http.schemas import ClassifyResponse, ErrorBody, ModelRef, Prediction, TopClass
from service.metrics import Metrics


def classify_response(
    outcomes: list[np.ndarray | ServiceError],
    names: list[str | None],
    metadata: ModelMetadata,
    *,
    top_k: int,
    full: bool,
) -> ClassifyResponse:
    """Per file, in request order: top-k most probable first (ties in label order), and all if
    asked; or the file's own error."""
    labels = metadata.labels
    k = min(top_k, len(labels))
    predictions = []
    for outcome, name in zip(outcomes, names, strict=True):
        if isinstance(outcome, ServiceError):
            error = ErrorBody(error=outcome.message, type=outcome.type)
            predictions.append(Prediction(file=name, error=error))
            continue
        order = np.argsort(-outcome, kind="stable")[:k]
        top = [
            TopClass(label=labels[i], index=int(i), probability=float(outcome[i])) for i in order
        ]
        full_row = outcome.tolist() if full else None
        predictions.append(Prediction(file=name, top=top, probabilities=full_row))
    return ClassifyResponse(
        model=ModelRef(name=metadata.name, version=metadata.version), predictions=predictions
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
    """The one error body; every error is also counted as a rejection by its type."""
    if metrics is not None:
        metrics.rejections.labels(error_type).inc()
    return JSONResponse(
        {"error": message, "type": error_type}, status_code=status_code, headers=headers
    )


def service_error_response(error: ServiceError, metrics: Metrics | None) -> JSONResponse:
    headers = {"Retry-After": str(error.retry_after)} if isinstance(error, Overloaded) else None
    return error_response(metrics, error.status_code, error.message, error.type, headers)
