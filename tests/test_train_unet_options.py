"""UNet training options: starting from a trained UNet (--init-unet / --from-pipeline) and offset noise."""

import dataclasses

import pytest
import torch

from conftest import TINY_TEXT, doubled_stage_widths
from snapfusion.errors import ConfigError
from snapfusion.models.autoencoder import AutoencoderConfig, AutoencoderKL, save_autoencoder
from snapfusion.models.text import TextEncoder, save_text_encoder
from snapfusion.models.unet import UNet
from snapfusion.models.unet_config import tiny_sd15
from snapfusion.losses import hybrid_weights
from snapfusion.train.unet import UNetTask, UNetTaskConfig

UNET = dataclasses.replace(tiny_sd15(), context_dim=32)


@pytest.fixture()
def parts(tmp_path):
    torch.manual_seed(0)
    save_autoencoder(tmp_path / "vae", AutoencoderKL(AutoencoderConfig.tiny()))
    save_text_encoder(tmp_path / "text", TextEncoder(TINY_TEXT))
    return dict(vae=str(tmp_path / "vae"), text_encoder=str(tmp_path / "text"), image_size=64)


def test_init_unet_starts_from_the_folder_and_checks_the_config(parts, tmp_path):
    torch.manual_seed(1)
    trained = UNet(UNET)
    trained.save(tmp_path / "unet", dtype=torch.float16)
    built = UNetTask(UNetTaskConfig(model=UNET, init_unet=str(tmp_path / "unet"), **parts)).build()
    assert next(built.parameters()).dtype == torch.float32  # fp32 master weights from an fp16 folder
    for (name, a), b in zip(built.state_dict().items(), trained.state_dict().values()):
        torch.testing.assert_close(a, b.half().float(), atol=0, rtol=0, msg=name)
    other = dataclasses.replace(UNET, norm_groups=4)
    with pytest.raises(ConfigError, match="differs"):
        UNetTask(UNetTaskConfig(model=other, init_unet=str(tmp_path / "unet"), **parts)).build()


def _noise_of_one_step(parts, offset: float, monkeypatch, grid: int = 1) -> torch.Tensor:
    """The training noise one loss call adds (B=64 samples, 8x8 latents)."""
    task = UNetTask(UNetTaskConfig(model=UNET, offset_noise=offset, offset_noise_grid=grid, latent_pool=4,
                                   pool_workers=0, **parts))
    seen = []
    original = task.schedule.add_noise
    monkeypatch.setattr(task.schedule, "add_noise", lambda x0, eps, t: seen.append(eps) or original(x0, eps, t))
    batch = task.collate([task.dataset()[i] for i in range(64)])
    task.loss(UNet(UNET), batch, torch.Generator().manual_seed(0))
    return seen[0]


def _channel_means_of_noise(parts, offset: float, monkeypatch) -> torch.Tensor:
    """Per-sample, per-channel spatial means of the noise one loss call adds (B=64 samples)."""
    return _noise_of_one_step(parts, offset, monkeypatch).mean(dim=(2, 3))


def test_offset_noise_moves_each_channels_mean(parts, monkeypatch):
    plain = _channel_means_of_noise(parts, 0.0, monkeypatch)
    offset = _channel_means_of_noise(parts, 0.5, monkeypatch)
    # 8x8 latents: the spatial mean of white noise has std 1/8; the offset adds std 0.5 per sample and channel
    assert 0.08 < plain.std().item() < 0.17
    assert 0.4 < offset.std().item() < 0.65


def test_offset_noise_grid_also_moves_the_contrast_between_image_halves(parts, monkeypatch):
    """--offset-noise-grid 2 adds the offset on a 2x2 grid too: the left-minus-right half means of the noise spread
    (white noise: std 2/8 over 8x8 latents)."""
    def halves(eps):
        return eps[..., :4].mean(dim=(2, 3)) - eps[..., 4:].mean(dim=(2, 3))

    plain = _noise_of_one_step(parts, 1.0, monkeypatch)
    gridded = _noise_of_one_step(parts, 1.0, monkeypatch, grid=2)
    assert 0.17 < halves(plain).std().item() < 0.33
    # + the 2x2 draw: its halves differ by std 1, about 0.75 of that survives the bilinear upsampling: 0.8 in all
    assert 0.6 < halves(gridded).std().item() < 1.0
    # the channel means: the 1x1 offset (std 1) plus the 2x2 draw's mean (std 1/2)
    assert 0.9 < gridded.mean(dim=(2, 3)).std().item() < 1.4


