"""``snapfusion finetune-v`` and ``snapfusion distill``: step distillation (SnapFusion §4) around distill.stages."""

from __future__ import annotations

import argparse

from snapfusion.cli import options, types
from snapfusion.errors import InputError
from snapfusion.validation import MAX_STEPS


def _source(a: argparse.Namespace):
    """The teacher of --model, --teacher-unet and --vae-encoder (a snapfusion pipeline folder, checked)."""
    from snapfusion.config import load_json
    from snapfusion.distill.tasks import ModelSource
    from snapfusion.errors import WeightsError
    from snapfusion.loading import model_folder
    from snapfusion.pipeline import INDEX

    folder = model_folder(a.model)
    index = folder / INDEX
    if not index.is_file() or load_json(index).get("kind") != "pipeline":  # malformed JSON: a one-line error
        raise WeightsError(f"--model {a.model}: no snapfusion pipeline folder at {folder} (missing {index})")
    return ModelSource(pipeline=str(folder), teacher_unet=a.teacher_unet, vae_encoder=a.vae_encoder)


def check_finetune_v(a: argparse.Namespace) -> None:
    """finetune-v's cross-option checks: the loop, the teacher pipeline, the distillation weights."""
    options.check_train_options(a)
    options.data_folder(a, a.image_size)
    _source(a)
    options.kd_options(a)


def check_distill(a: argparse.Namespace) -> None:
    """distill's cross-option checks: the loop, the teacher pipeline, the guidance range (the rules between the
    distillation's own options are DistillConfig's, raised when cmd_distill builds it, before any weights load)."""
    options.check_train_options(a)
    options.data_folder(a, a.image_size)
    _source(a)
    if a.guidance_min > a.guidance_max:
        raise InputError(f"--guidance-min {a.guidance_min:g} is above --guidance-max {a.guidance_max:g}")
    _check_grid(a.student_steps, a.teacher_ratio)


def _check_grid(student_steps: int, teacher_ratio: int) -> None:
    """The nested grids the distillation will walk (``step_grid``), built now so that a teacher finer than the
    schedule is a one-line error before any weights load."""
    from snapfusion.distill.teacher import step_grid
    from snapfusion.errors import ConfigError

    try:
        step_grid(student_steps, MAX_STEPS, teacher_ratio)
    except ConfigError as err:
        raise InputError(f"--student-steps {student_steps} with --teacher-ratio {teacher_ratio}: {err}") from None


def cmd_finetune_v(a: argparse.Namespace) -> None:
    from snapfusion.distill.stages import finetune_v
    from snapfusion.distill.tasks import VFinetuneConfig

    kd = options.kd_options(a)
    folder = options.data_folder(a, a.image_size)
    cfg = VFinetuneConfig(source=_source(a), image_size=a.image_size, data=options.scene_config(a), data_folder=folder,
                          sample_guidance=a.sample_guidance, offset_noise=a.offset_noise, latent_pool=a.latent_pool,
                          pool_workers=max(1, a.num_workers), **kd)
    final = finetune_v(options.loop_config(a), cfg, resume=a.resume)
    print(f"v-prediction UNet: {final}")


def cmd_distill(a: argparse.Namespace) -> None:
    from snapfusion.distill.stages import distill_steps
    from snapfusion.distill.tasks import DistillConfig

    folder = options.data_folder(a, a.image_size)
    cfg = DistillConfig(source=_source(a), data_folder=folder, student_unet=a.student_unet,
                        student_steps=a.student_steps, teacher_ratio=a.teacher_ratio,
                        cfg_prob=a.cfg_prob, guidance_range=(a.guidance_min, a.guidance_max),
                        ori_weight=a.ori_weight, image_size=a.image_size, data=options.scene_config(a),
                        sample_guidance=a.sample_guidance, offset_noise=a.offset_noise, latent_pool=a.latent_pool,
                        pool_workers=max(1, a.num_workers), feature_weight=a.feature_weight,
                        guidance_embed=a.guidance_embed, embedding_only=a.embedding_only,
                        teacher_guidance_rescale=a.teacher_guidance_rescale)
    final = distill_steps(options.loop_config(a), cfg, resume=a.resume)
    print(f"{a.student_steps}-step student UNet: {final}")


def _unet_folder(name: str):
    """A model part folder (with config.json)."""
    return types.existing(name, folder=True, marker="config.json")


