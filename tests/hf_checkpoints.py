"""Tiny Hugging Face checkpoints made here (random weights, custom labels), and the ways a test
asks transformers and a served model for their answers."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTImageProcessorPil,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
    pipeline,
)

from tests.conftest import ROOT

PROBABILITY_TOLERANCE = 1e-4
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
TINY: dict[str, Any] = {
    "patch_size": 16,
    "hidden_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 3,
    "intermediate_size": 96,
    "initializer_range": 0.2,  # answers that differ from image to image
}


def labelled(names: list[str]) -> dict[str, Any]:
    return {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
    }


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    labels: list[str]


def save(folder: Path, model: Any, processor: Any, labels: list[str]) -> Checkpoint:
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return Checkpoint(folder, labels)


def vit_imagenet_bicubic(folder: Path) -> Checkpoint:
    """ViT with ImageNet mean/std and the bicubic resample, squashed to 64x64."""
    labels = ["tabby cat", "espresso", "space shuttle", "admiral", "rocket"]
    torch.manual_seed(1)
    model = ViTForImageClassification(ViTConfig(image_size=64, **TINY, **labelled(labels)))
    processor = ViTImageProcessorPil(
        size={"height": 64, "width": 64},
        resample=3,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    return save(folder, model, processor, labels)


def deit_resize_then_crop(folder: Path) -> Checkpoint:
    """DeiT's processor: resize to 56x56, then the centre 48x48."""
    labels = ["one", "two", "three", "four"]
    torch.manual_seed(2)
    model = DeiTForImageClassification(DeiTConfig(image_size=48, **TINY, **labelled(labels)))
    processor = DeiTImageProcessorPil(
        size={"height": 56, "width": 56}, crop_size={"height": 48, "width": 48}
    )
    return save(folder, model, processor, labels)


def deit_with_teacher_shortest_edge(folder: Path) -> Checkpoint:
    """DeiT with its distillation head, the shorter side to 70 then the centre 64x64, bilinear."""
    labels = ["left", "right", "up"]
    torch.manual_seed(3)
    config = DeiTConfig(image_size=64, **TINY, **labelled(labels))
    model = DeiTForImageClassificationWithTeacher(config)
    processor = DeiTImageProcessorPil(
        size={"shortest_edge": 70}, crop_size={"height": 64, "width": 64}, resample=2
    )
    return save(folder, model, processor, labels)


def asking_to_run_its_code(folder: Path, marker: Path, *, in_file: str) -> Checkpoint:
    """The ViT checkpoint with Python of its own beside it, which writes `marker` when imported,
    named by an `auto_map` in `in_file`: config.json's under a model type transformers lacks (so
    that it asks whether to run it), or preprocessor_config.json's."""
    checkpoint = vit_imagenet_bicubic(folder)
    code = f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
    (folder / "modeling_evil.py").write_text(code)
    fields = json.loads((folder / in_file).read_text())
    if in_file == "config.json":
        fields["model_type"] = "evil-vit"
        fields["auto_map"] = {
            "AutoConfig": "modeling_evil.EvilConfig",
            "AutoModelForImageClassification": "modeling_evil.EvilModel",
        }
    else:
        fields["auto_map"] = {"AutoImageProcessor": "modeling_evil.EvilProcessor"}
    (folder / in_file).write_text(json.dumps(fields))
    return checkpoint


class RunsCode:
    """Unpickled, writes the marker file: what a malicious pickle does, harmlessly."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def pickled_with_code(folder: Path, marker: Path) -> Checkpoint:
    """The ViT checkpoint with its weights only as a pickled pytorch_model.bin that writes
    `marker` when unpickled."""
    checkpoint = vit_imagenet_bicubic(folder)
    (folder / "model.safetensors").unlink()
    torch.save({"classifier.bias": RunsCode(marker)}, folder / "pytorch_model.bin")
    return checkpoint


CHECKPOINTS = {
    "vit": vit_imagenet_bicubic,
    "deit": deit_resize_then_crop,
    "deit-teacher": deit_with_teacher_shortest_edge,
}


def run_import(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "model_export.importer", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def pipeline_probabilities(folder: Path, files: list[Path], labels: list[str]) -> np.ndarray:
    """transformers' own answer, from the checkpoint directory, one row per file."""
    classify = pipeline("image-classification", model=str(folder))
    rows = []
    for path in files:
        scores = {s["label"]: s["score"] for s in classify(str(path), top_k=len(labels))}
        rows.append([scores[label] for label in labels])
    return np.array(rows)


def post(url: str, body: bytes, content_type: str) -> Any:
    request = urllib.request.Request(url, body, {"content-type": content_type})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def classify_v1(url: str, files: list[Path]) -> tuple[np.ndarray, dict[str, Any]]:
    boundary = "vitimportboundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{p.name}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + p.read_bytes()
        + b"\r\n"
        for p in files
    ]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    answer = post(
        f"{url}/v1/classify?probabilities=true", body, f"multipart/form-data; boundary={boundary}"
    )
    return np.array([p["probabilities"] for p in answer["predictions"]]), answer


def classify_v2(url: str, name: str, files: list[Path]) -> np.ndarray:
    request = {
        "inputs": [
            {
                "name": "image",
                "shape": [len(files)],
                "datatype": "BYTES",
                "data": [base64.b64encode(p.read_bytes()).decode() for p in files],
            }
        ]
    }
    answer = post(f"{url}/v2/models/{name}/infer", json.dumps(request).encode(), "application/json")
    (output,) = answer["outputs"]
    return np.array(output["data"]).reshape(output["shape"])
