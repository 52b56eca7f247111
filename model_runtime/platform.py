"""What the operating system offers the service beyond POSIX: Linux's mechanisms, the equivalent
used where one is missing (macOS), and one logged line for each protection that has none."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

STATM = Path("/proc/self/statm")

_said: set[str] = set()
"""The missing protections this process has logged."""


def missing_protection(message: str) -> None:
    """Log `message`, a protection this platform lacks and what follows from it, once per
    process: every model version starts decoding workers of its own."""
    if message not in _said:
        _said.add(message)
        logger.warning("%s", message)


def enforces_memory_limits() -> bool:
    """Whether the kernel holds a process to its `RLIMIT_AS`: Linux does; macOS accepts the
    limit and ignores it."""
    return sys.platform == "linux"


def usable_cpu_count() -> int:
    """The cores this process may run on: its affinity mask on Linux (a container's cpuset);
    every core on macOS, which has no affinity to restrict a process."""
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        return max(1, len(affinity(0)))
    return os.cpu_count() or 1


def resident_bytes() -> int:
    """This process's resident memory now: from /proc on Linux, from `ps` where there is no
    /proc (macOS; a few milliseconds, asked only around a model's load)."""
    if STATM.exists():
        return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    ps = ["ps", "-o", "rss=", "-p", str(os.getpid())]
    done = subprocess.run(ps, capture_output=True, text=True, check=True, timeout=10)
    return int(done.stdout) * 1024  # ps counts KiB


CHILD_VARIABLES = frozenset(
    {"PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "TMP", "TEMP", "SYSTEMROOT"}
    | {"PYTHONPATH", "PYTHONHOME", "PYTHONDONTWRITEBYTECODE", "PYTHONSAFEPATH", "VIRTUAL_ENV"}
    | {"LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH"}
)
CHILD_PREFIXES = ("MALLOC_", "OMP_", "OPENBLAS_", "MKL_", "ORT_")
"""What a process of ours that handles untrusted input (a decoding worker, a model file's load
check) inherits of the server's environment: how to find Python and its libraries, the locale,
the allocator's and the math libraries' tuning. Never the rest: the server's tokens
(VIT_API_TOKEN, VIT_ADMIN_TOKEN), a collector's headers (OTEL_EXPORTER_OTLP_HEADERS) or
anything else a compromised decoder could read from its own environment."""


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a process that handles untrusted input, plus `extra`."""
    kept = {
        name: value
        for name, value in os.environ.items()
        if name in CHILD_VARIABLES or name.startswith(CHILD_PREFIXES)
    }
    return {**kept, **(extra or {})}
