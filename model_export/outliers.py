"""`outliers`: procedurally made images that are not shapes, for outlier exposure in training and
for choosing the out-of-distribution score; never photographs, so that the photos the flag is
measured on stay unseen.

Each image is a pure function of (seed, index), like `shapes`: noise of every grain, textures with
a natural image's 1/f spectrum, gradients, gratings, dead-leaves scenes (many overlapping discs and
boxes, the classic model of a photograph's occlusions), lines of text, large softly edged objects
filled with texture, scribbles, and collages and crops of these, then the same camera effects and
encodings as the shapes. Many look like the backgrounds shapes are drawn on (noise, textures,
gradients, clutter) with no shape on them: the model learns that a shape, not its surroundings,
makes an image its own.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from model_export import shapes

# The set vit-train exposes a model to, and the set vit-export chooses the out-of-distribution
# score on: disjoint, and neither ever measures the flag (benchmarks/ood.py uses photos).
OUTLIER_SEED = 3_000_003
CHOICE_SEED = 4_000_003

Canvas = Callable[[np.random.Generator, int, int], Image.Image]


def _grain(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Coloured noise from pixel-sized to blotches filling the frame, in a random palette."""
    cells = int(rng.choice([2, 4, 8, 16, 32, 64, max(width, height)]))
    small = rng.uniform(0, 255, (max(1, height * cells // max(width, height)), cells, 3))
    resample = Image.Resampling.NEAREST if rng.random() < 0.3 else Image.Resampling.BICUBIC
    image = Image.fromarray(small.astype(np.uint8)).resize((width, height), resample)
    return _recolour(rng, np.asarray(image, np.float32))


def _spectrum(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Noise with a photograph's power spectrum, 1/f^a with a from 1.5 to 3: clouds, foliage,
    rock, water, depending on a and the palette."""
    exponent = rng.uniform(1.5, 3.0)
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    radius = np.hypot(fx, fy)
    radius[0, 0] = 1.0
    amplitude = radius ** (-exponent / 2)
    amplitude[0, 0] = 0.0
    channels = []
    shared = rng.normal(size=radius.shape) + 1j * rng.normal(size=radius.shape)
    for _ in range(3):
        own = rng.normal(size=radius.shape) + 1j * rng.normal(size=radius.shape)
        mix = rng.uniform(0.3, 1.0)
        field = np.fft.irfft2(amplitude * (mix * shared + (1 - mix) * own), s=(height, width))
        channels.append((field - field.mean()) / (field.std() + 1e-9))
    pixels = 128 + np.stack(channels, axis=2) * rng.uniform(25, 60)
    return _recolour(rng, pixels.astype(np.float32))


def _gradient(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A linear or radial blend of two or three colours, with a little grain."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        t = xs * math.cos(angle) + ys * math.sin(angle)
    else:
        t = np.hypot(xs - rng.uniform(0, width), ys - rng.uniform(0, height))
    t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
    count = int(rng.integers(2, 4))
    stops = np.array([shapes.random_colour(rng) for _ in range(count)], np.float32)
    position = t * (len(stops) - 1)
    low = np.minimum(position.astype(int), len(stops) - 2)
    frac = (position - low)[..., None]
    pixels = stops[low] * (1 - frac) + stops[low + 1] * frac
    return _clip(pixels + rng.normal(0, rng.uniform(0, 6), pixels.shape))


def _grating(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Sums of sinusoidal and square-wave gratings at any angle and period: fabric, fences,
    tiles."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    total = np.zeros((height, width), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(3, 40)
        wave = np.sin(2 * np.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period)
        total += np.sign(wave) if rng.random() < 0.3 else wave
    t = (total - total.min()) / max(float(np.ptp(total)), 1e-6)
    a, b = (np.array(shapes.random_colour(rng), np.float32) for _ in range(2))
    return _clip(a * (1 - t[..., None]) + b * t[..., None])


def _dead_leaves(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Many overlapping discs and boxes of every size (sizes drawn from a power law): no single
    object stands out, as in a photograph of a scene."""
    image = Image.new("RGB", (width, height), shapes.random_colour(rng))
    draw = ImageDraw.Draw(image)
    side = max(width, height)
    palette = [shapes.random_colour(rng) for _ in range(int(rng.integers(3, 12)))]
    for _ in range(int(rng.integers(40, 250))):
        size = side * min(0.5, 0.02 * (1 - rng.random()) ** -0.7)
        x, y = rng.uniform(-size, width), rng.uniform(-size, height)
        colour = palette[int(rng.integers(len(palette)))]
        if rng.random() < 0.6:
            draw.ellipse((x, y, x + size, y + size * rng.uniform(0.5, 1.5)), fill=colour)
        else:
            draw.rectangle((x, y, x + size * rng.uniform(0.5, 1.5), y + size), fill=colour)
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 3)))
    return image


def _text(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Lines of random letters on a page: a scanned document or a photographed sign."""
    light = tuple(int(v) for v in rng.integers(200, 256, 3))
    paper = shapes.random_colour(rng) if rng.random() < 0.3 else light
    image = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(image)
    size = int(rng.integers(8, 28))
    font = ImageFont.load_default(size=size)
    ink = shapes.ink(rng, dark=sum(paper) > 380)
    alphabet = string.ascii_letters + string.digits + "     .,;"
    y = rng.uniform(-size, size)
    while y < height:
        line = "".join(rng.choice(list(alphabet), int(rng.integers(10, 60))))
        draw.text((rng.uniform(-10, 10), y), line, fill=ink, font=font)
        y += size * rng.uniform(1.1, 1.8)
    return image


def _scribbles(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Random pen strokes over a page: marks, not a drawn shape."""
    image = Image.fromarray(np.asarray(_gradient(rng, width, height)) // 2 + 100)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(5, 40))):
        steps = rng.normal(0, max(width, height) / 12, (int(rng.integers(3, 20)), 2)).cumsum(0)
        start = rng.uniform(0, width), rng.uniform(0, height)
        points = [(start[0] + dx, start[1] + dy) for dx, dy in steps]
        draw.line(points, fill=shapes.random_colour(rng), width=int(rng.integers(1, 6)))
    return image


def _textured_object(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """One to three large objects, discs, boxes or irregular blobs, each filled with a texture of
    its own and softly edged, over a textured, plain or dark ground: a photographed thing (a
    cell, a face, the retina) is round and textured, where a drawn shape is flat."""
    ground_kind = rng.random()
    if ground_kind < 0.3:
        image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 40, 3)))
    elif ground_kind < 0.5:
        image = _gradient(rng, width, height)
    else:
        image = _spectrum(rng, width, height)
    side = min(width, height)
    for _ in range(int(rng.integers(1, 4))):
        mask = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(mask)
        size = side * rng.uniform(0.35, 0.95)
        x, y = (
            rng.uniform(-size / 4, width - size * 0.75),
            rng.uniform(-size / 4, height - size * 0.75),
        )
        shape = rng.random()
        if shape < 0.45:
            draw.ellipse((x, y, x + size, y + size * rng.uniform(0.7, 1.3)), fill=255)
        elif shape < 0.6:
            draw.rectangle((x, y, x + size * rng.uniform(0.6, 1.4), y + size), fill=255)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(6, 14))))
            radii = size / 2 * rng.uniform(0.5, 1.0, len(angles))
            cx, cy = x + size / 2, y + size / 2
            draw.polygon(
                [
                    (cx + r * math.cos(a), cy + r * math.sin(a))
                    for a, r in zip(angles, radii, strict=True)
                ],
                fill=255,
            )
        mask = mask.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, side / 15)))
        filling = (_spectrum if rng.random() < 0.7 else _grain)(rng, width, height)
        image = Image.composite(filling, image, mask)
    if rng.random() < 0.4:
        image = image.convert("L").convert("RGB")
    return image


