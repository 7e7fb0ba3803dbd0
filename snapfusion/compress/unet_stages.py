"""The recipe's UNet stages (SnapFusion §3.1 and §4), each ``(config, run_dir, budget) -> StageResult``: the latency
table, robust training, evolution, its replay on the teacher's weights, fine-tuning with output and feature
distillation, v-prediction teacher and student, and direct step distillation (r n -> n, r = teacher_ratio)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from snapfusion.compress.core import (Budget, StageResult, device_of, loop_config, resuming, stage_dir,
                                      teacher_dir, teacher_part, training_result)
from snapfusion.compress.settings import RecipeConfig
from snapfusion.evolve.runs import ChunkStopped, clip_scorer, unet_config_of

# every stage's output, relative to the run folder (the next stages read them from here)
TABLE = "bench-blocks/table.json"
ROBUST = "robust-train/final"
EVOLVED = "evolve-apply/unet"
KD = "kd-finetune/final"
V_TEACHER = "v-teacher/final"
V_STUDENT = "v-student/final"
STUDENT = "distill/final"


def is_log(architecture: str) -> bool:
    """True when ``--architecture`` names an evolution log to replay rather than a way to find one."""
    return architecture.endswith(".jsonl")


def distill_student(config: RecipeConfig) -> str:
    """The distillation's start: the KD fine-tune itself when it already predicts v, else its v fine-tune."""
    return KD if config.scale.kd_prediction == "v_prediction" else V_STUDENT


def v_teacher_of(config: RecipeConfig, run_dir: Path) -> Path:
    """The distillations' teacher: ``--v-teacher`` or the run's own v-teacher stage."""
    return Path(config.v_teacher) if config.v_teacher else Path(run_dir) / V_TEACHER


def guidance_teacher_of(config: RecipeConfig, run_dir: Path) -> tuple[Path, int]:
    """distill-guidance's teacher and its steps per student step: the v teacher at ``teacher_ratio``, or (preset
    ``guidance_teacher="student"``) the two-call n-step student itself, one guided step per step."""
    if config.scale.guidance_teacher == "student":
        return Path(run_dir) / STUDENT, 1
    return v_teacher_of(config, run_dir), config.scale.teacher_ratio


def guidance_teacher_settings(config: RecipeConfig) -> dict:
    """distill-guidance's teacher settings for the manifest: the ratio, and the teacher only when it is not the v
    teacher (so that run folders from before the option keep their settings)."""
    if config.scale.guidance_teacher == "student":
        return {"guidance_teacher": "student", "teacher_ratio": 1}
    return {"teacher_ratio": config.scale.teacher_ratio}


def unet_task(config: RecipeConfig, model, *, latent_pool: int = 0, seed: int = 2, **kd):
    """The ``UNetTaskConfig`` of a UNet training stage: the teacher's frozen text tower and VAE encoder, the scenes
    or the recipe's image folder."""
    from snapfusion.data import SceneConfig
    from snapfusion.train.tasks import UNetTaskConfig

    c = config.scale.common
    return UNetTaskConfig(model=model, vae=str(teacher_part(config, "vae_encoder")),
                          text_encoder=str(teacher_part(config, "text_encoder")), image_size=c.image_size,
                          data=SceneConfig(num_emoji=c.num_emoji), offset_noise=c.offset_noise,
                          latent_pool=latent_pool, pool_workers=c.num_workers, seed=seed,
                          data_folder=config.data_folder, **kd)


def export_final(run_dir: Path) -> Path | None:
    """The run's last checkpoint (EMA weights if kept) as the UNet folder ``run_dir/final``; None off the main
    process."""
    from snapfusion.models.unet import UNet
    from snapfusion.train.loop import is_main_process
    from snapfusion.train.stages import _replace_dir
    from snapfusion.train.state import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None or not is_main_process():
        return None
    unet = UNet.load(ckpt / "ema" if (ckpt / "ema").is_dir() else ckpt / "model")
    return _replace_dir(lambda d: unet.save(d), run_dir / "final", int(ckpt.name.split("_")[-1]))


