"""Every series a live server exports follows Prometheus' naming and labelling conventions, and
`promtool check metrics` finds no problem in the exposition."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from harness.otlp_receiver import otlp_receiver
from harness.servers import served
from model_export import shapes
from service.app import create_app
from service.http.middleware import STATIC_ROUTE, UNMATCHED_ROUTE
from tests.conftest import ROOT
from tests.service_support import cpu_settings

PROMTOOL = shutil.which("promtool")
JPEG = shapes.sample(11, 0).data
UNKNOWN_MODEL = "no-such-model"

TRAFFIC = [
    # method, path, body, content type, status
    ("POST", "/v1/classify", JPEG, "image/jpeg", 200),
    ("POST", "/v1/classify", b"x", "text/plain", 415),
    ("POST", f"/v1/models/{UNKNOWN_MODEL}/classify", JPEG, "image/jpeg", 404),
    ("PROPFIND", "/v1/classify", None, None, 405),
    ("GET", "/no/such/page", None, None, 404),
    ("GET", "/openapi.json", None, None, 200),
    ("GET", "/static/web/app.js", None, None, 200),
    ("GET", "/static/docs/swagger-ui.css", None, None, 200),
]
RAW_PATHS = {path for _, path, *_ in TRAFFIC} - {"/v1/classify", "/openapi.json"}
"""The paths sent that are no route's template: none may turn up as a label value."""
OWN_ROUTES = {"/v2/health/ready", "/metrics"}
"""Routes the test's harness calls besides TRAFFIC: waiting for readiness, and scraping."""
UNDOCUMENTED_ROUTES = {"/", "/docs", "/metrics", "/openapi.json"}
"""The routes outside the OpenAPI schema, besides the files under /static/."""

BASE_UNITS = ("seconds", "bytes", "ratio")
OTHER_UNITS = {"ms", "milliseconds", "microseconds", "minutes", "hours", "kilobytes", "percent"}
QUANTITIES = {
    "duration": "seconds",
    "latency": "seconds",
    "memory": "bytes",
    "probability": "ratio",
}
"""Words that name a measured quantity, and the base unit a name holding one must end in."""
LABEL_NAME = re.compile(r"[a-z][a-z0-9_]*")
IDENTIFIER = re.compile(r"[\w.:+/-]*")
MAX_LABEL_VALUE = 64  # a sha256 in hex


@dataclass
class Exposition:
    """One scrape of a live server that has answered TRAFFIC."""

    text: str
    types: dict[str, str]
    """Each family's name, as its TYPE line gives it, and its type."""
    samples: list[Sample]
    server_pid: int

    def traffic(self) -> float:
        """Requests counted but those of the health and metrics routes."""
        return sum(
            s.value
            for s in self.samples
            if s.name == "vit_requests_total" and s.labels["route"] not in OWN_ROUTES
        )


@pytest.fixture(scope="module")
def exposition(served_model: Path) -> Iterator[Exposition]:
    # TensorRT asked for on a CPU machine falls back: the info metric must not carry the reason.
    # Traces on, to a receiver: the export's own families are exported and checked too.
    with (
        otlp_receiver() as (endpoint, _),
        served(
            served_model,
            ROOT,
            environment={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint},
            tensorrt="true",
        ) as server,
    ):
        for method, path, body, content_type, status in TRAFFIC:
            headers = {"Content-Type": content_type} if content_type else {}
            request = urllib.request.Request(
                server.url + path, data=body, headers=headers, method=method
            )
            assert answer_status(request) == status, (method, path)
        # A file's request is counted a moment after its last byte left: scrape once all are.
        deadline = time.monotonic() + 10
        while (scraped := scrape(server.url, server.process.pid)).traffic() < len(TRAFFIC):
            assert time.monotonic() < deadline, "the requests sent were never all counted"
            time.sleep(0.05)
        yield scraped


def scrape(url: str, server_pid: int) -> Exposition:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return Exposition(
        text=text,
        types=dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE ")),
        samples=[s for f in text_string_to_metric_families(text) for s in f.samples],
        server_pid=server_pid,
    )


def answer_status(request: urllib.request.Request) -> int:
    """The answer's status, once all of it is read (the server counts it once it is sent)."""
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
            status: int = response.status
            return status
    except urllib.error.HTTPError as error:
        error.read()
        return error.code


def value(exposition: Exposition, name: str, **labels: str) -> float | None:
    """The value of the one series `name{labels}` (all of its labels given), or None."""
    found = [s.value for s in exposition.samples if s.name == name and s.labels == labels]
    assert len(found) <= 1
    return found[0] if found else None


