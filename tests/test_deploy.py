"""Deployment files checked offline: Kubernetes schemas, the compose schema, and that what they
reference (routes, ports, labels, metrics) is what the service really has."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from opentelemetry.trace import SpanContext, TraceFlags
from prometheus_client.parser import text_string_to_metric_families

from model_export import shapes
from service.metrics import exemplar_of
from service.observability.tracing import wanted
from service.settings import Settings
from tests.conftest import ROOT
from tests.service_support import cpu_settings, ready_client

DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
KUBERNETES_VERSION = "1.33"
# Custom resources: their schemas ship with their operators, not with Kubernetes, so they get the
# structural checks below instead.
CUSTOM_KINDS = {"PodMonitor", "InferenceService"}
DASHBOARD = DOCKER / "grafana" / "dashboards" / "vit-inference.json"


def k8s_resources() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        for resource in yaml.safe_load_all(path.read_text()):
            if resource:
                yield path, resource


def resource(kind: str, path: str) -> dict[str, Any]:
    (found,) = [r for p, r in k8s_resources() if r["kind"] == kind and p.name == path]
    return found


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def env(container_spec: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container_spec.get("env", []) if "value" in e}


@pytest.fixture(scope="module")
def live_metric_names(served_model: Path) -> set[str]:
    """Sample names on /metrics after traffic of every kind the dashboard plots."""
    with ready_client(cpu_settings(served_model)) as client:
        image = shapes.sample(5, 0).data
        assert client.post("/v1/classify", files={"file": ("a.jpg", image)}).status_code == 200
        rejected = client.post("/v1/classify", content=b"", headers={"content-type": "image/png"})
        assert rejected.status_code == 400
        text = client.get("/metrics").text
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def app_routes(served_model: Path) -> set[str]:
    with ready_client(cpu_settings(served_model)) as client:
        paths: set[str] = set(client.get("/openapi.json").json()["paths"])
    return paths | {"/metrics"}


BUILTIN = [(p, r) for p, r in k8s_resources() if r["kind"] not in CUSTOM_KINDS]


@pytest.mark.parametrize(
    "manifest", [r for _, r in BUILTIN], ids=[f"{p.name}:{r['kind']}" for p, r in BUILTIN]
)
def test_every_builtin_manifest_validates_against_the_kubernetes_schema(
    manifest: dict[str, Any],
) -> None:
    kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_the_manifests_cover_what_a_cluster_needs() -> None:
    kinds = {r["kind"] for _, r in k8s_resources()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"} <= kinds
    assert CUSTOM_KINDS <= kinds


def test_kubernetes_validate_rejects_a_broken_deployment() -> None:
    broken = resource("Deployment", "deployment.yaml")
    broken = json.loads(json.dumps(broken))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("path", ["deployment.yaml", "deployment-gpu.yaml"])
def test_deployment_probes_ports_and_drain(path: str, app_routes: set[str]) -> None:
    deployment = resource("Deployment", path)
    pod = deployment["spec"]["template"]["spec"]
    main = container(deployment)
    port_names = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert port_names == {"http": 8000, "grpc": Settings.model_fields["grpc_port"].default}
    for probe in ("startupProbe", "livenessProbe"):
        assert main[probe]["httpGet"]["path"] in app_routes, probe
        assert main[probe]["httpGet"]["port"] == "http", probe
    assert main["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert main["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    # Readiness asks gRPC's health service, which takes a port number, not a name.
    assert main["readinessProbe"]["grpc"]["port"] == port_names["grpc"]
    # The drain fits: preStop delay + the server's own drain bound < the grace period.
    pre_stop = main["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = int(env(main)["VIT_GRACEFUL_SHUTDOWN_S"])
    assert pre_stop + drain < pod["terminationGracePeriodSeconds"]
    # Non-root (the image's numeric user), nothing writable but /tmp.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    assert [m["mountPath"] for m in main["volumeMounts"]] == ["/tmp"]


def test_gpu_deployment_asks_for_a_gpu_and_insists_on_cuda() -> None:
    gpu = container(resource("Deployment", "deployment-gpu.yaml"))
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert env(gpu)["VIT_REQUIRE_CUDA"] == "true"
    assert gpu["image"].endswith(":gpu")
    assert container(resource("Deployment", "deployment.yaml"))["image"].endswith(":cpu")


def test_service_monitor_and_autoscaler_point_at_the_deployment(
    live_metric_names: set[str],
) -> None:
    deployment = resource("Deployment", "deployment.yaml")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = resource("Service", "service.yaml")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http", "grpc"]
    assert service["spec"]["ports"][1]["appProtocol"] == "kubernetes.io/h2c"

    monitor = resource("PodMonitor", "podmonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")

    hpa = resource("HorizontalPodAutoscaler", "hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (pods_metric,) = [
        m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"
    ]
    assert pods_metric in live_metric_names
    rules = yaml.safe_load(resource("ConfigMap", "prometheus-adapter.yaml")["data"]["config.yaml"])
    assert [rule["name"]["as"] for rule in rules["rules"]] == [pods_metric]
    assert rules["rules"][0]["seriesQuery"].startswith(pods_metric + "{")


def test_kserve_predictor_runs_the_image_on_kserves_port(app_routes: set[str]) -> None:
    isvc = resource("InferenceService", "inferenceservice.yaml")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    (predictor,) = isvc["spec"]["predictor"]["containers"]
    assert predictor["name"] == "kserve-container"
    assert predictor["image"] == container(resource("Deployment", "deployment.yaml"))["image"]
    port = predictor["ports"][0]["containerPort"]
    assert env(predictor)["VIT_PORT"] == str(port)
    assert predictor["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": port}
    assert "/v2/models/{name}/infer" in app_routes


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema with its vendored copy of the compose-spec schema (offline)."""
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    return subprocess.run([*command, str(path)], capture_output=True, text=True)


