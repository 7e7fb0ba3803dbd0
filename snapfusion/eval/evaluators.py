"""The shipped scene-domain evaluators: load/save, and the three metrics (CLIP score, domain FID, attributes).

Layout of an evaluator folder (default: snapfusion/assets/evaluators/):
``scene_clip/{config.json, model.safetensors}``, ``probe/{config.json, model.safetensors}`` (fp16), and
``reference_stats.safetensors`` (float64 mu, sigma of the scene-CLIP features of test-split renders).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from snapfusion.errors import SnapFusionError
from snapfusion.eval.attributes import attribute_accuracy
from snapfusion.eval.frechet import GaussianStats, fid_from_features, load_stats, save_stats
from snapfusion.eval.probe import AttributeProbe, ProbeConfig
from snapfusion.eval.scene_clip import SceneClip, SceneClipConfig, clip_score_from_embeddings
from snapfusion.fileio import atomic_write_text
from snapfusion.weights import load_into, load_safetensors, read_config, resolve_weights, save_pretrained

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "assets" / "evaluators"
CLIP_KIND, PROBE_KIND = "scene_clip", "probe"
REFERENCE_FILE = "reference_stats.safetensors"
META_FILE = "training.json"


@dataclass
class Evaluators:
    """The loaded evaluators plus a version string (a hash of every weight and stats file)."""

    clip: SceneClip
    probe: AttributeProbe
    reference: GaussianStats
    version: str
    folder: Path


def save_evaluators(folder: str | os.PathLike, clip: SceneClip, probe: AttributeProbe, stats: GaussianStats,
                    meta: dict[str, Any]) -> None:
    """Write both models (fp16 safetensors + config), the reference stats and the training metadata."""
    folder = Path(folder)
    save_pretrained(folder / CLIP_KIND, clip, clip.cfg, kind=CLIP_KIND, dtype=torch.float16)
    save_pretrained(folder / PROBE_KIND, probe, probe.cfg, kind=PROBE_KIND, dtype=torch.float16)
    save_stats(stats, folder / REFERENCE_FILE, metadata={"features": "scene_clip.image_features"})
    atomic_write_text(folder / META_FILE, json.dumps(meta, indent=2) + "\n")


def _load_model(folder: Path, cls, cfg_cls, kind: str, device) -> torch.nn.Module:
    cfg = read_config(folder, cfg_cls, kind=kind)
    model = cls(cfg)
    path = resolve_weights(folder, "model")
    load_into(model, load_safetensors(path), source=str(path))
    return model.eval().to(device)


def evaluator_version(folder: str | os.PathLike) -> str:
    """sha256 (first 12 hex digits) over the evaluator folder's configs, weights and reference stats."""
    folder = Path(folder)
    h = hashlib.sha256()
    for rel in (f"{CLIP_KIND}/config.json", f"{CLIP_KIND}/model.safetensors", f"{PROBE_KIND}/config.json",
                f"{PROBE_KIND}/model.safetensors", REFERENCE_FILE):
        path = folder / rel
        if not path.is_file():
            raise SnapFusionError(f"evaluator file missing: {path} (run scripts/train_evaluators.py)")
        h.update(rel.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def load_evaluators(folder: str | os.PathLike | None = None, *, device: str | torch.device = "cpu") -> Evaluators:
    """Load the scene CLIP, the probe and the reference stats from ``folder`` (default: the shipped ones)."""
    folder = Path(folder) if folder is not None else DEFAULT_DIR
    version = evaluator_version(folder)
    clip = _load_model(folder / CLIP_KIND, SceneClip, SceneClipConfig, CLIP_KIND, device)
    probe = _load_model(folder / PROBE_KIND, AttributeProbe, ProbeConfig, PROBE_KIND, device)
    return Evaluators(clip, probe, load_stats(folder / REFERENCE_FILE), version, folder)


@torch.no_grad()
def clip_features(clip: SceneClip, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Domain-FID features: pooled penultimate scene-CLIP image features, (N, D) float64 on the CPU."""
    return torch.cat([clip.image_features(images[i: i + batch_size]).double().cpu()
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def clip_scores(clip: SceneClip, images: torch.Tensor, prompts: list[str], *, batch_size: int = 256) -> torch.Tensor:
    """Per-image domain CLIP score 100 * max(cos, 0), (N,) on the CPU."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    out = []
    for i in range(0, len(images), batch_size):
        img = clip.encode_image(images[i: i + batch_size])
        txt = clip.encode_text(prompts[i: i + batch_size])
        out.append(clip_score_from_embeddings(img, txt).cpu())
    return torch.cat(out)


def domain_fid(ev: Evaluators, images: torch.Tensor, reference: GaussianStats | None = None) -> float:
    """Domain FID of ``images`` against the cached test-render stats (or ``reference``)."""
    return fid_from_features(clip_features(ev.clip, images), reference or ev.reference)


def evaluate_images(ev: Evaluators, images: torch.Tensor, prompts: list[str], scenes: list) -> dict[str, Any]:
    """All three domain metrics of one image set: CLIP score, domain FID, attribute accuracy."""
    attrs = attribute_accuracy(ev.probe, images, scenes)
    return {
        "clip_score": float(clip_scores(ev.clip, images, prompts).mean()),
        "domain_fid": domain_fid(ev, images),
        "attributes": {k: v for k, v in attrs.items() if k != "per_image"},
        # "1" where the image has every attribute right, one character per image in order: paired comparisons of
        # two models on the same prompts and seeds (scripts/compare_evals.py)
        "all_per_image": "".join("1" if row["all"] else "0" for row in attrs["per_image"]),
    }
