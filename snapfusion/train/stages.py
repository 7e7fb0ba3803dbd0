"""The base model's training stages as library functions: run the loop, then export ``run_dir/final``.

Order: ``train_autoencoder`` and ``train_text`` (independent), then ``train_unet`` on their frozen exports, then
``assemble_pipeline``. Every run, a chunk of a longer one included, ends by exporting its last checkpoint (EMA
weights) to ``run_dir/final`` and the step it came from to ``final/step.json``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from snapfusion import fileio
from snapfusion.models.autoencoder import AutoencoderKL, load_autoencoder, save_autoencoder
from snapfusion.models.text import load_text_encoder, save_text_encoder, skip_layers
from snapfusion.models.unet import UNet
from snapfusion.pipeline import Pipeline, PipelineConfig
from snapfusion.train import state as ckpt_io
from snapfusion.train.loop import LoopConfig, train
from snapfusion.train.autoencoder import AutoencoderTask, AutoencoderTaskConfig, latent_scaling_factor, test_images
from snapfusion.train.data import images_to_unit
from snapfusion.train.text import TextTask, TextTaskConfig
from snapfusion.train.unet import UNetTask, UNetTaskConfig


def _final_source(cfg: LoopConfig, result: dict) -> Path | None:
    """The EMA (else model) folder of the run's last checkpoint; None in processes other than the main one."""
    if not result.get("is_main", True):
        return None  # one writer: the main process exports, the other ranks are done
    ckpt = ckpt_io.latest_checkpoint(Path(cfg.run_dir))
    if ckpt is None:
        return None
    return ckpt / "ema" if (ckpt / "ema").is_dir() else ckpt / "model"


def _replace_dir(src_writer, final: Path, step: int | None = None) -> Path:
    """Write ``final/`` (the export and its ``step.json``) beside it and rename it into place: the old ``final/`` is
    moved aside only once the new one is complete and fsync'd, and deleted after the rename."""
    fileio.recover_dir(final)  # a run killed between publish_dir's two renames left the old one aside

    def write(tmp: Path) -> None:
        src_writer(tmp)
        (tmp / "step.json").write_text(json.dumps({"step": step}))
        ckpt_io._slow_save_hook()

    return fileio.write_dir(final, write)


def train_autoencoder(cfg: LoopConfig, task_cfg: AutoencoderTaskConfig, *, resume: bool = False) -> Path | None:
    """Train the autoencoder; on completion export ``final/`` with the latent scaling factor measured on test renders."""
    result = train(cfg, AutoencoderTask(task_cfg), resume=resume)
    src = _final_source(cfg, result)
    if src is None:
        return None
    vae = load_autoencoder(src, AutoencoderKL)
    if task_cfg.decoder_only:  # the encoder, and so the latent space and its scaling factor, are the init's
        print(f"[autoencoder] decoder fine-tuned; latent scaling factor kept: {vae.config.scaling_factor:.5f}")
    else:
        images = images_to_unit(test_images(task_cfg, 32, seed=7), torch.device("cpu"))
        scale = latent_scaling_factor(vae.encoder, images)
        vae = _with_scaling(vae, scale)
        print(f"[autoencoder] latent scaling factor {scale:.5f} (1 / std of raw latents of 32 "
              f"{'training images' if task_cfg.data_folder else 'test renders'})")
    return _replace_dir(lambda d: save_autoencoder(d, vae), Path(cfg.run_dir) / "final", result["step"])


def _with_scaling(vae: AutoencoderKL, scale: float) -> AutoencoderKL:
    new = AutoencoderKL(dataclasses.replace(vae.config, scaling_factor=scale))
    new.load_state_dict(vae.state_dict())
    return new


def train_text(cfg: LoopConfig, task_cfg: TextTaskConfig, *, resume: bool = False) -> Path | None:
    """Pretrain the text tower contrastively; on completion export ``final/`` (the text encoder alone)."""
    result = train(cfg, TextTask(task_cfg), resume=resume)
    src = _final_source(cfg, result)
    if src is None:
        return None
    text = load_text_encoder(src / "text_encoder")
    return _replace_dir(lambda d: save_text_encoder(d, text), Path(cfg.run_dir) / "final", result["step"])


def train_unet(cfg: LoopConfig, task_cfg: UNetTaskConfig, *, resume: bool = False) -> Path | None:
    """Train the UNet; on completion export the EMA weights to ``final/``."""
    result = train(cfg, UNetTask(task_cfg), resume=resume)
    src = _final_source(cfg, result)
    if src is None:
        return None
    unet = UNet.load(src)
    return _replace_dir(lambda d: unet.save(d), Path(cfg.run_dir) / "final", result["step"])


def assemble_pipeline(text_dir: str, vae_dir: str, unet_dir: str, out: str, *, name: str = "base",
                      with_encoder: bool = False, config: PipelineConfig | None = None, clip_skip: int = 0) -> Path:
    """A pipeline folder (fp16) from trained parts; sampling defaults are SD-v1.5's unless ``config`` is given.
    ``clip_skip``: the UNet trained on the text tower without its last layers (train-unet --clip-skip), so the
    pipeline ships that shorter tower."""
    vae = load_autoencoder(vae_dir, AutoencoderKL)
    pipe = Pipeline(skip_layers(load_text_encoder(text_dir), clip_skip), UNet.load(unet_dir), vae.decoder,
                    config or PipelineConfig(name=name), encoder=vae.encoder if with_encoder else None)
    return pipe.save(out, dtype=torch.float16)
