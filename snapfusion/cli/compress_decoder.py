"""``snapfusion reduce-decoder``, ``decoder-latents``, ``distill-decoder`` and ``eval-decoder``: the efficient
decoder (SnapFusion §3.2)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from snapfusion.cli import options, types
from snapfusion.errors import InputError, SnapFusionError
from snapfusion.fileio import atomic_write_text
from snapfusion.loading import check_model
from snapfusion.validation import MAX_BATCH, check_input_path


def _student_spec(a: argparse.Namespace):
    from snapfusion.decoder.task import StudentSpec
    from snapfusion.decoder.tiny import TinyDecoderConfig

    tiny = TinyDecoderConfig(widths=tuple(a.tiny_widths), blocks=tuple(a.tiny_blocks))
    return StudentSpec(kind=a.student, ratio=a.ratio, init=a.init, norm_groups=a.norm_groups, tiny=tiny,
                       start=a.start_from)


def _latent_source(a: argparse.Namespace):
    from snapfusion.decoder.task import LatentSource

    return LatentSource(sampler=a.sampler, steps=a.latent_steps, guidance_min=a.guidance_range[0],
                        guidance_max=a.guidance_range[1], resolution=a.resolution,
                        num_emoji=a.num_emoji, pool=getattr(a, "latent_pool", 0), prompts=_prompts(a))


def _prompts(a: argparse.Namespace) -> str | None:
    """--prompts FILE (or --data FOLDER: its captions), read and checked before any model loads."""
    from snapfusion.data.folder import read_prompts

    given = [(flag, v) for flag, v in (("--prompts", getattr(a, "prompts", None)), ("--data", getattr(a, "data", None)))
             if v]
    if len(given) > 1:
        raise SnapFusionError("--prompts and --data both give the prompts: pass one")
    if not given:
        return None
    read_prompts(given[0][1])
    return str(given[0][1])


def check_latent_options(a: argparse.Namespace) -> None:
    """--prompts / --data, the teacher (checked without loading it), and the guidance range is a range."""
    _prompts(a)
    check_model(a.teacher)
    low, high = a.guidance_range
    if low > high:
        raise InputError(f"--guidance-range MIN MAX: MIN {low:g} is above MAX {high:g}")


def check_distill_decoder(a: argparse.Namespace) -> None:
    options.check_train_options(a)
    check_latent_options(a)


def check_eval_decoder(a: argparse.Namespace) -> None:
    """eval-decoder's checks: every student is a decoder folder, the teacher exists, the latent options agree."""
    for folder in a.students:
        check_input_path(folder, name="decoder", folder=True, marker="config.json")
    check_latent_options(a)


def cmd_reduce_decoder(a: argparse.Namespace) -> None:
    from snapfusion.decoder.evaluate import parameter_count
    from snapfusion.decoder.io import load_decoder, save_decoder
    from snapfusion.decoder.reduce import reduce_decoder
    from snapfusion.decoder.task import load_teacher

    ours = Path(a.teacher) / "config.json"  # a decoder/VAE folder; else a pipeline, 'base' or an SD-v1.5 path
    teacher = load_decoder(a.teacher) if ours.is_file() else load_teacher(a.teacher).decoder
    student = reduce_decoder(teacher.float(), a.ratio, method=a.init, norm_groups=a.norm_groups)
    save_decoder(a.out, student)
    n_t, n_s = parameter_count(teacher), parameter_count(student)
    print(f"wrote {a.out}: decoder widths {teacher.config.decoder_widths} -> {student.config.decoder_widths}, "
          f"norm groups {student.config.norm_groups}, {n_t:,} -> {n_s:,} parameters ({n_t / n_s:.2f}x fewer)")


def cmd_distill_decoder(a: argparse.Namespace) -> None:
    from snapfusion.decoder.task import DecoderDistillConfig, DecoderDistillTask, export_final
    from snapfusion.train.loop import train

    cfg = DecoderDistillConfig(teacher=a.teacher, student=_student_spec(a), latents=_latent_source(a), seed=a.data_seed,
                               latent_cache=a.latent_cache)
    train(options.loop_config(a), DecoderDistillTask(cfg), resume=a.resume)
    final = export_final(a.run_dir)
    if final is not None:
        print(f"exported {final}")


def cmd_decoder_latents(a: argparse.Namespace) -> None:
    from snapfusion.decoder.task import load_teacher, write_latent_cache

    import torch

    torch.backends.cuda.matmul.allow_tf32 = True  # as the training loop
    torch.backends.cudnn.allow_tf32 = True
    src = _latent_source(a)  # a bad prompt file fails before the teacher loads
    pipe = load_teacher(a.teacher).to(options.device(a.device))
    n = write_latent_cache(pipe, src, a.data_seed, a.out, teacher=a.teacher, batch_size=a.batch_size)
    print(f"wrote {a.out}: {n} latents (use with distill-decoder --latent-cache {a.out} --latent-pool {n} and the "
          f"same latent options)")


