"""What an ONNX model says about itself: the `metadata_props` written by vit-export."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.preprocess import PreprocessSpec

_JSON_FIELDS = ("labels", "preprocessing", "dataset")


class InvalidModelMetadata(ValueError):
    """The model file lacks what the service needs to serve it."""


class ModelMetadata(BaseModel):
    """Everything the service needs to serve a model, stored as string pairs in the file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    labels: tuple[str, ...] = Field(min_length=2)
    preprocessing: PreprocessSpec
    output: Literal["logits", "probabilities"]
    precision: Literal["fp32", "fp16"] = "fp32"
    dataset: dict[str, object] = Field(default_factory=dict)
    held_out_accuracy: float | None = None
    checkpoint_sha256: str = ""

    def to_props(self) -> dict[str, str]:
        props: dict[str, str] = {}
        for key, value in self.model_dump(mode="json").items():
            if value is None:
                continue
            props[key] = json.dumps(value) if key in _JSON_FIELDS else str(value)
        return props

    @classmethod
    def from_props(cls, props: dict[str, str]) -> ModelMetadata:
        missing = [
            key
            for key in ("name", "version", "labels", "preprocessing", "output")
            if key not in props
        ]
        if missing:
            raise InvalidModelMetadata(
                f"the model's metadata lacks {', '.join(missing)}; export it with vit-export"
            )
        known = {key: value for key, value in props.items() if key in cls.model_fields}
        try:
            decoded = {k: json.loads(v) if k in _JSON_FIELDS else v for k, v in known.items()}
            return cls.model_validate(decoded)
        except (json.JSONDecodeError, ValidationError) as error:
            raise InvalidModelMetadata(f"the model's metadata is malformed: {error}") from error
