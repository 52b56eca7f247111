"""Every line the process logs as text (the default) or, with VIT_LOG_FORMAT=json, as one JSON
object: time, level, logger and message, the trace and span it belongs to when it belongs to a
traced request, and for uvicorn's access log the request's fields too. uvicorn's loggers go
through the same handler, so a log pipeline parses every line the same way."""

from __future__ import annotations

import json
import logging
import logging.config
from datetime import UTC, datetime
from typing import Any, Literal

from opentelemetry import trace

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ACCESS_FIELDS = ("client", "method", "path", "http_version", "status")
"""What uvicorn's access log passes as its record's arguments, in order."""


class JsonFormatter(logging.Formatter):
    """One JSON object a line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            entry["trace_id"] = trace.format_trace_id(context.trace_id)
            entry["span_id"] = trace.format_span_id(context.span_id)
        if record.name == "uvicorn.access" and isinstance(record.args, tuple):
            entry.update(zip(ACCESS_FIELDS, record.args, strict=False))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(log_format: LogFormat, level: str) -> None:
    """Log at `level` in `log_format`, this process's loggers and uvicorn's alike (uvicorn is
    then told not to configure its own: `uvicorn.Config(log_config=None)`)."""
    level = level.upper()
    formatter = {"()": JsonFormatter} if log_format == "json" else {"format": TEXT_FORMAT}
    handler = {"class": "logging.StreamHandler", "formatter": "line", "stream": "ext://sys.stderr"}
    quiet_access = {"handlers": ["stderr"], "level": "INFO", "propagate": False}
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {"line": formatter},
            "handlers": {"stderr": handler},
            "root": {"handlers": ["stderr"], "level": level},
            "loggers": {
                "uvicorn": {"handlers": ["stderr"], "level": level, "propagate": False},
                "uvicorn.error": {"level": level},
                "uvicorn.access": quiet_access,
            },
        }
    )
    logging.captureWarnings(True)  # a library's warning is a line like any other
