"""The one-client benchmark: requests taken in turns, the order rotating, and its table."""

from __future__ import annotations

import socket
import threading

from benchmarks.one_client import WARM_UP_TURNS, Post, by_turns, poster, report, summary


def test_each_turn_sends_requests_in_a_row_to_each_server_in_a_rotating_order() -> None:
    sent: list[tuple[str, bytes]] = []

    def to(name: str) -> Post:
        return lambda image: sent.append((name, image))

    posts = {"a": to("a"), "b": to("b"), "c": to("c")}
    seconds = by_turns(posts, [b"1", b"2", b"3"], turns=4, per_turn=2)
    assert {name: len(times) for name, times in seconds.items()} == {"a": 8, "b": 8, "c": 8}
    assert len(sent) == (WARM_UP_TURNS + 4) * 3 * 2
    turns = [sent[i : i + 6] for i in range(0, len(sent), 6)]
    assert [turn[0][0] for turn in turns[:3]] == ["a", "b", "c"]  # no server always first
    for turn in turns:
        assert [name for name, _ in turn[:2]] == [turn[0][0]] * 2  # in a row
        assert sorted(name for name, _ in turn) == ["a", "a", "b", "b", "c", "c"]
        images = [image for name, image in turn if name == "a"]
        assert images == [image for name, image in turn if name == "b"]  # the same images


def test_the_summary_gives_each_p50_and_the_service_gap_to_each_peer() -> None:
    seconds = {
        "service": [0.010, 0.011, 0.012],
        "naive": [0.011, 0.012, 0.013],
        "kserve": [0.009, 0.010, 0.020],
    }
    table = summary(seconds)
    assert table["service"]["p50_ms"] == 11.0
    assert "service_p50_minus_this_ms" not in table["service"]
    assert table["naive"]["service_p50_minus_this_ms"] == -1.0
    assert table["kserve"]["service_p50_minus_this_ms"] == 1.0
    text = report(table, "shapes-vit.onnx", 3, "abc1234")
    assert "| naive | 12.00 | 13.00 | -1.00 ms |" in text
    assert "| kserve | 10.00 | 20.00 | +1.00 ms |" in text
    assert "abc1234" in text


def test_a_connection_the_server_closed_between_turns_is_opened_again() -> None:
    """A server that answers each connection once and then closes it, as uvicorn does with a
    keep-alive connection idle for longer than its timeout."""
    answers = 0
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        nonlocal answers
        for _ in range(2):
            connection, _ = listener.accept()
            with connection:
                data = b""
                while b"\r\n\r\n" not in data or not data.endswith(b"image"):
                    data += connection.recv(65536)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                answers += 1

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    post = poster(listener.getsockname()[1], "/v1/classify")
    post(b"image")
    post(b"image")  # the first connection is closed by now: sent again on a new one
    server.join(10)
    listener.close()
    assert answers == 2
