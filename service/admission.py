"""Admission control ahead of routing: refuse inference the replica cannot take right now.

Under overload most requests are refused, so a refusal must cost next to nothing: here it costs
a path match and two attribute reads, where refusing inside the route paid for FastAPI's
routing, its dependencies and its exception handlers first (about twice as much per refusal).
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import ServiceError
from service.metrics import Metrics
from service.pipeline import Pipeline
from service.responses import service_error_response

TICKET = "ticket"
"""Where an admitted request finds its ticket in its state."""


class Admission:
    """Answers 503 (`overloaded` with Retry-After, or `not_ready`) for requests to
    `inference_routes` when the pipeline would refuse them anyway, before their body is read;
    an admitted request holds its ticket (service/budget.py) until it has been answered."""

    def __init__(self, app: ASGIApp, inference_routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.inference_routes = inference_routes

    def _inference_route(self, scope: Scope) -> BaseRoute | None:
        for route in self.inference_routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return route
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope.get("state", {})
        pipeline = state.get("pipeline")
        if scope["type"] == "http" and isinstance(pipeline, Pipeline):
            route = self._inference_route(scope)
            if route is not None:
                try:
                    ticket = pipeline.admit()
                except ServiceError as refusal:
                    scope["route"] = route  # so the request metrics name the route refused
                    metrics = state.get("metrics")
                    response = service_error_response(
                        refusal, metrics if isinstance(metrics, Metrics) else None
                    )
                    await response(scope, receive, send)
                    return
                state[TICKET] = ticket  # this request's copy of the state
                try:
                    await self.app(scope, receive, send)
                finally:
                    ticket.release()
                return
        await self.app(scope, receive, send)