def cmd_eval_decoder(a: argparse.Namespace) -> None:
    import torch

    from snapfusion.decoder.evaluate import heldout_latents, parameter_count, pipeline_metrics, psnr_report
    from snapfusion.decoder.io import load_decoder
    from snapfusion.decoder.task import load_teacher

    torch.set_grad_enabled(False)
    device = options.device(a.device)
    pipe = load_teacher(a.teacher).to(device)
    students = {s: load_decoder(s, device=device).eval() for s in a.students}
    latents = heldout_latents(pipe, a.count, _latent_source(a), batch_size=a.batch_size, num_emoji=a.num_emoji)
    report = {"teacher": a.teacher, "heldout_images": len(latents),
              "parameters": {"teacher": parameter_count(pipe.decoder),
                             **{s: parameter_count(m) for s, m in students.items()}},
              "trained_steps": {s: _trained_steps(s) for s in a.students},
              "psnr_vs_teacher": psnr_report(students, pipe.decoder, latents)}
    if a.pipeline_metrics:
        decoders = {"teacher": pipe.decoder, **students}
        report["pipeline"] = pipeline_metrics(pipe, decoders, a.pipeline_metrics, batch_size=a.batch_size,
                                              num_emoji=a.num_emoji, steps=a.pipeline_steps,
                                              guidance=a.pipeline_guidance)
        report["pipeline_settings"] = {"prompts": a.pipeline_metrics, "ddim_steps": a.pipeline_steps,
                                       "guidance": a.pipeline_guidance}
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        atomic_write_text(a.out, text + "\n")


def _trained_steps(folder: str) -> int | None:
    """The training step a distill-decoder export came from (final/step.json), if known."""
    path = Path(folder) / "step.json"
    return json.loads(path.read_text()).get("step") if path.is_file() else None


_ratio = types.number("--ratio", minimum=0.0, maximum=1.0, low_open=True)
_groups = types.positive("--norm-groups", maximum=1024)


def _add_latent_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", default="base", help="'base', a pipeline folder or an SD-v1.5 folder/.safetensors")
    p.add_argument("--sampler", choices=["ddim", "dpmpp_2m"], default="dpmpp_2m", help="teacher sampler for latents")
    p.add_argument("--latent-steps", type=types.steps("--latent-steps"), default=12,
                   help="teacher sampling steps (default %(default)s)")
    p.add_argument("--guidance-range", type=types.guidance("--guidance-range"), nargs=2,
                   default=(1.0, 10.5), metavar=("MIN", "MAX"),
                   help="per-sample guidance scale drawn from U[MIN, MAX] (default 1.0 10.5)")
    p.add_argument("--resolution", type=types.side("--resolution"), default=None,
                   help="image side (default: the teacher's)")


def _add_prompts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", default=None, metavar="FILE", help="your own prompts instead of scene captions: a "
                   "text file (one a line), a .jsonl ({\"text\": ...} a line) or an image folder (its "
                   "metadata.jsonl captions); prompt n mod N for sample n")


