"""Denoiser, guidance and samplers: parity with diffusers' DDIM / DPM-Solver++ loops on the same model outputs."""

import os
import warnings

import pytest
import torch

from snapfusion.errors import ConfigError
from snapfusion.sampling import (Denoiser, cfg_mix, ddim_step, guided, initial_noise, rescale_guidance, sample_ddim,
                                 sample_dpmpp_2m)
from snapfusion.schedule import CLEAN, NoiseSchedule, ddim_timesteps, dpm_timesteps

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
warnings.filterwarnings("ignore")

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SCHED = NoiseSchedule()
PATTERN = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
Z_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
TOL = 1e-5


def fake_net(z, t, context=None):
    """A deterministic stand-in for a UNet, plausible for eps and v alike: mostly z plus a t-dependent wave."""
    tt = t.float().reshape(-1, 1, 1, 1)
    return 0.95 * z + 0.2 * torch.sin(tt / 60 + PATTERN)


def run_diffusers(scheduler, n, z, **step_kw):
    scheduler.set_timesteps(n)
    for t in scheduler.timesteps:
        z = scheduler.step(fake_net(z, t.reshape(1)), t, z, **step_kw).prev_sample
    return z, scheduler.timesteps


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n", [1, 2, 3, 8, 16, 50])
def test_ddim_matches_diffusers_sd15_config(prediction_type, n):
    ref = diffusers.DDIMScheduler(**SD, steps_offset=1, clip_sample=False, set_alpha_to_one=False,
                                  prediction_type=prediction_type)
    expected, ref_ts = run_diffusers(ref, n, Z_T.clone())
    timesteps = ddim_timesteps(n)
    assert torch.equal(timesteps[:-1], ref_ts)
    ours = sample_ddim(guided(Denoiser(fake_net, SCHED, prediction_type), None), Z_T, timesteps, SCHED)
    assert (ours - expected).abs().max() <= TOL


@pytest.mark.parametrize("n", [4, 8, 25])  # trailing agrees with diffusers' t - T // n when n divides T
def test_ddim_trailing_matches_diffusers(n):
    ref = diffusers.DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing",
                                  prediction_type="v_prediction")
    expected, ref_ts = run_diffusers(ref, n, Z_T.clone())
    timesteps = ddim_timesteps(n, "trailing", steps_offset=0, set_alpha_to_one=True)
    assert torch.equal(timesteps[:-1], ref_ts) and timesteps[-1] == CLEAN
    ours = sample_ddim(guided(Denoiser(fake_net, SCHED, "v_prediction"), None), Z_T, timesteps, SCHED)
    assert (ours - expected).abs().max() <= TOL


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta_matches_diffusers_with_same_noise(eta):
    n = 8
    ref = diffusers.DDIMScheduler(**SD, steps_offset=1, clip_sample=False, set_alpha_to_one=False)
    ref.set_timesteps(n)
    noise_gen, z = torch.Generator().manual_seed(7), Z_T.clone()
    for t in ref.timesteps:  # the same draws, in the same order, as sample_ddim makes
        noise = torch.randn(z.shape, generator=noise_gen)
        z = ref.step(fake_net(z, t.reshape(1)), t, z, eta=eta, variance_noise=noise).prev_sample
    ours = sample_ddim(guided(Denoiser(fake_net, SCHED), None), Z_T, ddim_timesteps(n), SCHED, eta=eta,
                       generator=torch.Generator().manual_seed(7))
    deterministic = sample_ddim(guided(Denoiser(fake_net, SCHED), None), Z_T, ddim_timesteps(n), SCHED)
    assert (ours - z).abs().max() <= TOL
    assert (ours - deterministic).abs().max() > 0.01  # the noise really entered


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n", [1, 2, 3, 8, 14, 15, 16, 50])
def test_dpmpp_2m_matches_diffusers_defaults(prediction_type, n):
    ref = diffusers.DPMSolverMultistepScheduler(**SD, prediction_type=prediction_type)
    expected, ref_ts = run_diffusers(ref, n, Z_T.clone())
    timesteps = dpm_timesteps(n)
    assert torch.equal(timesteps[:-1], ref_ts)
    ours = sample_dpmpp_2m(guided(Denoiser(fake_net, SCHED, prediction_type), None), Z_T, timesteps, SCHED)
    assert (ours - expected).abs().max() <= TOL


