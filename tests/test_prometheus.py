"""A real Prometheus server scrapes a real service with the shipped scrape job."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.servers import free_port, running_server
from model_export import shapes
from tests.conftest import ROOT

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="Debian's prometheus package is not installed (make test installs it as root)",
)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def scrape_config_for(target: str) -> dict[str, Any]:
    """The shipped docker/prometheus.yml, its one job pointed at `target`; nothing else changed."""
    config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    return config


@pytest.fixture(scope="module")
def service(served_model: Path) -> Iterator[str]:
    with running_server(served_model, ROOT) as url:
        yield url


@pytest.fixture(scope="module")
def prometheus(service: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    assert PROMETHEUS is not None
    work = tmp_path_factory.mktemp("prometheus")
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config_for(service.removeprefix("http://"))))
    port = free_port()
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(work / "prometheus.log").open("w"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log = (work / "prometheus.log").read_text()
                    raise RuntimeError(f"prometheus did not start: {log}") from None
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)


def query(prometheus: str, promql: str) -> list[dict[str, Any]]:
    answer = get_json(f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def test_prometheus_scrapes_the_request_counter(service: str, prometheus: str) -> None:
    sent = 3
    for index in range(sent):
        request = urllib.request.Request(
            f"{service}/v1/classify",
            data=shapes.sample(11, index).data,
            headers={"Content-Type": "image/jpeg"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
    promql = 'vit_requests_total{job="vit-inference",method="POST",route="/v1/classify",code="200"}'
    deadline = time.monotonic() + 90
    while not (result := query(prometheus, promql)) or float(result[0]["value"][1]) < sent:
        assert time.monotonic() < deadline, f"Prometheus never saw {sent} requests: {result}"
        time.sleep(1)
    assert float(result[0]["value"][1]) == sent
    (target,) = get_json(f"{prometheus}/api/v1/targets")["data"]["activeTargets"]
    assert target["health"] == "up"
    assert target["labels"]["job"] == "vit-inference"
