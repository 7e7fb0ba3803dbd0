"""The recipe's decoder (SnapFusion §3.2), layout prior, assembly and evaluation stages, each
``(config, run_dir, budget) -> StageResult``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from snapfusion.compress.core import (Budget, StageResult, device_of, loop_config, prompt_source, resuming, stage_dir,
                                      teacher_dir, teacher_part, training_result)
from snapfusion.compress.settings import RecipeConfig
from snapfusion.compress.unet_stages import TABLE

REDUCED = "reduce-decoder/decoder"
LATENTS = "decoder-latents/latents.safetensors"
DECODER = "distill-decoder/final"
PRIOR = "train-prior/prior"
PIPELINE = "assemble/pipeline"
DATA_SEED = 5  # the prompt stream of the decoder's latents (distill-decoder's default)


def shipped_unet(config: RecipeConfig, run_dir: Path) -> Path:
    """The UNet folder the pipeline is assembled from (``--ship``)."""
    return Path(run_dir) / config.ship / "final"


def shipped_steps(config: RecipeConfig) -> int:
    """The shipped UNet's sampling steps: n, or n/2 for the halved student."""
    n = config.scale.student_steps
    return n // 2 if config.ship == "distill-half" else n


def decoder_of(config: RecipeConfig, run_dir: Path) -> Path:
    """The decoder assembled: ``--decoder`` or the distilled one."""
    return Path(config.decoder) if config.decoder else Path(run_dir) / DECODER


def prior_of(config: RecipeConfig, run_dir: Path) -> Path:
    """The layout prior assembled: ``--prior`` ('teacher': the teacher's prior/), or the trained one."""
    if config.prior == "teacher":
        return teacher_dir(config) / "prior"
    return Path(config.prior) if config.prior else Path(run_dir) / PRIOR


def _latent_source(config: RecipeConfig):
    from snapfusion.decoder.task import LatentSource

    d, c = config.scale.decoder, config.scale.common
    return LatentSource(steps=d.latent_steps, resolution=c.image_size, num_emoji=c.num_emoji, pool=d.latents,
                        prompts=prompt_source(config))


def reduce_decoder(config: RecipeConfig, run_dir: Path, budget: Budget) -> StageResult:
    """SnapFusion §3.2: the teacher decoder with every width halved, channels chosen by L1 norm per norm group."""
    from snapfusion.decoder.evaluate import parameter_count
    from snapfusion.decoder.io import load_decoder, save_decoder
    from snapfusion.decoder.reduce import reduce_decoder as reduce

    teacher = load_decoder(teacher_part(config, "vae_decoder")).float()
    student = reduce(teacher, config.scale.decoder.ratio, method="l1")
    save_decoder(run_dir / REDUCED, student)
    return StageResult("done", {"decoder": str(run_dir / REDUCED)}, {
        "parameters": parameter_count(student), "teacher_parameters": parameter_count(teacher),
        "widths": list(student.config.decoder_widths), "norm_groups": student.config.norm_groups})


def decoder_latents(config: RecipeConfig, run_dir: Path, budget: Budget) -> StageResult:
    """The teacher's own latents (DPM-Solver++, guidance ~ U[1, 10.5]) that the decoder distills on, made once."""
    from snapfusion.decoder.task import write_latent_cache
    from snapfusion.loading import resolve_model

    pipe = resolve_model(str(teacher_dir(config)), device=device_of(config)).eval()
    out = run_dir / LATENTS
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        n = write_latent_cache(pipe, _latent_source(config), DATA_SEED, out, teacher=str(teacher_dir(config)),
                               batch_size=config.scale.decoder.latent_batch)
    return StageResult("done", {"latents": str(out)}, {"latents": n})


def distill_decoder(config: RecipeConfig, run_dir: Path, budget: Budget) -> StageResult:
    """SnapFusion §3.2: the halved decoder trained to the teacher decoder's images of the teacher's latents (MSE)."""
    from snapfusion.decoder.task import DecoderDistillConfig, DecoderDistillTask, StudentSpec, export_final
    from snapfusion.train.loop import train

    s, folder = config.scale.decoder.train, stage_dir(run_dir, "distill-decoder")
    cfg = DecoderDistillConfig(teacher=str(teacher_dir(config)),
                               student=StudentSpec(ratio=config.scale.decoder.ratio, start=str(run_dir / REDUCED)),
                               latents=_latent_source(config), seed=DATA_SEED, latent_cache=str(run_dir / LATENTS))
    loop = dataclasses.replace(loop_config(config, folder, s, budget, seed=6), mixed_precision="no")
    train(loop, DecoderDistillTask(cfg), resume=resuming(folder))
    export_final(folder)
    return training_result(folder, s, {"decoder": str(run_dir / DECODER)})