@pytest.mark.parametrize("spacing,n", [("leading", 8), ("trailing", 14), ("linspace", 15), ("linspace", 20)])
def test_dpmpp_2m_sigma_min_and_spacings_match_diffusers(spacing, n):
    # sigma_min final + n >= 15 makes the last step second order; n < 15 makes it first order
    offset = 1 if spacing == "leading" else 0
    ref = diffusers.DPMSolverMultistepScheduler(**SD, timestep_spacing=spacing, steps_offset=offset,
                                                final_sigmas_type="sigma_min", prediction_type="v_prediction")
    expected, ref_ts = run_diffusers(ref, n, Z_T.clone())
    timesteps = dpm_timesteps(n, spacing, steps_offset=offset, final_sigma_zero=False)
    assert torch.equal(timesteps[:-1], ref_ts) and timesteps[-1] == 0
    ours = sample_dpmpp_2m(guided(Denoiser(fake_net, SCHED, "v_prediction"), None), Z_T, timesteps, SCHED)
    assert (ours - expected).abs().max() <= TOL


def _oracle(x0, prediction_type):
    """The perfect model for a known x0: returns the true eps (or v) of z_t."""
    def net(z, t, context=None):
        alpha, sigma = (c.reshape(-1, 1, 1, 1) for c in SCHED.alpha_sigma(t))
        eps = (z - alpha * x0) / sigma
        return eps if prediction_type == "epsilon" else alpha * eps - sigma * x0
    return net


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_oracle_model_recovers_x0(prediction_type):
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    model = guided(Denoiser(_oracle(x0, prediction_type), SCHED, prediction_type), None)
    for n in (1, 4, 25):
        clean = sample_ddim(model, Z_T, ddim_timesteps(n, set_alpha_to_one=True), SCHED)
        assert (clean - x0).abs().max() < 2e-5
        clean = sample_dpmpp_2m(model, Z_T, dpm_timesteps(n), SCHED)
        assert (clean - x0).abs().max() < 2e-5
    # SD-v1.5's DDIM ends at alphabar_0, not at 0: the oracle keeps the starting noise direction
    alpha_first, sigma_first = SCHED.alpha_sigma(torch.tensor(999))
    eps = (Z_T - alpha_first * x0) / sigma_first
    alpha_0, sigma_0 = SCHED.alpha_sigma(torch.tensor(0))
    ends_at_t0 = sample_ddim(model, Z_T, ddim_timesteps(10, "trailing", steps_offset=0), SCHED)
    assert (ends_at_t0 - (alpha_0 * x0 + sigma_0 * eps)).abs().max() < 2e-5


def test_guidance_matches_manual_mix_and_skips_uncond_at_scale_one():
    calls = []

    def net(z, t, context):
        calls.append(z.shape[0])
        return 0.9 * z + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)

    den = Denoiser(net, SCHED, "v_prediction")
    cond = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(4))
    uncond = torch.zeros(1, 3, 5)  # one empty-prompt embedding, broadcast over the batch
    t = torch.tensor([500, 500])
    c, u = net(Z_T, t, cond), net(Z_T, t, uncond.expand(2, 3, 5))
    for scale in (7.5, torch.tensor([2.0, 14.0])):
        calls.clear()
        pred = guided(den, cond, uncond, scale)(Z_T, t)
        w = scale.reshape(-1, 1, 1, 1) if isinstance(scale, torch.Tensor) else scale
        manual = den.to_prediction(w * c - (w - 1) * u, Z_T, t)  # SnapFusion §4 form of the mix
        assert calls == [4]  # one batch of 2B
        torch.testing.assert_close(pred.x0, manual.x0)
        torch.testing.assert_close(pred.eps, manual.eps)
    for scale in (1.0, None):
        calls.clear()
        pred = guided(den, cond, uncond, scale)(Z_T, t)
        assert calls == [2]
        torch.testing.assert_close(pred.x0, den(Z_T, t, cond).x0)
    torch.testing.assert_close(cfg_mix(c, u, 3.0), 3.0 * c - 2.0 * u)
    with pytest.raises(ConfigError, match="uncond"):
        guided(den, cond, None, 5.0)


