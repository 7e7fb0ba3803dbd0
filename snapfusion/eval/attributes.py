"""GenEval-style checks of a scene's attributes against the probe's reading of an image.

An image passes when every object of its scene is present with the right count (and, for shapes, the right
color), sits where the scene says (single position, group at the center, pair relation) and the background
matches (kind, colors in order, direction). Size is reported but not part of the every-attribute check.
"""

from __future__ import annotations

from typing import Any

import torch

from snapfusion.data.vocab import POSITION_CENTER, POSITIONS
from snapfusion.eval.probe import AttributeProbe, BackgroundReading, Detection, decode

CHECKS = ("presence", "count", "color", "position", "background")  # "all" = every one of these
REPORTED = (*CHECKS, "size", "all")


def _matches(d: Detection, obj: dict[str, Any]) -> bool:
    return d.name == obj["name"] and (obj["color"] is None or d.color == obj["color"])


def _nearest_slot(x: float, y: float) -> str:
    return min(POSITIONS, key=lambda p: (POSITION_CENTER[p][0] - x) ** 2 + (POSITION_CENTER[p][1] - y) ** 2)


def _position_ok(attr: dict[str, Any], found: list[list[Detection]]) -> bool:
    if any(not f for f in found):
        return False
    centers = [(sum(d.x for d in f) / len(f), sum(d.y for d in f) / len(f)) for f in found]
    if attr["layout"] == "pair":
        (xa, ya), (xb, yb) = centers
        if attr["relation"] == "left of":
            return xa < xb and abs(xb - xa) > abs(yb - ya)
        return ya < yb and abs(yb - ya) > abs(xb - xa)
    return _nearest_slot(*centers[0]) == attr["objects"][0]["position"]


def check_scene(attr: dict[str, Any], dets: list[Detection], bg: BackgroundReading) -> dict[str, bool]:
    """Per-check pass/fail of one image against ``scene.attributes()``."""
    objs = attr["objects"]
    by_name = [[d for d in dets if d.name == o["name"]] for o in objs]
    exact = [[d for d in dets if _matches(d, o)] for o in objs]
    want = attr["background"]
    result = {
        "presence": all(f for f in by_name),
        "count": all(len(f) == o["count"] for f, o in zip(by_name, objs)),
        "color": all(o["color"] is None or (f and all(d.color == o["color"] for d in f))
                     for f, o in zip(by_name, objs)),
        "position": _position_ok(attr, exact),
        "background": (bg.kind == want["kind"] and list(bg.colors) == list(want["colors"])
                       and bg.direction == want["direction"]),
        "size": all(f and all(d.size == o["size"] for d in f) for f, o in zip(by_name, objs)),
    }
    result["all"] = all(result[c] for c in CHECKS)
    return result


@torch.no_grad()
def read_images(probe: AttributeProbe, images: torch.Tensor, *, batch_size: int = 64):
    """Run the probe over (N, 3, H, W) images in batches -> (detections, backgrounds) per image."""
    dets, bgs = [], []
    for i in range(0, len(images), batch_size):
        d, b = decode(probe.cfg, probe(images[i: i + batch_size]))
        dets += d
        bgs += b
    return dets, bgs


def scene_attributes(scene: Any) -> dict[str, Any]:
    """``scene.attributes()`` of a Scene, a ``Scene.to_dict()`` dict (prompt records) or an attributes dict."""
    from snapfusion.data import Scene

    if isinstance(scene, dict):
        return scene if "layout" in scene else Scene.from_dict(scene).attributes()
    return scene.attributes()


def attribute_accuracy(probe: AttributeProbe, images: torch.Tensor, scenes: list, *,
                       batch_size: int = 64) -> dict[str, Any]:
    """Fraction of images matching their scene on every attribute ("all"), per-check accuracies and per-image rows."""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images but {len(scenes)} scenes")
    dets, bgs = read_images(probe, images, batch_size=batch_size)
    rows = [check_scene(scene_attributes(s), d, b) for s, d, b in zip(scenes, dets, bgs)]
    n = max(len(rows), 1)
    summary: dict[str, Any] = {k: sum(r[k] for r in rows) / n for k in REPORTED}
    summary["per_image"] = rows
    return summary
