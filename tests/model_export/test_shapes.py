"""The procedural dataset: deterministic, every class, encoded as uploads are."""

from __future__ import annotations

import io
from collections import Counter

from PIL import Image

from model_export import shapes


def test_a_sample_is_a_pure_function_of_seed_and_index() -> None:
    assert shapes.sample(3, 17) == shapes.sample(3, 17)
    assert shapes.sample(3, 17).data != shapes.sample(4, 17).data


def test_every_class_appears_and_classes_are_balanced() -> None:
    counts = Counter(sample.label for sample in shapes.samples(11, 400))
    assert set(counts) == set(range(len(shapes.LABELS)))
    assert min(counts.values()) > 400 / len(shapes.LABELS) / 2
    assert len(shapes.LABELS) >= 8


def test_samples_are_jpeg_or_png_files_of_varied_sizes() -> None:
    formats, sizes = set(), set()
    for sample in shapes.samples(5, 40):
        image = Image.open(io.BytesIO(sample.data))
        formats.add(image.format)
        sizes.add(image.size)
    assert formats == {"JPEG", "PNG"}
    assert len(sizes) > 30
