"""train-autoencoder --init/--decoder-only: the decoder fine-tuned on a frozen encoder (SD's ft-MSE recipe), so the
latent space, its scaling factor and every UNet trained on it stay valid."""

import dataclasses

import pytest
import torch

from snapfusion.cli import main
from snapfusion.errors import ConfigError
from snapfusion.models.autoencoder import AutoencoderConfig, AutoencoderKL, Decoder, Encoder, load_autoencoder, \
    save_autoencoder
from snapfusion.train.loop import LoopConfig
from snapfusion.train.stages import train_autoencoder
from snapfusion.train.tasks import AutoencoderTask, AutoencoderTaskConfig, load_initial_autoencoder


def _loop(run_dir, steps):
    return LoopConfig(run_dir=str(run_dir), max_steps=steps, batch_size=2, num_workers=0, mixed_precision="no",
                      log_every=1, sample_every=0, checkpoint_every=100, warmup_steps=1, ema_decay=0.9, lr=1e-3)


def _task(init, decoder_only=True):
    return AutoencoderTaskConfig(image_size=32, crop=16, init=str(init), decoder_only=decoder_only)


@pytest.fixture()
def pipeline_dir(tmp_path, tiny_pipeline):
    return tiny_pipeline.save(tmp_path / "pipe")


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_decoder_only_keeps_the_encoder_and_scaling_factor(tmp_path, pipeline_dir, tiny_pipeline):
    final = train_autoencoder(_loop(tmp_path / "run", 3), _task(pipeline_dir))
    vae = load_autoencoder(final, AutoencoderKL)
    shipped_encoder = load_autoencoder(pipeline_dir / "vae_encoder", Encoder)
    assert _same(vae.encoder, shipped_encoder)  # bit for bit: the latent space is the pipeline's
    assert not _same(vae.decoder, load_autoencoder(pipeline_dir / "vae_decoder", Decoder))
    assert vae.config.scaling_factor == tiny_pipeline.decoder.config.scaling_factor


def test_decoder_only_trains_only_the_decoder():
    task = AutoencoderTask(dataclasses.replace(_task("unused"), init=None, decoder_only=False))
    assert all(p.requires_grad for p in task.build().parameters())
    with pytest.raises(ConfigError, match="--init"):
        AutoencoderTask(dataclasses.replace(_task("unused"), init=None)).build()


def test_decoder_only_resume_is_exact(tmp_path, pipeline_dir):
    train_autoencoder(_loop(tmp_path / "straight", 4), _task(pipeline_dir))
    train_autoencoder(_loop(tmp_path / "split", 2), _task(pipeline_dir))
    train_autoencoder(_loop(tmp_path / "split", 4), _task(pipeline_dir), resume=True)
    a = load_autoencoder(tmp_path / "straight" / "final", AutoencoderKL)
    b = load_autoencoder(tmp_path / "split" / "final", AutoencoderKL)
    assert _same(a, b)


def test_full_init_trains_both_halves(tmp_path):
    torch.manual_seed(0)
    start = AutoencoderKL(dataclasses.replace(AutoencoderConfig.tiny(), scaling_factor=0.5))
    save_autoencoder(tmp_path / "vae", start)
    final = train_autoencoder(_loop(tmp_path / "run", 2), _task(tmp_path / "vae", decoder_only=False))
    vae = load_autoencoder(final, AutoencoderKL)
    assert not _same(vae.encoder, start.encoder) and not _same(vae.decoder, start.decoder)
    assert vae.config.scaling_factor != 0.5  # the encoder moved: the scaling factor is measured again


def test_init_refuses_what_is_not_one_autoencoder(tmp_path, tiny_pipeline):
    folder = tiny_pipeline.save(tmp_path / "pipe")
    (folder / "vae_encoder" / "config.json").unlink()
    with pytest.raises(ConfigError, match="vae_encoder/config.json"):
        load_initial_autoencoder(folder)
    with pytest.raises(ConfigError, match="kind 'vae-decoder'"):
        load_initial_autoencoder(folder / "vae_decoder")
    with pytest.raises(ConfigError, match="neither a pipeline"):
        load_initial_autoencoder(tmp_path / "nothing")


def test_init_refuses_a_decoder_of_another_layout(tmp_path, tiny_pipeline):
    folder = tiny_pipeline.save(tmp_path / "pipe")
    cfg = dataclasses.replace(tiny_pipeline.decoder.config, norm_groups=tiny_pipeline.decoder.config.norm_groups // 2)
    save_autoencoder(folder / "vae_decoder", Decoder(cfg))
    with pytest.raises(ConfigError, match="differ beyond the decoder widths"):
        load_initial_autoencoder(folder)


def test_cli_errors_are_one_line(tmp_path, capsys):
    common = ["train-autoencoder", "--run-dir", str(tmp_path / "run"), "--max-steps", "1", "--num-workers", "0"]
    assert main(common + ["--decoder-only"]) == 2
    assert "--decoder-only needs --init" in capsys.readouterr().err
    assert main(common + ["--init", str(tmp_path / "missing"), "--decoder-only"]) == 2
    err = capsys.readouterr().err
    assert "no such model or folder" in err and err.count("\n") == 1
