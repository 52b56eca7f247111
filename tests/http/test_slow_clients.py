"""Slow clients against a real server: idle connections and trickled heads are closed, a
trickled body gets 408, and health answers throughout."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.servers import Server, served
from tests.conftest import ROOT

HEAD_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0


@pytest.fixture(scope="module", params=[("httptools", "uvloop"), ("h11", "asyncio")])
def server(served_model: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    parser, loop = request.param
    with served(
        served_model,
        ROOT,
        head_timeout_s=str(HEAD_TIMEOUT_S),
        body_timeout_s=str(BODY_TIMEOUT_S),
        http_parser=parser,
        event_loop=loop,
    ) as running:
        yield running


def connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=10)
    return connection


def closed_by_server(connection: socket.socket) -> bool:
    """True once the server has closed the connection (reads give EOF or a reset)."""
    connection.settimeout(2)
    try:
        return connection.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_and_trickling_clients_are_cut_off_while_health_answers(server: Server) -> None:
    idle = [connect(server) for _ in range(100)]
    trickling_heads = [connect(server) for _ in range(10)]
    trickling_bodies = [connect(server) for _ in range(10)]
    for connection in trickling_heads:
        connection.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n")
    for connection in trickling_bodies:
        connection.sendall(
            b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 100000\r\n\r\n"
        )
    cut: set[socket.socket] = set()
    started = time.monotonic()
    while time.monotonic() < started + 3 * HEAD_TIMEOUT_S:
        for connection in set(trickling_heads) - cut:
            try:
                connection.sendall(b"X")  # one byte of a header line at a time
            except (BrokenPipeError, ConnectionResetError):
                cut.add(connection)
        # Bodies trickle for less than their deadline, then go quiet so the 408 can be read.
        if time.monotonic() < started + 0.6 * BODY_TIMEOUT_S:
            for connection in trickling_bodies:
                connection.sendall(b"\x00" * 10)
        assert httpx.get(f"{server.url}/v2/health/live", timeout=5).status_code == 200
        time.sleep(0.2)

    assert all(connection in cut or closed_by_server(connection) for connection in trickling_heads)
    assert all(closed_by_server(connection) for connection in idle)
    for connection in trickling_bodies:
        answer = connection.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'"type":"request_timeout"' in answer
    for connection in idle + trickling_heads + trickling_bodies:
        connection.close()
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200


def test_a_prompt_client_on_a_keep_alive_connection_is_not_cut_off(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=5) as client:
        for _ in range(3):
            assert client.get("/v2/health/live").status_code == 200
            time.sleep(HEAD_TIMEOUT_S / 3)


def test_both_parsers_get_the_head_deadline() -> None:
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from service.http.slow_clients import head_deadline_protocol

    fast = head_deadline_protocol(2.5, "httptools", 32 * 1024, 64)
    plain = head_deadline_protocol(2.5, "h11", 32 * 1024, 64)
    assert issubclass(fast, HttpToolsProtocol) and issubclass(plain, H11Protocol)
    assert fast.head_timeout_s == plain.head_timeout_s == 2.5  # type: ignore[attr-defined]
