"""`shapes`: a procedural dataset of drawn shapes that look like uploads and photos of drawings.

Every sample is a pure function of (seed, index), so any split is reproducible without storing data.
Only numpy and Pillow are used: evaluation runs without torch.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

LABELS: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "hexagon",
    "cross",
    "arrow",
    "heart",
)

CLEAN_SHARE = 0.3
DARK_INK_SHARE = 0.75

Points = np.ndarray  # (K, 2) float, a closed outline in unit coordinates centred on 0


def _regular_polygon(sides: int) -> Points:
    angles = np.linspace(0, 2 * np.pi, sides, endpoint=False) - np.pi / 2
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star() -> Points:
    outer = _regular_polygon(5)
    inner = 0.42 * _regular_polygon(5) @ _rotation(np.pi / 5).T
    return np.stack([outer, inner], axis=1).reshape(-1, 2)


def _cross() -> Points:
    a = 0.32
    return np.array(
        [
            [-a, -1],
            [a, -1],
            [a, -a],
            [1, -a],
            [1, a],
            [a, a],
            [a, 1],
            [-a, 1],
            [-a, a],
            [-1, a],
            [-1, -a],
            [-a, -a],
        ]
    )


def _arrow() -> Points:
    return np.array(
        [[-1, -0.28], [0.15, -0.28], [0.15, -0.75], [1, 0], [0.15, 0.75], [0.15, 0.28], [-1, 0.28]]
    )


def _heart() -> Points:
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    points = np.stack([x, y + 2.5], axis=1)
    return points / np.abs(points).max()


OUTLINES: dict[str, Callable[[], Points]] = {
    "circle": lambda: _regular_polygon(72),
    "square": lambda: _regular_polygon(4) * math.sqrt(2) * 0.8,
    "triangle": lambda: _regular_polygon(3) + np.array([0, 0.2]),
    "star": _star,
    "hexagon": lambda: _regular_polygon(6),
    "cross": _cross,
    "arrow": _arrow,
    "heart": _heart,
}


def _rotation(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in rng.integers(0, 256, size=3))
    return r, g, b


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    """A colour clearly distinguishable from the background's mean, as a person would choose."""
    mean = background.reshape(-1, 3).mean(axis=0)
    for _ in range(50):
        colour = np.array(random_colour(rng))
        if np.abs(colour - mean).sum() > 240:
            break
    else:
        colour = np.where(mean > 127, 0, 255)
    r, g, b = (int(v) for v in colour)
    return r, g, b


def ink(rng: np.random.Generator, dark: bool) -> tuple[int, int, int]:
    """A pen colour of any hue, dark (for light paper) or light (for a dark board)."""
    strength = rng.uniform(0.0, 0.45)
    hue = np.array(random_colour(rng), dtype=np.float64)
    colour = hue * strength if dark else 255 - (255 - hue) * strength
    r, g, b = (int(v) for v in colour)
    return r, g, b


BACKGROUNDS = ("flat", "paper", "gradient", "noise", "stripes", "checker", "clutter")


def _background(rng: np.random.Generator, width: int, height: int, kind: str) -> np.ndarray:
    """Flat, gradient, noise, texture or photo-like clutter, as float (H, W, 3) in 0..255."""
    base = np.array(random_colour(rng), dtype=np.float32)
    canvas: np.ndarray = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    if kind == "paper":
        canvas = np.broadcast_to(rng.uniform(200, 255, 3), (height, width, 3)).astype(np.float32)
    elif kind == "gradient":
        other = np.array(random_colour(rng), dtype=np.float32)
        direction = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:height, 0:width]
        t = (xs * math.cos(direction) + ys * math.sin(direction)).astype(np.float32)
        t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
        canvas = base * (1 - t[..., None]) + other * t[..., None]
    elif kind == "noise":
        canvas = canvas + rng.normal(0, rng.uniform(10, 40), (height, width, 3))
    elif kind in ("stripes", "checker"):
        other = np.array(random_colour(rng), dtype=np.float32)
        period = int(rng.integers(4, 24))
        ys, xs = np.mgrid[0:height, 0:width]
        if kind == "stripes":
            angle = rng.uniform(0, np.pi)
            mask = ((xs * math.cos(angle) + ys * math.sin(angle)) // period) % 2 == 0
        else:
            mask = ((xs // period) + (ys // period)) % 2 == 0
        mix = rng.uniform(0.15, 0.5)
        canvas = np.where(mask[..., None], canvas, base * (1 - mix) + other * mix)
    elif kind == "clutter":
        canvas = _clutter(rng, width, height, base)
    return canvas


def _clutter(rng: np.random.Generator, width: int, height: int, base: np.ndarray) -> np.ndarray:
    """Blurred overlapping blobs and boxes: the out-of-focus room behind a photographed sheet."""
    image = Image.new("RGB", (width, height), tuple(int(v) for v in base))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 12))):
        x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.2, 1.0) * height
        w, h = rng.uniform(0.1, 0.6) * width, rng.uniform(0.1, 0.6) * height
        box = (x0, y0, x0 + w, y0 + h)
        if rng.random() < 0.5:
            draw.ellipse(box, fill=random_colour(rng))
        else:
            draw.rectangle(box, fill=random_colour(rng))
    # Out of focus and washed towards the base colour, so the blobs never read as drawn shapes.
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(rng.uniform(5, 10))), np.float32)
    return 0.5 * blurred + 0.5 * base


