"""Load from `hey` (Go; Debian's `hey` package): a closed loop whose own cost on the shared
cores is a fraction of the Python load generator's (at 16 clients on 2 cores the service
answered ~35% more requests under `hey` than under `vit_tools.bench`), so the server, not the
client, is what is measured. It sends one body, over and over."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import tempfile

from vit_tools.bench import Report, percentile


def available() -> bool:
    return shutil.which("hey") is not None


def hey_load(
    url: str, body: bytes, *, concurrency: int, seconds: float, content_type: str = "image/jpeg"
) -> Report:
    """`concurrency` clients POSTing `body` to `url` for `seconds`, as one Report."""
    with tempfile.NamedTemporaryFile(suffix=".body") as file:
        file.write(body)
        file.flush()
        command = [
            "hey", "-z", f"{seconds}s", "-c", str(concurrency), "-m", "POST",
            "-T", content_type, "-D", file.name, "-o", "csv", url,
        ]  # fmt: skip
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    rows = list(csv.DictReader(io.StringIO(output)))
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[row["status-code"]] = statuses.get(row["status-code"], 0) + 1
    latencies = [float(row["response-time"]) * 1000 for row in rows]
    elapsed = max((float(r["offset"]) + float(r["response-time"]) for r in rows), default=seconds)
    return Report(
        mode="hey",
        concurrency=concurrency,
        requests=len(rows),
        seconds=elapsed,
        images_per_second=statuses.get("200", 0) / elapsed,
        p50_ms=percentile(latencies, 0.50),
        p90_ms=percentile(latencies, 0.90),
        p99_ms=percentile(latencies, 0.99),
        statuses=statuses,
    )
