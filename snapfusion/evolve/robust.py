"""Robust training (SnapFusion §3.1): each CA and RN block runs with probability p, otherwise it is skipped.

A skipped attn block is the identity; a skipped res block keeps only its shortcut (``UNet.forward`` skip rule).
``RobustTask`` runs the UNet stage (``UNetTask``: its data, noise and eps or v loss) on the UNet called through random
skips and started from given weights; with p = 1 it is plain fine-tuning of those weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from snapfusion.config import to_dict
from snapfusion.errors import ConfigError, WeightsError
from snapfusion.models.unet import UNet, inherit_weights
from snapfusion.train.unet import UNetTask, UNetTaskConfig, require_known_prediction
from snapfusion.weights import WEIGHTS_STEM, load_safetensors, resolve_weights

Granularity = Literal["sample", "batch"]


@dataclass(frozen=True)
class RobustConfig:
    """Keep probabilities per block type and the granularity of the random skips."""

    p_res: float = 0.9            # probability that a res (RN) block runs
    p_attn: float = 0.9           # probability that an attn (CA) block runs
    granularity: Granularity = "sample"  # "sample": own skips per sample; "batch": one draw for the whole batch

    def __post_init__(self):
        for name in ("p_res", "p_attn"):
            p = getattr(self, name)
            if not 0.0 < p <= 1.0:
                raise ConfigError(f"robust training: {name} must be in (0, 1], got {p}")
        if self.granularity not in ("sample", "batch"):
            raise ConfigError(f"robust training: granularity must be 'sample' or 'batch', got {self.granularity!r}")


def draw_skips(names: list[str], cfg: RobustConfig, batch: int, generator: torch.Generator):
    """Random skips: ``{name: bool (B,)}`` per sample, or a set of names for the whole batch (True/in = skipped)."""
    keep = torch.tensor([cfg.p_res if n.split(".")[-2] == "res" else cfg.p_attn for n in names],
                        device=generator.device)  # (N,)
    if cfg.granularity == "batch":
        u = torch.rand(len(names), generator=generator, device=generator.device)  # (N,)
        return {n for n, skip in zip(names, (u >= keep).tolist()) if skip}
    u = torch.rand(len(names), batch, generator=generator, device=generator.device)  # (N, B)
    skip = u >= keep[:, None]
    return {n: skip[i] for i, n in enumerate(names) if skip[i].any()}


class SkippingUNet:
    """Calls the UNet with fresh random skips on every call (a view, not a module: the loop trains the UNet)."""

    def __init__(self, model: nn.Module, names: list[str], cfg: RobustConfig, generator: torch.Generator):
        self.model, self.names, self.cfg, self.generator = model, names, cfg, generator

    def __call__(self, z: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **kwargs) -> torch.Tensor:
        skip = draw_skips(self.names, self.cfg, z.shape[0], self.generator)
        return self.model(z, t, context, skip=skip or None, **kwargs)


@dataclass(frozen=True)
class RobustTaskConfig:
    unet: UNetTaskConfig           # the UNet config (possibly evolved), data, schedule, frozen encoders
    init: str | None = None        # UNet folder to start from (its keys and shapes must match unet.model)
    robust: RobustConfig = field(default_factory=RobustConfig)


def load_matching(model: UNet, folder: str | Path) -> UNet:
    """Fill ``model`` from a UNet folder whose every key and shape it must match."""
    state = load_safetensors(resolve_weights(Path(folder), WEIGHTS_STEM))
    missing = inherit_weights(model, state)
    if missing:
        raise WeightsError(f"{folder}: {len(missing)} tensor(s) of the UNet config are missing or differ in shape, "
                           f"first {missing[0]!r}")
    return model


class RobustTask:
    """The UNet stage (``self.stage``) on a UNet with random block skips (robust training) from given weights."""

    name = "robust_unet"
    compiles = False  # the skipped blocks change every step: a compiled UNet would recompile each time

    def __init__(self, cfg: RobustTaskConfig):
        self.robust_cfg, self.cfg = cfg, cfg.unet  # cfg: the UNet stage's, as every UNet task's
        self.stage = UNetTask(cfg.unet)  # data, noise, loss, checkpoint I/O and sample grids

    def describe(self) -> dict:
        return to_dict(self.robust_cfg)

    def build(self) -> nn.Module:
        require_known_prediction(self.cfg.model, "robust-train / evolve")
        model = UNet(self.cfg.model)
        return load_matching(model, self.robust_cfg.init) if self.robust_cfg.init else model

    def dataset(self):
        return self.stage.dataset()

    def collate(self, items):
        return self.stage.collate(items)

    def loss(self, model, batch, generator):
        names = [n for n, _ in getattr(model, "module", model).named_blocks()]
        if self.robust_cfg.robust.p_res == 1.0 and self.robust_cfg.robust.p_attn == 1.0:
            return self.stage.loss(model, batch, generator)
        return self.stage.loss(SkippingUNet(model, names, self.robust_cfg.robust, generator), batch, generator)

    def save(self, model, folder: Path) -> None:
        self.stage.save(model, folder)

    def load(self, model, folder: Path) -> None:
        self.stage.load(model, folder)

    def sample_grid(self, model, path: Path) -> None:
        self.stage.sample_grid(model, path)


def granularity_measurement(task: RobustTask, model: UNet, batch: dict, *, draws: int = 8,
                            device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
    """Per granularity: seconds per forward+backward and the relative variance of the gradient across skip draws.

    Same batch, same noise and timesteps, only the skips vary, so the variance is the part of the gradient noise
    that the granularity causes (lower = each step estimates the robust objective better).
    """
    out = {}
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, _ in model.named_blocks()]
    for granularity in ("sample", "batch"):
        cfg = RobustConfig(task.robust_cfg.robust.p_res, task.robust_cfg.robust.p_attn, granularity)
        grads, seconds = [], []
        for d in range(draws):
            noise_gen = torch.Generator(device).manual_seed(0)  # t and eps: identical for every draw
            skip_gen = torch.Generator(device).manual_seed(1000 + d)
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss, _ = task.stage.loss(SkippingUNet(model, names, cfg, skip_gen), batch, noise_gen)
            loss.mean().backward()
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - t0)
            grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float().cpu()
                                    for p in params]))  # a block skipped for the batch has no gradient: 0
        g = torch.stack(grads)  # (draws, P)
        mean = g.mean(0)
        rel_var = float((g - mean).pow(2).sum(1).mean() / mean.pow(2).sum().clamp(min=1e-30))
        out[granularity] = {"seconds_per_step": sorted(seconds)[len(seconds) // 2], "grad_relative_variance": rel_var}
    return out

