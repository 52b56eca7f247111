"""Typed request and response bodies of the HTTP API (they are also its OpenAPI schema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from model_contract.metadata import Embedding, OodCalibration
from model_contract.preprocess import PreprocessSpec


class ErrorBody(BaseModel):
    """Every error, on every route."""

    error: str = Field(description="What went wrong, for a person.")
    type: str = Field(description="Machine-readable error type, e.g. `too_many_pixels`.")


class ModelRef(BaseModel):
    name: str
    version: str


class TopClass(BaseModel):
    label: str
    index: int = Field(description="Position of the label in the model's label list.")
    probability: float


class Attention(BaseModel):
    """Where the model looked: the class token's attention rollout over the patch grid, and
    the part of the upright original that the grid covers."""

    grid: list[list[float]] = Field(
        description="Rows of the patch grid, top to bottom, each left to right (e.g. 8x8): "
        "the rollout (Abnar & Zuidema, 2020), unscaled."
    )
    box: tuple[float, float, float, float] = Field(
        description="[left, top, right, bottom] in pixels of the upright original: the region "
        "resized and cropped into the model's input, which the grid covers."
    )
    image_size: tuple[int, int] = Field(description="[width, height] of the upright original.")


class Prediction(BaseModel):
    """One uploaded file's outcome: its classes, or (in a request of several files) the error
    that this file alone caused."""

    file: str | None = Field(None, description="The file's name, where the upload gave one.")
    top: list[TopClass] | None = Field(
        None, description="Most probable classes, most probable first (absent on error)."
    )
    probabilities: list[float] | None = Field(
        None, description="The full distribution in label order (only when asked)."
    )
    error: ErrorBody | None = Field(
        None, description="Why this file has no classes; the request's other files do."
    )
    ood_score: float | None = Field(
        None,
        description="How much the image looks like the model's training images (higher: more); "
        "absent where the model has no calibration.",
    )
    in_distribution: bool | None = Field(
        None,
        description="Whether `ood_score` clears the model's calibrated threshold: false means "
        "the answer is not to be trusted. Absent where the model has no calibration.",
    )
    attention: Attention | None = Field(None, description="Where the model looked (explain).")


class ClassifyResponse(BaseModel):
    model: ModelRef
    predictions: list[Prediction] = Field(description="One per image, in request order.")


class EmbeddingInfo(BaseModel):
    """What a model's embedding is."""

    size: int = Field(description="Floats per image.")
    source: str = Field(description="Which vector of the model it is.")
    normalized: bool = Field(description="Whether each was scaled to unit length (normalize).")


class ImageEmbedding(BaseModel):
    """One uploaded file's outcome: its embedding, or (in a request of several files) the error
    that this file alone caused."""

    file: str | None = Field(None, description="The file's name, where the upload gave one.")
    embedding: list[float] | None = Field(
        None, description="The vector, float32 (absent on error)."
    )
    error: ErrorBody | None = Field(
        None, description="Why this file has no embedding; the request's other files do."
    )


class EmbedResponse(BaseModel):
    model: ModelRef
    embedding: EmbeddingInfo
    embeddings: list[ImageEmbedding] = Field(description="One per image, in request order.")


class ModelDescription(BaseModel):
    """What a served version is, fixed once it serves (its file, session and metadata)."""

    name: str
    version: str
    labels: list[str]
    input_size: int
    preprocessing: PreprocessSpec
    output: Literal["logits", "probabilities", "embedding"] = Field(
        description="What the classification output holds; embedding: the model has no classes "
        "and serves embeddings only."
    )
    embedding: Embedding | None = Field(
        description="The embedding /v1/embed answers with; null: the model carries none."
    )
    provider: str = Field(
        description="What runs the calls: the onnxruntime execution provider really in use, or "
        "OpenVINO-CPU."
    )
    providers: list[str] = Field(description="onnxruntime's providers for the model's session.")
    runtime: dict[str, str] = Field(
        description="What is in effect: engine, provider, precision (computed in) and "
        "file_precision, io_binding, cuda_graph, tensorrt."
    )
    engine_choice: str = Field(
        description="Why this engine serves: VIT_ENGINE, or under auto each engine's measured "
        "images/s and lone-image time at load."
    )
    precision_choice: str = Field(
        description="Why the calls compute in this precision (an fp32 file always in fp32)."
    )
    fallbacks: list[str] = Field(description="Options asked for but not in effect, and why.")
    sha256: str = Field(description="sha256 of the served .onnx file.")
    held_out_accuracy: float | None
    dataset: dict[str, Any]
    source: dict[str, str] = Field(
        description="Where an imported model came from: importer, source, model_type."
    )
    outputs: list[str] = Field(
        description="What inference answers with: probabilities, attention_rollout (explain), "
        "ood_score."
    )
    ood: OodCalibration | None = Field(
        description="The out-of-distribution score and threshold; null: not calibrated."
    )
    cost: dict[str, int] | None = Field(
        None,
        description="Per image, where the metadata describes a plain ViT: tokens, attention "
        "pairs per layer, and FLOPs (attention, projections, MLP, embedding and head, total); "
        "docs/SCALING.md.",
    )


class ModelInfo(ModelDescription):
    """A served version: what it is, and how its startup self-test stands now."""

    self_test: SelfTestInfo


class SelfTestInfo(BaseModel):
    status: Literal["pending", "passed", "failed", "none"] = Field(
        description="The startup self-test: passed, failed (the version never serves), none "
        "(the file has no golden images) or pending (warming up)."
    )
    detail: str


class NotLoaded(BaseModel):
    """A model of the repository with no version serving."""

    name: str
    state: str = Field(description="UNAVAILABLE, or LOADING while a version loads.")
    reason: str = Field(
        description="Why: not loaded yet (on_demand: loads on its first request), evicted, "
        "unloaded, or that its last load failed (the repository index, behind the admin token, "
        "says why)."
    )


class ModelList(BaseModel):
    models: list[ModelInfo]
    not_loaded: list[NotLoaded] = Field(
        default_factory=list,
        description="The repository's models with no version serving, as its last scan saw them.",
    )


class OipTensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class OipServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class OipModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[OipTensorMetadata]
    outputs: list[OipTensorMetadata]


class OipLive(BaseModel):
    live: bool


class OipReady(BaseModel):
    ready: bool


class OipModelReady(BaseModel):
    name: str
    ready: bool


class OipRequestInput(BaseModel):
    """An input tensor; `data` is absent when it travels as binary after the JSON header."""

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class OipRequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class OipInferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[OipRequestInput]
    outputs: list[OipRequestOutput] | None = None


class OipResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[float] | None = None


class OipInferenceResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[OipResponseOutput]


class RepositoryModel(BaseModel):
    """One model version in the repository index (Triton's fields, plus its memory)."""

    name: str
    version: str
    state: str = Field(description="LOADING, READY or UNAVAILABLE.")
    reason: str = Field(description="Why it is unavailable, or what failed to replace it.")
    memory_bytes: int = Field(description="Resident memory the version took when it loaded.")
