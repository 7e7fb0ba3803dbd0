"""The training loop: exact resume after a stop, atomic checkpoints, no pickle, refusal to overwrite a run."""

import json

import pytest
import torch

from snapfusion.errors import SnapFusionError
from snapfusion.models.autoencoder import AutoencoderConfig
from snapfusion.train import state as ckpt_io
from snapfusion.train.loop import LoopConfig, train
from snapfusion.train.tasks import AutoencoderTask, AutoencoderTaskConfig
from snapfusion.weights import load_safetensors

TASK = AutoencoderTaskConfig(model=AutoencoderConfig.tiny(), image_size=32, crop=16)


def _cfg(run_dir, steps, **kw):
    base = dict(run_dir=str(run_dir), max_steps=steps, batch_size=2, num_workers=0, mixed_precision="no",
                log_every=1, sample_every=0, checkpoint_every=100, warmup_steps=2, ema_decay=0.9)
    return LoopConfig(**{**base, **kw})


def _weights(run_dir, which="model"):
    ckpt = ckpt_io.latest_checkpoint(run_dir)
    return load_safetensors(ckpt / which / "model.safetensors")


def test_resume_is_exact(tmp_path):
    train(_cfg(tmp_path / "straight", 4), AutoencoderTask(TASK))
    train(_cfg(tmp_path / "split", 2), AutoencoderTask(TASK))
    train(_cfg(tmp_path / "split", 4), AutoencoderTask(TASK), resume=True)
    for which in ("model", "ema"):
        a, b = _weights(tmp_path / "straight", which), _weights(tmp_path / "split", which)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=f"{which}:{k}")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    straight = [json.loads(line)["loss"] for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(straight, abs=0)


def test_checkpoint_has_no_pickle_and_keeps_last(tmp_path):
    train(_cfg(tmp_path, 3, checkpoint_every=1), AutoencoderTask(TASK))
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step_0000002", "step_0000003"]  # keep_checkpoints=2, no .tmp left behind
    files = {p.suffix for p in (tmp_path / "checkpoints" / "step_0000003").rglob("*") if p.is_file()}
    assert files <= {".safetensors", ".json"}
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 3


def test_existing_run_needs_resume(tmp_path):
    train(_cfg(tmp_path, 1), AutoencoderTask(TASK))
    with pytest.raises(SnapFusionError, match="--resume"):
        train(_cfg(tmp_path, 2), AutoencoderTask(TASK))


def test_interrupted_checkpoint_write_keeps_previous(tmp_path):
    """A crash while writing a checkpoint (simulated) leaves latest.json on the previous complete one."""
    train(_cfg(tmp_path, 1), AutoencoderTask(TASK))

    def broken(folder):
        (folder / "model").mkdir()
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        ckpt_io.write_checkpoint(tmp_path, 2, broken, None, {})
    assert ckpt_io.latest_checkpoint(tmp_path).name == "step_0000001"
    train(_cfg(tmp_path, 2), AutoencoderTask(TASK), resume=True)  # the stale .tmp does not block resuming
    assert ckpt_io.latest_checkpoint(tmp_path).name == "step_0000002"


def test_max_minutes_stops_with_a_checkpoint(tmp_path):
    result = train(_cfg(tmp_path, 1000, max_minutes=1e-6), AutoencoderTask(TASK))
    assert result["stop_reason"] == "max_minutes" and result["step"] == 1
    assert ckpt_io.latest_checkpoint(tmp_path).name == "step_0000001"


def test_optimizer_state_round_trip():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = ckpt_io.optimizer_to_tensors(opt)
    meta = json.loads(json.dumps(meta))
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    ckpt_io.optimizer_from_tensors(opt2, tensors, meta)
    assert opt2.param_groups[0]["lr"] == 0.1
    for (a, b) in zip(opt.state.values(), opt2.state.values()):
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"])


def test_latent_pool_matches_rendered_scenes_and_resumes(tmp_path):
    """The pooled path trains on exactly the latents the on-the-fly path would encode, and resumes exactly."""
    import dataclasses

    from conftest import TINY_TEXT
    from snapfusion.data import SceneDataset
    from snapfusion.models.autoencoder import AutoencoderKL, save_autoencoder
    from snapfusion.models.text import TextEncoder, save_text_encoder
    from snapfusion.models.unet_config import tiny_sd15
    from snapfusion.train.data import images_to_unit
    from snapfusion.train.unet import UNetTask, UNetTaskConfig

    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderConfig.tiny())
    save_autoencoder(tmp_path / "vae", vae)
    save_text_encoder(tmp_path / "text", TextEncoder(TINY_TEXT))
    cfg = UNetTaskConfig(model=dataclasses.replace(tiny_sd15(), context_dim=32), vae=str(tmp_path / "vae"),
                         text_encoder=str(tmp_path / "text"), image_size=64, latent_pool=6, pool_workers=0)
    task = UNetTask(cfg)
    items = [task.dataset()[i] for i in (1, 7)]  # 7 wraps to pooled scene 1 with a new paraphrase
    assert items[0]["index"] == items[1]["index"] == 1
    batch = task.collate(items)
    gen = torch.Generator().manual_seed(0)
    task.data.latents(batch, gen)  # builds the pool
    image = SceneDataset("train", 64, cfg.seed, 6, cfg.data)[1]["image"]
    expected = vae.encoder.encode(images_to_unit(image[None], torch.device("cpu"))).mean
    torch.testing.assert_close(task.data.pool.mean[1:2].float(), expected, atol=2e-3, rtol=1e-2)

    loop = lambda d, n: _cfg(d, n, checkpoint_every=100)  # noqa: E731
    train(loop(tmp_path / "a", 3), UNetTask(cfg))
    train(loop(tmp_path / "b", 2), UNetTask(cfg))
    train(loop(tmp_path / "b", 3), UNetTask(cfg), resume=True)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