def _distractors(
    rng: np.random.Generator,
    draw: ImageDraw.ImageDraw,
    width: int,
    height: int,
    background: np.ndarray,
) -> None:
    """Small marks that are not the shape: pen strokes, dots, scribbles."""
    for _ in range(int(rng.integers(0, 5))):
        colour = _contrasting_colour(rng, background)
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        size = rng.uniform(0.03, 0.08) * min(width, height)
        kind = rng.integers(0, 3)
        if kind == 0:
            angle = rng.uniform(0, 2 * np.pi)
            end = (x + size * math.cos(angle), y + size * math.sin(angle))
            draw.line([(x, y), end], fill=colour, width=int(rng.integers(1, 4)))
        elif kind == 1:
            r = size / 4
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        else:
            steps = rng.normal(0, size / 3, (int(rng.integers(3, 7)), 2)).cumsum(axis=0)
            draw.line([(x + dx, y + dy) for dx, dy in steps], fill=colour, width=1)


def photo_effects(rng: np.random.Generator, image: Image.Image) -> Image.Image:
    """What a camera adds: focus blur, uneven light, a colour cast, sensor noise, exposure."""
    if rng.random() < 0.4:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    pixels: np.ndarray = np.asarray(image, dtype=np.float32)
    height, width = pixels.shape[:2]
    if rng.random() < 0.5:
        ys, xs = np.mgrid[0:height, 0:width]
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        distance = np.hypot(xs - cx, ys - cy) / math.hypot(width, height)
        pixels = pixels * (1 - rng.uniform(0.1, 0.6) * distance)[..., None]
    if rng.random() < 0.5:
        pixels = pixels * rng.uniform(0.85, 1.15, 3)
    contrast, brightness = rng.uniform(0.7, 1.2), rng.uniform(-30, 30)
    pixels = (pixels - 128) * contrast + 128 + brightness
    if rng.random() < 0.4:
        pixels = pixels + rng.normal(0, rng.uniform(2, 8), pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _shape_outline(
    rng: np.random.Generator,
    label: str,
    centre: tuple[float, float],
    radius: float,
    hand_drawn: bool,
    max_turn: float,
) -> list[tuple[float, float]]:
    points = OUTLINES[label]()
    # A photographed sheet is seen at an angle: a random affine map with mild stretch and shear.
    stretch = np.diag(rng.uniform(0.8, 1.2, 2))
    shear = np.array([[1.0, rng.uniform(-0.2, 0.2)], [0.0, 1.0]])
    transform = _rotation(rng.uniform(-max_turn, max_turn)) @ stretch @ shear
    points = points @ transform.T * radius
    if hand_drawn:
        points = points + rng.normal(0, radius * 0.015, points.shape)
    return [(centre[0] + x, centre[1] + y) for x, y in points]


@dataclass(frozen=True)
class Sample:
    """One encoded image as a client would upload it, with its class index."""

    data: bytes
    label: int


def render(seed: int, index: int) -> tuple[Image.Image, int]:
    """The decoded picture of sample `index` of the dataset seeded `seed`, and its class."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(len(LABELS)))
    width = int(rng.integers(112, 288))
    height = int(np.clip(width * rng.uniform(0.75, 1.33), 96, 320))
    # A share of clean drawings: dark ink on paper, near upright and centred, no marks, no
    # camera. Uploads look like this, and a ViT (no built-in notion of edges or locality) needs
    # such easy examples to escape its initial plateau; the rest teach it everything else.
    clean = bool(rng.random() < CLEAN_SHARE)
    background = _background(rng, width, height, "paper" if clean else str(rng.choice(BACKGROUNDS)))
    # Most drawings are dark ink on a lighter surface; some are chalk on a darker one.
    dark_ink = clean or bool(rng.random() < DARK_INK_SHARE)
    background = 255 - (255 - background) * 0.55 if dark_ink else background * 0.55
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    if not clean:
        _distractors(rng, draw, width, height, background)

    # The shape sits inside the central square, which a centre crop always keeps.
    side = min(width, height)
    radius = side * rng.uniform(0.24, 0.42)
    slack = (side / 2 - radius) * (0.2 if clean else 0.8)
    centre = (width / 2 + rng.uniform(-slack, slack), height / 2 + rng.uniform(-slack, slack))
    hand_drawn = bool(rng.random() < 0.4)
    max_turn = np.pi / 12 if clean else np.pi
    outline = _shape_outline(rng, LABELS[label], centre, radius, hand_drawn, max_turn)
    colour = ink(rng, dark_ink)
    if rng.random() < 0.5:
        draw.polygon(outline, fill=colour)
    else:
        # At least ~3 pixels once the image is scaled to the model's 128: still visible.
        thickness = max(int(side * 0.025), int(radius * rng.uniform(0.08, 0.2)))
        draw.line([*outline, outline[0], outline[1]], fill=colour, width=thickness, joint="curve")
    return (image if clean else photo_effects(rng, image)), label


def encode(image: Image.Image, rng: np.random.Generator) -> bytes:
    """JPEG at a random quality or PNG, the way images arrive at the service."""
    buffer = io.BytesIO()
    if rng.random() < 0.75:
        image.save(buffer, format="JPEG", quality=int(rng.integers(40, 96)))
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def sample(seed: int, index: int) -> Sample:
    image, label = render(seed, index)
    return Sample(data=encode(image, np.random.default_rng([seed, index, 1])), label=label)


def samples(seed: int, count: int, start: int = 0) -> Iterator[Sample]:
    for index in range(start, start + count):
        yield sample(seed, index)