@pytest.mark.parametrize("path", ["compose.yaml", "compose.gpu.yaml", "compose.repository.yaml"])
def test_compose_files_match_the_compose_schema(path: str) -> None:
    result = check_compose_schema(DOCKER / path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_schema_check_can_fail(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text("services:\n  vit:\n    ports: 8000\n    stop_grace_period: [30]\n")
    assert check_compose_schema(broken).returncode != 0


def test_compose_wires_prometheus_and_grafana_to_the_service() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"vit", "prometheus", "grafana"} <= set(services)
    scrape = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["vit:8000"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    datasources = yaml.safe_load(
        (DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text()
    )
    (source,) = datasources["datasources"]
    assert source["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    used = {p["datasource"]["uid"] for p in dashboard["panels"]}
    assert used == {source["uid"]}
    gpu = yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text())["services"]["vit"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_every_metric_the_dashboard_queries_exists_on_a_live_service(
    live_metric_names: set[str],
) -> None:
    queried = {name for expr in dashboard_queries() for name in re.findall(r"\bvit_\w+", expr)}
    assert len(queried) >= 10
    assert queried <= live_metric_names, queried - live_metric_names


def test_the_dashboards_route_filter_matches_the_inference_routes(app_routes: set[str]) -> None:
    patterns = {m for expr in dashboard_queries() for m in re.findall(r'route=~"([^"]+)"', expr)}
    (pattern,) = patterns
    matched = {route for route in app_routes if re.fullmatch(pattern, route)}
    from service.http.routers import inference_router

    assert matched == {route.path for route in inference_router.routes}  # type: ignore[attr-defined]
    assert "/v1/models/{name}/versions/{version}/classify" in matched


def test_compose_sends_traces_to_jaeger_and_grafana_links_exemplars_to_them() -> None:
    """The service's OTEL_* variables turn tracing on and point at the tracing backend's OTLP
    port; Prometheus keeps exemplars; Grafana's Prometheus datasource opens an exemplar's
    trace_id (the label the service writes) in the tracing datasource; the latency panels show
    exemplars."""
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    environment = services["vit"]["environment"]
    assert wanted(environment)
    endpoint = urllib.parse.urlsplit(environment["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert (endpoint.hostname, endpoint.port) == ("jaeger", 4318)  # Jaeger's OTLP/HTTP port
    assert "jaeger" in services and "jaeger" in services["grafana"]["depends_on"]
    assert "--enable-feature=exemplar-storage" in services["prometheus"]["command"]
    provisioned = DOCKER / "grafana/provisioning/datasources"
    sources = [
        source
        for path in sorted(provisioned.glob("*.yaml"))
        for source in yaml.safe_load(path.read_text())["datasources"]
    ]
    by_uid = {source["uid"]: source for source in sources}
    (link,) = by_uid["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    exemplar = exemplar_of(SpanContext(1, 2, False, TraceFlags(TraceFlags.SAMPLED)))
    assert exemplar is not None and link["name"] in exemplar and link["name"] == "trace_id"
    assert by_uid[link["datasourceUid"]]["url"] == "http://jaeger:16686"
    dashboard = json.loads(DASHBOARD.read_text())
    latency = [p for p in dashboard["panels"] if "latency" in p["title"].lower()]
    assert latency and all(t.get("exemplar") for p in latency for t in p["targets"])
