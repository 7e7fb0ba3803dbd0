"""The guidance-embedded student (Meng et al. 2023): zero-initialised start, one-call distillation through the loop
with resume and export, one UNet call per sampling step, the negative-prompt refusal everywhere, and storage."""

import dataclasses
import json

import pytest
import torch

from conftest import read_metrics, tiny_loop
from snapfusion.cli import main
from snapfusion.distill.stages import distill_steps
from snapfusion.distill.tasks import DistillConfig, DistillTask, ModelSource, with_guidance_embedding
from snapfusion.errors import ConfigError, InputError
from snapfusion.models.unet import UNet
from snapfusion.pipeline import Pipeline
from snapfusion.train import state as ckpt_io
from snapfusion.train.loop import train
from snapfusion.weights import load_safetensors

REFUSAL = "negative prompts need two UNet calls per step"


@pytest.fixture(scope="module")
def source(tiny_pipeline, tmp_path_factory) -> ModelSource:
    folder = tmp_path_factory.mktemp("teacher") / "pipe"
    tiny_pipeline.save(folder, dtype=None)
    return ModelSource(pipeline=str(folder))


def _inputs(unet, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, unet.config.in_channels, 8, 8, generator=gen)
    ctx = torch.randn(batch, 77, unet.config.context_dim, generator=gen)
    return z, torch.tensor([999, 250][:batch]), ctx


def _count_calls(unet):
    calls = []
    handle = unet.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((args[0].shape[0], kwargs.get("guidance"))), with_kwargs=True)
    return calls, handle


# ---- the student's start -------------------------------------------------------------------------------------

def test_zero_initialised_embedding_starts_as_the_sources_conditional_prediction(source):
    src = UNet.load(source.unet_folder()).eval()
    task = DistillTask(DistillConfig(source=source, student_steps=2, image_size=64, guidance_embed=True))
    student = task.build().eval()
    assert student.config.guidance_embed and not src.config.guidance_embed
    z, t, ctx = _inputs(src)
    with torch.no_grad():
        ref = src(z, t, ctx)
        for w in (1.0, 2.0, 7.5, 14.0, torch.tensor([3.0, 11.0])):
            torch.testing.assert_close(student(z, t, ctx, guidance=w), ref, atol=0, rtol=0)
    assert with_guidance_embedding(student) is student  # a GE source is kept as is


def test_guidance_embed_with_feature_weight_or_a_ge_teacher_is_refused(source, tmp_path, capsys):
    with pytest.raises(ConfigError, match="--guidance-embed") as err:
        DistillConfig(source=source, guidance_embed=True, feature_weight=0.5)
    assert "\n" not in str(err.value)
    ge = with_guidance_embedding(UNet.load(source.unet_folder()))
    ge.save(tmp_path / "ge")
    with pytest.raises(ConfigError, match="pass --guidance-embed"):
        DistillTask(DistillConfig(source=source, student_unet=str(tmp_path / "ge")))
    with pytest.raises(ConfigError, match="teacher"):
        DistillTask(DistillConfig(source=dataclasses.replace(source, teacher_unet=str(tmp_path / "ge")),
                                  guidance_embed=True))
    argv = ["distill", "--run-dir", str(tmp_path / "r"), "--model", source.pipeline, "--guidance-embed",
            "--feature-weight", "0.5"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--guidance-embed" in err and "\n" not in err and not (tmp_path / "r").exists()


def test_cli_flag_reaches_the_config(source, tmp_path, monkeypatch):
    import snapfusion.distill.stages as stages

    seen = {}
    monkeypatch.setattr(stages, "distill_steps", lambda loop, cfg, resume=False: seen.update(d=cfg))
    base = ["distill", "--run-dir", str(tmp_path / "r"), "--model", source.pipeline, "--max-steps", "1"]
    assert main([*base, "--guidance-embed"]) == 0 and seen["d"].guidance_embed
    assert main(base) == 0 and not seen["d"].guidance_embed


# ---- training --------------------------------------------------------------------------------------------------

def test_one_student_call_with_w_and_gradients_reach_the_embedding(source):
    task = DistillTask(DistillConfig(source=source, student_steps=2, image_size=64, guidance_embed=True,
                                     guidance_range=(2.0, 14.0)))
    model = task.build()
    batch = task.collate([task.dataset()[i] for i in range(2)])
    calls, handle = _count_calls(model)
    per_sample, logs = task.loss(model, batch, torch.Generator().manual_seed(0))
    handle.remove()
    assert len(calls) == 1 and calls[0][0] == 2  # B samples, no uncond pass
    w = calls[0][1]
    assert w.shape == (2,) and bool(((w >= 2) & (w <= 14)).all())
    assert per_sample.shape == (2,) and bool(torch.isfinite(per_sample).all()) and per_sample.mean() > 0
    assert logs["cfg_aware"] == 1.0 and "l_ori" not in logs  # no L_ori for a guided student
    torch.testing.assert_close(per_sample.mean(), torch.tensor(logs["l_dstl"]), rtol=1e-5, atol=0)
    per_sample.mean().backward()
    assert model.guidance_embedding.linear_2.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in task.teacher.parameters())


