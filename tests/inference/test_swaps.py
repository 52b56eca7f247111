"""Hot reload under load, against a real server: new versions swapped in by poll and through the
repository API while 16 clients keep classifying; not one request lost or answered by a version
other than the one it names; memory back after the swaps, and after reloads of an idle server;
tritonclient's repository calls."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from harness.servers import Server, served
from tests.conftest import DEFAULT_MODEL, ROOT
from tests.repositories import PHOTO, TOKEN, add_version, colours_probabilities

CLIENTS = 16
SECONDS = 20.0
SWAPS = 10  # alternately by poll and through the API
RSS_GROWTH_MB = 50
RELOADS = 8
RELOADS_GROWTH_MB = 100
"""Eight reloads of the bundled model kept ~390 MB when retired versions waited for a full
collection, and take ~30 MB (the heap's own growth) when they are collected at once."""


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def served_version(server: Server) -> str:
    answer = httpx.post(
        f"{server.url}/v1/models/colours/classify",
        content=PHOTO,
        headers={"content-type": "image/png"},
        timeout=10,
    )
    version: str = answer.json()["model"]["version"]
    return version


def wait_for_version(server: Server, version: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while served_version(server) != str(version):
        if time.monotonic() > deadline:
            raise TimeoutError(f"version {version} never took over")
        time.sleep(0.05)


def test_swaps_under_load_lose_no_request(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    add_version(repo, "colours", 1, scale=1.0)
    failures: list[str] = []
    answered: dict[str, int] = {}
    stop = threading.Event()

    def client(url: str) -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                answer = http.post(
                    f"{url}/v1/models/colours/classify?probabilities=true",
                    content=PHOTO,
                    headers={"content-type": "image/png"},
                )
                if answer.status_code != 200:
                    failures.append(f"{answer.status_code} {answer.text[:200]}")
                    continue
                body = answer.json()
                version = body["model"]["version"]
                got = np.array(body["predictions"][0]["probabilities"])
                if not np.allclose(got, colours_probabilities(float(version)), atol=1e-6):
                    failures.append(f"version {version} answered another version's numbers")
                answered[version] = answered.get(version, 0) + 1

    with served(
        repo,
        ROOT,
        model_control="poll",
        repository_poll_s="0.3",
        admin_token=TOKEN,
        max_queue="1024",
    ) as server:
        pid = server.process.pid
        threads = [threading.Thread(target=client, args=(server.url,)) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()
        started = time.monotonic()
        memory_after_first = 0.0
        try:
            for swap in range(SWAPS):
                version = swap + 2
                add_version(repo, "colours", version, scale=float(version))
                wait_for_version(server, version)
                if swap == 0:
                    memory_after_first = resident_mb(pid)
                time.sleep(max(0.0, (swap + 1) * SECONDS / SWAPS - (time.monotonic() - started)))
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        time.sleep(1.0)  # the last retired version closes once its requests are answered
        memory_after_last = resident_mb(pid)
    assert not failures, failures[:5]
    assert sum(answered.values()) > 100
    assert len(answered) >= SWAPS  # the versions in between answered too
    assert memory_after_last - memory_after_first <= RSS_GROWTH_MB, (
        memory_after_first,
        memory_after_last,
    )


def test_tritonclient_repository_calls(tmp_path: Path) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    repo = tmp_path / "repo"
    add_version(repo, "colours", 1)
    add_version(repo, "other", 1)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with served(repo, ROOT, model_control="explicit", admin_token=TOKEN) as server:
        client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
        index = client.get_model_repository_index(headers=headers)
        assert {(m["name"], m["state"]) for m in index} == {
            ("colours", "READY"),
            ("other", "READY"),
        }
        client.unload_model("other", headers=headers)
        assert not client.is_model_ready("other")
        client.load_model("other", headers=headers)
        assert client.is_model_ready("other")
        with pytest.raises(Exception, match="401|Bearer"):
            client.get_model_repository_index()


def test_an_idle_server_gives_a_reloaded_versions_memory_back(tmp_path: Path) -> None:
    """With no traffic, Python may never run the full collection that frees a retired
    pipeline (its objects refer to one another), so each reload kept ~50 MB of the bundled
    model's sessions for good."""
    repo = tmp_path / "repo"
    (repo / "shapes" / "1").mkdir(parents=True)
    shutil.copy(DEFAULT_MODEL, repo / "shapes" / "1" / "model.onnx")
    with served(repo, ROOT, model_control="explicit", admin_token=TOKEN) as server:
        pid = server.process.pid
        before = resident_mb(pid)
        for _ in range(RELOADS):
            loaded = httpx.post(
                f"{server.url}/v2/repository/models/shapes/load",
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=60,
            )
            assert loaded.status_code == 200, loaded.text
        time.sleep(1.0)  # the last retired version closes
        after = resident_mb(pid)
    assert after - before <= RELOADS_GROWTH_MB, (before, after)
