"""Noise schedule, eps/x0/v conversions and timestep selection, checked against diffusers 0.42's schedulers."""

import os
import warnings

import pytest
import torch

from snapfusion.config import from_dict, to_dict
from snapfusion.errors import ConfigError
from snapfusion.schedule import (CLEAN, NoiseSchedule, ScheduleConfig, ddim_timesteps, dpm_timesteps, eps_from_v,
                                 eps_from_x0, expand_to, v_from_x0_eps, x0_from_eps, x0_from_v)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
warnings.filterwarnings("ignore", category=FutureWarning)

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _ddim_ref(spacing="leading", **kw):
    return diffusers.DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, timestep_spacing=spacing,
                                   steps_offset=1 if spacing == "leading" else 0, **kw)


def _dpm_ref(spacing="linspace", **kw):
    return diffusers.DPMSolverMultistepScheduler(**SD, timestep_spacing=spacing,
                                                 steps_offset=1 if spacing == "leading" else 0, **kw)


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_alphas_cumprod_match_diffusers(beta_schedule):
    ours = NoiseSchedule(ScheduleConfig(beta_schedule=beta_schedule)).alphas_cumprod
    ref = diffusers.DDIMScheduler(**{**SD, "beta_schedule": beta_schedule}).alphas_cumprod
    assert ours.dtype == torch.float32 and ours.shape == (1000,)
    # diffusers accumulates the cumprod in fp32; ours is fp64 rounded once, so they agree to fp32 drift
    torch.testing.assert_close(ours, ref, rtol=2e-5, atol=0)
    assert 0.99 < ours[0] < 1 and ours[-1] < 0.02


def test_alpha_sigma_values_and_clean_level():
    sched = NoiseSchedule()
    t = torch.tensor([0, 500, 999, CLEAN])
    alpha, sigma = sched.alpha_sigma(t)
    assert alpha.dtype == sigma.dtype == torch.float32
    torch.testing.assert_close(alpha[:3], sched.alphas_cumprod[t[:3]].sqrt())
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(4))
    assert alpha[3] == 1 and sigma[3] == 0


def test_add_noise_and_velocity_match_diffusers():
    sched, ref = NoiseSchedule(), _ddim_ref()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    torch.testing.assert_close(sched.add_noise(x0, eps, t), ref.add_noise(x0, eps, t), rtol=0, atol=2e-6)
    torch.testing.assert_close(sched.velocity(x0, eps, t), ref.get_velocity(x0, eps, t), rtol=0, atol=2e-6)


def test_conversions_are_exact_inverses():
    sched = NoiseSchedule()
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([1, 100, 400, 800, 999])
    alpha, sigma = (expand_to(c, x0) for c in sched.alpha_sigma(t))
    z = sched.add_noise(x0, eps, t)
    v = v_from_x0_eps(x0, eps, alpha, sigma)
    # x0 -> eps -> x0 and eps -> x0 -> eps through z
    torch.testing.assert_close(eps_from_x0(z, x0, alpha, sigma), eps, rtol=0, atol=2e-5)
    torch.testing.assert_close(x0_from_eps(z, eps, alpha, sigma), x0, rtol=0, atol=2e-5)
    # v -> (x0, eps) recovers both, and back to v
    torch.testing.assert_close(x0_from_v(z, v, alpha, sigma), x0, rtol=0, atol=2e-6)
    torch.testing.assert_close(eps_from_v(z, v, alpha, sigma), eps, rtol=0, atol=2e-6)
    v2 = v_from_x0_eps(x0_from_v(z, v, alpha, sigma), eps_from_v(z, v, alpha, sigma), alpha, sigma)
    torch.testing.assert_close(v2, v, rtol=0, atol=2e-6)
    # the v target of §4 is what diffusers trains on
    torch.testing.assert_close(v, _ddim_ref().get_velocity(x0, eps, t), rtol=0, atol=2e-6)


def test_schedule_config_json_round_trip_and_errors():
    cfg = ScheduleConfig(beta_schedule="linear", beta_end=0.02)
    assert from_dict(ScheduleConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="cosine"):
        from_dict(ScheduleConfig, {"beta_schedule": "cosine"})
    with pytest.raises(ConfigError, match="beta_start"):
        ScheduleConfig(beta_start=0.02, beta_end=0.01)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_timesteps_match_diffusers_for_every_count(spacing):
    ref = _ddim_ref(spacing)
    for n in range(1, 1000):
        ours = ddim_timesteps(n, spacing, steps_offset=1 if spacing == "leading" else 0)
        ref.set_timesteps(n)
        expected = ref.timesteps[ref.timesteps >= 0]  # diffusers' trailing adds a stray -1 for 62 counts
        assert torch.equal(ours[:-1], expected), (spacing, n)
        assert ours[-1] == 0 and len(ours) == n + 1  # SD-v1.5: set_alpha_to_one False -> final alphabar_0


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_dpm_timesteps_match_diffusers_for_every_count(spacing):
    ref = _dpm_ref(spacing)
    for n in range(1, 1000):
        if spacing == "leading" and n == 999:
            continue  # t = 1000 with offset 1: checked to raise below
        ours = dpm_timesteps(n, spacing, steps_offset=1 if spacing == "leading" else 0)
        ref.set_timesteps(n)
        expected = ref.timesteps[ref.timesteps >= 0]
        assert torch.equal(ours[:-1], expected), (spacing, n)
        assert ours[-1] == CLEAN and len(ours) == n + 1  # final_sigmas_type "zero"


def test_timestep_edge_counts():
    assert ddim_timesteps(1).tolist() == [1, 0]
    assert ddim_timesteps(1000, "trailing").tolist()[:3] == [999, 998, 997]
    assert dpm_timesteps(1000, "trailing", final_sigma_zero=False)[-2:].tolist() == [0, 0]
    assert ddim_timesteps(4, set_alpha_to_one=True)[-1] == CLEAN
    with pytest.raises(ConfigError, match="outside"):  # 1..1000 with offset 1: t = 1000 does not exist
        ddim_timesteps(1000, "leading")
    with pytest.raises(ConfigError, match="outside"):
        dpm_timesteps(999, "leading", steps_offset=1)
    with pytest.raises(ConfigError, match="repeats"):
        dpm_timesteps(1000, "linspace")
    for bad in (0, 1001, 2.0, True):
        with pytest.raises(ConfigError, match="integer"):
            ddim_timesteps(bad)
    with pytest.raises(ConfigError, match="spacing"):
        ddim_timesteps(8, "uniform")