def train_prior(config: RecipeConfig, run_dir: Path, budget: Budget) -> StageResult:
    """The terminal layout prior on the teacher's text states and latent space (the student shares both)."""
    from snapfusion.loading import resolve_model
    from snapfusion.models.autoencoder import Encoder, load_autoencoder
    from snapfusion.prior import PriorData, PriorTrainConfig, fit_pipeline_prior

    p, device = config.scale.prior, device_of(config)
    pipe = resolve_model(str(teacher_dir(config)), device=device).eval()
    encoder_dir = teacher_part(config, "vae_encoder")
    encoder = load_autoencoder(encoder_dir, Encoder, device=device).eval()
    data = PriorData(scenes=p.scenes, encode_size=p.encode_size, calibrate=p.calibrate,
                     num_emoji=config.scale.common.num_emoji, data_folder=config.data_folder)
    train = PriorTrainConfig(steps=p.steps, batch_size=p.batch, lr=p.lr, eval_every=p.eval_every)
    report = fit_pipeline_prior(pipe, encoder, run_dir / PRIOR, stage_dir(run_dir, "train-prior") / "cache", data,
                                train, source=str(encoder_dir.resolve()), model=str(teacher_dir(config)))
    return StageResult("done", {"prior": str(run_dir / PRIOR)}, {
        k: report[k] for k in ("held_out_r2", "held_out_mse", "unselected_r2", "kept_step")})


def assemble(config: RecipeConfig, run_dir: Path, budget: Budget) -> StageResult:
    """The SnapFusion pipeline: the teacher's text tower, the distilled UNet (8 trailing DDIM steps), the distilled
    decoder, the layout prior, and the teacher's VAE encoder (the student's latent space is the teacher's)."""
    from snapfusion.decoder.evaluate import parameter_count
    from snapfusion.decoder.io import load_decoder
    from snapfusion.evolve.latency import load_table, predict_ms
    from snapfusion.models.autoencoder import Encoder, load_autoencoder
    from snapfusion.models.text import load_text_encoder
    from snapfusion.models.unet import UNet
    from snapfusion.pipeline import Pipeline
    from snapfusion.prior import LayoutPrior

    teacher = Pipeline.load(teacher_dir(config))
    pipe_cfg = dataclasses.replace(teacher.config, name="snapfusion", steps=shipped_steps(config), sampler="ddim",
                                   timestep_spacing="trailing")
    unet = UNet.load(shipped_unet(config, run_dir))
    pipe = Pipeline(load_text_encoder(teacher_part(config, "text_encoder")), unet,
                    load_decoder(decoder_of(config, run_dir)), pipe_cfg,
                    encoder=load_autoencoder(teacher_part(config, "vae_encoder"), Encoder),
                    prior=LayoutPrior.load(prior_of(config, run_dir)))
    out = pipe.save(run_dir / PIPELINE, dtype=torch.float16)
    table = load_table(run_dir / TABLE)
    ms, teacher_ms = predict_ms(unet.config, table)[0], predict_ms(teacher.unet.config, table)[0]
    return StageResult("done", {"pipeline": str(out)}, {
        "unet_parameters": parameter_count(unet), "teacher_unet_parameters": parameter_count(teacher.unet),
        "decoder_parameters": parameter_count(pipe.decoder),
        "teacher_decoder_parameters": parameter_count(teacher.decoder),
        "unet_ms": ms, "teacher_unet_ms": teacher_ms, "unet_latency_fraction": ms / teacher_ms,
        "steps": pipe_cfg.steps, "megabytes": sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file()) / 1e6})


def _scores(report: dict) -> dict:
    row = report["results"][0]
    return {"clip_score": row["clip_score"], "domain_fid": row["domain_fid"],
            "fid_vs_renders": row.get("fid_vs_renders"), "attribute_accuracy": row["attributes"].get("all"),
            "images": report["num_images"],
            "steps": report["steps"], "guidance": row["guidance"]}


OWN_DATA = ("own data: the scene metrics (domain CLIP score, domain FID, attribute accuracy) are skipped, as the "
            "shipped evaluators know only the built-in scenes; reported instead: image statistics of the student and "
            "its agreement with the teacher (PSNR, mean absolute difference) on the same prompts (--prompts, else the "
            "data's own captions) and seeds")


