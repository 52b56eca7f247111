"""Admission control ahead of routing: refuse inference the replica cannot take right now.

Under overload most requests are refused, so a refusal must cost next to nothing: here it costs
a path match, a dictionary lookup for the model and two attribute reads, where refusing inside
the route paid for FastAPI's routing, its dependencies and its exception handlers first (about
twice as much per refusal). The model a request names is resolved here too, once: the request
is admitted to that pipeline, and stays with it even if a new version takes over meanwhile.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ServiceError
from service.http.responses import service_error_response
from service.inference.data_plane import DataPlane
from service.metrics import Metrics

ADMITTED = "admitted"
"""Where an admitted request finds what it was admitted to (service/inference/data_plane.py)."""


def authorization(scope: Scope) -> str | None:
    """The request's `Authorization` header, if it has one."""
    for key, value in scope.get("headers", ()):
        if key == b"authorization":
            return str(value.decode("latin-1"))
    return None


class Admission:
    """Answers 503 (`overloaded` with Retry-After, or `not_ready`), 404 (no such model) or 401
    (the inference token is required) for requests to `inference_routes` before their body is
    read; an admitted request holds its ticket (service/inference/budget.py) until its answer
    starts."""

    def __init__(self, app: ASGIApp, inference_routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.inference_routes = inference_routes

    def _inference_route(self, scope: Scope) -> tuple[BaseRoute, Scope] | None:
        for route in self.inference_routes:
            match, child = route.matches(scope)
            if match is Match.FULL:
                return route, child
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope.get("state", {})
        data_plane = state.get("data_plane")
        matched = self._inference_route(scope) if scope["type"] == "http" else None
        if matched is None or not isinstance(data_plane, DataPlane):
            await self.app(scope, receive, send)
            return
        route, child = matched
        params = child.get("path_params", {})
        try:
            admitted = await data_plane.admit(
                params.get("name"), params.get("version"), authorization(scope)
            )
        except ServiceError as refusal:
            scope["route"] = route  # so the request metrics name the route refused
            metrics = state.get("metrics")
            response = service_error_response(
                refusal, metrics if isinstance(metrics, Metrics) else None
            )
            await response(scope, receive, send)
            return
        state[ADMITTED] = admitted  # this request's copy of the state
        ticket = admitted.ticket

        async def send_releasing(message: Message) -> None:
            if message["type"] == "http.response.start":
                # Its work is done: a client that is slow to read its answer (or never reads
                # it) must not keep other requests' places.
                ticket.release()
            await send(message)

        try:
            await self.app(scope, receive, send_releasing)
        finally:
            ticket.release()
