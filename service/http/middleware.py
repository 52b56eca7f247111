"""Per-request metrics as a pure ASGI middleware: count, time and track every request by method,
route template and status code."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.http.admission import ADMITTED
from service.inference.data_plane import Admitted
from service.metrics import Metrics

UNMATCHED_ROUTE = "unmatched"
"""The route label of a request no route took: a 404 from routing, or malformed HTTP refused
before routing (service/http/malformed_requests.py)."""
STATIC_ROUTE = "/static/{path}"
"""The route label of every file under /static/: one series for the page's and the docs' scripts
and styles, however many files there are."""
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "other"
"""The method label of a request whose method is none of METHODS, or was never parsed: clients
name methods, and each made-up one would otherwise be a series of its own."""


def method_label(scope: Scope) -> str:
    method = scope.get("method", "")
    return method if method in METHODS else OTHER_METHOD


def route_label(scope: Scope) -> str:
    """The template of the route that took the request, or `unmatched` where none did, however
    many different paths such requests have. FastAPI marks only its own routes in the scope: one
    it does not (its /openapi.json) is found by the endpoint that routing put there."""
    route = scope.get("route")
    if route is None and "endpoint" in scope:
        routes = getattr(scope.get("app"), "routes", ())
        route = next((r for r in routes if getattr(r, "endpoint", None) is scope["endpoint"]), None)
    template = getattr(route, "path", None)
    if not isinstance(template, str):
        return UNMATCHED_ROUTE
    return STATIC_ROUTE if template.startswith("/static/") else template


def model_label(scope: Scope) -> str:
    """The model a request was admitted to (service/http/admission.py), or "": the names come
    from the repository, never from the client."""
    admitted = scope.get("state", {}).get(ADMITTED)
    return admitted.pipeline.session.metadata.name if isinstance(admitted, Admitted) else ""


class RequestMetrics:
    """Counts requests by method, route template and status code, and times them by the model
    too; the app's metrics are found in the lifespan state, so the middleware holds no model
    object itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics = scope.get("state", {}).get("metrics")
        if scope["type"] != "http" or not isinstance(metrics, Metrics):
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            metrics.in_flight.dec()
            labels = (method_label(scope), route_label(scope), str(status))
            metrics.requests.labels(*labels).inc()
            metrics.request_seconds.labels(*labels, model_label(scope)).observe(
                time.perf_counter() - started, metrics.exemplar()
            )
