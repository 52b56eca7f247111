"""/metrics: parses as Prometheus text, and every counter moves by exactly what happened."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from model_export import shapes
from tests.images import upload_variety, with_orientation
from tests.service_support import cpu_settings, ready_client

UPLOADS = upload_variety()


@pytest.fixture()
def client(served_model: Path) -> Iterator[TestClient]:
    with ready_client(cpu_settings(served_model)) as client:
        yield client


def samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on /metrics, keyed by name and sorted labels."""
    text = client.get("/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    all_samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return all_samples.get((name, tuple(sorted(labels.items()))), 0.0)


MODEL = {"model": "shapes-vit", "version": "1"}
"""The labels of every series the served model version writes."""


def test_counters_move_by_exactly_what_was_sent(client: TestClient) -> None:
    before = samples(client)
    files = [("file", (f"{n}.img", UPLOADS[n][0], UPLOADS[n][1])) for n in ("jpeg", "png-rgba")]
    assert client.post("/v1/classify", files=files).status_code == 200
    rotated = with_orientation(shapes.render(5, 5)[0], 6)
    assert (
        client.post(
            "/v1/classify", content=rotated, headers={"content-type": "image/png"}
        ).status_code
        == 200
    )
    assert (
        client.post("/v1/classify", content=b"", headers={"content-type": "image/png"}).status_code
        == 400
    )
    assert (
        client.post(
            "/v1/classify", content=b"x", headers={"content-type": "text/plain"}
        ).status_code
        == 415
    )
    after = samples(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    for code, count in (("200", 2), ("400", 1), ("415", 1)):
        http = {"method": "POST", "route": "/v1/classify", "code": code}
        assert delta("vit_requests_total", **http) == count, code
        assert delta("vit_request_duration_seconds_count", **http, model="shapes-vit") == count
    assert delta("vit_images_processed_total", **MODEL) == 3
    assert delta("vit_rejections_total", reason="empty_body") == 1
    assert delta("vit_rejections_total", reason="unsupported_media_type") == 1
    assert delta("vit_input_images_total", **MODEL, format="JPEG") == 1
    assert delta("vit_input_images_total", **MODEL, format="PNG") == 2
    assert delta("vit_input_exif_rotated_images_total", **MODEL) == 1
    assert delta("vit_input_mode_converted_images_total", **MODEL, mode="RGBA") == 1
    assert delta("vit_top1_probability_ratio_count", **MODEL) == 3
    assert (
        sum(delta("vit_predicted_class_total", **MODEL, label=label) for label in shapes.LABELS)
        == 3
    )
    assert delta("vit_batch_size_images_count", **MODEL) == 2
    assert delta("vit_batch_size_images_sum", **MODEL) == 3
    assert delta("vit_stage_duration_seconds_count", **MODEL, stage="decode_preprocess") == 3
    assert delta("vit_stage_duration_seconds_count", **MODEL, stage="inference") == 2
    assert delta("vit_stage_duration_seconds_count", **MODEL, stage="queue_wait") == 2


def test_model_info_and_gauges(client: TestClient) -> None:
    current = samples(client)
    (info,) = [labels for (name, labels) in current if name == "vit_model_info"]
    info_labels = dict(info)
    assert (info_labels["model"], info_labels["version"]) == ("shapes-vit", "1")
    model = client.get("/v1/models").json()["models"][0]
    assert info_labels["sha256"] == model["sha256"] and info_labels["provider"] == model["provider"]
    assert value(current, "vit_model_fallbacks", **MODEL) == len(model["fallbacks"])
    assert value(current, "vit_queue_depth_images", **MODEL) == 0
    assert value(current, "vit_requests_in_flight") == 1  # the /metrics request itself


def test_health_routes_are_counted(client: TestClient) -> None:
    before = samples(client)
    assert client.get("/v2/health/ready").status_code == 200
    after = samples(client)
    http = {"method": "GET", "route": "/v2/health/ready", "code": "200"}
    assert (
        value(after, "vit_requests_total", **http) - value(before, "vit_requests_total", **http)
        == 1
    )


def test_a_fresh_server_has_measured_no_traffic_before_its_first_request(
    client: TestClient,
) -> None:
    """Warm-up and the self-test's golden images are the service's own, not its clients'."""
    fresh = samples(client)
    assert value(fresh, "vit_model_self_test_passed", **MODEL) == 1
    for name, labels in [
        ("vit_input_images_total", {"format": "PNG"}),
        ("vit_stage_duration_seconds_count", {"stage": "decode_preprocess"}),
        ("vit_stage_duration_seconds_count", {"stage": "queue_wait"}),
        ("vit_stage_duration_seconds_count", {"stage": "inference"}),
        ("vit_batch_size_images_count", {}),
    ]:
        assert value(fresh, name, **MODEL, **labels) == 0, name
    headers = {"content-type": "image/png"}
    sent = client.post("/v1/classify", content=UPLOADS["png-rgba"][0], headers=headers)
    assert sent.status_code == 200, sent.text
    after = samples(client)
    assert value(after, "vit_input_images_total", **MODEL, format="PNG") == 1
    for stage in ("decode_preprocess", "queue_wait", "inference"):
        assert value(after, "vit_stage_duration_seconds_count", **MODEL, stage=stage) == 1, stage
    assert value(after, "vit_batch_size_images_count", **MODEL) == 1
