"""Scene sampling and the train/test split: test scenes hold compositions that training never shows."""

from __future__ import annotations

import dataclasses
import functools
import itertools

import numpy as np

from snapfusion.data import vocab as V
from snapfusion.data.scene import Background, Scene, SceneObject
from snapfusion.errors import SnapFusionError

SPLITS = ("train", "test")
HOLDOUT_SEED = 20230601  # fixed: the held-out compositions never change with the dataset seed
PAIR_HOLDOUT_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class SceneConfig:
    """What sample_scene draws from; defaults are the project's domain."""

    num_emoji: int | None = None  # use the first N atlas emoji (curated order); None = all
    p_shape: float = 0.35  # probability that an object is a colored shape rather than an emoji
    p_single: float = 0.4  # layout probabilities; the rest is "pair"
    p_group: float = 0.25
    p_gradient: float = 0.3  # background is a two-color gradient, else solid
    caption_p_omit: float = 0.1  # training captions leave out sizes / background this often (each)


@dataclasses.dataclass(frozen=True)
class Holdouts:
    """The compositions reserved for the test split (identities are object names; shapes ignore color)."""

    pairs: frozenset[frozenset[str]]  # unordered name pairs never drawn together in training
    positions: dict[str, str]  # name -> the one single-object position training never shows
    shape_colors: frozenset[tuple[str, str]]  # (shape, color) never drawn in training


@functools.lru_cache(maxsize=1)
def holdouts() -> Holdouts:
    """The held-out compositions over the full vocabulary, chosen once from HOLDOUT_SEED."""
    rng = np.random.default_rng(HOLDOUT_SEED)
    names = V.vocab().objects
    all_pairs = list(itertools.combinations(names, 2))
    pick = rng.choice(len(all_pairs), size=int(PAIR_HOLDOUT_FRACTION * len(all_pairs)), replace=False)
    pairs = frozenset(frozenset(all_pairs[i]) for i in sorted(pick))
    positions = {n: V.POSITIONS[int(rng.integers(len(V.POSITIONS)))] for n in names}
    colors = rng.permutation(len(V.COLOR_NAMES))  # each shape loses one color, each color at most one shape
    shape_colors = frozenset((s, V.COLOR_NAMES[int(colors[i])]) for i, s in enumerate(V.SHAPES))
    return Holdouts(pairs=pairs, positions=positions, shape_colors=shape_colors)


def held_out_in(scene: Scene) -> list[str]:
    """Every held-out composition present in ``scene`` (empty for a valid training scene)."""
    h = holdouts()
    found = [f"shape-color {o.color} {o.name}" for o in scene.objects if (o.name, o.color) in h.shape_colors]
    if scene.layout == "pair" and frozenset(o.name for o in scene.objects) in h.pairs:
        found.append("pair " + " + ".join(o.name for o in scene.objects))
    obj = scene.objects[0]
    if scene.layout == "single" and h.positions[obj.name] == obj.position:
        found.append(f"position {obj.name} {obj.position}")
    return found


