"""Scene specs: frozen dataclasses over the discrete attribute space, layouts in relative coordinates, sampling."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

from snapfusion import config
from snapfusion.data import vocab as V
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
        from snapfusion.data.render import object_boxes

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
