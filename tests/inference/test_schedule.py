"""The schedule the load-time measurement chooses: where calls of one image each, side by side,
do nearly what batches do (a large model on a CPU), every call holds one image, so no request
waits behind another's long batch."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from model_export import shapes
from model_runtime.engine_choice import Candidate, Timing
from tests.service_support import cpu_settings, ready_client


def batch_sizes(text: str) -> tuple[float, float]:
    """Calls made and images they held, from /metrics."""
    calls = images = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "vit_batch_size_images_count":
                calls += sample.value
            elif sample.name == "vit_batch_size_images_sum":
                images += sample.value
    return calls, images


def test_a_model_that_batching_does_not_help_runs_one_image_per_call(
    served_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def timed(candidate: Candidate, *args: object) -> Timing:
        # Two calls of 8 images at once: 10 images/s (1.6 s a batch); of one image each: 9.5.
        return Timing(
            candidate,
            images_per_second=10.0,
            lone_ms=150.0,
            batch=8,
            calls=2,
            singles_per_second=9.5,
        )

    monkeypatch.setattr("model_runtime.session.time_candidate", timed)
    images = [shapes.sample(31, i).data for i in range(24)]
    with ready_client(cpu_settings(served_model)) as client:
        (model,) = client.get("/v1/models").json()["models"]
        assert model["runtime"]["batch"] == "one image per call"
        assert model["runtime"]["inference_workers"] == "2"
        assert "one image per call, 2 at once" in model["engine_choice"]
        before = batch_sizes(client.get("/metrics").text)

        def post(data: bytes) -> int:
            response = client.post(
                "/v1/classify", content=data, headers={"content-type": "image/jpeg"}
            )
            return response.status_code

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(post, images)) == {200}
        files = [("file", (f"{i}.jpg", data)) for i, data in enumerate(images[:4])]
        assert client.post("/v1/classify", files=files).status_code == 200
        after = batch_sizes(client.get("/metrics").text)
    calls, held = after[0] - before[0], after[1] - before[1]
    assert held == len(images) + 4
    assert calls == held, "every call held one image"