@pytest.mark.parametrize("phi", [0.0, 0.3, 0.7, 1.0])
def test_guidance_rescale_matches_diffusers(phi):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    g = torch.Generator().manual_seed(7)
    cond, uncond = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    mixed = cfg_mix(cond, uncond, 7.5)
    ours = cfg_mix(cond, uncond, 7.5, phi)
    torch.testing.assert_close(ours, rescale_noise_cfg(mixed, cond, guidance_rescale=phi), rtol=1e-6, atol=1e-6)
    if phi == 0.0:
        assert torch.equal(ours, mixed)
    else:  # every sample's spread moves from the mix's towards the conditional output's
        std = lambda x: x.std(dim=(1, 2, 3))  # noqa: E731
        assert (std(ours) < std(mixed)).all() and (std(ours) > std(cond) - 1e-5).all()
    if phi == 1.0:
        torch.testing.assert_close(std(ours), std(cond))


def test_guided_applies_the_rescale_and_skips_it_without_guidance():
    # the context scales the output, so guidance changes its spread (a shift alone would leave it)
    den = Denoiser(lambda z, t, c: (0.9 + c.abs().mean(dim=(1, 2)).reshape(-1, 1, 1, 1)) * z, SCHED, "v_prediction")
    cond = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(4))
    uncond, t = torch.zeros(1, 3, 5), torch.tensor([500, 500])
    c, u = den.raw(Z_T, t, cond), den.raw(Z_T, t, uncond.expand(2, 3, 5))
    pred = guided(den, cond, uncond, 7.5, 0.7)(Z_T, t)
    torch.testing.assert_close(pred.eps, den.to_prediction(rescale_guidance(cfg_mix(c, u, 7.5), c, 0.7), Z_T, t).eps)
    assert (pred.eps - guided(den, cond, uncond, 7.5)(Z_T, t).eps).abs().max() > 1e-3
    torch.testing.assert_close(guided(den, cond, uncond, 1.0, 0.7)(Z_T, t).eps, den(Z_T, t, cond).eps)


def test_fp16_network_gives_fp32_prediction():
    seen = []

    def half_net(z, t, context):
        seen.append(z.dtype)
        return (0.5 * z).half()

    pred = Denoiser(half_net, SCHED, input_dtype=torch.float16)(Z_T, torch.tensor([10, 900]))
    assert seen == [torch.float16] and pred.x0.dtype == pred.eps.dtype == torch.float32
    with pytest.raises(ConfigError, match="sample"):
        Denoiser(half_net, SCHED, "sample")


def test_initial_noise_and_eta_noise_do_not_depend_on_batch():
    both = initial_noise((4, 8, 8), [11, 12], "cpu")
    alone = initial_noise((4, 8, 8), [12], "cpu", torch.float64)
    assert both.shape == (2, 4, 8, 8) and alone.dtype == torch.float64
    torch.testing.assert_close(both[1].double(), alone[0])
    assert not torch.equal(both[0], both[1])
    model, ts = guided(Denoiser(fake_net, SCHED), None), ddim_timesteps(5)
    gens = [torch.Generator().manual_seed(s) for s in (21, 22)]
    pair = sample_ddim(model, both, ts, SCHED, eta=1.0, generator=gens)
    single = sample_ddim(model, both[1:], ts, SCHED, eta=1.0, generator=[torch.Generator().manual_seed(22)])
    torch.testing.assert_close(pair[1:], single)
    with pytest.raises(ConfigError, match="Generator"):
        sample_ddim(model, both, ts, SCHED, eta=1.0)


def test_callback_sees_every_step_and_ddim_step_is_pure():
    seen = []
    ts = dpm_timesteps(6)
    sample_dpmpp_2m(guided(Denoiser(fake_net, SCHED), None), Z_T, ts, SCHED,
                    callback=lambda i, t, z: seen.append((i, t, tuple(z.shape))))
    assert seen == [(i, int(ts[i]), (2, 4, 8, 8)) for i in range(6)]
    x0, eps = torch.ones(2, 4, 2, 2), torch.full((2, 4, 2, 2), 2.0)
    out = ddim_step(x0, eps, torch.tensor([0.6, 0.8]), torch.tensor([0.8, 0.6]))
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor([2.2, 2.0]))
    torch.testing.assert_close(ddim_step(x0, eps, 0.6, 0.8, noise=torch.zeros_like(x0), noise_std=0.0),
                               ddim_step(x0, eps, 0.6, 0.8))
