"""The UNet stage trains v-prediction UNets too (the v-tuned base and its robust-trained students):
the Min-SNR loss in v-space, eps-space distillation from an eps or a v teacher, and the loop's --compile."""

import dataclasses
import json

import pytest
import torch

from conftest import TINY_TEXT
from snapfusion.models.autoencoder import AutoencoderConfig, AutoencoderKL, save_autoencoder
from snapfusion.models.text import TextEncoder, save_text_encoder
from snapfusion.models.unet import UNet
from snapfusion.models.unet_config import tiny_sd15
from snapfusion.losses import v_mse_min_snr
from snapfusion.train.unet import UNetTask, UNetTaskConfig

EPS = dataclasses.replace(tiny_sd15(), context_dim=32)
V = dataclasses.replace(EPS, prediction_type="v_prediction")


@pytest.fixture()
def parts(tmp_path):
    torch.manual_seed(0)
    save_autoencoder(tmp_path / "vae", AutoencoderKL(AutoencoderConfig.tiny()))
    save_text_encoder(tmp_path / "text", TextEncoder(TINY_TEXT))
    return dict(vae=str(tmp_path / "vae"), text_encoder=str(tmp_path / "text"), image_size=64, latent_pool=4,
                pool_workers=0)


class _Recorder(torch.nn.Module):
    """Wraps a UNet and keeps its last input and output."""

    def __init__(self, unet: UNet):
        super().__init__()
        self.unet, self.seen = unet, {}

    def forward(self, z, t, context, **kw):
        out = self.unet(z, t, context, **kw)
        self.seen.update(z=z, t=t, out=out)
        return out


def _run(task: UNetTask, model, monkeypatch, n: int = 6):
    """One loss call; returns (loss, logs, x0, eps) with the clean latents and noise it drew."""
    drawn = {}
    original = task.schedule.add_noise
    monkeypatch.setattr(task.schedule, "add_noise",
                        lambda x0, eps, t: drawn.update(x0=x0, eps=eps) or original(x0, eps, t))
    batch = task.collate([task.dataset()[i] for i in range(n)])
    loss, logs = task.loss(model, batch, torch.Generator().manual_seed(0))
    return loss, logs, drawn["x0"], drawn["eps"]


