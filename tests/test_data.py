"""Tests for snapfusion.data: determinism, resolutions, caption faithfulness, splits, prompt sets, atlas."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from snapfusion.data import (
    SceneDataset, SceneStream, Scene, caption, collate_scenes, held_out_in, holdouts, load_prompt_set, render,
    sample_scene, vocab,
)
from snapfusion.data.atlas import ATLAS_DIR, load_atlas
from snapfusion.data.captions import COUNT_WORDS, SIZE_WORDS
from snapfusion.data.render import _background
from snapfusion.data.sampling import SceneConfig
from snapfusion.data.scene import Background, SceneObject
from snapfusion.errors import SnapFusionError



def scenes(split: str, n: int, seed: int = 0, cfg: SceneConfig = SceneConfig()) -> list[Scene]:
    return [sample_scene(np.random.default_rng([seed, i]), split, cfg) for i in range(n)]


def test_same_seed_same_bytes_and_different_seeds_differ():
    a, b = SceneDataset("train", size=64, seed=3)[5], SceneDataset("train", size=64, seed=3)[5]
    assert a["caption"] == b["caption"] and a["scene"] == b["scene"]
    assert torch.equal(a["image"], b["image"])
    c = SceneDataset("train", size=64, seed=4)[5]
    assert c["caption"] != a["caption"] or not torch.equal(c["image"], a["image"])
    imgs = [SceneDataset("train", size=32, seed=0)[i]["image"] for i in range(8)]
    assert len({img.numpy().tobytes() for img in imgs}) == 8


@pytest.mark.parametrize("size", [64, 100, 257, 512, 1024])
def test_any_resolution(size):
    item = SceneDataset("test", size=size, seed=1)[2]
    assert item["image"].shape == (3, size, size) and item["image"].dtype == torch.uint8
    assert item["image"].float().std() > 1.0  # not a blank canvas


def test_objects_are_drawn_inside_their_boxes():
    """Pixels that differ from a plain-background render lie inside the attribute boxes (2 px slack)."""
    size = 128
    for scene in scenes("train", 30, seed=7):
        img = np.asarray(render(scene, size)).astype(int)
        bg = _background(scene.background.colors, scene.background.direction, size).astype(int)
        changed = np.abs(img - bg).max(axis=2) > 12
        inside = np.zeros_like(changed)
        for box in (b for boxes in scene.attributes()["objects"] for b in boxes["boxes"]):
            x0, y0, x1, y1 = (int(round(v * size)) for v in box)
            inside[max(0, y0 - 2):y1 + 2, max(0, x0 - 2):x1 + 2] = True
        assert changed.any() and not (changed & ~inside).any()


def test_boxes_in_frame_and_copies_do_not_overlap():
    for scene in scenes("train", 300, seed=11):
        boxes = [b for obj in scene.attributes()["objects"] for b in obj["boxes"]]
        assert len(boxes) == sum(o.count for o in scene.objects)
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                overlap = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
                assert overlap < 0.05 * min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def _faithful(scene: Scene, text: str) -> None:
    """Every object named in the caption is in the scene, with the right count, size and background."""
    atlas = load_atlas()
    named = set()
    for entry in atlas.entries:
        for word in (entry.name, entry.plural, *entry.synonyms, *entry.synonym_plurals):
            if re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text):
                named.add(entry.name)
    for shape in vocab().shapes:
        if re.search(rf"\b{shape}(es|s)?\b", text):
            named.add(shape)
    assert named >= {o.name for o in scene.objects}, text
    # an emoji name may contain another's ("tree" in "palm tree"): extra names must be substrings of true ones
    for extra in named - {o.name for o in scene.objects}:
        assert any(extra in o.name or any(extra in s for s in atlas.entry(o.name).synonyms)
                   for o in scene.objects if o.kind == "emoji"), (extra, text)
    for obj in scene.objects:
        if obj.kind == "shape":
            assert f"{obj.color} {obj.name}" in text, text
        if obj.count > 1:
            assert any(f"{w} " in text for w in COUNT_WORDS[obj.count]), text
    if re.search(r"\b(two|three)\b", text):
        assert any(o.count > 1 for o in scene.objects), text
    for size, words in SIZE_WORDS.items():
        if any(re.search(rf"\b{w}\b", text) for w in words):
            assert size in {o.size for o in scene.objects}, text
    if "background" in text or "gradient" in text:
        for color in scene.background.colors:
            assert color in text, text


def test_captions_are_faithful():
    for i, scene in enumerate(scenes("train", 300, seed=5) + scenes("test", 100, seed=5)):
        rng = np.random.default_rng(i)
        _faithful(scene, caption(scene, rng, p_omit=0.2 if i % 2 else 0.0))
        full = caption(scene, rng)
        assert not re.search(r"\ba [aeio]|\ban [^aeiou]|sss\b", full), full  # articles, plurals
        assert "background" in full or "gradient" in full
        if scene.layout == "pair":
            assert any(w in full for w in ("left", "right", "above", "below", "top"))


def test_splits_are_disjoint():
    h = holdouts()
    assert len(h.pairs) > 500 and len(h.positions) == len(vocab().objects) and len(h.shape_colors) == 10
    train = scenes("train", 3000, seed=9)
    assert all(not held_out_in(s) for s in train)
    assert {s.layout for s in train} == {"single", "group", "pair"}
    test = scenes("test", 300, seed=9)
    assert all(held_out_in(s) for s in test)
    seen = {(s.objects[0].name, s.objects[0].position) for s in train if s.layout == "single"}
    assert not seen & set(h.positions.items())
    small = scenes("train", 200, seed=2, cfg=SceneConfig(num_emoji=10))
    allowed = set(vocab().emoji[:10]) | set(vocab().shapes)
    assert all(o.name in allowed for s in small for o in s.objects)


def test_scene_round_trip_and_attributes():
    for scene in scenes("test", 20, seed=1):
        again = Scene.from_dict(json.loads(json.dumps(scene.to_dict())))
        assert again == scene
        attrs = scene.attributes()
        assert attrs["layout"] in vocab().layouts and attrs["background"]["kind"] in vocab().background_kinds
        for obj in attrs["objects"]:
            assert obj["name"] in vocab().objects and obj["position"] in vocab().positions


def test_prompt_sets():
    records = load_prompt_set("test")
    assert len(records) >= 1000 and len({r["prompt"] for r in records}) == len(records)
    for r in records[:200]:
        scene = Scene.from_dict(r["scene"])
        assert held_out_in(scene)
        _faithful(scene, r["prompt"])
    quick = load_prompt_set("test200")
    assert quick == records[:200]
    assert len(load_prompt_set("test", num_emoji=20)) < len(records)
    val = load_prompt_set("val")  # model selection: the same held-out compositions, none of the test prompts
    assert len(val) == 1000 and not {r["prompt"] for r in val} & {r["prompt"] for r in records}
    for r in val[:100]:
        scene = Scene.from_dict(r["scene"])
        assert held_out_in(scene)
        _faithful(scene, r["prompt"])


def test_atlas():
    atlas = load_atlas()
    names = [e.name for e in atlas.entries]
    assert len(names) >= 100 and len(set(names)) == len(names)
    assert not set(names) & set(vocab().shapes) and not set(names) & set(vocab().colors)
    assert atlas.sheet.size[0] >= atlas.cell * 8 and (ATLAS_DIR / "LICENSE-OFL.txt").is_file()
    for e in atlas.entries[:20]:
        col, row = e.cell
        tile = atlas.sheet.crop((col * atlas.cell, row * atlas.cell, (col + 1) * atlas.cell, (row + 1) * atlas.cell))
        assert tile.getchannel("A").getbbox() is not None, e.name


def test_collate_and_stream_sharding():
    ds = SceneDataset("train", size=32, length=6)
    batch = collate_scenes([ds[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 32, 32) and isinstance(batch["scene"][0], Scene)
    shards = [[it["caption"] for it in SceneStream("train", size=32, rank=r, world_size=2, length=6)] for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == sorted(ds[i]["caption"] for i in range(6))


@pytest.mark.parametrize("make", [
    lambda: SceneDataset("val"),
    lambda: SceneDataset("train", size=8),
    lambda: sample_scene(np.random.default_rng(0), "dev"),
    lambda: load_prompt_set("nope"),
    lambda: Scene((SceneObject("shape", "blob", "red", "small", 1, "left"),), Background(("blue",))),
    lambda: Scene((SceneObject("shape", "star", "red", "small", 1, "left"),), Background(("red",))),
])
def test_bad_input_raises_one_line(make):
    with pytest.raises(SnapFusionError) as err:
        make()
    assert "\n" not in str(err.value) and str(err.value)
