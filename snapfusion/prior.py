"""The terminal layout prior: the prompt's share of the starting latent that SD's schedule leaks.

SD's schedule ends at alphabar_T = 0.0047, so the forward process's last latent z_T = sqrt(abar_T) x0 +
sqrt(1 - abar_T) eps still holds 0.068 of the clean latent's coarse layout: each channel's mean and the contrast
between image halves (docs/base_model.md). A UNet trained on it reads that layout from z_T, a
gradient background's direction included; sampling from N(0, I) hands it a random one, and the shipped base draws
gradients the prompt's way about half the time. Given the true 2 x 2 block means, added to the starting noise as the
forward process would hold them, it drew 24 of 24 the right way (the oracle test).

``LayoutPrior`` predicts those block means from the prompt's text states, so the sampler starts from an estimate of
the forward process's p(z_T | prompt) at the coarse scale instead of N(0, I): z + sqrt(abar_t / (1 - abar_t)) x
up(prior(context)) at the first sampling timestep t, the oracle test's formula. The UNet, the schedule and the sampler
steps are unchanged; a pipeline without a ``prior/`` folder (SD-v1.5, the student) samples as before.

The prior is a small cross-attention readout: G x G learned queries attend to the pipeline's own text states (the
context its UNet reads) and each outputs the latent channels of its block. It trains in minutes on the CPU against
block means of training renders encoded by the pipeline's VAE encoder (``build_targets``; encoding at a reduced size
keeps that cheap: at 128² the 2 x 2 means correlate 0.996 with those at 512², and a per-channel affine fit on a few
full-size encodes removes the rest).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from snapfusion.config import save_json
from snapfusion.errors import ConfigError, SnapFusionError
from snapfusion.fileio import atomic_write_text, clean_trash
from snapfusion.weights import load_into, load_safetensors, read_config, resolve_weights, save_pretrained, \
    save_safetensors, WEIGHTS_STEM

KIND = "layout_prior"


@dataclass(frozen=True)
class LayoutPriorConfig:
    context_dim: int = 256     # the text states' width (the pipeline's text encoder)
    latent_channels: int = 4
    grid: int = 2              # predicts the clean latent's grid x grid block means
    width: int = 64
    heads: int = 4
    layers: int = 2


class PriorBlock(nn.Module):
    """Pre-norm cross-attention of the queries to the text states, self-attention among queries, then an MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_s, self.norm_m = (nn.LayerNorm(width) for _ in range(4))
        self.cross = nn.MultiheadAttention(width, heads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(kv)
        q = q + self.cross(self.norm_q(q), kv, kv, need_weights=False)[0]
        s = self.norm_s(q)
        q = q + self.self_attn(s, s, s, need_weights=False)[0]
        return q + self.mlp(self.norm_m(q))


class LayoutPrior(nn.Module):
    """Text states (B, L, D) -> the clean latent's block means (B, C, G, G), in the UNet's scaled latent units."""

    def __init__(self, config: LayoutPriorConfig = LayoutPriorConfig()):
        super().__init__()
        if config.grid < 1 or config.width % config.heads:
            raise ConfigError(f"layout prior: grid must be >= 1 and width a multiple of heads, got {config}")
        self.config = config
        self.proj = nn.Linear(config.context_dim, config.width)
        self.queries = nn.Parameter(torch.randn(config.grid ** 2, config.width) * 0.02)
        self.blocks = nn.ModuleList(PriorBlock(config.width, config.heads) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width)
        self.out = nn.Linear(config.width, config.latent_channels)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """All L states are read, as the UNet reads them (CLIP's states after the end-of-text token see the whole
        caption through its causal attention)."""
        if context.ndim != 3 or context.shape[-1] != self.config.context_dim:
            raise ConfigError(f"layout prior: expected text states (B, L, {self.config.context_dim}), "
                              f"got {tuple(context.shape)}")
        weight = self.proj.weight
        kv = self.proj(context.to(weight.device, weight.dtype))
        q = self.queries.expand(context.shape[0], -1, -1)
        for block in self.blocks:
            q = block(q, kv)
        g, c = self.config.grid, self.config.latent_channels
        return self.out(self.norm(q)).transpose(1, 2).reshape(-1, c, g, g)

    def save(self, folder: str | Path, dtype: torch.dtype | None = torch.float16) -> Path:
        return save_pretrained(folder, self, self.config, kind=KIND, dtype=dtype)

    @classmethod
    def load(cls, folder: str | Path, *, device: str | torch.device = "cpu") -> "LayoutPrior":
        """Load a prior saved by ``save``; it runs in fp32 whatever the pipeline's dtype (it is tiny)."""
        config = read_config(folder, LayoutPriorConfig, kind=KIND)
        model = cls(config)
        load_into(model, load_safetensors(resolve_weights(folder, WEIGHTS_STEM)), source=str(folder))
        return model.to(device).eval().requires_grad_(False)


def start_shift(prior: LayoutPrior, context: torch.Tensor, shape: tuple[int, int], abar: float) -> torch.Tensor:
    """What the sampler adds to its starting noise (B, C, H, W): sqrt(abar / (1 - abar)) x the predicted block means,
    each block's value over its H / G x W / G latent pixels (nearest), for the first sampling timestep's abar."""
    with torch.no_grad():  # a LayoutPrior or anything called like one (the ONNX Runtime backend's graph)
        means = prior(context.float()).float()
    return means_shift(means, shape, abar)


def means_shift(means: torch.Tensor, shape: tuple[int, int], abar: float) -> torch.Tensor:
    """sqrt(abar / (1 - abar)) x block means (B, C, G, G), each over its H / G x W / G latent pixels (nearest): the
    forward process's share of a clean latent's coarse layout on a unit-variance start (predicted means:
    ``start_shift``; true ones: the oracle test of scripts/diagnose_mean_leak.py)."""
    return math.sqrt(abar / (1 - abar)) * F.interpolate(means, size=shape, mode="nearest")


# ---- training data: block means of encoded training renders --------------------------------------------------

def block_means(encoder, images: torch.Tensor, grid: int, size: int) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> the scaled latents' grid x grid block means (B, C, G, G), each image first
    area-resized to size x size (the encoder's cost falls with the square of it)."""
    x = images.float() / 127.5 - 1
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="area")
    param = next(encoder.parameters())
    with torch.no_grad():
        mean = encoder.encode(x.to(param.device, param.dtype)).mean.float()
    return F.adaptive_avg_pool2d(mean, grid).cpu() * encoder.config.scaling_factor


def build_targets(encoder, count: int, cache: Path, *, grid: int = 2, size: int = 128, calibrate: int = 64,
                  full_size: int = 512, num_emoji: int | None = None, seed: int = 16, chunk: int = 500,
                  source: str = "", progress: Callable[[str], None] = print,
                  data_folder: str | None = None) -> tuple[list[str], torch.Tensor]:
    """(captions, block means (N, C, G, G)) of ``count`` training scenes (split "train", ``seed``), with training
    captions (the UNet's caption omissions included). Targets come from size² encodes, mapped per channel by an affine
    fit on the first ``calibrate`` scenes encoded at full size (0 = none). Chunks are cached under ``cache`` as
    safetensors + JSON, so a killed build resumes where it stopped; ``source`` names the encoder (the latent space)
    in the cache's manifest, and a cache built for another encoder, scene set or size is refused. ``data_folder``: the
    first ``count`` images of an image-caption folder (data/folder.py) instead of scenes, their own captions."""
    from snapfusion.data.dataset import make_item
    from snapfusion.data.folder import ImageCaptionFolder
    from snapfusion.data.sampling import SceneConfig

    cfg = SceneConfig(num_emoji=num_emoji)
    item = lambda i: make_item("train", full_size, seed, i, cfg)  # noqa: E731 (training scene i)
    if data_folder:  # the folder's image i (each once: a repeat would sit in both the training and held-out pairs)
        folder = ImageCaptionFolder(data_folder, full_size)
        count, calibrate, item = min(count, len(folder)), min(calibrate, len(folder)), folder.__getitem__
    cache.mkdir(parents=True, exist_ok=True)
    clean_trash(cache, tmp_of="*")  # temporary files of a killed build
    manifest = {"encoder": source, "num_emoji": num_emoji, "seed": seed, "full_size": full_size, "chunk": chunk}
    if data_folder:
        manifest["data_folder"] = str(Path(data_folder).resolve())
    path = cache / "manifest.json"
    if path.is_file() and json.loads(path.read_text()) != manifest:
        raise SnapFusionError(f"{cache} holds block means of another build ({path.read_text().strip()}); "
                              "use another --cache")
    atomic_write_text(path, json.dumps(manifest))
    captions, means = [], []
    t0 = time.time()
    for start in range(0, count, chunk):
        stem = cache / f"chunk_{start:07d}_{grid}_{size}"
        if not (stem.with_suffix(".json").is_file() and stem.with_suffix(".safetensors").is_file()):
            items = [item(i) for i in range(start, min(start + chunk, count))]
            m = block_means(encoder, torch.stack([it["image"] for it in items]), grid, size)
            save_safetensors({"means": m}, stem.with_suffix(".safetensors"), dtype=torch.float32)
            atomic_write_text(stem.with_suffix(".json"), json.dumps([it["caption"] for it in items]))
            progress(f"prior data: {start + len(items)}/{count} scenes ({time.time() - t0:.0f} s)")
        captions += json.loads(stem.with_suffix(".json").read_text())
        means.append(load_safetensors(stem.with_suffix(".safetensors"))["means"])
    means = torch.cat(means)
    if calibrate > 0 and size != full_size:
        stem = cache / f"calibration_{calibrate}_{grid}_{size}_{full_size}"
        if not stem.with_suffix(".safetensors").is_file():
            items = [item(i) for i in range(calibrate)]
            images = torch.stack([it["image"] for it in items])
            full = torch.cat([block_means(encoder, images[i:i + 8], grid, full_size) for i in range(0, calibrate, 8)])
            save_safetensors({"full": full}, stem.with_suffix(".safetensors"), dtype=torch.float32)
        full = load_safetensors(stem.with_suffix(".safetensors"))["full"]
        means = affine_map(means[:calibrate], full)(means)
    return captions, means


def affine_map(x: torch.Tensor, y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per channel least-squares y ~ a x + b over (N, C, G, G) pairs; returns the map."""
    c = x.shape[1]
    xs, ys = x.transpose(0, 1).reshape(c, -1), y.transpose(0, 1).reshape(c, -1)
    xm, ym = xs.mean(1, keepdim=True), ys.mean(1, keepdim=True)
    a = ((xs - xm) * (ys - ym)).sum(1) / (xs - xm).pow(2).sum(1).clamp(min=1e-12)
    b = ym[:, 0] - a * xm[:, 0]
    return lambda m: m * a.view(1, c, 1, 1) + b.view(1, c, 1, 1)


# ---- training --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PriorTrainConfig:
    steps: int = 3000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    val_fraction: float = 0.1
    uncond_prob: float = 0.1   # empty captions, as the UNet trained with: the prior of an empty prompt is the mean
    seed: int = 0
    eval_every: int = 250      # held-out MSE every this many steps (and at the last)
    keep_best: bool = True     # early stopping: end with the weights of the evaluated step with the lowest MSE on the
    #                            first half of the held-out pairs; the second half never chooses and is reported apart


def train_prior(encode_text: Callable[[list[str]], torch.Tensor], captions: list[str],
                targets: torch.Tensor, config: LayoutPriorConfig, train: PriorTrainConfig = PriorTrainConfig(),
                progress: Callable[[str], None] = print) -> tuple[LayoutPrior, dict]:
    """Fit a ``LayoutPrior`` to (caption, block means) pairs by MSE; the last ``val_fraction`` of the pairs are held
    out. ``encode_text`` gives the text states (B, L, D) of a list of captions; they are computed once (the text
    encoder is frozen). With ``keep_best`` the weights of the best evaluated step on the held-out pairs' first half are
    kept (early stopping). Returns the prior and a report: losses, held-out MSE per evaluation, the variance explained
    on all held-out pairs and on the half that did not choose the step."""
    if len(captions) != len(targets) or len(captions) < 10:
        raise SnapFusionError(f"layout prior: need >= 10 (caption, target) pairs, got {len(captions)} captions and "
                              f"{len(targets)} targets")
    if train.eval_every < 1:
        raise SnapFusionError(f"layout prior: eval_every must be >= 1, got {train.eval_every}")
    g = torch.Generator().manual_seed(train.seed)
    n_val = max(2, int(len(captions) * train.val_fraction))
    states = torch.cat([encode_text(captions[i:i + 512]).float().cpu() for i in range(0, len(captions), 512)])
    targets, empty = targets.float(), encode_text([""]).float().cpu()
    n_train = len(captions) - n_val
    choose, unseen = slice(n_train, n_train + n_val // 2), slice(n_train + n_val // 2, len(captions))
    with torch.random.fork_rng(devices=[]):  # the initial weights from train.seed too: a run is reproducible
        torch.manual_seed(train.seed)
        prior = LayoutPrior(config)
    opt = torch.optim.AdamW(prior.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    if train.steps < 3:  # OneCycleLR needs a phase of at least one step on each side: a constant rate instead
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    else:  # 5 % warm-up, at least 2 steps of it, at most half the run (same as 5 % from 40 steps on)
        warmup = min(0.5, max(0.05, 2 / train.steps))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=train.lr, total_steps=train.steps, pct_start=warmup)
    mean_target = targets[:n_train].mean(0, keepdim=True)

    def mse(part: slice) -> float:  # the prior has no dropout or batch statistics: no mode switch needed
        with torch.no_grad():
            pred = torch.cat([prior(states[part][i:i + 512]) for i in range(0, len(states[part]), 512)])
        return (pred - targets[part]).pow(2).mean().item()

    log, best = [], (math.inf, 0, None)
    for step in range(1, train.steps + 1):
        idx = torch.randint(0, n_train, (train.batch_size,), generator=g)
        s, y = states[idx], targets[idx]
        drop = torch.rand(len(idx), generator=g) < train.uncond_prob
        if drop.any():  # an empty caption's target: the training set's mean layout
            s, y = s.clone(), y.clone()
            s[drop], y[drop] = empty, mean_target
        loss = F.mse_loss(prior(s), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % train.eval_every == 0 or step == train.steps:
            held = mse(choose)
            log.append({"step": step, "loss": loss.item(), "held_out_mse": held})
            progress(f"prior: step {step}/{train.steps}, loss {loss.item():.4f}, held-out MSE {held:.4f}")
            if held < best[0]:
                best = (held, step, {k: v.clone() for k, v in prior.state_dict().items()})
    if best[2] is None:
        raise SnapFusionError("layout prior: the held-out MSE was never finite (training diverged); lower --lr")
    if train.keep_best:
        prior.load_state_dict(best[2])
    prior.eval().requires_grad_(False)
    held_out = slice(n_train, len(captions))
    variance = lambda part: (targets[part] - mean_target).pow(2).mean().item()  # noqa: E731
    err, err_unseen = mse(held_out), mse(unseen)
    report = {"pairs": len(captions), "held_out": n_val, "held_out_mse": err, "held_out_variance": variance(held_out),
              "held_out_r2": 1 - err / variance(held_out), "kept_step": best[1] if train.keep_best else train.steps,
              "unselected_held_out": unseen.stop - unseen.start,
              "unselected_r2": 1 - err_unseen / variance(unseen), "log": log, "train": dataclasses.asdict(train)}
    return prior, report


@dataclass(frozen=True)
class PriorData:
    """The (caption, block means) pairs of ``build_targets``."""

    scenes: int = 10000        # training renders (the last 10 % are held out)
    encode_size: int = 128     # renders are encoded at this size (cheap)
    calibrate: int = 64        # renders also encoded at full size for the per-channel affine map (0: none)
    grid: int = 2              # the latent's G x G block means
    num_emoji: int | None = None
    seed: int = 16
    data_folder: str | None = None   # your own images (metadata.jsonl) in place of the rendered scenes


def fit_pipeline_prior(pipe, encoder, out: Path, cache: Path, data: PriorData, train: PriorTrainConfig, *,
                       source: str, model: str) -> dict:
    """Train ``pipe``'s layout prior on block means from ``encoder`` (its latent space, named by ``source``); save it
    to ``out`` with ``train_report.json`` beside it; returns the report."""
    captions, targets = build_targets(encoder, data.scenes, cache, grid=data.grid, size=data.encode_size,
                                      calibrate=data.calibrate, full_size=pipe.config.resolution,
                                      num_emoji=data.num_emoji, seed=data.seed, source=source,
                                      data_folder=data.data_folder)
    config = LayoutPriorConfig(context_dim=pipe.text_encoder.config.hidden_size,
                               latent_channels=pipe.unet.config.in_channels, grid=data.grid)
    prior, report = train_prior(lambda c: pipe.encode_text(c).float().cpu(), captions, targets, config, train)
    prior.save(out)
    save_json({"model": model, "scenes": data.scenes, "encode_size": data.encode_size, "calibrate": data.calibrate,
               "num_emoji": data.num_emoji, "seed": data.seed, "config": dataclasses.asdict(config), **report},
              out / "train_report.json")
    return report
