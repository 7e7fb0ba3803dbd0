"""Options shared by several commands, each written once: device and dtype, the training loop, its data (the scenes
or your own image folder), offset noise and latent pools, and knowledge distillation from a teacher UNet."""

from __future__ import annotations

import argparse
import os

from snapfusion.cli import types
from snapfusion.errors import SnapFusionError
from snapfusion.loading import resolve_device, resolve_dtype
from snapfusion.validation import check_training

DTYPES = ["fp32", "fp16", "bf16"]
# snapfusion.models.presets.ARCHITECTURES (+ ALIASES), spelled out so that --help imports no torch
# (tests/test_bench.py checks they agree)
ARCHITECTURES = ("sd15", "snapfusion", "snapfusion-guidance", "base", "base-snapfusion", "tiny", "tiny-snapfusion",
                 "tiny-guidance")
SAMPLERS = ["ddim", "dpmpp_2m"]


def device(name: str) -> str:
    """--device as a torch device string ('auto': CUDA when there is one)."""
    return resolve_device(name, option="--device")


def dtype(name: str):
    """--dtype as a torch dtype."""
    return resolve_dtype(name, option="--dtype")


def device_name(name: str) -> str:
    """--device checked as given ('auto' stays 'auto': it is resolved when the command runs)."""
    device(name)
    return name


def first(*values):
    """The first value that is not None (0 is a value: it must reach validation, not fall back to a default)."""
    return next((v for v in values if v is not None), None)


def add_device(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument("--device", default=default, type=device_name,
                   help=f"auto, cpu, cuda[:N] or mps (default {default}; auto: CUDA when "
                   "there is one)")


def add_dtype(p: argparse.ArgumentParser, help: str = "network precision (default %(default)s)",
              choices: list[str] = DTYPES) -> None:
    p.add_argument("--dtype", choices=choices, default="fp32", help=help)


def add_sampler(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="ddim or dpmpp_2m (default: the model's)")


def add_train_options(p: argparse.ArgumentParser, *, steps: int, batch: int, lr: float) -> None:
    """The one training loop's options (every train-* and compression training command)."""
    p.add_argument("--run-dir", required=True, type=types.output_dir("--run-dir"),
                   help="checkpoints, logs and samples go here")
    p.add_argument("--resume", action="store_true", help="continue from the run dir's last checkpoint")
    p.add_argument("--max-steps", type=int, default=steps, help="total optimizer steps (default %(default)s)")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop cleanly with a checkpoint after this long")
    p.add_argument("--batch-size", type=int, default=batch, help="per process (default %(default)s)")
    p.add_argument("--lr", type=float, default=lr, help="AdamW learning rate (default %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=200, help="linear learning-rate warm-up (default %(default)s)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights; 0: none (default %(default)s)")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="bf16",
                   help="autocast precision of the forward pass (default %(default)s)")
    p.add_argument("--log-every", type=int, default=50, help="log line every N steps (default %(default)s)")
    p.add_argument("--sample-every", type=int, default=1000, help="sample grid every N steps; 0: none "
                   "(default %(default)s)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="checkpoint every N steps (default %(default)s)")
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="data loader worker processes (default: up to 8 CPUs)")
    p.add_argument("--num-emoji", type=types.positive("--num-emoji"), default=None,
                   help="train on the first N atlas emoji (default: all)")
    p.add_argument("--seed", type=int, default=0, help="data and initialisation seed (default %(default)s)")
    add_data(p)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the trained UNet (train-unet, finetune-v, distill): faster steps on a GPU "
                   "after a one-off compile of a few minutes, which counts against --max-minutes")


def check_train_options(a: argparse.Namespace) -> None:
    """add_train_options' numbers, checked together by validation.check_training and written back normalised."""
    vars(a).update(check_training(
        max_steps=a.max_steps, batch_size=a.batch_size, lr=a.lr, warmup_steps=a.warmup_steps, ema_decay=a.ema_decay,
        log_every=a.log_every, sample_every=a.sample_every, checkpoint_every=a.checkpoint_every,
        num_workers=a.num_workers, max_minutes=a.max_minutes, seed=a.seed))


