"""Run v fine-tuning or step distillation through the one loop, then export ``final/`` and ``pipeline/``.

Like the base model's stages (train/stages.py): every run, a chunk included, ends by exporting its last
checkpoint's EMA weights to ``run_dir/final`` (a UNet folder) and a fp16 pipeline to ``run_dir/pipeline`` with the
source pipeline's text encoder and decoder and sampling defaults fitting the model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from snapfusion.decoder.io import load_decoder
from snapfusion.distill.tasks import DistillConfig, DistillTask, ModelSource, VFinetuneConfig, VFinetuneTask
from snapfusion.models.text import load_text_encoder
from snapfusion.models.unet import UNet
from snapfusion.pipeline import Pipeline, PipelineConfig, part_folder
from snapfusion.train.loop import LoopConfig, train
from snapfusion.train.stages import _final_source, _replace_dir


def export_pipeline(source: ModelSource, unet_folder: Path, out: Path, config: PipelineConfig) -> Path:
    """A fp16 pipeline folder: the source's text encoder and decoder around the UNet at ``unet_folder``."""
    pipe = Pipeline(load_text_encoder(part_folder(source.pipeline, "text_encoder")), UNet.load(unet_folder),
                    load_decoder(part_folder(source.pipeline, "vae_decoder")), config)
    return pipe.save(out, dtype=torch.float16)


def _export(loop: LoopConfig, result: dict, source: ModelSource, config: PipelineConfig) -> Path | None:
    src = _final_source(loop, result)
    if src is None:
        return None
    unet = UNet.load(src)
    final = _replace_dir(lambda d: unet.save(d), Path(loop.run_dir) / "final", result["step"])
    export_pipeline(source, final, Path(loop.run_dir) / "pipeline", config)
    return final


def finetune_v(loop: LoopConfig, cfg: VFinetuneConfig, *, resume: bool = False) -> Path | None:
    """Fine-tune the source UNet to v-prediction; export ``final/`` and a pipeline with the source's defaults."""
    result = train(loop, VFinetuneTask(cfg), resume=resume)
    pipe_cfg = dataclasses.replace(cfg.source.pipeline_config(), name="base-v")
    return _export(loop, result, cfg.source, pipe_cfg)


def distill_steps(loop: LoopConfig, cfg: DistillConfig, *, resume: bool = False) -> Path | None:
    """Distill the 2n-step teacher into an n-step student; its pipeline samples n trailing DDIM steps by default."""
    result = train(loop, DistillTask(cfg), resume=resume)
    pipe_cfg = dataclasses.replace(cfg.source.pipeline_config(), name=f"distilled-{cfg.student_steps}",
                                   steps=cfg.student_steps, sampler="ddim", timestep_spacing="trailing")
    return _export(loop, result, cfg.source, pipe_cfg)
