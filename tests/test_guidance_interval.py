"""Guidance in a limited interval of the steps (Kynkaanniemi et al. 2024; diffusers' dynamic CFG): the samplers'
per-step model functions, the Python API, a model's stored default, the fast path, the CLI and the server; refused
for guidance-embedded models, for intervals that guide no step and for malformed values."""

import dataclasses
import json

import pytest
import torch
from PIL import Image

from snapfusion.cli.main import main
from snapfusion.errors import ConfigError, InputError
from snapfusion.pipeline import Pipeline
from snapfusion.sampling import Prediction, guidance_steps, sample_ddim, sample_dpmpp_2m, with_guidance_interval
from snapfusion.schedule import NoiseSchedule, ddim_timesteps, dpm_timesteps

REFUSAL = "a guidance interval needs two UNet calls per step"


def _gen(pipe, **kw):
    return pipe.generate(["a red cube", "two cats"], [3, 4], steps=kw.pop("steps", 4),
                         guidance=kw.pop("guidance", 7.5), **kw)


def _with_default(pipe, interval) -> Pipeline:
    cfg = dataclasses.replace(pipe.config, guidance_interval=interval)
    return Pipeline(pipe.text_encoder, pipe.unet, pipe.decoder, cfg, encoder=pipe.encoder).eval()


def _unet_batches(pipe, call) -> list[int]:
    """The batch size of every UNet call ``call()`` makes: 2B for a guided step, B for a conditional one."""
    sizes = []
    handle = pipe.unet.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    try:
        call()
    finally:
        handle.remove()
    return sizes


@pytest.mark.parametrize("steps,interval,expected", [
    (8, (0.0, 1.0), [True] * 8),
    (8, (0.0, 0.5), [True] * 4 + [False] * 4),
    (8, (0.25, 0.75), [False] * 2 + [True] * 4 + [False] * 2),
    (4, (0.5, 1.0), [False, False, True, True]),
    (3, (0.0, 0.34), [True, True, False]),   # 1/3 < 0.34
    (3, (0.0, 0.33), [True, False, False]),  # 1/3 > 0.33
    (4, (0.8, 1.0), [False] * 4),
])
def test_guidance_steps_picks_the_steps_whose_fraction_lies_in_the_interval(steps, interval, expected):
    assert guidance_steps(steps, interval) == expected


def _recording_fns(log):
    def make(name):
        def fn(z, t):
            log.append(name)
            return Prediction(x0=torch.zeros_like(z), eps=torch.zeros_like(z))
        return fn
    return make("guided"), make("plain")


@pytest.mark.parametrize("sampler,timesteps", [(sample_ddim, ddim_timesteps(4)), (sample_dpmpp_2m, dpm_timesteps(4))])
def test_samplers_call_the_guided_function_at_the_interval_steps_only(sampler, timesteps):
    log = []
    guided, plain = _recording_fns(log)
    fns = with_guidance_interval(guided, plain, 4, (0.25, 0.75))
    sampler(fns, torch.zeros(1, 4, 8, 8), timesteps, NoiseSchedule())
    assert log == ["plain", "guided", "guided", "plain"]
    assert with_guidance_interval(guided, plain, 4, (0.0, 1.0)) is guided  # every step: the one function
    with pytest.raises(ConfigError, match="3 model functions for 4 steps"):
        sampler([guided] * 3, torch.zeros(1, 4, 8, 8), timesteps, NoiseSchedule())


