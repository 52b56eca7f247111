"""The layers of docs/ARCHITECTURE.md, checked over every module of every package: each imports
only the layers below it, so the model tools run without the server and the server's runtime
without its fronts."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT

PRODUCT = ("model_contract", "model_runtime", "model_export", "vit_tools", "service")
"""The packages users install; everything else is there to test or measure them."""

ALLOWED: dict[str, set[str]] = {
    "model_contract": set(),
    "model_runtime": {"model_contract"},
    "model_export": {"model_contract", "model_runtime"},
    "vit_tools": {"model_contract", "model_runtime"},
    "service": {"model_contract", "model_runtime"},
    "service.errors": {"model_contract", "model_runtime"},
    "service.settings": {"model_contract", "model_runtime"},
    "service.metrics": {"model_contract", "model_runtime"},
    "service.observability": {
        "model_contract",
        "model_runtime",
        "service.errors",
        "service.metrics",
        "service.settings",
    },
    "service.inference": {
        "model_contract",
        "model_runtime",
        "service.errors",
        "service.metrics",
        "service.observability",
        "service.settings",
    },
    "service.http": {
        "model_contract",
        "model_runtime",
        "service.errors",
        "service.metrics",
        "service.observability",
        "service.settings",
        "service.inference",
    },
    "service.grpc": {
        "model_contract",
        "model_runtime",
        "service.errors",
        "service.metrics",
        "service.observability",
        "service.settings",
        "service.inference",
    },
    "service.app": {"model_contract", "model_runtime", "service"},
    "service.cli": {"model_contract", "model_runtime", "service"},
    "harness": {"model_contract", "model_runtime", "model_export", "vit_tools"},
    "benchmarks": {"model_contract", "model_runtime", "model_export", "vit_tools", "harness"},
}
"""Each layer and the layers it may import, by dotted prefix; a layer always imports itself. The
support package and the benchmarks run the server as users do, as a process of its own, and
speak to it as clients do: they import nothing of it."""

OURS = (*PRODUCT, "harness", "benchmarks", "tests")
"""Every package of the repository; the tests, last, may import any of the others."""


def layer_of(module: str) -> str | None:
    """The longest layer that names `module` or one of its parents."""
    names = [layer for layer in ALLOWED if module == layer or module.startswith(layer + ".")]
    return max(names, key=len) if names else None


def modules() -> Iterator[tuple[str, Path]]:
    for package in OURS[:-1]:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def imported(path: Path, module: str) -> Iterator[str]:
    """Every module of ours that `path` imports, at any depth of its code."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base]
        else:
            continue
        yield from (name for name in names if name.split(".")[0] in OURS)


def allowed(importer: str, target: str) -> bool:
    layer = layer_of(importer)
    assert layer is not None, f"{importer} belongs to no layer of docs/ARCHITECTURE.md"
    below = ALLOWED[layer] | {layer}
    return any(target == name or target.startswith(name + ".") for name in below)


@pytest.mark.parametrize(("module", "path"), list(modules()), ids=lambda value: str(value))
def test_every_module_imports_only_the_layers_below_it(module: str, path: Path) -> None:
    wrong = [target for target in imported(path, module) if not allowed(module, target)]
    assert not wrong, f"{module} imports {wrong}, above or beside its layer"
