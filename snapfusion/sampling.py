"""The parameterisation wrapper, the guidance mix, the DDIM step and the samplers built on them.

Three layers (STYLE habit 1): a network maps (z, t, context) -> raw prediction (eps or v); a ``Denoiser`` owns
the network, the ``NoiseSchedule`` and the prediction type and returns a ``Prediction`` (x0, eps) in fp32;
samplers are pure functions of (model_fn, z, timesteps, schedule) where model_fn(z, t) -> Prediction.
The guidance mix and the DDIM step are written once here (habit 2) and reused by step distillation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from snapfusion.errors import ConfigError
from snapfusion.schedule import (NoiseSchedule, eps_from_v, eps_from_x0, expand_to, log_snr, x0_from_eps,
                                 x0_from_v)

PredictionType = Literal["epsilon", "v_prediction"]
Network = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]  # (z, t, context) -> raw
StepCallback = Callable[[int, int, torch.Tensor], None]  # (step index, timestep, z after the step)
Scale = float | torch.Tensor | None  # a guidance scale: a scalar or one per sample (B,)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """A denoiser's estimate of the clean latent and of the noise, both fp32 and shaped like z."""

    x0: torch.Tensor  # (B, C, H, W)
    eps: torch.Tensor  # (B, C, H, W)


ModelFn = Callable[[torch.Tensor, torch.Tensor], Prediction]  # (z (B, ...), t (B,)) -> Prediction
StepFns = ModelFn | Sequence[ModelFn]  # one model function for every step, or one per step


