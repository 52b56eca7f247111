"""The Open Inference Protocol over gRPC, through `tritonclient.grpc` unchanged, against a
`vit-serve` subprocess: the same numbers as HTTP's routes, the same refusals, each with its
gRPC status."""

from __future__ import annotations

import base64
import json
import re
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from harness.servers import Server, free_port, served
from model_contract.preprocess import preprocess
from model_runtime.options import IN_PROCESS
from model_runtime.session import ModelSession
from service.grpc import oip_pb2 as pb
from tests.conftest import ROOT
from tests.images import upload_variety
from tests.repositories import COLOURS, PHOTO, TOKEN, add_version, colours_probabilities

UPLOADS = upload_variety()
INFER = "/inference.GRPCInferenceService/ModelInfer"
ENGINES = 1e-5
"""One image's embedding through the engine that runs batches and the one that runs a lone
image: float32 rounding apart (~2e-6 seen)."""
OCTET = "application/octet-stream"
"""An upload known by its content, whatever its format."""
EXACT = 1e-6
"""gRPC against HTTP: the same session, batcher and bytes; only float32 rounding may differ."""


@pytest.fixture(scope="module")
def server(served_model: Path) -> Iterator[Server]:
    with served(
        served_model, ROOT, grpc_max_message_bytes="2000000", body_timeout_s="2"
    ) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: Server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.grpc_target)


@pytest.fixture(scope="module")
def http(server: Server) -> triton_http.InferenceServerClient:
    return triton_http.InferenceServerClient(server.url.removeprefix("http://"))


@pytest.fixture(scope="module")
def reference(served_model: Path) -> ModelSession:
    return ModelSession(served_model, IN_PROCESS)


def photos(count: int) -> list[bytes]:
    return [UPLOADS[name][0] for name in sorted(UPLOADS)[:count]]


def image_input(images: list[bytes], module: object = triton) -> object:
    tensor = module.InferInput("image", [len(images)], "BYTES")  # type: ignore[attr-defined]
    tensor.set_data_from_numpy(np.array(images, dtype=object))
    return tensor


def status_of(error: InferenceServerException) -> str:
    return str(error.status()).removeprefix("StatusCode.")


def refused(call: object, *args: object, **kwargs: object) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as raised:
        call(*args, **kwargs)  # type: ignore[operator]
    return raised.value


def test_live_ready_and_server_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata.name == "vit-inference" and "model_repository" in metadata.extensions


def test_model_metadata_is_the_http_routes(
    client: triton.InferenceServerClient,
    http: triton_http.InferenceServerClient,
    reference: ModelSession,
) -> None:
    name = reference.metadata.name
    over_grpc = client.get_model_metadata(name, as_json=True)
    over_http = http.get_model_metadata(name)
    for key in ("name", "versions", "platform"):
        assert over_grpc[key] == over_http[key]
    for key in ("inputs", "outputs"):
        assert [
            (t["name"], t["datatype"], [int(s) for s in t["shape"]]) for t in over_grpc[key]
        ] == [(t["name"], t["datatype"], t["shape"]) for t in over_http[key]]
    assert client.is_model_ready(name)
    assert client.get_model_metadata(name, reference.metadata.version).versions == [
        reference.metadata.version
    ]


def test_images_give_the_http_routes_numbers(
    client: triton.InferenceServerClient,
    http: triton_http.InferenceServerClient,
    reference: ModelSession,
) -> None:
    images = photos(5)
    name = reference.metadata.name
    answer = client.infer(name, [image_input(images)], request_id="five")
    assert answer.get_response().id == "five"
    over_http = http.infer(name, [image_input(images, triton_http)])
    probabilities = answer.as_numpy("probabilities")
    assert probabilities.shape == (5, len(reference.labels))
    np.testing.assert_allclose(probabilities, over_http.as_numpy("probabilities"), atol=EXACT)
    expected = reference.infer(
        np.concatenate([preprocess(i, reference.metadata.preprocessing) for i in images])
    )
    np.testing.assert_allclose(probabilities, expected["probabilities"], atol=1e-5)