def test_a_two_call_student_teaches_its_one_call_copy_step_for_step(source):
    """Teacher ratio 1 with the student's own source as the teacher (Meng et al. 2023's first stage): the
    zero-initialised copy already matches the guided teacher at w = 1 (guidance off) and not above it."""
    unet = source.unet_folder()
    own = dataclasses.replace(source, teacher_unet=str(unet))

    def loss(w):
        task = DistillTask(DistillConfig(source=own, student_unet=str(unet), student_steps=2, teacher_ratio=1,
                                         image_size=64, guidance_embed=True, guidance_range=(w, w)))
        assert task.grid.teacher.tolist() == task.grid.student.tolist() == [999, 499, 0]
        batch = task.collate([task.dataset()[i] for i in range(2)])
        with torch.no_grad():
            per_sample, _ = task.loss(task.build(), batch, torch.Generator().manual_seed(0))
        return per_sample

    assert float(loss(1.0).abs().max()) < 1e-8
    assert bool((loss(5.0) > 1e-4).all())


def test_teacher_guidance_rescale_changes_the_one_call_target_above_w_1(source, tmp_path, capsys):
    """--teacher-guidance-rescale: the teacher's guided steps are rescaled (Lin et al. 2024), so the copy's loss
    changes at w 5 and stays zero at w 1, where the rescale is the identity; refused without --guidance-embed."""
    unet = source.unet_folder()
    own = dataclasses.replace(source, teacher_unet=str(unet))

    def loss(w, phi):
        task = DistillTask(DistillConfig(source=own, student_unet=str(unet), student_steps=2, teacher_ratio=1,
                                         image_size=64, guidance_embed=True, guidance_range=(w, w),
                                         teacher_guidance_rescale=phi))
        batch = task.collate([task.dataset()[i] for i in range(2)])
        with torch.no_grad():
            per_sample, _ = task.loss(task.build(), batch, torch.Generator().manual_seed(0))
        return per_sample

    assert float(loss(1.0, 0.7).abs().max()) < 1e-8
    plain, rescaled = loss(5.0, 0.0), loss(5.0, 0.7)
    assert float((plain - rescaled).abs().max()) > 1e-3 * float(plain.abs().max())
    with pytest.raises(ConfigError, match="--teacher-guidance-rescale needs --guidance-embed"):
        DistillConfig(source=source, teacher_guidance_rescale=0.7)
    needs_embed = "--teacher-guidance-rescale needs --guidance-embed"
    for extra, message in ((["--teacher-guidance-rescale", "0.7"], needs_embed),
                           (["--guidance-embed", "--teacher-guidance-rescale", "1.5"],
                            "--teacher-guidance-rescale must be between 0 and 1")):
        argv = ["distill", "--run-dir", str(tmp_path / "r"), "--model", source.pipeline, *extra]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and not (tmp_path / "r").exists()


def test_ratio_1_is_refused_without_guidance_embed(source):
    """One teacher step per student step reduces no steps: only the one-call copy may ask for it."""
    with pytest.raises(ConfigError, match="--teacher-ratio 1 needs --guidance-embed"):
        DistillConfig(source=source, student_steps=2, teacher_ratio=1)
    assert DistillConfig(source=source, student_steps=2, teacher_ratio=1, guidance_embed=True).teacher_ratio == 1


