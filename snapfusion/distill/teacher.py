"""The two-step DDIM teacher of direct step distillation and the x-space target it gives the student (SnapFusion §4).

Grids (docs/step_distillation.md): the student walks ``ddim_timesteps(n, "trailing")`` and the teacher
``ddim_timesteps(2n, "trailing")``; trailing spacing makes the student's grid the teacher's every other entry (for
every n < 48; for 17 larger n, rounding moves one level by 1 and the student's level is kept), so student step k
(t_k -> t_{k+1}) is covered exactly by teacher steps 2k and 2k+1 (t_k -> t' -> t_{k+1}). Both end at t = 0
(alphabar_0), as the pipeline's DDIM does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from snapfusion.errors import ConfigError
from snapfusion.sampling import ModelFn, ddim_step
from snapfusion.schedule import NoiseSchedule, ddim_timesteps


@dataclass(frozen=True)
class StepGrid:
    """Nested DDIM grids: ``student`` (n + 1,) is ``teacher`` (2n + 1,) at even indices; both int64."""

    student: torch.Tensor  # (n + 1,) t_0 > t_1 > ... > t_n = 0
    teacher: torch.Tensor  # (2n + 1,) the student's levels with a midpoint between each pair

    @property
    def student_steps(self) -> int:
        return len(self.student) - 1

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample (t, t', t'') (B,) each: a uniformly drawn student step k and its two teacher steps."""
        device = generator.device
        k = torch.randint(0, self.student_steps, (batch,), device=device, generator=generator)  # (B,)
        teacher = self.teacher.to(device)
        return teacher[2 * k], teacher[2 * k + 1], teacher[2 * k + 2]


def step_grid(student_steps: int, num_train_timesteps: int = 1000) -> StepGrid:
    """The student's n-step trailing DDIM grid and the teacher's 2n-step one, its midpoints from trailing 2n."""
    if isinstance(student_steps, bool) or not isinstance(student_steps, int) or student_steps < 1:
        raise ConfigError(f"student steps must be a positive integer, got {student_steps!r}")
    if 2 * student_steps > num_train_timesteps:
        raise ConfigError(f"a {student_steps}-step student needs a {2 * student_steps}-step teacher, more than the "
                          f"{num_train_timesteps} training timesteps")
    student = ddim_timesteps(student_steps, "trailing", steps_offset=0, num_train_timesteps=num_train_timesteps)
    double = ddim_timesteps(2 * student_steps, "trailing", steps_offset=0, num_train_timesteps=num_train_timesteps)
    teacher = double.clone()
    teacher[::2] = student  # equal already for n < 48; for 17 larger n (48, 96, ...) rounding moves a level by 1
    if not bool((teacher[1:] < teacher[:-1]).all()):
        raise ConfigError(f"the {student_steps}-step trailing grid has no midpoint between its levels: "
                          f"{teacher.tolist()}")
    return StepGrid(student=student, teacher=teacher)


@torch.no_grad()
def teacher_two_steps(model_fn: ModelFn, z: torch.Tensor, t: torch.Tensor, t_mid: torch.Tensor,
                      t_end: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Two deterministic DDIM steps z_t -> z_t' -> z_t'' (SnapFusion §4) with per-sample timesteps (B,); fp32."""
    z = z.float()
    for t_from, t_to in ((t, t_mid), (t_mid, t_end)):
        pred = model_fn(z, t_from)  # guided or not: the caller's model_fn decides
        alpha_to, sigma_to = schedule.alpha_sigma(t_to)  # (B,) each
        z = ddim_step(pred.x0, pred.eps, alpha_to, sigma_to)  # (B, C, H, W)
    return z


def ddim_x_target(z: torch.Tensor, z_end: torch.Tensor, alpha, sigma, alpha_end, sigma_end) -> torch.Tensor:
    """The x0 with which one DDIM step from z (level alpha, sigma) lands on z_end (SnapFusion §4 target).

    x_target = (z'' - (sigma''/sigma) z) / (alpha'' - (sigma''/sigma) alpha); alpha, sigma broadcast against z.
    """
    ratio = sigma_end / sigma
    return (z_end - ratio * z) / (alpha_end - ratio * alpha)
