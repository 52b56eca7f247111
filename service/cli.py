"""`vit-serve`: run the service with uvicorn, one worker (scale with replicas, not workers)."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError
from pydantic_settings import SettingsError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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


class OneLineStartupFailure:
    """The app, with a failed startup reported in one line: Starlette hands uvicorn the whole
    traceback of what failed (a model that does not load, CUDA required and absent), which
    uvicorn logs; its last line says what the operator needs to know."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_one_line(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed" and message.get("message"):
                last = message["message"].strip().splitlines()[-1]
                _, _, reason = last.partition(": ")  # after the exception's qualified name
                message = {**message, "message": f"vit-serve: cannot start: {reason or last}"}
            await send(message)

        await self.app(scope, receive, send_one_line)


def settings_from(overrides: dict[str, Any]) -> Settings:
    """The settings (flags over VIT_* variables over defaults), or exit with one line per
    wrong value."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        wrong = "; ".join(
            f"VIT_{'_'.join(str(part) for part in e['loc']).upper()}={e['input']!r}: {e['msg']}"
            for e in error.errors()
        )
        sys.exit(f"vit-serve: {wrong}")
    except SettingsError as error:  # a value that must be JSON is not
        example = "VIT_PROVIDERS='[\"CPUExecutionProvider\"]'"
        sys.exit(f"vit-serve: {error} (lists are JSON, e.g. {example})")


def refuse_if_taken(host: str, port: int) -> None:
    """Exit with one line if the address is taken, before any model loads (which can take
    a minute), not after."""
    try:
        with socket.create_server((host, port), reuse_port=False):
            pass
    except OSError as error:
        sys.exit(f"vit-serve: cannot listen on {host}:{port}: {error.strerror}")


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
    parser.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug")
    )
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {
        key: value for key in ("model", "host", "port") if (value := getattr(args, key)) is not None
    }
    settings = settings_from(overrides)
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
    refuse_if_taken(settings.host, settings.port)
    app = create_app(settings)
    config = uvicorn.Config(
        OneLineStartupFailure(app),
        host=settings.host,
        port=settings.port,
        workers=1,
        log_level=args.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=settings.graceful_shutdown_s,
        http=served_protocol(settings),
        h11_max_incomplete_event_size=settings.max_head_bytes,
        loop=settings.event_loop,
        ws="none",  # HTTP only: an Upgrade: websocket request is answered as the request it is
    )
    server = DrainingServer(config, app)
    favour_the_event_loop()
    server.run()
    if server.warm_up_failed or not server.started:
        sys.exit(1)


if __name__ == "__main__":
    main()
