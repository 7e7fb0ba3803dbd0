"""The discrete-time VP noise schedule of SD-v1.5, the eps/x0/v conversions, and timestep selection.

Notation (SnapFusion §4, DDIM eq. 4): z_t = alpha_t * x0 + sigma_t * eps with alpha_t = sqrt(alphabar_t) and
sigma_t = sqrt(1 - alphabar_t); the velocity is v = alpha_t * eps - sigma_t * x0. A sampler walks a timestep list
of length n + 1: the network runs at the first n entries and the last one is only the final target level, where
``CLEAN`` (-1) means alpha = 1, sigma = 0 (like the trailing sigma = 0 of k-diffusion).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import torch

from snapfusion.errors import ConfigError

CLEAN = -1  # pseudo-timestep of the noise-free level: alpha = 1, sigma = 0

Spacing = Literal["leading", "trailing", "linspace"]


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Training noise schedule; the defaults are SD-v1.5's scaled-linear betas."""

    num_train_timesteps: int = 1000  # T: timesteps 0 .. T-1
    beta_start: float = 0.00085  # beta at t = 0
    beta_end: float = 0.012  # beta at t = T-1
    beta_schedule: Literal["scaled_linear", "linear"] = "scaled_linear"  # scaled_linear: linear in sqrt(beta)

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 2:
            raise ConfigError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ConfigError(f"need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if self.beta_schedule not in ("scaled_linear", "linear"):
            raise ConfigError(f"beta_schedule {self.beta_schedule!r} is not one of ['scaled_linear', 'linear']")


def expand_to(coef: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor | float:
    """Reshape a per-sample coefficient (B,) to (B, 1, ..., 1) so it broadcasts against x; scalars pass through."""
    if isinstance(coef, torch.Tensor) and coef.ndim == 1:
        return coef.reshape(-1, *([1] * (x.ndim - 1)))
    return coef


class NoiseSchedule:
    """alphabar_t for the integer timesteps 0 .. T-1, computed in float64 and exposed in float32."""

    def __init__(self, config: ScheduleConfig = ScheduleConfig()):
        self.config = config
        T = config.num_train_timesteps
        if config.beta_schedule == "scaled_linear":  # LDM / SD: linear in sqrt(beta)
            betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float64) ** 2
        else:
            betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # (T,) float64
        self.alphas_cumprod = alphas_cumprod.float()  # (T,)
        # the CLEAN level sits at index T (t = -1 is remapped there): alpha = 1, sigma = 0
        self._alpha = torch.cat([alphas_cumprod.sqrt(), torch.ones(1, dtype=torch.float64)]).float()  # (T+1,)
        self._sigma = torch.cat([(1.0 - alphas_cumprod).sqrt(), torch.zeros(1, dtype=torch.float64)]).float()

    @property
    def num_train_timesteps(self) -> int:
        """T, the number of training timesteps."""
        return self.config.num_train_timesteps

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) in fp32 on t's device for integer timesteps t of any shape; t = CLEAN gives (1, 0)."""
        index = torch.where(t == CLEAN, self.num_train_timesteps, t).long()
        return self._alpha.to(t.device)[index], self._sigma.to(t.device)[index]

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward process z_t = alpha_t x0 + sigma_t eps for per-sample timesteps t (B,)."""
        alpha, sigma = self.alpha_sigma(t)
        return expand_to(alpha, x0) * x0.float() + expand_to(sigma, x0) * eps.float()

    def velocity(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v-prediction target v = alpha_t eps - sigma_t x0 (SnapFusion §4) for timesteps t (B,)."""
        alpha, sigma = self.alpha_sigma(t)
        return v_from_x0_eps(x0.float(), eps.float(), expand_to(alpha, x0), expand_to(sigma, x0))


# ---- exact conversions between the parameterisations, given z_t, alpha_t, sigma_t (all fp32) ----
# alpha, sigma: floats, 0-d tensors or tensors already broadcastable to z (see expand_to).

