"""A Hugging Face image processor -> this project's PreprocessSpec, or a refusal naming the field
that cannot be expressed. Only processors that run the generic PIL steps (resize, centre crop,
rescale, normalise) can be matched number for number; any other is refused, never approximated."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from model_contract.preprocess import PreprocessSpec, preprocess

# PIL's resampling codes, as processors store them in `resample`.
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# The spec's fields named as the processor names them, for refusals.
_PROCESSOR_FIELD = {"mean": "image_mean", "std": "image_std", "interpolation": "resample"}
# The steps whose generic versions the spec reproduces; a processor overriding one does more.
_GENERIC_STEPS = ("resize", "center_crop", "rescale", "normalize", "process_image")
# The loop over those steps: processors override it to add steps behind flags (BEiT's label
# reduction, for segmentation maps), so an override is judged by the pixels it gives.
_STEP_LOOP = "_preprocess"
PIXEL_TOLERANCE = 1e-4
"""How far, in the model's input units, an overridden step loop's pixels may be from the spec's:
far under one level of an 8-bit channel."""


class UnexpressibleProcessor(ValueError):
    """The processor does something the preprocessing spec cannot say."""


def _square(value: Any, field: str) -> tuple[str, int]:
    """('squash' | 'shorter_side', pixels) from a processor's size or crop_size."""
    if isinstance(value, int):
        return "squash", value
    size = value if isinstance(value, dict) else vars(value)
    shortest, longest = size.get("shortest_edge"), size.get("longest_edge")
    height, width = size.get("height"), size.get("width")
    if longest or size.get("max_height") or size.get("max_pixels"):
        raise UnexpressibleProcessor(f"{field} {_given(size)}: a longest-edge or area limit")
    if shortest:
        return "shorter_side", int(shortest)
    if height is None or width is None:
        raise UnexpressibleProcessor(f"{field} {_given(size)}: neither height/width nor an edge")
    if height != width:
        raise UnexpressibleProcessor(f"{field} {height}x{width}: not square")
    return "squash", int(height)


def _given(size: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in size.items() if value is not None}


def _triple(value: Any, field: str) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, int | float) else [float(v) for v in value]
    if len(values) != 3:
        raise UnexpressibleProcessor(f"{field} {values}: not one value per RGB channel")
    return values[0], values[1], values[2]


def spec_from_processor(
    processor: Any, *, jpeg_draft: bool = False, images: Sequence[Path] = ()
) -> PreprocessSpec:
    """The spec that gives, from the same decoded image, the tensor `processor` gives; a
    processor with its own step loop is checked on `images` (refused without any)."""
    from transformers.image_processing_backends import PilBackend

    name = type(processor).__name__
    if PilBackend not in type(processor).__mro__:
        raise UnexpressibleProcessor(f"{name}: not a PIL-backend image processor")
    for flag in ("do_pad", "do_flip_channel_order", "do_reduce_labels"):
        if getattr(processor, flag, None):
            raise UnexpressibleProcessor(f"{flag}: true")
    for step in _GENERIC_STEPS:
        if getattr(type(processor), step) is not getattr(PilBackend, step):
            raise UnexpressibleProcessor(f"{name}.{step}: a model-specific step")
    spec = _spec_of_fields(processor, jpeg_draft=jpeg_draft)
    if getattr(type(processor), _STEP_LOOP) is not getattr(PilBackend, _STEP_LOOP):
        _confirm_pixels(processor, spec, images)
    return spec


def _confirm_pixels(processor: Any, spec: PreprocessSpec, images: Sequence[Path]) -> None:
    """Refuse unless `processor` gives, for every image, the pixels `spec` gives (decoded in
    full, as transformers decodes)."""
    from transformers.image_utils import load_image

    where = f"{type(processor).__name__}.{_STEP_LOOP}"
    if not images:
        raise UnexpressibleProcessor(f"{where}: a model-specific step (no images to check it on)")
    full = spec.model_copy(update={"jpeg_draft": False})
    for path in images:
        given = processor(images=[load_image(str(path))], return_tensors="np")["pixel_values"]
        expected = np.asarray(given, dtype=np.float32)
        ours = preprocess(path.read_bytes(), full)
        gap = float(np.abs(expected - ours).max()) if expected.shape == ours.shape else np.inf
        if not gap <= PIXEL_TOLERANCE:
            raise UnexpressibleProcessor(
                f"{where}: a model-specific step ({path.name}: its pixels differ from resize, "
                f"crop, rescale and normalise by {gap:.3g})"
            )


def _spec_of_fields(processor: Any, *, jpeg_draft: bool) -> PreprocessSpec:
    """The spec of the processor's size, crop, resample, rescale and normalise fields."""
    if not processor.do_resize:
        raise UnexpressibleProcessor("do_resize: false (inputs of any size)")
    resize, resize_size = _square(processor.size, "size")
    input_size = resize_size
    if processor.do_center_crop:
        _, input_size = _square(processor.crop_size, "crop_size")
        if input_size > resize_size:
            raise UnexpressibleProcessor(
                f"crop_size {input_size} larger than the resized {resize_size} (zero padding)"
            )
    elif resize == "shorter_side":
        raise UnexpressibleProcessor("size.shortest_edge without a centre crop: not square")
    if processor.resample is None:
        raise UnexpressibleProcessor("resample: null (no resampling filter to resize with)")
    resample = int(processor.resample)
    if resample not in _RESAMPLE:
        raise UnexpressibleProcessor(f"resample {resample}: unknown to Pillow")
    fields = {
        "input_size": input_size,
        "resize": resize,
        "resize_size": resize_size,
        "interpolation": _RESAMPLE[resample],
        "rescale_factor": float(processor.rescale_factor) if processor.do_rescale else 1.0,
        "mean": _triple(processor.image_mean, "image_mean")
        if processor.do_normalize
        else (0.0, 0.0, 0.0),
        "std": _triple(processor.image_std, "image_std")
        if processor.do_normalize
        else (1.0, 1.0, 1.0),
        # Pipelines load images with Pillow's convert("RGB"): alpha is dropped, and a
        # transparency colour key kept, which do_convert_rgb then paints white.
        "alpha_background": None,
        "transparency_key_background": (255, 255, 255)
        if getattr(processor, "do_convert_rgb", None)
        else None,
        "jpeg_draft": jpeg_draft,
    }
    try:
        return PreprocessSpec.model_validate(fields)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(_PROCESSOR_FIELD.get(str(part), str(part)) for part in first["loc"])
        reason = str(first.get("ctx", {}).get("error", first["msg"]))  # without "Value error, "
        for spec_name, processor_name in _PROCESSOR_FIELD.items():
            if reason.startswith(f"{spec_name} "):
                reason = processor_name + reason.removeprefix(spec_name)
        raise UnexpressibleProcessor(f"{where}: {reason}" if where else reason) from None
