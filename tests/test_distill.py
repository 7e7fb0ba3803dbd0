"""Step distillation math: nested grids, the two-step teacher, the x-space target, the losses (SnapFusion §4)."""

import dataclasses

import pytest
import torch

from snapfusion.losses import distill_loss, guidance_scales, truncated_snr_weight, v_loss, with_rescaled_ori
from snapfusion.distill.teacher import ddim_x_target, step_grid, teacher_steps
from snapfusion.errors import ConfigError
from snapfusion.models.unet import UNet
from snapfusion.models.unet_config import tiny_sd15
from snapfusion.sampling import Denoiser, guided, sample_ddim
from snapfusion.schedule import NoiseSchedule, ddim_timesteps, eps_from_x0, expand_to, x0_from_v

SCHEDULE = NoiseSchedule()


@pytest.fixture(scope="module")
def nets():
    """A tiny random v-prediction teacher and a differently initialised student, plus contexts."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_sd15(), prediction_type="v_prediction")
    teacher, student = UNet(cfg).eval().requires_grad_(False), UNet(cfg).eval()
    cond, uncond = torch.randn(3, 5, cfg.context_dim), torch.randn(1, 5, cfg.context_dim)
    return teacher, student, cond, uncond


def _den(net):
    return Denoiser(net, SCHEDULE, net.config.prediction_type)


def _batch(grid, seed=0, B=3):
    g = torch.Generator().manual_seed(seed)
    t, t_mid, t_end = grid.sample(B, g)
    x = torch.randn(B, 4, 8, 8, generator=g)
    eps = torch.randn(B, 4, 8, 8, generator=g)
    return x, eps, SCHEDULE.add_noise(x, eps, t), t, t_mid, t_end


def test_grids_nest_and_match_the_pipeline():
    grid = step_grid(8)
    assert grid.student.tolist() == [999, 874, 749, 624, 499, 374, 249, 124, 0]
    assert len(grid.teacher) == 17 and torch.equal(grid.teacher[::2], grid.student)
    for n in range(1, 201):
        g = step_grid(n)
        assert torch.equal(g.student, ddim_timesteps(n, "trailing")) and torch.equal(g.teacher[::2], g.student)
        assert bool((g.teacher[1:] < g.teacher[:-1]).all())
        if n < 48:  # the teacher walks exactly its own 2n-step trailing grid
            assert torch.equal(g.teacher, ddim_timesteps(2 * n, "trailing"))
    with pytest.raises(ConfigError, match="student steps"):
        step_grid(0)
    with pytest.raises(ConfigError, match="training timesteps"):
        step_grid(501)
    with pytest.raises(ConfigError, match="no room for 2 teacher steps"):  # trailing 668 steps ends 2, 0, 0
        step_grid(334)


def test_grids_nest_at_other_ratios_and_refuse_bad_ones():
    for ratio in (1, 3, 4, 8):
        for n in range(1, 65):
            g = step_grid(n, ratio=ratio)
            assert g.ratio == ratio and len(g.teacher) == ratio * n + 1
            assert torch.equal(g.teacher[::ratio], ddim_timesteps(n, "trailing"))
            assert bool((g.teacher[1:] < g.teacher[:-1]).all())
    assert step_grid(8, ratio=4).teacher.tolist()[:5] == [999, 968, 937, 905, 874]  # the trailing 32-step grid
    assert step_grid(8, ratio=1).teacher.tolist() == step_grid(8, ratio=1).student.tolist()  # one step per step
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ConfigError, match="teacher's steps per student step"):
            step_grid(8, ratio=bad)
    with pytest.raises(ConfigError, match="training timesteps"):
        step_grid(251, ratio=4)
    with pytest.raises(ConfigError, match="no room for 4 teacher steps"):  # trailing 800 steps repeats a level
        step_grid(200, ratio=4)
    levels = step_grid(4, ratio=4).sample(64, torch.Generator().manual_seed(1))
    assert len(levels) == 5 and all(bool((a > b).all()) for a, b in zip(levels[:-1], levels[1:]))


def test_grid_sample_gives_consecutive_teacher_steps():
    grid = step_grid(4)
    t, t_mid, t_end = grid.sample(64, torch.Generator().manual_seed(1))
    pairs = set(zip(grid.teacher.tolist(), grid.teacher[1:].tolist()))
    for a, b, c in zip(t.tolist(), t_mid.tolist(), t_end.tolist()):
        assert (a, b) in pairs and (b, c) in pairs and a in grid.student.tolist()
    assert len(set(t.tolist())) == 4  # every student step gets drawn


@pytest.mark.parametrize("scale", [None, 5.0])
def test_teacher_two_steps_equals_two_steps_of_sample_ddim(nets, scale):
    teacher, _, cond, uncond = nets
    grid = step_grid(8)
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t, t_mid, t_end = (torch.tensor([v] * 3) for v in grid.teacher[4:7].tolist())
    model_fn = guided(_den(teacher), cond, uncond, scale)
    ours = teacher_steps(model_fn, z, (t, t_mid, t_end), SCHEDULE)
    ref = sample_ddim(model_fn, z, grid.teacher[4:7], SCHEDULE)
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)


def test_teacher_two_steps_per_sample_timesteps(nets):
    teacher, _, cond, _ = nets
    x, eps, z, t, t_mid, t_end = _batch(step_grid(8), seed=3)
    ours = teacher_steps(guided(_den(teacher), cond), z, (t, t_mid, t_end), SCHEDULE)
    for i in range(3):
        ref = sample_ddim(guided(_den(teacher), cond[i:i + 1]), z[i:i + 1], torch.stack([t[i], t_mid[i], t_end[i]]),
                          SCHEDULE)
        torch.testing.assert_close(ours[i:i + 1], ref, atol=1e-6, rtol=1e-5)


def test_x_target_recovers_x_under_an_exact_teacher():
    """A closed-form oracle (the true v for a known x) makes the teacher exact: x_target is x itself."""
    x, eps, z, t, t_mid, t_end = _batch(step_grid(8), seed=4, B=6)

    def oracle(zz, tt, context):
        alpha, sigma = (expand_to(c, zz) for c in SCHEDULE.alpha_sigma(tt))
        return alpha * eps_from_x0(zz, x, alpha, sigma) - sigma * x  # v = alpha eps - sigma x

    z_end = teacher_steps(lambda zz, tt: Denoiser(oracle, SCHEDULE, "v_prediction")(zz, tt), z, (t, t_mid, t_end),
                          SCHEDULE)
    coefs = [expand_to(c, z) for c in (*SCHEDULE.alpha_sigma(t), *SCHEDULE.alpha_sigma(t_end))]
    torch.testing.assert_close(ddim_x_target(z, z_end, *coefs), x, atol=2e-4, rtol=1e-4)


class PerfectStudent:
    """A v-network that does the teacher's r steps in one: it predicts v whose x0 is exactly x_target."""

    def __init__(self, teacher_fn, grid):
        self.teacher_fn, self.grid = teacher_fn, grid

    def __call__(self, z, t, context):
        index = (self.grid.teacher[None, :] == t[:, None]).float().argmax(1)  # (B,) position of t in the grid
        levels = tuple(self.grid.teacher[index + j] for j in range(self.grid.ratio + 1))
        t_end = levels[-1]
        z_end = teacher_steps(self.teacher_fn, z, levels, SCHEDULE)
        alpha, sigma = (expand_to(c, z) for c in SCHEDULE.alpha_sigma(t))
        alpha_end, sigma_end = (expand_to(c, z) for c in SCHEDULE.alpha_sigma(t_end))
        x_target = ddim_x_target(z, z_end, alpha, sigma, alpha_end, sigma_end)
        return (alpha * z - x_target) / sigma  # inverse of x0 = alpha z - sigma v


