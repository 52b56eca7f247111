"""The README's Quickstart is true: its curl command, sent to the bundled model, gives the answer
it shows."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import DEFAULT_MODEL, ROOT
from tests.service_support import cpu_settings, ready_client

README = ROOT / "README.md"


def quickstart() -> tuple[list[str], dict[str, object]]:
    section = README.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"```sh\n(curl .*?)\n```", section)
    shown = re.search(r"```json\n(.*?)\n```", section, flags=re.DOTALL)
    assert command and shown, "the Quickstart shows a curl command and its answer"
    return shlex.split(command.group(1)), json.loads(shown.group(1))


def test_the_quickstart_command_gives_the_answer_shown() -> None:
    words, shown = quickstart()
    form = words[words.index("-F") + 1]
    field, path = form.split("=@", 1)
    url = urlsplit("http://" + words[-1])
    with ready_client(cpu_settings(DEFAULT_MODEL)) as client:
        data = (ROOT / path).read_bytes()
        # curl names the part after the file, without its folder
        files = {field: (Path(path).name, data)}
        answer = client.post(f"{url.path}?{url.query}", files=files).json()
    assert answer["model"] == shown["model"]
    got, expected = answer["predictions"], shown["predictions"]
    assert isinstance(expected, list) and len(got) == len(expected)
    for prediction, shown_prediction in zip(got, expected, strict=True):
        assert [t["label"] for t in prediction["top"]] == [
            t["label"] for t in shown_prediction["top"]
        ]
        for entry, shown_entry in zip(prediction["top"], shown_prediction["top"], strict=True):
            assert entry["probability"] == pytest.approx(shown_entry["probability"], abs=1e-6)
        assert {k: v for k, v in prediction.items() if k != "top"} == {
            k: v for k, v in shown_prediction.items() if k != "top"
        }
