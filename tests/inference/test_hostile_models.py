"""Crafted model files dropped into a served repository: each refused with the reason in the index,
while the other models keep serving and keep loading new versions."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from model_export.sealing import write_metadata
from service.app import create_app
from service.settings import Settings
from tests.hostile_models import (
    batch_ignoring,
    batch_ignoring_when_bright,
    endless_loop,
    endless_on_real_images,
    external_data,
    memory_bomb,
    slow_for_big_batches,
)
from tests.images import encode
from tests.onnx_models import metadata_for
from tests.repositories import COLOURS, PHOTO, TOKEN, add_version, colours_probabilities
from tests.service_support import cpu_settings, ready_client

SECRET = b"db-password=hunter2 and the rest of a config file"


def admin() -> dict[str, str]:
    return {"authorization": f"Bearer {TOKEN}"}


def index(client: TestClient) -> dict[tuple[str, str], dict[str, Any]]:
    """The repository index by name and version ("" for a model with no version)."""
    entries = client.post("/v2/repository/index", headers=admin()).json()
    return {(e["name"], e.get("version")): e for e in entries}


def wait_for(condition: Callable[[], bool], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the condition never held")
        time.sleep(0.05)


def classify(client: TestClient, model: str) -> Any:
    return client.post(
        f"/v1/models/{model}/classify?probabilities=true",
        content=PHOTO,
        headers={"content-type": "image/png"},
    )


def serves_colours(client: TestClient, version: str, scale: float) -> None:
    answer = classify(client, "colours")
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == {"name": "colours", "version": version}
    got = answer.json()["predictions"][0]["probabilities"]
    np.testing.assert_allclose(got, colours_probabilities(scale), atol=1e-6)


@contextmanager
def started(settings: Settings) -> Iterator[TestClient]:
    """A client once the colours model serves (a model none of whose versions loads holds
    readiness, so readiness is not what to wait for)."""
    with TestClient(create_app(settings)) as client:
        wait_for(lambda: classify(client, "colours").status_code == 200)
        yield client


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    add_version(tmp_path / "repo", "colours", 1, scale=1.0)
    return tmp_path / "repo"


def test_a_model_whose_weights_name_a_server_file_never_serves_it(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "config.txt").write_bytes(SECRET)
    monkeypatch.chdir(tmp_path)  # where onnxruntime resolves a location given bytes
    external_data(repo / "thief" / "1" / "model.onnx", "config.txt", len(SECRET))
    seen = b""
    settings = cpu_settings(repo, admin_token=TOKEN, model_control="explicit")
    with started(settings) as client:
        entry = index(client)[("thief", "1")]
        assert entry["state"] == "UNAVAILABLE"
        assert "the tensor 'stolen'" in entry["reason"], entry
        answer = classify(client, "thief")
        assert answer.status_code in (404, 503), answer.text
        listing = client.get("/v1/models")
        serves_colours(client, "1", 1.0)
        seen = answer.content + listing.content + str(entry).encode()
    assert b"hunter2" not in seen


def test_a_graph_that_never_finishes_holds_up_no_other_model(repo: Path) -> None:
    settings = cpu_settings(
        repo,
        admin_token=TOKEN,
        model_control="poll",
        repository_poll_s=0.1,
        model_check_timeout_s=8.0,
    )
    with started(settings) as client:
        endless_loop(repo / "frozen" / "1" / "model.onnx")
        wait_for(lambda: index(client).get(("frozen", "1"), {}).get("state") == "LOADING")
        add_version(repo, "colours", 2, scale=2.0)
        # The new version of another model loads while the frozen one is still being tried.
        wait_for(lambda: classify(client, "colours").json()["model"]["version"] == "2", 6.0)
        assert index(client)[("frozen", "1")]["state"] == "LOADING"
        serves_colours(client, "2", 2.0)
        wait_for(lambda: index(client)[("frozen", "1")]["state"] == "UNAVAILABLE")
        assert "did not finish within 8 s" in index(client)[("frozen", "1")]["reason"]
        assert classify(client, "frozen").status_code in (404, 503)
        serves_colours(client, "2", 2.0)


def test_unload_and_load_answer_while_a_frozen_graph_is_being_tried(repo: Path) -> None:
    settings = cpu_settings(
        repo, admin_token=TOKEN, model_control="explicit", model_check_timeout_s=8.0
    )
    with started(settings) as client:
        endless_loop(repo / "frozen" / "1" / "model.onnx")

        refused: list[Any] = []
        trying = threading.Thread(
            target=lambda: refused.append(
                client.post("/v2/repository/models/frozen/load", headers=admin())
            )
        )
        trying.start()
        wait_for(lambda: index(client).get(("frozen", "1"), {}).get("state") == "LOADING")
        began = time.monotonic()
        add_version(repo, "colours", 2, scale=2.0)
        loaded = client.post("/v2/repository/models/colours/load", headers=admin())
        assert loaded.status_code == 200, loaded.text
        assert client.post("/v2/repository/models/colours/unload", headers=admin()).is_success
        assert time.monotonic() - began < 6.0
        trying.join(30)
        assert refused[0].status_code == 400 and "did not finish" in refused[0].text


def test_a_graph_over_the_memory_budget_is_refused_and_the_next_model_loads(repo: Path) -> None:
    memory_bomb(repo / "bomb" / "1" / "model.onnx", floats=100_000_000)  # 400 MB a call
    settings = cpu_settings(
        repo,
        admin_token=TOKEN,
        model_control="poll",
        repository_poll_s=0.1,
        models_memory_bytes=250 << 20,
    )
    with started(settings) as client:
        entry = index(client)[("bomb", "1")]
        assert entry["state"] == "UNAVAILABLE"
        assert "VIT_MODELS_MEMORY_BYTES" in entry["reason"], entry
        add_version(repo, "colours", 2, scale=2.0)
        wait_for(lambda: classify(client, "colours").json()["model"]["version"] == "2")
        assert index(client)[("colours", "2")]["memory_bytes"] < 250 << 20


def test_an_output_that_ignores_the_batch_is_refused_at_load(repo: Path) -> None:
    batch_ignoring(repo / "pooled" / "1" / "model.onnx")
    settings = cpu_settings(repo, admin_token=TOKEN, model_control="explicit")
    with started(settings) as client:
        entry = index(client)[("pooled", "1")]
        assert entry["state"] == "UNAVAILABLE"
        assert "not one row per image" in entry["reason"], entry
        serves_colours(client, "1", 1.0)


def test_a_call_whose_rows_do_not_match_its_images_fails_alone(tmp_path: Path) -> None:
    model = batch_ignoring_when_bright(tmp_path / "model.onnx")
    white = encode(Image.new("RGB", (40, 40), "white"), "PNG")
    files = [("file", (f"{i}.png", white, "image/png")) for i in range(2)]
    # A batch delay makes the two images of one request share a call, whichever decodes first.
    with ready_client(cpu_settings(model, max_batch_delay_ms=500)) as client:
        answer = client.post("/v1/classify", files=files)
        assert answer.status_code == 500, answer.text
        assert answer.json()["type"] == "inference_failed"
        alone = client.post("/v1/classify", files=files[:1])  # one image, one row: served
        assert alone.status_code == 200, alone.text
        body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES"}]}
        body["inputs"][0]["data"] = [base64.b64encode(PHOTO).decode()]
        assert client.post("/v2/models/foreign/infer", json=body).status_code == 200


@pytest.fixture()
def locked(repo: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A model folder the server may not read, as `chmod 000` makes it for a non-root server
    (root reads it anyway, so its listing fails here as it would there)."""
    folder = repo / "locked"
    add_version(repo, "locked", 1)
    listing = Path.iterdir

    def iterdir(path: Path) -> Iterator[Path]:
        if path == folder:
            raise PermissionError(13, "Permission denied", str(path))
        return listing(path)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    yield folder


