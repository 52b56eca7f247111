"""A deadline for request heads, which uvicorn's h11 protocol does not have.

uvicorn closes a keep-alive connection only while it is silent: one that opens and sends
nothing, or trickles its headers a byte at a time, is kept forever, and enough of them exhaust
the file descriptors. Here a connection must deliver a whole request head within
`head_timeout_s` of opening or of its previous response, or it is closed. (Bodies have their
own deadline in service/body.py.)
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


def head_deadline_protocol(head_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the head deadline, for `uvicorn.Config(http=...)`."""

    class HeadDeadlineProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_deadline()

        def handle_events(self) -> None:
            super().handle_events()
            if self._request_in_progress() and self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm_head_deadline(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(head_timeout_s, self._head_too_slow)

        def _request_in_progress(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _head_too_slow(self) -> None:
            self._head_timer = None
            if not self._request_in_progress() and not self.transport.is_closing():
                self.transport.close()

    return HeadDeadlineProtocol
