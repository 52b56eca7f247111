"""VIT_MODEL_CONTROL=on_demand: models loaded by their first request (concurrent requests sharing
one load), least recently used versions unloaded within VIT_MODELS_MEMORY_BYTES, pinned models
kept, and loads that fail or overrun answered with a clear error while the others serve."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from harness.servers import served
from harness.watch import resident_bytes
from service.inference.version_loading import settled_resident_bytes
from tests.conftest import ROOT
from tests.inference.test_registry import add_broken_version
from tests.repositories import PHOTO, TOKEN, add_version, colours_probabilities
from tests.service_support import cpu_settings, ready_client

MODELS = [f"m{index:02d}" for index in range(12)]
PADDING = 8 << 20
"""Bytes each model of the budget tests holds beyond a tiny graph's: a table every call reads."""


def scale_of(name: str) -> float:
    """Each model answers differently: its weights scaled by its number plus one."""
    return 1.0 + int(name[1:])


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for name in MODELS[:4]:
        add_version(root, name, 1, scale=scale_of(name))
    return root


def classify(client: TestClient, name: str) -> Any:
    return client.post(
        f"/v1/models/{name}/classify?probabilities=true",
        content=PHOTO,
        headers={"content-type": "image/png"},
    )


def assert_answered_by(response: Any, name: str) -> None:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["name"] == name
    np.testing.assert_allclose(
        body["predictions"][0]["probabilities"], colours_probabilities(scale_of(name)), atol=1e-6
    )


