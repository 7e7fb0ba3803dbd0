"""The discrete attribute space of the scene domain: colors, shapes, sizes, positions, counts, backgrounds."""

from __future__ import annotations

import dataclasses

# Named colors (sRGB), chosen to be well separated in hue or lightness. Order is the label order.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (245, 140, 20),
    "yellow": (250, 215, 30),
    "green": (40, 165, 60),
    "blue": (35, 90, 220),
    "purple": (135, 55, 185),
    "pink": (245, 135, 195),
    "brown": (125, 75, 35),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

# Geometric shapes drawn by snapfusion.data.shapes (names never collide with emoji names).
SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "heart", "diamond", "ring", "cross", "hexagon", "crescent",
)

# Object side as a fraction of the image side.
SIZES: tuple[str, ...] = ("small", "medium", "large")
SIZE_FRACTION: dict[str, float] = {"small": 0.2, "medium": 0.3, "large": 0.42}

# Positions of a single object (slot centers, relative x, y); groups sit in a row at "center";
# the two objects of a pair sit at left/right (relation "left of") or top/bottom (relation "above").
POSITIONS: tuple[str, ...] = (
    "center", "left", "right", "top", "bottom", "top left", "top right", "bottom left", "bottom right",
)
POSITION_CENTER: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "left": (0.24, 0.5),
    "right": (0.76, 0.5),
    "top": (0.5, 0.24),
    "bottom": (0.5, 0.76),
    "top left": (0.24, 0.24),
    "top right": (0.76, 0.24),
    "bottom left": (0.24, 0.76),
    "bottom right": (0.76, 0.76),
}
PAIR_OFFSET = 0.24  # pair slot centers at 0.5 -/+ this along the relation axis

COUNTS: tuple[int, ...] = (1, 2, 3)
LAYOUTS: tuple[str, ...] = ("single", "group", "pair")
RELATIONS: tuple[str, ...] = ("left of", "above")  # objects[0] <relation> objects[1]
OBJECT_KINDS: tuple[str, ...] = ("emoji", "shape")
BACKGROUND_KINDS: tuple[str, ...] = ("solid", "gradient")
# Gradient direction: "horizontal" = colors[0] on the left to colors[1] on the right;
# "vertical" = colors[0] at the top to colors[1] at the bottom.
DIRECTIONS: tuple[str, ...] = ("horizontal", "vertical")


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Ordered label lists, for evaluators that build one classification head per attribute."""

    objects: tuple[str, ...]  # emoji names (atlas order) then shape names
    emoji: tuple[str, ...]
    shapes: tuple[str, ...]
    colors: tuple[str, ...]
    sizes: tuple[str, ...]
    positions: tuple[str, ...]
    counts: tuple[int, ...]
    layouts: tuple[str, ...]
    relations: tuple[str, ...]
    background_kinds: tuple[str, ...]
    directions: tuple[str, ...]


def vocab() -> Vocab:
    """The ordered attribute vocabularies of the domain (all emoji of the atlas)."""
    from snapfusion.data.atlas import load_atlas

    emoji = tuple(e.name for e in load_atlas().entries)
    return Vocab(
        objects=emoji + SHAPES, emoji=emoji, shapes=SHAPES, colors=COLOR_NAMES, sizes=SIZES,
        positions=POSITIONS, counts=COUNTS, layouts=LAYOUTS, relations=RELATIONS,
        background_kinds=BACKGROUND_KINDS, directions=DIRECTIONS,
    )
