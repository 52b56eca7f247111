"""Images waiting for a decoding worker, taken in turns by request."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar


class Waiting(Protocol):
    @property
    def request(self) -> Hashable: ...


J = TypeVar("J", bound=Waiting)


class TakenInTurns(Generic[J]):
    """The next image of each request with any waiting, round and round. A request of 64 slow
    images then delays another one's image by one image of its own, not by all 64, and a
    client cannot starve the others by sending many images at once (only by sending many
    requests, which admission bounds)."""

    def __init__(self) -> None:
        self._turns: OrderedDict[Hashable, deque[J]] = OrderedDict()

    def __bool__(self) -> bool:
        return bool(self._turns)

    def append(self, job: J) -> None:
        self._turns.setdefault(job.request, deque()).append(job)

    def popleft(self) -> J:
        request, jobs = next(iter(self._turns.items()))
        job = jobs.popleft()
        if jobs:
            self._turns.move_to_end(request)
        else:
            del self._turns[request]
        return job

    def remove(self, job: J) -> None:
        """Take `job` out if it is still waiting."""
        jobs = self._turns.get(job.request)
        if jobs is None or job not in jobs:
            return
        jobs.remove(job)
        if not jobs:
            del self._turns[job.request]

    def drain(self) -> list[J]:
        """Every waiting job, none left."""
        jobs = [job for waiting in self._turns.values() for job in waiting]
        self._turns.clear()
        return jobs
