"""`vit-serve`: run the service with uvicorn, one worker (scale with replicas, not workers)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from model_contract.metadata import InvalidModelMetadata
from service.app import create_app
from service.http.malformed_requests import served_protocol
from service.runtime.graph_check import inspect_model
from service.runtime.scheduling import favour_the_event_loop
from service.settings import Settings


class DrainingServer(uvicorn.Server):
    """uvicorn, except that SIGTERM first turns readiness false, then drains as usual, and a
    failed warm-up stops it."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app
        app.state.stop_server = self.stop

    def stop(self) -> None:
        self.warm_up_failed = True
        self.should_exit = True

    warm_up_failed = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        registry = getattr(self.app.state, "registry", None)
        if registry is not None:
            registry.draining = True
        super().handle_exit(sig, frame)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="vit-serve",
        description="Serve a self-describing ONNX ViT over HTTP. "
        "Every option is also an environment variable (VIT_MODEL, VIT_HOST, VIT_PORT, ...).",
    )
    parser.add_argument(
        "--model",
        type=Path,
        help="ONNX file or model repository directory (default models/shapes-vit.onnx)",
    )
    parser.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {
        key: value for key in ("model", "host", "port") if (value := getattr(args, key)) is not None
    }
    settings = Settings(**overrides)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not settings.model.exists():
        sys.exit(f"vit-serve: {settings.model}: no such file or directory")
    if settings.model.is_file():  # a repository's versions are checked as they load
        try:
            inspect_model(settings.model)
        except InvalidModelMetadata as error:
            sys.exit(f"vit-serve: cannot serve {settings.model}: {error}")
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        log_level=args.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=settings.graceful_shutdown_s,
        http=served_protocol(settings.head_timeout_s, settings.http_parser),
        loop=settings.event_loop,
    )
    server = DrainingServer(config, app)
    favour_the_event_loop()
    server.run()
    if server.warm_up_failed or not server.started:
        sys.exit(1)


if __name__ == "__main__":
    main()