def test_generate_guides_only_the_interval_steps_and_the_rest_run_one_pass(tiny_pipeline):
    full = _gen(tiny_pipeline)
    assert _unet_batches(tiny_pipeline, lambda: _gen(tiny_pipeline)) == [4] * 4
    assert _unet_batches(tiny_pipeline, lambda: _gen(tiny_pipeline, guidance_interval=(0, 0.5))) == [4, 4, 2, 2]
    assert _unet_batches(tiny_pipeline, lambda: _gen(tiny_pipeline, guidance_interval=(0.5, 1))) == [2, 2, 4, 4]
    assert torch.equal(_gen(tiny_pipeline, guidance_interval=(0.0, 1.0)), full)
    early = _gen(tiny_pipeline, guidance_interval=(0, 0.5))
    late = _gen(tiny_pipeline, guidance_interval=(0.5, 1))
    unguided = _gen(tiny_pipeline, guidance=1.0)
    for a, b in ((early, full), (late, full), (early, late), (early, unguided)):
        assert (a - b).abs().max() > 1e-3
    # guidance 1 makes no unconditional pass at all: the interval changes nothing
    assert torch.equal(_gen(tiny_pipeline, guidance=1.0, guidance_interval=(0, 0.5)), unguided)
    # the DPM-Solver++ sampler takes the same per-step functions
    dpm = lambda: _gen(tiny_pipeline, sampler="dpmpp_2m", guidance_interval=(0, 0.5))  # noqa: E731
    assert _unet_batches(tiny_pipeline, dpm) == [4, 4, 2, 2]


def test_the_steps_outside_the_interval_are_the_conditional_prediction(tiny_pipeline):
    # built by hand from the model functions: guided at step 0, conditional alone at steps 1-3
    pipe = tiny_pipeline
    prompts, seeds = ["a red cube", "two cats"], [3, 4]
    cond, uncond = pipe.encode_text(prompts), pipe.encode_text([""])[:1]
    z = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    fns = [pipe.model_fn(cond, uncond, 7.5)] + [pipe.model_fn(cond, None, 1.0)] * 3
    by_hand = pipe.decode(sample_ddim(fns, z, pipe.timesteps(4, "ddim"), pipe.schedule))
    torch.testing.assert_close(_gen(pipe, guidance_interval=(0, 0.25)), by_hand, atol=1e-6, rtol=0)


def test_a_models_default_applies_round_trips_and_a_call_overrides_it(tiny_pipeline, tmp_path):
    pipe = _with_default(tiny_pipeline, (0.0, 0.5))
    torch.testing.assert_close(_gen(pipe), _gen(tiny_pipeline, guidance_interval=(0, 0.5)), atol=0, rtol=0)
    torch.testing.assert_close(_gen(pipe, guidance_interval=(0, 1)), _gen(tiny_pipeline), atol=0, rtol=0)
    pipe.save(tmp_path / "p", dtype=None)
    stored = json.loads((tmp_path / "p" / "model_index.json").read_text())["config"]["guidance_interval"]
    assert stored == [0.0, 0.5]
    assert Pipeline.load(tmp_path / "p").config.guidance_interval == (0.0, 0.5)
    result = pipe("a red cube", seed=1, steps=4)
    assert result.settings["guidance_interval"] == [0.0, 0.5]
    assert pipe("a red cube", seed=1, steps=4, guidance=1.0).settings["guidance_interval"] == [0.0, 1.0]  # as used


@pytest.mark.parametrize("interval", [(0.5, 0.5), (0.6, 0.2), (-0.1, 0.5), (0, 1.1), (0, float("nan")),
                                      (0, float("inf")), (0,), (0, 0.5, 1), (True, 0.5), "0,0.5", 0.5, ("0", "1")])
def test_bad_values_are_refused_in_one_line(tiny_pipeline, interval):
    for call in (lambda: _gen(tiny_pipeline, guidance_interval=interval),
                 lambda: tiny_pipeline("a cat", guidance_interval=interval),
                 lambda: _gen(_with_default(tiny_pipeline, interval))):  # a bad stored default too
        with pytest.raises(InputError, match="guidance_interval") as err:
            call()
        assert "\n" not in str(err.value)


