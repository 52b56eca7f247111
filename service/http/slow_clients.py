"""A deadline for request heads, which uvicorn's HTTP protocols do not have.

uvicorn closes a keep-alive connection only while it is silent: one that opens and sends
nothing, or trickles its headers a byte at a time, is kept forever, and enough of them exhaust
the file descriptors. Here a connection must deliver a whole request head within
`head_timeout_s` of opening or of its previous response, or it is closed. (Bodies have their
own deadline in service/http/body.py.) Both of uvicorn's parsers get it: httptools (C, the faster)
and h11 (pure Python).
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HttpParser = Literal["httptools", "h11"]


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
    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._head_arrived()


def head_deadline_protocol(head_timeout_s: float, parser: HttpParser = "httptools") -> type:
    """uvicorn's protocol for `parser` with the head deadline, for `uvicorn.Config(http=...)`."""
    base = _HttpToolsHeadDeadline if parser == "httptools" else _H11HeadDeadline
    return type(
        f"{base.__name__}Of{head_timeout_s:g}s", (base,), {"head_timeout_s": head_timeout_s}
    )
