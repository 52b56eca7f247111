"""Per-request metrics as a pure ASGI middleware: count, time and track every request by route."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics

UNMATCHED_ROUTE = "unmatched"
"""The route label of a request no route received."""


class RequestMetrics:
    """Counts requests by route template and status, and times them; the app's metrics are
    found in the lifespan state, so the middleware holds no model object itself."""

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
            route = scope.get("route")
            template = getattr(route, "path", UNMATCHED_ROUTE)
            metrics.requests.labels(template, str(status)).inc()
            metrics.request_seconds.labels(template).observe(time.perf_counter() - started)
