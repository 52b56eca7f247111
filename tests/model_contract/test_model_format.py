"""docs/MODEL-FORMAT.md stays true: its JSON schema is the code's, and its by-hand stamping
example makes a file the service accepts."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from model_contract.metadata import ModelMetadata
from model_runtime.graph_check import inspect_model
from tests.conftest import ROOT
from tests.onnx_models import classifier

DOC = ROOT / "docs" / "MODEL-FORMAT.md"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_the_documented_schema_is_the_codes() -> None:
    (schema,) = code_blocks("json")
    assert json.loads(schema) == ModelMetadata.model_json_schema()


def test_the_stamping_example_makes_a_servable_file(tmp_path: Path) -> None:
    (example,) = code_blocks("python")
    classifier(tmp_path / "classifier.onnx", size=224, classes=3)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(example, "MODEL-FORMAT.md", "exec"), {})
    finally:
        os.chdir(cwd)
    metadata, graph = inspect_model(tmp_path / "flowers.onnx")
    assert metadata.labels == ("daisy", "rose", "tulip") and graph.output_width == 3
    assert metadata.preprocessing.resize_size == 256
