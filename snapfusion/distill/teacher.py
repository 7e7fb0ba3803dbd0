"""The multi-step DDIM teacher of direct step distillation and the x-space target it gives the student (SnapFusion §4).

Grids (docs/step_distillation.md): the student walks ``ddim_timesteps(n, "trailing")`` and the teacher
``ddim_timesteps(r n, "trailing")``, r = 2 in the paper (16 -> 8); trailing spacing makes the student's grid every r-th
entry of the teacher's (for r = 2: every n < 48; elsewhere rounding may move a level by 1 and the student's level is
kept), so student step k (t_k -> t_{k+1}) is covered exactly by teacher steps rk ... rk + r - 1. Both end at t = 0
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
    """Nested DDIM grids: ``student`` (n + 1,) is ``teacher`` (r n + 1,) at every r-th index; both int64."""

    student: torch.Tensor  # (n + 1,) t_0 > t_1 > ... > t_n = 0
    teacher: torch.Tensor  # (r n + 1,) the student's levels with r - 1 teacher levels between each pair

    @property
    def student_steps(self) -> int:
        return len(self.student) - 1

    @property
    def ratio(self) -> int:
        """r: teacher steps per student step."""
        return (len(self.teacher) - 1) // self.student_steps

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Per-sample levels (t, ..., t_end), r + 1 tensors (B,) each: a uniformly drawn student step k and the
        levels of its r teacher steps (r = 2: (t, t', t''))."""
        device = generator.device
        k = torch.randint(0, self.student_steps, (batch,), device=device, generator=generator)  # (B,)
        teacher, r = self.teacher.to(device), self.ratio
        return tuple(teacher[r * k + j] for j in range(r + 1))


def step_grid(student_steps: int, num_train_timesteps: int = 1000, ratio: int = 2) -> StepGrid:
    """The student's n-step trailing DDIM grid and the teacher's r n-step one (r = ``ratio``, 2 in the paper), its
    in-between levels from trailing r n. r = 1: the teacher walks the student's own grid, one teacher step per
    student step (a guided student as the teacher of its guidance-embedded copy, Meng et al. 2023's first stage)."""
    if isinstance(student_steps, bool) or not isinstance(student_steps, int) or student_steps < 1:
        raise ConfigError(f"student steps must be a positive integer, got {student_steps!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ConfigError(f"the teacher's steps per student step must be an integer >= 1, got {ratio!r}")
    if ratio * student_steps > num_train_timesteps:
        raise ConfigError(f"a {student_steps}-step student needs a {ratio * student_steps}-step teacher, more than the "
                          f"{num_train_timesteps} training timesteps")
    student = ddim_timesteps(student_steps, "trailing", steps_offset=0, num_train_timesteps=num_train_timesteps)
    teacher = ddim_timesteps(ratio * student_steps, "trailing", steps_offset=0,
                             num_train_timesteps=num_train_timesteps).clone()
    teacher[::ratio] = student  # equal already for r = 2 and n < 48; elsewhere rounding may move a level by 1
    if not bool((teacher[1:] < teacher[:-1]).all()):
        raise ConfigError(f"a {student_steps}-step student has no room for {ratio} teacher steps per step: the "
                          f"{ratio * student_steps}-step trailing grid repeats a level")
    return StepGrid(student=student, teacher=teacher)


@torch.no_grad()
def teacher_steps(model_fn: ModelFn, z: torch.Tensor, levels: tuple[torch.Tensor, ...],
                  schedule: NoiseSchedule) -> torch.Tensor:
    """Deterministic DDIM steps z_t -> ... -> z_t_end through ``levels`` (t, ..., t_end), per-sample timesteps (B,)
    each (SnapFusion §4: two steps, t -> t' -> t''); fp32."""
    z = z.float()
    for t_from, t_to in zip(levels[:-1], levels[1:]):
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
