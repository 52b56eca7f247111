"""`vit-predict` without a service to talk to: one line saying what to do, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from harness.servers import free_port
from tests.conftest import ROOT


def predict(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vit_tools.client", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_a_missing_file_is_one_line_and_a_failure(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jpg"
    result = predict(str(missing), "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stdout == f"{missing}\terror (unreadable_file): No such file or directory\n"


def test_a_service_that_is_not_running_is_one_line_saying_what_to_do(tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"\x89PNG\r\n\x1a\n")
    url = f"http://127.0.0.1:{free_port()}"
    result = predict(str(photo), "--url", url)
    assert result.returncode != 0 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"vit-predict: cannot reach the service at {url}")
    assert "make serve" in line
