"""Deterministic scene rendering at any resolution: layouts in relative coordinates, cached sprites and backgrounds."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from snapfusion.data import vocab as V
from snapfusion.data.atlas import emoji_sprite
from snapfusion.data.scene import Scene, object_boxes, object_slots  # noqa: F401  (geometry lives in scene.py)
from snapfusion.data.shapes import shape_mask
from snapfusion.errors import SnapFusionError

MIN_SIZE = 16
@functools.lru_cache(maxsize=256)
def _background(colors: tuple[str, ...], direction: str | None, size: int) -> np.ndarray:
    if len(colors) == 1:
        return np.broadcast_to(np.array(V.COLORS[colors[0]], np.uint8), (size, size, 3)).copy()
    c0, c1 = (np.array(V.COLORS[c], np.float32) for c in colors)
    t = (np.arange(size, dtype=np.float32) + 0.5) / size  # colors[0] at t=0
    ramp = (c0 * (1 - t[:, None]) + c1 * t[:, None]).round().astype(np.uint8)  # (size, 3)
    grid = ramp[None, :, :] if direction == "horizontal" else ramp[:, None, :]
    return np.broadcast_to(grid, (size, size, 3)).copy()


@functools.lru_cache(maxsize=4096)
def _shape_sprite(name: str, color: str, side: int) -> Image.Image:
    sprite = Image.new("RGBA", (side, side), V.COLORS[color] + (255,))
    sprite.putalpha(shape_mask(name, side))
    return sprite


def render(scene: Scene, size: int = 512) -> Image.Image:
    """Render ``scene`` as a ``size`` x ``size`` RGB image; identical bytes for identical (scene, size)."""
    if not isinstance(size, int) or size < MIN_SIZE:
        raise SnapFusionError(f"image size must be an integer >= {MIN_SIZE}, got {size!r}")
    bg = scene.background
    image = Image.fromarray(_background(bg.colors, bg.direction, size), "RGB")
    for obj, slots in zip(scene.objects, object_slots(scene)):
        for cx, cy, s in slots:
            side = max(1, round(s * size))
            x0, y0 = round(cx * size - side / 2), round(cy * size - side / 2)
            if obj.kind == "shape":
                sprite = _shape_sprite(obj.name, obj.color, side)
            else:
                sprite = emoji_sprite(obj.name, side)
            image.paste(sprite, (x0, y0), sprite)
    return image
