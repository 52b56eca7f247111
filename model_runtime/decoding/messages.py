"""Messages on a worker's socket: each a JSON value behind its length. A worker answers with
plain values only, so nothing it sends can make the server run code (as unpickling could)."""

from __future__ import annotations

import json
import socket
from typing import Any

_LENGTH_BYTES = 4
MAX_MESSAGE_BYTES = 64 * 1024
"""Far above any answer (a few hundred bytes); a longer one means the worker went wrong."""


class ChannelClosed(Exception):
    """The other end has gone, or sent something that is not a message."""


def send(sock: socket.socket, value: Any) -> None:
    body = json.dumps(value, separators=(",", ":")).encode()
    sock.sendall(len(body).to_bytes(_LENGTH_BYTES, "big") + body)


def receive(sock: socket.socket) -> Any:
    """The next message; `ChannelClosed` when the other end has gone or broke the framing."""
    length = int.from_bytes(_exactly(sock, _LENGTH_BYTES), "big")
    if length > MAX_MESSAGE_BYTES:
        raise ChannelClosed(f"a message of {length} bytes")
    try:
        return json.loads(_exactly(sock, length))
    except ValueError as error:
        raise ChannelClosed("a message that is not JSON") from error


def _exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        try:
            chunk = sock.recv(size - len(data))
        except OSError as error:
            raise ChannelClosed(str(error)) from error
        if not chunk:
            raise ChannelClosed("the other end has gone")
        data += chunk
    return bytes(data)


def send_with_fds(sock: socket.socket, value: Any, fds: list[int]) -> None:
    """`value`, with `fds` passed to the other end's process (Unix sockets)."""
    body = json.dumps(value, separators=(",", ":")).encode()
    framed = len(body).to_bytes(_LENGTH_BYTES, "big") + body
    sent = socket.send_fds(sock, [framed], fds)
    sock.sendall(framed[sent:])


def receive_with_fds(sock: socket.socket, max_fds: int) -> tuple[Any, list[int]]:
    """The next message and the descriptors that came with it (they arrive with its first
    bytes)."""
    try:
        head, fds, _, _ = socket.recv_fds(sock, _LENGTH_BYTES, max_fds)
    except OSError as error:
        raise ChannelClosed(str(error)) from error
    if not head:
        raise ChannelClosed("the other end has gone")
    length = int.from_bytes(head + _exactly(sock, _LENGTH_BYTES - len(head)), "big")
    if length > MAX_MESSAGE_BYTES:
        raise ChannelClosed(f"a message of {length} bytes")
    try:
        return json.loads(_exactly(sock, length)), fds
    except ValueError as error:
        raise ChannelClosed("a message that is not JSON") from error
