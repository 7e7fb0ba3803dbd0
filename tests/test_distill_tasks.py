"""v fine-tuning and step distillation as Tasks of the one loop: they run, resume exactly, export, and the CLI."""

import dataclasses
import json

import pytest
import torch

from conftest import doubled_stage_widths, read_metrics, tiny_loop
from snapfusion.cli import main
from snapfusion.distill.stages import distill_steps, finetune_v
from snapfusion.distill.tasks import DistillConfig, DistillTask, ModelSource, VFinetuneConfig, VFinetuneTask
from snapfusion.errors import ConfigError
from snapfusion.models.unet import UNet
from snapfusion.pipeline import Pipeline
from snapfusion.train import state as ckpt_io
from snapfusion.train.loop import train
from snapfusion.weights import load_safetensors


@pytest.fixture(scope="module")
def source(tiny_pipeline, tmp_path_factory) -> ModelSource:
    folder = tmp_path_factory.mktemp("teacher") / "pipe"
    tiny_pipeline.save(folder, dtype=None)
    return ModelSource(pipeline=str(folder))


def _assert_same_weights(a_dir, b_dir):
    for which in ("model", "ema"):
        a = load_safetensors(ckpt_io.latest_checkpoint(a_dir) / which / "model.safetensors")
        b = load_safetensors(ckpt_io.latest_checkpoint(b_dir) / which / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=f"{which}:{k}")


def test_v_finetune_runs_resumes_and_exports(source, tmp_path):
    cfg = VFinetuneConfig(source=source, image_size=64, sample_prompts=2, sample_steps=2)
    task = VFinetuneTask(cfg)
    model = task.build()
    assert model.config.prediction_type == "v_prediction"
    teacher = UNet.load(source.unet_folder())
    for (k, a), b in zip(model.state_dict().items(), teacher.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)  # starts from the source's weights
    train(tiny_loop(tmp_path / "straight", 3), VFinetuneTask(cfg))
    train(tiny_loop(tmp_path / "split", 2), VFinetuneTask(cfg))
    final = finetune_v(tiny_loop(tmp_path / "split", 3, sample_every=3), cfg, resume=True)
    _assert_same_weights(tmp_path / "straight", tmp_path / "split")
    assert [r["loss"] for r in read_metrics(tmp_path / "split")] == [r["loss"] for r in read_metrics(tmp_path / "straight")]
    assert UNet.load(final).config.prediction_type == "v_prediction"
    pipe = Pipeline.load(tmp_path / "split" / "pipeline")
    assert pipe.unet.config.prediction_type == "v_prediction" and pipe.config.name == "base-v"
    report = json.loads((tmp_path / "split" / "samples" / "step_0000003.json").read_text())
    assert set(report["mse_to_source@2"]) == {"v@2"} and report["mse_to_source@2"]["v@2"] >= 0


@pytest.mark.parametrize("cfg_prob", [0.0, 1.0])
def test_distill_loss_paths(source, cfg_prob):
    task = DistillTask(DistillConfig(source=source, student_steps=2, cfg_prob=cfg_prob, image_size=64))
    model = task.build()
    batch = task.collate([task.dataset()[i] for i in range(2)])
    gen = torch.Generator().manual_seed(0)
    per_sample, logs = task.loss(model, batch, gen)
    assert per_sample.shape == (2,) and bool(torch.isfinite(per_sample).all())
    assert logs["cfg_aware"] == cfg_prob
    # student == teacher at the start: L_dstl > 0 (one step is not two), L_ori adds gamma of it
    torch.testing.assert_close(per_sample.mean(), 1.2 * torch.tensor(logs["l_dstl"]), rtol=1e-5, atol=0)
    per_sample.mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad is None for p in task.teacher.parameters())


def test_distill_runs_resumes_and_exports(source, tmp_path):
    cfg = DistillConfig(source=source, student_steps=2, cfg_prob=0.5, image_size=64, sample_prompts=2)
    train(tiny_loop(tmp_path / "straight", 3), DistillTask(cfg))
    train(tiny_loop(tmp_path / "split", 1), DistillTask(cfg))
    final = distill_steps(tiny_loop(tmp_path / "split", 3, sample_every=3), cfg, resume=True)
    _assert_same_weights(tmp_path / "straight", tmp_path / "split")
    split, straight = read_metrics(tmp_path / "split"), read_metrics(tmp_path / "straight")
    assert [r["cfg_aware"] for r in split] == [r["cfg_aware"] for r in straight]
    assert [r["loss"] for r in split] == [r["loss"] for r in straight]
    pipe = Pipeline.load(tmp_path / "split" / "pipeline")
    assert (pipe.config.steps, pipe.config.timestep_spacing) == (2, "trailing")
    assert UNet.load(final).config == pipe.unet.config
    report = json.loads((tmp_path / "split" / "samples" / "step_0000003.json").read_text())
    assert set(report["mse_to_teacher@4"]) == {"teacher@2", "student@2"}
    run = json.loads((tmp_path / "split" / "run_config.json").read_text())
    assert run["task"]["student_grid"] == [999, 499, 0] and run["task"]["teacher_grid"] == [999, 749, 499, 249, 0]


