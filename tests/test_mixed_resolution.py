"""train-unet --mix-size: mixed-resolution training (most steps at a cheap size, some at the target size), its
second latent pool, exact resume, and one-line errors for options that cannot train."""

import dataclasses

import pytest
import torch

from conftest import TINY_TEXT
from snapfusion.data import SceneDataset
from snapfusion.errors import ConfigError
from snapfusion.models.autoencoder import AutoencoderConfig, AutoencoderKL, save_autoencoder
from snapfusion.models.text import TextEncoder, save_text_encoder
from snapfusion.models.unet import UNet
from snapfusion.models.unet_config import tiny_sd15
from snapfusion.train import state as ckpt_io
from snapfusion.train.loop import LoopConfig, train
from snapfusion.train import data as data_module
from snapfusion.train.data import images_to_unit, pooled_caption
from snapfusion.train.unet import UNetTask, UNetTaskConfig
from snapfusion.weights import load_safetensors

UNET = dataclasses.replace(tiny_sd15(), context_dim=32)


@pytest.fixture()
def parts(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderConfig.tiny())
    save_autoencoder(tmp_path / "vae", vae)
    save_text_encoder(tmp_path / "text", TextEncoder(TINY_TEXT))
    return vae, dict(vae=str(tmp_path / "vae"), text_encoder=str(tmp_path / "text"), image_size=64,
                     latent_pool=6, pool_workers=0)


def _mixed(parts, prob=1.0, **kw):
    return UNetTaskConfig(model=UNET, mix_size=128, mix_prob=prob, mix_batch=2, mix_pool=3, **parts[1], **kw)


def test_a_mixed_step_trains_on_the_second_pool_at_the_second_size(parts, monkeypatch):
    vae, _ = parts
    task = UNetTask(_mixed(parts))
    drawn = []
    original_scene = data_module.sample_scene
    monkeypatch.setattr(data_module, "sample_scene", lambda *a: drawn.append(a) or original_scene(*a))
    items = [task.dataset()[i] for i in (1, 4, 5)]
    assert [it["index"] for it in items] == [1, 4, 5]  # the first pool: i mod 6
    assert len(drawn) == 3  # one scene per item: the second pool's are drawn only for the items a mixed step uses
    batch = task.collate(items)
    assert batch["index2"].tolist() == [1, 1] and batch["ids2"].shape[0] == 2  # the first mix_batch items, i mod 3
    assert len(drawn) == 5
    expected_ids = task.data.caption_ids([pooled_caption(i, 3, task.cfg.seed, task.cfg.data)[1] for i in (1, 4)])
    assert torch.equal(batch["ids2"], expected_ids)  # their own captions of the second pool's scenes
    seen = []
    original = task.schedule.add_noise
    monkeypatch.setattr(task.schedule, "add_noise", lambda x0, eps, t: seen.append(x0) or original(x0, eps, t))
    loss, logs = task.loss(UNet(UNET), batch, torch.Generator().manual_seed(0))
    assert seen[0].shape == (2, 4, 16, 16) and loss.shape == (2,)  # 128² scenes, 16x16 latents
    assert logs == {"mixed_share": 1.0}  # logged: the share of this process's steps at the mixed size
    # both pools are built at the first step, mixed or not (under DDP every process gathers both in the same order)
    assert task.data.pool.mean.shape == (6, 4, 8, 8) and task.data.mix_pool.mean.shape == (3, 4, 16, 16)
    image = SceneDataset("train", 128, task.cfg.seed, 3, task.cfg.data)[2]["image"]  # pooled scene 2 at 128²
    expected = vae.encoder.encode(images_to_unit(image[None], torch.device("cpu"))).mean
    torch.testing.assert_close(task.data.mix_pool.mean[2:3].float(), expected, atol=2e-3, rtol=1e-2)


def test_the_share_of_mixed_steps_follows_mix_prob_and_plain_runs_draw_nothing(parts):
    task = UNetTask(_mixed(parts, prob=0.3))
    gen = torch.Generator().manual_seed(0)
    share = sum(task.noising.mixed_step(gen) for _ in range(2000)) / 2000
    assert 0.26 < share < 0.34
    plain = UNetTask(UNetTaskConfig(model=UNET, **parts[1]))
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert not plain.noising.mixed_step(gen)
    assert torch.equal(gen.get_state(), state)  # runs without --mix-size keep their random stream
    assert "item" not in plain.dataset()[0]
    item = plain.dataset()[0]
    assert plain.loss(UNet(UNET), plain.collate([item, item]), torch.Generator().manual_seed(0))[1] == {}


def test_a_mixed_run_resumes_exactly(parts, tmp_path):
    def loop(d, n):
        return LoopConfig(run_dir=str(d), max_steps=n, batch_size=3, num_workers=0, mixed_precision="no",
                          log_every=1, sample_every=0, checkpoint_every=100, warmup_steps=2, ema_decay=0.9)

    cfg = _mixed(parts, prob=0.5)
    train(loop(tmp_path / "a", 4), UNetTask(cfg))
    train(loop(tmp_path / "b", 2), UNetTask(cfg))
    train(loop(tmp_path / "b", 4), UNetTask(cfg), resume=True)
    a, b = (load_safetensors(ckpt_io.latest_checkpoint(tmp_path / r) / "model" / "model.safetensors")
            for r in ("a", "b"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


@pytest.mark.parametrize("change, message", [
    (dict(mix_size=60), "multiple of 8"), (dict(mix_size=-128), "multiple of 8"),
    (dict(latent_pool=0), "needs --latent-pool"), (dict(mix_prob=0.0), "mix-prob"), (dict(mix_prob=1.5), "mix-prob"),
    (dict(mix_batch=0), "mix-batch-size"), (dict(mix_pool=0), "mix-pool"),
])
def test_mixed_options_that_cannot_train_are_refused(parts, change, message):
    cfg = dataclasses.replace(_mixed(parts), **change)
    with pytest.raises(ConfigError, match=message):
        UNetTask(cfg)


def test_train_unet_mix_flags_reach_the_task_with_their_defaults(parts, tmp_path, monkeypatch, capsys):
    import snapfusion.train.stages as stages
    from snapfusion.cli import main

    seen = {}
    monkeypatch.setattr(stages, "train",  # not the main process: train_unet then exports nothing
                        lambda loop_cfg, task, resume=False: seen.update(task=task) or {"is_main": False})
    args = ["train-unet", "--run-dir", str(tmp_path / "r"), "--vae", parts[1]["vae"], "--text-encoder",
            parts[1]["text_encoder"], "--sample-every", "0", "--image-size", "256", "--batch-size", "384",
            "--latent-pool", "1024", "--mix-size", "512"]
    assert main(args) == 0
    cfg = seen["task"].cfg
    assert (cfg.mix_size, cfg.mix_prob, cfg.mix_batch, cfg.mix_pool) == (512, 0.25, 96, 256)
    assert main([*args[:-6], "--mix-size", "512"]) == 2  # no --latent-pool
    err = capsys.readouterr().err.strip()
    assert "--latent-pool" in err and "\n" not in err