class Denoiser:
    """Wraps a network predicting eps or v; converts its raw output to a fp32 ``Prediction`` (SnapFusion §4)."""

    def __init__(self, network: Network, schedule: NoiseSchedule, prediction_type: PredictionType = "epsilon",
                 *, input_dtype: torch.dtype | None = None):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"prediction_type {prediction_type!r} is not one of ['epsilon', 'v_prediction']")
        self.network = network  # any callable (z, t, context) -> raw prediction; may run in fp16
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.input_dtype = input_dtype  # dtype z and context are cast to before the network; None: unchanged

    def raw(self, z: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """The network's raw output (eps or v), cast up to fp32."""
        if self.input_dtype is not None:
            z = z.to(self.input_dtype)
            context = context.to(self.input_dtype) if context is not None else None
        return self.network(z, t, context).float()

    def to_prediction(self, raw: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> Prediction:
        """Convert a fp32 raw output at (z, t) to (x0, eps)."""
        alpha, sigma = self.schedule.alpha_sigma(t)
        alpha, sigma, z, raw = expand_to(alpha, z), expand_to(sigma, z), z.float(), raw.float()
        if self.prediction_type == "epsilon":
            return Prediction(x0=x0_from_eps(z, raw, alpha, sigma), eps=raw)
        return Prediction(x0=x0_from_v(z, raw, alpha, sigma), eps=eps_from_v(z, raw, alpha, sigma))

    def __call__(self, z: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> Prediction:
        """Run the network once and convert: (z (B, ...), t (B,), context) -> Prediction."""
        return self.to_prediction(self.raw(z, t, context), z, t)


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, scale: float | torch.Tensor,
            rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance uncond + w (cond - uncond) = w cond - (w - 1) uncond (SnapFusion §4); w: () or (B,).
    ``rescale`` > 0 then applies ``rescale_guidance`` to the mix."""
    mixed = uncond + expand_to(scale, cond) * (cond - uncond)
    return rescale_guidance(mixed, cond, rescale) if rescale else mixed


def rescale_guidance(mixed: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", eqs. 15-16):
    scale each sample of the guided output to the standard deviation of the conditional output, then blend,
    phi * rescaled + (1 - phi) * mixed. Large w inflates the guided output's spread (over-exposed, over-saturated
    images); phi in [0, 1], 0 is plain guidance. The standard deviations are per sample over (C, H, W)."""
    dims = tuple(range(1, cond.ndim))
    rescaled = mixed * (cond.std(dim=dims, keepdim=True) / mixed.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * mixed


def guided(denoiser: Denoiser, cond: torch.Tensor | None, uncond: torch.Tensor | None = None,
           scale: Scale = None, rescale: float = 0.0) -> ModelFn:
    """A model function mixing cond and uncond raw outputs in one 2B batch; scale None or 1.0 skips uncond.
    ``rescale``: the guidance rescale phi of ``rescale_guidance`` (0: plain guidance)."""
    if scale is None or (not isinstance(scale, torch.Tensor) and scale == 1.0):
        return lambda z, t: denoiser(z, t, cond)
    if uncond is None or cond is None:
        raise ConfigError(f"guidance scale {scale} needs both a cond and an uncond context")

    def model_fn(z: torch.Tensor, t: torch.Tensor) -> Prediction:
        B = z.shape[0]
        context = torch.cat([cond, uncond.expand(B, *uncond.shape[1:])])  # (2B, L, D)
        raw = denoiser.raw(torch.cat([z, z]), torch.cat([t, t]), context)  # (2B, C, H, W)
        raw_cond, raw_uncond = raw.chunk(2)
        w = scale.to(raw.device) if isinstance(scale, torch.Tensor) else scale
        return denoiser.to_prediction(cfg_mix(raw_cond, raw_uncond, w, rescale), z, t)

    return model_fn


def guidance_steps(steps: int, interval: tuple[float, float]) -> list[bool]:
    """Which of ``steps`` sampling steps mix guidance: step i (0-based) iff start <= i / steps < end.

    Guidance in a limited interval (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval Improves
    Sample and Distribution Quality in Diffusion Models"; diffusers' "dynamic classifier-free guidance" callback
    drops it after a fraction of the steps): a step outside the interval runs the conditional pass alone, one
    batch-B UNet call instead of the 2B of a guided step. (0, 1) guides every step."""
    start, end = interval
    return [start <= i / steps < end for i in range(steps)]


def with_guidance_interval(guided_fn: ModelFn, plain_fn: ModelFn, steps: int,
                           interval: tuple[float, float]) -> StepFns:
    """The samplers' model functions for ``steps`` steps: ``guided_fn`` at the steps ``guidance_steps`` picks,
    ``plain_fn`` (the conditional prediction alone) at the others; ``guided_fn`` itself when it guides every step."""
    on = guidance_steps(steps, interval)
    return guided_fn if all(on) else [guided_fn if g else plain_fn for g in on]


def _step_fn(model_fn: StepFns, i: int, steps: int) -> ModelFn:
    # the sampler's model function at step i: the one function, or the i-th of one per step
    if callable(model_fn):
        return model_fn
    if len(model_fn) != steps:
        raise ConfigError(f"got {len(model_fn)} model functions for {steps} steps")
    return model_fn[i]


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_next, sigma_next, *, noise: torch.Tensor | None = None,
              noise_std=0.0) -> torch.Tensor:
    """DDIM eq. 12: z_next = alpha_next x0 + sqrt(sigma_next^2 - s^2) eps + s noise; s = 0 is deterministic."""
    alpha_next, sigma_next = expand_to(alpha_next, x0), expand_to(sigma_next, x0)
    if noise is None:
        return alpha_next * x0 + sigma_next * eps
    noise_std = expand_to(noise_std, x0)
    direction = torch.as_tensor(sigma_next**2 - noise_std**2).clamp(min=0.0).sqrt()  # "direction pointing to x_t"
    return alpha_next * x0 + direction * eps + noise_std * noise


def ddim_noise_std(alpha, sigma, alpha_next, sigma_next, eta: float):
    """DDIM eq. 16: s = eta * (sigma_next / sigma) * sqrt(1 - alpha^2 / alpha_next^2); eta = 1 is DDPM."""
    return eta * (sigma_next / sigma) * torch.as_tensor(1.0 - (alpha / alpha_next) ** 2).clamp(min=0.0).sqrt()


@torch.no_grad()
def sample_ddim(model_fn: StepFns, z: torch.Tensor, timesteps: torch.Tensor, schedule: NoiseSchedule, *,
                eta: float = 0.0, generator: torch.Generator | Sequence[torch.Generator] | None = None,
                callback: StepCallback | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021) over timesteps (n + 1,): the model runs at the first n, the last is the target.
    ``model_fn``: one model function, or n of them, one per step (``with_guidance_interval``)."""
    if eta > 0 and generator is None:
        raise ConfigError(f"DDIM with eta={eta} needs a torch.Generator for its noise")
    z, timesteps = z.float(), timesteps.to(z.device)
    alphas, sigmas = schedule.alpha_sigma(timesteps)  # (n + 1,) each
    n = len(timesteps) - 1
    for i in range(n):
        t = timesteps[i].expand(z.shape[0])  # (B,)
        pred = _step_fn(model_fn, i, n)(z, t)
        if eta > 0:
            std = ddim_noise_std(alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1], eta)
            z = ddim_step(pred.x0, pred.eps, alphas[i + 1], sigmas[i + 1], noise=_randn_like(z, generator),
                          noise_std=std)
        else:
            z = ddim_step(pred.x0, pred.eps, alphas[i + 1], sigmas[i + 1])
        if callback is not None:
            callback(i, int(timesteps[i]), z)
    return z


@torch.no_grad()
def sample_dpmpp_2m(model_fn: StepFns, z: torch.Tensor, timesteps: torch.Tensor, schedule: NoiseSchedule, *,
                    lower_order_final: bool = True, callback: StepCallback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2, midpoint form) over timesteps (n + 1,), in x0 space.

    The second-order update is a DDIM step from the extrapolated x0 estimate D = x0 + h / (2 h_prev) (x0 -
    x0_prev); like diffusers, the first step, a step to sigma = 0 and (lower_order_final, n < 15) the last step
    are first order, i.e. plain DDIM. ``model_fn``: one model function, or n of them, one per step.
    """
    z, timesteps = z.float(), timesteps.to(z.device)
    alphas, sigmas = schedule.alpha_sigma(timesteps)  # (n + 1,) each
    lambdas = log_snr(alphas, sigmas)  # (n + 1,), +inf at the CLEAN level
    n = len(timesteps) - 1
    x0_prev = None
    for i in range(n):
        t = timesteps[i].expand(z.shape[0])  # (B,)
        pred = _step_fn(model_fn, i, n)(z, t)
        first_order = (x0_prev is None or sigmas[i + 1] == 0 or (lower_order_final and n < 15 and i == n - 1))
        if first_order:
            z_next = ddim_step(pred.x0, pred.eps, alphas[i + 1], sigmas[i + 1])
        else:
            ratio = (lambdas[i + 1] - lambdas[i]) / (2 * (lambdas[i] - lambdas[i - 1]))  # 1 / (2 r_0)
            x0 = pred.x0 + ratio * (pred.x0 - x0_prev)
            z_next = ddim_step(x0, eps_from_x0(z, x0, alphas[i], sigmas[i]), alphas[i + 1], sigmas[i + 1])
        x0_prev, z = pred.x0, z_next
        if callback is not None:
            callback(i, int(timesteps[i]), z)
    return z


def _randn_like(z: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator]) -> torch.Tensor:
    # one generator: one draw of z's shape on the generator's device; a sequence: one draw per image
    if isinstance(generator, torch.Generator):
        return torch.randn(z.shape, generator=generator, device=generator.device).to(z.device)
    if len(generator) != z.shape[0]:
        raise ConfigError(f"got {len(generator)} generators for a batch of {z.shape[0]}")
    return torch.stack([torch.randn(z.shape[1:], generator=g, device=g.device).to(z.device) for g in generator])


def initial_noise(shape_per_image: Sequence[int], seeds: Sequence[int], device: torch.device | str,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Starting latents (B, *shape): image i is drawn from its own CPU torch.Generator(seed_i) (STYLE habit 7)."""
    draws = [torch.randn(tuple(shape_per_image), generator=torch.Generator("cpu").manual_seed(int(s)))
             for s in seeds]
    return torch.stack(draws).to(device=device, dtype=dtype)