def object_names(cfg: SceneConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(emoji names, shape names) that ``cfg`` allows."""
    emoji = V.vocab().emoji
    if cfg.num_emoji is not None:
        if not 0 <= cfg.num_emoji <= len(emoji):
            raise SnapFusionError(f"num_emoji={cfg.num_emoji} is outside 0..{len(emoji)}")
        emoji = emoji[: cfg.num_emoji]
    return emoji, V.SHAPES


def sample_scene(rng: np.random.Generator, split: str = "train", cfg: SceneConfig = SceneConfig()) -> Scene:
    """Draw one scene of ``split``: training scenes avoid every held-out composition, test scenes hold one."""
    if split not in SPLITS:
        raise SnapFusionError(f"unknown split '{split}' (expected one of {list(SPLITS)})")
    for _ in range(1000):
        scene = _sample_test(rng, cfg) if split == "test" else _sample_any(rng, cfg)
        if scene is not None and bool(held_out_in(scene)) == (split == "test"):
            return scene
    raise SnapFusionError(f"could not draw a '{split}' scene under {cfg}")


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _sample_identity(rng: np.random.Generator, cfg: SceneConfig,
                     name: str | None = None) -> tuple[str, str, str | None]:
    emoji, shapes = object_names(cfg)
    if name is None:
        use_shape = not emoji or rng.random() < cfg.p_shape
        name = _pick(rng, shapes if use_shape else emoji)
    if name in V.SHAPES:
        return "shape", name, _pick(rng, V.COLOR_NAMES)
    return "emoji", name, None


def _sample_layout(rng: np.random.Generator, cfg: SceneConfig, names: tuple[str | None, ...], layout: str,
                   position: str | None = None) -> Scene:
    """A scene of ``layout`` with given (or random, where None) object names and single position."""
    if layout == "pair":
        relation = _pick(rng, V.RELATIONS)
        slots = ("left", "right") if relation == "left of" else ("top", "bottom")
        objs = []
        for name, pos in zip(names, slots):
            kind, nm, color = _sample_identity(rng, cfg, name)
            objs.append(SceneObject(kind, nm, color, _pick(rng, V.SIZES), 1, pos))
    else:
        relation = None
        kind, nm, color = _sample_identity(rng, cfg, names[0])
        count = 1 if layout == "single" else int(rng.integers(2, 4))
        sizes = V.SIZES if count < 3 else V.SIZES[:2]
        pos = (position or _pick(rng, V.POSITIONS)) if count == 1 else "center"
        objs = [SceneObject(kind, nm, color, _pick(rng, sizes), count, pos)]
    background = _sample_background(rng, cfg, {o.color for o in objs})
    return Scene(tuple(objs), background, relation, seed=int(rng.integers(2**31)))


def _sample_background(rng: np.random.Generator, cfg: SceneConfig, avoid: set[str | None]) -> Background:
    allowed = [c for c in V.COLOR_NAMES if c not in avoid]
    if rng.random() < cfg.p_gradient:
        i, j = rng.choice(len(allowed), size=2, replace=False)
        return Background((allowed[int(i)], allowed[int(j)]), _pick(rng, V.DIRECTIONS))
    return Background((_pick(rng, allowed),))


def _sample_any(rng: np.random.Generator, cfg: SceneConfig) -> Scene:
    u = rng.random()
    layout = "single" if u < cfg.p_single else "group" if u < cfg.p_single + cfg.p_group else "pair"
    if layout == "pair":
        emoji, shapes = object_names(cfg)
        if len(emoji) + len(shapes) < 2:
            layout = "single"
        for _ in range(100):  # two different identities (names)
            scene = _sample_layout(rng, cfg, (None, None), layout)
            if layout != "pair" or scene.objects[0].name != scene.objects[1].name:
                return scene
    return _sample_layout(rng, cfg, (None, None), layout)


def _sample_test(rng: np.random.Generator, cfg: SceneConfig) -> Scene | None:
    """A scene built around one held-out composition: an object pair, an object position or a shape color."""
    h = holdouts()
    emoji, shapes = object_names(cfg)
    allowed = set(emoji) | set(shapes)
    kind = _pick(rng, ("pair", "position", "shape_color"))
    if kind == "pair":
        pairs = sorted(tuple(sorted(p)) for p in h.pairs if p <= allowed)
        if not pairs:
            return None
        a, b = _pick(rng, pairs)
        if rng.random() < 0.5:
            a, b = b, a
        return _sample_layout(rng, cfg, (a, b), "pair")
    if kind == "position":
        name = _pick(rng, sorted(allowed))
        return _sample_layout(rng, cfg, (name,), "single", position=h.positions[name])
    shape, color = _pick(rng, sorted(h.shape_colors))
    layout = _pick(rng, ("single", "group"))
    scene = _sample_layout(rng, cfg, (shape,), layout)
    obj = dataclasses.replace(scene.objects[0], color=color)
    background = _sample_background(rng, cfg, {color})
    return dataclasses.replace(scene, objects=(obj,), background=background)
