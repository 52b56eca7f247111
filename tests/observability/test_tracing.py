"""Traces against a real OTLP receiver on loopback that decodes the protocol's protobuf: a
request continues its client's trace through every stage, requests batched together share one
inference span linked to each, latencies carry their trace as an exemplar, and a dead
collector changes no answer."""

from __future__ import annotations

import json
import re
import secrets
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from harness.otlp_receiver import ReceivedSpan, Receiver, otlp_grpc_receiver, otlp_receiver
from harness.servers import Server, free_port, served
from service.app import create_app
from service.observability.tracing import (
    DEFAULT_SERVICE_NAME,
    Tracing,
    TracingMisconfigured,
    wanted,
)
from tests.conftest import ROOT
from tests.service_support import cpu_settings, ready_client

SERVER_KIND = 2  # SPAN_KIND_SERVER in OTLP
STAGES = ("read_body", "decode", "queue_wait", "inference")
EXPORT_SOON = {"OTEL_BSP_SCHEDULE_DELAY": "50"}
"""Spans leave the queue every 50 ms instead of every 5 s."""


def traceparent() -> tuple[str, str, str]:
    """A client's sampled W3C trace context: (header, trace id, span id)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def photo() -> bytes:
    return (ROOT / "examples" / "star.jpg").read_bytes()


def classify(server: Server, header: str | None = None, route: str = "/v1/classify") -> dict:
    headers = {"Content-Type": "image/jpeg", **({"traceparent": header} if header else {})}
    request = urllib.request.Request(server.url + route, data=photo(), headers=headers)
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def in_trace(spans: list[ReceivedSpan], trace_id: str) -> dict[str, list[ReceivedSpan]]:
    found: dict[str, list[ReceivedSpan]] = {}
    for span in spans:
        if span.trace_id == trace_id:
            found.setdefault(span.name, []).append(span)
    return found


def complete(trace_id: str, server_span: str) -> Callable[[list[ReceivedSpan]], bool]:
    """Whether a request's trace has arrived whole: its server span and every stage."""

    def check(spans: list[ReceivedSpan]) -> bool:
        names = in_trace(spans, trace_id)
        return server_span in names and all(stage in names for stage in STAGES)

    return check


@pytest.fixture(scope="module")
def traced(served_model: Path) -> Iterator[tuple[Server, Receiver]]:
    """A server exporting to the receiver; two requests at once ride in one batch."""
    with otlp_receiver() as (endpoint, receiver):
        environment = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, **EXPORT_SOON}
        with served(
            served_model,
            ROOT,
            environment=environment,
            max_batch_delay_ms="300",
            inference_workers="1",
        ) as server:
            yield server, receiver


