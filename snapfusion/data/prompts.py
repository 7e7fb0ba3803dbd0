"""Fixed evaluation prompt sets: snapfusion/assets/prompts/<name>.jsonl, made by scripts/make_prompt_sets.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from snapfusion.data.captions import caption
from snapfusion.data.sampling import SceneConfig, sample_scene
from snapfusion.data.scene import Scene
from snapfusion.data.vocab import vocab
from snapfusion.errors import SnapFusionError

PROMPT_DIR = Path(__file__).resolve().parent.parent / "assets" / "prompts"


def make_prompt_set(split: str, count: int, seed: int, cfg: SceneConfig = SceneConfig()) -> list[dict[str, Any]]:
    """``count`` records {"prompt", "seed", "scene"} with unique complete captions, deterministic in seed."""
    records, seen, index = [], set(), 0
    while len(records) < count:
        rng = np.random.default_rng([seed, index])
        index += 1
        scene = sample_scene(rng, split, cfg)
        prompt = caption(scene, rng)  # complete: every attribute stated
        if prompt in seen:
            continue
        seen.add(prompt)
        records.append({"prompt": prompt, "seed": int(rng.integers(2**31)), "scene": scene.to_dict()})
    return records


def load_prompt_set(name: str = "test", num_emoji: int | None = None) -> list[dict[str, Any]]:
    """Records of prompt set ``name``; with ``num_emoji``, only those whose emoji are all among the first N."""
    path = PROMPT_DIR / f"{name}.jsonl"
    if not path.is_file():
        known = sorted(p.stem for p in PROMPT_DIR.glob("*.jsonl"))
        raise SnapFusionError(f"unknown prompt set '{name}': no {path} (known: {known})")
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rec = json.loads(line)
            Scene.from_dict(rec["scene"])
        except (json.JSONDecodeError, KeyError, TypeError, SnapFusionError) as err:
            raise SnapFusionError(f"{path}:{lineno}: bad prompt record ({err})") from None
        records.append(rec)
    if num_emoji is not None:
        allowed = set(vocab().emoji[:num_emoji])
        records = [r for r in records if all(o["kind"] == "shape" or o["name"] in allowed
                                              for o in r["scene"]["objects"])]
    return records
