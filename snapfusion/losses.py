"""Every training loss, each a small function returning per-sample values (B,) (STYLE habit 6).

Diffusion: eps / v MSE with Min-SNR-gamma, the v and hybrid weightings (one ``DiffusionLoss`` chosen at construction
from ``WEIGHTINGS``); autoencoder: KL and edge (sobel) terms; text tower: contrastive (CLIP); distillation: stage
feature MSE, L_ori, L_vani / L_cfg of step distillation and its rescaling (SnapFusion §4). Squared norms are means
over elements.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from snapfusion.distill.teacher import ddim_x_target, teacher_steps
from snapfusion.errors import ConfigError
from snapfusion.sampling import ModelFn, Prediction
from snapfusion.schedule import NoiseSchedule, expand_to, v_from_x0_eps


def mse_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference over all but the batch dimension, fp32: (B, ...) -> (B,)."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


# ---- the diffusion loss: eps or v target, Min-SNR / v / hybrid weighting ------------------------------------

def eps_mse_min_snr(pred: torch.Tensor, eps: torch.Tensor, snr: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample eps MSE with Min-SNR-gamma weights min(SNR, gamma) / SNR (Hang et al. 2023); gamma 0 = plain."""
    mse = (pred.float() - eps.float()).pow(2).flatten(1).mean(1)
    if gamma <= 0:
        return mse
    return mse * torch.clamp(snr, max=gamma) / snr