def _add_source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="base",
                   help="teacher pipeline: 'base' or a pipeline folder (default %(default)s)")
    p.add_argument("--teacher-unet", default=None, type=_unet_folder("--teacher-unet"),
                   help="UNet folder replacing the pipeline's unet/ as the teacher")
    p.add_argument("--vae-encoder", default=None, type=_unet_folder("--vae-encoder"),
                   help="autoencoder or encoder folder, if the pipeline has no vae_encoder/")
    p.add_argument("--image-size", type=types.side("--image-size"), default=512,
                   help="training image side in pixels (default %(default)s)")
    p.add_argument("--sample-guidance", type=types.guidance("--sample-guidance"), default=None,
                   help="guidance of sample grids (default: model's)")
    options.add_noise_data_options(p)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``finetune-v`` and ``distill``."""
    p = sub.add_parser("finetune-v", help="fine-tune a UNet from eps- to v-prediction (SnapFusion §4, L_ori)",
                       epilog="example: snapfusion finetune-v --run-dir runs/vtune --model base --max-minutes 8")
    options.add_train_options(p, steps=4000, batch=64, lr=5e-5)
    _add_source_options(p)
    options.add_kd_options(p)
    p.set_defaults(func=cmd_finetune_v, check=check_finetune_v)

    p = sub.add_parser("distill", help="CFG-aware step distillation: 1 student step = 2 teacher steps (16 -> 8; "
                       "--teacher-ratio for more)",
                       epilog="example: snapfusion distill --run-dir runs/d8 --model base "
                              "--teacher-unet runs/vtune/final --student-steps 8")
    options.add_train_options(p, steps=10000, batch=32, lr=2e-5)
    _add_source_options(p)
    p.add_argument("--student-unet", default=None, type=_unet_folder("--student-unet"),
                   help="UNet folder to start the student from (default: teacher)")
    p.add_argument("--student-steps", type=types.positive("--student-steps", maximum=MAX_STEPS // 2), default=8,
                   help="the student's sampling steps; the teacher runs --teacher-ratio times as many "
                   "(default %(default)s)")
    p.add_argument("--teacher-ratio", type=types.integer("--teacher-ratio", minimum=1, maximum=MAX_STEPS), default=2,
                   help="teacher DDIM steps per student step: 2 is the paper's direct 16 -> 8; 4 distils 32 -> 8, "
                   "a target closer to the teacher's many-step images at twice the teacher's cost; 1 matches the "
                   "teacher step for step (with --guidance-embed and the two-call n-step student as --teacher-unet: "
                   "its one-call copy) (default %(default)s)")
    p.add_argument("--cfg-prob", type=types.probability("--cfg-prob"), default=0.1,
                   help="p of the CFG-aware loss (default %(default)s)")
    p.add_argument("--guidance-min", type=types.guidance("--guidance-min"), default=2.0,
                   help="the CFG-aware loss draws its guidance "
                   "scale w ~ U[min, max] (default %(default)s)")
    p.add_argument("--guidance-max", type=types.guidance("--guidance-max"), default=14.0,
                   help="the upper end of that range (default %(default)s)")
    p.add_argument("--ori-weight", type=types.number("--ori-weight", minimum=0.0), default=0.2,
                   help="gamma of gamma * L_ori (default %(default)s)")
    p.add_argument("--feature-weight", type=types.number("--feature-weight", minimum=0.0), default=0.0,
                   help="> 0: also match the teacher's stage outputs "
                   "at the student's input, rescaled to this fraction of L_dstl like L_ori (a variant, not the "
                   "paper's; needs equal stage widths; default %(default)s: off)")
    p.add_argument("--guidance-embed", action="store_true",
                   help="train a guidance-embedded student (Meng et al. 2023): w is a UNet input, one call per "
                   "sampling step; every iteration CFG-aware (--cfg-prob unused), no L_ori (--ori-weight unused)")
    p.add_argument("--embedding-only", action="store_true",
                   help="with --guidance-embed: train only the guidance embedding, every other weight frozen (the "
                   "student then keeps its start's output wherever the embedding of w is zero)")
    p.add_argument("--teacher-guidance-rescale", type=types.guidance_rescale("--teacher-guidance-rescale"),
                   default=0.0, help="with --guidance-embed: the teacher's guided steps use guidance rescale phi in "
                   "[0, 1] (Lin et al. 2024; docs/sampling.md), so the one-call student learns the rescaled "
                   "guidance at each w (default %(default)s: plain guidance)")
    p.set_defaults(func=cmd_distill, check=check_distill)