def started_at(pid: int) -> float:
    """When process `pid` started, in seconds since the epoch, read from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    boot = next(
        float(line.split()[1])
        for line in Path("/proc/stat").read_text().splitlines()
        if line.startswith("btime ")
    )
    return boot + float(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime


def test_counters_end_in_total_and_nothing_has_a_created_twin(exposition: Exposition) -> None:
    for name, kind in exposition.types.items():
        assert name.endswith("_total") == (kind == "counter"), (name, kind)
    assert not [s.name for s in exposition.samples if s.name.endswith("_created")]
    assert "_created" not in exposition.text


def test_names_end_in_their_base_unit(exposition: Exposition) -> None:
    for name in exposition.types:
        words = name.removesuffix("_total").split("_")
        assert not OTHER_UNITS & set(words), name
        for unit in BASE_UNITS:
            assert unit not in words or words[-1] == unit, name
        for quantity, unit in QUANTITIES.items():
            assert quantity not in words or words[-1] == unit, name
    assert exposition.types["vit_top1_probability_ratio"] == "histogram"
    assert exposition.types["vit_body_in_flight_bytes"] == "gauge"


def test_the_standard_families_describe_the_server_process(exposition: Exposition) -> None:
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "python_gc_collections_total",
    ):
        assert name in exposition.types, name
    assert [s.labels["implementation"] for s in exposition.samples if s.name == "python_info"]
    started = value(exposition, "process_start_time_seconds")
    assert started == pytest.approx(started_at(exposition.server_pid), abs=0.02)
    assert started != pytest.approx(started_at(os.getpid()), abs=0.02)  # not the test's own


def test_requests_are_labelled_by_method_route_template_and_code(
    exposition: Exposition, served_model: Path
) -> None:
    for method, route, code in [
        ("POST", "/v1/classify", "200"),
        ("POST", "/v1/classify", "415"),
        ("POST", "/v1/models/{name}/classify", "404"),  # a route's own 404: no such model
        ("other", "/v1/classify", "405"),  # a method outside the usual few
        ("GET", UNMATCHED_ROUTE, "404"),  # no route at all
        ("GET", "/openapi.json", "200"),
        ("GET", "/static/{path}", "200"),
    ]:
        http = {"method": method, "route": route, "code": code}
        count = 2 if route == STATIC_ROUTE else 1
        assert value(exposition, "vit_requests_total", **http) == count, http
    documented = create_app(cpu_settings(served_model)).openapi()["paths"]
    templates = {*documented, *UNDOCUMENTED_ROUTES, STATIC_ROUTE, UNMATCHED_ROUTE}
    for sample in exposition.samples:
        if sample.name.startswith("vit_request"):
            assert "status" not in sample.labels, sample
        if "route" in sample.labels:
            assert sample.labels["route"] in templates, sample
        assert not RAW_PATHS & set(sample.labels.values()), sample
    assert UNKNOWN_MODEL not in exposition.text and "PROPFIND" not in exposition.text


def test_request_durations_name_the_model_that_served(exposition: Exposition) -> None:
    durations = [s for s in exposition.samples if s.name == "vit_request_duration_seconds_count"]
    assert {frozenset(s.labels) for s in durations} == {
        frozenset({"method", "route", "code", "model"})
    }
    assert {s.labels["model"] for s in durations} == {"", "shapes-vit"}
    for code, model in [("200", "shapes-vit"), ("415", "shapes-vit")]:
        http = {"method": "POST", "route": "/v1/classify", "code": code}
        assert value(exposition, "vit_request_duration_seconds_count", **http, model=model) == 1
    unknown = {"method": "POST", "route": "/v1/models/{name}/classify", "code": "404"}
    assert value(exposition, "vit_request_duration_seconds_count", **unknown, model="") == 1


def test_label_names_and_values_are_short_identifiers(exposition: Exposition) -> None:
    for sample in exposition.samples:
        for name, label in sample.labels.items():
            assert LABEL_NAME.fullmatch(name), (sample.name, name)
            assert len(label) <= MAX_LABEL_VALUE, (sample.name, name, label)
            if sample.name.endswith("_info"):
                assert IDENTIFIER.fullmatch(label), (sample.name, name, label)
    fallbacks = value(exposition, "vit_model_fallbacks", model="shapes-vit", version="1")
    assert fallbacks is not None and fallbacks >= 1  # the fallback is counted, not described


def mentioned_metrics() -> set[str]:
    """The `vit_` series the docs, the deployment files and the tools name: in Markdown those
    in code spans (`vit_tools/` is a folder), elsewhere every one, or every quoted one in Python."""
    markdown = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    deployment = [f for f in (ROOT / "docker").rglob("*") if f.suffix in {".json", ".yaml", ".yml"}]
    tools = [*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "vit_tools").glob("*.py")]
    found: set[str] = set()
    for files, pattern in [
        (markdown, r"`(vit_\w+)[`{]"),
        (deployment, r"\b(vit_\w+)"),
        (tools, r"[\"'](vit_\w+)"),
    ]:
        for file in files:
            found.update(re.findall(pattern, file.read_text()))
    return found


def test_every_metric_the_docs_and_deployment_name_is_exported(exposition: Exposition) -> None:
    """Renaming a metric without its dashboard, autoscaler rule or docs fails here."""
    mentioned = mentioned_metrics()
    assert {"vit_queue_depth_images", "vit_requests_total", "vit_model_info"} <= mentioned
    for name in mentioned:
        families = [name, *(name.removesuffix(s) for s in ("_bucket", "_sum", "_count"))]
        assert any(family in exposition.types for family in families), name


@pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian's prometheus package) is missing")
def test_promtool_finds_no_problem(exposition: Exposition) -> None:
    assert PROMTOOL is not None
    checked = subprocess.run(
        [PROMTOOL, "check", "metrics"],
        input=exposition.text,
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = (checked.stdout + checked.stderr).strip()
    assert checked.returncode == 0 and not problems, problems