def v_mse_min_snr(pred: torch.Tensor, v: torch.Tensor, snr: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample v MSE with Min-SNR-gamma weights min(SNR, gamma) / (SNR + 1): the same x-space weighting as
    ``eps_mse_min_snr``, since ||v_hat - v||^2 = (SNR + 1) ||x_hat - x||^2 (Hang et al. 2023); gamma 0 = plain."""
    mse = (pred.float() - v.float()).pow(2).flatten(1).mean(1)
    if gamma <= 0:
        return mse
    return mse * torch.clamp(snr, max=gamma) / (snr + 1)


def v_weights(alpha: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Per-sample weights 1 / alpha_t^2 = 1 + 1 / SNR_t, divided by their mean over the schedule's timesteps (21.3 on
    SD's): the "v" weighting. On an eps MSE they give the plain v MSE (||v_hat - v||^2 = ||eps_hat - eps||^2 /
    alpha_t^2 for the v implied by an eps prediction), on a v MSE plain v MSE, at the loss's usual scale (gradient
    clipping stays as it was). Against Min-SNR eps weights the noisiest steps weigh up to ~10x more: an eps model's
    clean-latent estimate there is (z - sigma eps_hat) / alpha, its eps error times 1 / alpha = 15 at t = 999, and these
    steps choose the image's layout (docs/base_model.md)."""
    mean = (1.0 / schedule.alphas_cumprod.to(alpha.device)).mean()
    return 1.0 / (alpha.float() ** 2 * mean)


def hybrid_weights(alpha: torch.Tensor, schedule: NoiseSchedule, gamma: float) -> torch.Tensor:
    """Per-sample eps-error weights max(Min-SNR-gamma, v) / their mean over the schedule's timesteps: the "hybrid"
    weighting. Each sample takes the larger of its Min-SNR weight min(SNR, gamma) / SNR and its v weight
    (``v_weights``, mean 1), so the noisiest steps keep most of the v weighting's emphasis (6.6 against 10.1 at
    t = 999 on SD's schedule) while the middle steps keep most of Min-SNR's (0.65 against 1.09 at t = 500; the v
    weighting gives them 0.17). Shares of the total weight on SD's schedule, t >= 800 / t < 500: Min-SNR 0.22 / 0.45,
    v 0.81 / 0.04, hybrid 0.53 / 0.27 (docs/base_model.md)."""
    def raw(a: torch.Tensor) -> torch.Tensor:
        a2 = a.double() ** 2
        snr = a2 / (1 - a2).clamp(min=1e-12)
        return torch.maximum(torch.clamp(snr, max=gamma) / snr, v_weights(a, schedule).double())
    mean = raw(schedule.alphas_cumprod.double().sqrt()).mean()
    return (raw(alpha) / mean).float()


@dataclass(frozen=True)
class Weighting:
    """A loss weighting: Min-SNR-gamma inside the MSE (0: none), then ``eps_weights(alpha)`` (B,) on the eps-space
    error (None: none)."""

    gamma: float
    eps_weights: Callable[[torch.Tensor], torch.Tensor] | None = None


# name -> Weighting for (schedule, min_snr_gamma): the one place the --loss-weighting names are read
WEIGHTINGS: dict[str, Callable[[NoiseSchedule, float], Weighting]] = {
    "min-snr": lambda schedule, gamma: Weighting(gamma),
    "v": lambda schedule, gamma: Weighting(0.0, partial(v_weights, schedule=schedule)),  # min_snr_gamma unused
    "hybrid": lambda schedule, gamma: Weighting(0.0, partial(hybrid_weights, schedule=schedule, gamma=gamma)),
}
LOSS_WEIGHTINGS = tuple(WEIGHTINGS)


def _eps_target(schedule, x0, eps, t):
    return eps


def _same_scale(loss, alpha):
    return loss


def _v_to_eps_scale(loss, alpha):  # ||eps_hat - eps||^2 = alpha^2 ||v_hat - v||^2
    return loss * alpha.float() ** 2


# prediction type -> (target of (schedule, x0, eps, t), MSE with Min-SNR, per-sample scale of its error to eps space)
TARGETS = {
    "epsilon": (_eps_target, eps_mse_min_snr, _same_scale),
    "v_prediction": (lambda schedule, x0, eps, t: schedule.velocity(x0, eps, t), v_mse_min_snr, _v_to_eps_scale),
}
PREDICTION_TYPES = tuple(TARGETS)  # what the UNet stages train (and sampling.Denoiser converts)


class DiffusionLoss:
    """Per-sample diffusion loss of a UNet's raw prediction in its own parameterisation (eps or v), weighted by one
    of ``WEIGHTINGS``; both chosen once here, none per step."""

    def __init__(self, schedule: NoiseSchedule, prediction_type: str, weighting: str = "min-snr",
                 min_snr_gamma: float = 5.0):
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"--loss-weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}")
        if prediction_type not in TARGETS:
            raise ConfigError(f"the UNet stages train {' or '.join(PREDICTION_TYPES)} UNets; this one predicts "
                              f"{prediction_type}")
        self.schedule = schedule
        self.weighting = WEIGHTINGS[weighting](schedule, min_snr_gamma)
        self.target, self.mse, self.to_eps_scale = TARGETS[prediction_type]

    def __call__(self, pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.schedule.alpha_sigma(t)
        snr = (alpha / sigma) ** 2
        loss = self.mse(pred, self.target(self.schedule, x0, eps, t), snr, self.weighting.gamma)
        if self.weighting.eps_weights is not None:  # on the eps-space error, at the usual scale
            loss = self.to_eps_scale(loss, alpha) * self.weighting.eps_weights(alpha)
        return loss


# ---- the autoencoder and the text tower ---------------------------------------------------------------------

def sobel_l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample L1 between image gradients (edges stay sharp without a perceptual network)."""
    k = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=x.device, dtype=x.dtype)
    kernels = torch.stack([k, k.t()])[:, None].repeat(x.shape[1], 1, 1, 1)  # (2C, 1, 3, 3)
    gx = F.conv2d(x, kernels, groups=x.shape[1])
    gy = F.conv2d(y, kernels, groups=y.shape[1])
    return (gx - gy).abs().flatten(1).mean(1)


def kl_per_sample(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over latent elements, per sample."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP), per sample; a, b are L2-normalised (B, D)."""
    logits = logit_scale.exp().clamp(max=100) * a @ b.t()  # (B, B)
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target, reduction="none") +
                  F.cross_entropy(logits.t(), target, reduction="none"))


# ---- knowledge distillation and step distillation -----------------------------------------------------------

