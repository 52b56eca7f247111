"""`vit-serve --help`: every setting, with its variable, its default and one line, from
`Settings` itself; never a secret's value."""

from __future__ import annotations

import pytest

from model_runtime.options import RuntimeOptions
from service.cli import main
from service.settings import Settings

TOKENS = {"VIT_API_TOKEN": "api-token-value-9f2c", "VIT_ADMIN_TOKEN": "admin-token-value-41d7"}


@pytest.fixture
def help_text(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    """The help as an operator with both tokens set in the environment sees it."""
    for name, value in TOKENS.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def entry(help_text: str, variable: str) -> list[str]:
    """The help's lines for one variable: its own, then its description's."""
    lines = help_text.splitlines()
    (start,) = [i for i, line in enumerate(lines) if line.split("=")[0].split()[:1] == [variable]]
    end = start + 1
    while end < len(lines) and lines[end].startswith("      "):
        end += 1
    return [line.strip() for line in lines[start:end]]


def test_every_setting_is_listed_with_a_line_that_says_what_it_is(help_text: str) -> None:
    own = [(name, field) for name, field in Settings.model_fields.items() if name != "runtime"]
    for name, field in [*own, *RuntimeOptions.model_fields.items()]:
        lines = entry(help_text, f"VIT_{name.upper()}")
        assert field.description, f"{name} has no docstring"
        described = " ".join(lines[1:])
        assert described and " ".join(field.description.split()).startswith(described), name
        assert described.endswith("."), f"{name}: a whole sentence"


def test_defaults_are_shown_as_the_variable_would_be_written(help_text: str) -> None:
    assert entry(help_text, "VIT_PORT")[0] == "VIT_PORT=8000"
    assert entry(help_text, "VIT_MODEL")[0] == "VIT_MODEL=models/shapes-vit.onnx"
    assert entry(help_text, "VIT_ACCESS_LOG")[0] == "VIT_ACCESS_LOG=false"
    assert entry(help_text, "VIT_DECODE_TIMEOUT_S")[0] == "VIT_DECODE_TIMEOUT_S=2"
    assert entry(help_text, "VIT_PROVIDERS")[0] == (
        """VIT_PROVIDERS='["CUDAExecutionProvider", "CPUExecutionProvider"]'"""
    )
    assert entry(help_text, "VIT_MODEL_CONTROL")[0] == (
        "VIT_MODEL_CONTROL=none  (none | poll | explicit | on_demand)"
    )
    assert entry(help_text, "VIT_DEFAULT_MODEL")[0] == "VIT_DEFAULT_MODEL (unset by default)"
    assert "--port PORT" in help_text and "instead of VIT_PORT (default 8000)" in help_text


def test_no_secret_is_shown(help_text: str) -> None:
    secrets = [
        name
        for name, field in Settings.model_fields.items()
        if "SecretStr" in str(field.annotation)
    ]
    assert sorted(secrets) == ["admin_token", "api_token"]
    for name in secrets:
        assert entry(help_text, f"VIT_{name.upper()}")[0].endswith("(a secret: no default shown)")
    for value in TOKENS.values():
        assert value not in help_text