def _add_student_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student", choices=["reduced", "tiny"], default="reduced",
                   help="channel-reduced teacher decoder, or the TAESD-style conv baseline")
    p.add_argument("--ratio", type=_ratio, default=0.5, help="decoder width ratio (default %(default)s)")
    p.add_argument("--init", choices=["l1", "first", "random"], default="l1",
                   help="teacher channels kept: largest L1 norm per norm group, first ones, or random init")
    p.add_argument("--norm-groups", type=_groups, default=None, help="GroupNorm groups (default: the largest divisor "
                   "of the teacher's count that leaves >= 2 channels per group)")
    p.add_argument("--tiny-widths", type=types.positive("--tiny-widths", maximum=4096), nargs="+",
                   default=[64, 64, 48, 24],
                   help="tiny: widths per level (default: about the halved base decoder's CPU latency)")
    p.add_argument("--tiny-blocks", type=types.positive("--tiny-blocks", maximum=64), nargs="+", default=[3, 3, 2, 1],
                   help="tiny: conv blocks per level")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the decoder commands."""
    r = sub.add_parser("reduce-decoder", help="build a channel-reduced decoder initialised from a teacher's",
                       epilog="example: snapfusion reduce-decoder --teacher base --ratio 0.5 --out halved")
    r.add_argument("--teacher", default="base", help="a decoder/VAE folder, a pipeline, 'base' or an SD-v1.5 path")
    r.add_argument("--out", required=True, type=types.output_dir(), help="the reduced decoder's folder")
    r.add_argument("--ratio", type=_ratio, default=0.5, help="decoder width ratio (default %(default)s)")
    r.add_argument("--init", choices=["l1", "first", "random"], default="l1",
                   help="teacher channels kept: largest L1 norm per norm group, first ones, or random init")
    r.add_argument("--norm-groups", type=_groups, default=None,
                   help="GroupNorm groups (default: the largest divisor of "
                   "the teacher's count that leaves >= 2 channels per group)")
    r.set_defaults(func=cmd_reduce_decoder, check=lambda a: check_model(a.teacher))

    d = sub.add_parser("distill-decoder", help="distill a small decoder from the teacher's on generated latents",
                       epilog="example: snapfusion distill-decoder --teacher base --run-dir runs/dec --max-minutes 8")
    options.add_train_options(d, steps=20000, batch=8, lr=2e-4)
    _add_latent_options(d)
    _add_student_options(d)
    d.add_argument("--data-seed", type=types.seed("--data-seed"), default=5,
                   help="seed of the prompt/seed/guidance stream")
    _add_prompts(d)
    d.add_argument("--latent-pool", type=types.non_negative("--latent-pool"), default=0,
                   help="cycle over this many cached teacher latents per "
                   "process (0: every latent fresh; default %(default)s)")
    d.add_argument("--latent-cache", default=None, type=types.existing("--latent-cache", folder=False),
                   help="a decoder-latents file made with the same latent options")
    d.add_argument("--start-from", default=None, type=types.existing("--start-from", folder=True, marker="config.json"),
                   help="a decoder folder of the same architecture (e.g. an earlier run's final/): train on from "
                   "its weights with a fresh optimizer")
    d.set_defaults(func=cmd_distill_decoder, check=check_distill_decoder)

    c = sub.add_parser("decoder-latents", help="generate the teacher latents of distill-decoder's pool once",
                       epilog="example: snapfusion decoder-latents --latent-pool 2048 --out lat.safetensors")
    _add_latent_options(c)
    c.add_argument("--latent-pool", type=types.positive("--latent-pool"), required=True,
                   help="how many latents (the pool size)")
    _add_prompts(c)
    c.add_argument("--num-emoji", type=types.positive("--num-emoji"), default=None,
                   help="prompts use the first N atlas emoji")
    c.add_argument("--data-seed", type=types.seed("--data-seed"), default=5,
                   help="seed of the prompt/seed/guidance stream "
                   "(default %(default)s)")
    c.add_argument("--batch-size", type=types.positive("--batch-size", maximum=MAX_BATCH), default=32,
                   help="latents per teacher call (default %(default)s)")
    options.add_device(c)
    c.add_argument("--out", required=True, type=types.output_file("--out", [".safetensors"]),
                   help="a .safetensors file")
    c.set_defaults(func=cmd_decoder_latents, check=check_latent_options)

    e = sub.add_parser("eval-decoder", help="PSNR of distilled decoders against the teacher's on held-out latents",
                       epilog="example: snapfusion eval-decoder runs/dec/final --teacher base --count 64")
    e.add_argument("students", nargs="+", help="decoder folders (vae-decoder or tiny-decoder kind)")
    _add_latent_options(e)
    e.add_argument("--count", type=types.positive("--count"), default=64,
                   help="held-out test-split prompts (default %(default)s)")
    e.add_argument("--batch-size", type=types.positive("--batch-size", maximum=MAX_BATCH), default=8,
                   help="latents per decoder call (default %(default)s)")
    e.add_argument("--num-emoji", type=types.positive("--num-emoji"), default=None,
                   help="only test prompts with the first N atlas emoji")
    e.add_argument("--pipeline-metrics", type=types.non_negative("--pipeline-metrics"), default=0, metavar="N",
                   help="also domain FID / CLIP / attribute accuracy of the full pipeline on N test prompts")
    e.add_argument("--pipeline-steps", type=types.steps("--pipeline-steps"), default=25,
                   help="DDIM steps of the pipeline metrics' latents "
                   "(default %(default)s)")
    e.add_argument("--pipeline-guidance", type=types.guidance("--pipeline-guidance"), default=5.0,
                   help="their guidance (default %(default)s)")
    options.add_device(e)
    e.add_argument("--out", default=None, type=types.output_file("--out"), help="also write the JSON report here")
    e.set_defaults(func=cmd_eval_decoder, check=check_eval_decoder)
