"""A small fidelity check for v fine-tuning and step distillation: sample rows of models on the same prompts and
seeds, and the image MSE of each row to a reference row (e.g. student at 8 steps vs teacher at 16 steps).

This is a training-time sanity check, not the FID-CLIP evaluation of snapfusion/eval.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from snapfusion.fileio import atomic_write_text
from snapfusion.pipeline import Pipeline, image_grid, to_pil


@dataclass(frozen=True)
class Row:
    """One row of a comparison: a pipeline and how it samples."""

    name: str            # e.g. "teacher@16", "student@8"
    pipeline: Pipeline
    steps: int


@torch.no_grad()
def sample_rows(rows: Sequence[Row], prompts: Sequence[str], seeds: Sequence[int], *, guidance: float,
                size: int) -> dict[str, torch.Tensor]:
    """Images in [0, 1] (B, 3, size, size) for every row, same prompts and seeds (DDIM, each pipeline's spacing)."""
    return {r.name: r.pipeline.generate(prompts, seeds, steps=r.steps, guidance=guidance, sampler="ddim",
                                        height=size, width=size).cpu() for r in rows}


def mse_to(images: dict[str, torch.Tensor], reference: str) -> dict[str, float]:
    """Mean squared pixel difference ([0, 1] scale) of every other row to the ``reference`` row."""
    ref = images[reference]
    return {name: float((im - ref).pow(2).mean()) for name, im in images.items() if name != reference}


def write_comparison(images: dict[str, torch.Tensor], metrics: dict, prompts: Sequence[str], path: Path, *,
                     thumb: int = 192) -> None:
    """A grid PNG (one row per model, in order) plus ``path.json`` with the metrics, rows and prompts."""
    pics = [p.resize((thumb, thumb)) for im in images.values() for p in to_pil(im)]
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(pics, cols=len(prompts)).save(path)
    record = {"rows": list(images), "prompts": list(prompts), **metrics}
    atomic_write_text(path.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
