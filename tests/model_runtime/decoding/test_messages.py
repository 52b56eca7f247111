"""A worker's messages: plain values, framed; anything else from a worker is a closed channel,
never code run in the server."""

from __future__ import annotations

import os
import pickle
import socket

import pytest

from model_runtime.decoding import messages


def test_values_and_descriptors_arrive_as_sent() -> None:
    ours, theirs = socket.socketpair()
    read, write = os.pipe()
    try:
        messages.send_with_fds(ours, ["launch", {"a": 1}, None, 2.5], [write])
        value, fds = messages.receive_with_fds(theirs, 3)
        assert value == ["launch", {"a": 1}, None, 2.5]
        (received,) = fds
        os.write(received, b"x")
        assert os.read(read, 1) == b"x"
        os.close(received)
        messages.send(theirs, "reaped")
        assert messages.receive(ours) == "reaped"
    finally:
        for fd in (read, write):
            os.close(fd)
        ours.close()
        theirs.close()


@pytest.mark.parametrize(
    "sent",
    [
        (10**9).to_bytes(4, "big"),  # longer than any message may be
        (12).to_bytes(4, "big") + b"not json at!",
        (20).to_bytes(4, "big") + b"cut short",
        len(pickle.dumps(os.system)).to_bytes(4, "big") + pickle.dumps(os.system),
        b"\x00\x00",
    ],
    ids=["too-long", "not-json", "cut-short", "a-pickle", "half-a-length"],
)
def test_anything_else_is_a_closed_channel(sent: bytes) -> None:
    ours, theirs = socket.socketpair()
    theirs.sendall(sent)
    theirs.close()
    try:
        with pytest.raises(messages.ChannelClosed):
            messages.receive(ours)
    finally:
        ours.close()