def latency_table(config: RecipeConfig, run_dir: Path, budget: Budget) -> StageResult:
    """bench-blocks: the teacher UNet's per-block latency on the target device (batch 2: one image with CFG)."""
    from snapfusion.evolve.latency import TableConfig, measure_table, predict_ms, save_table
    from snapfusion.models.unet import UNet

    s, device = config.scale.latency, device_of(config)
    cuda = device.startswith("cuda")
    threads = 0 if cuda else s.threads
    bench = TableConfig(size=config.scale.common.image_size, batch=2, warmup=s.warmup, repeats=s.repeats,
                        inner=10 if cuda else 1, dtype="fp16" if cuda else "fp32",
                        clock="cpu" if threads == 1 else "wall", cuda_graphs=cuda and s.cuda_graphs)
    unet = UNet.load(teacher_part(config, "unet"), dtype=torch.float32)
    old_threads = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        with torch.no_grad():
            table = measure_table(unet, bench, device=device, meta={"model": str(teacher_part(config, "unet"))})
    finally:
        torch.set_num_threads(old_threads)
    out = run_dir / TABLE
    out.parent.mkdir(parents=True, exist_ok=True)
    save_table(table, out)
    step_ms = predict_ms(unet.config, table)[0]  # what the evolution starts from
    return StageResult("done", {"table": str(out)}, {
        "whole_ms": table["whole_ms"], "predicted_ms": step_ms, "relative_error": table["relative_error"],
        "budget_ms": config.latency_budget * step_ms, "blocks": len(table["blocks"])})


def robust_train(config: RecipeConfig, run_dir: Path, budget: Budget) -> StageResult:
    """SnapFusion §3.1 robust training: every res and attn block runs with probability 0.9, per sample."""
    from snapfusion.evolve.robust import RobustConfig, RobustTask, RobustTaskConfig
    from snapfusion.train.loop import train

    s, folder, init = config.scale.robust, stage_dir(run_dir, "robust-train"), teacher_part(config, "unet")
    task = RobustTaskConfig(unet=unet_task(config, unet_config_of(init), latent_pool=s.latent_pool), init=str(init),
                            robust=RobustConfig(0.9, 0.9, "sample"))
    train(loop_config(config, folder, s, budget, seed=1), RobustTask(task), resume=resuming(folder))
    export_final(folder)
    return training_result(folder, s, {"unet": str(run_dir / ROBUST)})


def _chunk(config: RecipeConfig, budget: Budget, device: str):
    """Evolution's robust-training chunk between two steps: ``evolve.runs.training_chunk`` with the time left as the
    loop's limit (``ChunkStopped`` when it stops a chunk before its last step: the iteration is redone)."""
    from snapfusion.evolve.robust import RobustConfig, RobustTaskConfig
    from snapfusion.evolve.runs import ChunkConfig, training_chunk

    e, c = config.scale.evolution, config.scale.common
    chunk = ChunkConfig(steps=e.chunk_steps, batch_size=e.chunk_batch, lr=e.chunk_lr, mixed_precision=c.mixed_precision,
                        num_workers=c.num_workers)
    return training_chunk(lambda unet_cfg, init: RobustTaskConfig(unet=unet_task(config, unet_cfg), init=init,
                                                                  robust=RobustConfig()),
                          chunk, device, time_left=budget.remaining_minutes)


def fixed_rule(config: RecipeConfig, run_dir: Path) -> StageResult:
    """BK-SDM's fixed-rule block removal (evolve/baselines.py) of the robust-trained UNet, written as one evolution
    step so that evolve-apply replays it: no candidate is scored (no evaluators) and no latency budget is searched."""
    from snapfusion.config import to_dict
    from snapfusion.evolve.actions import Action, edited_unet
    from snapfusion.evolve.baselines import bk_sdm
    from snapfusion.evolve.evolution import LOG
    from snapfusion.evolve.latency import load_table, predict_ms
    from snapfusion.evolve.robust import load_matching
    from snapfusion.fileio import atomic_write_text
    from snapfusion.models.unet import UNet

    folder, table = stage_dir(run_dir, "evolve"), load_table(run_dir / TABLE)
    unet = load_matching(UNet(unet_config_of(run_dir / ROBUST)), run_dir / ROBUST)
    start_ms = predict_ms(unet.config, table)[0]
    budget_ms = config.latency_budget * start_ms
    _, removed = bk_sdm(unet.config)
    records = []
    for block in removed:
        unet, _, _ = edited_unet(unet, Action("remove", block))
        records.append({"iteration": 0, "type": "action", "op": "remove", "block": block, "applied": True,
                        "rule": "bk-sdm", "latency_after_ms": predict_ms(unet.config, table)[0]})
    final_ms = predict_ms(unet.config, table)[0]
    records.append({"iteration": 0, "type": "step", "rule": "bk-sdm", "clip": None, "latency_ms": start_ms,
                    "budget_ms": budget_ms, "over_budget": start_ms > budget_ms, "candidates": [],
                    "latency_after_ms": final_ms, "config": to_dict(unet.config)})
    folder.mkdir(parents=True, exist_ok=True)
    unet.save(folder / "final")
    atomic_write_text(folder / LOG, "".join(json.dumps(r) + "\n" for r in records))
    return StageResult("done", {"log": str(folder / LOG), "unet": str(folder / "final")}, {
        "rule": "bk-sdm", "removed": len(removed), "start_ms": start_ms, "budget_ms": budget_ms,
        "final_ms": final_ms, "final_fraction": final_ms / start_ms, "within_budget": final_ms <= budget_ms},
        f"BK-SDM fixed rule: {len(removed)} blocks removed, {final_ms / start_ms:.0%} of the teacher's latency "
        f"(budget {config.latency_budget:.0%} not searched for)")