def _collage(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A grid of two to four tiles per side, each another kind of outlier."""
    tiles = int(rng.integers(2, 5))
    image = Image.new("RGB", (width, height))
    for row in range(tiles):
        for col in range(tiles):
            x0, x1 = col * width // tiles, (col + 1) * width // tiles
            y0, y1 = row * height // tiles, (row + 1) * height // tiles
            kind = _SIMPLE[int(rng.integers(len(_SIMPLE)))]
            image.paste(kind(rng, max(8, x1 - x0), max(8, y1 - y0)), (x0, y0))
    return image


def _crop(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A small part of another outlier, enlarged: coarse, blurry structure."""
    scale = rng.uniform(2, 6)
    inner = _SIMPLE[int(rng.integers(len(_SIMPLE)))]
    small = inner(rng, max(8, int(width / scale)), max(8, int(height / scale)))
    return small.resize((width, height), Image.Resampling.BICUBIC)


def _recolour(rng: np.random.Generator, pixels: np.ndarray) -> Image.Image:
    """Grey, the colours as drawn, or mapped between two random colours."""
    choice = rng.random()
    if choice < 0.25:
        grey = pixels.mean(axis=2, keepdims=True)
        pixels = np.repeat(grey, 3, axis=2)
    elif choice < 0.6:
        t = (pixels.mean(axis=2, keepdims=True) / 255).clip(0, 1)
        a, b = (np.array(shapes.random_colour(rng), np.float32) for _ in range(2))
        pixels = a * (1 - t) + b * t
    return _clip(pixels)


def _clip(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


_SIMPLE: tuple[Canvas, ...] = (
    _grain,
    _spectrum,
    _gradient,
    _grating,
    _dead_leaves,
    _text,
    _textured_object,
)
KINDS: dict[str, Canvas] = {
    "grain": _grain,
    "spectrum": _spectrum,
    "gradient": _gradient,
    "grating": _grating,
    "dead_leaves": _dead_leaves,
    "text": _text,
    "textured_object": _textured_object,
    "scribbles": _scribbles,
    "collage": _collage,
    "crop": _crop,
}


def render(seed: int, index: int) -> tuple[Image.Image, str]:
    """The decoded picture of outlier `index` of the set seeded `seed`, and its kind."""
    rng = np.random.default_rng([seed, index, 7])
    kind = list(KINDS)[int(rng.integers(len(KINDS)))]
    width = int(rng.integers(112, 320))
    height = int(np.clip(width * rng.uniform(0.75, 1.33), 96, 360))
    image = KINDS[kind](rng, width, height)
    return (shapes.photo_effects(rng, image) if rng.random() < 0.6 else image), kind


def sample(seed: int, index: int) -> bytes:
    """Outlier `index` of `seed`, encoded as an upload (JPEG at a random quality, or PNG)."""
    image, _ = render(seed, index)
    return shapes.encode(image, np.random.default_rng([seed, index, 8]))


def samples(seed: int, count: int, start: int = 0) -> Iterator[bytes]:
    for index in range(start, start + count):
        yield sample(seed, index)