def metric(client: TestClient, sample_name: str, **labels: str) -> float:
    """The sum of the samples named `sample_name` whose labels include `labels`."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for sample in family.samples
        if sample.name == sample_name and labels.items() <= sample.labels.items()
    )


def index(client: TestClient) -> dict[str, dict[str, Any]]:
    """The repository index by model name (one version each here)."""
    entries = client.post(
        "/v2/repository/index", headers={"Authorization": f"Bearer {TOKEN}"}
    ).json()
    return {entry["name"]: entry for entry in entries}


@contextmanager
def on_demand(repo: Path, **settings: object) -> Iterator[TestClient]:
    merged: dict[str, object] = {
        "model_control": "on_demand",
        "admin_token": TOKEN,
        "repository_poll_s": 0.2,
        **settings,
    }
    with ready_client(cpu_settings(repo, **merged)) as client:
        yield client


def test_nothing_loads_at_start_and_every_model_is_listed(repo: Path) -> None:
    with on_demand(repo) as client:
        assert client.get("/v2/health/ready").status_code == 200
        listed = client.get("/v1/models").json()
        assert listed["models"] == []
        assert [m["name"] for m in listed["not_loaded"]] == MODELS[:4]
        assert all("loads on its first request" in m["reason"] for m in listed["not_loaded"])
        assert {e["state"] for e in index(client).values()} == {"UNAVAILABLE"}


def test_concurrent_first_requests_share_one_load(repo: Path) -> None:
    with on_demand(repo) as client:
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: classify(client, "m01"), range(6)))
        for answer in answers:
            assert_answered_by(answer, "m01")
        assert metric(client, "vit_model_loads_total", model="m01") == 1
        waited = metric(client, "vit_model_load_wait_seconds_count", model="m01")
        assert 1 <= waited <= 6
        assert metric(client, "vit_model_load_wait_seconds_count", outcome="failed") == 0
        assert index(client)["m01"]["state"] == "READY"
        listed = client.get("/v1/models").json()
        assert [m["name"] for m in listed["models"]] == ["m01"]
        assert "m01" not in [m["name"] for m in listed["not_loaded"]]


def test_pinned_models_load_at_start(repo: Path) -> None:
    with on_demand(repo, pinned_models=("m02",)) as client:
        assert index(client)["m02"]["state"] == "READY"
        assert index(client)["m00"]["state"] == "UNAVAILABLE"
        assert_answered_by(classify(client, "m02"), "m02")
        assert metric(client, "vit_model_load_wait_seconds_count") == 0


def test_a_load_that_fails_answers_its_requests_and_the_others_serve(repo: Path) -> None:
    add_broken_version(repo, "broken", 1, "labels")
    with on_demand(repo) as client:
        refused = classify(client, "broken")
        assert refused.status_code == 503, refused.text
        assert "could not be loaded" in refused.json()["error"]
        assert "labels" in refused.json()["error"]
        again = classify(client, "broken")  # not tried again until the file changes
        assert again.status_code == 503 and again.json()["error"] == refused.json()["error"]
        assert_answered_by(classify(client, "m00"), "m00")
        assert metric(client, "vit_model_load_wait_seconds_count", outcome="failed") == 2
        (listed,) = [
            m for m in client.get("/v1/models").json()["not_loaded"] if m["name"] == "broken"
        ]
        assert listed["reason"].startswith("its last load failed")  # the why is the admin's
        assert "labels" in index(client)["broken"]["reason"]


def test_a_load_past_the_deadline_is_504_and_goes_on(repo: Path) -> None:
    with on_demand(repo, request_timeout_ms=1) as client:
        late = classify(client, "m03")
        assert late.status_code == 504, late.text
        assert "loading on demand" in late.json()["error"]
        assert metric(client, "vit_model_load_wait_seconds_count", outcome="timed_out") == 1
        deadline = time.monotonic() + 30
        while index(client)["m03"]["state"] != "READY":
            assert time.monotonic() < deadline, index(client)["m03"]
            time.sleep(0.05)


def test_the_memory_reported_per_version_adds_up_to_what_the_process_grew(
    tmp_path: Path,
) -> None:
    root = tmp_path / "repo"
    for name in MODELS[:10]:
        add_version(root, name, 1, scale=scale_of(name), padding_bytes=PADDING)
    with on_demand(root) as client:  # in this process: its growth is the server's
        before = settled_resident_bytes()
        for name in MODELS[:10]:
            assert_answered_by(classify(client, name), name)
        grown = settled_resident_bytes() - before
        reported = sum(entry["memory_bytes"] for entry in index(client).values())
        assert abs(reported - grown) <= 0.15 * grown, (reported >> 20, grown >> 20)
        assert all(entry["memory_bytes"] >= PADDING for entry in index(client).values())


def test_an_unknown_model_is_still_404(repo: Path) -> None:
    with on_demand(repo) as client:
        assert classify(client, "nowhere").status_code == 404


def test_a_skewed_mix_of_twelve_models_stays_within_a_budget_of_about_four(
    tmp_path: Path,
) -> None:
    root = tmp_path / "repo"
    for name in MODELS:
        add_version(root, name, 1, scale=scale_of(name), padding_bytes=PADDING)
    budget = 5 * 3 * PADDING  # each version takes 2 to 5 times its padding as it serves
    hot, cold = MODELS[:3], MODELS[3:]
    mix = [hot[i % 3] if i % 3 else cold[(i // 3) % len(cold)] for i in range(60)]
    with on_demand(root, models_memory_bytes=budget, pinned_models=("m00",)) as client:
        for name in mix:
            answer = classify(client, name)
            assert answer.status_code == 200, (answer.text, index(client))
            assert_answered_by(answer, name)
            held = metric(client, "vit_models_memory_bytes")
            assert held <= budget, (name, held)
            assert index(client)["m00"]["state"] == "READY"
        assert metric(client, "vit_model_unloads_total", reason="evicted") >= len(cold) - 4
        assert metric(client, "vit_model_unloads_total", model="m00") == 0
        reasons = [m["reason"] for m in client.get("/v1/models").json()["not_loaded"]]
        assert any(reason.startswith("evicted") for reason in reasons), reasons


def post_classify(url: str, name: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"{url}/v1/models/{name}/classify?probabilities=true",
        data=PHOTO,
        headers={"Content-Type": "image/png"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_a_real_servers_process_tree_stays_within_the_budget_plus_its_own(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    for name in MODELS:
        add_version(root, name, 1, scale=scale_of(name), padding_bytes=PADDING)
    budget = 5 * 3 * PADDING
    with served(root, ROOT, model_control="on_demand", models_memory_bytes=str(budget)) as server:
        own = resident_bytes(server.process.pid)  # nothing loaded yet
        hot = MODELS[:2]
        peak = own
        for _ in range(2):
            for cold in MODELS[2:]:
                for name in (*hot, cold):
                    status, body = post_classify(server.url, name)
                    assert status == 200, body
                    assert body["model"]["name"] == name
                    np.testing.assert_allclose(
                        body["predictions"][0]["probabilities"],
                        colours_probabilities(scale_of(name)),
                        atol=1e-6,
                    )
                    peak = max(peak, resident_bytes(server.process.pid))
        slack = 0.15 * budget  # the heap's fragmentation, the decoding workers' growth
        assert peak - own <= budget + slack, ((peak - own) >> 20, budget >> 20)
        with urllib.request.urlopen(f"{server.url}/metrics") as answer:
            text = answer.read().decode()
        evicted = [line for line in text.splitlines() if 'reason="evicted"' in line]
        assert sum(float(line.split()[-1]) for line in evicted) >= len(MODELS) - 2 - 4


def test_a_version_in_use_finishes_its_request_before_it_makes_room(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    for name in MODELS[:2]:
        add_version(root, name, 1, scale=scale_of(name), padding_bytes=4 * PADDING)
    # Room for one: serving, each holds its 32 MB table three or four times over (both engines'
    # copies and the lone-image session's), and m01's estimate before it loads is three times
    # its file.
    budget = 18 * PADDING
    with served(root, ROOT, model_control="on_demand", models_memory_bytes=str(budget)) as server:
        first = post_classify(server.url, "m00")
        assert first[0] == 200, first
        port = int(server.url.rsplit(":", 1)[1])
        # A request to m00 admitted and holding its place while its body trickles in.
        held = socket.create_connection(("127.0.0.1", port))
        held.sendall(
            b"POST /v1/models/m00/classify?probabilities=true HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: image/png\r\nContent-Length: "
            + str(len(PHOTO)).encode()
            + b"\r\n\r\n"
            + PHOTO[:10]
        )
        time.sleep(0.5)
        with ThreadPoolExecutor(1) as pool:
            other = pool.submit(post_classify, server.url, "m01")
            time.sleep(1.0)
            assert not other.done()  # m01's load waits for m00 to be let go
            held.sendall(PHOTO[10:])
            answer = held.recv(65536).decode()
            assert answer.startswith("HTTP/1.1 200"), answer
            held.close()
            status, body = other.result(timeout=60)
        assert status == 200 and body["model"]["name"] == "m01", body
        with urllib.request.urlopen(f"{server.url}/metrics") as response:
            text = response.read().decode()
        assert 'vit_model_unloads_total{model="m00",reason="evicted"} 1.0' in text


def test_two_models_wanted_at_once_with_room_for_one_both_answer(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    for name in MODELS[:2]:
        add_version(root, name, 1, scale=scale_of(name), padding_bytes=4 * PADDING)
    with on_demand(root, models_memory_bytes=18 * PADDING) as client:
        wanted = ["m00", "m01"] * 3
        with ThreadPoolExecutor(len(wanted)) as pool:
            answers = list(pool.map(lambda name: (name, classify(client, name)), wanted))
        for name, answer in answers:  # a model just loaded is not evicted under its requests
            assert_answered_by(answer, name)