def x0_from_eps(z: torch.Tensor, eps: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """x0 = (z - sigma eps) / alpha (DDIM eq. 12, 'predicted x0')."""
    return (z - sigma * eps) / alpha


def eps_from_x0(z: torch.Tensor, x0: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """eps = (z - alpha x0) / sigma; undefined at the CLEAN level (sigma = 0)."""
    return (z - alpha * x0) / sigma


def v_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """v = alpha eps - sigma x0 (Salimans & Ho 2022; SnapFusion §4)."""
    return alpha * eps - sigma * x0


def x0_from_v(z: torch.Tensor, v: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """x0 = alpha z - sigma v (uses alpha^2 + sigma^2 = 1; SnapFusion §4 teacher step)."""
    return alpha * z - sigma * v


def eps_from_v(z: torch.Tensor, v: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """eps = sigma z + alpha v (uses alpha^2 + sigma^2 = 1; SnapFusion §4 teacher step)."""
    return sigma * z + alpha * v


# ---- timestep selection, following diffusers 0.42's DDIMScheduler / DPMSolverMultistepScheduler ----

def ddim_timesteps(num_steps: int, spacing: Spacing = "leading", *, steps_offset: int = 1,
                   set_alpha_to_one: bool = False, num_train_timesteps: int = 1000) -> torch.Tensor:
    """DDIM timesteps (n + 1,) int64, high to low; defaults are SD-v1.5's (leading, offset 1, final alphabar_0)."""
    T, n = num_train_timesteps, _check_steps(num_steps, num_train_timesteps)
    if spacing == "leading":  # multiples of T // n, shifted by steps_offset
        ts = np.arange(n)[::-1] * (T // n) + steps_offset
    elif spacing == "trailing":  # counted down from T, so the first step is at T - 1
        ts = _trailing(n, T)
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1]
    else:
        raise ConfigError(f"timestep spacing {spacing!r} is not one of ['leading', 'trailing', 'linspace']")
    final = CLEAN if set_alpha_to_one else 0  # diffusers' final_alpha_cumprod: 1 or alphabar_0
    return _with_final(ts, final, T, spacing)


def dpm_timesteps(num_steps: int, spacing: Spacing = "linspace", *, steps_offset: int = 0,
                  final_sigma_zero: bool = True, num_train_timesteps: int = 1000) -> torch.Tensor:
    """DPM-Solver multistep timesteps (n + 1,) int64; defaults are diffusers' (linspace, final sigma 0)."""
    T, n = num_train_timesteps, _check_steps(num_steps, num_train_timesteps)
    if spacing == "leading":  # n + 1 multiples of T // (n + 1), dropping the 0
        ts = np.arange(1, n + 1)[::-1] * (T // (n + 1)) + steps_offset
    elif spacing == "trailing":
        ts = _trailing(n, T)
    elif spacing == "linspace":  # n + 1 points on [0, T-1], dropping the 0
        ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
    else:
        raise ConfigError(f"timestep spacing {spacing!r} is not one of ['leading', 'trailing', 'linspace']")
    final = CLEAN if final_sigma_zero else 0  # diffusers' final_sigmas_type: "zero" or "sigma_min"
    return _with_final(ts, final, T, spacing)


def _check_steps(num_steps: int, T: int) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= T:
        raise ConfigError(f"number of sampling steps must be an integer in [1, {T}], got {num_steps!r}")
    return num_steps


def _trailing(n: int, T: int) -> np.ndarray:
    # diffusers' np.arange(T, 0, -T / n) yields n + 1 values, the last -1, for 62 step counts (61, 103, ...)
    # through float rounding of its length; keep exactly the first n (same float steps, same .5 roundings)
    return np.round(np.arange(T, 0, -T / n)[:n]).astype(np.int64) - 1


def _with_final(ts: np.ndarray, final: int, T: int, spacing: str) -> torch.Tensor:
    ts = torch.from_numpy(np.ascontiguousarray(ts).astype(np.int64))
    if ts.min() < 0 or ts.max() >= T:
        raise ConfigError(f"{spacing} spacing gives timesteps outside [0, {T - 1}] for {len(ts)} steps: "
                          f"{ts.min().item()} .. {ts.max().item()} (lower steps_offset or the step count)")
    if len(ts) > 1 and not bool((ts[1:] < ts[:-1]).all()):
        raise ConfigError(f"{spacing} spacing repeats timesteps for {len(ts)} steps (use fewer steps or 'trailing')")
    return torch.cat([ts, torch.tensor([final])])


def log_snr(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha / sigma), the half log-SNR of DPM-Solver; +inf at the CLEAN level."""
    return torch.log(alpha) - torch.log(sigma)
