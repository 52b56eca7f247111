"""The schedule benchmark's medians, its ratios to the peers and the table it writes."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.schedule import MODELS, report, summary


def round_of(model: str, server: str, rate: float, p50: float, p99: float) -> dict[str, Any]:
    result: dict[str, Any] = {
        "model": model,
        "server": server,
        "16": {"images_per_second": rate, "p50_ms": p50, "p99_ms": p99},
        "1": {"p50_ms": p50 / 10},
    }
    if server == "service":
        result["engine_choice"] = f"{model}: one image per call, 2 at once"
    return result


def rounds() -> list[dict[str, Any]]:
    """Two rounds per model: the service at 11 and 13 images/s, KServe at 10, the naive app at
    8 and 12."""
    made = []
    for model in MODELS:
        for service, naive in ((11.0, 8.0), (13.0, 12.0)):
            made += [
                round_of(model, "service", service, 1000, 1200),
                round_of(model, "kserve", 10.0, 1500, 4500),
                round_of(model, "naive", naive, 1400, 2000),
            ]
    return made


def test_medians_over_rounds_and_ratios_to_each_peer() -> None:
    table = summary(rounds())
    assert set(table) == set(MODELS)
    for rows in table.values():
        service = rows["service"]
        assert service["images_per_second_16"] == pytest.approx(12.0)
        assert service["vs_kserve_16"] == pytest.approx(1.2)
        assert service["vs_naive_16"] == pytest.approx(12.0 / 10.0)
        assert service["p50_ms_1"] == pytest.approx(100.0)
        assert rows["kserve"]["vs_kserve_16"] == pytest.approx(1.0)
        assert service["rounds"] == rows["naive"]["rounds"] == 2


def test_the_table_shows_each_server_and_what_the_service_chose() -> None:
    text = report(rounds(), summary(rounds()), "python -m benchmarks.schedule")
    assert "`python -m benchmarks.schedule`" in text
    for model in MODELS:
        assert f"## {model} FP32" in text
        assert f"- {model}: one image per call, 2 at once" in text
    assert "| service | 12.00 | 1000 / 1200 | 1.20 | 1.20x | 1.20x | 100 |" in text
    assert "| kserve | 10.00 | 1500 / 4500 | 3.00 | 1.00x |" in text
