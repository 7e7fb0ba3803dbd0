"""``run_recipe``: a teacher pipeline folder -> an assembled SnapFusion pipeline, as one resumable chain of stages
(``RecipeConfig``, in settings.py, says which teacher, budget, device, time limit, stages and preset).

Each stage is a function ``(config, run_dir, budget) -> StageResult`` over the library (the stage commands are built on
the same functions). The run folder holds one folder per stage and ``manifest.json`` (manifest.py). A rerun skips
every done stage whose inputs (sha256) and settings are unchanged, resumes a partial one from its own checkpoint and
starts a stage afresh when its inputs changed. ``max_minutes`` bounds one invocation: a training stage gets the time
left as its own limit and stops at a checkpoint (the stage is then partial), and no stage starts after it is spent.
Under ``accelerate launch`` the training stages run in every process (DDP); the others run in the main process alone
(in a child process of a single-process environment) while the rest wait.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from snapfusion.compress import manifest as mf
from snapfusion.compress import processes
from snapfusion.compress import pipeline_stages as ps
from snapfusion.compress import unet_stages as us
from snapfusion.compress.core import (Budget, StageResult, data_inputs, device_of, gpu_count, teacher_dir, teacher_part,
                                      world)
from snapfusion.compress.settings import ARCHITECTURES, GUIDANCE_TEACHERS, SHIPPABLE, RecipeConfig, scale_preset
from snapfusion.config import format_config, save_json, to_dict
from snapfusion.errors import InputError, WeightsError
from snapfusion.fileio import trash


@dataclass(frozen=True)
class Stage:
    name: str                                             # the stage command it stands for
    run: Callable[[RecipeConfig, Path, Budget], StageResult]
    inputs: Callable[[RecipeConfig, Path], dict[str, Path]]   # what it reads (hashed into the manifest)
    settings: Callable[[RecipeConfig], dict]             # what it depends on besides its inputs
    trains: bool                                          # True: runs in every process (the training loop)
    section: str                                          # the SnapFusion paper section it implements


def _t(config: RecipeConfig, part: str) -> Path:
    return teacher_part(config, part)


def _common(config: RecipeConfig, *names: str) -> dict:
    s = config.scale
    return {"common": to_dict(s.common), **{n: (to_dict(getattr(s, n)) if dataclasses.is_dataclass(getattr(s, n))
                                                else getattr(s, n)) for n in names}}


def _frozen(config: RecipeConfig) -> dict[str, Path]:
    """The frozen parts of a UNet training stage, and the user's images when given."""
    return {"text_encoder": _t(config, "text_encoder"), "vae_encoder": _t(config, "vae_encoder"), **data_inputs(config)}


def _own_data(config: RecipeConfig) -> dict[str, Path]:
    """What the evaluation reads of the user's data: with an image folder, its captions or the prompt file."""
    return {**data_inputs(config), **data_inputs(config, prompts=True)} if config.data_folder else {}


