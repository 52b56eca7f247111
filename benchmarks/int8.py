"""int8 against FP32 on the CPU: agreement, accuracy and images/s for three models, and dynamic
against static quantization.

    python -m benchmarks.int8           # about 5 minutes on 2 cores

Models: the bundled one (models/shapes-vit.onnx, quantized directly), and ViT-Ti/16 and ViT-B/16
at 224x224 with random weights, imported with `vit-import hf` and `vit-import hf --int8` (which
passes its gate, or this stops). Each batch size times the variants of one model in turn, call
after call, so that a slow moment of the shared machine falls on all of them; medians are quoted.
Results go to docs/int8.json; docs/INT8.md quotes them.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from model_contract.preprocess import preprocess
from model_export.export import held_out
from model_export.importing import PHOTOS, image_files, served_logits
from model_export.quantize import Int8Report, compare, quantize, root_logger_quiet
from model_runtime.options import CPU, IN_PROCESS
from model_runtime.session import ModelSession, default_thread_count

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "shapes-vit.onnx"
HELD_OUT_SEED = 1_000_003  # the bundled model's held-out seed (its metadata says so)
HELD_OUT_COUNT = 2000
CALIBRATION_COUNT = 256  # held-out images after the HELD_OUT_COUNT the gate uses
BATCH_SIZES = (1, 8)
SECONDS_PER_POINT = 30.0
VIT_SIZES = {"ViT-Ti/16 224": (192, 3), "ViT-B/16 224": (768, 12)}


class Batches(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime has no hints
    """Calibration inputs for quantize_static, one image per call as the service may see."""

    def __init__(self, images: np.ndarray) -> None:
        self.rows = iter(images)

    def get_next(self) -> dict[str, np.ndarray] | None:
        row = next(self.rows, None)
        return None if row is None else {"pixel_values": row[None]}


def quantize_static_file(fp32: Path, output: Path, images: np.ndarray, fmt: QuantFormat) -> None:
    """Static quantization: activation ranges calibrated (min/max) on `images`, per-channel
    int8 weights, uint8 activations."""
    with tempfile.TemporaryDirectory() as folder, root_logger_quiet():
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared))
        quantize_static(
            prepared,
            output,
            Batches(images),
            quant_format=fmt,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )


def cpu_session(path: Path) -> ort.InferenceSession:
    """All cores for each call; threads stop spinning when a call returns, so one variant's
    idle threads never slow the next variant's call."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = default_thread_count()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(str(path), options, providers=[CPU])


def images_per_second(files: dict[str, Path], side: int) -> dict[str, dict[int, float]]:
    """Median images/s of each file at each batch size, the files' calls interleaved."""
    sessions = {name: cpu_session(path) for name, path in files.items()}
    rng = np.random.default_rng(0)
    result: dict[str, dict[int, float]] = {name: {} for name in files}
    for batch_size in BATCH_SIZES:
        batch = rng.standard_normal((batch_size, 3, side, side)).astype(np.float32)
        times: dict[str, list[float]] = {name: [] for name in files}
        for session in sessions.values():
            session.run(None, {"pixel_values": batch})  # first-call allocations
        started = time.monotonic()
        while min(len(t) for t in times.values()) < 5 or (
            time.monotonic() - started < SECONDS_PER_POINT
            and min(len(t) for t in times.values()) < 50
        ):
            for name, session in sessions.items():
                begin = time.perf_counter()
                session.run(None, {"pixel_values": batch})
                times[name].append(time.perf_counter() - begin)
        for name in files:
            result[name][batch_size] = batch_size / statistics.median(times[name])
            print(f"  batch {batch_size} {name}: {result[name][batch_size]:.1f} images/s")
    return result


def gate_row(report: Int8Report) -> dict[str, Any]:
    return {
        "images": report.images,
        "top1_agreement": report.top1_agreement,
        "fp32_accuracy": report.fp32_accuracy,
        "int8_accuracy": report.int8_accuracy,
        "passed": report.passed,
    }


