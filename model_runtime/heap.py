"""The C library's heap, tuned where the process runs on glibc and given back to the system on
glibc and macOS (with another C library, such as musl, nothing changes)."""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
"""glibc's `mallopt` parameters."""

_LIBC = ctypes.CDLL(None)


def serve_from_heap(up_to: int) -> None:
    """Allocations up to `up_to` bytes come from the heap, which keeps up to twice that freed
    for the next ones, instead of glibc's default of mapping each allocation over 128 KiB on
    its own (adaptively up to 32 MiB) and unmapping it when freed."""
    mallopt = getattr(_LIBC, "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, up_to)
        mallopt(M_TRIM_THRESHOLD, 2 * up_to)


def map_large_allocations(from_bytes: int) -> None:
    """Allocations of `from_bytes` or more are mapped on their own and unmapped when freed,
    always. glibc's default raises that threshold after the first large buffer is freed (up to
    32 MiB), and from then on request bodies and messages come from per-thread heaps that keep
    their pages: a burst of large gRPC messages left the server ~1 GB larger for good."""
    mallopt = getattr(_LIBC, "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, from_bytes)


def give_back_free_memory() -> None:
    """Return the heap's free pages to the system (glibc's `malloc_trim`; on macOS,
    `malloc_zone_pressure_relief` over every zone): what the process's resident memory then
    shows is what it uses."""
    malloc_trim = getattr(_LIBC, "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)
        return
    pressure_relief = getattr(_LIBC, "malloc_zone_pressure_relief", None)
    if pressure_relief is not None:
        pressure_relief(None, ctypes.c_size_t(0))  # no zone: all of them; no goal: all it can
