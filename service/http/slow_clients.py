"""Bounds on request heads, which uvicorn's HTTP protocols do not have: a deadline, and on
httptools a size.

uvicorn closes a keep-alive connection only while it is silent: one that opens and sends
nothing, or trickles its headers a byte at a time, is kept forever, and enough of them exhaust
the file descriptors. Here a connection must deliver a whole request head within
`head_timeout_s` of opening or of its previous response, or it is closed. (Bodies have their
own deadline in service/http/body.py.) Both of uvicorn's parsers get it: httptools (C, the faster)
and h11 (pure Python).

h11 refuses a head larger than its `max_incomplete_event_size` and reads one request at a time;
uvicorn's httptools protocol keeps any URL and headers it is sent, and queues every pipelined
head it parses, so a single connection could fill memory (~56 bytes per byte sent). There a
head over `max_head_bytes`, or more than `max_pipelined_requests` heads waiting, is a 400.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HttpParser = Literal["httptools", "h11"]


class HeadTooLarge(ValueError):
    """Raised in a parser callback: httptools turns it into a parse error, which is a 400."""


class _HeadDeadline:
    """The deadline, for a uvicorn protocol class that has `loop`, `transport` and `cycle`;
    the subclass calls `_head_arrived` once a request's head is parsed."""

    head_timeout_s: float
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)  # type: ignore[misc]

    def _head_arrived(self) -> None:
        if self._request_in_progress() and self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _arm_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_too_slow)

    def _request_in_progress(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self._request_in_progress() and not self.transport.is_closing():
            self.transport.close()


class _H11HeadDeadline(_HeadDeadline, H11Protocol):
    def handle_events(self) -> None:
        super().handle_events()
        self._head_arrived()


class _HttpToolsHeadDeadline(_HeadDeadline, HttpToolsProtocol):
    max_head_bytes: int
    max_pipelined_requests: int
    pipeline: Any
    _head_bytes = 0

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._head_arrived()
        if len(self.pipeline) > self.max_pipelined_requests:
            raise HeadTooLarge(f"over {self.max_pipelined_requests} pipelined requests waiting")

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_head_bytes:
            raise HeadTooLarge(f"a request head over {self.max_head_bytes} bytes")


def head_deadline_protocol(
    head_timeout_s: float, parser: HttpParser, max_head_bytes: int, max_pipelined_requests: int
) -> type:
    """uvicorn's protocol for `parser` with the head deadline and (httptools) size and pipeline
    bounds, for `uvicorn.Config(http=...)`; h11's size is
    `Config(h11_max_incomplete_event_size=...)`, and h11 reads one request at a time."""
    base = _HttpToolsHeadDeadline if parser == "httptools" else _H11HeadDeadline
    bounds = {
        "head_timeout_s": head_timeout_s,
        "max_head_bytes": max_head_bytes,
        "max_pipelined_requests": max_pipelined_requests,
    }
    return type(f"{base.__name__}Of{head_timeout_s:g}s", (base,), bounds)