def test_an_interval_that_guides_no_step_is_refused_before_any_work(tiny_pipeline):
    calls = []
    handle = tiny_pipeline.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(InputError, match=r"guidance interval \[0.8, 1\] guides none of the 4 steps") as err:
            _gen(tiny_pipeline, guidance_interval=(0.8, 1.0))
        assert "\n" not in str(err.value) and not calls
    finally:
        handle.remove()
    _gen(tiny_pipeline, guidance_interval=(0.8, 1.0), steps=5)  # 4/5 = 0.8: step 4 is guided
    _gen(tiny_pipeline, guidance_interval=(0.8, 1.0), guidance=1.0)  # no guidance to place: nothing to refuse


def test_guidance_embedded_models_refuse_it_before_any_work_and_drop_a_copied_default(ge_pipeline):
    calls = []
    handle = ge_pipeline.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for call in (lambda: _gen(ge_pipeline, guidance_interval=(0, 0.5)),
                     lambda: ge_pipeline("a cat", guidance_interval=(0, 0.5))):
            with pytest.raises(InputError, match=REFUSAL) as err:
                call()
            assert "tiny-ge" in str(err.value) and "\n" not in str(err.value)
        assert not calls
    finally:
        handle.remove()
    _gen(ge_pipeline, guidance_interval=(0, 1))  # every step: allowed
    # a config copied from a two-call teacher keeps working on its guidance-embedded student
    copied = _with_default(ge_pipeline, (0.0, 0.5))
    assert copied.config.guidance_interval == (0.0, 1.0)
    torch.testing.assert_close(_gen(copied), _gen(ge_pipeline), atol=0, rtol=0)


@pytest.mark.parametrize("cfg", ["batch2", "split"])
def test_the_fast_path_gives_the_images_of_plain_generate(tiny_pipeline, cfg):
    from snapfusion.fast import FastOptions, accelerate

    pipe = _with_default(tiny_pipeline, (0.0, 1.0))
    ref = _gen(pipe, guidance_interval=(0, 0.5))
    accelerate(pipe, FastOptions(cfg=cfg, channels_last=False))
    assert _unet_batches(pipe, lambda: _gen(pipe, guidance_interval=(0, 0.5))) == (
        [4, 4, 2, 2] if cfg == "batch2" else [2, 2, 2, 2, 2, 2])
    torch.testing.assert_close(_gen(pipe, guidance_interval=(0, 0.5)), ref, atol=1e-4, rtol=0)
    full = _gen(pipe)  # another interval: another runner, not the cached one
    assert len(pipe.fast.runners) == 2 and (full - ref).abs().max() > 1e-3