def test_a_teacher_ratio_of_4_walks_four_teacher_steps_per_student_step(source, tmp_path):
    cfg = DistillConfig(source=source, student_steps=2, teacher_ratio=4, cfg_prob=0.5, image_size=64,
                        sample_prompts=2)
    task = DistillTask(cfg)
    assert task.grid.teacher.tolist() == [999, 874, 749, 624, 499, 374, 249, 124, 0]
    model = task.build()
    per_sample, logs = task.loss(model, task.collate([task.dataset()[i] for i in range(2)]),
                                 torch.Generator().manual_seed(0))
    assert per_sample.shape == (2,) and bool(torch.isfinite(per_sample).all())
    two = DistillTask(dataclasses.replace(cfg, teacher_ratio=2))  # same draw, another target
    per_two, _ = two.loss(two.build(), two.collate([two.dataset()[i] for i in range(2)]),
                          torch.Generator().manual_seed(0))
    assert not torch.allclose(per_sample, per_two)
    distill_steps(tiny_loop(tmp_path / "r4", 1, sample_every=1), cfg)
    report = json.loads((tmp_path / "r4" / "samples" / "step_0000001.json").read_text())
    assert set(report["mse_to_teacher@8"]) == {"teacher@2", "student@2"}
    with pytest.raises(ConfigError, match="--teacher-ratio"):
        DistillConfig(source=source, teacher_ratio=0)


def test_bad_settings_are_one_line_errors(source, tmp_path, capsys):
    with pytest.raises(ConfigError, match="cfg_prob"):
        DistillConfig(source=source, cfg_prob=1.5)
    with pytest.raises(ConfigError, match="guidance range"):
        DistillConfig(source=source, guidance_range=(14.0, 2.0))
    assert main(["distill", "--run-dir", str(tmp_path / "r"), "--model", str(tmp_path / "nope")]) == 2
    assert "no snapfusion pipeline folder" in capsys.readouterr().err
    no_encoder = tmp_path / "pipe"
    Pipeline.load(source.pipeline).save(no_encoder, dtype=None)
    assert main(["finetune-v", "--run-dir", str(tmp_path / "r"), "--model", str(no_encoder)]) == 2
    err = capsys.readouterr().err
    assert "no VAE encoder" in err and len(err.strip().splitlines()) == 1


def test_export_pipeline_keeps_a_tiny_decoder(tiny_pipeline, tmp_path):
    from snapfusion.decoder.io import with_decoder
    from snapfusion.decoder.tiny import TinyDecoder, TinyDecoderConfig
    from snapfusion.distill.stages import export_pipeline

    tiny = TinyDecoder(TinyDecoderConfig(widths=(8, 8, 8, 8), blocks=(1, 1, 1, 1),
                                         scaling_factor=tiny_pipeline.decoder.config.scaling_factor))
    with_decoder(tiny_pipeline, tiny).save(tmp_path / "pipe", dtype=None)
    out = export_pipeline(ModelSource(pipeline=str(tmp_path / "pipe")), tmp_path / "pipe" / "unet",
                          tmp_path / "exported", tiny_pipeline.config)
    assert isinstance(Pipeline.load(out).decoder, TinyDecoder)