def test_a_folder_that_cannot_be_read_is_skipped_and_reported(repo: Path, locked: Path) -> None:
    settings = cpu_settings(repo, admin_token=TOKEN, model_control="poll", repository_poll_s=0.1)
    with started(settings) as client:
        entry = index(client)[("locked", "")]
        assert entry["state"] == "UNAVAILABLE"
        assert entry["reason"] == "cannot be read: Permission denied"
        serves_colours(client, "1", 1.0)
        add_version(repo, "colours", 2, scale=2.0)
        wait_for(lambda: classify(client, "colours").json()["model"]["version"] == "2")
        assert client.post("/v2/repository/index", headers=admin()).status_code == 200


def test_a_sealed_copy_cut_short_never_retires_the_version_serving(repo: Path) -> None:
    sealed = repo / "colours" / "1" / "model.onnx"
    write_metadata(sealed, metadata_for(COLOURS, 32, held_out_accuracy=0.5), producer="test")
    settings = cpu_settings(repo, admin_token=TOKEN, model_control="poll", repository_poll_s=0.1)
    with started(settings) as client:
        data = sealed.read_bytes()
        half = data[: data.rindex(b"held_out_accuracy") - 4]  # an entry boundary: it parses
        staging = repo / ".colours-2"
        staging.mkdir()
        (staging / "model.onnx").write_bytes(half)
        staging.rename(repo / "colours" / "2")
        wait_for(lambda: index(client).get(("colours", "2"), {}).get("state") == "UNAVAILABLE")
        assert "does not match its content_sha256" in index(client)[("colours", "2")]["reason"]
        serves_colours(client, "1", 1.0)


def test_a_warm_up_over_the_bound_is_refused_without_waiting_for_it(repo: Path) -> None:
    """The load check runs batches of one and two; IO binding warms up every bucket (1 to 16),
    and this graph takes ~8 s from a batch of three on: the server stops waiting at the bound."""
    slow_for_big_batches(repo / "slow" / "1" / "model.onnx", trips=8_000_000)
    settings = cpu_settings(
        repo,
        admin_token=TOKEN,
        model_control="explicit",
        io_binding=True,
        model_check_timeout_s=2.0,
    )
    with started(settings) as client:
        began = time.monotonic()
        wait_for(lambda: index(client)[("slow", "1")]["state"] != "LOADING")
        assert time.monotonic() - began < 6.0
        entry = index(client)[("slow", "1")]
        assert entry["state"] == "UNAVAILABLE"
        assert entry["reason"] == "the warm-up did not finish within 2 s", entry
        serves_colours(client, "1", 1.0)


def test_a_graph_that_never_finishes_on_real_images_frees_its_thread(tmp_path: Path) -> None:
    """Zeros, all the load-time checks feed, pass; any photo would loop for ever: each call is
    stopped at its bound, its request answered 500, and the next call gets the thread."""
    model = endless_on_real_images(tmp_path / "model.onnx")
    settings = cpu_settings(model, model_check_timeout_s=2.0, inference_workers=1)
    with ready_client(settings) as client:
        for _ in range(2):
            began = time.monotonic()
            answer = client.post(
                "/v1/classify", content=PHOTO, headers={"content-type": "image/png"}
            )
            assert answer.status_code == 500 and answer.json()["type"] == "inference_failed"
            assert time.monotonic() - began < 6.0
        assert client.get("/v2/health/live").status_code == 200
