"""A TAESD-style tiny decoder: plain 3x3 conv + ReLU residual blocks, nearest upsampling, no norms, no attention.

The idea is TAESD's (Bohan O. Boer, 2023: a small conv decoder trained to match SD's decoder in the same latent
space); this network is written from that description. It is the equal-latency baseline for SnapFusion §3.2's
channel-halved decoder. Interface as ``models.autoencoder.Decoder``: ``forward(raw_latents)``,
``images_from_latents(latents)``, ``config.downscale``, ``config.scaling_factor``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from snapfusion.errors import ConfigError
from snapfusion.weights import load_into, load_safetensors, read_config, resolve_weights, save_pretrained, WEIGHTS_STEM

KIND = "tiny-decoder"


@dataclass(frozen=True)
class TinyDecoderConfig:
    """Widths and residual blocks per resolution level, lowest resolution first (as the decoder runs them)."""

    latent_channels: int = 4
    out_channels: int = 3
    widths: tuple[int, ...] = (64, 64, 64, 64)  # one level per latent->image doubling, plus the latent level
    blocks: tuple[int, ...] = (3, 3, 3, 1)  # residual blocks per level
    scaling_factor: float = 0.18215  # the teacher's: diffusion latents = raw latents * scaling_factor
    latent_clamp: float = 3.0  # raw latents pass through clamp * tanh(z / clamp) (> 0; guards extreme latents)

    def __post_init__(self):
        if not self.widths or len(self.widths) != len(self.blocks):
            raise ConfigError(f"TinyDecoderConfig: widths {self.widths} and blocks {self.blocks} need equal length")
        if min(self.widths) < 1 or min(self.blocks) < 0 or self.latent_clamp <= 0 or self.scaling_factor <= 0:
            raise ConfigError("TinyDecoderConfig: widths must be >= 1, blocks >= 0, latent_clamp and scale > 0")

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel along each side."""
        return 2 ** (len(self.widths) - 1)


class ConvBlock(nn.Module):
    """x + conv(relu(conv(relu(conv(x))))), then ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(channels, channels, 3, padding=1) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.convs[0](x))
        h = F.relu(self.convs[1](h))
        return F.relu(x + self.convs[2](h))


class TinyLevel(nn.Module):
    """Residual blocks at one resolution, then (except at the last level) nearest 2x upsampling + conv."""

    def __init__(self, width: int, blocks: int, next_width: int | None):
        super().__init__()
        self.res = nn.ModuleList([ConvBlock(width) for _ in range(blocks)])
        self.upsample = nn.Conv2d(width, next_width, 3, padding=1, bias=False) if next_width else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.res:
            x = block(x)
        if self.upsample is not None:
            x = self.upsample(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class TinyDecoder(nn.Module):
    """Raw latents (B, 4, h, w) -> image (B, 3, 2^(L-1) h, 2^(L-1) w) in [-1, 1] (not clamped)."""

    def __init__(self, config: TinyDecoderConfig):
        super().__init__()
        self.config = config
        w = config.widths
        self.conv_in = nn.Conv2d(config.latent_channels, w[0], 3, padding=1)
        self.up = nn.ModuleList([TinyLevel(w[i], config.blocks[i], w[i + 1] if i + 1 < len(w) else None)
                                 for i in range(len(w))])
        self.conv_out = nn.Conv2d(w[-1], config.out_channels, 3, padding=1)

    def forward(self, raw_latents: torch.Tensor) -> torch.Tensor:
        c = self.config.latent_clamp
        h = F.relu(self.conv_in(torch.tanh(raw_latents / c) * c))  # (B, w0, h, w)
        for level in self.up:
            h = level(h)
        return self.conv_out(h)  # (B, 3, 8h, 8w)

    def decode(self, raw_latents: torch.Tensor) -> torch.Tensor:
        return self(raw_latents)

    def images_from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] (not clamped) from diffusion latents: removes ``scaling_factor`` first."""
        return self(latents / self.config.scaling_factor)


def save_tiny_decoder(folder: str | os.PathLike, model: TinyDecoder, *, dtype: torch.dtype | None = None) -> None:
    save_pretrained(folder, model, model.config, kind=KIND, dtype=dtype)


def load_tiny_decoder(folder: str | os.PathLike, *, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> TinyDecoder:
    model = TinyDecoder(read_config(folder, TinyDecoderConfig, kind=KIND)).to(dtype=dtype)
    load_into(model, load_safetensors(resolve_weights(folder, WEIGHTS_STEM)), source=str(folder))
    return model.to(device)
