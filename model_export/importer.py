"""`vit-import`: a model made elsewhere -> the self-describing ONNX file the service serves.

vit-import hf SOURCE -o MODEL.onnx      a Hugging Face checkpoint directory or hub id
vit-import onnx SOURCE -o MODEL.onnx    an ONNX file, or a directory as optimum writes it
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import onnxruntime as ort

from model_contract.metadata import InvalidModelMetadata, ModelMetadata
from model_export.bf16 import (
    BF16_MAX_PROBABILITY_DIFF,
    BF16_MIN_TOP1_AGREEMENT,
    Bf16Report,
    Bf16Unmeasurable,
)
from model_export.importing import ImportRefused, decodable_image_files
from model_export.launch import needs_extra

SPEC_FLAGS = (
    "input_size",
    "resize",
    "resize_size",
    "crop_pct",
    "interpolation",
    "rescale_factor",
    "mean",
    "std",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vit-import", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    kinds = parser.add_subparsers(dest="kind", required=True)
    kinds.add_parser("schema", help="print the JSON schema of the model metadata")
    hf = kinds.add_parser(
        "hf",
        help="a Hugging Face image classification checkpoint, or a ViTModel or Dinov2Model "
        "without a head (a model without classes, serving its embedding)",
    )
    onnx = kinds.add_parser("onnx", help="an ONNX classifier made elsewhere")
    for sub in (hf, onnx):
        sub.add_argument("source")
        sub.add_argument("-o", "--output", type=Path, required=True)
        sub.add_argument(
            "--name",
            help="the model's name in URLs and answers (default: the name a stamped ONNX file "
            "already carries, else the output file's name less its suffix)",
        )
        sub.add_argument("--version", help="the model's version (default 1)")
        sub.add_argument(
            "--check-images",
            type=Path,
            help="a folder of your images for the check (default: the shipped photos)",
        )
        sub.add_argument(
            "--calibration-images",
            type=Path,
            help="a folder of images like those the model will serve, to calibrate the "
            "out-of-distribution threshold on (without it the file has none)",
        )
        sub.add_argument(
            "--jpeg-draft",
            action=argparse.BooleanOptionalAction,
            help="decode large JPEGs at a reduced scale (faster; check accuracy with vit-eval)",
        )
    precision = hf.add_mutually_exclusive_group()
    precision.add_argument(
        "--fp16", action="store_true", help="half-precision weights; float32 input and output"
    )
    precision.add_argument(
        "--int8",
        action="store_true",
        help="int8 weights, written only if it agrees with the FP32 model on >= 99%% of the "
        "check images (and loses <= 0.5 points of accuracy where they are in label folders)",
    )
    for group in (precision, onnx):
        group.add_argument(
            "--bf16",
            action="store_true",
            help="FP32 weights the service runs in bf16 where the CPU computes it "
            "(docs/BF16.md); written only if, run so here, it agrees with FP32 on >= "
            f"{BF16_MIN_TOP1_AGREEMENT * 100:.0f}%% of the check images and moves no "
            f"probability by more than {BF16_MAX_PROBABILITY_DIFF:g}",
        )
    onnx.add_argument("--labels", type=Path, help="text (one per line), JSON list or config.json")
    onnx.add_argument("--preprocessor-config", type=Path, help="a preprocessor_config.json")
    onnx.add_argument("--input-size", type=int, help="side of the square input, in pixels")
    onnx.add_argument("--resize", choices=("shorter_side", "squash"))
    onnx.add_argument("--resize-size", type=int, help="resize to this, then crop input-size")
    onnx.add_argument("--crop-pct", type=float, help="fraction of the shorter side kept")
    onnx.add_argument(
        "--interpolation", choices=("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
    )
    onnx.add_argument("--rescale-factor", type=float, help="pixel scale before mean/std (1/255)")
    onnx.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"))
    onnx.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"))
    onnx.add_argument(
        "--alpha-background",
        metavar="none|R,G,B",
        help="transparent pixels: none drops alpha, as Pillow's convert('RGB') in most "
        "frameworks' loaders (the default); R,G,B composites them onto that colour",
    )
    onnx.add_argument("--output-kind", choices=("logits", "probabilities"))
    onnx.add_argument("--output-name", help="the graph output to serve, where it has several")
    for command in (hf, onnx):
        command.add_argument(
            "--no-rollout",
            action="store_true",
            help="import a graph with no attention softmax, or attention the rollout cannot "
            "read (windowed), without the attention rollout output",
        )
    return parser.parse_args(argv)


def background(text: str) -> tuple[int, int, int] | None:
    """`--alpha-background`: none, or the colour R,G,B (0-255 each)."""
    if text.lower() == "none":
        return None
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) <= 255 for p in parts):
        raise ImportRefused(f"--alpha-background {text}: neither none nor R,G,B (0-255 each)")
    red, green, blue = (int(p) for p in parts)
    return red, green, blue


def run_hf(args: argparse.Namespace) -> str | None:
    """Why the file was not written, where its check failed; None where it was written."""
    from model_export.import_hf import import_hf

    report = import_hf(
        args.source,
        args.output,
        name=args.name,
        version=args.version or "1",
        check_images=args.check_images,
        fp16=args.fp16,
        int8=args.int8,
        bf16=args.bf16,
        jpeg_draft=bool(args.jpeg_draft),
        calibration_images=args.calibration_images,
        rollout=not args.no_rollout,
    )
    print(report.line())
    if report.passed:
        return None
    return report.refusal() if isinstance(report, Bf16Report) else "the check failed"


def run_onnx(args: argparse.Namespace) -> str | None:
    from model_export.import_onnx import import_onnx

    preprocessing: dict[str, Any] = {
        key: getattr(args, key) for key in SPEC_FLAGS if getattr(args, key) is not None
    }
    if args.jpeg_draft is not None:
        preprocessing["jpeg_draft"] = args.jpeg_draft
    if args.alpha_background is not None:
        preprocessing["alpha_background"] = background(args.alpha_background)
    report = import_onnx(
        Path(args.source),
        args.output,
        labels=args.labels,
        preprocessor_config=args.preprocessor_config,
        preprocessing=preprocessing,
        output_kind=args.output_kind,
        output_name=args.output_name,
        name=args.name,
        version=args.version,
        check_images=decodable_image_files(args.check_images),
        calibration_images=args.calibration_images,
        rollout=not args.no_rollout,
        bf16=args.bf16,
    )
    print(report.line())
    return None  # every failed check is a refusal, raised


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # A graph failing on the check images is refused in one line; onnxruntime's log says it
    # again in many.
    ort.set_default_logger_severity(4)
    args = parse_args(argv)
    if args.kind == "schema":
        print(json.dumps(ModelMetadata.model_json_schema(), indent=2))
        return
    try:
        refusal = run_hf(args) if args.kind == "hf" else run_onnx(args)
    except (ImportRefused, InvalidModelMetadata) as error:
        sys.exit(f"vit-import: {error}")
    except Bf16Unmeasurable as error:
        sys.exit(f"vit-import: {error}; {args.output} not written")
    except ModuleNotFoundError as error:
        line = needs_extra(error, "vit-import", "import")
        if line is None:
            raise
        sys.exit(line)
    if refusal is not None:
        sys.exit(f"vit-import: {refusal}; {args.output} not written")
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
