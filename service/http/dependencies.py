"""How routes reach the objects the lifespan built: typed `Depends` aliases, no globals.

Every dependency is `async def`: FastAPI runs a plain `def` dependency in a worker thread, and
three thread hops per request cost more than the lookups they wrap (profiled under load).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from service.errors import Forbidden, InvalidRequest, Unauthorized
from service.http.admission import bearer_token_matches
from service.inference.budget import Ticket
from service.inference.pipeline import Pipeline
from service.inference.registry import ModelRegistry
from service.settings import Settings

TIMEOUT_HEADER = "X-Request-Timeout-Ms"


async def get_registry(request: Request) -> ModelRegistry:
    registry: ModelRegistry = request.state.registry
    return registry


async def require_admin(request: Request) -> None:
    """The repository API changes what the server runs: a bearer token, or nothing at all."""
    settings: Settings = request.state.settings
    if settings.admin_token is None:
        raise Forbidden(
            "the repository API is off: set VIT_ADMIN_TOKEN to enable it, then send "
            "Authorization: Bearer <token>"
        )
    if not bearer_token_matches(request.scope, settings.admin_token):
        raise Unauthorized("the repository API requires Authorization: Bearer <VIT_ADMIN_TOKEN>")


def request_deadline(settings: Settings, timeout_ms: str | None) -> float:
    """The monotonic time by which the request must have left the queue."""
    limit = settings.request_timeout_ms
    if timeout_ms is not None:
        try:
            asked = float(timeout_ms)
        except ValueError:
            asked = float("nan")
        if not asked > 0:
            raise InvalidRequest(f"{TIMEOUT_HEADER} must be a positive number of milliseconds")
        limit = min(limit, asked)
    return time.monotonic() + limit / 1000


@dataclass(frozen=True)
class Inference:
    """What an inference route needs, resolved by one dependency: FastAPI spends ~40 us of the
    event loop per dependency per request, and the inference routes are the hot ones."""

    pipeline: Pipeline
    settings: Settings
    deadline: float
    ticket: Ticket
    """What the request holds of the replica's budget (set by admission control)."""


async def inference(
    request: Request,
    timeout_ms: Annotated[
        str | None,
        Header(alias=TIMEOUT_HEADER, description="Lower this request's deadline (milliseconds)."),
    ] = None,
) -> Inference:
    settings: Settings = request.state.settings
    return Inference(
        request.state.pipeline,
        settings,
        request_deadline(settings, timeout_ms),
        request.state.ticket,
    )


RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
AdminDep = Annotated[None, Depends(require_admin)]
InferenceDep = Annotated[Inference, Depends(inference)]
