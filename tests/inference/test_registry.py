"""A model repository: several models and versions at once, addressed by name and version, the
version policy, the repository API behind its token, and broken versions that never serve."""

from __future__ import annotations

import base64
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

import service.inference.version_loading as loading_module
from model_contract.metadata import SelfTest
from model_runtime.options import CPU, RuntimeOptions
from model_runtime.session import ModelSession
from service.app import create_app
from service.errors import ModelLoadFailed
from service.inference.repository_layout import scan
from service.inference.version_policy import VersionPolicy
from tests.conftest import DEFAULT_MODEL
from tests.onnx_models import classifier, metadata_for
from tests.repositories import COLOURS, PHOTO, TOKEN, add_version, colours_probabilities
from tests.service_support import cpu_settings, ready_client, wait_ready


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    add_version(root, "colours", 1, scale=1.0)
    add_version(root, "colours", 2, scale=2.0)
    (root / "shapes" / "1").mkdir(parents=True)
    shutil.copy(DEFAULT_MODEL, root / "shapes" / "1" / "model.onnx")
    return root


@pytest.fixture()
def client(repo: Path) -> Iterator[TestClient]:
    with ready_client(cpu_settings(repo, admin_token=TOKEN, version_policy="all")) as client:
        yield client


def classify(client: TestClient, path: str) -> Any:
    return client.post(path, content=PHOTO, headers={"content-type": "image/png"})


def test_two_models_and_two_versions_each_answer_as_in_process(client: TestClient) -> None:
    for version, scale in (("1", 1.0), ("2", 2.0)):
        answer = classify(
            client, f"/v1/models/colours/versions/{version}/classify?probabilities=true"
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == {"name": "colours", "version": version}
        got = answer.json()["predictions"][0]["probabilities"]
        np.testing.assert_allclose(got, colours_probabilities(scale), atol=1e-6)
    latest = classify(client, "/v1/models/colours/classify").json()
    assert latest["model"] == {"name": "colours", "version": "2"}
    shapes = classify(client, "/v1/models/shapes/classify")
    assert shapes.status_code == 200 and shapes.json()["model"]["name"] == "shapes"
    names = {(m["name"], m["version"]) for m in client.get("/v1/models").json()["models"]}
    assert names == {("colours", "1"), ("colours", "2"), ("shapes", "1")}


def test_oip_addresses_models_and_versions(client: TestClient) -> None:
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": []}]}
    import base64

    body["inputs"][0]["data"] = [base64.b64encode(PHOTO).decode()]
    answer = client.post("/v2/models/colours/versions/1/infer", json=body).json()
    assert (answer["model_name"], answer["model_version"]) == ("colours", "1")
    np.testing.assert_allclose(answer["outputs"][0]["data"], colours_probabilities(1.0), atol=1e-6)
    assert client.get("/v2/models/colours").json()["versions"] == ["1", "2"]
    assert client.get("/v2/models/colours/versions/2/ready").status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/nope/classify",
        "/v1/models/colours/versions/7/classify",
        "/v2/models/nope/infer",
        "/v2/models/colours/versions/7/infer",
    ],
)
def test_an_unknown_model_or_version_is_404(client: TestClient, path: str) -> None:
    answer = classify(client, path)
    assert answer.status_code == 404 and answer.json()["type"] == "model_not_found"


def test_with_several_models_the_default_route_asks_for_a_name(repo: Path) -> None:
    with ready_client(cpu_settings(repo)) as client:
        answer = classify(client, "/v1/classify")
        assert answer.status_code == 404 and "name one" in answer.json()["error"]
    with ready_client(cpu_settings(repo, default_model="shapes")) as client:
        assert classify(client, "/v1/classify").json()["model"]["name"] == "shapes"


def test_the_version_policy_chooses_what_is_served() -> None:
    assert VersionPolicy.parse("latest").choose([3, 1, 2]) == [3]
    assert VersionPolicy.parse("latest:2").choose([3, 1, 2]) == [2, 3]
    assert VersionPolicy.parse("all").choose([3, 1]) == [1, 3]
    assert VersionPolicy.parse("specific:1,3").choose([1, 2, 3, 4]) == [1, 3]
    with pytest.raises(ValueError, match="use latest"):
        VersionPolicy.parse("newest")


