"""How routes reach the objects the lifespan built: typed `Depends` aliases, no globals."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.pipeline import Pipeline
from service.settings import Settings


def get_pipeline(request: Request) -> Pipeline:
    pipeline: Pipeline = request.state.pipeline
    return pipeline


def get_settings(request: Request) -> Settings:
    settings: Settings = request.state.settings
    return settings


PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
