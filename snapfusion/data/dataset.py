"""Torch datasets over sampled scenes: a map-style SceneDataset and a rank/worker-sharded SceneStream."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from snapfusion.data.captions import caption
from snapfusion.data.render import MIN_SIZE, render
from snapfusion.data.sampling import SPLITS, SceneConfig, sample_scene
from snapfusion.errors import SnapFusionError

DEFAULT_LENGTH = {"train": 1_000_000, "test": 10_000}


def make_item(split: str, size: int, seed: int, index: int, cfg: SceneConfig) -> dict[str, Any]:
    """Item ``index`` of (split, seed): its own generator, so it never depends on order, batch or worker."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    scene = sample_scene(rng, split, cfg)
    text = caption(scene, rng, cfg.caption_p_omit)
    image = torch.from_numpy(np.array(render(scene, size))).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
    return {"image": image, "caption": text, "scene": scene}


def _check(split: str, size: int) -> None:
    if split not in SPLITS:
        raise SnapFusionError(f"unknown split '{split}' (expected one of {list(SPLITS)})")
    if not isinstance(size, int) or size < MIN_SIZE:
        raise SnapFusionError(f"image size must be an integer >= {MIN_SIZE}, got {size!r}")


class SceneDataset(Dataset):
    """Map-style dataset: item i is {"image": uint8 (3, H, W), "caption": str, "scene": Scene}."""

    def __init__(self, split: str, size: int = 512, seed: int = 0, length: int | None = None,
                 config: SceneConfig = SceneConfig()):
        _check(split, size)
        self.split, self.size, self.seed, self.config = split, size, seed, config
        self.length = DEFAULT_LENGTH[split] if length is None else length
        if self.length < 0:
            raise SnapFusionError(f"dataset length must be >= 0, got {self.length}")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length}")
        return make_item(self.split, self.size, self.seed, index % self.length, self.config)


class SceneStream(IterableDataset):
    """Endless (or ``length``-long) stream; item indices are split over ranks then DataLoader workers."""

    def __init__(self, split: str, size: int = 512, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start: int = 0, length: int | None = None, config: SceneConfig = SceneConfig()):
        _check(split, size)
        if not 0 <= rank < world_size:
            raise SnapFusionError(f"rank {rank} is outside 0..{world_size - 1}")
        self.split, self.size, self.seed, self.config = split, size, seed, config
        self.rank, self.world_size, self.start, self.length = rank, world_size, start, length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shard, shards = self.rank * workers + worker, self.world_size * workers
        index = self.start + shard  # global index i goes to shard i % shards: every index exactly once
        while self.length is None or index < self.start + self.length:
            yield make_item(self.split, self.size, self.seed, index, self.config)
            index += shards


def collate_scenes(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images to (B, 3, H, W) uint8; keep captions and Scenes as lists."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "caption": [it["caption"] for it in items],
        "scene": [it["scene"] for it in items],
    }