def given_log(config: RecipeConfig, run_dir: Path) -> StageResult:
    """An architecture found earlier (``--architecture LOG.jsonl``), cut where a search to ``latency_budget`` would
    have stopped (``within_budget``, on the log's own latency table): kept as this run's evolution log and checked by
    replaying it on the teacher UNet; no robust training, no scoring."""
    from snapfusion.evolve.evolution import LOG, read_log, reached_fraction, replay, within_budget
    from snapfusion.evolve.latency import load_table, predict_ms
    from snapfusion.evolve.robust import load_matching
    from snapfusion.fileio import atomic_write_text
    from snapfusion.models.unet import UNet

    folder, init = stage_dir(run_dir, "evolve"), teacher_part(config, "unet")
    folder.mkdir(parents=True, exist_ok=True)
    whole = read_log(config.architecture)
    kept = within_budget(whole, config.latency_budget)
    atomic_write_text(folder / LOG, "".join(json.dumps(r) + "\n" for r in kept))
    start = load_matching(UNet(unet_config_of(init)), init)
    model, n = replay(kept, start)
    model.save(folder / "final")
    table = load_table(run_dir / TABLE)
    start_ms, final_ms = predict_ms(start.config, table)[0], predict_ms(model.config, table)[0]
    log_fraction = reached_fraction(kept)
    iterations = max(r["iteration"] for r in kept if r["type"] == "step") + 1
    return StageResult("done", {"log": str(folder / LOG), "unet": str(folder / "final")}, {
        "rule": "given log", "actions": n, "iterations": iterations,
        "log_iterations": max(r["iteration"] for r in whole if r["type"] == "step") + 1,
        "log_fraction": log_fraction, "start_ms": start_ms, "final_ms": final_ms,
        "final_fraction": final_ms / start_ms, "within_budget": log_fraction <= config.latency_budget},
        f"architecture replayed from {config.architecture} to {config.latency_budget:.0%}: {iterations} iteration(s), "
        f"{log_fraction:.1%} of the start on the log's table, {final_ms / start_ms:.1%} on this one (no search)")