@pytest.mark.parametrize("grid, offset, message", [(3, 0.1, "power of 2"), (0, 0.1, "power of 2"),
                                                   (2, 0.0, "needs --offset-noise")])
def test_bad_offset_noise_grids_are_refused(parts, grid, offset, message):
    with pytest.raises(ConfigError, match=message):
        UNetTask(UNetTaskConfig(model=UNET, offset_noise=offset, offset_noise_grid=grid, **parts))


def test_train_unet_command_checks_its_folders_before_training(tmp_path, capsys):
    from snapfusion.cli import main

    enc = tmp_path / "enc"
    save_autoencoder(enc, AutoencoderKL(AutoencoderConfig.tiny()).encoder)
    text = tmp_path / "text"
    save_text_encoder(text, TextEncoder(TINY_TEXT))
    base = ["train-unet", "--run-dir", str(tmp_path / "run"), "--text-encoder", str(text)]
    assert main(base + ["--vae", str(enc)]) == 2  # an encoder alone cannot draw the sample grids
    assert "--vae-decoder" in capsys.readouterr().err
    assert main(base + ["--vae", str(enc), "--offset-noise", "-0.1"]) == 2
    assert "--offset-noise" in capsys.readouterr().err
    assert main(["train-unet", "--run-dir", str(tmp_path / "r2"), "--from-pipeline", str(tmp_path / "none")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "r2").exists()


def test_kd_teacher_adds_a_distillation_term_that_vanishes_on_itself(parts, tmp_path):
    """--kd-unet: the loss gains kd_weight x the weighted MSE to the teacher's prediction; a student equal to its
    teacher pays nothing extra, a different one does."""
    torch.manual_seed(3)
    teacher = UNet(UNET)
    teacher.save(tmp_path / "teacher")
    task = UNetTask(UNetTaskConfig(model=UNET, kd_unet=str(tmp_path / "teacher"), kd_weight=2.0, latent_pool=4,
                                   pool_workers=0, **parts))
    plain = UNetTask(UNetTaskConfig(model=UNET, latent_pool=4, pool_workers=0, **parts))
    batch = task.collate([task.dataset()[i] for i in range(4)])
    same = UNet(UNET)
    same.load_state_dict(teacher.state_dict())
    loss, logs = task.loss(same, batch, torch.Generator().manual_seed(0))
    base, _ = plain.loss(same, batch, torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, base)
    assert float(logs["kd"]) < 1e-10
    other = UNet(UNET)
    loss, logs = task.loss(other, batch, torch.Generator().manual_seed(0))
    base, _ = plain.loss(other, batch, torch.Generator().manual_seed(0))
    assert float(logs["kd"]) > 0
    torch.testing.assert_close((loss - base).mean(), 2.0 * logs["kd"])  # per-sample loss, batch-mean log


@pytest.mark.parametrize("change, weight, message", [
    (dict(context_dim=16), 1.0, "context width"),          # reads another text tower
    (dict(in_channels=3, out_channels=3), 1.0, "channels"),  # another latent space
    ({}, float("nan"), "kd-weight"), ({}, -1.0, "kd-weight"), ({}, 0.0, "kd-weight"),
])
def test_a_kd_teacher_that_does_not_fit_is_refused_before_training(parts, tmp_path, change, weight, message):
    UNet(dataclasses.replace(UNET, **change)).save(tmp_path / "t")
    with pytest.raises(ConfigError, match=message):
        UNetTask(UNetTaskConfig(model=UNET, kd_unet=str(tmp_path / "t"), kd_weight=weight, **parts))


def test_robust_train_kd_options_are_one_line_errors(tmp_path, capsys):
    from snapfusion.cli import main

    base = ["robust-train", "--run-dir", str(tmp_path / "r"), "--model", "base", "--max-steps", "1"]
    assert main([*base, "--kd-weight", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--kd-weight needs --kd-unet" in err and "\n" not in err
    assert main([*base, "--kd-unet", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--kd-unet" in err and "\n" not in err


def test_unet_features_are_the_stage_outputs_and_change_nothing_else():
    """forward(features=[]) collects one output per stage (down, mid, up) at the stage's width and resolution,
    and the prediction is bit-identical to a call without it."""
    from snapfusion.models.unet_config import stage_widths

    torch.manual_seed(5)
    unet = UNet(UNET).eval()
    z, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    feats: list[torch.Tensor] = []
    with torch.no_grad():
        out = unet(z, 500, ctx, features=feats)
        torch.testing.assert_close(out, unet(z, 500, ctx), atol=0, rtol=0)
    assert [f.shape[1] for f in feats] == list(stage_widths(UNET))
    n_down = len(UNET.down)
    sides = [f.shape[-1] for f in feats]
    assert sides[0] == 16 and sides[n_down - 1] == 16 // 2 ** (n_down - 1) and sides[-1] == 16


def test_feature_kd_adds_stage_output_distances_to_an_evolved_student(parts, tmp_path):
    """--kd-feature-weight: zero for a student equal to its teacher; for a student with a block removed (what
    evolution produces) the loss grows by exactly weight x the summed stage-output MSE, which is > 0."""
    from snapfusion.evolve.actions import Action, edited_unet
    from snapfusion.losses import feature_mse

    torch.manual_seed(3)
    teacher = UNet(UNET)
    teacher.save(tmp_path / "teacher")
    same = UNet(UNET)
    same.load_state_dict(teacher.state_dict())
    small, _, _ = edited_unet(teacher, Action("remove", "down.1.res.1"))
    small.requires_grad_(True)
    with_feat = dict(kd_unet=str(tmp_path / "teacher"), latent_pool=4, pool_workers=0, **parts)
    for student in (same, small):
        feat_task = UNetTask(UNetTaskConfig(model=student.config, kd_feature_weight=3.0, **with_feat))
        out_task = UNetTask(UNetTaskConfig(model=student.config, **with_feat))
        batch = feat_task.collate([feat_task.dataset()[i] for i in range(4)])
        loss, logs = feat_task.loss(student, batch, torch.Generator().manual_seed(0))
        plain, plain_logs = out_task.loss(student, batch, torch.Generator().manual_seed(0))
        assert "kd_feat" not in plain_logs
        torch.testing.assert_close((loss - plain).mean(), 3.0 * logs["kd_feat"])
        assert (float(logs["kd_feat"]) < 1e-10) == (student is same)
    feats_s, feats_t = [], []  # the feature term alone reaches the student's first block
    z, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)
    with torch.no_grad():
        teacher(z, 300, ctx, features=feats_t)
    small(z, 300, ctx, features=feats_s)
    feature_mse(feats_s, feats_t).sum().backward()
    assert small.down[0].res["0"].conv1.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="empty list"):
        small(z, 300, ctx, features=[torch.zeros(1)])
    with pytest.raises(ConfigError, match="stage 0"):
        feature_mse([torch.zeros(1, 8, 4, 4)], [torch.zeros(1, 16, 4, 4)])


@pytest.mark.parametrize("change, weight, message", [
    (dict(down=None), 1.0, "stage widths"), ({}, -1.0, "kd-feature-weight"), ({}, float("inf"), "kd-feature-weight"),
])
def test_feature_kd_refuses_a_teacher_with_other_stages_or_a_bad_weight(parts, tmp_path, change, weight, message):
    cfg = doubled_stage_widths(UNET) if "down" in change else UNET
    UNet(cfg).save(tmp_path / "t")
    with pytest.raises(ConfigError, match=message):
        UNetTask(UNetTaskConfig(model=UNET, kd_unet=str(tmp_path / "t"), kd_feature_weight=weight, **parts))


def test_robust_train_kd_feature_weight_reaches_the_task(tmp_path, monkeypatch):
    """robust-train --kd-unet T --kd-feature-weight W: the task that trains gets W and T."""
    import snapfusion.train.loop as loop
    from snapfusion.loading import EMBEDDED
    from snapfusion.cli import main

    seen = {}
    monkeypatch.setattr(loop, "train", lambda cfg, task, resume=False: seen.update(task=task))
    teacher = str(EMBEDDED / "base" / "unet")
    assert main(["robust-train", "--run-dir", str(tmp_path / "r"), "--model", "base", "--max-steps", "1",
                 "--kd-unet", teacher, "--kd-feature-weight", "0.5"]) == 0
    cfg = seen["task"].cfg
    assert (cfg.kd_unet, cfg.kd_weight, cfg.kd_feature_weight) == (teacher, 1.0, 0.5)


def test_robust_train_kd_feature_weight_needs_a_teacher(tmp_path, capsys):
    from snapfusion.cli import main

    args = ["robust-train", "--run-dir", str(tmp_path / "r"), "--model", "base", "--max-steps", "1",
            "--kd-feature-weight", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "--kd-feature-weight needs --kd-unet" in err and "\n" not in err
    assert not (tmp_path / "r").exists()


def test_clip_skip_trains_on_the_shorter_tower_and_assemble_ships_it(parts, tmp_path, monkeypatch):
    """train-unet --clip-skip 1 conditions on the tower without its last layer; assemble --clip-skip 1 writes
    that tower, so the pipeline's context is the one the UNet trained on; a skip the tower cannot take is one line."""
    import snapfusion.train.stages as stages
    from snapfusion.cli import main
    from snapfusion.models.text import Tokenizer, load_text_encoder, skip_layers
    from snapfusion.pipeline import Pipeline

    seen = {}
    monkeypatch.setattr(stages, "train", lambda cfg, task, resume=False: seen.update(task=task) or {"is_main": False})
    args = ["train-unet", "--run-dir", str(tmp_path / "r"), "--vae", parts["vae"], "--text-encoder",
            parts["text_encoder"], "--image-size", "64", "--max-steps", "1", "--sample-every", "0"]
    assert main(args + ["--clip-skip", "1"]) == 0
    task = seen["task"]
    assert task.cfg.clip_skip == 1 and task.data.text.config.num_layers == TINY_TEXT.num_layers - 1
    ids = Tokenizer()(["a red star"])
    full = load_text_encoder(parts["text_encoder"]).eval()
    with torch.no_grad():
        want = skip_layers(full, 1)(ids)
        torch.testing.assert_close(task.data.text(ids), want, atol=0, rtol=0)
        UNet(UNET).save(tmp_path / "unet")
        assert main(["assemble", "--text-encoder", parts["text_encoder"], "--vae", parts["vae"], "--unet",
                     str(tmp_path / "unet"), "--out", str(tmp_path / "pipe"), "--clip-skip", "1"]) == 0
        pipe = Pipeline.load(tmp_path / "pipe")
        assert pipe.text_encoder.config.num_layers == TINY_TEXT.num_layers - 1
        torch.testing.assert_close(pipe.encode_text(["a red star"]), want.half().float(), atol=2e-2, rtol=0)
    assert main(args + ["--clip-skip", str(TINY_TEXT.num_layers)]) == 2


def test_v_loss_weighting_of_an_eps_model_is_the_plain_v_mse_at_the_usual_scale(parts, monkeypatch):
    """--loss-weighting v: per sample, ||v_hat - v||^2 of the v implied by the eps prediction, divided by the mean of
    1 / alphabar over the schedule; the Min-SNR default differs from it, and most at the noisiest steps."""
    torch.manual_seed(3)
    model = UNet(UNET)  # one network for both weightings: the same predictions, weighted differently
    outputs, losses, seen = [], {}, {}
    monkeypatch.setattr(model, "forward", lambda z, t, c, f=model.forward: outputs.append((z, f(z, t, c))) or
                        outputs[-1][1])
    for weighting in ("min-snr", "v"):
        task = UNetTask(UNetTaskConfig(model=UNET, loss_weighting=weighting, latent_pool=4, pool_workers=0, **parts))
        original = task.schedule.add_noise
        monkeypatch.setattr(task.schedule, "add_noise",
                            lambda x0, eps, t, o=original, w=weighting: seen.update({w: (x0, eps, t)}) or o(x0, eps, t))
        batch = task.collate([task.dataset()[i] for i in range(16)])
        losses[weighting] = task.loss(model, batch, torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(outputs[0][1], outputs[1][1])  # the same draw of x0, t and noise, the same output
    seen = dict(zip(("x0", "eps", "t"), seen["v"]))
    z, eps_hat = outputs[-1]
    alpha, sigma = task.schedule.alpha_sigma(seen["t"])
    a, s = alpha[:, None, None, None], sigma[:, None, None, None]
    x0_hat = (z - s * eps_hat) / a
    v_hat, v = a * eps_hat - s * x0_hat, a * seen["eps"] - s * seen["x0"]
    mean_inv_abar = (1 / task.schedule.alphas_cumprod).mean()
    expected = (v_hat - v).pow(2).flatten(1).mean(1) / mean_inv_abar
    torch.testing.assert_close(losses["v"], expected.detach(), rtol=1e-4, atol=1e-6)
    assert 20 < mean_inv_abar < 23  # SD's scaled-linear schedule
    ratio = losses["v"] / losses["min-snr"]  # = 1 / (alphabar mean) where SNR < 5, the noisiest steps weigh most
    noisy = seen["t"] > 600
    assert noisy.any() and (~noisy).any() and ratio[noisy].min() > ratio[~noisy].max()


def test_hybrid_loss_weighting_is_the_larger_of_min_snr_and_v_rescaled(parts):
    """--loss-weighting hybrid: per sample the larger of the Min-SNR and the v loss of the same prediction, divided
    by the mean of the larger weight over the schedule; on SD's schedule the noisy end keeps most of v's emphasis and
    the middle most of Min-SNR's."""
    torch.manual_seed(3)
    model, losses = UNet(UNET), {}
    for weighting in ("min-snr", "v", "hybrid"):
        task = UNetTask(UNetTaskConfig(model=UNET, loss_weighting=weighting, latent_pool=4, pool_workers=0, **parts))
        batch = task.collate([task.dataset()[i] for i in range(16)])
        losses[weighting] = task.loss(model, batch, torch.Generator().manual_seed(0))[0].detach()
    abar = task.schedule.alphas_cumprod.double()
    snr = abar / (1 - abar)
    larger = torch.maximum(torch.clamp(snr, max=5.0) / snr, (1 / abar) / (1 / abar).mean())
    torch.testing.assert_close(losses["hybrid"] * larger.mean().float(), torch.maximum(losses["min-snr"], losses["v"]),
                               rtol=1e-4, atol=1e-7)
    w = hybrid_weights(abar.sqrt().float(), task.schedule, 5.0).double()
    assert abs(w.mean().item() - 1) < 1e-5
    assert 0.5 < (w[800:].sum() / w.sum()).item() < 0.56 and 0.25 < (w[:500].sum() / w.sum()).item() < 0.3
    assert 6 < w[999].item() < 7 and 0.6 < w[500].item() < 0.7  # v: 10.1 and 0.17; Min-SNR: 1.09 and 1.09


def test_bad_loss_weighting_is_refused(parts):
    with pytest.raises(ConfigError, match="--loss-weighting"):
        UNetTask(UNetTaskConfig(model=UNET, loss_weighting="x0", **parts))


@pytest.mark.parametrize("bias, extra, favoured", [
    ("later", dict(timestep_bias_portion=0.25), slice(750, 1000)),
    ("earlier", dict(timestep_bias_portion=0.1), slice(0, 100)),
    ("range", dict(timestep_bias_begin=800, timestep_bias_end=950), slice(800, 950)),
])
def test_timestep_bias_draws_the_favoured_timesteps_that_many_times_as_often(parts, bias, extra, favoured):
    """--timestep-bias (diffusers' --timestep_bias_strategy): the favoured timesteps weigh the multiplier, the rest 1,
    and the training draw follows those weights."""
    task = UNetTask(UNetTaskConfig(model=UNET, timestep_bias=bias, timestep_bias_multiplier=3.0, **extra, **parts))
    w = task.noising.t_weights
    assert w.shape == (1000,) and set(w[favoured].tolist()) == {3.0}
    assert (w.sum() - w[favoured].sum()).item() == 1000 - len(range(1000)[favoured])
    t = task.noising.timesteps(40000, torch.Generator().manual_seed(0))
    inside = ((t >= favoured.start) & (t < favoured.stop)).float().mean().item()
    assert inside == pytest.approx(w[favoured].sum().item() / w.sum().item(), abs=0.01)
    assert t.min() >= 0 and t.max() < 1000


def test_timestep_bias_multiplier_zero_leaves_out_those_timesteps(parts):
    """--timestep-bias earlier --timestep-bias-portion 0.8 --timestep-bias-multiplier 0: only t >= 800 is trained."""
    task = UNetTask(UNetTaskConfig(model=UNET, timestep_bias="earlier", timestep_bias_portion=0.8,
                                   timestep_bias_multiplier=0.0, **parts))
    t = task.noising.timesteps(5000, torch.Generator().manual_seed(1))
    assert t.min() >= 800 and t.max() == 999


def test_no_timestep_bias_keeps_the_uniform_draw(parts):
    """Without the option the timesteps are the draw they always were (old runs resume on the same stream)."""
    task = UNetTask(UNetTaskConfig(model=UNET, **parts))
    assert task.noising.t_weights is None
    want = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(task.noising.timesteps(64, torch.Generator().manual_seed(5)), want, atol=0, rtol=0)


@pytest.mark.parametrize("change, message", [
    (dict(timestep_bias="late"), "--timestep-bias must be one of"),
    (dict(timestep_bias="later", timestep_bias_multiplier=-1.0), "multiplier must be >= 0"),
    (dict(timestep_bias="later", timestep_bias_portion=0.0), "portion must be in"),
    (dict(timestep_bias="range", timestep_bias_begin=900, timestep_bias_end=900), "BEGIN < END"),
    (dict(timestep_bias="range", timestep_bias_begin=0, timestep_bias_end=1000, timestep_bias_multiplier=0.0),
     "nothing to train on"),
])
def test_bad_timestep_biases_are_refused(parts, change, message):
    with pytest.raises(ConfigError, match=message):
        UNetTask(UNetTaskConfig(model=UNET, **change, **parts))


def test_train_unet_timestep_bias_flags_reach_the_task(tmp_path, monkeypatch, capsys):
    """train-unet --timestep-bias range --timestep-bias-range B E --timestep-bias-multiplier M reaches the task; the
    range flag without the range bias (or the reverse) is a one-line error before anything is written."""
    import snapfusion.train.stages as stages
    from snapfusion.cli import main

    seen = {}
    # no training: the loop returns as in a process other than the main one (nothing to export)
    monkeypatch.setattr(stages, "train", lambda cfg, task, resume=False: seen.update(task=task) or {"is_main": False})
    args = ["train-unet", "--run-dir", str(tmp_path / "r"), "--from-pipeline", "base", "--max-steps", "1",
            "--sample-every", "0"]
    assert main(args + ["--timestep-bias", "range", "--timestep-bias-range", "700", "1000",
                        "--timestep-bias-multiplier", "4"]) == 0
    cfg = seen["task"].cfg
    assert (cfg.timestep_bias, cfg.timestep_bias_begin, cfg.timestep_bias_end, cfg.timestep_bias_multiplier) == \
        ("range", 700, 1000, 4.0)
    for bad in (["--timestep-bias", "range"], ["--timestep-bias-range", "700", "1000"]):
        assert main(args[:2] + [str(tmp_path / "bad")] + args[3:] + bad) == 2
        err = capsys.readouterr().err.strip()
        assert "--timestep-bias-range" in err and "\n" not in err
    assert not (tmp_path / "bad").exists()


def test_unet_stages_train_eps_and_v_unets_and_refuse_other_types(tiny_pipeline):
    import dataclasses

    from snapfusion.errors import ConfigError
    from snapfusion.train.tasks import require_known_prediction

    require_known_prediction(tiny_pipeline.unet.config, "train-unet")
    require_known_prediction(dataclasses.replace(tiny_pipeline.unet.config, prediction_type="v_prediction"), "x")
    with pytest.raises(ConfigError, match="epsilon or v_prediction"):
        require_known_prediction(dataclasses.replace(tiny_pipeline.unet.config, prediction_type="sample"), "x")
