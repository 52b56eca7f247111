"""One pool of decoding workers for every model of a server: twelve models served at once by
VIT_DECODE_WORKERS processes, each image preprocessed as its own model asks, a decode bomb
counted under its own model while the others answer, and a version unloaded leaving the workers
to the rest."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from harness import attacks
from harness.servers import Server, served
from harness.watch import metric
from model_contract.preprocess import PreprocessSpec, preprocess
from model_runtime.options import IN_PROCESS
from model_runtime.session import ModelSession
from tests.conftest import ROOT
from tests.images import upload_variety
from tests.onnx_models import classifier, metadata_for
from tests.repositories import COLOURS, PHOTO, TOKEN

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads processes in /proc")

WORKERS = 2
PREPROCESSING = [
    PreprocessSpec(input_size=32),
    PreprocessSpec(input_size=64, resize="squash"),
    PreprocessSpec(input_size=48, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    PreprocessSpec(input_size=96, interpolation="bilinear"),
]
"""Four kinds of model among the twelve: their inputs differ in size and in preprocessing."""
MODELS = {f"m{i:02d}": PREPROCESSING[i % len(PREPROCESSING)] for i in range(12)}
UPLOADS = {"photo": PHOTO, "jpeg": upload_variety()["jpeg"][0]}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shared-decoders") / "repo"
    for number, (name, spec) in enumerate(MODELS.items()):
        folder = root / name / "1"
        folder.mkdir(parents=True)
        metadata = metadata_for(COLOURS, spec.input_size, preprocessing=spec)
        classifier(
            folder / "model.onnx", size=spec.input_size, scale=1.0 + number, metadata=metadata
        )
    return root


@pytest.fixture(scope="module")
def expected(repo: Path) -> dict[tuple[str, str], np.ndarray]:
    """Each model's probabilities for each upload, in-process: its session on the shared
    preprocessing of its own spec."""
    answers = {}
    for name in MODELS:
        session = ModelSession(repo / name / "1" / "model.onnx", IN_PROCESS)
        for upload, data in UPLOADS.items():
            batch = preprocess(data, session.metadata.preprocessing)
            answers[name, upload] = session.predict(batch)[0]
    return answers


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[Server]:
    with served(
        repo,
        ROOT,
        timeout=300,
        model_control="explicit",
        admin_token=TOKEN,
        decode_workers=str(WORKERS),
    ) as running:
        yield running


def children(pid: int) -> list[int]:
    return [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]


def running(pid: int) -> bool:
    """Neither gone nor a zombie (a replaced worker until it is reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def decoding_processes(server: Server) -> set[int]:
    """The server's decoding workers: the children of its one launcher (its only child that
    lives on once the models are loaded)."""
    launchers = [
        child
        for child in children(server.process.pid)
        if b"serve_launches" in Path(f"/proc/{child}/cmdline").read_bytes()
    ]
    assert len(launchers) == 1, launchers
    return {pid for pid in children(launchers[0]) if running(pid)}


def settled_decoding_processes(server: Server) -> set[int]:
    """The decoding workers once a replacement, if any, has been forked and the worker it
    replaces reaped."""
    deadline = time.monotonic() + 10
    while len(workers := decoding_processes(server)) != WORKERS and time.monotonic() < deadline:
        time.sleep(0.05)
    return workers


def classify(server: Server, name: str, upload: str = "photo") -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/models/{name}/classify?probabilities=true",
        content=UPLOADS[upload],
        headers={"content-type": "application/octet-stream"},
        timeout=60,
    )


def assert_answered_by(
    response: httpx.Response, name: str, upload: str, expected: dict[tuple[str, str], np.ndarray]
) -> None:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["name"] == name
    got = body["predictions"][0]["probabilities"]
    np.testing.assert_allclose(got, expected[name, upload], atol=1e-5)


def test_twelve_models_are_served_by_the_same_decoding_workers_each_as_it_preprocesses(
    server: Server, expected: dict[tuple[str, str], np.ndarray]
) -> None:
    workers = decoding_processes(server)
    assert len(workers) == WORKERS  # not one pool per model: 12 x WORKERS
    # Every model, both uploads, three times over, interleaved so that each worker takes
    # images of models with other input sizes and preprocessing one after another.
    jobs = [(name, upload) for _ in range(3) for upload in UPLOADS for name in MODELS]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda job: classify(server, *job), jobs))
    for (name, upload), response in zip(jobs, responses, strict=True):
        assert_answered_by(response, name, upload, expected)
    assert decoding_processes(server) == workers  # none replaced, none added
    assert metric(server, "vit_decode_workers_replaced_total") == 0


def test_a_decode_bomb_is_counted_under_its_own_model_while_another_answers(
    server: Server, expected: dict[tuple[str, str], np.ndarray]
) -> None:
    replaced = "vit_decode_workers_replaced_total"
    before = {name: metric(server, replaced, model=name) for name in MODELS}
    workers = settled_decoding_processes(server)
    stop = threading.Event()
    others: list[httpx.Response] = []

    def keep_asking() -> None:
        while not stop.is_set() or not others:
            others.append(classify(server, "m05"))

    asking = threading.Thread(target=keep_asking)
    asking.start()
    try:
        time.sleep(0.2)
        bombed = httpx.post(
            f"{server.url}/v1/models/m02/classify",
            content=attacks.tiled_tiff(),
            headers={"content-type": "image/tiff"},
            timeout=60,
        )
        time.sleep(0.2)
    finally:
        stop.set()
        asking.join()
    assert bombed.status_code == 422 and bombed.json()["type"] == "too_expensive_to_decode"
    assert metric(server, replaced, model="m02", version="1", reason="memory") == before["m02"] + 1
    assert {name: metric(server, replaced, model=name) for name in MODELS if name != "m02"} == {
        name: count for name, count in before.items() if name != "m02"
    }
    for response in others:
        assert_answered_by(response, "m05", "photo", expected)
    after = settled_decoding_processes(server)
    assert len(after) == WORKERS and len(after - workers) == 1  # the one that overran, replaced
    assert_answered_by(classify(server, "m05"), "m05", "photo", expected)


def test_unloading_a_version_leaves_the_shared_workers_to_the_other_models(
    server: Server, expected: dict[tuple[str, str], np.ndarray]
) -> None:
    admin = {"Authorization": f"Bearer {TOKEN}"}
    workers = settled_decoding_processes(server)
    unloaded = httpx.post(f"{server.url}/v2/repository/models/m11/unload", headers=admin)
    assert unloaded.status_code == 200, unloaded.text
    assert classify(server, "m11").status_code == 404
    time.sleep(0.5)  # the unloaded version is closed once it has nothing in flight
    assert decoding_processes(server) == workers
    for name in ("m00", "m01", "m02", "m03"):  # every input size and preprocessing
        assert_answered_by(classify(server, name, "jpeg"), name, "jpeg", expected)
    loaded = httpx.post(f"{server.url}/v2/repository/models/m11/load", headers=admin, timeout=60)
    assert loaded.status_code == 200, loaded.text
    assert_answered_by(classify(server, "m11"), "m11", "photo", expected)
    assert decoding_processes(server) == workers
