"""Deterministic scene rendering at any resolution: layouts in relative coordinates, cached sprites and backgrounds."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from snapfusion.data import vocab as V
from snapfusion.data.atlas import emoji_sprite, load_atlas
from snapfusion.data.scene import Box, Scene
from snapfusion.data.shapes import shape_extent, shape_mask
from snapfusion.errors import SnapFusionError

MIN_SIZE = 16
JITTER = {"single": 0.03, "pair": 0.025, "group": 0.012}  # max |offset| of a slot center, relative
BORDER = 0.01  # slots stay this far inside the image

Slot = tuple[float, float, float]  # (center x, center y, side), relative


def object_slots(scene: Scene) -> list[list[Slot]]:
    """Square slot of every drawn copy of every object; jitter comes from scene.seed only."""
    rng = np.random.default_rng(scene.seed)
    jitter = JITTER[scene.layout]
    out = []
    for obj in scene.objects:
        s = V.SIZE_FRACTION[obj.size]
        if scene.layout == "pair":
            ax = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}[obj.position]
            centers = [(0.5 + ax[0] * V.PAIR_OFFSET, 0.5 + ax[1] * V.PAIR_OFFSET)]
        elif obj.count == 1:
            centers = [V.POSITION_CENTER[obj.position]]
        else:  # a row of copies across the middle
            gap = min(s + 0.05, (1 - s - 0.04) / (obj.count - 1))
            centers = [(0.5 + (i - (obj.count - 1) / 2) * gap, 0.5) for i in range(obj.count)]
        slots = []
        for cx, cy in centers:
            dx, dy = rng.uniform(-jitter, jitter, size=2)
            lo, hi = BORDER + s / 2, 1 - BORDER - s / 2
            slots.append((float(np.clip(cx + dx, lo, hi)), float(np.clip(cy + dy, lo, hi)), s))
        out.append(slots)
    return out


def _extent(kind: str, name: str) -> tuple[float, float, float, float]:
    if kind == "shape":
        return shape_extent(name)
    ew, eh = load_atlas().entry(name).extent
    return ((1 - ew) / 2, (1 - eh) / 2, (1 + ew) / 2, (1 + eh) / 2)


def object_boxes(scene: Scene) -> list[list[Box]]:
    """Tight relative box (x0, y0, x1, y1) of every drawn copy of every object."""
    out = []
    for obj, slots in zip(scene.objects, object_slots(scene)):
        ex0, ey0, ex1, ey1 = _extent(obj.kind, obj.name)
        out.append([(cx - s / 2 + ex0 * s, cy - s / 2 + ey0 * s, cx - s / 2 + ex1 * s, cy - s / 2 + ey1 * s)
                    for cx, cy, s in slots])
    return out


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
