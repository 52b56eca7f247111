"""What a process handling untrusted input inherits of the server's environment."""

from __future__ import annotations

import pytest

from model_runtime.platform import child_environment


def test_only_what_python_and_its_libraries_need_is_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIT_API_TOKEN", "secret")
    monkeypatch.setenv("VIT_ADMIN_TOKEN", "secret")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    monkeypatch.setenv("PATH", "/usr/bin")
    passed = child_environment({"OMP_NUM_THREADS": "1"})
    assert passed["PATH"] == "/usr/bin" and passed["MALLOC_ARENA_MAX"] == "2"
    assert passed["OMP_NUM_THREADS"] == "1"
    assert "secret" not in "".join(passed.values())
