"""The service where Linux's mechanisms are missing (macOS), each absence simulated here: the
equivalent it uses instead, or the one line it logs for a protection it cannot have."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from model_runtime import heap, platform
from model_runtime.session import default_thread_count

MIB = 1024 * 1024


def test_without_an_affinity_mask_every_core_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    if hasattr(os, "sched_getaffinity"):
        assert default_thread_count() == len(os.sched_getaffinity(0))
        monkeypatch.delattr(os, "sched_getaffinity")
    assert default_thread_count() == os.cpu_count()


@pytest.mark.skipif(shutil.which("ps") is None, reason="no ps here")
def test_without_proc_resident_memory_comes_from_ps(monkeypatch: pytest.MonkeyPatch) -> None:
    from_proc = platform.resident_bytes() if platform.STATM.exists() else None
    monkeypatch.setattr(platform, "STATM", Path("/nonexistent/statm"))
    before = platform.resident_bytes()
    held = b"\x01" * (128 * MIB)  # written, so resident
    grown = platform.resident_bytes() - before
    assert 120 * MIB <= grown <= 140 * MIB, grown
    del held
    if from_proc is not None:
        assert abs(platform.resident_bytes() - from_proc) < 16 * MIB


def test_a_missing_protection_is_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(platform, "_said", set())
    with caplog.at_level(logging.WARNING):
        for _ in range(3):  # e.g. three model versions, each starting its decoding workers
            platform.missing_protection("no limit here: what follows")
    assert [record.getMessage() for record in caplog.records] == ["no limit here: what follows"]


BATCH_WORK = """
import logging, os, sys
sys.platform = {platform!r}
logging.basicConfig(format="%(name)s: %(message)s")
from model_runtime.scheduling import favour_the_event_loop, run_as_batch_work
favour_the_event_loop()
before = os.nice(0)
run_as_batch_work(5)
print(os.nice(0) - before)
"""


def batch_work(as_platform: str) -> tuple[int, list[str]]:
    """How much `run_as_batch_work(5)` raised the calling thread's niceness, and what the
    server's startup logged, in a process that takes itself for `as_platform`."""
    probe = BATCH_WORK.format(platform=as_platform)
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    lines = [line for line in done.stderr.splitlines() if "model_runtime" in line]
    return int(done.stdout), lines


@pytest.mark.skipif(sys.platform != "linux", reason="the comparison needs Linux's SCHED_BATCH")
def test_where_threads_cannot_be_batch_work_the_process_keeps_its_priority_and_says_so() -> None:
    # os.nice would lower the whole process there, the event loop with it: left as it is.
    raised, logged = batch_work("darwin")
    assert raised == 0
    assert len(logged) == 1
    assert "not batch work on darwin" in logged[0] and "SCHED_BATCH" in logged[0]
    raised, logged = batch_work("linux")
    assert raised == 5
    assert not any("not batch work" in line for line in logged)


class _MacLibc:
    """A C library with macOS's malloc entry points and not glibc's."""

    def __init__(self) -> None:
        self.relieved: list[tuple[object, int]] = []

    def malloc_zone_pressure_relief(self, zone: object, goal: ctypes.c_size_t) -> int:
        self.relieved.append((zone, goal.value))
        return 0


def test_without_glibc_free_memory_goes_back_through_macos_malloc_zones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    libc = _MacLibc()
    monkeypatch.setattr(heap, "_LIBC", libc)
    heap.serve_from_heap(32 * MIB)  # no mallopt there: nothing to tune, and no error
    heap.give_back_free_memory()
    assert libc.relieved == [(None, 0)]  # every zone, as much as each can give
