"""Faithful captions: identity, count, size, position or relation and background, through paraphrase templates."""

from __future__ import annotations

import numpy as np

from snapfusion.data.atlas import load_atlas
from snapfusion.data.scene import Background, Scene, SceneObject

COUNT_WORDS = {2: ("two",), 3: ("three",)}  # no "a pair of": it clashes with "pair of glasses"
SIZE_WORDS = {"small": ("small", "little"), "medium": ("medium", "medium-sized", "mid-sized"),
              "large": ("large", "big")}
POSITION_WORDS = {
    "center": ("in the center", "in the middle", "at the center"),
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
}
for _v in ("top", "bottom"):
    for _h in ("left", "right"):
        POSITION_WORDS[f"{_v} {_h}"] = (f"in the {_v} {_h} corner", f"at the {_v} {_h}",
                                        f"in the {'upper' if _v == 'top' else 'lower'} {_h} corner")
GROUP_WORDS = ("in a row", "side by side", "in a row in the middle", "")
PREFIXES = ("", "", "a picture of ", "an image of ", "a drawing of ")
SYNONYM_P = 0.3  # how often an emoji is called by a CLDR synonym instead of its canonical name


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def article(word: str) -> str:
    """'a' or 'an' for the spoken start of ``word`` (vowel-letter heuristic with 'u'/'one' exceptions)."""
    w = word.lower()
    if w.startswith(("uni", "use", "ufo", "one")):
        return "a"
    return "an" if w[:1] in "aeiou" else "a"


def noun(obj: SceneObject, rng: np.random.Generator) -> tuple[str, str]:
    """(singular, plural) noun for ``obj``: an emoji name or synonym, or "<color> <shape>"."""
    if obj.kind == "shape":
        plural = obj.name + ("es" if obj.name.endswith("s") else "s")  # "crosses", "stars"
        return f"{obj.color} {obj.name}", f"{obj.color} {plural}"
    entry = load_atlas().entry(obj.name)
    if entry.synonyms and rng.random() < SYNONYM_P:
        i = int(rng.integers(len(entry.synonyms)))
        return entry.synonyms[i], entry.synonym_plurals[i]
    return entry.name, entry.plural


def object_phrase(obj: SceneObject, rng: np.random.Generator, with_size: bool = True) -> str:
    """Count, size and identity: "a large red star", "two small cats", "one rocket"."""
    singular, plural = noun(obj, rng)
    words = (_pick(rng, SIZE_WORDS[obj.size]) + " " if with_size else "") + (singular if obj.count == 1 else plural)
    if obj.count > 1:
        return f"{_pick(rng, COUNT_WORDS[obj.count])} {words}"
    return f"{article(words) if rng.random() < 0.8 else 'one'} {words}"


def background_phrase(bg: Background, rng: np.random.Generator) -> tuple[str, str]:
    """(trailing phrase, leading phrase): "on a blue background" and "a blue background with"."""
    if bg.kind == "solid":
        c = bg.colors[0]
        a = article(c)
        return _pick(rng, (f"on {a} {c} background", f"against {a} {c} background", f"with {a} {c} background")), \
            f"{a} {c} background with"
    c0, c1 = bg.colors
    a, b = ("left", "right") if bg.direction == "horizontal" else ("top", "bottom")
    trailing = _pick(rng, (
        f"on a background fading from {c0} on the {a} to {c1} on the {b}",
        f"on {article(c0)} {c0} to {c1} gradient from {a} to {b}",
        f"against a {a}-to-{b} gradient from {c0} to {c1}",
    ))
    return trailing, f"{article(c0)} {c0} to {c1} {a}-to-{b} gradient background with"


def scene_phrase(scene: Scene, rng: np.random.Generator, with_size: bool) -> str:
    """The objects with their position, count or relation."""
    objs = scene.objects
    if scene.layout == "pair":
        p0, p1 = (object_phrase(o, rng, with_size) for o in objs)
        if scene.relation == "left of":
            forms = (f"{p0} to the left of {p1}", f"{p1} to the right of {p0}",
                     f"{p0} on the left and {p1} on the right")
        else:
            forms = (f"{p0} above {p1}", f"{p1} below {p0}", f"{p0} at the top and {p1} at the bottom")
        return _pick(rng, forms)
    phrase = object_phrase(objs[0], rng, with_size)
    where = _pick(rng, POSITION_WORDS[objs[0].position]) if scene.layout == "single" else _pick(rng, GROUP_WORDS)
    return f"{phrase} {where}".strip()


def caption(scene: Scene, rng: np.random.Generator, p_omit: float = 0.0) -> str:
    """A faithful caption of ``scene``; with ``p_omit`` > 0 the sizes or the background are sometimes left out."""
    with_size = rng.random() >= p_omit
    with_background = rng.random() >= p_omit
    body = scene_phrase(scene, rng, with_size)
    if not with_background:
        return _pick(rng, PREFIXES) + body
    trailing, leading = background_phrase(scene.background, rng)
    form = int(rng.integers(3))
    if form == 0:
        return f"{_pick(rng, PREFIXES)}{body}, {trailing}"
    if form == 1:
        return f"{_pick(rng, PREFIXES)}{body} {trailing}"
    return f"{leading} {body}"