@pytest.mark.parametrize("ratio", [2, 4])
def test_perfect_student_gets_zero_loss_and_others_do_not(nets, ratio):
    teacher, student, cond, _ = nets
    grid = step_grid(8, ratio=ratio)
    g = torch.Generator().manual_seed(5)
    levels = grid.sample(3, g)
    assert len(levels) == ratio + 1
    z = torch.randn(3, 4, 8, 8, generator=g)
    teacher_fn = guided(_den(teacher), cond)
    perfect = Denoiser(PerfectStudent(teacher_fn, grid), SCHEDULE, "v_prediction")
    zero = distill_loss(lambda zz, tt: perfect(zz, tt, cond), teacher_fn, z, levels, SCHEDULE)
    other = distill_loss(guided(_den(student), cond), teacher_fn, z, levels, SCHEDULE)
    assert zero.shape == other.shape == (3,)
    assert float(zero.max()) < 1e-8 * float(other.detach().min())
    same = distill_loss(teacher_fn, teacher_fn, z, levels, SCHEDULE)  # one teacher step != r
    assert float(same.min()) > 1e-6
    if ratio > 2:  # the r-step target is not the two-step one: the perfect student of r = 2 is not perfect here
        two = Denoiser(PerfectStudent(teacher_fn, step_grid(8)), SCHEDULE, "v_prediction")
        assert float(distill_loss(lambda zz, tt: two(zz, tt, cond), teacher_fn, z, levels, SCHEDULE).min()) > 1e-6


