"""Malformed HTTP (a bad chunk size, Content-Length beside chunked encoding, a byte a header may
not hold) answered as every other bad request is: a JSON error, counted in the metrics.

uvicorn refuses such requests itself, before any application code runs, with a plain-text 400
that neither the clients' error handling nor the metrics see."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import InvalidRequest
from service.http.middleware import OTHER_METHOD, UNMATCHED_ROUTE
from service.http.responses import service_error_response
from service.http.slow_clients import head_deadline_protocol
from service.metrics import Metrics
from service.settings import Settings


class _JsonBadRequest:
    """For a uvicorn protocol class, which has `transport` and the lifespan's `app_state`."""

    transport: Any
    app_state: dict[str, Any]

    def send_400_response(self, msg: str) -> None:
        error = {"error": f"malformed HTTP request: {msg}", "type": InvalidRequest.type}
        body = json.dumps(error, separators=(",", ":")).encode()
        head = (
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        )
        self.transport.write(head + body)
        self.transport.close()
        metrics = self.app_state.get("metrics")
        if isinstance(metrics, Metrics):
            metrics.requests.labels(OTHER_METHOD, UNMATCHED_ROUTE, "400").inc()
            metrics.rejections.labels(InvalidRequest.type).inc()


class RequestFraming:
    """What h11 lets through, refused or made safe at the ASGI level: a request with both
    Content-Length and Transfer-Encoding (which a proxy in front may frame otherwise, and so
    smuggle a request past it) is a JSON 400 that closes the connection (httptools refuses it
    itself); and an answer to an `Expect: 100-continue` request given before its body was asked
    for closes the connection too, since the client may never send that body and its next
    request would be read as it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name: value.lower() for name, value in scope["headers"]}
        if b"content-length" in headers and b"transfer-encoding" in headers:
            metrics = scope.get("state", {}).get("metrics")
            refusal = InvalidRequest(
                "malformed HTTP request: Content-Length beside Transfer-Encoding (RFC 9112, 6.3)"
            )
            response = service_error_response(
                refusal, metrics if isinstance(metrics, Metrics) else None
            )
            response.headers["connection"] = "close"
            await response(scope, receive, send)
            return
        if headers.get(b"expect") != b"100-continue":
            await self.app(scope, receive, send)
            return
        body_asked = False

        async def receive_noting() -> Message:
            nonlocal body_asked
            body_asked = True
            return await receive()

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and not body_asked:
                closing = [*message.get("headers", []), (b"connection", b"close")]
                message = {**message, "headers": closing}
            await send(message)

        await self.app(scope, receive_noting, send_closing)


def served_protocol(settings: Settings) -> type:
    """uvicorn's protocol as the service runs it, for `uvicorn.Config(http=...)`: the head
    bounds (service/http/slow_clients.py) and malformed requests answered in JSON."""
    base = head_deadline_protocol(
        settings.head_timeout_s,
        settings.http_parser,
        settings.max_head_bytes,
        settings.max_pipelined_requests,
    )
    return type(f"JsonBadRequest{base.__name__}", (_JsonBadRequest, base), {})
