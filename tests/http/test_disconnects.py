"""`unless_disconnected`: a request's work stops when its client goes, and only then."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request
from starlette.types import Message

from service.errors import ClientClosedRequest
from service.http.body import unless_disconnected


def request_whose_client(leaves: asyncio.Event) -> Request:
    """A request whose body has been read: its next message is the disconnect, once `leaves`."""

    async def receive() -> Message:
        await leaves.wait()
        return {"type": "http.disconnect"}

    return Request({"type": "http", "method": "POST", "headers": []}, receive)


def test_the_work_is_cancelled_when_the_client_leaves() -> None:
    async def scenario() -> tuple[bool, bool]:
        leaves, started = asyncio.Event(), asyncio.Event()
        stopped = False

        async def work() -> str:
            nonlocal stopped
            started.set()
            try:
                await asyncio.sleep(60)
            finally:
                stopped = True
            return "answer"

        request = request_whose_client(leaves)
        outcome = asyncio.ensure_future(unless_disconnected(request, work()))
        await started.wait()
        leaves.set()
        with pytest.raises(ClientClosedRequest):
            await outcome
        return stopped, outcome.cancelling() == 0

    stopped, caller_not_cancelled = asyncio.run(scenario())
    assert stopped and caller_not_cancelled


def test_a_client_leaving_after_the_answer_cancels_nothing() -> None:
    async def scenario() -> str:
        leaves = asyncio.Event()
        request = request_whose_client(leaves)

        async def work() -> str:
            leaves.set()  # the client goes as the work ends: too late to matter
            await asyncio.sleep(0)  # the watcher hears it before the work returns
            return "answer"

        answer = await unless_disconnected(request, work())
        await asyncio.sleep(0.01)  # the watcher's callbacks have run by now
        return answer

    assert asyncio.run(scenario()) == "answer"


def test_another_cancellation_is_not_taken_for_the_client_leaving() -> None:
    async def scenario() -> None:
        leaves, started = asyncio.Event(), asyncio.Event()

        async def work() -> None:
            started.set()
            await asyncio.sleep(60)

        handler = asyncio.ensure_future(unless_disconnected(request_whose_client(leaves), work()))
        await started.wait()
        leaves.set()  # the client goes too, but the server stopping cancels first
        handler.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handler

    asyncio.run(scenario())