def test_loss_shapes_weights_and_gradient(nets):
    teacher, student, cond, uncond = nets
    x, eps, z, t, t_mid, t_end = _batch(step_grid(8), seed=6)
    student = UNet(student.config).train()
    den = _den(student)
    l_dstl = distill_loss(guided(den, cond), guided(_den(teacher), cond), z, (t, t_mid, t_end), SCHEDULE)
    l_ori = v_loss(den(z, t, cond), x, eps, t, SCHEDULE)
    total = with_rescaled_ori(l_dstl, l_ori, 0.2)
    assert l_dstl.shape == l_ori.shape == total.shape == (3,)
    torch.testing.assert_close(total.mean(), 1.2 * l_dstl.mean())  # gamma * L_ori on L_dstl's scale
    total.mean().backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    alpha, sigma = SCHEDULE.alpha_sigma(torch.tensor([999, 500, 100, 0]))
    w = truncated_snr_weight(alpha, sigma)
    assert w[0] == 1.0 and w[1] == 1.0 and w[2] > 1.0
    torch.testing.assert_close(w[2:], (alpha[2:] / sigma[2:]) ** 2)


def test_v_loss_is_zero_for_the_true_v():
    x, eps, z, t, *_ = _batch(step_grid(8), seed=7)
    true_v = SCHEDULE.velocity(x, eps, t)
    pred = Denoiser(lambda zz, tt, c: true_v, SCHEDULE, "v_prediction")(z, t, None)
    assert float(v_loss(pred, x, eps, t, SCHEDULE).max()) < 1e-10
    torch.testing.assert_close(pred.x0, x, atol=1e-5, rtol=1e-5)
    assert float(v_loss(pred, x, eps + 0.1, t, SCHEDULE).min()) > 1e-4


def test_cfg_aware_loss_equals_vanilla_at_w_one(nets):
    teacher, student, cond, uncond = nets
    x, eps, z, t, t_mid, t_end = _batch(step_grid(8), seed=8)
    s, te = _den(student), _den(teacher)
    vanilla = distill_loss(guided(s, cond), guided(te, cond), z, (t, t_mid, t_end), SCHEDULE)
    ones = torch.ones(3)
    at_one = distill_loss(guided(s, cond, uncond, ones), guided(te, cond, uncond, ones), z, (t, t_mid, t_end),
                          SCHEDULE)
    torch.testing.assert_close(at_one, vanilla, rtol=1e-4, atol=1e-7)
    w = guidance_scales(3, 2.0, 14.0, torch.Generator().manual_seed(0))
    assert bool(((w >= 2.0) & (w <= 14.0)).all())
    guided_loss = distill_loss(guided(s, cond, uncond, w), guided(te, cond, uncond, w), z, (t, t_mid, t_end),
                               SCHEDULE)
    assert not torch.allclose(guided_loss, vanilla, rtol=1e-2)


def test_x_target_is_the_one_step_ddim_inverse():
    """One DDIM step from z with x0 = x_target (eps from z) lands on z_end, for any z_end."""
    g = torch.Generator().manual_seed(9)
    z, z_end = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t, t_end = torch.tensor([999, 700, 300, 124]), torch.tensor([874, 500, 124, 0])
    alpha, sigma = (expand_to(c, z) for c in SCHEDULE.alpha_sigma(t))
    alpha_end, sigma_end = (expand_to(c, z) for c in SCHEDULE.alpha_sigma(t_end))
    x = ddim_x_target(z, z_end, alpha, sigma, alpha_end, sigma_end)
    landed = alpha_end * x + sigma_end * eps_from_x0(z, x, alpha, sigma)
    torch.testing.assert_close(landed, z_end, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x0_from_v(z, (alpha * z - x) / sigma, alpha, sigma), x, atol=1e-5, rtol=1e-5)
