"""`vit-bench`: load generator for the service, and the in-process ceiling it is judged against.

Closed loop: N clients each send a request, wait for the answer, send the next. Open loop:
requests leave at a fixed rate whatever the answers do. The client is asyncio over raw
keep-alive HTTP/1.1 sockets, the lightest Python can do, because on a small machine the load
generator shares the cores with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from model_contract.preprocess import preprocess
from model_runtime.openvino_engine import ONNXRUNTIME
from model_runtime.options import IN_PROCESS
from model_runtime.session import ModelSession
from vit_tools.client import image_files


@dataclass
class Report:
    """What one run measured; latencies in milliseconds."""

    mode: str
    concurrency: int
    requests: int
    seconds: float
    images_per_second: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    statuses: dict[str, int] = field(default_factory=dict)
    batch_size: int | None = None
    p99_ms_by_status: dict[str, float] = field(default_factory=dict)
    steady_goodput_per_second: float | None = None
    """Open loop only: 200 answers per second completed while load was still offered, after
    the first fifth of the run. Dividing by the whole run would count the queue draining
    after the last send, when the server is no longer overloaded."""

    def line(self) -> str:
        statuses = " ".join(f"{code}:{n}" for code, n in sorted(self.statuses.items()))
        return (
            f"{self.mode:<8} c={self.concurrency:<3} {self.images_per_second:8.1f} img/s  "
            f"p50 {self.p50_ms:7.2f} ms  p90 {self.p90_ms:7.2f}  p99 {self.p99_ms:7.2f}  "
            f"{statuses}"
        )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] if ordered else 0.0


def summarise(
    mode: str,
    concurrency: int,
    latencies: list[float],
    statuses: Counter[int],
    seconds: float,
    images: int,
    batch_size: int | None = None,
    by_status: dict[int, list[float]] | None = None,
) -> Report:
    return Report(
        mode=mode,
        concurrency=concurrency,
        requests=len(latencies),
        seconds=seconds,
        images_per_second=images / seconds if seconds else 0.0,
        p50_ms=statistics.median(latencies) * 1000 if latencies else 0.0,
        p90_ms=percentile(latencies, 0.90) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        statuses={str(code): n for code, n in statuses.items()},
        batch_size=batch_size,
        p99_ms_by_status={
            str(code): percentile(values, 0.99) * 1000 for code, values in (by_status or {}).items()
        },
    )


Headers = tuple[tuple[str, str], ...]
Body = tuple[bytes, str] | tuple[bytes, str, Headers]
"""A request body, its content type and any other headers it needs."""


class Connection:
    """One keep-alive HTTP/1.1 connection posting raw image bodies."""

    def __init__(self, host: str, port: int, path: str) -> None:
        self.host, self.port, self.path = host, port, path
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, body: bytes, content_type: str, headers: Headers = ()) -> int:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: {content_type}"
            f"\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
        ).encode()
        self.writer.write(head + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status, length, close = int(status_line.split()[1]), 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and value.strip().lower() == "close":
                close = True
        await self.reader.readexactly(length)
        if close:
            await self.close()
        return status

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self.reader = None


def _content_type(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    return {"jpg": "image/jpeg", "tif": "image/tiff"}.get(suffix, f"image/{suffix}")


async def load(
    url: str,
    images: Sequence[Body],
    *,
    concurrency: int,
    count: int,
    duration: float,
    rate: float | None,
    progress: bool,
    route: str = "/v1/classify",
) -> Report:
    """Closed loop with `concurrency` clients, or open loop at `rate` requests per second, each
    request an image body POSTed to `route` (another server's, to compare with a peer)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = f"{parts.path.rstrip('/')}{route}"
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    by_status: dict[int, list[float]] = {}
    successes_at: list[float] = []
    started = time.perf_counter()
    stop_at = started + duration if duration else float("inf")
    sent = 0

    def take() -> int | None:
        nonlocal sent
        if (count and sent >= count) or time.perf_counter() >= stop_at:
            return None
        sent += 1
        return sent - 1

    async def one(connection: Connection, index: int) -> None:
        body, content_type, *headers = images[index % len(images)]
        begun = time.perf_counter()
        try:
            status = await connection.post(body, content_type, *headers)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            await connection.close()
            status = 599
        latencies.append(time.perf_counter() - begun)
        by_status.setdefault(status, []).append(latencies[-1])
        statuses[status] += 1
        if status == 200:
            successes_at.append(time.perf_counter() - started)
        if progress and len(latencies) % 100 == 0:
            elapsed = time.perf_counter() - started
            sys.stderr.write(f"\r{len(latencies)} requests, {len(latencies) / elapsed:.1f}/s")

    async def client() -> None:
        connection = Connection(host, port, path)
        while (index := take()) is not None:
            await one(connection, index)
        await connection.close()

    if rate is None:
        await asyncio.gather(*(client() for _ in range(concurrency)))
    else:
        pool = [Connection(host, port, path) for _ in range(concurrency)]
        idle = asyncio.Queue[Connection]()
        for connection in pool:
            idle.put_nowait(connection)
        tasks = []

        async def timed(index: int) -> None:
            connection = await idle.get()
            try:
                await one(connection, index)
            finally:
                idle.put_nowait(connection)

        while (index := take()) is not None:
            tasks.append(asyncio.create_task(timed(index)))
            await asyncio.sleep(max(0.0, started + sent / rate - time.perf_counter()))
        await asyncio.gather(*tasks)
        for connection in pool:
            await connection.close()
    if progress:
        sys.stderr.write("\n")
    seconds = time.perf_counter() - started
    mode = "closed" if rate is None else f"open@{rate:g}"
    # Throughput is answers that classified: a refusal or a dropped connection is fast, and
    # counted as images it would make a failing server look quick.
    report = summarise(
        mode, concurrency, latencies, statuses, seconds, statuses[200], by_status=by_status
    )
    if rate is not None and duration:
        report.steady_goodput_per_second = steady_rate(successes_at, duration / 5, duration)
    return report


def steady_rate(times: list[float], start: float, end: float) -> float:
    """Events per second between `start` and `end` (seconds into the run)."""
    return sum(start <= t <= end for t in times) / (end - start)


def ceiling(
    model: Path,
    images: list[bytes],
    *,
    threads: int,
    decode_threads: int,
    batch_sizes: list[int],
    count: int,
    spinning: bool = False,
    workers: int = 1,
    engine: str = ONNXRUNTIME,
) -> list[Report]:
    """In-process: the same decode, preprocessing and session, decode overlapping inference.

    `spinning` is onnxruntime's busy-wait between operators (the service's
    VIT_INTRA_OP_SPINNING) and `workers` the calls running at once (VIT_INFERENCE_WORKERS),
    each worker taking its share of `count`; the ceiling is the best of them. `engine` is
    VIT_ENGINE's onnxruntime or openvino (which has no busy-wait).
    """
    session = ModelSession(
        model,
        IN_PROCESS.model_copy(
            update={
                "engine": engine,
                "intra_op_threads": threads,
                "intra_op_spinning": spinning,
                "inference_workers": workers,
            }
        ),
    )
    spec = session.metadata.preprocessing
    mode = f"ceiling w{workers}" + ("+spin" if spinning else "")
    if engine != ONNXRUNTIME:
        mode += f" {engine} {session.precision}"
    reports = []
    with ThreadPoolExecutor(decode_threads) as pool:

        def decode(indices: range) -> list[Future[np.ndarray]]:
            return [pool.submit(preprocess, images[i % len(images)], spec) for i in indices]

        def worker(first: int, end: int, batch_size: int, latencies: list[float]) -> None:
            """Decode the next batch while the current one runs, as the service does."""
            pending = decode(range(first, min(end, first + batch_size)))
            for start in range(first, end, batch_size):
                begun = time.perf_counter()
                batch = np.concatenate([future.result() for future in pending])
                upcoming = start + batch_size
                pending = decode(range(upcoming, min(end, upcoming + batch_size)))
                session.predict(batch)
                latencies.append(time.perf_counter() - begun)

        for batch_size in batch_sizes:
            latencies: list[float] = []
            share = math.ceil(count / workers)
            started = time.perf_counter()
            with ThreadPoolExecutor(workers) as callers:
                runs = [
                    callers.submit(worker, first, min(count, first + share), batch_size, latencies)
                    for first in range(0, count, share)
                ]
                for run in runs:
                    run.result()
            seconds = time.perf_counter() - started
            reports.append(
                summarise(
                    mode,
                    workers,
                    latencies,
                    Counter({200: len(latencies)}),
                    seconds,
                    count,
                    batch_size=batch_size,
                )
            )
    return reports


def lone_image(
    model: Path, images: list[bytes], *, count: int, spinning: bool, engine: str = ONNXRUNTIME
) -> Report:
    """In-process, one image at a time from bytes to probabilities: decoded and preprocessed,
    then run through one call on every core, the next image only after. What a client alone
    with the service waits for, less the HTTP and the hand-offs (the ceiling's overlap of
    decoding with inference hides most of a decode, which a lone request cannot)."""
    session = ModelSession(
        model,
        IN_PROCESS.model_copy(
            update={
                "engine": engine,
                "intra_op_threads": 0,
                "intra_op_spinning": spinning,
                "inference_workers": 1,
            }
        ),
    )
    spec = session.metadata.preprocessing
    latencies = []
    started = time.perf_counter()
    for index in range(count):
        begun = time.perf_counter()
        session.predict(preprocess(images[index % len(images)], spec))
        latencies.append(time.perf_counter() - begun)
    seconds = time.perf_counter() - started
    mode = "lone" + ("+spin" if spinning else "")
    if engine != ONNXRUNTIME:
        mode += f" {engine} {session.precision}"
    return summarise(mode, 1, latencies, Counter({200: count}), seconds, count, batch_size=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="vit-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("images", type=Path, nargs="+", help="image files or folders")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("-c", "--concurrency", type=int, default=16)
    parser.add_argument("-n", "--count", type=int, default=0, help="requests (0: use --duration)")
    parser.add_argument("-d", "--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("--rate", type=float, help="open loop at this many requests per second")
    parser.add_argument(
        "--ceiling", action="store_true", help="measure the in-process pipeline instead of a server"
    )
    parser.add_argument("--model", type=Path, default=Path("models/shapes-vit.onnx"))
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: cores)")
    parser.add_argument("--decode-threads", type=int, default=2)
    parser.add_argument("--batch-sizes", default="1,4,8,16,32")
    parser.add_argument(
        "--workers", default="1,2", help="ceiling: calls running at once, each value measured"
    )
    parser.add_argument(
        "--spinning", action="store_true", help="ceiling with onnxruntime's busy-wait on"
    )
    parser.add_argument("-o", "--output", type=Path, help="write the report(s) as JSON here")
    args = parser.parse_args(argv)
    missing = [str(path) for path in args.images if not path.exists()]
    if missing:
        parser.error(f"no such file or folder: {', '.join(missing)}")
    paths = list(image_files(args.images))
    if not paths:
        parser.error("no image files found")
    if args.ceiling:
        reports = [
            report
            for workers in (int(w) for w in args.workers.split(","))
            for report in ceiling(
                args.model,
                [p.read_bytes() for p in paths],
                threads=args.threads,
                decode_threads=args.decode_threads,
                batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
                count=args.count or 2000,
                spinning=args.spinning,
                workers=workers,
            )
        ]
    else:
        images = [(p.read_bytes(), _content_type(p)) for p in paths]
        reports = [
            asyncio.run(
                load(
                    args.url,
                    images,
                    concurrency=args.concurrency,
                    count=args.count,
                    duration=0 if args.count else args.duration,
                    rate=args.rate,
                    progress=sys.stderr.isatty(),
                )
            )
        ]
    for report in reports:
        print(report.line())
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps([asdict(r) for r in reports], indent=2) + "\n")
    failed = sum(n for r in reports for code, n in r.statuses.items() if code != "200")
    if failed:
        sys.exit(f"vit-bench: {failed} requests were not answered 200 (see the counts by status)")


if __name__ == "__main__":
    main()
