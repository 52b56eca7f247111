"""VIT_LOG_FORMAT=json: every line the server writes, uvicorn's and the access log included, is
one JSON object, with the trace and span of the request it belongs to; text stays the default."""

from __future__ import annotations

import json
import logging
import re
import secrets
import sys
import urllib.error
import urllib.request
from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider

from harness.otlp_receiver import otlp_receiver
from harness.servers import served
from service.observability.logs import JsonFormatter
from tests.conftest import ROOT

TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: "
)


def send(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def test_every_line_is_one_json_object_with_the_requests_trace(served_model: Path) -> None:
    trace_id = secrets.token_hex(16)
    header = f"00-{trace_id}-{secrets.token_hex(8)}-01"
    photo = (ROOT / "examples" / "star.jpg").read_bytes()
    with otlp_receiver() as (endpoint, _):
        environment = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
        with served(
            served_model, ROOT, environment=environment, log_format="json", access_log="true"
        ) as server:
            jpeg = {"Content-Type": "image/jpeg", "traceparent": header}
            assert send(server.url + "/v1/classify", photo, jpeg) == 200
            assert send(server.url + "/v1/classify", b"not an image", jpeg) == 415
            assert send(server.url + "/no/such/route") == 404
            output = server.output()
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) > 5
    entries = [json.loads(line) for line in lines]  # every line, or this raises
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry), entry
    loggers = {entry["logger"] for entry in entries}
    assert {"uvicorn.error", "uvicorn.access"} <= loggers
    assert any(name.startswith("service.") for name in loggers)
    access = [
        e for e in entries if e["logger"] == "uvicorn.access" and e.get("path") == "/v1/classify"
    ]
    assert [e["status"] for e in access] == [200, 415]
    assert all(e["trace_id"] == trace_id and len(e["span_id"]) == 16 for e in access)


def test_text_stays_the_default(served_model: Path) -> None:
    with served(served_model, ROOT) as server:
        output = server.output()
    ours = [line for line in output.splitlines() if " service." in line]
    assert ours and all(TEXT_LINE.match(line) for line in ours), ours[:3]


def test_a_line_carries_its_exception_and_the_current_span() -> None:
    tracer = TracerProvider().get_tracer("test")
    formatter = JsonFormatter()
    try:
        raise ValueError("broken")
    except ValueError:
        record = logging.LogRecord(
            "service.x", logging.ERROR, __file__, 1, "failed %s", ("a",), sys.exc_info()
        )
    with tracer.start_as_current_span("request") as span:
        entry = json.loads(formatter.format(record))
        context = span.get_span_context()
    assert entry["message"] == "failed a" and entry["level"] == "ERROR"
    assert entry["trace_id"] == f"{context.trace_id:032x}"
    assert entry["span_id"] == f"{context.span_id:016x}"
    assert "ValueError: broken" in entry["exception"]
    assert "trace_id" not in json.loads(formatter.format(record))  # outside any span
