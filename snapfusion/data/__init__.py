"""Offline captioned-scene domain: emoji and colored shapes on plain or gradient backgrounds (docs/data.md)."""

from snapfusion.data.captions import caption
from snapfusion.data.dataset import SceneDataset, SceneStream, collate_scenes
from snapfusion.data.prompts import load_prompt_set
from snapfusion.data.render import render
from snapfusion.data.sampling import SPLITS, SceneConfig, held_out_in, holdouts, sample_scene
from snapfusion.data.scene import Background, Scene, SceneObject
from snapfusion.data.vocab import Vocab, vocab

__all__ = [
    "Background", "SPLITS", "Scene", "SceneConfig", "SceneDataset", "SceneObject", "SceneStream", "Vocab",
    "caption", "collate_scenes", "held_out_in", "holdouts", "load_prompt_set", "render", "sample_scene",
    "vocab",
]