def test_embedding_only_trains_the_embedding_alone(source, tmp_path, capsys):
    """--embedding-only: after a short run every weight but the guidance embedding's is its start's, bit for bit,
    and the embedding has moved; without --guidance-embed it is refused (config: ConfigError, CLI: exit 2)."""
    unet = str(source.unet_folder())
    cfg = DistillConfig(source=dataclasses.replace(source, teacher_unet=unet), student_unet=unet, student_steps=2,
                        teacher_ratio=1, image_size=64, guidance_embed=True, embedding_only=True,
                        guidance_range=(3.0, 6.0))
    final = distill_steps(tiny_loop(tmp_path / "emb", 2), cfg)
    start, trained = UNet.load(unet).state_dict(), UNet.load(final).state_dict()
    assert set(trained) - set(start) == {k for k in trained if k.startswith("guidance_embedding.")}
    for k, v in start.items():
        torch.testing.assert_close(trained[k], v, atol=0, rtol=0, msg=k)
    assert trained["guidance_embedding.linear_2.weight"].abs().sum() > 0
    with pytest.raises(ConfigError, match="--embedding-only needs --guidance-embed"):
        DistillConfig(source=source, embedding_only=True)
    capsys.readouterr()  # the run's progress bars
    code = main(["distill", "--run-dir", str(tmp_path / "r"), "--model", source.pipeline, "--embedding-only"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--embedding-only needs --guidance-embed" in err and len(err.splitlines()) == 1


def test_a_ratio_1_run_samples_the_teacher_once(source, tmp_path):
    unet = str(source.unet_folder())
    cfg = DistillConfig(source=dataclasses.replace(source, teacher_unet=unet), student_unet=unet, student_steps=2,
                        teacher_ratio=1, image_size=64, sample_prompts=2, guidance_embed=True)
    distill_steps(tiny_loop(tmp_path / "r1", 1, sample_every=1), cfg)
    report = json.loads((tmp_path / "r1" / "samples" / "step_0000001.json").read_text())
    assert set(report["mse_to_teacher@2"]) == {"student@2"}  # no second teacher@2 row


def test_ge_distillation_runs_resumes_exports_and_continues(source, tmp_path):
    cfg = DistillConfig(source=source, student_steps=2, image_size=64, sample_prompts=2, guidance_embed=True)
    train(tiny_loop(tmp_path / "straight", 3), DistillTask(cfg))
    train(tiny_loop(tmp_path / "split", 1), DistillTask(cfg))
    final = distill_steps(tiny_loop(tmp_path / "split", 3, sample_every=3), cfg, resume=True)
    for which in ("model", "ema"):
        a = load_safetensors(ckpt_io.latest_checkpoint(tmp_path / "straight") / which / "model.safetensors")
        b = load_safetensors(ckpt_io.latest_checkpoint(tmp_path / "split") / which / "model.safetensors")
        assert a.keys() == b.keys() and any(k.startswith("guidance_embedding.") for k in a)
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=f"{which}:{k}")
    assert [r["loss"] for r in read_metrics(tmp_path / "split")] == [r["loss"] for r in read_metrics(tmp_path / "straight")]
    assert json.loads((final / "config.json").read_text())["config"]["guidance_embed"] is True
    trained = UNet.load(final)
    assert trained.guidance_embedding.linear_2.weight.abs().sum() > 0  # it learned something of w
    pipe = Pipeline.load(tmp_path / "split" / "pipeline")
    assert pipe.unet.config.guidance_embed and pipe.config.steps == 2
    images = pipe.generate(["a red apple"], [0], height=64, width=64)
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
    report = json.loads((tmp_path / "split" / "samples" / "step_0000003.json").read_text())
    assert set(report["mse_to_teacher@4"]) == {"teacher@2", "student@2"}
    run = json.loads((tmp_path / "split" / "run_config.json").read_text())
    assert run["task"]["guidance_embed"] is True
    # continuing a GE student loads its embedding as is
    again = DistillTask(dataclasses.replace(cfg, student_unet=str(final))).build()
    for k, v in trained.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, atol=0, rtol=0, msg=k)


# ---- sampling ------------------------------------------------------------------------------------------------

