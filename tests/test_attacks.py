"""Attacks on a real server: files made to be expensive to decode, floods of large bodies and
poison tensors. Each gets its answer in time while the server stays within its memory budget,
health keeps answering and ordinary clients keep getting 200."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from harness import attacks
from harness.servers import Server, served
from harness.watch import Watch, metric
from tests.conftest import ROOT
from tests.images import upload_variety

JPEG = upload_variety()["jpeg"][0]


@pytest.fixture(scope="module")
def server(served_model: Path) -> Iterator[Server]:
    with served(served_model, ROOT) as running:
        yield running


def post_image(server: Server, data: bytes) -> httpx.Response:
    """A raw image upload (the server finds the format from the bytes, not the media type)."""
    return httpx.post(
        f"{server.url}/v1/classify",
        content=data,
        headers={"content-type": "image/jpeg"},
        timeout=60,
    )


@pytest.mark.parametrize(
    ("attack", "limit", "seconds"),
    [
        (attacks.tiled_tiff, "memory", 5),
        (attacks.sixteen_bit_png, "memory", 5),
        (attacks.rle_bmp, "time", 8),  # the 2 s limit, with room for a loaded machine
        (attacks.repeated_scan_jpeg, "time", 8),
    ],
)
def test_an_expensive_file_is_422_in_time_and_nobody_else_notices(
    server: Server, attack: attacks.Attack, limit: str, seconds: float
) -> None:
    data = attack()
    before = metric(server, "vit_decode_workers_replaced_total", reason=limit)
    with Watch(server, JPEG) as watch:
        time.sleep(0.2)
        started = time.monotonic()
        response = post_image(server, data)
        elapsed = time.monotonic() - started
        time.sleep(0.2)
    assert response.status_code == 422 and response.json()["type"] == "too_expensive_to_decode"
    assert elapsed < seconds
    assert metric(server, "vit_decode_workers_replaced_total", reason=limit) == before + 1
    watch.check()


def test_a_multipart_of_64_bombs_is_one_quick_422(server: Server) -> None:
    bomb = attacks.tiled_tiff()
    files = [("file", (f"{i}.tif", bomb, "image/tiff")) for i in range(64)]
    with Watch(server, JPEG) as watch:
        started = time.monotonic()
        response = httpx.post(f"{server.url}/v1/classify", files=files, timeout=60)
        elapsed = time.monotonic() - started
        time.sleep(0.3)
    assert response.status_code == 422 and response.json()["type"] == "too_expensive_to_decode"
    assert elapsed < 5
    watch.check()


def test_many_concurrent_large_uploads_stay_within_the_memory_budget(server: Server) -> None:
    large = JPEG + b"\0" * (19 * 1024 * 1024)  # bytes after the JPEG's end are ignored

    with Watch(server, JPEG) as watch, ThreadPoolExecutor(40) as pool:
        statuses = [r.status_code for r in pool.map(lambda _: post_image(server, large), range(40))]
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
    watch.check()
    assert metric(server, "vit_body_in_flight_bytes") == 0


def infer(server: Server, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/shapes-vit/infer", content=body, headers=headers)


def test_an_extreme_fp32_tensor_is_400_and_does_not_touch_the_model(server: Server) -> None:
    data = np.full((1, 3, 128, 128), 3e38, "<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "pixel_values",
                    "shape": [1, 3, 128, 128],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(data)},
                }
            ]
        }
    ).encode()
    binary = {
        "inference-header-content-length": str(len(header)),
        "content-type": "application/octet-stream",
    }
    with Watch(server, JPEG) as watch:
        for _ in range(10):
            response = infer(server, header + data, binary)
            assert response.status_code == 400
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    watch.check()


def test_millions_of_bytes_elements_are_400_without_stalling_health(server: Server) -> None:
    payload = b"\0\0\0\0" * 4_900_000
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(payload)},
                }
            ]
        }
    ).encode()
    binary = {
        "inference-header-content-length": str(len(header)),
        "content-type": "application/octet-stream",
    }
    with Watch(server, JPEG) as watch:
        started = time.monotonic()
        response = infer(server, header + payload, binary)
        elapsed = time.monotonic() - started
    assert response.status_code == 400
    assert elapsed < 5
    watch.check()


def test_a_client_that_disconnects_has_its_decoding_stopped(server: Server) -> None:
    slow = attacks.rle_bmp()
    before = metric(server, "vit_decode_workers_replaced_total", reason="abandoned")
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        head = (
            f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/bmp\r\n"
            f"Content-Length: {len(slow)}\r\n\r\n"
        )
        connection.sendall(head.encode() + slow)
        time.sleep(0.5)  # decoding has started
    deadline = time.monotonic() + 5
    while metric(server, "vit_decode_workers_replaced_total", reason="abandoned") == before:
        assert time.monotonic() < deadline, "the abandoned decode was never stopped"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("route", "media_type", "template"),
    [
        ("/v1/classify", "image/png", "/v1/classify"),
        ("/v2/models/shapes-vit/infer", "application/json", "/v2/models/{name}/infer"),
    ],
)
def test_a_client_that_leaves_mid_body_is_counted_as_gone_not_as_a_server_error(
    server: Server, route: str, media_type: str, template: str
) -> None:
    """Anyone can open a connection, send half a body and leave: it must not raise the 5xx rate
    that alerts watch, nor fill the log with tracebacks."""
    failures_before = metric(server, "vit_requests_total", route=template, code="500")
    gone_before = metric(server, "vit_requests_total", route=template, code="499")
    logged_before = len(server.output())
    host, port = server.url.removeprefix("http://").split(":")
    for _ in range(3):
        with socket.create_connection((host, int(port))) as connection:
            head = (
                f"POST {route} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {media_type}\r\n"
                "Content-Length: 100000\r\n\r\n"
            )
            connection.sendall(head.encode() + b"\x89PNG" + bytes(1000))
            time.sleep(0.2)  # the body has started to arrive
    deadline = time.monotonic() + 5
    while metric(server, "vit_requests_total", route=template, code="499") < gone_before + 3:
        assert time.monotonic() < deadline, "the departed clients were never counted"
        time.sleep(0.05)
    assert metric(server, "vit_requests_total", route=template, code="500") == failures_before
    assert "Traceback" not in server.output()[logged_before:]


def test_a_client_that_leaves_once_its_request_is_sent_is_counted_as_gone(server: Server) -> None:
    template = "/v1/classify"
    before = {
        status: metric(server, "vit_requests_total", route=template, code=status)
        for status in ("200", "499", "500")
    }
    logged_before = len(server.output())
    host, port = server.url.removeprefix("http://").split(":")
    photo = (ROOT / "examples" / "heart.png").read_bytes()
    for _ in range(5):
        with socket.create_connection((host, int(port))) as connection:
            head = (
                f"POST {template} HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
                f"Content-Length: {len(photo)}\r\n\r\n"
            )
            connection.sendall(head.encode() + photo)
            time.sleep(0.002)

    def answered() -> float:  # gone while decoding or queued, or answered before it noticed
        return sum(
            metric(server, "vit_requests_total", route=template, code=status) - before[status]
            for status in ("200", "499")
        )

    deadline = time.monotonic() + 5
    while answered() < 5:
        assert time.monotonic() < deadline, "the departed clients were never counted"
        time.sleep(0.05)
    assert metric(server, "vit_requests_total", route=template, code="500") == before["500"]
    assert "Traceback" not in server.output()[logged_before:]


def test_a_websocket_upgrade_is_answered_as_plain_http(server: Server) -> None:
    before = metric(server, "vit_requests_total", route="/v2/health/live", code="200")
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as connection:
        connection.sendall(
            f"GET /v2/health/live HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\n"
            "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
        )
        answer = connection.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    after = metric(server, "vit_requests_total", route="/v2/health/live", code="200")
    assert after == before + 1


MALFORMED = [
    b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",  # a chunk size that is no number
    b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n",  # NUL in a header
    # Both lengths: a proxy framing by Content-Length would pass the GET on as a body.
    b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n",
]


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_malformed_http_is_a_counted_json_400(served_model: Path, parser: str) -> None:
    """uvicorn refuses these before any route runs; the answer is still the service's."""
    with served(served_model, ROOT, http_parser=parser) as running:
        host, port = running.url.removeprefix("http://").split(":")
        for request in MALFORMED:
            with socket.create_connection((host, int(port)), timeout=5) as connection:
                connection.sendall(request)
                answer = b""
                while chunk := connection.recv(4096):
                    answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400"), answer
            assert b"content-type: application/json" in head.lower()
            assert json.loads(body)["type"] == "invalid_request"
        count = len(MALFORMED)
        # By method: `other` where uvicorn could not parse the request, POST where it could.
        assert metric(running, "vit_requests_total", route="unmatched", code="400") == count
        assert metric(running, "vit_rejections_total", reason="invalid_request") == count


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_an_early_answer_to_a_request_expecting_100_continue_closes_the_connection(
    served_model: Path, parser: str
) -> None:
    """The client waits for "100 Continue" before its body; answered without it, it may never
    send the body, and a kept connection would read its next request as that body."""
    with served(served_model, ROOT, http_parser=parser) as running:
        host, port = running.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            connection.sendall(
                b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
                b"Content-Length: 26214400\r\nExpect: 100-continue\r\n\r\n"
            )
            answer = answers_of(connection)  # returns once the server closes
        head = answer.partition(b"\r\n\r\n")[0].lower()
        assert head.startswith(b"http/1.1 4") and b"connection: close" in head, answer[:300]