STAGES: tuple[Stage, ...] = (
    Stage("bench-blocks", us.latency_table, lambda c, r: {"teacher_unet": _t(c, "unet")},
          lambda c: {"latency": to_dict(c.scale.latency), "size": c.scale.common.image_size,
                     "device": device_of(c).split(":")[0]}, False, "§3.1 latency lookup table"),
    Stage("robust-train", us.robust_train, lambda c, r: {"teacher_unet": _t(c, "unet"), **_frozen(c)},
          lambda c: _common(c, "robust"), True, "§3.1 robust training"),
    Stage("evolve", us.evolve, lambda c, r: _evolve_inputs(c, r),
          lambda c: {**_common(c, "evolution"), "latency_budget": c.latency_budget, "architecture": c.architecture},
          False, "§3.1 architecture evolution (Alg. 1)"),
    Stage("evolve-apply", us.evolve_apply, lambda c, r: {"log": r / "evolve" / "evolve.jsonl", "table": r / us.TABLE,
                                                        "teacher_unet": _t(c, "unet")},
          lambda c: {}, False, "§3.1 evolved architecture on the teacher's weights"),
    Stage("kd-finetune", us.kd_finetune, lambda c, r: {"unet": r / us.EVOLVED, "teacher_unet": _t(c, "unet"),
                                                      **_frozen(c)},
          lambda c: _common(c, "kd", "kd_feature_weight"), True, "§3.1 fine-tuning (output and feature KD)"),
    Stage("v-teacher", us.v_teacher, lambda c, r: {"teacher": teacher_dir(c), **data_inputs(c)},
          lambda c: _common(c, "v_teacher"), True, "§4 v-prediction fine-tuning (teacher)"),
    Stage("v-student", us.v_student, lambda c, r: {"unet": r / us.KD, "teacher": teacher_dir(c), **data_inputs(c)},
          lambda c: _common(c, "v_student"), True, "§4 v-prediction fine-tuning (student)"),
    Stage("distill", us.distill, lambda c, r: {"teacher_unet": us.v_teacher_of(c, r),
                                              "student_unet": r / us.distill_student(c), "teacher": teacher_dir(c),
                                              **data_inputs(c)},
          lambda c: _common(c, "distill", "student_steps", "teacher_ratio", "cfg_prob", "feature_weight"), True,
          "§4 direct step distillation to n steps (vanilla + CFG-aware)"),
    Stage("distill-guidance", us.distill_guidance,
          lambda c, r: {"teacher_unet": us.guidance_teacher_of(c, r)[0], "student_unet": r / us.STUDENT,
                        "teacher": teacher_dir(c), **data_inputs(c)},
          lambda c: {**_common(c, "guidance_student", "guidance_range", "student_steps"),
                     **us.guidance_teacher_settings(c)}, True,
          "guidance-embedded student, one UNet call per step (Meng et al. 2023; not in the paper)"),
    Stage("distill-half", us.distill_half, lambda c, r: {"teacher_unet": r / us.STUDENT, "teacher": teacher_dir(c),
                                                        **data_inputs(c)},
          lambda c: _common(c, "half", "student_steps", "cfg_prob", "feature_weight"), True,
          "§4 step distillation again, n -> n/2"),
    Stage("reduce-decoder", ps.reduce_decoder, lambda c, r: {"teacher_decoder": _t(c, "vae_decoder")},
          lambda c: {"ratio": c.scale.decoder.ratio}, False, "§3.2 decoder channel reduction"),
    Stage("decoder-latents", ps.decoder_latents, lambda c, r: {"teacher": teacher_dir(c),
                                                               **data_inputs(c, prompts=True)},
          lambda c: _common(c, "decoder"), False, "§3.2 teacher latents"),
    Stage("distill-decoder", ps.distill_decoder, lambda c, r: {"decoder": r / ps.REDUCED, "latents": r / ps.LATENTS,
                                                              "teacher": teacher_dir(c),
                                                              **data_inputs(c, prompts=True)},
          lambda c: _common(c, "decoder"), True, "§3.2 decoder distillation"),
    Stage("train-prior", ps.train_prior, lambda c, r: {"teacher": teacher_dir(c), **data_inputs(c)},
          lambda c: {"prior": to_dict(c.scale.prior), "num_emoji": c.scale.common.num_emoji}, False,
          "layout prior (not in the paper)"),
    Stage("assemble", ps.assemble,
          lambda c, r: {"unet": ps.shipped_unet(c, r), "decoder": ps.decoder_of(c, r), "prior": ps.prior_of(c, r),
                        "table": r / us.TABLE, "teacher": teacher_dir(c)},
          lambda c: {"student_steps": ps.shipped_steps(c)}, False, "the SnapFusion pipeline"),
    Stage("eval", ps.evaluate, lambda c, r: {"pipeline": r / ps.PIPELINE, "teacher": teacher_dir(c), **_own_data(c)},
          lambda c: {**_common(c, "evaluation"), "student_steps": ps.shipped_steps(c)}, False, "§5 evaluation"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def _evolve_inputs(config: RecipeConfig, run_dir: Path) -> dict[str, Path]:
    """Evolution reads the latency table, the robust-trained start and the teacher; a given log only the log, the
    table and the teacher UNet."""
    if us.is_log(config.architecture):
        return {"log": Path(config.architecture), "table": run_dir / us.TABLE, "teacher_unet": _t(config, "unet")}
    return {"table": run_dir / us.TABLE, "start": run_dir / us.ROBUST, "teacher": teacher_dir(config),
            **data_inputs(config)}


def unneeded(config: RecipeConfig) -> set[str]:
    """Stages the default chain leaves out for this config: robust training with a given architecture, the decoder
    stages with a given decoder, the prior with a given prior, v-student when the KD fine-tune already predicts v,
    and the frontier students that are not the one shipped."""
    out = {"distill-guidance", "distill-half"} - {config.ship}
    if us.is_log(config.architecture):
        out.add("robust-train")
    if config.decoder:
        out |= {"reduce-decoder", "decoder-latents", "distill-decoder"}
    if config.prior:
        out.add("train-prior")
    if config.v_teacher:
        out.add("v-teacher")
    if config.scale.kd_prediction == "v_prediction":
        out.add("v-student")
    return out


def recipe_config(teacher: str, run_dir: str, *, scale: str = "full", num_emoji: int | None = -1,
                  teacher_ratio: int | None = None, guidance_teacher: str | None = None,
                  **kwargs) -> RecipeConfig:
    """A ``RecipeConfig`` from a preset name; ``num_emoji`` other than -1, ``teacher_ratio`` and
    ``guidance_teacher`` other than None override the preset's."""
    preset = scale_preset(scale)
    if guidance_teacher is not None:  # checked by check(), as --ship
        preset = dataclasses.replace(preset, guidance_teacher=guidance_teacher)
    if num_emoji != -1:
        preset = dataclasses.replace(preset, common=dataclasses.replace(preset.common, num_emoji=num_emoji))
    if teacher_ratio is not None:
        preset = dataclasses.replace(preset, teacher_ratio=teacher_ratio)
    return RecipeConfig(teacher=teacher, run_dir=run_dir, scale=preset, **kwargs)


def _check_grid(student_steps: int, teacher_ratio: int) -> None:
    """The distillation's nested grids (``step_grid``, as ``distill`` will build them), or a one-line error."""
    from snapfusion.distill.teacher import step_grid
    from snapfusion.errors import ConfigError

    try:
        step_grid(student_steps, ratio=teacher_ratio)
    except ConfigError as err:
        raise InputError(f"--teacher-ratio {teacher_ratio!r}: {err}") from None
    if teacher_ratio == 1:  # distill would refuse it after the earlier stages had run
        raise InputError("--teacher-ratio 1: distill must reduce steps (at least 2 teacher steps per student step; "
                         "--guidance-teacher student is the one-call copy at one step per step)")


def check(config: RecipeConfig) -> list[Stage]:
    """The stages to run; every user error (values, stage names, the teacher folder, missing inputs of a partial
    chain) as one ``SnapFusionError`` before any work."""
    from snapfusion.config import load_json
    from snapfusion.pipeline import INDEX

    if not 0 < config.latency_budget <= 1:
        raise InputError(f"--latency-budget must be in (0, 1], got {config.latency_budget}")
    _check_grid(config.scale.student_steps, config.scale.teacher_ratio)
    if config.max_minutes < 0:
        raise InputError(f"--max-minutes must be >= 0, got {config.max_minutes}")
    unknown = [s for s in config.stages if s not in STAGE_NAMES]
    if unknown:
        raise InputError(f"--stages: unknown stage(s) {', '.join(unknown)} (known: {', '.join(STAGE_NAMES)})")
    folder = teacher_dir(config)
    index = folder / INDEX
    if not index.is_file() or load_json(index).get("kind") != "pipeline":
        raise WeightsError(f"--teacher {config.teacher}: no snapfusion pipeline folder at {folder} (missing {index})")
    for part in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        if not (teacher_part(config, part) / "config.json").is_file():
            raise WeightsError(f"--teacher {config.teacher}: the pipeline has no {part}/ (the recipe trains in its "
                               "latent space: assemble it with its VAE encoder)")
    skipped = unneeded(config)
    chosen = [s for s in STAGES if s.name in config.stages] if config.stages else [
        s for s in STAGES if s.name not in skipped]
    _check_data(config, {s.name for s in chosen})
    run_dir, made = Path(config.run_dir), set()
    for stage in chosen:
        for name, path in stage.inputs(config, run_dir).items():
            if not path.exists() and path not in made:
                producer = next((s.name for s in STAGES if path in _outputs_of(s, config, run_dir)), None)
                raise InputError(f"stage {stage.name} needs {path} ({name})" + (
                    f", which stage {producer} makes: include {producer} in --stages" if producer else ""))
        made |= _outputs_of(stage, config, run_dir)
    return chosen


def _check_data(config: RecipeConfig, names: set[str]) -> None:
    """--data, --prompts and --architecture: every metadata line and image header read, and evolution refused on
    your own data (its candidates are scored by the scene evaluators) unless the BK-SDM rule is asked for."""
    from snapfusion.data.folder import ImageCaptionFolder, read_prompts

    if us.is_log(config.architecture):
        _check_log(config)
    elif config.architecture not in ARCHITECTURES:
        raise InputError(f"--architecture {config.architecture!r}: unknown (known: {', '.join(ARCHITECTURES)}, or an "
                         "evolution log .jsonl)")
    if config.ship not in SHIPPABLE:
        raise InputError(f"--ship {config.ship!r}: unknown (known: {', '.join(SHIPPABLE)})")
    if config.scale.guidance_teacher not in GUIDANCE_TEACHERS:
        raise InputError(f"--guidance-teacher {config.scale.guidance_teacher!r}: unknown (known: "
                         f"{', '.join(GUIDANCE_TEACHERS)})")
    given = {"--decoder": config.decoder and Path(config.decoder),
             "--prior": config.prior and ps.prior_of(config, Path(config.run_dir))}
    for name, path in given.items():
        if path and not (path / "config.json").is_file():
            raise InputError(f"{name} {path}: no config.json there (a {name[2:]} folder)")
    if config.v_teacher:
        _check_v_teacher(Path(config.v_teacher))
    if config.prompts:
        read_prompts(config.prompts)
    if not config.data_folder:
        return
    images = len(ImageCaptionFolder(config.data_folder, config.scale.common.image_size))
    if "evolve" in names and config.architecture == "evolve":  # a given log or bk-sdm is not scored
        raise InputError("--data: evolution scores its candidates with the shipped scene evaluators, which know "
                         "nothing of your images; pass --architecture bk-sdm (BK-SDM's fixed block removal, no "
                         "latency search) or leave evolve out of --stages")
    if "train-prior" in names and images < 10:
        raise InputError(f"--data {config.data_folder}: the layout prior needs at least 10 images, the folder has "
                         f"{images}")


def _check_v_teacher(path: Path) -> None:
    """A given v teacher must be a UNet folder that predicts v (one not made yet is the input check's concern: an
    early part of the chain runs before the run that makes it has finished)."""
    from snapfusion.evolve.runs import unet_config_of

    if not path.exists():
        return
    if not (path / "config.json").is_file():
        raise InputError(f"--v-teacher {path}: no config.json there (a UNet folder, e.g. a run's v-teacher/final)")
    prediction = unet_config_of(path).prediction_type
    if prediction != "v_prediction":
        raise InputError(f"--v-teacher {path}: the UNet predicts {prediction}, not v (the distillations' teacher is a "
                         "v-prediction UNet)")


def _check_log(config: RecipeConfig) -> None:
    """A given evolution log must exist, parse, and not be asked for a budget below its own search's that it does not
    reach (on its own latency table); at its own budget it is replayed whole, reached or not."""
    from snapfusion.evolve.evolution import own_budget, read_log, reached_fraction, within_budget

    if not Path(config.architecture).is_file():
        raise InputError(f"--architecture {config.architecture}: no such evolution log")
    log = read_log(config.architecture)
    best = reached_fraction(within_budget(log, config.latency_budget))
    if best > config.latency_budget and config.latency_budget < own_budget(log) * (1 - 1e-9):
        raise InputError(f"--architecture {config.architecture}: the log ends at {best:.1%} of its start latency, "
                         f"above --latency-budget {config.latency_budget} (its search aimed at "
                         f"{own_budget(log):.0%}: a larger budget, or a new search)")


def _outputs_of(stage: Stage, config: RecipeConfig, run_dir: Path) -> set[Path]:
    """The paths later stages read from this stage's folder."""
    return {p for s in STAGES for p in s.inputs(config, run_dir).values() if run_dir / stage.name in p.parents}


def _hashes(paths: dict[str, Path], cache: dict[Path, str], run_dir: Path) -> dict[str, dict]:
    """{name: {path, sha256}}; paths outside the run folder (the teacher) are hashed once per invocation."""
    out = {}
    for name, path in paths.items():
        outside = run_dir not in path.parents
        digest = cache.get(path) if outside else None
        if digest is None:
            digest = mf.sha256_path(path)
            if outside:
                cache[path] = digest
        out[name] = {"path": str(path), "sha256": digest}
    return out


def _decide(stage: Stage, config: RecipeConfig, run_dir: Path, budget: Budget, cache: dict, ran: bool) -> dict:
    """What to do with a stage: skip (done and current), stop (time spent, once a stage has run in this invocation:
    every invocation makes progress), resume, or fresh (wipe its folder)."""
    inputs = _hashes(stage.inputs(config, run_dir), cache, run_dir)
    settings = stage.settings(config)
    digest = mf.settings_sha256(settings)
    entry = mf.read(run_dir)["stages"].get(stage.name)
    current = mf.is_current(entry, inputs, digest)
    if current and entry["status"] == "done" and mf.outputs_exist(entry):
        action = "skip"
    elif budget.expired() and ran:
        action = "stop"
    else:
        action = "resume" if current else "fresh"
    return {"action": action, "inputs": inputs, "settings": settings, "settings_sha256": digest}


def _entry(stage: Stage, decision: dict, device: str, status: str, wall: float, result: StageResult | None,
           error: str = "") -> dict:
    outputs = {}
    for name, path in (result.outputs if result else {}).items():
        outputs[name] = {"path": path, "sha256": mf.sha256_path(path)}
    return {"status": status, "section": stage.section, "inputs": decision["inputs"], "settings": decision["settings"],
            "settings_sha256": decision["settings_sha256"], "device": _device_name(device), "processes": world()[1],
            "wall_s": round(wall, 2), "gpu_minutes": round(wall / 60 * gpu_count(device), 3), "outputs": outputs,
            "metrics": result.metrics if result else {}, "note": result.note if result else error,
            "finished": mf.now()}


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def run_recipe(config: RecipeConfig) -> dict:
    """Run (or continue) the recipe; returns {"status": "done" | "partial", "left": [stage names], "pipeline": path}."""
    chosen = check(config)
    budget = Budget(config.max_minutes)
    rank, n, _ = world()
    main = rank == 0
    run_dir = Path(config.run_dir)
    device = device_of(config)
    if n > 1:
        processes.init_group()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        print(f"[compress] recipe config:\n{format_config(config)}", flush=True)
        save_json(config, run_dir / "recipe.json")
        with mf.locked(run_dir):
            mf.write(run_dir, {**mf.read(run_dir), "recipe": to_dict(config)})
    cache: dict[Path, str] = {}
    ran = False
    for i, stage in enumerate(chosen):
        decision = processes.share(_decide(stage, config, run_dir, budget, cache, ran) if main else None)
        if decision["action"] == "skip":
            if main:
                print(f"[compress] {stage.name}: done, inputs unchanged: skipped", flush=True)
            continue
        left = [s.name for s in chosen[i:]]
        if decision["action"] == "stop":
            return _stopped(left, f"the {config.max_minutes:g} minutes are spent", main)
        if main:
            if decision["action"] == "fresh":
                trash(run_dir / stage.name)
            print(f"[compress] {stage.name} ({stage.section}): {decision['action']}", flush=True)
            mf.record(run_dir, stage.name, _entry(stage, decision, device, "partial", 0.0, None, "running"),
                      accumulate=decision["action"] == "resume", new_invocation=True)
        processes.barrier()
        ran, t0 = True, time.time()
        try:
            result = (stage.run(config, run_dir, budget) if stage.trains or n == 1
                      else processes.run_alone(stage.run, stage.name, config, run_dir, budget))
        except BaseException as err:
            if main:
                mf.record(run_dir, stage.name, _entry(stage, decision, device, "failed", time.time() - t0, None,
                                                      f"{type(err).__name__}: {err}"))
            raise
        result = processes.share(result if main else None)
        if main:
            entry = mf.record(run_dir, stage.name, _entry(stage, decision, device, result.status, time.time() - t0,
                                                          result))
            print(f"[compress] {stage.name}: {result.status} in {entry['wall_s']:.1f} s"
                  + (f" ({result.note})" if result.note else ""), flush=True)
        processes.barrier()
        if result.status != "done":
            return _stopped(left, f"{stage.name} is partial ({result.note})", main)
    pipeline = run_dir / ps.PIPELINE
    if main:
        made = f"; pipeline {pipeline}" if pipeline.is_dir() else ""
        print(f"[compress] done: {', '.join(s.name for s in chosen)}{made}; manifest {run_dir / mf.MANIFEST}",
              flush=True)
    return {"status": "done", "left": [], "pipeline": str(pipeline) if pipeline.is_dir() else None}


def _stopped(left: list[str], why: str, main: bool) -> dict:
    if main:
        print(f"[compress] stopped: {why}; left: {', '.join(left)}. Run the same command again to continue.",
              flush=True)
    return {"status": "partial", "left": left, "pipeline": None}
