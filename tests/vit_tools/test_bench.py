"""vit-bench: closed and open loops against a real server, the ceiling, and the JSON it writes.

Counts and statuses are asserted, never speeds: these machines are shared.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.servers import served
from model_contract.preprocess import preprocess
from model_runtime.session import ModelSession
from tests.conftest import ROOT
from tests.images import upload_variety
from vit_tools import bench
from vit_tools.bench import Report, ceiling, load, lone_image, main, percentile, steady_rate

UPLOADS = upload_variety()
JPEGS = [UPLOADS["jpeg-640x480"][0], UPLOADS["jpeg"][0]]


@pytest.fixture(scope="module")
def url(served_model: Path) -> Iterator[str]:
    with served(served_model, ROOT) as server:
        yield server.url


def run(url: str, **options: object) -> Report:
    settings: dict[str, object] = {"count": 0, "duration": 0, "rate": None, "progress": False}
    settings.update(options)
    bodies = [(image, "image/jpeg") for image in JPEGS]
    return asyncio.run(load(url, bodies, **settings))  # type: ignore[arg-type]


def test_closed_loop_sends_exactly_the_count(url: str) -> None:
    report = run(url, concurrency=4, count=24)
    assert report.requests == 24 and report.statuses == {"200": 24}
    assert report.p50_ms <= report.p90_ms <= report.p99_ms
    assert report.steady_goodput_per_second is None


def test_open_loop_sends_at_the_rate_whatever_the_answers(url: str) -> None:
    report = run(url, concurrency=64, duration=1.0, rate=40)
    assert report.mode == "open@40"
    assert report.requests == 40  # one every 25 ms for a second, answered or not
    assert report.statuses == {"200": 40}
    assert report.steady_goodput_per_second is not None
    assert 0 < report.steady_goodput_per_second <= report.requests


def test_steady_rate_counts_only_the_window() -> None:
    assert steady_rate([0.1, 0.5, 1.0, 1.5, 2.0, 2.5], 1.0, 2.0) == 3.0
    assert steady_rate([], 0.0, 1.0) == 0.0


def test_percentile_is_a_sample_at_the_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 0.5) == 50.0
    assert percentile([], 0.99) == 0.0


@pytest.mark.parametrize("workers", [1, 2])
def test_ceiling_reports_each_batch_size(tiny_onnx: Path, workers: int) -> None:
    reports = ceiling(
        tiny_onnx, JPEGS, threads=1, decode_threads=1, batch_sizes=[1, 4], count=8, workers=workers
    )
    # One "request" per onnxruntime call; every image counted in the throughput.
    assert [(r.batch_size, r.requests, r.concurrency) for r in reports] == [
        (1, 8, workers),
        (4, 2, workers),
    ]
    assert all(r.images_per_second * r.seconds == pytest.approx(8) for r in reports)


def test_a_lone_image_waits_for_its_decode_and_its_inference_in_turn(
    tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each stage made to take at least 20 ms: a lone image takes both, never overlapped."""

    def slowed(original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            time.sleep(0.02)
            return original(*args)

        return call

    monkeypatch.setattr(bench, "preprocess", slowed(preprocess))
    monkeypatch.setattr(ModelSession, "predict", slowed(ModelSession.predict))
    report = lone_image(tiny_onnx, JPEGS, count=4, spinning=False)
    assert (report.requests, report.batch_size, report.statuses) == (4, 1, {"200": 4})
    assert min(report.p50_ms, report.p90_ms) >= 40.0


def test_cli_writes_the_report_as_json(url: str, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(JPEGS):
        (folder / f"{index}.jpg").write_bytes(image)
    output = tmp_path / "report.json"
    main([str(folder), "--url", url, "-c", "2", "-n", "6", "-o", str(output)])
    (written,) = json.loads(output.read_text())
    assert written["requests"] == 6 and written["statuses"] == {"200": 6}


def test_answers_that_failed_are_no_throughput_and_fail_the_run(tmp_path: Path) -> None:
    """Nothing listening: every request fails fast, which must not read as thousands of
    images a second."""
    with socket.create_server(("127.0.0.1", 0)) as reserved:
        dead = f"http://127.0.0.1:{reserved.getsockname()[1]}"
    report = run(dead, concurrency=2, count=6)
    assert report.requests == 6 and "200" not in report.statuses
    assert report.images_per_second == 0.0
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "0.jpg").write_bytes(JPEGS[0])
    with pytest.raises(SystemExit, match="6 requests were not answered 200"):
        main([str(folder), "--url", dead, "-c", "2", "-n", "6"])
