"""How routes reach the objects the lifespan built: typed `Depends` aliases, no globals.

Every dependency is `async def`: FastAPI runs a plain `def` dependency in a worker thread, and
three thread hops per request cost more than the lookups they wrap (profiled under load).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from service.errors import InvalidRequest
from service.inference.data_plane import Admitted, DataPlane
from service.inference.pipeline import Pipeline
from service.settings import Settings

TIMEOUT_HEADER = "X-Request-Timeout-Ms"


async def get_data_plane(request: Request) -> DataPlane:
    data_plane: DataPlane = request.state.data_plane
    return data_plane


def timeout_seconds(timeout_ms: str | None) -> float | None:
    """The X-Request-Timeout-Ms header in seconds (None without one); 400 unless positive."""
    if timeout_ms is None:
        return None
    try:
        asked = float(timeout_ms)
    except ValueError:
        asked = float("nan")
    if not asked > 0:
        raise InvalidRequest(f"{TIMEOUT_HEADER} must be a positive number of milliseconds")
    return asked / 1000


@dataclass(frozen=True)
class Inference:
    """What an inference route needs, resolved by one dependency: FastAPI spends ~40 us of the
    event loop per dependency per request, and the inference routes are the hot ones."""

    data_plane: DataPlane
    admitted: Admitted
    """The model version admission let the request in to, and what it holds of its budget."""
    deadline: float

    @property
    def pipeline(self) -> Pipeline:
        return self.admitted.pipeline

    @property
    def settings(self) -> Settings:
        return self.data_plane.settings


async def inference(
    request: Request,
    timeout_ms: Annotated[
        str | None,
        Header(alias=TIMEOUT_HEADER, description="Lower this request's deadline (milliseconds)."),
    ] = None,
) -> Inference:
    data_plane: DataPlane = request.state.data_plane
    admitted: Admitted = request.state.admitted
    # From its arrival: a wait for its model's load counted, and a client's header lowering it.
    deadline = min(admitted.deadline, data_plane.deadline(timeout_seconds(timeout_ms)))
    return Inference(data_plane, admitted, deadline)


DataPlaneDep = Annotated[DataPlane, Depends(get_data_plane)]
InferenceDep = Annotated[Inference, Depends(inference)]
