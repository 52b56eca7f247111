"""Workers forked from the launcher: none of the server in them, reaped when told, a launcher
that has gone started again, and nothing left running once the server has gone."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from model_contract.preprocess import PreprocessSpec, preprocess_upload
from model_runtime.decoding import launcher as launcher_module
from model_runtime.decoding.pool import Decoded, DecodeWorkers
from tests.conftest import ROOT
from tests.images import upload_variety

JPEG = upload_variety()["jpeg"][0]
SPEC = PreprocessSpec()
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads processes in /proc")


def pool(workers: int = 1) -> DecodeWorkers:
    return DecodeWorkers(
        workers=workers, max_pixels=40_000_000, memory_bytes=256 * 1024 * 1024, timeout_s=10.0
    )


def decode(workers: DecodeWorkers, data: bytes) -> Decoded:
    return asyncio.run(workers.decode(data, SPEC, on_replaced=lambda why: None))


def alive(pid: int) -> bool:
    """Running, or dead and not reaped (a zombie counts: its id is still taken)."""
    return Path(f"/proc/{pid}").exists()


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_a_worker_holds_none_of_the_servers_modules() -> None:
    """The server has onnxruntime loaded; a worker, forked from the launcher, does not (a
    worker forked from the server, or one that re-ran its entry point, would)."""
    import onnxruntime  # noqa: F401  (what a server holds)

    started = pool()
    started.start()
    try:
        (pid,) = started.pids()
        assert parent_of(pid) != os.getpid()
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "onnxruntime" not in maps
        assert "PIL" in maps or "_imaging" in maps  # Pillow came with the fork
    finally:
        started.close()


def test_closed_workers_are_reaped_not_left_as_zombies() -> None:
    started = pool(workers=2)
    started.start()
    pids = started.pids()
    decode(started, JPEG)
    started.close()
    assert pids and not any(alive(pid) for pid in pids)


def test_a_launcher_that_has_gone_is_started_again() -> None:
    first = pool()
    first.start()
    first.close()
    pid = launcher_module.launcher().pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    second = pool()
    second.start()
    try:
        decoded = decode(second, JPEG)
        np.testing.assert_array_equal(decoded.tensor, preprocess_upload(JPEG, SPEC)[0])
        assert launcher_module.launcher().pid not in (None, pid)
    finally:
        second.close()


def test_workers_and_launcher_end_when_the_server_is_killed(tmp_path: Path) -> None:
    """A server killed outright (no cleanup at all) leaves no decoding process behind."""
    program = (
        "import os, sys\n"
        "from model_runtime.decoding import launcher\n"
        "from model_runtime.decoding.pool import Decoded, DecodeWorkers\n"
        "pool = DecodeWorkers(workers=2, max_pixels=10**7, memory_bytes=2**28, timeout_s=5.0)\n"
        "pool.start()\n"
        "print(*pool.pids(), launcher.launcher().pid, flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    pids = [int(pid) for pid in done.stdout.split()]
    assert len(pids) == 3, done.stderr
    deadline = time.monotonic() + 10
    while any(alive(pid) and parent_of(pid) != 1 for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    # Reparented orphans that have exited are reaped by init; none may still run.
    running = [pid for pid in pids if alive(pid) and "Z" not in _state(pid)]
    assert running == []


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def test_workers_get_none_of_the_servers_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoder that a crafted image took over finds no token in its environment."""
    monkeypatch.setenv("VIT_API_TOKEN", "api-secret-value")
    monkeypatch.setenv("VIT_ADMIN_TOKEN", "admin-secret-value")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer collector-secret")
    launcher_module.launcher().close()  # the next launcher starts with this environment
    started = pool()
    started.start()
    try:
        (pid,) = started.pids()
        environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        names = {entry.split(b"=", 1)[0] for entry in environment if entry}
        assert b"PATH" in names
        assert not names & {b"VIT_API_TOKEN", b"VIT_ADMIN_TOKEN", b"OTEL_EXPORTER_OTLP_HEADERS"}
        assert b"secret" not in b"\0".join(environment)
    finally:
        started.close()


def test_a_pool_whose_launcher_died_still_closes_at_once() -> None:
    """Its workers belong to a launcher that is gone: they are killed through their pidfds and
    left to init, never waited for by the new launcher (which never forked them)."""
    first = pool()
    first.start()
    pid = launcher_module.launcher().pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    second = pool()
    second.start()  # a new launcher
    try:
        closing = threading.Thread(target=first.close, daemon=True)
        closing.start()
        closing.join(10)
        assert not closing.is_alive(), "closing waited on a worker the new launcher never forked"
    finally:
        second.close()