def default_model(folder: Path) -> dict[str, Any]:
    """The bundled model: dynamic and both static formats, on held-out shapes images."""
    spec = ModelSession(DEFAULT_MODEL, IN_PROCESS).metadata.preprocessing
    batches = list(held_out(spec, seed=HELD_OUT_SEED, count=HELD_OUT_COUNT + CALIBRATION_COUNT))
    images = np.concatenate([b for b, _ in batches])
    truth = np.concatenate([t for _, t in batches])
    gate_images, calibration = images[:HELD_OUT_COUNT], images[HELD_OUT_COUNT:]
    files = {"fp32": DEFAULT_MODEL, "dynamic": folder / "shapes-dynamic.onnx"}
    quantize(DEFAULT_MODEL, files["dynamic"])
    for name, fmt in (("static QDQ", QuantFormat.QDQ), ("static QOperator", QuantFormat.QOperator)):
        files[name] = folder / f"shapes-{fmt.name}.onnx"
        quantize_static_file(DEFAULT_MODEL, files[name], calibration, fmt)

    def logits(path: Path) -> np.ndarray:
        session = cpu_session(path)
        return np.concatenate(
            [
                session.run(None, {"pixel_values": gate_images[i : i + 64]})[0]
                for i in range(0, len(gate_images), 64)
            ]
        )

    reference = logits(DEFAULT_MODEL)
    gate = {
        name: gate_row(compare(reference, logits(path), truth[:HELD_OUT_COUNT]))
        for name, path in files.items()
        if name != "fp32"
    }
    for name, row in gate.items():
        print(f"  {name}: {row}")
    return {"gate": gate, "images_per_second": images_per_second(files, spec.input_size)}


def imported_checkpoint(folder: Path, title: str, hidden: int, heads: int) -> Path:
    """A Hugging Face ViT checkpoint at 224 with random weights and 1,000 labels."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    labels = [f"class {i}" for i in range(1000)]
    classes: dict[str, Any] = {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }
    config = ViTConfig(
        image_size=224,
        patch_size=16,
        hidden_size=hidden,
        num_hidden_layers=12,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        **classes,
    )
    torch.manual_seed(0)
    checkpoint = folder / title.replace("/", "-").replace(" ", "-")
    ViTForImageClassification(config).eval().save_pretrained(checkpoint)
    ViTImageProcessorPil(size={"height": 224, "width": 224}).save_pretrained(checkpoint)
    return checkpoint


def imported_vit(folder: Path, title: str, hidden: int, heads: int) -> dict[str, Any]:
    """A ViT at 224 with random weights, imported in FP32 and int8 (gated on the shipped photos),
    and quantized statically (QDQ, calibrated on the photos) for the comparison."""
    from model_export.import_hf import import_hf

    checkpoint = imported_checkpoint(folder, title, hidden, heads)
    files = {
        "fp32": checkpoint.with_suffix(".fp32.onnx"),
        "dynamic": checkpoint.with_suffix(".int8.onnx"),
    }
    fp32_report = import_hf(str(checkpoint), files["fp32"])
    int8_report = import_hf(str(checkpoint), files["dynamic"], int8=True)
    if not (fp32_report.passed and isinstance(int8_report, Int8Report) and int8_report.passed):
        raise SystemExit(f"{title}: {fp32_report.line()}\n{int8_report.line()}")
    print(f"  {int8_report.line()}")
    photos = image_files(PHOTOS)
    fp32 = ModelSession(files["fp32"], IN_PROCESS)
    spec = fp32.metadata.preprocessing
    files["static QDQ"] = checkpoint.with_suffix(".qdq.onnx")
    calibration = np.concatenate([preprocess(p.read_bytes(), spec) for p in photos])
    quantize_static_file(files["fp32"], files["static QDQ"], calibration, QuantFormat.QDQ)
    reference = served_logits(fp32, photos, spec)
    gate = {
        name: gate_row(
            compare(reference, served_logits(ModelSession(files[name], IN_PROCESS), photos, spec))
        )
        for name in ("dynamic", "static QDQ")
    }
    return {
        "gate": gate,
        "size_mb": {name: path.stat().st_size / 1e6 for name, path in files.items()},
        "images_per_second": images_per_second(files, 224),
    }


def main() -> None:
    results: dict[str, Any] = {"threads": default_thread_count(), "ort": ort.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print("bundled model (shapes-vit, 128x128)")
        results["shapes-vit 128"] = default_model(folder)
        for title, (hidden, heads) in VIT_SIZES.items():
            print(title)
            results[title] = imported_vit(folder, title, hidden, heads)
    out = ROOT / "docs" / "int8.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
