"""Output- and feature-level knowledge distillation from a frozen UNet teacher (BK-SDM), added to a UNet stage's
loss: train-unet / robust-train (eps or v students) and finetune-v share it."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from snapfusion.errors import ConfigError
from snapfusion.losses import PREDICTION_TYPES, eps_mse_min_snr, feature_mse
from snapfusion.models.unet import UNet
from snapfusion.models.unet_config import stage_widths
from snapfusion.sampling import Denoiser
from snapfusion.schedule import NoiseSchedule

def load_kd_teacher(cfg, context_dim: int) -> UNet:
    """The frozen teacher (eps or v) of output-level distillation; it must read the run's latents and text context."""
    if not (math.isfinite(cfg.kd_weight) and cfg.kd_weight > 0):
        raise ConfigError(f"--kd-weight must be a finite number > 0, got {cfg.kd_weight}")
    if not (math.isfinite(cfg.kd_feature_weight) and cfg.kd_feature_weight >= 0):
        raise ConfigError(f"--kd-feature-weight must be a finite number >= 0, got {cfg.kd_feature_weight}")
    if not (Path(cfg.kd_unet) / "config.json").is_file():
        raise ConfigError(f"--kd-unet: no UNet folder at {cfg.kd_unet}")
    teacher = UNet.load(cfg.kd_unet, dtype=torch.float32).eval().requires_grad_(False)
    got, want = teacher.config, cfg.model
    if got.prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"--kd-unet {cfg.kd_unet}: the teacher must predict {' or '.join(PREDICTION_TYPES)}, it "
                          f"predicts {got.prediction_type}")
    if (got.in_channels, got.out_channels, got.context_dim) != (want.in_channels, want.out_channels, context_dim):
        raise ConfigError(f"--kd-unet {cfg.kd_unet}: channels in/out and context width "
                          f"{(got.in_channels, got.out_channels, got.context_dim)} do not match the run's "
                          f"{(want.in_channels, want.out_channels, context_dim)}")
    if cfg.kd_feature_weight > 0 and stage_widths(got) != stage_widths(want):
        raise ConfigError(f"--kd-feature-weight: the teacher's stage widths {stage_widths(got)} differ from the "
                          f"student's {stage_widths(want)} (feature distillation compares stage outputs)")
    return teacher


class Distillation:
    """kd_weight x the Min-SNR eps MSE of the student's (implied) eps to the frozen teacher's (implied) eps on the
    same input, plus kd_feature_weight x the MSE of their stage outputs (a ``UNetTaskConfig``'s kd_* fields)."""

    def __init__(self, cfg, context_dim: int, schedule: NoiseSchedule):
        self.teacher = load_kd_teacher(cfg, context_dim)
        self.schedule = schedule
        self.weight, self.feature_weight, self.gamma = cfg.kd_weight, cfg.kd_feature_weight, cfg.min_snr_gamma

    @property
    def wants_features(self) -> bool:
        """Whether the student's stage outputs are needed (feature distillation on)."""
        return self.feature_weight > 0

    def __call__(self, loss: torch.Tensor, pred_eps: torch.Tensor, z: torch.Tensor, t: torch.Tensor,
                 context: torch.Tensor, student_features: list[torch.Tensor] | None) -> tuple[torch.Tensor, dict]:
        """``loss`` (B,) plus the distillation terms on the student's input (z, t, context); the feature term when
        ``student_features`` holds the student's stage outputs."""
        alpha, sigma = self.schedule.alpha_sigma(t)
        snr = (alpha / sigma) ** 2
        teacher_features: list[torch.Tensor] | None = [] if student_features is not None else None
        with torch.no_grad():  # under the loop's autocast, as the student: the target costs a mixed-precision pass
            raw = self.teacher.to(z.device)(z, t, context, features=teacher_features)
        target = Denoiser(self.teacher, self.schedule, self.teacher.config.prediction_type).to_prediction(raw, z, t).eps
        kd = eps_mse_min_snr(pred_eps, target, snr, self.gamma)
        loss, logs = loss + self.weight * kd, {"kd": kd.detach().mean()}
        if student_features is not None:
            feat = feature_mse(student_features, teacher_features)
            loss, logs = loss + self.feature_weight * feat, {**logs, "kd_feat": feat.detach().mean()}
        return loss, logs