def evolve(config: RecipeConfig, run_dir: Path, budget: Budget) -> StageResult:
    """SnapFusion Alg. 1: remove the lowest-ΔCLIP/ΔLatency blocks while over the budget, add the best copies under
    (``architecture`` "bk-sdm": BK-SDM's fixed rule instead, ``fixed_rule``)."""
    from snapfusion.data import load_prompt_set
    from snapfusion.eval.evaluators import load_evaluators
    from snapfusion.evolve.actions import EvalConfig
    from snapfusion.evolve.evolution import EvolveConfig
    from snapfusion.evolve.evolution import evolve as run_evolution
    from snapfusion.evolve.latency import load_table, predict_ms
    from snapfusion.evolve.robust import load_matching
    from snapfusion.loading import resolve_model
    from snapfusion.models.unet import UNet

    if config.architecture == "bk-sdm":
        return fixed_rule(config, run_dir)
    if is_log(config.architecture):
        return given_log(config, run_dir)
    e, device, folder = config.scale.evolution, device_of(config), stage_dir(run_dir, "evolve")
    pipe = resolve_model(str(teacher_dir(config)), device=device)
    start = load_matching(UNet(unet_config_of(run_dir / ROBUST)), run_dir / ROBUST).to(device)
    records = load_prompt_set("test200", num_emoji=config.scale.common.num_emoji)[: e.num_prompts]
    scorer = clip_scorer(load_evaluators(device=device))  # per-image domain CLIP score (the shipped scene CLIP)
    ev = EvalConfig(prompt_set="test200", num_prompts=e.num_prompts, steps=e.eval_steps, guidance=e.guidance,
                    size=config.scale.common.image_size, batch=e.eval_batch)
    cfg = EvolveConfig(budget_fraction=config.latency_budget, iterations=e.iterations,
                       actions_per_step=e.actions_per_step, eval=ev, max_minutes=budget.remaining_minutes())
    table = load_table(run_dir / TABLE)
    try:
        with torch.no_grad():
            state = run_evolution(folder, start, pipe, records, scorer, table, cfg, _chunk(config, budget, device))
    except ChunkStopped as stop:
        return StageResult("partial", note=str(stop))
    finished = state["done"] or state["iteration"] >= e.iterations
    metrics = {"iterations": state["iteration"], "converged": state["done"], "start_ms": state["start_ms"],
               "budget_ms": state["budget_ms"]}
    if not finished:
        return StageResult("partial", metrics=metrics, note=f"iteration {state['iteration']} of {e.iterations}")
    final_ms = predict_ms(UNet.load(folder / "final").config, table)[0]
    return StageResult("done", {"log": str(folder / "evolve.jsonl"), "unet": str(folder / "final")},
                       {**metrics, "final_ms": final_ms, "final_fraction": final_ms / state["start_ms"],
                        "within_budget": final_ms <= state["budget_ms"]})


def evolve_apply(config: RecipeConfig, run_dir: Path, budget: Budget) -> StageResult:
    """The evolved architecture on the teacher UNet's own weights (as the shipped student's start was made)."""
    from snapfusion.evolve.evolution import read_log, replay
    from snapfusion.evolve.latency import load_table, predict_ms
    from snapfusion.evolve.robust import load_matching
    from snapfusion.models.unet import UNet, num_parameters

    init = teacher_part(config, "unet")
    start = load_matching(UNet(unet_config_of(init)), init)
    model, n = replay(read_log(stage_dir(run_dir, "evolve")), start)
    model.save(run_dir / EVOLVED)
    table = load_table(run_dir / TABLE)
    ms, teacher_ms = predict_ms(model.config, table)[0], predict_ms(start.config, table)[0]
    return StageResult("done", {"unet": str(run_dir / EVOLVED)}, {
        "actions": n, "parameters": num_parameters(model), "teacher_parameters": num_parameters(start),
        "predicted_ms": ms, "teacher_ms": teacher_ms, "latency_fraction": ms / teacher_ms})


def kd_finetune(config: RecipeConfig, run_dir: Path, budget: Budget) -> StageResult:
    """Fine-tune the evolved UNet with output KD + feature KD from the teacher UNet (BK-SDM's): to v-prediction
    directly (``kd_prediction`` "v_prediction", the implied eps against the teacher's), or with the eps loss."""
    from snapfusion.evolve.robust import RobustConfig, RobustTask, RobustTaskConfig
    from snapfusion.train.loop import train

    s, folder, init = config.scale.kd, stage_dir(run_dir, "kd-finetune"), run_dir / EVOLVED
    if config.scale.kd_prediction == "v_prediction":
        return _v_finetune(config, run_dir, budget, "kd-finetune", str(init), seed=2, train=s,
                           kd_unet=str(teacher_part(config, "unet")), kd_feature_weight=config.scale.kd_feature_weight)
    unet = unet_task(config, unet_config_of(init), latent_pool=s.latent_pool, kd_unet=str(teacher_part(config, "unet")),
                     kd_weight=1.0, kd_feature_weight=config.scale.kd_feature_weight)
    task = RobustTaskConfig(unet=unet, init=str(init), robust=RobustConfig(1.0, 1.0))
    train(loop_config(config, folder, s, budget, seed=2), RobustTask(task), resume=resuming(folder))
    export_final(folder)
    return training_result(folder, s, {"unet": str(run_dir / KD)})


