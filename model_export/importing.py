"""What both importers share: their refusal, the images they check with, the names they give
models and sources, and what they refuse to run."""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from model_contract.decode import decode
from model_contract.errors import ImageError
from model_contract.outputs import EMBEDDING
from model_contract.preprocess import PreprocessSpec, preprocess
from model_runtime.session import ModelSession, softmax

PHOTOS = Path(__file__).resolve().parent / "photos"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CHECK_BATCH_SIZE = 16


class ImportRefused(ValueError):
    """What was given cannot be served with the numbers its framework gives; one line says why."""


def image_files(folder: Path | None) -> list[Path]:
    """Every image file under `folder` (the shipped photos when None), in a stable order."""
    folder = folder or PHOTOS
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ImportRefused(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return files


def decodable_image_files(folder: Path | None) -> list[Path]:
    """`image_files`, each decoded once as the service decodes uploads: an import checks and
    calibrates on all of them, so one that does not decode is refused, naming it, before
    anything is run on the others."""
    files = image_files(folder)
    for path in files:
        try:
            decode(path.read_bytes())
        except ImageError as error:
            raise ImportRefused(f"{path} does not decode: {error}") from error
    return files


def model_name(output: Path) -> str:
    """The name a model is served under unless told otherwise: the file it is written to, less
    its suffix (`models/my-vit.onnx` serves `my-vit`), made fit for URLs (/v2/models/{name})."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", output.stem).strip("-.") or "model"


def source_name(source: str | Path) -> str:
    """What a file's metadata says it came from: a local path's last part, a hub id whole. The
    folders above a path are the importing machine's, and /v1/models shows the metadata to
    anyone."""
    if not Path(source).exists():
        return str(source)  # a hub id: no path on this machine
    return Path(source).resolve().name


def read_json(path: Path) -> object:
    """A checkpoint's JSON file, or a refusal naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:  # ValueError: not UTF-8, not JSON
        raise ImportRefused(f"{path}: not a readable JSON file ({error})") from error


CUSTOM_CODE_KEYS = ("auto_map", "custom_pipelines")
"""The keys by which a checkpoint's JSON asks transformers to import Python shipped with it (or
kept in another hub repository)."""


def refuse_custom_code(fields: object, path: Path) -> None:
    """A refusal where `fields` (the JSON file at `path`) ask for the checkpoint's own Python
    code, at the top level or in a section (processor_config.json nests its image processor's).
    A download is read, never run: transformers would ask `[y/N]` on a terminal and run the
    code on "y"."""
    sections = [fields, *fields.values()] if isinstance(fields, dict) else []
    for section in sections:
        for key in CUSTOM_CODE_KEYS:
            if isinstance(section, dict) and key in section:
                raise ImportRefused(
                    f"{path}: its {key} asks to run Python code shipped with the checkpoint, "
                    "and vit-import runs none: import a model whose architecture and image "
                    "processor transformers itself ships"
                )


@contextmanager
def staged(output: Path) -> Iterator[Path]:
    """A temporary file beside `output`: the caller moves it over `output` once every check has
    passed, so a failed import never leaves a servable file or replaces a good one, nor the
    folders it made for it."""
    made = [folder for folder in [output.parent, *output.parent.parents] if not folder.exists()]
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=output.parent, suffix=".onnx", delete=False) as file:
        path = Path(file.name)
    path.chmod(0o644)  # a model file others (a container's user) must be able to read
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
        if not output.exists():
            for folder in made:  # deepest first
                with contextlib.suppress(OSError):  # another file was put there meanwhile
                    folder.rmdir()


def chunks(files: list[Path]) -> Iterator[list[Path]]:
    """The files CHECK_BATCH_SIZE at a time."""
    for start in range(0, len(files), CHECK_BATCH_SIZE):
        yield files[start : start + CHECK_BATCH_SIZE]


def probability_diff(reference_logits: np.ndarray, logits: np.ndarray) -> float:
    """The largest difference of any probability between two models' logits for the same
    images."""
    return float(np.abs(softmax(reference_logits) - softmax(logits)).max())


def served_logits(session: ModelSession, files: list[Path], spec: PreprocessSpec) -> np.ndarray:
    """What the service computes for each file (its decoding and preprocessing, then the model),
    in batches of CHECK_BATCH_SIZE however many files there are."""
    return np.concatenate([session.logits(batch) for batch in preprocessed(files, spec)])


def served_embeddings(session: ModelSession, files: list[Path], spec: PreprocessSpec) -> np.ndarray:
    """The embedding the service answers for each file, as `served_logits` computes."""
    return np.concatenate([session.infer(batch)[EMBEDDING] for batch in preprocessed(files, spec)])


def preprocessed(files: list[Path], spec: PreprocessSpec) -> Iterator[np.ndarray]:
    """The files decoded and preprocessed as the service does, CHECK_BATCH_SIZE at a time."""
    for chunk in chunks(files):
        yield np.concatenate([preprocess(p.read_bytes(), spec) for p in chunk])