def feature_mse(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Per-sample (B,) sum over stages of the mean squared difference of the stage outputs (``UNet.forward``'s
    ``features``). Student and teacher must have the same stages with the same output shapes: evolution and the
    BK-SDM rule remove blocks, never stages, and keep every stage's width."""
    if len(student) != len(teacher):
        raise ConfigError(f"feature distillation: the student has {len(student)} stages, the teacher {len(teacher)}")
    total = 0.0
    for i, (s, t) in enumerate(zip(student, teacher)):
        if s.shape != t.shape:
            raise ConfigError(f"feature distillation: stage {i} outputs {tuple(s.shape[1:])} in the student but "
                              f"{tuple(t.shape[1:])} in the teacher")
        total = total + (s.float() - t.float()).pow(2).flatten(1).mean(1)
    return total


def velocity_of(pred: Prediction, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The v a prediction implies, v = alpha eps - sigma x0, for any prediction type; alpha, sigma (B,)."""
    return v_from_x0_eps(pred.x0, pred.eps, expand_to(alpha, pred.x0), expand_to(sigma, pred.x0))


def v_loss(pred: Prediction, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
           schedule: NoiseSchedule) -> torch.Tensor:
    """L_ori = ||v_hat - v||^2 per sample, v = alpha_t eps - sigma_t x0 (SnapFusion §4); (B,)."""
    alpha, sigma = schedule.alpha_sigma(t)
    return mse_per_sample(velocity_of(pred, alpha, sigma), schedule.velocity(x0, eps, t))


def truncated_snr_weight(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """max(alpha^2 / sigma^2, 1) (SnapFusion §4, 'truncated SNR' weighting of the x-space loss); (B,)."""
    return torch.clamp((alpha / sigma) ** 2, min=1.0)


def distill_loss(student: ModelFn, teacher: ModelFn, z: torch.Tensor, levels: tuple[torch.Tensor, ...],
                 schedule: NoiseSchedule) -> torch.Tensor:
    """One student DDIM step t -> t_end against the teacher's steps through ``levels`` (t, ..., t_end), (B,) each:
    two in SnapFusion §4 (t -> t' -> t''), L_vani; (B,).

    Pass guided model functions (sampling.guided with a per-sample scale w) for L_cfg: the student and the teacher
    are then both guided with the same w, and the student has no w input.
    """
    t, t_end = levels[0], levels[-1]
    z_end = teacher_steps(teacher, z, levels, schedule)  # (B, C, H, W) fp32, no grad
    alpha, sigma = schedule.alpha_sigma(t)  # (B,) each
    alpha_end, sigma_end = schedule.alpha_sigma(t_end)
    x_target = ddim_x_target(z.float(), z_end, *(expand_to(c, z) for c in (alpha, sigma, alpha_end, sigma_end)))
    x_student = student(z, t).x0  # (B, C, H, W) fp32, with grad
    return truncated_snr_weight(alpha, sigma) * mse_per_sample(x_student, x_target)


def guidance_scales(batch: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """Per-sample guidance scales w ~ U[low, high] (SnapFusion §4: U[2, 14]); (B,) on the generator's device."""
    u = torch.rand((batch,), device=generator.device, generator=generator)
    return low + (high - low) * u


def rescaled(l_ref: torch.Tensor, l_aux: torch.Tensor, weight: float) -> torch.Tensor:
    """weight * r * l_aux per sample, r = stopgrad(mean l_ref / mean l_aux) (SnapFusion §4's rescaling of L_ori).

    r puts the batch's auxiliary loss on l_ref's scale, so ``weight`` is its weight relative to l_ref whatever their
    magnitudes (L_dstl shrinks by orders of magnitude over the steps; L_ori does not).
    """
    ratio = l_ref.detach().mean() / l_aux.detach().mean().clamp(min=1e-12)
    return weight * ratio * l_aux


def with_rescaled_ori(l_dstl: torch.Tensor, l_ori: torch.Tensor, gamma: float) -> torch.Tensor:
    """L_dstl + gamma * r * L_ori per sample, r = stopgrad(mean L_dstl / mean L_ori) (SnapFusion §4 rescaling)."""
    return l_dstl + rescaled(l_dstl, l_ori, gamma)