def test_fp32_pixels_give_the_http_routes_numbers(
    client: triton.InferenceServerClient,
    http: triton_http.InferenceServerClient,
    reference: ModelSession,
) -> None:
    spec = reference.metadata.preprocessing
    pixels = np.concatenate([preprocess(image, spec) for image in photos(3)])
    answers = []
    for module, api in ((triton, client), (triton_http, http)):
        tensor = module.InferInput(reference.input_name, list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels)
        answers.append(api.infer(reference.metadata.name, [tensor]).as_numpy("probabilities"))
    np.testing.assert_allclose(answers[0], answers[1], atol=EXACT)
    np.testing.assert_allclose(answers[0], reference.infer(pixels)["probabilities"], atol=1e-5)


def test_typed_contents_are_taken_as_raw_ones_are(server: Server, reference: ModelSession) -> None:
    """Clients other than tritonclient send `contents` rather than raw bytes."""
    spec = reference.metadata.preprocessing
    pixels = preprocess(photos(1)[0], spec)
    request = pb.ModelInferRequest(model_name=reference.metadata.name)
    tensor = request.inputs.add(name=reference.input_name, datatype="FP32", shape=pixels.shape)
    tensor.contents.fp32_contents.extend(pixels.ravel().tolist())
    request.outputs.add(name="probabilities")
    with grpc.insecure_channel(server.grpc_target) as channel:
        answer = pb.ModelInferResponse.FromString(
            channel.unary_unary(INFER)(request.SerializeToString(), timeout=30)
        )
        images = pb.ModelInferRequest(model_name=reference.metadata.name)
        images.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
            photos(1)[0]
        )
        from_bytes = pb.ModelInferResponse.FromString(
            channel.unary_unary(INFER)(images.SerializeToString(), timeout=30)
        )
    (typed,) = answer.raw_output_contents
    (encoded,) = from_bytes.raw_output_contents
    expected = reference.infer(pixels)["probabilities"]
    np.testing.assert_allclose(np.frombuffer(typed, "<f4"), expected[0], atol=1e-5)
    np.testing.assert_allclose(np.frombuffer(encoded, "<f4"), expected[0], atol=1e-5)


def test_explain_outputs_are_asked_for_by_name(
    client: triton.InferenceServerClient,
    http: triton_http.InferenceServerClient,
    reference: ModelSession,
) -> None:
    images = photos(2)
    wanted = ["attention_rollout", "probabilities"]
    answer = client.infer(
        reference.metadata.name,
        [image_input(images)],
        outputs=[triton.InferRequestedOutput(name) for name in wanted],
    )
    assert [o.name for o in answer.get_response().outputs] == wanted
    over_http = http.infer(
        reference.metadata.name,
        [image_input(images, triton_http)],
        outputs=[triton_http.InferRequestedOutput(name) for name in wanted],
    )
    for name in wanted:
        np.testing.assert_allclose(answer.as_numpy(name), over_http.as_numpy(name), atol=EXACT)
    rows, columns = reference.graph.attention_grid or (0, 0)
    assert answer.as_numpy("attention_rollout").shape == (2, rows, columns)


def test_the_embedding_is_asked_for_by_name_and_is_v1s(
    server: Server,
    client: triton.InferenceServerClient,
    http: triton_http.InferenceServerClient,
    reference: ModelSession,
) -> None:
    images = photos(2)
    name = reference.metadata.name
    plain = client.infer(name, [image_input(images)])
    assert [o.name for o in plain.get_response().outputs] == ["probabilities"]
    answer = client.infer(
        name, [image_input(images)], outputs=[triton.InferRequestedOutput("embedding")]
    )
    vectors = answer.as_numpy("embedding")
    assert vectors.shape == (2, reference.metadata.embedding.size)  # type: ignore[union-attr]
    over_http = http.infer(
        name,
        [image_input(images, triton_http)],
        outputs=[triton_http.InferRequestedOutput("embedding", binary_data=True)],
    )
    np.testing.assert_allclose(vectors, over_http.as_numpy("embedding"), atol=EXACT)
    for image, vector in zip(images, vectors, strict=True):
        request = urllib.request.Request(
            f"{server.url}/v1/embed", data=image, headers={"content-type": OCTET}
        )
        with urllib.request.urlopen(request) as response:
            (item,) = json.load(response)["embeddings"]
        # One image alone may run on the other engine than a batch of two: float32 rounding.
        np.testing.assert_allclose(vector, item["embedding"], atol=ENGINES)


