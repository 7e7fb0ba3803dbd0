"""Sanity figures of the domain evaluators: sample-vs-sample FID, FID under blur and noise, matched vs shuffled
CLIP score, probe accuracy on held-out test renders (docs/evaluation.md)."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from snapfusion.eval.attributes import attribute_accuracy
from snapfusion.eval.evaluators import Evaluators, clip_features, clip_scores
from snapfusion.eval.frechet import fid_from_features


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (reflect padding) of uint8 or float images; returns float in [0, 1]."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if sigma <= 0:
        return x
    r = max(1, int(3 * sigma + 0.5))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32, device=x.device) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def add_noise(images: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    """Images plus seeded Gaussian noise of ``std`` (on the [0, 1] scale), clamped; float in [0, 1]."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return (x + std * torch.randn(x.shape, generator=gen).to(x.device)).clamp(0, 1)


@torch.no_grad()
def _features(ev: Evaluators, images: torch.Tensor, transform, batch: int = 100) -> torch.Tensor:
    """Domain-FID features of ``transform(images)``, applied batch by batch (bounded memory)."""
    dev = next(ev.clip.parameters()).device
    return torch.cat([clip_features(ev.clip, transform(images[i: i + batch].to(dev), i))
                      for i in range(0, len(images), batch)])


def render_test(n: int, seed: int, *, workers: int = 0) -> tuple[torch.Tensor, list[str], list[dict]]:
    """``n`` test-split renders (512 px) of dataset seed ``seed``: uint8 images, captions, scene attributes."""
    from snapfusion.eval.train import scene_batches

    images, captions, attrs = [], [], []
    for batch in scene_batches("test", n, seed, None, batch_size=100, workers=workers):
        images.append(batch["image"])
        captions += batch["caption"]
        attrs += batch["attributes"]
    return torch.cat(images), captions, attrs


def sanity_figures(ev: Evaluators, images: torch.Tensor, captions: list[str], scenes: list, *,
                   blurs=(1.0, 2.0, 4.0, 8.0), noises=(0.02, 0.05, 0.1, 0.2)) -> dict[str, Any]:
    """All sanity figures on one sample of test renders independent of the reference sample."""
    t0 = time.time()
    feats = _features(ev, images, lambda x, i: x)
    out: dict[str, Any] = {"sample_images": len(images), "reference_images": ev.reference.count,
                           "fid_clean": fid_from_features(feats, ev.reference)}
    if len(feats) > 1000:
        out["fid_clean_first_1000"] = fid_from_features(feats[:1000], ev.reference)  # small-sample bias
    out["fid_blur"] = {str(s): fid_from_features(_features(ev, images, lambda x, i: gaussian_blur(x, s)),
                                                 ev.reference) for s in blurs}
    out["fid_noise"] = {str(s): fid_from_features(_features(ev, images, lambda x, i: add_noise(x, s, seed=i)),
                                                  ev.reference) for s in noises}
    matched = clip_scores(ev.clip, images, captions)
    shuffled = clip_scores(ev.clip, images, captions[1:] + captions[:1])  # each image with its neighbour's caption
    out["clip_matched"], out["clip_shuffled"] = float(matched.mean()), float(shuffled.mean())
    out["clip_matched_wins"] = float((matched > shuffled).float().mean())
    acc = attribute_accuracy(ev.probe, images, scenes)
    out["probe"] = {k: v for k, v in acc.items() if k != "per_image"}
    out["seconds"] = round(time.time() - t0, 1)
    return out
