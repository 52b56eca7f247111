"""The serving path never imports torch: checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

TORCH_FREE_MODULES = [
    "model_contract.decode",
    "model_contract.preprocess",
    "model_contract.metadata",
    "model_runtime.session",
    "service.errors",
    "model_export.evaluate",
    "model_export.shapes",
]


def test_serving_path_never_imports_torch() -> None:
    imports = "; ".join(f"import {module}" for module in TORCH_FREE_MODULES)
    heavy = "('torch', 'fastapi')"
    loaded = f"sorted(m for m in sys.modules if m.split('.')[0] in {heavy})"
    code = f"import sys; {imports}; print({loaded})"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_every_service_module_is_torch_free() -> None:
    modules = sorted(f"service.{path.stem}" for path in (ROOT / "service").glob("*.py"))
    code = "import sys, importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    code += "print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