def test_by_default_only_the_latest_version_is_served(repo: Path) -> None:
    with ready_client(cpu_settings(repo)) as client:
        assert classify(client, "/v1/models/colours/versions/1/classify").status_code == 404
        assert classify(client, "/v1/models/colours/classify").json()["model"]["version"] == "2"


def admin(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_the_repository_api_needs_its_token(repo: Path, client: TestClient) -> None:
    for refused in (
        client.post("/v2/repository/index"),
        client.post("/v2/repository/index", headers=admin("wrong")),
    ):
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == "Bearer"  # RFC 6750
    index = client.post("/v2/repository/index", headers=admin()).json()
    assert {(e["name"], e["version"], e["state"]) for e in index} == {
        ("colours", "1", "READY"),
        ("colours", "2", "READY"),
        ("shapes", "1", "READY"),
    }
    with ready_client(cpu_settings(repo)) as closed:
        refused = closed.post("/v2/repository/index", headers=admin())
        assert refused.status_code == 403 and "VIT_ADMIN_TOKEN" in refused.json()["error"]
        assert closed.post("/v2/repository/models/shapes/unload").status_code == 403


def test_explicit_unload_and_load(repo: Path) -> None:
    settings = cpu_settings(repo, admin_token=TOKEN, model_control="explicit")
    with ready_client(settings) as client:
        assert (
            client.post("/v2/repository/models/shapes/unload", headers=admin()).status_code == 200
        )
        assert classify(client, "/v1/models/shapes/classify").status_code == 404
        index = client.post("/v2/repository/index", headers=admin()).json()
        unloaded = {"name": "shapes", "version": "", "state": "UNAVAILABLE"}
        assert [e for e in index if e["name"] == "shapes"] == [
            {**unloaded, "reason": "unloaded by the repository API", "memory_bytes": 0}
        ]  # listed still, as Triton lists a repository's models
        add_version(repo, "colours", 3, scale=3.0)  # explicit: nothing happens by itself
        assert classify(client, "/v1/models/colours/classify").json()["model"]["version"] == "2"
        assert client.post("/v2/repository/models/shapes/load", headers=admin()).status_code == 200
        assert client.post("/v2/repository/models/colours/load", headers=admin()).status_code == 200
        assert classify(client, "/v1/models/colours/classify").json()["model"]["version"] == "3"
        assert classify(client, "/v1/models/shapes/classify").status_code == 200
        text = client.get("/metrics").text
        assert 'vit_model_unloads_total{model="shapes",reason="explicit"} 1.0' in text
        assert 'vit_model_unloads_total{model="colours",reason="removed"} 1.0' in text
        assert 'vit_model_loads_total{model="shapes"} 2.0' in text
        missing = client.post("/v2/repository/models/nope/load", headers=admin())
        assert missing.status_code == 404
        # unloading what is not loaded is done already, as Triton answers; a name known
        # nowhere is a 404
        unload = "/v2/repository/models/{}/unload"
        assert client.post(unload.format("shapes"), headers=admin()).status_code == 200
        assert client.post(unload.format("shapes"), headers=admin()).status_code == 200
        assert client.post(unload.format("nope"), headers=admin()).status_code == 404


def test_an_api_token_guards_inference_but_not_health(repo: Path) -> None:
    with TestClient(create_app(cpu_settings(repo, api_token="infer-token"))) as client:
        wait_ready(client)
        refused = classify(client, "/v1/models/shapes/classify")
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        allowed = client.post(
            "/v1/models/shapes/classify",
            content=PHOTO,
            headers={"content-type": "image/png", "Authorization": "Bearer infer-token"},
        )
        assert allowed.status_code == 200
        assert client.get("/v2/health/ready").status_code == 200
        assert client.get("/metrics").status_code == 200


BREAKAGE_REASONS = {
    "truncated": "not an ONNX model",
    "labels": "2 labels",
    "self_test": "self-test failed",
}


def add_broken_version(repo: Path, name: str, version: int, breakage: str) -> None:
    """A version that must never serve, written then renamed into place."""
    staging = repo / f".broken-{name}-{version}"
    staging.mkdir()
    if breakage == "truncated":
        data = (repo / "shapes" / "1" / "model.onnx").read_bytes()
        (staging / "model.onnx").write_bytes(data[: len(data) // 2])
    elif breakage == "labels":
        classifier(staging / "model.onnx", metadata=metadata_for(["a", "b"], 32))
    else:  # expectations the graph does not give: a file computing other numbers
        expected = ((0.5, 0.25, 0.25),)
        self_test = SelfTest(
            images=(base64.b64encode(PHOTO).decode(),), probabilities=expected, tolerance=1e-4
        )
        metadata = metadata_for(COLOURS, 32, self_test=self_test)
        classifier(staging / "model.onnx", metadata=metadata)
    (repo / name).mkdir(exist_ok=True)
    staging.rename(repo / name / str(version))


def index_entry(client: TestClient, name: str, version: str) -> dict[str, Any]:
    """The index's entry for `name` `version`, once it is not LOADING (within 10 s)."""
    deadline = time.monotonic() + 10
    entry: dict[str, Any] = {}
    while time.monotonic() < deadline:
        index = client.post("/v2/repository/index", headers=admin()).json()
        entry = next((e for e in index if e["name"] == name and e["version"] == version), {})
        if entry.get("state") in ("READY", "UNAVAILABLE"):
            break
        time.sleep(0.1)
    return entry


@pytest.mark.parametrize("breakage", BREAKAGE_REASONS)
def test_a_broken_new_version_never_serves_and_the_index_says_why(
    repo: Path, breakage: str
) -> None:
    settings = cpu_settings(repo, admin_token=TOKEN, model_control="poll", repository_poll_s=0.2)
    with ready_client(settings) as client:
        add_broken_version(repo, "colours", 3, breakage)
        entry = index_entry(client, "colours", "3")
        assert entry.get("state") == "UNAVAILABLE", entry
        assert BREAKAGE_REASONS[breakage] in entry["reason"], entry
        answer = classify(client, "/v1/models/colours/classify")
        assert answer.status_code == 200 and answer.json()["model"]["version"] == "2"
        metrics = client.get("/metrics").text
        assert 'vit_model_load_failures_total{model="colours"} 1.0' in metrics


@pytest.mark.parametrize("control", ["poll", "explicit"])
@pytest.mark.parametrize("breakage", ["truncated", "self_test"])
def test_at_start_a_broken_latest_version_leaves_the_one_before_it_serving(
    repo: Path, control: str, breakage: str
) -> None:
    add_broken_version(repo, "colours", 3, breakage)
    settings = cpu_settings(repo, admin_token=TOKEN, model_control=control)
    with ready_client(settings) as client:
        answer = classify(client, "/v1/models/colours/classify")
        assert answer.status_code == 200 and answer.json()["model"]["version"] == "2"
        entry = index_entry(client, "colours", "3")
        assert entry["state"] == "UNAVAILABLE" and BREAKAGE_REASONS[breakage] in entry["reason"]


def test_at_start_a_model_no_version_of_which_loads_holds_readiness_until_one_does(
    repo: Path,
) -> None:
    add_broken_version(repo, "faulty", 1, "self_test")
    settings = cpu_settings(repo, admin_token=TOKEN, model_control="poll", repository_poll_s=0.2)
    with TestClient(create_app(settings)) as client:
        entry = index_entry(client, "faulty", "1")
        assert entry["state"] == "UNAVAILABLE" and "self-test failed" in entry["reason"]
        assert index_entry(client, "shapes", "1")["state"] == "READY"
        answer = classify(client, "/v1/models/shapes/classify")
        assert answer.status_code == 200, answer.text
        assert client.get("/v2/health/ready").status_code == 503
        add_version(repo, "faulty", 2)  # a version that loads: the model serves, and the server
        wait_ready(client)
        answer = classify(client, "/v1/models/faulty/classify")
        assert answer.status_code == 200 and answer.json()["model"]["version"] == "2"


def test_a_request_naming_no_version_goes_to_the_latest_that_is_ready(repo: Path) -> None:
    add_broken_version(repo, "colours", 3, "self_test")
    settings = cpu_settings(repo, admin_token=TOKEN, version_policy="latest:2")
    with TestClient(create_app(settings)) as client:
        assert index_entry(client, "colours", "3")["state"] == "UNAVAILABLE"
        assert index_entry(client, "colours", "2")["state"] == "READY"
        assert client.get("/v2/health/ready").status_code == 503  # none mode: it stays unready
        answer = classify(client, "/v1/models/colours/classify")
        assert answer.status_code == 200 and answer.json()["model"]["version"] == "2"
        assert classify(client, "/v1/models/colours/versions/3/classify").status_code == 503


def test_a_load_over_the_memory_budget_is_refused_with_the_reason(repo: Path) -> None:
    settings = cpu_settings(
        repo, admin_token=TOKEN, model_control="explicit", models_memory_bytes=1024
    )
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 10
        index: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            index = client.post("/v2/repository/index", headers=admin()).json()
            if index and all(entry["state"] == "UNAVAILABLE" for entry in index):
                break
            time.sleep(0.05)
        assert index and all("VIT_MODELS_MEMORY_BYTES" in e["reason"] for e in index), index
        refused = client.post("/v2/repository/models/colours/load", headers=admin())
        assert refused.status_code == 400 and refused.json()["type"] == "load_failed"
        assert client.get("/v2/health/ready").status_code == 503


def test_a_single_file_is_polled_and_reloaded_when_it_changes(tmp_path: Path) -> None:
    model = classifier(tmp_path / "m.onnx", scale=1.0, metadata=metadata_for(COLOURS, 32))
    settings = cpu_settings(model, model_control="poll", repository_poll_s=0.1)
    with ready_client(settings) as client:
        path = "/v1/classify?probabilities=true"
        first = classify(client, path).json()["predictions"][0]["probabilities"]
        np.testing.assert_allclose(first, colours_probabilities(1.0), atol=1e-6)
        staged = classifier(tmp_path / "next.onnx", scale=2.0, metadata=metadata_for(COLOURS, 32))
        staged.replace(model)  # write then rename, as the docs ask
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            now = classify(client, path).json()["predictions"][0]["probabilities"]
            if np.allclose(now, colours_probabilities(2.0), atol=1e-6):
                break
            time.sleep(0.05)
        np.testing.assert_allclose(now, colours_probabilities(2.0), atol=1e-6)
        time.sleep(0.3)  # the replaced pipeline has closed: the version's series remain
        metrics = client.get("/metrics").text
        assert 'vit_model_ready{model="foreign",version="1"} 1.0' in metrics
        assert 'vit_queue_depth_images{model="foreign",version="1"}' in metrics


def test_a_version_reloaded_without_a_self_test_has_no_self_test_series(tmp_path: Path) -> None:
    expected = (tuple(float(p) for p in colours_probabilities(1.0)),)
    self_test = SelfTest(
        images=(base64.b64encode(PHOTO).decode(),), probabilities=expected, tolerance=1e-4
    )
    model = classifier(tmp_path / "m.onnx", metadata=metadata_for(COLOURS, 32, self_test=self_test))
    settings = cpu_settings(model, model_control="poll", repository_poll_s=0.1)
    series = 'vit_model_self_test_passed{model="foreign",version="1"}'
    with ready_client(settings) as client:
        assert f"{series} 1.0" in client.get("/metrics").text
        staged = classifier(tmp_path / "next.onnx", scale=2.0, metadata=metadata_for(COLOURS, 32))
        staged.replace(model)
        deadline = time.monotonic() + 10
        while series in (text := client.get("/metrics").text):
            assert time.monotonic() < deadline, [
                line for line in text.splitlines() if series in line
            ]
            time.sleep(0.05)
        time.sleep(0.3)  # the replaced pipeline has closed: it takes nothing back with it
        assert "vit_model_self_test_passed{" not in client.get("/metrics").text
        assert client.get("/v1/models").json()["models"][0]["self_test"]["status"] == "none"


@pytest.mark.parametrize("older_version", [False, True])
def test_a_serving_versions_file_rewritten_broken_keeps_serving_its_old_session(
    tmp_path: Path, older_version: bool
) -> None:
    """Poll mode: the file of the version being served is replaced by a broken one. The old
    session serves on (no fall back to an older version, no unload) and the index says why."""
    repo = tmp_path / "repo"
    if older_version:
        add_version(repo, "colours", 1, scale=1.0)
    served = add_version(repo, "colours", 2, scale=2.0)
    settings = cpu_settings(repo, admin_token=TOKEN, model_control="poll", repository_poll_s=0.1)
    with ready_client(settings) as client:
        good = served.read_bytes()
        broken = served.with_name(".broken")
        broken.write_bytes(good[: len(good) // 2])
        broken.replace(served)
        deadline = time.monotonic() + 10
        entry: dict[str, Any] = {}
        while time.monotonic() < deadline and "failed" not in entry.get("reason", ""):
            index = client.post("/v2/repository/index", headers=admin()).json()
            entry = next((e for e in index if e["version"] == "2"), {})
            time.sleep(0.05)
        time.sleep(0.5)  # several polls more
        index = client.post("/v2/repository/index", headers=admin()).json()
        assert [(e["version"], e["state"]) for e in index] == [("2", "READY")], index
        assert "a new file failed to load" in index[0]["reason"]
        answer = classify(client, "/v1/models/colours/classify?probabilities=true")
        assert answer.status_code == 200 and answer.json()["model"]["version"] == "2"
        probabilities = answer.json()["predictions"][0]["probabilities"]
        np.testing.assert_allclose(probabilities, colours_probabilities(2.0), atol=1e-6)
        assert client.get("/v2/health/ready").status_code == 200


def test_an_explicit_reload_that_fails_is_400_and_the_old_version_serves_on(repo: Path) -> None:
    settings = cpu_settings(repo, admin_token=TOKEN, model_control="explicit")
    with ready_client(settings) as client:
        served = repo / "colours" / "2" / "model.onnx"
        broken = served.with_name(".broken")
        broken.write_bytes(served.read_bytes()[:100])
        broken.replace(served)
        refused = client.post("/v2/repository/models/colours/load", headers=admin())
        assert refused.status_code == 400 and refused.json()["type"] == "load_failed"
        assert "colours version 2" in refused.json()["error"]
        assert "serving versions: 2" in refused.json()["error"]
        answer = classify(client, "/v1/models/colours/classify")
        assert answer.status_code == 200 and answer.json()["model"]["version"] == "2"


def test_a_policy_that_chooses_no_version_fails_startup_saying_so(repo: Path) -> None:
    settings = cpu_settings(repo, version_policy="specific:99")
    with pytest.raises(ModelLoadFailed, match="specific:99 chooses none of colours's versions"):
        with ready_client(settings):
            pass


def test_only_positive_integers_written_as_such_are_versions(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    add_version(repo, "colours", 1, scale=1.0)
    for odd in ("01", "²", "٩", "0", "1.5"):  # the "9" of Arabic-Indic digits
        shutil.copytree(repo / "colours" / "1", repo / "colours" / odd)
    (repo / "m\n").mkdir()
    shutil.copytree(repo / "colours" / "1", repo / "m\n" / "1")
    assert {name: sorted(versions) for name, versions in scan(repo).items()} == {"colours": [1]}


def test_an_empty_token_is_no_token(repo: Path) -> None:
    settings = cpu_settings(repo, admin_token="", api_token="")
    with ready_client(settings) as client:
        empty = {"Authorization": "Bearer "}
        refused = client.post("/v2/repository/models/colours/unload", headers=empty)
        assert refused.status_code == 403 and "VIT_ADMIN_TOKEN" in refused.json()["error"]
        assert classify(client, "/v1/models/colours/classify").status_code == 200


@pytest.mark.parametrize("policy", ["specific:1,,3", "latest:0", "latest:x", "specific:", "all:2"])
def test_a_malformed_version_policy_is_refused_with_its_usage(policy: str) -> None:
    with pytest.raises(ValueError, match="use latest, latest:N, all or specific:1,3"):
        VersionPolicy.parse(policy)


def test_a_retired_versions_series_all_go(repo: Path) -> None:
    settings = cpu_settings(repo, admin_token=TOKEN, model_control="explicit")
    with ready_client(settings) as client:
        assert classify(client, "/v1/models/colours/classify").status_code == 200
        labelled = 'model="colours",version="2"'
        assert f"vit_images_processed_total{{{labelled}}} 1.0" in client.get("/metrics").text
        assert client.post("/v2/repository/models/colours/unload", headers=admin()).is_success
        deadline = time.monotonic() + 5
        while labelled in (text := client.get("/metrics").text):
            assert time.monotonic() < deadline, [
                line for line in text.splitlines() if labelled in line
            ]
            time.sleep(0.05)
        assert 'model="shapes",version="1"' in text  # the others' stay


def test_the_folder_naming_a_model_is_said_once_at_info(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The layout naming the model is the design, not a fault: no warning for it."""
    caplog.set_level("INFO", logger="service.inference.version_loading")
    with ready_client(cpu_settings(repo)):
        pass
    said = [r for r in caplog.records if "the repository's colours version 2 wins" in r.message]
    assert [r.levelname for r in said] == ["INFO"]


@pytest.mark.parametrize("mode", ["none", "poll"])
def test_load_and_unload_are_refused_outside_explicit_mode(repo: Path, mode: str) -> None:
    settings = cpu_settings(repo, admin_token=TOKEN, model_control=mode)
    with ready_client(settings) as client:
        for action in ("load", "unload"):
            refused = client.post(f"/v2/repository/models/colours/{action}", headers=admin())
            assert refused.status_code == 403, refused.text
            assert f"{action} needs VIT_MODEL_CONTROL=explicit" in refused.json()["error"]
        assert classify(client, "/v1/models/colours/classify").status_code == 200


def test_the_default_route_never_switches_to_another_model(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    add_version(repo, "colours", 1, scale=1.0)
    settings = cpu_settings(repo, admin_token=TOKEN, model_control="explicit")
    with ready_client(settings) as client:
        assert classify(client, "/v1/classify").json()["model"]["name"] == "colours"
        (repo / "shapes" / "1").mkdir(parents=True)
        shutil.copy(DEFAULT_MODEL, repo / "shapes" / "1" / "model.onnx")
        assert client.post("/v2/repository/models/shapes/load", headers=admin()).is_success
        assert classify(client, "/v1/classify").json()["model"]["name"] == "colours"
        assert client.post("/v2/repository/models/colours/unload", headers=admin()).is_success
        gone = classify(client, "/v1/classify")
        assert gone.status_code == 404, gone.text  # not shapes' labels for colours' clients
        assert "no model 'colours' is served (serving: shapes)" in gone.json()["error"]


def test_sessions_are_given_how_a_model_runs_and_not_the_servers_tokens(
    served_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    given: list[object] = []
    real = ModelSession

    def recording(path: Path, options: object, **kwargs: Any) -> Any:
        given.append(options)
        return real(path, options, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loading_module, "ModelSession", recording)
    settings = cpu_settings(served_model, admin_token="admin-secret", api_token="api-secret")
    with ready_client(settings):
        pass
    assert given and all(type(options) is RuntimeOptions for options in given)
    assert all("secret" not in repr(options) for options in given)
    assert given[0] == settings.runtime and settings.runtime.providers == (CPU,)
