"""Scene specs: frozen dataclasses over the discrete attribute space, layouts in relative coordinates, sampling."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

from snapfusion import config
from snapfusion.data import vocab as V
from snapfusion.data.atlas import load_atlas
from snapfusion.data.shapes import shape_extent
from snapfusion.errors import SnapFusionError

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1), relative to the image side, y down


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One object identity, drawn ``count`` times (a row of copies when count > 1)."""

    kind: Literal["emoji", "shape"]
    name: str  # emoji name or shape name
    color: str | None  # a named color for shapes; None for emoji (they keep their own colors)
    size: Literal["small", "medium", "large"]
    count: int  # 1..3
    position: str  # one of vocab.POSITIONS

    @property
    def label(self) -> str:
        """Identity as a caption noun phrase without count: "red star" or "cat"."""
        return f"{self.color} {self.name}" if self.kind == "shape" else self.name


@dataclasses.dataclass(frozen=True)
class Background:
    """A solid named color (one color) or a two-color linear gradient with a direction."""

    colors: tuple[str, ...]
    direction: Literal["horizontal", "vertical"] | None = None  # gradients only

    @property
    def kind(self) -> str:
        """'solid' or 'gradient'."""
        return "solid" if len(self.colors) == 1 else "gradient"


@dataclasses.dataclass(frozen=True)
class Scene:
    """A whole image: 1-2 object identities (1-3 drawn objects), an optional pair relation and a background."""

    objects: tuple[SceneObject, ...]
    background: Background
    relation: Literal["left of", "above"] | None = None  # pairs only: objects[0] <relation> objects[1]
    seed: int = 0  # drives the small positional jitter of render()

    def __post_init__(self) -> None:
        validate(self)

    @property
    def layout(self) -> str:
        """'single', 'group' (one identity, count 2-3) or 'pair' (two identities)."""
        if len(self.objects) == 2:
            return "pair"
        return "group" if self.objects[0].count > 1 else "single"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (round-trips through ``Scene.from_dict``)."""
        return config.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        """Strictly rebuild a Scene from ``to_dict`` output."""
        return config.from_dict(cls, data, where="scene")

    def boxes(self) -> list[list[Box]]:
        """Tight box of every drawn copy of every object, relative coordinates (jitter included)."""
        return object_boxes(self)

    def attributes(self) -> dict[str, Any]:
        """Ground truth in vocab terms, including each object copy's bounding box."""
        objs = []
        for obj, boxes in zip(self.objects, self.boxes()):
            objs.append({
                "kind": obj.kind, "name": obj.name, "color": obj.color, "size": obj.size,
                "count": obj.count, "position": obj.position, "boxes": [list(b) for b in boxes],
            })
        bg = self.background
        return {
            "layout": self.layout, "objects": objs, "relation": self.relation,
            "background": {"kind": bg.kind, "colors": list(bg.colors), "direction": bg.direction},
        }


def validate(scene: Scene) -> None:
    """Raise SnapFusionError if ``scene`` lies outside the attribute space or its layouts."""
    objs = scene.objects
    if not 1 <= len(objs) <= 2:
        raise SnapFusionError(f"scene: expected 1 or 2 objects, got {len(objs)}")
    for o in objs:
        if o.kind == "shape" and (o.name not in V.SHAPES or o.color not in V.COLORS):
            raise SnapFusionError(f"scene: unknown shape '{o.name}' or color '{o.color}'")
        if o.kind == "emoji" and o.color is not None:
            raise SnapFusionError(f"scene: emoji '{o.name}' takes no color, got '{o.color}'")
        if o.count not in V.COUNTS or o.size not in V.SIZES or o.position not in V.POSITIONS:
            raise SnapFusionError(f"scene: bad count/size/position {o.count}/{o.size}/{o.position}")
    if len(objs) == 2:
        want = {"left of": ("left", "right"), "above": ("top", "bottom")}.get(scene.relation)
        if want is None or (objs[0].position, objs[1].position) != want or objs[0].count + objs[1].count != 2:
            raise SnapFusionError(f"scene: pair needs relation left of/above and counts 1, got {scene.relation}")
    elif scene.relation is not None or (objs[0].count > 1 and objs[0].position != "center"):
        raise SnapFusionError("scene: a single object takes no relation; a group sits at 'center'")
    if objs[0].count == 3 and objs[0].size == "large":
        raise SnapFusionError("scene: three large objects do not fit in a row")
    bg = scene.background
    if not 1 <= len(bg.colors) <= 2 or any(c not in V.COLORS for c in bg.colors):
        raise SnapFusionError(f"scene: bad background colors {bg.colors}")
    if (len(bg.colors) == 2) != (bg.direction is not None) or len(set(bg.colors)) != len(bg.colors):
        raise SnapFusionError(f"scene: a gradient needs two different colors and a direction, got {bg}")
    if any(o.color in bg.colors for o in objs):
        raise SnapFusionError("scene: a shape may not share a color with the background")


# ---- layout geometry (relative coordinates; the renderer draws into these slots) ----

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