def test_corrupt_model_index_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{not json")
    assert main(["distill", "--run-dir", str(tmp_path / "r"), "--model", str(tmp_path / "pipe")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def _nudged(model, seed=5, scale=0.01):
    """``model`` with every weight moved by scale x N(0, 1): its stage outputs differ from its source's."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def _draw(task, batch, seed=0):
    """The loss's own draws, replayed: x0, context, t and z of a v fine-tuning loss call with this seed."""
    from snapfusion.distill.tasks import _encode

    gen = torch.Generator().manual_seed(seed)
    x0, context = _encode(task.data, batch, gen)
    t = torch.randint(0, task.schedule.num_train_timesteps, (x0.shape[0],), generator=gen)
    eps = task.noising.noise(x0, gen)
    return x0, context, t, eps, task.schedule.add_noise(x0, eps, t)


def test_v_finetune_with_a_kd_teacher_adds_robust_trains_terms_on_the_implied_eps(source, tmp_path):
    """finetune-v --kd-unet T: the loss is L_ori + kd_weight x the Min-SNR eps MSE of the v student's implied eps
    to T's + kd_feature_weight x the stage-output MSE to T's, both recomputed here by hand. Started from T's weights
    the stage outputs agree (feature term 0) but the output, now read as v, does not; a v teacher's target is its
    implied eps."""
    import dataclasses

    from snapfusion.losses import v_loss
    from snapfusion.sampling import Denoiser
    from snapfusion.losses import eps_mse_min_snr, feature_mse

    teacher_folder = source.unet_folder()
    plain = VFinetuneTask(VFinetuneConfig(source=source, image_size=64))
    kd = VFinetuneTask(VFinetuneConfig(source=source, image_size=64, kd_unet=str(teacher_folder), kd_weight=2.0,
                                       kd_feature_weight=3.0))
    batch = kd.collate([kd.dataset()[i] for i in range(2)])
    start = kd.build()
    _, logs = kd.loss(start, batch, torch.Generator().manual_seed(0))
    assert float(logs["kd"]) > 0 and float(logs["kd_feat"]) < 1e-10
    model = _nudged(kd.build())
    loss, logs = kd.loss(model, batch, torch.Generator().manual_seed(0))
    base, base_logs = plain.loss(model, batch, torch.Generator().manual_seed(0))
    assert base_logs == {} and float(logs["kd_feat"]) > 0
    torch.testing.assert_close((loss - base).mean(), 2.0 * logs["kd"] + 3.0 * logs["kd_feat"])
    x0, context, t, eps, z = _draw(kd, batch)
    with torch.no_grad():
        fs, ft = [], []
        pred = Denoiser(lambda *a: model(*a, features=fs), kd.schedule, "v_prediction")(z, t, context)
        target = kd.kd.teacher(z, t, context, features=ft)
        alpha, sigma = kd.schedule.alpha_sigma(t)
        torch.testing.assert_close(logs["kd"], eps_mse_min_snr(pred.eps, target, (alpha / sigma) ** 2, 5.0).mean())
        torch.testing.assert_close(logs["kd_feat"], feature_mse(fs, ft).mean())
        torch.testing.assert_close(base, v_loss(pred, x0, eps, t, kd.schedule))
    loss.mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad is None for p in kd.kd.teacher.parameters())
    # a v teacher: T's own weights read as v. Its target is its implied eps, sigma z + alpha v_hat, so
    # the student started from T's weights (also read as v) has nothing left to distill
    as_v = UNet.load(teacher_folder)
    v_teacher = UNet(dataclasses.replace(as_v.config, prediction_type="v_prediction"))
    v_teacher.load_state_dict(as_v.state_dict())
    v_teacher.save(tmp_path / "v")
    kd_v = VFinetuneTask(VFinetuneConfig(source=source, image_size=64, kd_unet=str(tmp_path / "v")))
    _, logs = kd_v.loss(kd_v.build(), batch, torch.Generator().manual_seed(0))
    assert float(logs["kd"]) < 1e-10
    _, logs = kd_v.loss(model, batch, torch.Generator().manual_seed(0))
    with torch.no_grad():
        v_target = Denoiser(kd_v.kd.teacher, kd.schedule, "v_prediction")(z, t, context).eps
        torch.testing.assert_close(logs["kd"], eps_mse_min_snr(pred.eps, v_target, (alpha / sigma) ** 2, 5.0).mean())


def test_distill_feature_term_compares_the_cond_pass_with_the_teacher_and_is_rescaled(source, tmp_path):
    """distill --feature-weight f: L_feat is the stage-output MSE of the student's conditional pass (the cond half
    of a guided 2B pass) to the teacher's at (z_t, t, c), so it is 0 for a student equal to its teacher even under
    guidance; the term adds f x r x L_feat, r = mean L_dstl / mean L_feat, so its batch mean is f x mean L_dstl;
    its gradient reaches the student on its own; unequal stage widths and bad weights are refused."""
    from snapfusion.losses import rescaled
    from snapfusion.losses import feature_mse

    for cfg_prob in (0.0, 1.0):
        plain = DistillTask(DistillConfig(source=source, student_steps=2, cfg_prob=cfg_prob, image_size=64))
        feat = DistillTask(DistillConfig(source=source, student_steps=2, cfg_prob=cfg_prob, image_size=64,
                                         feature_weight=0.5))
        batch = feat.collate([feat.dataset()[i] for i in range(2)])
        _, logs = feat.loss(feat.build(), batch, torch.Generator().manual_seed(0))
        assert logs["cfg_aware"] == cfg_prob and logs["l_feat"] < 1e-10  # the uncond half would not match
        model = _nudged(feat.build())
        loss, logs = feat.loss(model, batch, torch.Generator().manual_seed(0))
        base, base_logs = plain.loss(model, batch, torch.Generator().manual_seed(0))
        assert "l_feat" not in base_logs and logs["l_feat"] > 0
        torch.testing.assert_close((loss - base).mean(), torch.tensor(0.5 * logs["l_dstl"]), rtol=1e-5, atol=0)
    # L_feat by hand on the loss's own draws (cfg_prob 1: the same t and z_t as the loss saw)
    from snapfusion.distill.tasks import _encode

    gen = torch.Generator().manual_seed(0)
    x0, cond = _encode(feat.data, batch, gen)
    t, _, _ = feat.grid.sample(2, gen)
    z = feat.schedule.add_noise(x0, feat.noising.noise(x0, gen), t)
    fs, ft = [], []
    model(z, t, cond, features=fs)
    with torch.no_grad():
        feat.teacher(z, t, cond, features=ft)
    l_feat = feature_mse(fs, ft)
    torch.testing.assert_close(l_feat.mean().detach(), torch.tensor(logs["l_feat"]), rtol=1e-5, atol=0)
    grads = torch.autograd.grad(rescaled(torch.ones(2), l_feat, 0.5).sum(), list(model.parameters()),
                                allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    with pytest.raises(ConfigError, match="feature-weight"):
        DistillConfig(source=source, feature_weight=-1.0)
    with pytest.raises(ConfigError, match="feature-weight"):
        DistillConfig(source=source, feature_weight=float("nan"))
    UNet(doubled_stage_widths(UNet.load(source.unet_folder()).config)).save(tmp_path / "wide")
    with pytest.raises(ConfigError, match="stage widths"):
        DistillTask(DistillConfig(source=source, student_unet=str(tmp_path / "wide"), feature_weight=0.5))
    DistillTask(DistillConfig(source=source, student_unet=str(tmp_path / "wide")))  # fine without the term


def test_kd_options_of_finetune_v_and_distill_reach_their_tasks(source, tmp_path, monkeypatch, capsys):
    import snapfusion.distill.stages as stages

    seen = {}
    monkeypatch.setattr(stages, "finetune_v", lambda loop, cfg, resume=False: seen.update(v=cfg))
    monkeypatch.setattr(stages, "distill_steps", lambda loop, cfg, resume=False: seen.update(d=cfg))
    teacher = str(source.unet_folder())
    base = ["--run-dir", str(tmp_path / "r"), "--model", source.pipeline, "--max-steps", "1"]
    assert main(["finetune-v", *base, "--kd-unet", teacher, "--kd-feature-weight", "0.5"]) == 0
    assert (seen["v"].kd_unet, seen["v"].kd_weight, seen["v"].kd_feature_weight) == (teacher, 1.0, 0.5)
    assert main(["distill", *base, "--feature-weight", "0.25"]) == 0
    assert seen["d"].feature_weight == 0.25
    assert main(["finetune-v", *base, "--kd-feature-weight", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--kd-feature-weight needs --kd-unet" in err and "\n" not in err


@pytest.mark.parametrize("task_cls", ["v", "distill"])
def test_offset_noise_and_latent_pool_reach_v_finetuning_and_distillation(source, task_cls):
    def make(**kw):
        if task_cls == "v":
            return VFinetuneTask(VFinetuneConfig(source=source, image_size=64, **kw))
        return DistillTask(DistillConfig(source=source, student_steps=2, cfg_prob=0.0, image_size=64, **kw))

    plain, pooled = make(), make(latent_pool=4, offset_noise=0.5)
    assert pooled.data.cfg.latent_pool == 4 and pooled.data.cfg.offset_noise == 0.5
    items = [pooled.dataset()[i] for i in range(6)]
    assert {it["index"] for it in items} == {0, 1, 2, 3}  # the pool's scenes, cycled
    batch = pooled.collate(items[:2])
    loss, _ = pooled.loss(pooled.build(), batch, torch.Generator().manual_seed(0))
    assert loss.shape == (2,) and bool(torch.isfinite(loss).all())
    # offset noise: the per-sample channel means of eps spread far more than N(0, 1) noise allows
    x0 = torch.zeros(256, 4, 8, 8)
    spread = {k: float(t.noising.noise(x0, torch.Generator().manual_seed(1)).mean((2, 3)).std())
              for k, t in (("plain", plain), ("offset", pooled))}
    assert spread["plain"] == pytest.approx(1 / 8, rel=0.2) and spread["offset"] == pytest.approx(0.5, rel=0.2)


def test_negative_offset_or_pool_is_a_one_line_error(source, tmp_path, capsys):
    for flag in (["--offset-noise", "-0.1"], ["--latent-pool", "-1"]):
        assert main(["distill", "--run-dir", str(tmp_path / "d"), "--model", source.pipeline, *flag]) == 2
        err = capsys.readouterr().err
        assert "must be >= 0" in err and err.count("\n") == 1
    assert not (tmp_path / "d").exists()  # refused before any run folder is made