def loop_config(a: argparse.Namespace):
    """The ``LoopConfig`` of add_train_options' flags."""
    from snapfusion.train.loop import loop_config as build

    return build(run_dir=a.run_dir, max_steps=a.max_steps, batch_size=a.batch_size, lr=a.lr,
                 warmup_steps=a.warmup_steps, ema_decay=a.ema_decay, mixed_precision=a.mixed_precision,
                 log_every=a.log_every, sample_every=a.sample_every, checkpoint_every=a.checkpoint_every,
                 max_minutes=a.max_minutes, seed=a.seed, num_workers=a.num_workers, compile=a.compile)


def scene_config(a: argparse.Namespace):
    """The ``SceneConfig`` of --num-emoji."""
    from snapfusion.data import SceneConfig

    return SceneConfig(num_emoji=a.num_emoji)


def add_data(p: argparse.ArgumentParser) -> None:
    """--data FOLDER: your own images instead of the built-in scenes."""
    p.add_argument("--data", default=None, metavar="FOLDER", help="train on your own images: a folder of images and "
                   "a metadata.jsonl with one {\"file_name\": ..., \"text\": ...} per line, resized and "
                   "center-cropped to the training size (default: the built-in scenes; docs/data.md)")


def data_folder(a: argparse.Namespace, size: int) -> str | None:
    """--data, every metadata line and image header checked before any model loads (a bad folder: one line)."""
    folder = getattr(a, "data", None)
    if not folder:
        return None
    from snapfusion.data.folder import ImageCaptionFolder

    if getattr(a, "data_checked", None) != (folder, size):  # the check step did it already
        ImageCaptionFolder(folder, size)
        a.data_checked = (folder, size)
    return str(folder)


def add_noise_data_options(p: argparse.ArgumentParser) -> None:
    """--offset-noise and --latent-pool: every command that trains a UNet on the scenes (train-unet, robust-train,
    evolve, finetune-v, distill) takes them."""
    p.add_argument("--offset-noise", type=types.number("--offset-noise", minimum=0.0), default=0.0,
                   help="per-channel noise offset, e.g. 0.1: lets the "
                   "model move a channel's mean, i.e. a flat background's color (docs/base_model.md)")
    p.add_argument("--latent-pool", type=types.at_least("--latent-pool", 0), default=0,
                   help="encode this many training scenes once and train on their latents (0: encode every batch)")


def add_kd_options(p: argparse.ArgumentParser) -> None:
    """--kd-unet, --kd-weight, --kd-feature-weight: distillation from a frozen eps or v teacher UNet (robust-train,
    finetune-v)."""
    p.add_argument("--kd-unet", default=None, type=types.existing("--kd-unet", folder=True, marker="config.json"),
                   help="frozen teacher UNet folder (eps or v): add its (implied) eps as a "
                   "target, on the student's (implied) eps (output-level knowledge distillation, as BK-SDM fine-tunes "
                   "a pruned UNet)")
    p.add_argument("--kd-weight", type=types.number("--kd-weight", minimum=0.0), default=None,
                   help="weight of the distillation term (default 1)")
    p.add_argument("--kd-feature-weight", type=types.number("--kd-feature-weight", minimum=0.0), default=None,
                   help="with --kd-unet: also match the "
                   "teacher's stage outputs, MSE summed over stages times this weight (BK-SDM's feature-level "
                   "distillation; default 0: off)")


def kd_options(a: argparse.Namespace) -> dict:
    """UNetTaskConfig's kd_* fields from add_kd_options' flags ({} without --kd-unet); a weight without a teacher is
    a one-line error."""
    for flag, value in (("--kd-weight", a.kd_weight), ("--kd-feature-weight", a.kd_feature_weight)):
        if value is not None and not a.kd_unet:
            raise SnapFusionError(f"{flag} needs --kd-unet (the teacher it distills from)")
    if not a.kd_unet:
        return {}
    return dict(kd_unet=a.kd_unet, kd_weight=1.0 if a.kd_weight is None else a.kd_weight,
                kd_feature_weight=a.kd_feature_weight or 0.0)