def test_tracing_is_on_only_where_the_standard_variables_ask() -> None:
    assert not wanted({})
    assert wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"})
    assert wanted({"OTEL_TRACES_EXPORTER": "console"})
    assert not wanted({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"})
    assert not wanted({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"})


@pytest.mark.parametrize(
    ("environ", "said"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER='zipkin'"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "OTLP protocol 'http/json'",
        ),
    ],
)
def test_what_it_cannot_export_is_refused_saying_what(environ: dict[str, str], said: str) -> None:
    with pytest.raises(TracingMisconfigured, match=re.escape(said)):
        Tracing.from_environment(environ)


def test_off_no_tracing_code_is_installed(served_model: Path) -> None:
    """No middleware, and a client's trace context changes nothing: no exemplar links to it."""
    app = create_app(cpu_settings(served_model))
    assert "RequestTracing" not in [getattr(m.cls, "__name__", "") for m in app.user_middleware]
    header, trace_id, _ = traceparent()
    with ready_client(cpu_settings(served_model)) as client:
        answer = client.post(
            "/v1/classify",
            content=photo(),
            headers={"Content-Type": "image/jpeg", "traceparent": header},
        )
        assert answer.status_code == 200
        scrape = client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert trace_id not in scrape.text and "trace_id" not in scrape.text


def test_a_request_continues_its_clients_trace_through_every_stage(
    traced: tuple[Server, Receiver],
) -> None:
    server, receiver = traced
    header, trace_id, client_span = traceparent()
    classify(server, header)
    spans = receiver.wait_for(complete(trace_id, "POST /v1/classify"))
    names = in_trace(spans, trace_id)
    (request,) = names["POST /v1/classify"]
    assert request.parent_span_id == client_span and request.kind == SERVER_KIND
    assert request.attributes["http.request.method"] == "POST"
    assert request.attributes["http.route"] == "/v1/classify"
    assert request.attributes["http.response.status_code"] == 200
    assert request.attributes["vit.model.name"] == "shapes-vit"
    assert request.resource["service.name"] == DEFAULT_SERVICE_NAME
    for stage in STAGES:
        (span,) = names[stage]
        assert span.parent_span_id == request.span_id, stage
        assert request.start_ns <= span.start_ns <= span.end_ns <= request.end_ns, stage
    (decode,) = names["decode"]
    assert decode.attributes["vit.image.bytes"] == len(photo())
    assert decode.attributes["vit.image.pixels"] > 0
    assert decode.attributes["vit.image.format"] == "JPEG"
    (inference,) = names["inference"]
    assert inference.attributes["vit.batch.size"] >= 1
    run = [
        s
        for s in spans
        if s.name == "onnxruntime.run"
        and s.span_id == inference.attributes["vit.inference.span_id"]
    ]
    assert len(run) == 1 and (trace_id, request.span_id) in run[0].links
    assert inference.links == ((run[0].trace_id, run[0].span_id),)


def test_requests_batched_together_share_one_inference_span_linked_to_both(
    traced: tuple[Server, Receiver],
) -> None:
    server, receiver = traced
    contexts = [traceparent() for _ in range(2)]
    threads = [
        threading.Thread(target=classify, args=(server, header)) for header, _, _ in contexts
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    spans = receiver.wait_for(
        lambda got: all(complete(t, "POST /v1/classify")(got) for _, t, _ in contexts)
    )
    requests = [in_trace(spans, t)["POST /v1/classify"][0] for _, t, _ in contexts]
    children = [in_trace(spans, t)["inference"][0] for _, t, _ in contexts]
    shared = {child.attributes["vit.inference.span_id"] for child in children}
    assert len(shared) == 1, "the two requests rode in different calls"
    (run,) = [s for s in spans if s.name == "onnxruntime.run" and s.span_id in shared]
    assert run.attributes["vit.batch.requests"] == 2 and run.attributes["vit.batch.size"] == 2
    assert set(run.links) == {(r.trace_id, r.span_id) for r in requests}
    assert run.trace_id not in {t for _, t, _ in contexts}  # a trace of its own, linked to both


def test_a_grpc_call_continues_the_trace_in_its_metadata(traced: tuple[Server, Receiver]) -> None:
    server, receiver = traced
    header, trace_id, client_span = traceparent()
    client = triton.InferenceServerClient(server.grpc_target)
    image = triton.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([photo()], dtype=np.object_))
    client.infer("shapes-vit", [image], headers={"traceparent": header})
    name = "inference.GRPCInferenceService/ModelInfer"
    spans = receiver.wait_for(
        lambda got: (
            name in in_trace(got, trace_id)
            and all(stage in in_trace(got, trace_id) for stage in STAGES[1:])
        )
    )
    names = in_trace(spans, trace_id)
    (call,) = names[name]
    assert call.parent_span_id == client_span and call.kind == SERVER_KIND
    assert call.attributes["rpc.system"] == "grpc" and call.attributes["rpc.method"] == "ModelInfer"
    assert call.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    for stage in STAGES[1:]:
        assert names[stage][0].parent_span_id == call.span_id, stage


def test_latencies_carry_their_trace_as_an_exemplar_when_the_scraper_asks(
    traced: tuple[Server, Receiver],
) -> None:
    server, _ = traced
    header, trace_id, _ = traceparent()
    classify(server, header)
    openmetrics = urllib.request.Request(
        server.url + "/metrics", headers={"Accept": "application/openmetrics-text"}
    )
    with urllib.request.urlopen(openmetrics) as answer:
        assert answer.headers["Content-Type"].startswith("application/openmetrics-text")
        exposition = answer.read().decode()
    linked = [line for line in exposition.splitlines() if f'trace_id="{trace_id}"' in line]
    families = {line.split("{")[0] for line in linked}
    assert "vit_request_duration_seconds_bucket" in families
    stages = {re.search(r'stage="(\w+)"', line).group(1) for line in linked if "stage=" in line}  # type: ignore[union-attr]
    assert stages >= {"read_body", "decode_preprocess", "queue_wait"}
    with urllib.request.urlopen(server.url + "/metrics") as plain:
        assert "trace_id" not in plain.read().decode()  # the text format has no exemplars


def test_a_dead_collector_changes_no_answer_and_the_spans_lost_are_counted(
    served_model: Path,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    environment = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": dead,
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
        "OTEL_BSP_MAX_QUEUE_SIZE": "8",
        **EXPORT_SOON,
    }
    with served(served_model, ROOT) as plain:
        expected = classify(plain)
    with served(served_model, ROOT, environment=environment) as server:
        answers = [classify(server, traceparent()[0]) for _ in range(20)]
        with urllib.request.urlopen(server.url + "/metrics") as scrape:
            exposition = scrape.read().decode()
    for answer in answers:
        assert answer["predictions"] == expected["predictions"]
    lost = sum(
        float(line.split()[-1])
        for line in exposition.splitlines()
        if line.startswith("vit_trace_spans_dropped_total")
    )
    assert lost > 0


def test_the_sampler_and_the_resource_come_from_the_standard_variables(
    served_model: Path,
) -> None:
    with otlp_receiver() as (endpoint, receiver):
        environment = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0",
            "OTEL_SERVICE_NAME": "vit-for-cameras",
            **EXPORT_SOON,
        }
        with served(served_model, ROOT, environment=environment) as server:
            classify(server)  # no parent, ratio 0: not sampled
            header, trace_id, _ = traceparent()
            classify(server, header)  # a sampled parent: sampled, as the parent says
            spans = receiver.wait_for(complete(trace_id, "POST /v1/classify"))
    requests = [s for s in spans if s.kind == SERVER_KIND]
    assert {s.trace_id for s in requests} == {trace_id}
    assert all(s.resource["service.name"] == "vit-for-cameras" for s in spans)


def test_traces_go_over_otlp_grpc_when_the_protocol_says_so(served_model: Path) -> None:
    with otlp_grpc_receiver() as (endpoint, receiver):
        environment = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
            **EXPORT_SOON,
        }
        with served(served_model, ROOT, environment=environment) as server:
            header, trace_id, client_span = traceparent()
            classify(server, header)
            spans = receiver.wait_for(complete(trace_id, "POST /v1/classify"))
    (request,) = in_trace(spans, trace_id)["POST /v1/classify"]
    assert request.parent_span_id == client_span


def test_a_request_its_client_did_not_sample_makes_no_span(
    traced: tuple[Server, Receiver],
) -> None:
    server, receiver = traced
    unsampled_trace = secrets.token_hex(16)
    classify(server, f"00-{unsampled_trace}-{secrets.token_hex(8)}-00")
    header, trace_id, _ = traceparent()
    classify(server, header)  # sampled, after: once it is in, the other would have been too
    spans = receiver.wait_for(complete(trace_id, "POST /v1/classify"))
    assert not [s for s in spans if s.trace_id == unsampled_trace]
    assert not [s for s in spans if any(link[0] == unsampled_trace for link in s.links)]
