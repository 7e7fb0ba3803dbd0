"""Building blocks of the robust-training and evolution runs: a preset's UNet, a pipeline's frozen parts, the start
UNet's config, the task config, the resumable robust-training chunk of Alg. 1 and the CLIP scorer."""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path
from typing import Callable

from snapfusion.errors import SnapFusionError
from snapfusion.loading import model_folder


def unet_preset(name: str):
    """The UNet config of a named architecture (``snapfusion.models.presets``; random weights are fine for latency)."""
    from snapfusion.errors import ConfigError
    from snapfusion.models.presets import ARCHITECTURES, architecture

    try:
        return architecture(name)[1]
    except ConfigError:
        raise SnapFusionError(f"unknown --preset {name!r} (known: {', '.join(ARCHITECTURES)})") from None


def frozen_parts(model: str, vae: str | None = None, text_encoder: str | None = None) -> tuple[str, str]:
    """The frozen VAE encoder and text tower folders (default: inside the ``model`` pipeline folder)."""
    from snapfusion.pipeline import part_folder

    root = model_folder(model)
    vae = vae or str(part_folder(root, "vae_encoder"))
    text = text_encoder or str(part_folder(root, "text_encoder"))
    for what, folder in (("--vae", vae), ("--text-encoder", text)):
        if not (Path(folder) / "config.json").is_file():
            raise SnapFusionError(f"{what}: no model folder at {folder} (a pipeline saved without its VAE encoder "
                                  "needs --vae pointing at the autoencoder's final/ folder)")
    return vae, text


def start_folder(model: str, init: str | None = None) -> str:
    """The UNet folder to start from: ``init``, else the ``model`` pipeline's unet/."""
    from snapfusion.pipeline import part_folder

    return init or str(part_folder(model_folder(model), "unet"))


def unet_config_of(folder: str):
    """The ``UNetConfig`` saved in a UNet folder (unknown keys are errors)."""
    from snapfusion.config import from_dict, load_json
    from snapfusion.models.unet_config import UNetConfig

    data = load_json(Path(folder) / "config.json")
    return from_dict(UNetConfig, data["config"], where=f"{folder}/config.json")


@dataclasses.dataclass(frozen=True)
class ChunkConfig:
    """The optimizer settings of each robust-training chunk between two evolution steps."""

    steps: int = 200  # 0: no training between evolution steps
    batch_size: int = 32
    lr: float = 5e-5
    mixed_precision: str = "bf16"
    seed: int = 0
    num_workers: int = 4


class ChunkStopped(Exception):
    """A training chunk stopped by its time limit before its last step (a checkpoint is kept: rerun to go on)."""


def training_chunk(task_config: Callable[[object, str], object], chunk: ChunkConfig, device: str,
                   time_left: Callable[[], float] | None = None):
    """The evolution's robust-training chunk: the one loop, started from the current UNet, resumable.

    ``task_config(unet_config, init_folder)`` builds the ``RobustTaskConfig`` of a chunk. The chunk of iteration k
    (run dir ``iter_k/train``) sees its own scenes: the data seed is the task's plus a hash of the iteration's folder
    name. ``time_left()``: minutes left for the chunk as the loop's limit (0: none); a chunk that it stops before its
    last step raises ``ChunkStopped``, so that the evolution redoes that iteration rather than score a short chunk."""
    import torch

    from snapfusion.evolve.robust import RobustTask
    from snapfusion.models.unet import UNet
    from snapfusion.train import state as ckpt_io
    from snapfusion.train.loop import loop_config, train

    def run(unet: UNet, run_dir: Path) -> UNet:
        if chunk.steps <= 0:
            return unet
        init = run_dir.parent / "train_init"
        if not (init / "config.json").is_file():
            unet.save(init)
        cfg = loop_config(run_dir=str(run_dir), max_steps=chunk.steps, batch_size=chunk.batch_size, lr=chunk.lr,
                          warmup_steps=0, ema_decay=0.0, mixed_precision=chunk.mixed_precision, log_every=25,
                          sample_every=0, checkpoint_every=max(50, chunk.steps // 2), seed=chunk.seed,
                          num_workers=chunk.num_workers, max_minutes=time_left() if time_left else 0.0)
        task_cfg = task_config(unet.config, str(init))
        # each iteration's chunk sees new scenes, not the first steps x batch of the stream again
        task_cfg = dataclasses.replace(task_cfg, unet=dataclasses.replace(
            task_cfg.unet, seed=task_cfg.unet.seed + zlib.crc32(run_dir.parent.name.encode())))
        task = RobustTask(task_cfg)
        with torch.enable_grad():  # the evolution around it runs under no_grad
            result = train(cfg, task, resume=ckpt_io.latest_checkpoint(run_dir) is not None if run_dir.exists()
                           else False)
        if result["step"] < chunk.steps:
            raise ChunkStopped(f"evolution chunk {run_dir} stopped at step {result['step']} of {chunk.steps}")
        return UNet.load(ckpt_io.latest_checkpoint(run_dir) / "model", device=device)

    return run


def clip_scorer(evaluators):
    """Per-image domain CLIP score of (images, prompts) with the shipped scene CLIP."""
    from snapfusion.eval.evaluators import clip_scores

    return lambda images, prompts: clip_scores(evaluators.clip, images.to(next(evaluators.clip.parameters()).device),
                                               prompts)
