"""UNet training options: starting from a trained UNet (--init-unet / --from-pipeline) and offset noise."""

import dataclasses

import pytest
import torch

from conftest import TINY_TEXT
from snapfusion.errors import ConfigError
from snapfusion.models.autoencoder import AutoencoderConfig, AutoencoderKL, save_autoencoder
from snapfusion.models.text import TextEncoder, save_text_encoder
from snapfusion.models.unet import UNet
from snapfusion.models.unet_config import tiny_sd15
from snapfusion.train.tasks import UNetTask, UNetTaskConfig

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


def _channel_means_of_noise(parts, offset: float, monkeypatch) -> torch.Tensor:
    """Per-sample, per-channel spatial means of the noise one loss call adds (B=64 samples)."""
    task = UNetTask(UNetTaskConfig(model=UNET, offset_noise=offset, latent_pool=4, pool_workers=0, **parts))
    seen = []
    original = task.schedule.add_noise
    monkeypatch.setattr(task.schedule, "add_noise", lambda x0, eps, t: seen.append(eps) or original(x0, eps, t))
    batch = task.collate([task.dataset()[i] for i in range(64)])
    task.loss(UNet(UNET), batch, torch.Generator().manual_seed(0))
    return seen[0].mean(dim=(2, 3))


def test_offset_noise_moves_each_channels_mean(parts, monkeypatch):
    plain = _channel_means_of_noise(parts, 0.0, monkeypatch)
    offset = _channel_means_of_noise(parts, 0.5, monkeypatch)
    # 8x8 latents: the spatial mean of white noise has std 1/8; the offset adds std 0.5 per sample and channel
    assert 0.08 < plain.std().item() < 0.17
    assert 0.4 < offset.std().item() < 0.65


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
    teacher pays nothing extra, a different one does; a v-prediction teacher is refused."""
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
    UNet(dataclasses.replace(UNET, prediction_type="v_prediction")).save(tmp_path / "v")
    with pytest.raises(ConfigError, match="kd-unet .* must predict epsilon"):
        UNetTask(UNetTaskConfig(model=UNET, kd_unet=str(tmp_path / "v"), **parts))


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