def test_a_v_unet_trains_on_the_v_target_with_min_snr_weights(parts, monkeypatch):
    torch.manual_seed(1)
    model = _Recorder(UNet(V))
    task = UNetTask(UNetTaskConfig(model=V, min_snr_gamma=5.0, **parts))
    loss, _, x0, eps = _run(task, model, monkeypatch)
    t, out = model.seen["t"], model.seen["out"]
    alpha, sigma = task.schedule.alpha_sigma(t)
    a, s = alpha[:, None, None, None], sigma[:, None, None, None]
    v = a * eps - s * x0
    snr = (alpha / sigma) ** 2
    want = (out - v).pow(2).flatten(1).mean(1) * torch.clamp(snr, max=5.0) / (snr + 1)  # by hand
    torch.testing.assert_close(loss, want)
    # the same x-space weighting as the eps loss: for eps = (z - alpha x_hat) / sigma and v = (alpha z - x_hat) /
    # sigma of one x_hat, min(SNR, g) / SNR x eps error^2 == min(SNR, g) / (SNR + 1) x v error^2
    z, x_hat = a * x0 + s * eps, torch.randn_like(x0)
    e_eps = ((z - a * x_hat) / s - eps).pow(2).flatten(1).mean(1) * torch.clamp(snr, max=5.0) / snr
    torch.testing.assert_close(v_mse_min_snr((a * z - x_hat) / s, v, snr, 5.0), e_eps, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("student, teacher", [(EPS, V), (V, V), (V, EPS)])
def test_kd_compares_implied_eps_of_any_student_and_teacher(parts, tmp_path, monkeypatch, student, teacher):
    torch.manual_seed(3)
    t_net = UNet(teacher)
    t_net.save(tmp_path / "teacher")
    task = UNetTask(UNetTaskConfig(model=student, kd_unet=str(tmp_path / "teacher"), **parts))
    model = _Recorder(UNet(student))
    _, logs, _, _ = _run(task, model, monkeypatch)
    z, t, out = model.seen["z"], model.seen["t"], model.seen["out"]
    alpha, sigma = task.schedule.alpha_sigma(t)
    a, s = alpha[:, None, None, None], sigma[:, None, None, None]

    def implied_eps(raw, prediction_type):  # by hand: eps = sigma z + alpha v for a v model
        return raw if prediction_type == "epsilon" else s * z + a * raw

    with torch.no_grad():
        ids = task.collate([task.dataset()[i] for i in range(6)])["ids"]
        target = implied_eps(task.kd.teacher(z, t, task.data.text(ids)), teacher.prediction_type)
    mine = implied_eps(out, student.prediction_type)
    snr = (alpha / sigma) ** 2
    want = ((mine - target).pow(2).flatten(1).mean(1) * torch.clamp(snr, max=5.0) / snr).mean()
    torch.testing.assert_close(logs["kd"], want, rtol=1e-4, atol=1e-7)
    if student == teacher:  # the same weights: nothing to distill
        same = UNet(student)
        same.load_state_dict(t_net.state_dict())
        _, logs, _, _ = _run(task, same, monkeypatch)
        assert float(logs["kd"]) < 1e-10


def test_the_loop_compiles_the_trained_module_in_place_and_keeps_checkpoint_keys(parts, tmp_path, monkeypatch):
    """--compile: nn.Module.compile on the trained UNet (after the EMA copy), so checkpoints keep their keys and a
    compiled run resumes. Compiled with torch's "eager" backend here (dynamo tracing without code generation)."""
    from snapfusion.train.loop import LoopConfig, train
    from snapfusion.weights import load_safetensors, resolve_weights

    compiled, original = [], torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: compiled.append(type(self).__name__) or original(self, backend="eager"))
    task = UNetTask(UNetTaskConfig(model=V, **parts))
    loop = dict(run_dir=str(tmp_path / "run"), batch_size=2, warmup_steps=1, sample_every=0, checkpoint_every=2,
                num_workers=0, mixed_precision="no", compile=True)
    train(LoopConfig(max_steps=2, **loop), task)
    assert compiled == ["UNet"]
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["loop"]["compile"] is True
    ckpt = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    keys = set(load_safetensors(resolve_weights(ckpt / "model", "model")))
    assert keys == set(UNet(V).state_dict()) and not any("_orig_mod" in k for k in keys)
    assert train(LoopConfig(max_steps=3, **loop), task, resume=True)["step"] == 3


def test_compile_is_refused_where_the_graph_is_not_one_call(parts, tmp_path):
    """Stages whose loss does not call the trained module itself (the autoencoder) or changes its graph every step
    (robust training's random skips) refuse --compile with a one-line error instead of silently running eager."""
    from snapfusion.errors import SnapFusionError
    from snapfusion.evolve.robust import RobustConfig, RobustTask, RobustTaskConfig
    from snapfusion.train.loop import LoopConfig, train
    from snapfusion.train.tasks import AutoencoderTask, AutoencoderTaskConfig

    loop = dict(max_steps=1, batch_size=2, sample_every=0, num_workers=0, mixed_precision="no", compile=True)
    robust = RobustTask(RobustTaskConfig(unet=UNetTaskConfig(model=EPS, **parts), robust=RobustConfig(0.9, 0.9)))
    autoencoder = AutoencoderTask(AutoencoderTaskConfig(model=AutoencoderConfig.tiny(), image_size=64, crop=32))
    for name, task in (("robust", robust), ("ae", autoencoder)):
        with pytest.raises(SnapFusionError, match="--compile: the .* stage does not support it"):
            train(LoopConfig(run_dir=str(tmp_path / name), **loop), task)


def test_train_unet_continues_a_v_unet_as_v(tmp_path, parts, monkeypatch):
    """train-unet --init-unet V: the run keeps V's prediction type (so the v-tuned base can be trained further)."""
    from snapfusion import cli
    from snapfusion.models.presets import base_unet

    v_base = dataclasses.replace(base_unet(), prediction_type="v_prediction")
    UNet(v_base).save(tmp_path / "vunet")
    seen = {}
    monkeypatch.setattr("snapfusion.train.stages.train_unet", lambda loop, cfg, resume: seen.update(cfg=cfg))
    assert cli.main(["train-unet", "--run-dir", str(tmp_path / "r"), "--vae", parts["vae"], "--text-encoder",
                     parts["text_encoder"], "--init-unet", str(tmp_path / "vunet"), "--sample-every", "0"]) == 0
    assert seen["cfg"].model == v_base
