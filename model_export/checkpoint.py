"""The training checkpoint: weights with everything needed to rebuild and describe the model."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model_contract.preprocess import PreprocessSpec
from model_export.vit import VisionTransformer, ViTConfig

_KEYS = ("state_dict", "config", "labels", "preprocessing", "name", "dataset", "metrics", "command")


class NotACheckpoint(ValueError):
    """The file was not written by vit-train."""


@dataclass
class Checkpoint:
    """Weights, config, labels, preprocessing, metrics and how it was made."""

    state_dict: dict[str, torch.Tensor]
    config: ViTConfig
    labels: list[str]
    preprocessing: PreprocessSpec
    name: str
    dataset: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    command: str = ""

    def build_model(self) -> VisionTransformer:
        model = VisionTransformer(self.config)
        model.load_state_dict(self.state_dict)
        return model.eval()

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "state_dict": self.state_dict,
                "config": self.config.to_dict(),
                "labels": self.labels,
                "preprocessing": self.preprocessing.model_dump(mode="json"),
                "name": self.name,
                "dataset": self.dataset,
                "metrics": self.metrics,
                "command": self.command,
            },
            path,
        )

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        """A vit-train checkpoint, or NotACheckpoint pointing to the importer for anything else."""
        if path.suffix.lower() == ".onnx":
            raise NotACheckpoint(f"{path} is an ONNX file: stamp it with `vit-import onnx`")
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises pickle, zip and OS errors alike
            raise NotACheckpoint(f"{path} is not a vit-train checkpoint ({error})") from error
        missing = [key for key in _KEYS if not isinstance(raw, dict) or key not in raw]
        if missing:
            raise NotACheckpoint(
                f"{path} is not a vit-train checkpoint (no {', '.join(missing)}); for a Hugging "
                "Face checkpoint use `vit-import hf`, for an ONNX file `vit-import onnx`"
            )
        return cls(
            state_dict=raw["state_dict"],
            config=ViTConfig(**raw["config"]),
            labels=list(raw["labels"]),
            preprocessing=PreprocessSpec.model_validate(raw["preprocessing"]),
            name=raw["name"],
            dataset=dict(raw["dataset"]),
            metrics=dict(raw["metrics"]),
            command=raw["command"],
        )


def state_dict_from_onnx(graph: Any) -> dict[str, torch.Tensor]:
    """The VisionTransformer weights in an ONNX graph vit-export traced: initializers keep their
    names, except each Linear's weight, which the tracer stores transposed under a generated name
    as the second input of the node `/<module path>/MatMul`."""
    from onnx import numpy_helper

    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    state = {name: torch.from_numpy(array.copy()) for name, array in arrays.items()}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in arrays:
            module = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")
            state[f"{module}.weight"] = torch.from_numpy(arrays[node.input[1]].T.copy())
            del state[node.input[1]]
        elif node.op_type == "Gemm" and node.input[1] in arrays:
            transposed = any(a.name == "transB" and a.i == 1 for a in node.attribute)
            weight = arrays[node.input[1]]
            state[node.input[1]] = torch.from_numpy((weight if transposed else weight.T).copy())
    return state


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
