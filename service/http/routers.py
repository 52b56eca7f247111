"""The one router of every route that runs a model: admission control covers exactly its routes
(service/http/admission.py), so a route added to it cannot skip admission and one not on it
cannot reach a model."""

from __future__ import annotations

from fastapi import APIRouter

inference_router = APIRouter()
