"""Parity of an export against PyTorch: per-network max |diff| on seeded inputs and the PSNR of one image."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from snapfusion.config import save_json, to_dict
from snapfusion.errors import SnapFusionError
from snapfusion.export.components import ExportConfig, graphs
from snapfusion.sampling import guidance_steps

PARITY_PROMPT = "a red apple to the left of a cat on a blue background"
REPORT = "parity.json"


class ParityError(SnapFusionError):
    """The exported model differs from the PyTorch one by more than the threshold."""


@dataclass(frozen=True)
class ComponentParity:
    """One network on the same seeded inputs: max |exported - torch| and max |torch|."""

    name: str
    max_abs_diff: float
    max_abs_ref: float

    @property
    def rel_diff(self) -> float:
        return self.max_abs_diff / max(self.max_abs_ref, 1e-12)


@dataclass(frozen=True)
class ParityReport:
    """Everything the parity check measured, and the thresholds it applied."""

    precision: str
    components: tuple[ComponentParity, ...]
    image_psnr: float                 # dB, images in [0, 1]; inf when identical
    image_max_abs_diff: float
    min_psnr: float
    max_rel_diff: float
    settings: dict = field(default_factory=dict)

    def failures(self) -> list[str]:
        bad = [f"{c.name}: max|diff| {c.max_abs_diff:.3g} = {c.rel_diff:.3g} of max|ref| > {self.max_rel_diff}"
               for c in self.components if not c.rel_diff <= self.max_rel_diff]
        if not self.image_psnr >= self.min_psnr:
            bad.append(f"image PSNR {self.image_psnr:.1f} dB < {self.min_psnr} dB")
        return bad

    def summary(self) -> str:
        parts = [f"{c.name} max|diff| {c.max_abs_diff:.2e} ({c.rel_diff:.1e} rel)" for c in self.components]
        return f"parity ({self.precision}): " + ", ".join(parts) + f"; image PSNR {self.image_psnr:.1f} dB"


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1]."""
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


@torch.no_grad()
def compare_components(pipe, run: Callable[[str, tuple[torch.Tensor, ...]], torch.Tensor], *, batch: int = 3,
                       resolution: int | None = None) -> tuple[ComponentParity, ...]:
    """Run each network in torch and through ``run(name, inputs)`` on the same seeded inputs (batch 3: dynamic)."""
    out = []
    for graph in graphs(pipe, batch=batch, resolution=resolution, seed=1):
        ref = graph.module(*graph.examples).float().cpu()
        got = run(graph.name, graph.examples).float().cpu()
        if got.shape != ref.shape:
            raise ParityError(f"{graph.name}: exported output shape {tuple(got.shape)} != torch {tuple(ref.shape)}")
        out.append(ComponentParity(graph.name, (got - ref).abs().max().item(), ref.abs().max().item()))
    return tuple(out)


def check_parity(pipe, exported, cfg: ExportConfig, out: str | Path | None = None) -> ParityReport:
    """Compare ``exported`` (an ``OrtPipeline``) with ``pipe``; write parity.json; raise ParityError over threshold."""
    resolution = cfg.resolution or pipe.config.resolution
    nets = {"text_encoder": exported.text_encoder, "unet": exported.unet, "vae_decoder": exported.decoder,
            "prior": exported.prior}

    def run(name: str, xs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if nets.get(name) is None:
            raise ParityError(f"{name}: the PyTorch pipeline has it and the export does not")
        return nets[name](*xs)

    components = compare_components(pipe, run, resolution=resolution)
    steps = cfg.parity_steps or min(pipe.config.steps, 8)  # the distilled model's step count
    interval = pipe.config.guidance_interval  # the stored default, unless it guides none of these steps
    interval = interval if any(guidance_steps(steps, interval)) else (0.0, 1.0)
    settings = dict(prompt=PARITY_PROMPT, seed=0, steps=steps, guidance=pipe.config.guidance,
                    guidance_rescale=pipe.config.guidance_rescale, guidance_interval=list(interval), size=resolution)
    kw = dict(steps=steps, height=resolution, width=resolution, guidance_interval=interval)
    ref = pipe.generate([PARITY_PROMPT], [0], **kw).cpu()
    got = exported.generate([PARITY_PROMPT], [0], **kw).cpu()
    min_psnr, max_rel = cfg.thresholds()
    report = ParityReport(cfg.precision, components, psnr(got, ref), (got - ref).abs().max().item(), min_psnr,
                          max_rel, settings)
    if out is not None:
        data = to_dict(report)
        data["image_psnr"] = None if math.isinf(report.image_psnr) else report.image_psnr  # strict JSON: no inf
        data["failures"] = report.failures()
        save_json(data, Path(out) / REPORT)
    bad = report.failures()
    if bad:
        raise ParityError(f"exported model fails parity ({'; '.join(bad)}); see {REPORT}")
    return report