def test_health_says_serving_once_ready(server: Server) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("build", "says"),
    [
        (lambda: [triton.InferInput("image", [1], "FP32")], "unknown input 'image' of type FP32"),
        (lambda: [triton.InferInput("pixel_values", [1, 3, 4, 4], "FP32")], "must have shape"),
        (lambda: [triton.InferInput("image", [0], "BYTES")], "batch size must be 1..64"),
        (lambda: [triton.InferInput("image", [2, 2], "BYTES")], "shape [N] or [N,1]"),
    ],
    ids=["wrong dtype", "wrong shape", "empty batch", "matrix of files"],
)
def test_wrong_shapes_and_types_are_invalid_arguments(
    client: triton.InferenceServerClient, reference: ModelSession, build: object, says: str
) -> None:
    inputs = build()  # type: ignore[operator]
    for tensor in inputs:
        count = int(np.prod(tensor.shape()))
        if tensor.datatype() == "FP32":
            tensor.set_data_from_numpy(np.zeros(tensor.shape(), np.float32))
        else:
            tensor.set_data_from_numpy(
                np.array([b"x"] * count, dtype=object).reshape(tensor.shape())
            )
    error = refused(client.infer, reference.metadata.name, inputs)
    assert status_of(error) == "INVALID_ARGUMENT" and says in error.message()


def raw_call(server: Server, payload: bytes, timeout: float = 10) -> grpc.RpcError:
    with grpc.insecure_channel(server.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            channel.unary_unary(INFER)(payload, timeout=timeout)
    return raised.value


def request_with(
    reference: ModelSession, raw: list[bytes], shape: list[int], datatype: str = "BYTES"
) -> bytes:
    request = pb.ModelInferRequest(model_name=reference.metadata.name, raw_input_contents=raw)
    request.inputs.add(
        name="image" if datatype == "BYTES" else reference.input_name,
        datatype=datatype,
        shape=shape,
    )
    return request.SerializeToString()


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("malformed protobuf", ""),
        ("pixels one float short", "needs"),
        ("files the prefixes overrun", "ends inside an element"),
        ("more files than the shape", "needs 1 images, got more"),
        ("an empty file", "is empty"),
        ("two raw entries for one input", "raw_input_contents holds 2 entries"),
        ("10,000 tiny inputs", "expected exactly one input"),
        ("not an image", "not an image"),
    ],
)
def test_hostile_messages_are_refused_and_the_server_keeps_answering(
    server: Server,
    client: triton.InferenceServerClient,
    reference: ModelSession,
    case: str,
    says: str,
) -> None:
    size = reference.metadata.preprocessing.input_size
    one_file = struct.pack("<I", 3) + b"abc"
    payload = {
        "malformed protobuf": b"\x0a\xff\xff\xff\xff\x0f garbage",
        "pixels one float short": request_with(
            reference, [b"\0" * (4 * 3 * size * size - 4)], [1, 3, size, size], "FP32"
        ),
        "files the prefixes overrun": request_with(
            reference, [struct.pack("<I", 99) + b"abc"], [1]
        ),
        "more files than the shape": request_with(reference, [one_file * 3], [1]),
        "an empty file": request_with(reference, [struct.pack("<I", 0)], [1]),
        "two raw entries for one input": request_with(reference, [one_file, one_file], [1]),
        "not an image": request_with(reference, [one_file], [1]),
    }.get(case)
    if case == "10,000 tiny inputs":
        request = pb.ModelInferRequest(model_name=reference.metadata.name)
        for index in range(10_000):
            request.inputs.add(name=f"in{index}", datatype="BYTES", shape=[1])
        payload = request.SerializeToString()
    assert payload is not None
    error = raw_call(server, payload)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert says in (error.details() or "").lower() or says in (error.details() or "")
    assert client.is_server_live()
    assert (
        client.infer(reference.metadata.name, [image_input(photos(1))])
        .as_numpy("probabilities")
        .shape[0]
        == 1
    )


