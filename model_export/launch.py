"""The commands that need an optional extra, launched so that a missing one is a line saying
which extra to install, not a traceback (`make serve` installs the service alone)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

OPTIONAL = frozenset({"torch", "onnx", "onnxscript", "tqdm", "transformers"})
"""The top-level packages the export and import extras bring."""


def needs_extra(error: ModuleNotFoundError, command: str, extra: str) -> str | None:
    """The line to exit with when `error` is an optional package missing, else None."""
    missing = (error.name or "").split(".")[0]
    if missing not in OPTIONAL:
        return None
    return (
        f"{command}: needs the {extra!r} extra ({missing} is not installed): "
        f"pip install -e '.[{extra}]'"
    )


def _launch(module: str, command: str, extra: str) -> None:
    try:
        main: Callable[[], None] = importlib.import_module(module).main
    except ModuleNotFoundError as error:
        line = needs_extra(error, command, extra)
        if line is None:
            raise
        sys.exit(line)
    main()


def export() -> None:
    _launch("model_export.export", "vit-export", "export")


def train() -> None:
    _launch("model_export.train", "vit-train", "export")