def answers_of(connection: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    answer = b""
    while chunk := connection.recv(65536):
        answer += chunk
    return answer


@pytest.mark.parametrize("parser", ["httptools", "h11"])
@pytest.mark.parametrize("part", ["url", "headers"])
def test_a_head_over_its_bound_is_a_json_400(served_model: Path, parser: str, part: str) -> None:
    """One connection must not fill memory with a request head (uvicorn's httptools protocol
    keeps whatever it is sent)."""
    with served(served_model, ROOT, http_parser=parser, max_head_bytes="16384") as running:
        host, port = running.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            if part == "url":
                connection.sendall(b"GET /v2/health/live?" + b"a" * 4096)
                piece = b"a" * 4096
            else:
                connection.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
                piece = b"X-Filler: " + b"a" * 4086 + b"\r\n"
            for _ in range(256):  # up to 1 MiB, in pieces as a network delivers it
                if select.select([connection], [], [], 0.01)[0]:
                    break  # answered before the head ended: what should happen
                connection.sendall(piece)
            answer = answers_of(connection)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), answer[:200]
        assert json.loads(body)["type"] == "invalid_request"
        assert httpx.get(f"{running.url}/v2/health/ready", timeout=5).status_code == 200


def test_a_flood_of_pipelined_requests_is_a_json_400_after_a_bounded_queue(
    served_model: Path,
) -> None:
    waiting = 8
    with served(
        served_model, ROOT, http_parser="httptools", max_pipelined_requests=str(waiting)
    ) as running:
        host, port = running.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            connection.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n" * 2000)
            answer = answers_of(connection)
    assert answer.count(b"HTTP/1.1 200") <= 1 + waiting + 1  # the one answered, those waiting
    assert b"HTTP/1.1 400" in answer and b'"type":"invalid_request"' in answer
