"""`vit-serve`: run the service with uvicorn, one worker (scale with replicas, not workers)."""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
import textwrap
from types import FrameType
from typing import Any, Literal, get_args, get_origin

import uvicorn
from fastapi import FastAPI
from pydantic import SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import NoDecode, SettingsError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model_contract.metadata import InvalidModelMetadata
from model_runtime.graph_check import inspect_model
from model_runtime.heap import map_large_allocations
from model_runtime.options import RuntimeOptions
from model_runtime.scheduling import favour_the_event_loop
from service.app import create_app
from service.http.malformed_requests import served_protocol
from service.observability.logs import configure_logging
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


LARGE_ALLOCATION_BYTES = 1024 * 1024
"""Buffers this large (request bodies, gRPC messages, batches) are mapped and unmapped on their
own, so what a burst of them took goes back to the system when it ends."""

FLAGS = ("model", "host", "port", "grpc_port")
"""The settings `vit-serve` also takes as flags: the ones a person starting it by hand changes."""

HELP_WIDTH = 79


def settings_help() -> str:
    """Every setting: the variable that sets it, its default and its docstring's first sentence,
    read from `Settings` so the help says what the code does (a secret's default is never
    shown)."""
    service = [(name, field) for name, field in Settings.model_fields.items() if name != "runtime"]
    engine = list(RuntimeOptions.model_fields.items())
    return "\n".join(
        [
            "settings (environment variables; service/settings.py says more):",
            *(line for name, field in service for line in _setting_lines(name, field)),
            "",
            "how the model runs (model_runtime/options.py says more):",
            *(line for name, field in engine for line in _setting_lines(name, field)),
        ]
    )


def variable(name: str) -> str:
    """The environment variable that sets the setting `name`."""
    return f"{Settings.model_config.get('env_prefix', '')}{name.upper()}"


def _setting_lines(name: str, field: FieldInfo) -> list[str]:
    choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else ()
    shown = f"{variable(name)}{_default(field)}"
    if choices:
        shown += f"  ({' | '.join(str(choice) for choice in choices)})"
    description = " ".join((field.description or "").split())
    first_sentence = re.split(r"(?<=\.)\s", description, maxsplit=1)[0]
    indent = " " * 6
    return [
        f"  {shown}",
        *textwrap.wrap(
            first_sentence,
            HELP_WIDTH,
            initial_indent=indent,
            subsequent_indent=indent,
            break_on_hyphens=False,
        ),
    ]


def _default(field: FieldInfo) -> str:
    """`=value` as the variable would be written, or why there is none to show."""
    if SecretStr in (field.annotation, *get_args(field.annotation)):
        return " (a secret: no default shown)"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return " (unset by default)"
    if isinstance(value, bool):
        return f"={str(value).lower()}"
    if isinstance(value, tuple | list) and NoDecode in field.metadata:
        return f"={','.join(value)}"  # read comma-separated
    if isinstance(value, tuple | list):
        return f"='{json.dumps(list(value))}'"  # lists are JSON
    if isinstance(value, float):
        return f"={value:g}"
    return f"={value}"


def flag_help(flag: str) -> str:
    default = Settings.model_fields[flag].get_default(call_default_factory=True)
    return f"instead of {variable(flag)} (default {default})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="vit-serve",
        description="Serve a self-describing ONNX ViT over HTTP and gRPC. Every setting is an\n"
        "environment variable (listed below); --model, --host, --port and --grpc-port take\n"
        "precedence over theirs.",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for flag in FLAGS:
        # `Settings` validates it
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, help=flag_help(flag))
    parser.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug")
    )
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {
        key: value for key in FLAGS if (value := getattr(args, key)) is not None
    }
    settings = settings_from(overrides)
    configure_logging(settings.log_format, args.log_level)
    if not settings.model.exists():
        sys.exit(f"vit-serve: {settings.model}: no such file or directory")
    if settings.model.is_file():  # a repository's versions are checked as they load
        try:
            inspect_model(settings.model)
        except InvalidModelMetadata as error:
            sys.exit(f"vit-serve: cannot serve {settings.model}: {error}")
    refuse_if_taken(settings.host, settings.port)
    if settings.grpc_port:
        refuse_if_taken(settings.host, settings.grpc_port)
    app = create_app(settings)
    config = uvicorn.Config(
        OneLineStartupFailure(app),
        host=settings.host,
        port=settings.port,
        workers=1,
        log_level=args.log_level,
        log_config=None,  # configured above, for uvicorn's loggers too
        access_log=settings.access_log,
        timeout_graceful_shutdown=settings.graceful_shutdown_s,
        http=served_protocol(settings),
        h11_max_incomplete_event_size=settings.max_head_bytes,
        loop=settings.event_loop,
        ws="none",  # HTTP only: an Upgrade: websocket request is answered as the request it is
    )
    server = DrainingServer(config, app)
    favour_the_event_loop()
    map_large_allocations(LARGE_ALLOCATION_BYTES)
    server.run()
    if server.warm_up_failed or not server.started:
        sys.exit(1)


if __name__ == "__main__":
    main()
