"""Decoder distillation on synthetic latents (SnapFusion §3.2) as a ``Task`` for the one training loop.

Per step: scene prompts -> the teacher pipeline's text encoder + UNet (sampler, steps and a per-sample guidance
scale drawn from a range) -> latents -> teacher decoder image (target) and student decoder image; loss = pixel
MSE. Only the student trains. Every latent is a pure function of its sample index (prompt, seed, guidance), so
the stream is reproducible and resumes exactly. Optional cache (``LatentSource.pool`` > 0): sample n uses latent
n mod pool, generated the first time it is needed and kept in memory, so after one pass the teacher's UNet no
longer runs (each latent is then seen once per ``pool`` samples). ``write_latent_cache`` stores such a pool in
one safetensors file (with the settings that made it), so several runs share one pass of the teacher UNet.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from snapfusion.config import to_dict
from snapfusion.errors import ConfigError, SnapFusionError
from snapfusion.data import SceneConfig, caption, sample_scene
from snapfusion.data.folder import read_prompts
from snapfusion.decoder.io import load_decoder, save_decoder
from snapfusion.decoder.reduce import InitMethod, reduce_decoder, reduced_config
from snapfusion.decoder.tiny import TinyDecoder, TinyDecoderConfig
from snapfusion.pipeline import Pipeline
from snapfusion.sampling import initial_noise, sample_ddim, sample_dpmpp_2m
from snapfusion.train.data import STREAM_LENGTH
from snapfusion.weights import load_into, load_safetensors, resolve_weights, save_safetensors, WEIGHTS_STEM


@dataclass(frozen=True)
class LatentSource:
    """How the teacher makes training latents."""

    sampler: Literal["ddim", "dpmpp_2m"] = "dpmpp_2m"  # 2nd order: near-converged latents in few steps
    steps: int = 12
    guidance_min: float = 1.0  # guidance drawn per sample from U[min, max]: the project's eval sweep range
    guidance_max: float = 10.5
    resolution: int | None = None  # image side; None: the teacher pipeline's default (512 for the base model)
    prompt_split: Literal["train", "test"] = "train"
    num_emoji: int | None = None  # prompts use the first N atlas emoji (as the teacher was trained); None: all
    pool: int = 0  # > 0: cycle over this many cached latents (per process); 0: every latent fresh
    prompts: str | None = None  # your own prompts: a prompt file or an image folder's captions (data/folder.py's
                                # read_prompts), prompt n mod N for sample n; None: scene captions


@dataclass(frozen=True)
class StudentSpec:
    """The student: the teacher decoder at ``ratio`` of its widths, or a TAESD-style tiny decoder."""

    kind: Literal["reduced", "tiny"] = "reduced"
    ratio: float = 0.5  # SnapFusion §3.2: every decoder width halved
    init: InitMethod = "l1"  # reduced only: teacher channels by L1 norm, the first ones, or random init
    norm_groups: int | None = None  # reduced only; None: reduce.reduced_config's rule (>= 2 channels per group)
    tiny: TinyDecoderConfig = field(default_factory=TinyDecoderConfig)  # tiny only (scaling factor: teacher's)
    start: str | None = None  # a decoder folder of exactly the architecture above: continue from its weights


@dataclass(frozen=True)
class DecoderDistillConfig:
    teacher: str = "base"  # 'base', a pipeline folder, an SD-v1.5 diffusers folder or .safetensors
    student: StudentSpec = field(default_factory=StudentSpec)
    latents: LatentSource = field(default_factory=LatentSource)
    seed: int = 5
    latent_cache: str | None = None  # a write_latent_cache file of exactly (latents, seed); needs latents.pool


def build_student(spec: StudentSpec, teacher: nn.Module) -> nn.Module:
    """The student decoder for ``spec``, initialised from ``teacher`` where the spec says so, or the ``spec.start``
    decoder, which must have exactly the architecture the spec describes."""
    tiny = dataclasses.replace(spec.tiny, scaling_factor=teacher.config.scaling_factor,
                               latent_channels=teacher.config.latent_channels)
    if spec.start:
        start = load_decoder(spec.start)
        want = tiny if spec.kind == "tiny" else reduced_config(teacher.config, spec.ratio, norm_groups=spec.norm_groups)
        if start.config != want:
            raise ConfigError(f"--start-from {spec.start}: its decoder config differs from the student the options "
                              f"describe ({want})")
        return start
    if spec.kind == "tiny":
        return TinyDecoder(tiny)
    return reduce_decoder(teacher, spec.ratio, method=spec.init, norm_groups=spec.norm_groups)


class PromptStream(Dataset):
    """Sample n -> {prompt, seed, guidance}, a pure function of (seed, n)."""

    def __init__(self, src: LatentSource, seed: int, length: int = STREAM_LENGTH):
        self.src, self.seed, self.length = src, seed, length
        self.scene_cfg = SceneConfig(num_emoji=src.num_emoji)
        self.prompts = read_prompts(src.prompts) if src.prompts else None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, n: int) -> dict:
        n = n % self.src.pool if self.src.pool else n
        rng = np.random.default_rng([self.seed, n])
        if self.prompts is not None:
            prompt = self.prompts[n % len(self.prompts)]
        else:
            scene = sample_scene(rng, self.src.prompt_split, self.scene_cfg)
            prompt = caption(scene, rng, p_omit=self.scene_cfg.caption_p_omit)
        guidance = float(rng.uniform(self.src.guidance_min, self.src.guidance_max))
        return {"index": n, "prompt": prompt, "seed": int(rng.integers(2**31)), "guidance": guidance}


def collate_prompts(items: list[dict]) -> dict:
    return {"index": [it["index"] for it in items], "prompt": [it["prompt"] for it in items],
            "seed": [it["seed"] for it in items], "guidance": torch.tensor([it["guidance"] for it in items])}


@torch.no_grad()
def teacher_latents(pipe: Pipeline, prompts: list[str], seeds: list[int], guidance: torch.Tensor,
                    src: LatentSource) -> torch.Tensor:
    """Diffusion latents (B, 4, h, w) from the teacher's UNet with per-sample guidance (B,)."""
    size = src.resolution or pipe.config.resolution
    down = pipe.decoder.config.downscale
    cond = pipe.encode_text(prompts)  # (B, 77, D)
    uncond = pipe.encode_text([""])  # (1, 77, D)
    z = initial_noise((pipe.unet.config.in_channels, size // down, size // down), seeds, pipe.device)
    # CFG (limited to the teacher's stored guidance interval, as its generate() applies it), or w as the UNet's input
    model_fns = pipe.step_fns(cond, uncond, guidance.to(pipe.device, torch.float32), src.steps)
    run = sample_ddim if src.sampler == "ddim" else sample_dpmpp_2m
    return run(model_fns, z, pipe.timesteps(src.steps, src.sampler), pipe.schedule)


def load_teacher(name: str) -> Pipeline:
    from snapfusion.loading import resolve_model

    return resolve_model(name).eval()


class DecoderDistillTask:
    name = "decoder"

    def __init__(self, cfg: DecoderDistillConfig, teacher: Pipeline | None = None):
        self.cfg = cfg
        self.pipe = teacher if teacher is not None else load_teacher(cfg.teacher)
        self.pipe.eval()
        self.cache: dict[int, torch.Tensor] = {}  # sample index -> latent (4, h, w), when latents.pool > 0
        if cfg.latent_cache:
            self.cache = read_latent_cache(cfg.latent_cache, cfg.latents, cfg.seed, cfg.teacher)

    def describe(self) -> dict:
        return to_dict(self.cfg)

    def build(self) -> nn.Module:
        return build_student(self.cfg.student, self.pipe.decoder.float())

    def dataset(self) -> Dataset:
        return PromptStream(self.cfg.latents, self.cfg.seed)

    def collate(self, items):
        return collate_prompts(items)

    def _teacher_on(self, device: torch.device) -> Pipeline:
        if self.pipe.device != device:
            self.pipe.to(device)
        return self.pipe

    def latents(self, pipe: Pipeline, batch: dict) -> torch.Tensor:
        """The batch's latents (B, 4, h, w): from the cache, generating (and caching) the missing ones."""
        missing = [i for i, n in enumerate(batch["index"]) if n not in self.cache]
        if missing:
            fresh = teacher_latents(pipe, [batch["prompt"][i] for i in missing], [batch["seed"][i] for i in missing],
                                    batch["guidance"][missing], self.cfg.latents)
            if not self.cfg.latents.pool:
                return fresh
            self.cache.update({batch["index"][i]: z for i, z in zip(missing, fresh.float())})
        return torch.stack([self.cache[n] for n in batch["index"]]).to(pipe.device)

    def loss(self, model, batch, generator):
        pipe = self._teacher_on(generator.device)
        # the frozen teacher runs in its own precision, not the loop's autocast: latents and targets stay a pure
        # function of the sample index (the same as decoder-latents' cache and eval-decoder's)
        with torch.no_grad(), torch.autocast(generator.device.type, enabled=False):
            latents = self.latents(pipe, batch)
            raw = latents / pipe.decoder.config.scaling_factor  # (B, 4, h, w) raw VAE latents
            target = pipe.decoder(raw).float()  # (B, 3, H, W), teacher image in [-1, 1]
        pred = model(raw).float()  # the (possibly DDP-wrapped) student's forward
        mse = (pred - target).pow(2).flatten(1).mean(1)  # SnapFusion §3.2: pixel MSE
        with torch.no_grad():
            clipped = (pred.clamp(-1, 1) - target.clamp(-1, 1)).pow(2).flatten(1).mean(1)
            logs = {"psnr": float((10 * torch.log10(4.0 / clipped.clamp(min=1e-10))).mean())}  # peak-to-peak 2
        if generator.device.type == "cuda":
            logs["max_mem_gib"] = torch.cuda.max_memory_allocated(generator.device) / 2**30
        return mse, logs

    def save(self, model, folder: Path) -> None:
        save_decoder(folder, model)

    def load(self, model, folder: Path) -> None:
        model = getattr(model, "module", model)
        load_into(model, load_safetensors(resolve_weights(folder, WEIGHTS_STEM)), source=str(folder))

    @torch.no_grad()
    def sample_grid(self, model, path: Path) -> None:
        from snapfusion.pipeline import image_grid, to_pil

        model = getattr(model, "module", model)
        pipe = self._teacher_on(next(model.parameters()).device)
        stream = PromptStream(dataclasses.replace(self.cfg.latents, prompt_split="test"), self.cfg.seed + 1)
        batch = collate_prompts([stream[i] for i in range(4)])
        raw = teacher_latents(pipe, batch["prompt"], batch["seed"], batch["guidance"], self.cfg.latents)
        raw = raw / pipe.decoder.config.scaling_factor
        images = torch.cat([pipe.decoder(raw), model(raw)]).float().add(1).div(2)  # teacher row, student row
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(to_pil(images), cols=4).save(path)


def _cache_metadata(src: LatentSource, seed: int, teacher: str) -> dict[str, str]:
    return {"latent_source": json.dumps(to_dict(src), sort_keys=True), "seed": str(seed), "teacher": teacher}


@torch.no_grad()
def write_latent_cache(pipe: Pipeline, src: LatentSource, seed: int, path: str | os.PathLike, *, teacher: str,
                       batch_size: int = 32) -> int:
    """Generate the ``src.pool`` latents of the stream (seed) once and save them with the settings; returns N."""
    if src.pool < 1:
        raise SnapFusionError("a latent cache needs a pool size >= 1 (--latent-pool)")
    stream = PromptStream(src, seed)
    parts = []
    for start in range(0, src.pool, batch_size):
        batch = collate_prompts([stream[n] for n in range(start, min(start + batch_size, src.pool))])
        parts.append(teacher_latents(pipe, batch["prompt"], batch["seed"], batch["guidance"], src).float().cpu())
    save_safetensors({"latents": torch.cat(parts)}, path, max_shard_bytes=None,
                     metadata=_cache_metadata(src, seed, teacher))
    return src.pool


def read_latent_cache(path: str | os.PathLike, src: LatentSource, seed: int, teacher: str) -> dict[int, torch.Tensor]:
    """Latents by sample index from a ``write_latent_cache`` file, after checking it was made the same way."""
    from safetensors import safe_open

    latents = load_safetensors(path)["latents"]  # (N, 4, h, w); a missing/corrupt file raises WeightsError
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    expected = _cache_metadata(src, seed, teacher)
    for key, value in expected.items():
        if meta.get(key) != value:
            raise SnapFusionError(f"latent cache {path}: made with {key}={meta.get(key)}, this run needs {value}")
    return dict(enumerate(latents))


def export_final(run_dir: str | Path) -> Path | None:
    """Copy the run's last checkpoint (EMA weights if kept) to ``run_dir/final`` as a decoder folder."""
    from snapfusion.train import state as ckpt_io
    from snapfusion.train.stages import _replace_dir

    from snapfusion.train.loop import is_main_process

    ckpt = ckpt_io.latest_checkpoint(Path(run_dir))
    if ckpt is None or not is_main_process():
        return None
    src = ckpt / "ema" if (ckpt / "ema").is_dir() else ckpt / "model"
    decoder = load_decoder(src)
    step = int(ckpt.name.split("_")[-1])
    return _replace_dir(lambda d: save_decoder(d, decoder), Path(run_dir) / "final", step)