def test_generate_makes_one_unet_call_per_step_and_images_depend_on_w(ge_pipeline):
    calls, handle = _count_calls(ge_pipeline.unet)
    try:
        a = ge_pipeline.generate(["a cat", "a dog"], [0, 1], steps=3, guidance=2.0)
        assert len(calls) == 3 and all(b == 2 for b, _ in calls)  # one batch-B call per step: no uncond half
        assert all(torch.equal(w, torch.full((2,), 2.0)) and w.dtype == torch.float32 for _, w in calls)
        calls.clear()
        b = ge_pipeline.generate(["a cat", "a dog"], [0, 1], steps=3, guidance=6.0)
        one = ge_pipeline.generate(["a cat", "a dog"], [0, 1], steps=3, guidance=1.0)
        assert len(calls) == 6 and torch.equal(calls[-1][1], torch.ones(2))  # w = 1 is an input too
    finally:
        handle.remove()
    assert (a - b).abs().max() > 1e-4 and (a - one).abs().max() > 1e-4


def test_denoiser_of_a_ge_pipeline_needs_guidance(ge_pipeline, tiny_pipeline):
    with pytest.raises(ConfigError, match="embeds the guidance scale"):
        ge_pipeline.denoiser()
    with pytest.raises(ConfigError, match="guidance-embedded"):
        tiny_pipeline.denoiser(guidance=3.0)
    z, t, ctx = _inputs(ge_pipeline.unet)
    pred = ge_pipeline.denoiser(guidance=4.0)(z, t, ctx)
    torch.testing.assert_close(pred.eps, ge_pipeline.unet(z, t, ctx, guidance=torch.full((2,), 4.0)).float())


def test_negative_prompt_is_refused_by_the_api_and_the_fast_runner(ge_pipeline):
    from snapfusion.fast import FastOptions, Runner

    calls, handle = _count_calls(ge_pipeline.unet)
    try:
        for call in (lambda: ge_pipeline.generate(["a cat"], negative_prompt="blur"),
                     lambda: ge_pipeline("a cat", negative_prompt="blur", guidance=1.0),
                     lambda: Runner(ge_pipeline, FastOptions(graph=False, channels_last=False), batch=1,
                                    timesteps=ge_pipeline.timesteps(3, "ddim"), guidance=3.0, height=64, width=64,
                                    negative_prompt="blur")):
            with pytest.raises(InputError, match=REFUSAL) as err:
                call()
            assert "tiny-ge" in str(err.value) and "\n" not in str(err.value)
    finally:
        handle.remove()
    assert not calls  # refused before any work


def test_negative_prompt_is_refused_by_the_cli_in_one_line(ge_pipeline, tmp_path, capsys):
    ge_pipeline.save(tmp_path / "ge", dtype=None)
    out = tmp_path / "x.png"
    argv = ["generate", "a cat", "--model", str(tmp_path / "ge"), "--steps", "2", "--size", "64", "--out", str(out)]
    assert main([*argv, "--negative-prompt", "blur"]) == 2
    err = capsys.readouterr().err.strip()
    assert REFUSAL in err and "\n" not in err and not out.exists()
    assert main(argv) == 0 and out.is_file()


def test_negative_prompt_is_refused_by_the_server_with_400(ge_pipeline):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from snapfusion.serve.app import create_app
    from snapfusion.serve.engine import Engine

    engine = Engine({"warm": lambda: ge_pipeline, "cold": lambda: ge_pipeline}, "warm")
    engine.load("warm")
    engine.start()
    try:
        client = TestClient(create_app(engine, timeout=30))
        for model in ("warm", "cold"):  # checked on submit, and once a cold model has loaded
            r = client.post("/v1/images/generations", json={"prompt": "a", "negative_prompt": "blur", "model": model,
                                                            "steps": 2})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["message"].startswith(REFUSAL)
            assert r.json()["error"]["param"] == "negative_prompt"
        assert client.post("/v1/images/generations", json={"prompt": "a", "steps": 2}).status_code == 200
    finally:
        engine.stop()


