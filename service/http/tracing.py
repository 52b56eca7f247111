"""One server span per HTTP request, continuing the client's W3C trace (`traceparent`,
`tracestate`), with OpenTelemetry's HTTP attributes; installed only while tracing is on.
Probes and scrapes (NOT_TRACED) are machine traffic every few seconds, with nothing to follow:
they make no trace."""

from __future__ import annotations

import asyncio

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.http.middleware import UNMATCHED_ROUTE, method_label, model_label, route_label
from service.observability.tracing import Tracing

PROPAGATED = (b"traceparent", b"tracestate")
NOT_TRACED = frozenset({"/v2/health/live", "/v2/health/ready", "/metrics"})


class RequestTracing:
    """Outermost, so that every other middleware's work (admission, framing, the metrics with
    their exemplars) happens inside the request's span."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tracing = scope.get("state", {}).get("tracing")
        traced = scope["type"] == "http" and scope.get("path") not in NOT_TRACED
        if not traced or not isinstance(tracing, Tracing):
            await self.app(scope, receive, send)
            return
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope.get("headers", ())
            if name in PROPAGATED
        }
        parent = propagate.extract(carrier)
        method = method_label(scope)
        attributes: dict[str, str | int] = {
            "http.request.method": method if method != "other" else "_OTHER",
            "url.path": scope.get("path", ""),
            "url.scheme": scope.get("scheme", "http"),
            "network.protocol.version": scope.get("http_version", ""),
        }
        if scope.get("client"):
            attributes["client.address"], attributes["client.port"] = scope["client"]
        if scope.get("server"):
            attributes["server.address"], attributes["server.port"] = scope["server"]
        span = tracing.server_span(method, parent, attributes)
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        status: int | None = None

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        except asyncio.CancelledError:  # the client went away: not the server's fault
            span.set_attribute("error.type", "cancelled")
            raise
        except BaseException as error:
            span.record_exception(error)
            span.set_attribute("error.type", type(error).__qualname__)
            span.set_status(Status(StatusCode.ERROR))
            raise
        finally:
            route = route_label(scope)
            if route != UNMATCHED_ROUTE:
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
            if status is not None:
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
            model = model_label(scope)
            if model:
                span.set_attribute("vit.model.name", model)
            span.end()
            otel_context.detach(token)
