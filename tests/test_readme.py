"""The README's Quickstart is true: its curl command, sent to the bundled model, gives the answer
it shows."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from harness.servers import served
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


def test_the_near_duplicate_example_prints_what_it_shows() -> None:
    readme = README.read_text()
    section = readme.split("### Near-duplicates from embeddings", 1)[1].split("\n### ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)
    shown = re.search(r"```text\n(.*?)```", section, flags=re.DOTALL)
    assert code and shown, "the section shows the code and what it prints"
    example = code.group(1)
    assert "http://127.0.0.1:8000" in example
    with served(DEFAULT_MODEL, ROOT) as server:
        ran = subprocess.run(
            [sys.executable, "-c", example.replace("http://127.0.0.1:8000", server.url)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert ran.returncode == 0, ran.stderr
    printed = dict(line.split() for line in ran.stdout.splitlines())
    expected = dict(line.split() for line in shown.group(1).splitlines())
    assert printed.keys() == expected.keys()
    for name, similarity in expected.items():
        assert float(printed[name]) == pytest.approx(float(similarity), abs=0.01), name
    # The copy of star.jpg is nearest its original.
    assert max(printed, key=lambda name: float(printed[name])) == "star.jpg"
