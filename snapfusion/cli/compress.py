"""The compression commands: the whole recipe (``compress``), then its stages: the efficient UNet (compress_evolve),
the efficient decoder (compress_decoder) and step distillation (compress_distill)."""

from __future__ import annotations

import argparse

from snapfusion.cli import compress_decoder, compress_distill, compress_evolve, options, types
from snapfusion.errors import InputError


def _config(a: argparse.Namespace):
    from snapfusion.compress import recipe_config

    stages = tuple(s.strip() for s in a.stages.split(",") if s.strip()) if a.stages else ()
    return recipe_config(a.teacher, a.run_dir, scale=a.scale, num_emoji=a.num_emoji,
                         latency_budget=a.latency_budget, device=a.device, max_minutes=a.max_minutes, stages=stages,
                         data_folder=a.data, prompts=a.prompts, architecture=a.architecture, decoder=a.decoder,
                         prior=a.prior, v_teacher=a.v_teacher, ship=a.ship, teacher_ratio=a.teacher_ratio,
                         guidance_teacher=a.guidance_teacher)


def check_compress(a: argparse.Namespace) -> None:
    """The recipe's own check (values, stage names, the teacher folder, inputs of a partial chain)."""
    from snapfusion.compress import check

    check(_config(a))


def cmd_compress(a: argparse.Namespace) -> None:
    from snapfusion.compress import run_recipe

    run_recipe(_config(a))


def _num_emoji(text: str) -> int:
    """--num-emoji: -1 (the preset's) or a positive count."""
    value = types.integer("--num-emoji", minimum=-1)(text)
    if value == 0:
        raise InputError("--num-emoji must be -1 (the preset's) or at least 1, got 0")
    return value


def _add_recipe(sub: argparse._SubParsersAction) -> None:
    from snapfusion.compress import STAGE_NAMES
    from snapfusion.compress.settings import GUIDANCE_TEACHERS, SCALES, SHIPPABLE

    c = sub.add_parser("compress", help="the whole SnapFusion recipe from a teacher pipeline, resumable: latency "
                       "table, robust training, evolution, KD fine-tuning, v-prediction, step distillation to 8 steps, "
                       "decoder, layout prior, assembly, evaluation (docs/recipe.md)",
                       epilog="example: snapfusion compress --teacher base --latency-budget 0.3 --run-dir runs/sf "
                              "--max-minutes 9   (run it again to continue; several GPUs: accelerate launch -m "
                              "snapfusion.cli compress ...)")
    c.add_argument("--teacher", default="base", help="the teacher: 'base' or a pipeline folder with a VAE encoder "
                   "(default %(default)s)")
    c.add_argument("--run-dir", required=True, type=types.output_dir("--run-dir"),
                   help="every stage's folder and manifest.json; rerun to continue")
    c.add_argument("--latency-budget", type=float, default=0.3, help="the evolved UNet's per-step latency as a "
                   "fraction of the teacher's on --device; with a given evolution log, on the log's own table, which "
                   "is replayed as far as a search to this budget would have gone (default %(default)s)")
    c.add_argument("--device", default="auto", type=options.device_name,
                   help="target device of the latency table: auto, cpu or cuda")
    c.add_argument("--max-minutes", type=types.number("--max-minutes", minimum=0.0), default=0.0,
                   help="stop after about this long, training at a "
                   "checkpoint, and say what is left (default 0: no limit)")
    c.add_argument("--stages", default=None, help=f"comma-separated stages to run, in recipe order: "
                   f"{','.join(STAGE_NAMES)} (default: the chain these options need: every stage but those a given "
                   f"--architecture log, --decoder or --prior replaces, v-student, and the students --ship does not "
                   f"name)")
    c.add_argument("--scale", choices=["full", "tiny"], default="full", help="full: the step counts behind the "
                   "shipped student; tiny: a few steps everywhere at 64 px (a CPU check of the chain)")
    c.add_argument("--num-emoji", type=_num_emoji, default=-1,
                   help="the teacher's training domain: the first N atlas emoji "
                   "(default: the preset's, 40)")
    c.add_argument("--data", default=None, metavar="FOLDER", help="train on your own images instead of the built-in "
                   "scenes: a folder of images and a metadata.jsonl with one {\"file_name\": ..., \"text\": ...} "
                   "per line (docs/data.md); needs --architecture bk-sdm, as evolution scores with the scene "
                   "evaluators; the evaluation then reports image statistics and agreement with the teacher")
    c.add_argument("--prompts", default=None, metavar="FILE", help="the decoder's teacher latents (and the own-data "
                   "evaluation) from these prompts: a text file, a .jsonl or an image folder (default: --data's "
                   "captions, else scene captions)")
    c.add_argument("--architecture", default="evolve", metavar="evolve|bk-sdm|LOG.jsonl", help="evolve: SnapFusion "
                   "Alg. 1 to --latency-budget, scored by the scene evaluators; bk-sdm: BK-SDM's fixed removal of one "
                   "layer per stage (no scoring, no budget search); an evolution log (evolve.jsonl) found earlier: "
                   "replayed on the teacher's weights, no robust training, no search (default %(default)s)")
    c.add_argument("--decoder", default=None, metavar="FOLDER", help="use this distilled decoder (e.g. one an "
                   "earlier run made from the same teacher decoder) instead of the three decoder stages")
    c.add_argument("--prior", default=None, metavar="FOLDER|teacher", help="use this layout prior ('teacher': the "
                   "teacher's own prior/, valid because the student reads the teacher's text tower) instead of "
                   "train-prior")
    c.add_argument("--v-teacher", default=None, metavar="FOLDER", help="use this v-prediction teacher UNet (e.g. "
                   "another run's v-teacher/final from the same teacher) instead of the v-teacher stage: runs at "
                   "several latency budgets share one")
    c.add_argument("--teacher-ratio", type=types.integer("--teacher-ratio", minimum=2, maximum=100), default=None,
                   help="teacher DDIM steps per student step in distill and (with the v teacher) distill-guidance: "
                   "2 is the paper's "
                   f"16 -> 8, 4 distils 32 -> 8 (default: the preset's, {SCALES['full'].teacher_ratio})")
    c.add_argument("--guidance-teacher", choices=GUIDANCE_TEACHERS, default=None,
                   help="the teacher of distill-guidance: student (one guided step of the two-call distilled "
                   "student per step: its one-call copy, Meng et al. 2023's first stage) or v-teacher (the v "
                   f"teacher's --teacher-ratio guided steps) (default: the preset's, "
                   f"{SCALES['full'].guidance_teacher})")
    c.add_argument("--ship", choices=SHIPPABLE, default="distill",
                   help="the student assembled: distill (n steps, two UNet calls per guided step), distill-guidance "
                   "(the guidance scale embedded: one call per step) or distill-half (n/2 steps); the stage it names "
                   "then runs in the chain (default %(default)s)")
    c.set_defaults(func=cmd_compress, check=check_compress)


def register(sub: argparse._SubParsersAction) -> None:
    """Add every compression command: the recipe, then its stages in recipe order."""
    _add_recipe(sub)
    compress_evolve.register(sub)
    compress_decoder.register(sub)
    compress_distill.register(sub)