def test_cli_generate_records_it_and_refuses_bad_ones_in_one_line(tiny_pipeline, ge_pipeline, tmp_path, capsys):
    tiny_pipeline.save(tmp_path / "two", dtype=None)
    ge_pipeline.save(tmp_path / "one", dtype=None)
    out = tmp_path / "x.png"
    argv = ["generate", "a cat", "--steps", "4", "--size", "64", "--out", str(out), "--quiet"]
    assert main([*argv, "--model", str(tmp_path / "two"), "--guidance-interval", "0,0.5"]) == 0
    text = Image.open(out).text
    assert text["guidance_interval"] == "[0.0, 0.5]" and "Guidance interval: 0-0.5" in text["parameters"]
    assert "guidance interval 0-0.5" in capsys.readouterr().out
    assert main([*argv, "--model", str(tmp_path / "two")]) == 0
    assert "guidance_interval" not in Image.open(out).text  # every step: nothing to record
    out.unlink()
    for model, value, message in (("two", "0.5", "--guidance-interval must be two comma-separated numbers"),
                                  ("two", "0,x", "--guidance-interval must be a number"),
                                  ("two", "0.5,0.2", "--guidance-interval must satisfy 0 <= start < end <= 1"),
                                  ("two", "0.9,1", "guides none of the 4 steps"),
                                  ("one", "0,0.5", REFUSAL)):
        capsys.readouterr()
        assert main([*argv, "--model", str(tmp_path / model), f"--guidance-interval={value}"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and "Traceback" not in err and not out.exists()


def test_server_applies_reports_and_refuses_it(two_and_one_call_client):
    client, url = two_and_one_call_client, "/v1/images/generations"
    r = client.post(url, json={"prompt": "a cat", "steps": 4, "seed": 3, "guidance_interval": [0, 0.5]})
    assert r.status_code == 200, r.text
    assert r.json()["settings"]["guidance_interval"] == [0.0, 0.5]
    plain = client.post(url, json={"prompt": "a cat", "steps": 4, "seed": 3}).json()
    assert plain["settings"]["guidance_interval"] == [0.0, 1.0]
    assert plain["data"][0]["b64_json"] != r.json()["data"][0]["b64_json"]
    for body in ({"guidance_interval": [0.5, 0.2]}, {"guidance_interval": "0,0.5"}, {"guidance_interval": [0]},
                 {"guidance_interval": [0.9, 1]}, {"guidance_interval": [0, 0.5], "model": "one"}):
        r = client.post(url, json={"prompt": "a cat", "steps": 4, **body})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "guidance_interval"
    assert r.json()["error"]["message"].startswith(REFUSAL)


def test_assemble_student_stores_a_default_and_refuses_bad_ones(assemble_student, tmp_path):
    ok = assemble_student("two", "two", "--guidance-interval", "0,0.5")
    assert ok.returncode == 0, ok.stderr
    assert Pipeline.load(tmp_path / "two").config.guidance_interval == (0.0, 0.5)
    for unet, interval, message in (("two", "0.5,0.5", "--guidance-interval must satisfy"), ("one", "0,0.5", REFUSAL)):
        bad = assemble_student(unet, "bad", "--guidance-interval", interval)
        assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "bad").exists()


def test_a_stored_default_that_guides_no_step_at_a_calls_step_count_says_it_is_the_models(tiny_pipeline):
    pipe = _with_default(tiny_pipeline, (0.9, 1.0))  # fine at 10 steps (9/10), none of 4
    _gen(pipe, steps=10)
    with pytest.raises(InputError, match=r"guidance interval tiny's default \[0.9, 1\] guides none of the 4 steps"):
        _gen(pipe)
    _gen(pipe, guidance_interval=(0, 1))  # a call's own interval replaces it


def test_huge_negative_zero_and_equivalent_values():
    from snapfusion import validation as v

    with pytest.raises(InputError, match="guidance_interval must be a finite number") as err:
        v.check_guidance_interval([0, 10**400])
    assert "\n" not in str(err.value)
    assert str(v.check_guidance_interval([-0.0, 0.5])[0]) == "0.0"
    assert guidance_steps(8, (0, 0.45)) == guidance_steps(8, (0, 0.5))


def test_the_fast_path_shares_a_runner_between_intervals_that_guide_the_same_steps(tiny_pipeline):
    from snapfusion.fast import FastOptions, accelerate

    pipe = _with_default(tiny_pipeline, (0.0, 1.0))
    accelerate(pipe, FastOptions(channels_last=False))
    a = _gen(pipe, guidance_interval=(0, 0.5))
    b = _gen(pipe, guidance_interval=(0, 0.45))  # 4 steps: steps 0 and 1 either way
    assert len(pipe.fast.runners) == 1 and torch.equal(a, b)


def test_the_diffusers_custom_pipeline_refuses_bad_intervals_in_one_line():
    pytest.importorskip("diffusers")
    from snapfusion.assets.diffusers.snapfusion_diffusers import _guidance_interval

    assert _guidance_interval([0, 0.5], 8, 4.5) == (0.0, 0.5)
    for interval, message in ((None, "two numbers"), ([0.5], "two numbers"), ((0.6, 0.2), "0 <= start < end <= 1"),
                              ((0.9, 1.0), "guides none of the 8 steps")):
        with pytest.raises(ValueError, match=message) as err:
            _guidance_interval(interval, 8, 4.5)
        assert "\n" not in str(err.value)
    assert _guidance_interval((0.9, 1.0), 8, 1.0) == (0.9, 1.0)  # no guidance: nothing to place
