"""A watch on a real server while something is done to it: its peak resident memory, its health
answers as a kubelet would time them, and an ordinary client's statuses beside it."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from harness.servers import Server

MEMORY_BUDGET = 1024 * 1024 * 1024  # the default Deployment's limit (docs/RELIABILITY.md)
HEALTH_MEDIAN_S = 0.1
HEALTH_WORST_S = 2.0
"""Loose: the suite shares two cores with the attack's own clients (40 threads pushing 760 MB
through loopback); benchmarks/attacks.py measures the real figures. The liveness probe gives
up after 3 s."""
HEALTH_PROBE = """
import json, select, sys, time, urllib.request
seconds, failures = [], 0
while not seconds or not select.select([sys.stdin], [], [], 0.05)[0]:
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(sys.argv[1] + "/v2/health/live", timeout=5) as answer:
            failures += answer.status != 200
    except OSError:
        failures += 1
    seconds.append(time.perf_counter() - started)
    if len(seconds) == 1:
        print("probing", flush=True)
print(json.dumps({"seconds": seconds, "failures": failures}))
"""
"""Health is probed from a process of its own, like a kubelet: the attack's 40 client threads
hold this process's interpreter lock, and a probe thread beside them would time the wait for
that lock, not the server. The watch starts once the probe has had its first answer, so an
attack over before the probe's interpreter would have started is watched all the same."""


def resident_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (the decoding workers)."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                pending.extend(int(child) for child in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue  # a worker replaced while we looked
    return total


@dataclass
class Watch:
    """While an attack runs: peak resident memory, health latencies, ordinary clients' statuses."""

    server: Server
    ordinary_image: bytes
    peak_bytes: int = 0
    health_seconds: list[float] = field(default_factory=list)
    health_failures: int = 0
    ordinary: list[int] = field(default_factory=list)
    ordinary_seconds: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Watch:
        self._probe = subprocess.Popen(
            [sys.executable, "-c", HEALTH_PROBE, self.server.url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._probe.stdout is not None
        assert self._probe.stdout.readline().strip() == "probing"
        self._threads = [
            threading.Thread(target=self._memory),
            threading.Thread(target=self._ordinary),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        deadline = time.monotonic() + 10  # an attack refused at once still sees one answer
        while not self.ordinary and time.monotonic() < deadline:
            time.sleep(0.02)
        self._stop.set()
        for thread in self._threads:
            thread.join()
        probed = json.loads(self._probe.communicate("stop", timeout=30)[0].strip())
        self.health_seconds, self.health_failures = probed["seconds"], probed["failures"]

    def _memory(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, resident_bytes(self.server.process.pid))
            time.sleep(0.02)

    def _ordinary(self) -> None:
        with httpx.Client(base_url=self.server.url, timeout=30) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                response = client.post(
                    "/v1/classify",
                    content=self.ordinary_image,
                    headers={"content-type": "image/jpeg"},
                )
                self.ordinary_seconds.append(time.perf_counter() - started)
                self.ordinary.append(response.status_code)
                time.sleep(0.05)

    def check(self) -> None:
        assert self.peak_bytes < MEMORY_BUDGET, f"peak resident {self.peak_bytes / 2**20:.0f} MiB"
        assert self.health_failures == 0 and self.health_seconds
        assert statistics.median(self.health_seconds) < HEALTH_MEDIAN_S
        assert max(self.health_seconds) < HEALTH_WORST_S
        assert self.ordinary and set(self.ordinary) == {200}, self.ordinary


def metric(server: Server, name: str, **labels: str) -> float:
    """The sum of the series of `name` that carry `labels`, as `sum(name{labels})` reads it."""
    text = httpx.get(f"{server.url}/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )
