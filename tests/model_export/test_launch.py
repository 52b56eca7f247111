"""Commands whose optional extra is not installed say which to install, in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

EXPORT = "from model_export.launch import export; export()"
TRAIN = "from model_export.launch import train; train()"
IMPORT = "from model_export.importer import main; main(['hf', 'x', '-o', 'y.onnx'])"


@pytest.mark.parametrize(
    ("missing", "call", "says"),
    [
        ("torch", EXPORT, "vit-export: needs the 'export' extra (torch is not installed)"),
        ("torch", TRAIN, "vit-train: needs the 'export' extra (torch is not installed)"),
        ("onnx", IMPORT, "vit-import: needs the 'import' extra (onnx is not installed)"),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(missing: str, call: str, says: str) -> None:
    code = f"import sys; sys.modules[{missing!r}] = None; sys.argv[1:] = ['--help']; {call}"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(says) and line.endswith("]'"), line
