"""What is exported: the three networks as traceable modules with named inputs, example inputs and export configs.

Shared by the ONNX and Core ML exporters and by the parity check, so that every format sees the same graphs.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from torch import nn

from snapfusion.errors import ConfigError

Format = Literal["onnx", "coreml"]
Precision = Literal["fp32", "fp16", "int8"]
TEXT, UNET, DECODER, PRIOR = "text_encoder", "unet", "vae_decoder", "prior"
COMPONENTS = (TEXT, UNET, DECODER)  # every pipeline's; PRIOR only where the pipeline has a layout prior

# Default parity thresholds per weight precision: (min image PSNR in dB, max |diff| / max |reference|).
DEFAULT_THRESHOLDS: dict[str, tuple[float, float]] = {"fp32": (35.0, 1e-3), "fp16": (30.0, 2e-2),
                                                      "int8": (20.0, 0.2)}


@dataclass(frozen=True)
class ExportConfig:
    """How a pipeline is exported and checked; saved as JSON beside the exported files."""

    format: Format = "onnx"
    precision: Precision = "fp32"      # fp16: weights and math in half; int8: dynamic int8 weight quantization
    opset: int = 17                    # ONNX opset (17 has LayerNormalization)
    batch: int = 2                     # Core ML only: fixed UNet batch (2 = cond + uncond); ONNX batch is dynamic
    resolution: int = 0                # Core ML: fixed image side in pixels; parity image side (0: the model's)
    parity: bool = True                # run the exported model beside PyTorch after export
    parity_steps: int = 0              # sampler steps of the parity image (0: the model's, at most 8)
    min_psnr: float = 0.0              # fail below this image PSNR in dB (0: DEFAULT_THRESHOLDS[precision])
    max_rel_diff: float = 0.0          # fail above this component max|diff|/max|ref| (0: the default)

    def __post_init__(self):
        if self.format not in ("onnx", "coreml"):
            raise ConfigError(f"export format {self.format!r} is not one of ['onnx', 'coreml']")
        if self.precision not in DEFAULT_THRESHOLDS:
            raise ConfigError(f"export precision {self.precision!r} is not one of {list(DEFAULT_THRESHOLDS)}")
        if self.batch < 1 or self.resolution < 0 or self.parity_steps < 0:
            raise ConfigError("export: batch must be >= 1, resolution and parity_steps >= 0")

    def thresholds(self) -> tuple[float, float]:
        """(min PSNR, max relative diff), defaults filled in."""
        psnr, rel = DEFAULT_THRESHOLDS[self.precision]
        return self.min_psnr or psnr, self.max_rel_diff or rel


def refuse_guidance_embed(pipe, fmt: str) -> None:
    """``ConfigError`` for a guidance-embedded UNet: the exported graphs and pipelines take (z, t, context) and mix
    cond and uncond themselves; a UNet with the guidance scale as an input has no such interface in ``fmt``."""
    if pipe.embeds_guidance:
        raise ConfigError(f"{fmt} export of {pipe.config.name}: its UNet embeds the guidance scale (an extra input "
                          "this export's (z, t, context) UNet interface and guidance loop do not have); run it with "
                          "the PyTorch backend")


class UNetGraph(nn.Module):
    """The UNet with a fp32 timestep input: (z (B, 4, h, w), t (B,) float, context (B, 77, D)) -> eps or v."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, z: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(z, t, context)


class DecoderGraph(nn.Module):
    """The decoder from diffusion latents (scaling factor included) to images in [-1, 1]."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder.images_from_latents(latents)  # (B, 3, 8h, 8w)


class PriorGraph(nn.Module):
    """The terminal layout prior: text states (B, 77, D) fp32 -> the clean latent's block means (B, C, G, G). It stays
    fp32 in every export precision, as the PyTorch pipeline runs it (142 k parameters: nothing to gain)."""

    def __init__(self, prior: nn.Module):
        super().__init__()
        self.prior = prior

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.prior(context)


@contextmanager
def traceable_attention() -> Iterator[None]:
    """nn.MultiheadAttention (the prior's) without its inference fast path while a graph is traced: the fused
    ``_native_multi_head_attention`` op has no ONNX or Core ML conversion, the composite it replaces has."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@dataclass
class Graph:
    """One network to export: module, input names, example inputs, output name."""

    name: str
    module: nn.Module
    inputs: tuple[str, ...]
    examples: tuple[torch.Tensor, ...]
    output: str


def graphs(pipe, *, batch: int = 2, resolution: int | None = None, seed: int = 0) -> list[Graph]:
    """The networks of ``pipe`` with seeded example inputs at the given batch and image side: text encoder, UNet,
    decoder, and the layout prior where the pipeline has one."""
    side = resolution or pipe.config.resolution
    down = pipe.decoder.config.downscale
    if side % pipe.latent_factor:
        raise ConfigError(f"export resolution {side} is not a multiple of {pipe.latent_factor}")
    g = torch.Generator("cpu").manual_seed(seed)
    dev, dtype = pipe.device, pipe.dtype
    c = pipe.unet.config
    latent = (batch, c.in_channels, side // down, side // down)
    ids = torch.randint(0, pipe.text_encoder.config.vocab_size, (batch, 77), generator=g)
    z = torch.randn(latent, generator=g)
    t = torch.linspace(999, 1, batch)
    ctx = torch.randn(batch, 77, c.context_dim, generator=g)
    lat = torch.randn(latent, generator=g)
    out = [
        Graph(TEXT, pipe.text_encoder, ("input_ids",), (ids.to(dev),), "hidden_states"),
        Graph(UNET, UNetGraph(pipe.unet), ("z", "t", "context"),
              (z.to(dev, dtype), t.to(dev), ctx.to(dev, dtype)), "prediction"),
        Graph(DECODER, DecoderGraph(pipe.decoder), ("latents",), (lat.to(dev, dtype),), "images"),
    ]
    if pipe.prior is not None:
        out.append(Graph(PRIOR, PriorGraph(pipe.prior), ("context",), (ctx.to(dev),), "block_means"))
    return out