def test_exports_of_a_ge_unet_are_refused_in_one_line(ge_pipeline, tmp_path):
    from snapfusion.export.components import ExportConfig
    from snapfusion.export.diffusers_export import export_diffusers
    from snapfusion.export.onnx_export import export_onnx

    for export in (lambda: export_onnx(ge_pipeline, tmp_path / "onnx", ExportConfig()),
                   lambda: export_diffusers(ge_pipeline, tmp_path / "diffusers")):
        with pytest.raises(ConfigError, match="embeds the guidance scale") as err:
            export()
        assert "\n" not in str(err.value)
    assert not (tmp_path / "onnx").exists() and not (tmp_path / "diffusers").exists()


# ---- storage ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("int8", [False, True])
def test_ge_unet_round_trips_through_save_load_and_int8(ge_pipeline, source, tmp_path, int8):
    unet = ge_pipeline.unet
    unet.save(tmp_path / "u", int8=int8)
    loaded = UNet.load(tmp_path / "u")  # weights.build_loaded: built on the meta device, then filled
    assert loaded.config.guidance_embed
    stored = load_safetensors(tmp_path / "u" / "model.safetensors")
    assert any(k.startswith("guidance_embedding.") for k in stored)
    z, t, ctx = _inputs(unet)
    with torch.no_grad():
        ref, out = unet(z, t, ctx, guidance=5.0), loaded(z, t, ctx, guidance=5.0)
    torch.testing.assert_close(out, ref, atol=0 if not int8 else 0.05 * ref.abs().max().item(), rtol=0)
    # a zero-initialised embedding stays exactly zero through int8 storage
    zero = with_guidance_embedding(UNet.load(source.unet_folder()))
    zero.save(tmp_path / "z", int8=int8)
    back = UNet.load(tmp_path / "z")
    assert back.guidance_embedding.linear_2.weight.abs().sum() == 0
    # a pipeline with an int8 GE UNet (the shipped models' storage) loads and samples
    ge_pipeline.save(tmp_path / "pipe", unet_int8=int8)
    pipe = Pipeline.load(tmp_path / "pipe")
    assert pipe.unet.config.guidance_embed
    assert torch.isfinite(pipe.generate(["a cat"], [0], steps=2, guidance=3.0)).all()


def _guidance_response_script():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("guidance_response", Path(__file__).parents[1] / "scripts" /
                                                  "guidance_response.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_guidance_response_reads_a_fresh_copy_as_no_guidance_and_the_teacher_trajectory_as_its_inputs(tiny_pipeline):
    """scripts/guidance_response.py: the zero-initialised copy of the teacher has response 0, error 1, drift 0 and
    along 0; a constant shift of the embedding is drift without response, one that depends on w is response; the
    probe's inputs are the teacher's sampler calls."""
    mod = _guidance_response_script()
    pipe, n = tiny_pipeline, 2
    with torch.no_grad():
        cond, uncond = pipe.encode_text(["a red star", "two cats"]), pipe.encode_text([""] * n)
    z = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    points = mod.trajectory_inputs(pipe, z, cond, uncond, 4.0, steps=4)
    assert [t for _, t in points] == [999, 749, 499, 249] and torch.equal(points[0][0], z)
    assert not torch.equal(points[1][0], z)
    copy = with_guidance_embedding(pipe.unet).eval()
    fresh = mod.measure(pipe.unet, copy, points[1][0], points[1][1], cond, uncond, 4.0)
    assert fresh["response"] == pytest.approx(0, abs=1e-6) and fresh["drift"] == pytest.approx(0, abs=1e-6)
    assert fresh["error"] == pytest.approx(1, abs=1e-5) and fresh["along"] == pytest.approx(0, abs=1e-5)
    with torch.no_grad():
        copy.guidance_embedding.linear_2.bias.fill_(0.5)  # the same shift at every w: drift, no response
    shifted = mod.measure(pipe.unet, copy, points[1][0], points[1][1], cond, uncond, 4.0)
    assert shifted["drift"] > 1e-3 and shifted["response"] == pytest.approx(0, abs=1e-5)
    with torch.no_grad():
        copy.guidance_embedding.linear_2.weight.normal_()  # now the shift depends on w
    assert mod.measure(pipe.unet, copy, points[1][0], points[1][1], cond, uncond, 4.0)["response"] > 1e-3
