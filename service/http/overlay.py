"""An attention map laid over the photo it explains, as a PNG: what a person looks at to see
where the model looked."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

HEAT_OPACITY = 0.6
"""How much of the colour the hottest patch shows; the photo shows through the rest."""
UNSEEN_DIMMING = 0.45
"""What is left of the brightness outside the box the model saw (cropped away)."""


def heat_colours(heat: np.ndarray) -> np.ndarray:
    """Heat in [0, 1] as RGB in [0, 1], black through red and yellow to white: readable on
    most photos and in grey print."""
    return np.clip(np.stack([3 * heat, 3 * heat - 1, 3 * heat - 2], axis=-1), 0.0, 1.0)


def overlay_png(
    picture: np.ndarray,
    grid: np.ndarray,
    box: tuple[float, float, float, float],
    upright_size: tuple[int, int],
) -> bytes:
    """`picture` (the upright photo, (H, W, 3) uint8, perhaps shrunk from `upright_size`)
    with `grid` (one value per patch) stretched over `box` (in the original's pixels) as a
    heat map, scaled so its largest value is the hottest; outside the box, dimmed."""
    height, width = picture.shape[:2]
    scale_x, scale_y = width / upright_size[0], height / upright_size[1]
    left, top = round(box[0] * scale_x), round(box[1] * scale_y)
    right, bottom = round(box[2] * scale_x), round(box[3] * scale_y)
    left, top = min(max(left, 0), width - 1), min(max(top, 0), height - 1)
    right, bottom = max(min(right, width), left + 1), max(min(bottom, height), top + 1)

    photo = picture.astype(np.float32) / 255.0
    out = photo * UNSEEN_DIMMING
    peak = float(grid.max())
    normalised = (grid / peak if peak > 0 else np.zeros_like(grid)).astype(np.float32)
    stretched = Image.fromarray(normalised, mode="F").resize(
        (right - left, bottom - top), Image.Resampling.BILINEAR
    )
    heat = np.clip(np.asarray(stretched), 0.0, 1.0)[..., None]
    seen = photo[top:bottom, left:right]
    alpha = HEAT_OPACITY * heat
    out[top:bottom, left:right] = seen * (1 - alpha) + heat_colours(heat[..., 0]) * alpha
    image = Image.fromarray(np.round(out * 255).astype(np.uint8), mode="RGB")
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    return encoded.getvalue()
