"""`vit-serve`: run the service with uvicorn, one worker (scale with replicas, not workers)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import uvicorn

from service.app import create_app
from service.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="vit-serve",
        description="Serve a self-describing ONNX ViT over HTTP. "
        "Every option is also an environment variable (VIT_MODEL, VIT_HOST, VIT_PORT, ...).",
    )
    parser.add_argument("--model", type=Path, help="ONNX file (default models/shapes-vit.onnx)")
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
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        workers=1,
        log_level=args.log_level,
        timeout_graceful_shutdown=settings.graceful_shutdown_s,
    )


if __name__ == "__main__":
    main()
