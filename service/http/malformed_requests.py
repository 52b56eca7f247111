"""Malformed HTTP (a bad chunk size, Content-Length beside chunked encoding, a byte a header may
not hold) answered as every other bad request is: a JSON error, counted in the metrics.

uvicorn refuses such requests itself, before any application code runs, with a plain-text 400
that neither the clients' error handling nor the metrics see."""

from __future__ import annotations

import json
from typing import Any

from service.errors import InvalidRequest
from service.http.middleware import UNMATCHED_ROUTE
from service.http.slow_clients import HttpParser, head_deadline_protocol
from service.metrics import Metrics


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
            metrics.requests.labels(UNMATCHED_ROUTE, "400").inc()
            metrics.rejections.labels(InvalidRequest.type).inc()


def served_protocol(
    head_timeout_s: float, parser: HttpParser, max_head_bytes: int
) -> type:
    """uvicorn's protocol for `parser` as the service runs it, for `uvicorn.Config(http=...)`:
    the head bounds (service/http/slow_clients.py) and malformed requests answered in JSON."""
    base = head_deadline_protocol(head_timeout_s, parser, max_head_bytes)
    return type(f"JsonBadRequest{base.__name__}", (_JsonBadRequest, base), {})