def _stats(images: torch.Tensor) -> dict:
    """Domain-free statistics of images in [0, 1] (B, 3, H, W): all finite, mean and spread of the pixels."""
    return {"images": len(images), "finite": bool(torch.isfinite(images).all()), "pixel_mean": images.mean().item(),
            "pixel_std": images.std().item(), "per_image_std_min": images.flatten(1).std(1).min().item()}


def evaluate_own_data(config: RecipeConfig, run_dir: Path, budget: Budget) -> StageResult:
    """With your own data: the student's and the teacher's images of the first ``prompts`` captions (or --prompts)
    x ``seeds_per_prompt`` seeds, saved as PNGs; image statistics and the student's agreement with the teacher."""
    import time

    from snapfusion.data.folder import read_prompts
    from snapfusion.decoder.evaluate import psnr
    from snapfusion.pipeline import Pipeline, to_pil

    e, device, folder = config.scale.evaluation, device_of(config), stage_dir(run_dir, "eval")
    captions = read_prompts(prompt_source(config))[: e.prompts]
    prompts = [p for p in captions for _ in range(e.seeds_per_prompt)]
    seeds = [s for _ in captions for s in range(e.seeds_per_prompt)]
    runs = {"student": (run_dir / PIPELINE, shipped_steps(config))}
    if e.teacher_steps:
        runs["teacher"] = (teacher_dir(config), e.teacher_steps)
    images, metrics, outputs = {}, {"evaluation": OWN_DATA}, {}
    for name, (path, steps) in runs.items():
        pipe = Pipeline.load(path, device=device)
        if device.startswith("cuda"):
            pipe.to(device, torch.bfloat16)
        t0, out = time.time(), []
        with torch.no_grad():
            for i in range(0, len(prompts), e.batch):
                out.append(pipe.generate(prompts[i:i + e.batch], seeds[i:i + e.batch], steps=steps,
                                         guidance=e.guidance, sampler="ddim").float().cpu())
        images[name] = torch.cat(out)
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(to_pil(images[name])):
            im.save(folder / name / f"{i // e.seeds_per_prompt:04d}_{seeds[i]}.png")
        metrics[name] = {**_stats(images[name]), "steps": steps, "guidance": e.guidance,
                         "seconds_per_image": (time.time() - t0) / len(prompts)}
        outputs[name] = str(folder / name)
    if "teacher" in images:
        p = psnr(images["student"], images["teacher"])
        metrics["student_vs_teacher"] = {"psnr_db": p.mean().item(), "psnr_db_min": p.min().item(),
                                         "mean_abs_diff": (images["student"] - images["teacher"]).abs().mean().item()}
    (folder / "own_data.json").write_text(json.dumps({"prompts": captions, "seeds": e.seeds_per_prompt, **metrics},
                                                     indent=1) + "\n")
    outputs["report"] = str(folder / "own_data.json")
    return StageResult("done", outputs, metrics, "own data: scene metrics skipped (docs/recipe.md)")


def evaluate(config: RecipeConfig, run_dir: Path, budget: Budget) -> StageResult:
    """CLIP score, domain FID and attribute accuracy of the assembled pipeline at its steps and of the teacher at
    ``teacher_steps``, on the same held-out test prompts and seeds (with your own data: ``evaluate_own_data``)."""
    if config.data_folder:
        return evaluate_own_data(config, run_dir, budget)
    from snapfusion.eval.runner import run_eval_command
    from snapfusion.pipeline import Pipeline, to_pil

    e, device, folder = config.scale.evaluation, device_of(config), stage_dir(run_dir, "eval")
    runs = {"student": (run_dir / PIPELINE, shipped_steps(config))}
    if e.teacher_steps:
        runs["teacher"] = (teacher_dir(config), e.teacher_steps)
    metrics, outputs = {}, {}
    for name, (path, steps) in runs.items():
        pipe = Pipeline.load(path, device=device)
        if device.startswith("cuda"):
            pipe.to(device, torch.bfloat16)

        def generate(prompts, seeds, guidance, pipe=pipe, steps=steps):
            return to_pil(pipe.generate(prompts, seeds, steps=steps, guidance=guidance, sampler="ddim"))

        with torch.no_grad():
            report = run_eval_command(generate, prompts="test", steps=steps, sampler="ddim", guidance=e.guidance,
                                      num_images=e.prompts, batch_size=e.batch, out_dir=folder / name, device=device,
                                      model=f"{name} ({path})", num_emoji=config.scale.common.num_emoji,
                                      seeds_per_prompt=e.seeds_per_prompt)
        metrics[name] = _scores(report)
        outputs[name] = str(folder / name / "eval.json")
    return StageResult("done", outputs, metrics)
