"""Losses of v-prediction fine-tuning and step distillation, each returning per-sample values (STYLE habit 6).

SnapFusion §4: L_ori = ||v_hat - v||^2; L_vani = max(alpha_t^2 / sigma_t^2, 1) ||x_hat_student - x_target||^2;
L_cfg is L_vani with every v_hat (teacher and student) guided, w ~ U[2, 14] per sample; total
L = L_dstl + gamma * L_ori, with L_ori rescaled to L_dstl's scale. Squared norms are means over elements.
"""

from __future__ import annotations

import torch

from snapfusion.distill.teacher import ddim_x_target, teacher_two_steps
from snapfusion.sampling import ModelFn, Prediction
from snapfusion.schedule import NoiseSchedule, expand_to, v_from_x0_eps


def mse_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference over all but the batch dimension, fp32: (B, ...) -> (B,)."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


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


def distill_loss(student: ModelFn, teacher: ModelFn, z: torch.Tensor, t: torch.Tensor, t_mid: torch.Tensor,
                 t_end: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """One student DDIM step t -> t'' against two teacher steps t -> t' -> t'' (SnapFusion §4, L_vani); (B,).

    Pass guided model functions (sampling.guided with a per-sample scale w) for L_cfg: the student and the teacher
    are then both guided with the same w, and the student has no w input.
    """
    z_end = teacher_two_steps(teacher, z, t, t_mid, t_end, schedule)  # (B, C, H, W) fp32, no grad
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
