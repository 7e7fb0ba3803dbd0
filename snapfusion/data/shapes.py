"""Anti-aliased geometric shape masks in a unit square, drawn 4x supersampled and cached per pixel size."""

from __future__ import annotations

import functools
import math

from PIL import Image, ImageDraw

from snapfusion.data import vocab as V
from snapfusion.errors import SnapFusionError

SUPERSAMPLE = 4

Point = tuple[float, float]


def _regular(n: int, radius: float, start_deg: float, center: Point = (0.5, 0.5)) -> list[Point]:
    a0 = math.radians(start_deg)
    return [(center[0] + radius * math.cos(a0 + 2 * math.pi * k / n),
             center[1] - radius * math.sin(a0 + 2 * math.pi * k / n)) for k in range(n)]


def _star() -> list[Point]:
    outer = _regular(5, 0.5, 90, (0.5, 0.54))
    inner = _regular(5, 0.2, 90 + 36, (0.5, 0.54))
    return [p for pair in zip(outer, inner) for p in pair]


def _heart(steps: int = 96) -> list[Point]:
    # The classic parametric heart curve, scaled to the unit square.
    pts = []
    for k in range(steps):
        t = 2 * math.pi * k / steps
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((0.5 + x / 34.0, 0.44 - y / 34.0))
    return pts


def _draw(draw: ImageDraw.ImageDraw, name: str, n: float) -> None:
    """Draw shape ``name`` in white on a black ``n`` x ``n`` canvas."""
    def scale(points: list[Point]) -> list[Point]:
        return [(x * n, y * n) for x, y in points]

    if name == "circle":
        draw.ellipse((0, 0, n - 1, n - 1), fill=255)
    elif name == "square":
        draw.rectangle((0.06 * n, 0.06 * n, 0.94 * n, 0.94 * n), fill=255)
    elif name == "triangle":
        draw.polygon(scale([(0.5, 0.06), (1.0, 0.93), (0.0, 0.93)]), fill=255)
    elif name == "star":
        draw.polygon(scale(_star()), fill=255)
    elif name == "heart":
        draw.polygon(scale(_heart()), fill=255)
    elif name == "diamond":
        draw.polygon(scale([(0.5, 0.0), (0.82, 0.5), (0.5, 1.0), (0.18, 0.5)]), fill=255)
    elif name == "ring":
        draw.ellipse((0, 0, n - 1, n - 1), fill=255)
        draw.ellipse((0.24 * n, 0.24 * n, 0.76 * n, 0.76 * n), fill=0)
    elif name == "cross":
        draw.rectangle((0.33 * n, 0.02 * n, 0.67 * n, 0.98 * n), fill=255)
        draw.rectangle((0.02 * n, 0.33 * n, 0.98 * n, 0.67 * n), fill=255)
    elif name == "hexagon":
        draw.polygon(scale(_regular(6, 0.5, 90)), fill=255)
    elif name == "crescent":
        draw.ellipse((0, 0, n - 1, n - 1), fill=255)
        draw.ellipse((0.3 * n, -0.08 * n, 1.14 * n, 0.76 * n), fill=0)
    else:
        raise SnapFusionError(f"unknown shape '{name}' (expected one of {list(V.SHAPES)})")


@functools.lru_cache(maxsize=2048)
def shape_mask(name: str, side: int) -> Image.Image:
    """Anti-aliased 'L' mask of shape ``name`` filling a ``side`` x ``side`` square."""
    big = max(side * SUPERSAMPLE, 64)
    canvas = Image.new("L", (big, big), 0)
    _draw(ImageDraw.Draw(canvas), name, float(big))
    return canvas.resize((side, side), Image.Resampling.BOX if big % side == 0 else Image.Resampling.LANCZOS)


@functools.lru_cache(maxsize=None)
def shape_extent(name: str) -> tuple[float, float, float, float]:
    """Tight content box of the shape in its unit square (x0, y0, x1, y1)."""
    side = 256
    x0, y0, x1, y1 = shape_mask(name, side).point(lambda v: 255 if v > 8 else 0).getbbox()
    return (x0 / side, y0 / side, x1 / side, y1 / side)
