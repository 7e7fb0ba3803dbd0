"""SD's KL-f8 autoencoder (LDM ``AutoencoderKL``) as a separate Encoder and Decoder.

Layout follows diffusers' ``AutoencoderKL`` with our block names (``down.1.res.0``, ``mid.attn.0``, ``up.0.res.2``);
the parameter names inside each block are diffusers', so conversion is a rename of block prefixes
(snapfusion/convert/vae_keys.py). Widths are listed from the highest resolution level to the lowest for both the
encoder and the decoder (as diffusers' ``block_out_channels``); the decoder runs them in reverse. ``up.0`` is the
first up stage the decoder runs (lowest resolution), as in diffusers.

Two latent spaces: ``encode``/``decode`` work in the VAE's raw latent space; the diffusion model works in the
scaled one (raw * ``scaling_factor``). Cross between images and diffusion latents only through
``latents_from_images`` / ``images_from_latents``, which apply the scale. Images are in [-1, 1].
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from snapfusion.errors import ConfigError
from snapfusion.models.layers import Attention, Downsample, ResnetBlock, Upsample
from snapfusion.weights import (WEIGHTS_STEM, build_loaded, load_safetensors, read_config, resolve_weights,
                                save_pretrained)

NORM_EPS = 1e-6  # every GroupNorm of the VAE (diffusers Encoder/Decoder: resnet_eps=1e-6)


@dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture of a KL autoencoder; widths per resolution level, highest resolution first."""

    in_channels: int = 3  # image channels into the encoder
    out_channels: int = 3  # image channels out of the decoder
    latent_channels: int = 4
    encoder_widths: tuple[int, ...] = (128, 256, 512, 512)
    decoder_widths: tuple[int, ...] = (128, 256, 512, 512)  # SnapFusion §3.2 halves these: (64, 128, 256, 256)
    layers_per_block: int = 2  # ResNet blocks per encoder level; the decoder uses layers_per_block + 1 (as SD)
    norm_groups: int = 32
    scaling_factor: float = 0.18215  # SD-v1.x: diffusion latents = raw latents * scaling_factor
    mid_attention: bool = True  # single-head self-attention between the two mid ResNet blocks
    double_z: bool = True  # encoder predicts mean and log-variance (KL); False: a deterministic encoder

    def __post_init__(self):
        for name in ("encoder_widths", "decoder_widths"):
            widths = getattr(self, name)
            if not widths:
                raise ConfigError(f"AutoencoderConfig.{name} is empty")
            bad = [w for w in widths if w <= 0 or w % self.norm_groups]
            if bad:
                raise ConfigError(f"AutoencoderConfig.{name}: {bad} not divisible by norm_groups={self.norm_groups}")
        if self.layers_per_block < 1 or self.scaling_factor <= 0:
            raise ConfigError("AutoencoderConfig: layers_per_block must be >= 1 and scaling_factor > 0")

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD)."""
        return 2 ** (len(self.encoder_widths) - 1)

    @classmethod
    def sd15(cls) -> "AutoencoderConfig":
        """SD-v1.5's VAE (runwayml/stable-diffusion-v1-5 vae/config.json)."""
        return cls()

    @classmethod
    def tiny(cls) -> "AutoencoderConfig":
        """SD's structure (4 levels, 2 layers, mid attention) at toy widths, for tests."""
        return cls(encoder_widths=(8, 16, 32, 32), decoder_widths=(8, 16, 32, 32), norm_groups=4)

    def with_halved_decoder(self) -> "AutoencoderConfig":
        """The same autoencoder with every decoder width halved (SnapFusion §3.2's efficient decoder)."""
        return dataclasses.replace(self, decoder_widths=tuple(w // 2 for w in self.decoder_widths))


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) over raw latents (LDM ``DiagonalGaussianDistribution``)."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor | None):
        self.mean = mean  # (B, 4, h, w)
        self.logvar = None if logvar is None else logvar.clamp(-30.0, 20.0)  # LDM's clamp; None: deterministic

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "DiagonalGaussian":
        """Split (B, 2C, h, w) encoder moments into mean and log-variance."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    @property
    def std(self) -> torch.Tensor:
        return torch.zeros_like(self.mean) if self.logvar is None else torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw mean + std * noise, with noise from ``generator`` (on the mean's device)."""
        if self.logvar is None:
            return self.mean
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over C, h, w -> (B,)."""
        if self.logvar is None:
            raise ValueError("a deterministic encoder (double_z=False) has no KL term")
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class SpatialSelfAttention(Attention):
    """VAE mid attention: GroupNorm, single-head attention over h*w positions, residual (diffusers names)."""

    def __init__(self, channels: int, *, groups: int):
        super().__init__(channels, heads=1, qkv_bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).view(b, c, h * w).transpose(1, 2)  # (B, h*w, C)
        out = super().forward(tokens)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    """ResNet, optional self-attention, ResNet at the lowest resolution (diffusers ``UNetMidBlock2D``)."""

    def __init__(self, channels: int, *, groups: int, attention: bool):
        super().__init__()
        self.res = nn.ModuleList([ResnetBlock(channels, channels, temb_channels=None, groups=groups, eps=NORM_EPS)
                                  for _ in range(2)])
        self.attn = nn.ModuleList([SpatialSelfAttention(channels, groups=groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res[0](x)
        for attn in self.attn:
            x = attn(x)
        return self.res[1](x)


class Stage(nn.Module):
    """ResNet blocks followed by an optional resampler (``downsample`` or ``upsample``)."""

    def __init__(self, in_ch: int, out_ch: int, *, layers: int, groups: int, down: bool = False, up: bool = False):
        super().__init__()
        self.res = nn.ModuleList([ResnetBlock(in_ch if j == 0 else out_ch, out_ch, temb_channels=None, groups=groups,
                                              eps=NORM_EPS) for j in range(layers)])
        self.downsample = Downsample(out_ch, pad_asymmetric=True) if down else None  # LDM pads (0, 1, 0, 1)
        self.upsample = Upsample(out_ch) if up else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.res:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> moments (B, 2*latent, H/8, W/8), quant_conv included."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        widths, groups = config.encoder_widths, config.norm_groups
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList([
            Stage(widths[max(i - 1, 0)], w, layers=config.layers_per_block, groups=groups, down=i < len(widths) - 1)
            for i, w in enumerate(widths)])
        self.mid = MidBlock(widths[-1], groups=groups, attention=config.mid_attention)
        self.norm_out = nn.GroupNorm(groups, widths[-1], eps=NORM_EPS)
        moments = config.latent_channels * (2 if config.double_z else 1)
        self.conv_out = nn.Conv2d(widths[-1], moments, 3, padding=1)
        self.quant_conv = nn.Conv2d(moments, moments, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(images)  # (B, 128, H, W)
        for stage in self.down:
            h = stage(h)
        h = self.mid(h)  # (B, 512, H/8, W/8)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return self.quant_conv(h)  # (B, 8, H/8, W/8)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """The posterior over raw (unscaled) latents."""
        moments = self(images)
        return DiagonalGaussian.from_moments(moments) if self.config.double_z else DiagonalGaussian(moments, None)

    def latents_from_images(self, images: torch.Tensor, generator: torch.Generator | None = None, *,
                            sample: bool = True) -> torch.Tensor:
        """Diffusion latents (scaled by ``scaling_factor``): a posterior draw, or its mean if ``sample=False``."""
        posterior = self.encode(images)
        raw = posterior.sample(generator) if sample else posterior.mode()
        return raw * self.config.scaling_factor


class Decoder(nn.Module):
    """Raw latents (B, 4, h, w) -> image (B, 3, 8h, 8w), post_quant_conv included."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        widths, groups = tuple(reversed(config.decoder_widths)), config.norm_groups  # lowest resolution first
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid = MidBlock(widths[0], groups=groups, attention=config.mid_attention)
        self.up = nn.ModuleList([
            Stage(widths[max(i - 1, 0)], w, layers=config.layers_per_block + 1, groups=groups, up=i < len(widths) - 1)
            for i, w in enumerate(widths)])
        self.norm_out = nn.GroupNorm(groups, widths[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], config.out_channels, 3, padding=1)

    def forward(self, raw_latents: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(self.post_quant_conv(raw_latents))  # (B, 512, h, w)
        h = self.mid(h)
        for stage in self.up:
            h = stage(h)  # (B, 128, 8h, 8w) after the last stage
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, 8h, 8w)

    def decode(self, raw_latents: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] (not clamped) from raw (unscaled) latents."""
        return self(raw_latents)

    def images_from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] (not clamped) from diffusion latents: removes ``scaling_factor`` first."""
        return self(latents / self.config.scaling_factor)


class AutoencoderKL(nn.Module):
    """Encoder and Decoder together; state-dict keys ``encoder.*`` and ``decoder.*``."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        return self.encoder.encode(images)

    def decode(self, raw_latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(raw_latents)

    def latents_from_images(self, images: torch.Tensor, generator: torch.Generator | None = None, *,
                            sample: bool = True) -> torch.Tensor:
        return self.encoder.latents_from_images(images, generator, sample=sample)

    def images_from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder.images_from_latents(latents)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruction through a posterior draw."""
        return self.decoder(self.encoder.encode(images).sample(generator))


KINDS: dict[type[nn.Module], str] = {AutoencoderKL: "vae", Encoder: "vae-encoder", Decoder: "vae-decoder"}


def save_autoencoder(folder: str | os.PathLike, model: AutoencoderKL | Encoder | Decoder, *,
                     dtype: torch.dtype | None = None) -> None:
    """Save a whole VAE, an encoder or a decoder as ``folder/{config.json, model.safetensors}``."""
    save_pretrained(folder, model, model.config, kind=KINDS[type(model)], dtype=dtype)


def load_autoencoder(folder: str | os.PathLike, cls: type[nn.Module] = AutoencoderKL, *,
                     device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a model saved by ``save_autoencoder``; ``cls`` (AutoencoderKL, Encoder or Decoder) must match the kind."""
    config = read_config(folder, AutoencoderConfig, kind=KINDS[cls])
    state = load_safetensors(resolve_weights(folder, WEIGHTS_STEM), device="cpu")
    return build_loaded(lambda: cls(config), state, source=str(folder), dtype=dtype).to(device)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