def test_a_message_over_the_body_limit_is_resource_exhausted(
    server: Server, reference: ModelSession
) -> None:
    error = raw_call(server, request_with(reference, [b"\0" * 2_500_000], [1]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_stream_that_stalls_is_given_up_and_others_are_answered(
    server: Server, client: triton.InferenceServerClient, reference: ModelSession
) -> None:
    """A client-streaming call that never sends its message is what a stalled upload is on
    the wire: the server gives up after VIT_BODY_TIMEOUT_S (2 s here) and answers the rest."""

    def never() -> Iterator[bytes]:
        time.sleep(60)
        yield b""

    with grpc.insecure_channel(server.grpc_target) as channel:
        stalled = [channel.stream_unary(INFER).future(never(), timeout=30) for _ in range(8)]
        started = time.monotonic()
        answer = client.infer(reference.metadata.name, [image_input(photos(1))])
        assert answer.as_numpy("probabilities").shape == (1, len(reference.labels))
        for call in stalled:
            assert call.exception(timeout=20).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 15


def test_more_images_than_a_request_may_hold_are_resource_exhausted(
    client: triton.InferenceServerClient, reference: ModelSession
) -> None:
    error = refused(client.infer, reference.metadata.name, [image_input([b"x"] * 65)])
    assert (
        status_of(error) == "RESOURCE_EXHAUSTED" and "VIT_MAX_IMAGES_PER_REQUEST" in error.message()
    )


def test_the_client_deadline_bounds_the_request(
    client: triton.InferenceServerClient, reference: ModelSession
) -> None:
    error = refused(
        client.infer, reference.metadata.name, [image_input(photos(8))], client_timeout=0.001
    )
    assert status_of(error) == "DEADLINE_EXCEEDED"


def test_unknown_models_and_versions_are_not_found(
    client: triton.InferenceServerClient, reference: ModelSession
) -> None:
    assert status_of(refused(client.get_model_metadata, "nope")) == "NOT_FOUND"
    assert status_of(refused(client.infer, "nope", [image_input(photos(1))])) == "NOT_FOUND"
    error = refused(client.is_model_ready, reference.metadata.name, "999")
    assert status_of(error) == "NOT_FOUND"


def test_the_repository_is_off_without_an_admin_token(client: triton.InferenceServerClient) -> None:
    assert status_of(refused(client.get_model_repository_index)) == "PERMISSION_DENIED"


def test_calls_are_counted_by_method_and_code(
    server: Server, client: triton.InferenceServerClient
) -> None:
    refused(client.get_model_metadata, "nope")
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    assert re.search(
        r'vit_grpc_requests_total\{code="NOT_FOUND",method="ModelMetadata"\} [1-9]', text
    )
    timed = r'vit_grpc_request_duration_seconds_count\{code="OK",method="ModelInfer",model="\S+"\}'
    assert re.search(timed + " [1-9]", text)


def test_a_full_queue_is_unavailable_with_when_to_retry(served_model: Path) -> None:
    with served(served_model, ROOT, max_queue="2") as running:
        client = triton.InferenceServerClient(running.grpc_target)
        error = refused(client.infer, "shapes-vit", [image_input(photos(3))])
        assert status_of(error) == "UNAVAILABLE"
        with grpc.insecure_channel(running.grpc_target) as channel:
            request = pb.ModelInferRequest(model_name="shapes-vit")
            request.inputs.add(
                name="image", datatype="BYTES", shape=[3]
            ).contents.bytes_contents.extend(photos(3))
            with pytest.raises(grpc.RpcError) as raised:
                channel.unary_unary(INFER)(request.SerializeToString(), timeout=10)
        trailers = dict(raised.value.trailing_metadata() or ())
        assert int(trailers["retry-after"]) >= 1
        assert int(trailers["grpc-retry-pushback-ms"]) == 1000 * int(trailers["retry-after"])


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repo = tmp_path_factory.mktemp("repository")
    add_version(repo, "colours", 1, scale=1.0)
    add_version(repo, "other", 1, scale=2.0)
    with served(
        repo, ROOT, model_control="explicit", admin_token=TOKEN, api_token="inference-token"
    ) as running:
        yield running


def test_tokens_travel_in_the_authorization_metadata(repository: Server) -> None:
    client = triton.InferenceServerClient(repository.grpc_target)
    refusal = refused(client.infer, "colours", [image_input([PHOTO])])
    assert status_of(refusal) == "UNAUTHENTICATED"
    wrong = refused(
        client.infer, "colours", [image_input([PHOTO])], headers={"authorization": "Bearer no"}
    )
    assert status_of(wrong) == "UNAUTHENTICATED"
    answer = client.infer(
        "colours", [image_input([PHOTO])], headers={"authorization": "Bearer inference-token"}
    )
    np.testing.assert_allclose(
        answer.as_numpy("probabilities")[0], colours_probabilities(1.0), atol=1e-5
    )
    assert len(COLOURS) == answer.as_numpy("probabilities").shape[1]


def test_repository_index_load_and_unload(repository: Server) -> None:
    client = triton.InferenceServerClient(repository.grpc_target)
    admin = {"authorization": f"Bearer {TOKEN}"}
    assert status_of(refused(client.get_model_repository_index)) == "UNAUTHENTICATED"
    index = client.get_model_repository_index(headers=admin, as_json=True)
    states = {(m["name"], m.get("version", "")): m.get("state", "") for m in index["models"]}
    assert states[("colours", "1")] == "READY" and states[("other", "1")] == "READY"
    client.unload_model("other", headers=admin)
    index = client.get_model_repository_index(headers=admin, as_json=True)
    assert not any(m["name"] == "other" and m.get("state") == "READY" for m in index["models"])
    inference = {"authorization": "Bearer inference-token"}
    gone = refused(client.infer, "other", [image_input([PHOTO])], headers=inference)
    assert status_of(gone) == "NOT_FOUND"
    client.load_model("other", headers=admin)
    answer = client.infer("other", [image_input([PHOTO])], headers=inference)
    np.testing.assert_allclose(
        answer.as_numpy("probabilities")[0], colours_probabilities(2.0), atol=1e-5
    )
    assert status_of(refused(client.load_model, "absent", headers=admin)) == "NOT_FOUND"


def test_sigterm_drains_and_stops(served_model: Path) -> None:
    with served(served_model, ROOT) as running:
        client = triton.InferenceServerClient(running.grpc_target)
        with ThreadPoolExecutor(4) as pool:
            calls = [
                pool.submit(client.infer, "shapes-vit", [image_input(photos(8))]) for _ in range(4)
            ]
            time.sleep(0.05)
            running.process.send_signal(signal.SIGTERM)
            answered = [call.result(timeout=30) for call in calls]
        assert all(a.as_numpy("probabilities").shape[0] == len(photos(8)) for a in answered)
        # uvicorn drains, runs the lifespan shutdown (which drains gRPC), then re-raises SIGTERM.
        assert running.process.wait(timeout=40) in (0, -signal.SIGTERM)
        assert "Traceback" not in running.output()


def test_base64_is_only_for_json(
    client: triton.InferenceServerClient, reference: ModelSession
) -> None:
    """A BYTES element is the file itself over gRPC: base64 text is not an image."""
    encoded = base64.b64encode(photos(1)[0])
    error = refused(client.infer, reference.metadata.name, [image_input([encoded])])
    assert status_of(error) == "INVALID_ARGUMENT"


def test_the_compose_healthcheck_asks_grpc_health(server: Server) -> None:
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    command = compose["services"]["vit"]["healthcheck"]["test"]
    assert command[:3] == ["CMD", "python3", "-c"]
    port = server.grpc_target.rsplit(":", 1)[1]
    check = command[3].replace("127.0.0.1:8001", f"127.0.0.1:{port}")
    assert check != command[3]
    assert subprocess.run([sys.executable, "-c", check], timeout=30).returncode == 0
    nobody = command[3].replace("127.0.0.1:8001", f"127.0.0.1:{free_port()}")
    assert (
        subprocess.run([sys.executable, "-c", nobody], capture_output=True, timeout=30).returncode
        != 0
    )


def test_the_readmes_grpc_example_prints_the_probabilities(
    server: Server, http: triton_http.InferenceServerClient
) -> None:
    readme = (ROOT / "README.md").read_text()
    (example,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "grpc" in b]
    assert "127.0.0.1:8001" in example
    ran = subprocess.run(
        [sys.executable, "-c", example.replace("127.0.0.1:8001", server.grpc_target)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    printed = np.array([float(x) for x in re.findall(r"[\d.e-]+", ran.stdout)])
    heart = (ROOT / "examples" / "heart.png").read_bytes()
    expected = http.infer("shapes-vit", [image_input([heart], triton_http)]).as_numpy(
        "probabilities"
    )
    np.testing.assert_allclose(printed, expected.ravel(), atol=1e-6)


@pytest.fixture(scope="module")
def limited(served_model: Path) -> Iterator[Server]:
    with served(
        served_model,
        ROOT,
        grpc_max_infer_calls="2",
        grpc_max_streams_per_connection="16",
        body_timeout_s="4",
        graceful_shutdown_s="10",
    ) as running:
        yield running


def stalled_calls(channel: grpc.Channel, count: int) -> list[grpc.Future]:
    def never() -> Iterator[bytes]:
        time.sleep(60)
        yield b""

    return [channel.stream_unary(INFER).future(never(), timeout=30) for _ in range(count)]


def test_health_is_never_refused_for_the_inference_calls_in_flight(limited: Server) -> None:
    """Calls that stall and Watch streams that never end take no place a probe needs; the
    inference call over VIT_GRPC_MAX_INFER_CALLS is refused before its message is read, with
    when to retry, and counted."""
    with grpc.insecure_channel(limited.grpc_target) as channel:
        stalled = stalled_calls(channel, 2)
        health = health_pb2_grpc.HealthStub(channel)
        watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(8)]
        assert all(next(w).status == health_pb2.HealthCheckResponse.SERVING for w in watches)
        time.sleep(0.3)  # the stalled calls have started
        check = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as raised:
            channel.unary_unary(INFER)(grpc_request(1), timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert dict(raised.value.trailing_metadata() or ())["retry-after"] == "1"
        for call in stalled:
            assert call.exception(timeout=20).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        answer = pb.ModelInferResponse.FromString(
            channel.unary_unary(INFER)(grpc_request(1), timeout=30)
        )
        assert len(answer.raw_output_contents) == 1
        for watch in watches:
            watch.cancel()
    with urllib.request.urlopen(f"{limited.url}/metrics", timeout=10) as metrics:
        text = metrics.read().decode()
    assert re.search(
        r'vit_grpc_requests_total\{code="UNAVAILABLE",method="ModelInfer"\} [1-9]', text
    )


def grpc_request(count: int, name: str = "shapes-vit") -> bytes:
    request = pb.ModelInferRequest(model_name=name)
    request.inputs.add(
        name="image", datatype="BYTES", shape=[count]
    ).contents.bytes_contents.extend(photos(count))
    return request.SerializeToString()


def test_a_cancelled_call_is_not_counted_as_the_clients_mistake(limited: Server) -> None:
    def before() -> str:
        with urllib.request.urlopen(f"{limited.url}/metrics", timeout=10) as metrics:
            found = re.search(
                r'vit_rejections_total\{reason="invalid_request"\} (\S+)', metrics.read().decode()
            )
        return found.group(1) if found else "0"

    counted = before()
    with grpc.insecure_channel(limited.grpc_target) as channel:
        (call,) = stalled_calls(channel, 1)
        time.sleep(0.3)
        call.cancel()
    time.sleep(0.5)
    assert before() == counted


def test_long_names_are_quoted_short_and_a_call_must_name_its_model(
    client: triton.InferenceServerClient, server: Server
) -> None:
    error = refused(client.is_model_ready, "n" * 20_000)
    assert status_of(error) == "NOT_FOUND" and len(error.message()) < 2100
    error = raw_call(server, grpc_request(1, name=""))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "name the model" in (
        error.details() or ""
    )


def test_an_open_watch_holds_up_no_drain(served_model: Path) -> None:
    with served(served_model, ROOT, graceful_shutdown_s="15") as running:
        with grpc.insecure_channel(running.grpc_target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(), timeout=60
            )
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            started = time.monotonic()
            running.process.send_signal(signal.SIGTERM)
            statuses = [answer.status for answer in watch]
            assert statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
            assert running.process.wait(timeout=30) in (0, -signal.SIGTERM)
            assert time.monotonic() - started < 8


def test_one_connection_holds_at_most_its_streams(limited: Server) -> None:
    """A client that opens Watch streams without end gets no more than
    VIT_GRPC_MAX_STREAMS_PER_CONNECTION of them; other connections are answered."""
    request = health_pb2.HealthCheckRequest()
    with grpc.insecure_channel(limited.grpc_target) as greedy:
        health = health_pb2_grpc.HealthStub(greedy)
        watches = [health.Watch(request, timeout=30) for _ in range(16)]
        assert all(next(w).status == health_pb2.HealthCheckResponse.SERVING for w in watches)
        waiting = health.Check.future(request, timeout=30)
        with pytest.raises(grpc.FutureTimeoutError):
            waiting.result(timeout=1.5)
        # A connection of its own: channels to one target otherwise share one.
        own = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(limited.grpc_target, options=own) as other:
            answer = health_pb2_grpc.HealthStub(other).Check(request, timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        watches[0].cancel()
        assert waiting.result(timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        for watch in watches[1:]:
            watch.cancel()
