"""The noise and timestep sampling of the UNet stages: offset noise, timestep bias and the mixed-resolution draw.

``NoiseSampler`` is built once from a UNet stage's config (``UNetTaskConfig``'s offset_noise*, timestep_bias* and
mix_* fields) and draws from the loop's generator, so a resumed run draws the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from snapfusion.errors import ConfigError
from snapfusion.schedule import NoiseSchedule

TIMESTEP_BIASES = ("none", "later", "earlier", "range")


def timestep_bias_weights(cfg, num_timesteps: int) -> torch.Tensor | None:
    """Sampling weights over the training timesteps for ``timestep_bias`` (diffusers' SDXL training script's
    --timestep_bias_strategy): "later" multiplies the weight of the last ``timestep_bias_portion`` of the timesteps
    (the noisiest) by ``timestep_bias_multiplier``, "earlier" the first portion, "range" the timesteps
    [timestep_bias_begin, timestep_bias_end); None for "none" (uniform t, drawn as before). The loss weighting is
    unchanged, so a biased run trains the chosen timesteps more often, not at a larger weight."""
    bias = cfg.timestep_bias
    if bias == "none":
        return None
    w = torch.ones(num_timesteps)
    if bias == "range":
        lo, hi = cfg.timestep_bias_begin, cfg.timestep_bias_end
    else:
        n = max(1, round(cfg.timestep_bias_portion * num_timesteps))
        lo, hi = (num_timesteps - n, num_timesteps) if bias == "later" else (0, n)
    w[lo:hi] *= cfg.timestep_bias_multiplier
    return w


def check_offset_noise(cfg) -> None:
    """Offset-noise options that cannot train are refused before anything is built."""
    grid = cfg.offset_noise_grid
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1 or grid & (grid - 1):
        raise ConfigError(f"--offset-noise-grid must be a power of 2 (1, 2, 4, ..), got {grid!r}")
    if grid > 1 and cfg.offset_noise <= 0:
        raise ConfigError("--offset-noise-grid needs --offset-noise > 0 (the strength on every grid)")


def check_timestep_bias(cfg) -> None:
    """An unknown bias, a negative multiplier, a portion outside (0, 1] or an empty range is refused up front."""
    T = cfg.schedule.num_train_timesteps
    if cfg.timestep_bias not in TIMESTEP_BIASES:
        raise ConfigError(f"--timestep-bias must be one of {list(TIMESTEP_BIASES)}, got {cfg.timestep_bias!r}")
    if cfg.timestep_bias == "none":
        return
    if not cfg.timestep_bias_multiplier >= 0:
        raise ConfigError(f"--timestep-bias-multiplier must be >= 0, got {cfg.timestep_bias_multiplier!r}")
    if cfg.timestep_bias in ("later", "earlier") and not 0 < cfg.timestep_bias_portion <= 1:
        raise ConfigError(f"--timestep-bias-portion must be in (0, 1], got {cfg.timestep_bias_portion!r}")
    if cfg.timestep_bias == "range" and not 0 <= cfg.timestep_bias_begin < cfg.timestep_bias_end <= T:
        raise ConfigError(f"--timestep-bias-range needs 0 <= BEGIN < END <= {T}, got "
                          f"{cfg.timestep_bias_begin} {cfg.timestep_bias_end}")
    if timestep_bias_weights(cfg, T).sum() <= 0:
        raise ConfigError("--timestep-bias-multiplier 0 over every timestep leaves nothing to train on")


def check_mixed_resolution(cfg) -> None:
    """Mixed-resolution options that cannot train are refused before anything is built."""
    if not cfg.mix_size:
        return
    if cfg.mix_size < 0 or cfg.mix_size % 8:
        raise ConfigError(f"--mix-size must be a positive multiple of 8, got {cfg.mix_size}")
    if cfg.latent_pool <= 0:
        raise ConfigError("--mix-size needs --latent-pool (both sizes train on pooled latents)")
    if not 0.0 < cfg.mix_prob <= 1.0:
        raise ConfigError(f"--mix-prob must be in (0, 1], got {cfg.mix_prob}")
    if cfg.mix_batch < 1 or cfg.mix_pool < 1:
        raise ConfigError(f"--mix-batch-size and --mix-pool must be >= 1, got {cfg.mix_batch} and {cfg.mix_pool}")


class NoiseSampler:
    """Training noise, timesteps and the mixed-resolution draw of one run (its config checked up front)."""

    def __init__(self, cfg, schedule: NoiseSchedule):
        check_mixed_resolution(cfg)
        check_offset_noise(cfg)
        check_timestep_bias(cfg)
        self.schedule = schedule
        self.offset, self.grid = cfg.offset_noise, cfg.offset_noise_grid
        self.mix_prob = cfg.mix_prob if cfg.mix_size > 0 else 0.0
        self.t_weights = timestep_bias_weights(cfg, schedule.num_train_timesteps)

    def noise(self, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Training noise eps like ``x0`` (B, C, h, w): N(0, 1), plus offset * N(0, 1) per sample and channel when
        ``offset_noise`` > 0 (the same draw serves every task that trains on this data: v fine-tuning, distillation),
        and with ``offset_noise_grid`` G > 1 also offset * N(0, 1) on each coarser grid 2 x 2, 4 x 4, .. G x G,
        bilinearly upsampled (ramps between image halves, quarters, ..: multi-resolution offset noise)."""
        eps = torch.randn(x0.shape, device=x0.device, generator=generator)
        if self.offset > 0:
            B, C = x0.shape[:2]
            eps = eps + self.offset * torch.randn(B, C, 1, 1, device=x0.device, generator=generator)
            grid = 2
            while grid <= self.grid:
                coarse = torch.randn(B, C, grid, grid, device=x0.device, generator=generator)
                eps = eps + self.offset * F.interpolate(coarse, size=x0.shape[-2:], mode="bilinear",
                                                        align_corners=False)
                grid *= 2
        return eps

    def timesteps(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` training timesteps: uniform, or drawn by the timestep bias's weights."""
        if self.t_weights is None:  # the same draw as before the option existed
            return torch.randint(0, self.schedule.num_train_timesteps, (count,), device=generator.device,
                                 generator=generator)
        weights = self.t_weights.to(generator.device)
        return torch.multinomial(weights, count, replacement=True, generator=generator)

    def mixed_step(self, generator: torch.Generator) -> bool:
        """Whether this step trains at mix_size (drawn from the run's generator, so a resumed run draws the same)."""
        if not self.mix_prob:
            return False  # no draw: runs without mixing keep their random stream
        return torch.rand((), device=generator.device, generator=generator).item() < self.mix_prob