def _v_finetune(config: RecipeConfig, run_dir: Path, budget: Budget, name: str, source_unet: str | None,
                seed: int, train=None, **kd) -> StageResult:
    from snapfusion.data import SceneConfig
    from snapfusion.distill.stages import finetune_v
    from snapfusion.distill.tasks import ModelSource, VFinetuneConfig

    s = train or (config.scale.v_teacher if source_unet is None else config.scale.v_student)
    c, folder = config.scale.common, stage_dir(run_dir, name)
    cfg = VFinetuneConfig(source=ModelSource(pipeline=str(teacher_dir(config)), teacher_unet=source_unet),
                          image_size=c.image_size, data=SceneConfig(num_emoji=c.num_emoji), offset_noise=c.offset_noise,
                          latent_pool=s.latent_pool, pool_workers=c.num_workers, data_folder=config.data_folder, **kd)
    finetune_v(loop_config(config, folder, s, budget, seed=seed), cfg, resume=resuming(folder))
    return training_result(folder, s, {"unet": str(folder / "final")})


def v_teacher(config: RecipeConfig, run_dir: Path, budget: Budget) -> StageResult:
    """SnapFusion §4: the teacher UNet fine-tuned to v-prediction (the 16-step teacher of the distillation)."""
    return _v_finetune(config, run_dir, budget, "v-teacher", None, seed=3)


def v_student(config: RecipeConfig, run_dir: Path, budget: Budget) -> StageResult:
    """SnapFusion §4: the fine-tuned evolved UNet to v-prediction (the student's start)."""
    return _v_finetune(config, run_dir, budget, "v-student", str(run_dir / KD), seed=4)


def _distill(config: RecipeConfig, run_dir: Path, budget: Budget, name: str, s, *, teacher_unet: Path,
             student_unet: str, seed: int, **options) -> StageResult:
    from snapfusion.data import SceneConfig
    from snapfusion.distill.stages import distill_steps
    from snapfusion.distill.tasks import DistillConfig, ModelSource

    c, folder = config.scale.common, stage_dir(run_dir, name)
    settings = dict(student_steps=config.scale.student_steps, teacher_ratio=config.scale.teacher_ratio,
                    cfg_prob=config.scale.cfg_prob,
                    guidance_range=(2.0, 14.0), ori_weight=0.2, feature_weight=config.scale.feature_weight)
    cfg = DistillConfig(source=ModelSource(pipeline=str(teacher_dir(config)), teacher_unet=str(teacher_unet)),
                        student_unet=str(run_dir / student_unet), image_size=c.image_size,
                        data=SceneConfig(num_emoji=c.num_emoji), offset_noise=c.offset_noise,
                        latent_pool=s.latent_pool, pool_workers=c.num_workers, data_folder=config.data_folder,
                        **{**settings, **options})
    distill_steps(loop_config(config, folder, s, budget, seed=seed), cfg, resume=resuming(folder))
    return training_result(folder, s, {"unet": str(folder / "final")})


def distill(config: RecipeConfig, run_dir: Path, budget: Budget) -> StageResult:
    """SnapFusion §4: direct step distillation r n -> n (r = teacher_ratio; the paper: 16 -> 8), vanilla and CFG-aware
    losses mixed, L_ori, the feature term."""
    return _distill(config, run_dir, budget, "distill", config.scale.distill,
                    teacher_unet=v_teacher_of(config, run_dir), student_unet=distill_student(config), seed=5)


def distill_guidance(config: RecipeConfig, run_dir: Path, budget: Budget) -> StageResult:
    """The guidance-embedded student (Meng et al. 2023): the distilled student given w as an input, trained so that
    one call at w does what its teacher's guided steps do (one UNet call per step instead of two): the v teacher's
    ``teacher_ratio`` steps, or one step of the two-call student itself (``guidance_teacher="student"``)."""
    teacher, ratio = guidance_teacher_of(config, run_dir)
    return _distill(config, run_dir, budget, "distill-guidance", config.scale.guidance_student,
                    teacher_unet=teacher, teacher_ratio=ratio, student_unet=STUDENT, seed=7, guidance_embed=True,
                    cfg_prob=1.0, guidance_range=config.scale.guidance_range, ori_weight=0.0, feature_weight=0.0)


def distill_half(config: RecipeConfig, run_dir: Path, budget: Budget) -> StageResult:
    """Half the steps again (8 -> 4): the distilled student is the teacher of its own n/2-step copy."""
    return _distill(config, run_dir, budget, "distill-half", config.scale.half, teacher_unet=run_dir / STUDENT,
                    student_unet=STUDENT, seed=8, student_steps=config.scale.student_steps // 2, teacher_ratio=2)
