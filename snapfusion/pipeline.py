"""Prompt -> pixels: tokenizer -> text encoder (cond + uncond) -> sampler over the UNet -> VAE decoder -> PNG.

A pipeline folder holds ``model_index.json`` (kind "pipeline": sampling defaults) and one sub-folder per
network (``text_encoder/``, ``unet/``, ``vae_decoder/``, optionally ``vae_encoder/`` and ``prior/``, the terminal
layout prior of ``snapfusion.prior``), each in our
``save_pretrained`` layout. A part may instead live in a sibling folder that ``model_index.json`` names under
``"parts"`` (e.g. ``{"text_encoder": "../base/text_encoder"}``): shipped pipelines share parts that way, so that the
repository holds each network once. The tokenizer is CLIP's, shipped in ``snapfusion/assets/tokenizer``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from PIL import Image

from snapfusion.config import from_dict, load_json, save_json, to_dict
from snapfusion import fileio, validation
from snapfusion.errors import ConfigError, SnapFusionError, WeightsError
from snapfusion.folders import INDEX, part_folder  # noqa: F401  (re-exported)
from snapfusion.models.autoencoder import Decoder, Encoder, load_autoencoder, save_autoencoder
from snapfusion.models.text import TextEncoder, Tokenizer, load_text_encoder, save_text_encoder
from snapfusion.models.unet import UNet
from snapfusion.prior import LayoutPrior, start_shift
from snapfusion.sampling import (Denoiser, ModelFn, Scale, StepFns, guidance_steps, guided, initial_noise,
                                 sample_ddim, sample_dpmpp_2m, with_guidance_interval)
from snapfusion.schedule import NoiseSchedule, ScheduleConfig, ddim_timesteps, dpm_timesteps
from snapfusion.validation import MAX_PROMPT_CHARS  # noqa: F401  (re-exported)

Sampler = Literal["ddim", "dpmpp_2m"]
Spacing = Literal["leading", "trailing", "linspace"]
PARTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder", "prior")


@dataclass(frozen=True)
class PipelineConfig:
    """Sampling defaults stored with a pipeline (overridable per call)."""

    name: str = "model"
    resolution: int = 512             # default image side in pixels
    steps: int = 50
    guidance: float = 7.5             # classifier-free guidance scale; 1.0 = no uncond pass
    guidance_rescale: float = 0.0     # phi of sampling.rescale_guidance in [0, 1]; 0 = plain guidance
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # fractions of the steps that mix guidance
    #                                   (sampling.guidance_steps); (0, 1) = every step
    sampler: Sampler = "ddim"
    timestep_spacing: Spacing = "leading"   # SD-v1.5's DDIM config; step-distilled students use "trailing"
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    steps_offset: int | None = None   # added to "leading" timesteps; None: 1 for leading (SD-v1.5), else 0
    set_alpha_to_one: bool = False    # DDIM's last step ends at alphabar = 1 instead of alphabar_0 (diffusers' option)


@dataclass
class Timings:
    """Seconds spent per component during one ``generate`` call (device-synchronised)."""

    text_encoder: float = 0.0
    unet_total: float = 0.0
    unet_steps: int = 0
    decoder: float = 0.0
    total: float = 0.0

    def as_dict(self) -> dict[str, float]:
        per_step = self.unet_total / self.unet_steps if self.unet_steps else 0.0
        return {**dataclasses.asdict(self), "unet_per_step": per_step}


@dataclass
class GenerationResult:
    """What ``Pipeline.__call__`` returns: one PIL image per prompt x num_images, in order, with its seed."""

    images: list[Image.Image]
    prompts: list[str]                # the prompt of each image
    seeds: list[int]                  # the seed of each image: the same seed gives the same image in any batch
    settings: dict                    # steps, guidance, guidance_rescale, guidance_interval, sampler, height,
    #                                   width, negative_prompt, model, prior
    timings: Timings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """Validate user prompts: strings, not too long; empty is allowed (unconditional)."""
    return validation.check_prompts(list(prompts) if not isinstance(prompts, str) else prompts)


def check_size(height: int, width: int, factor: int) -> None:
    """Image sizes must be positive multiples of the latent grid (8 px per latent for KL-f8 times UNet downsampling)."""
    validation.check_side(height, name="height", multiple=factor)
    validation.check_side(width, name="width", multiple=factor)


class Pipeline:
    """A text-to-image latent diffusion model: text encoder, UNet, VAE decoder, schedule and sampling defaults."""

    def __init__(self, text_encoder: TextEncoder, unet: UNet, decoder: Decoder, config: PipelineConfig, *,
                 tokenizer: Tokenizer | None = None, encoder: Encoder | None = None, prior: LayoutPrior | None = None):
        if unet.config.context_dim != text_encoder.config.hidden_size:
            raise ConfigError(f"UNet context_dim {unet.config.context_dim} != text encoder width "
                              f"{text_encoder.config.hidden_size}")
        if prior is not None and prior.config.context_dim != text_encoder.config.hidden_size:
            raise ConfigError(f"layout prior context_dim {prior.config.context_dim} != text encoder width "
                              f"{text_encoder.config.hidden_size}")
        self.text_encoder, self.unet, self.decoder, self.encoder = text_encoder, unet, decoder, encoder
        self.prior = prior  # fp32 whatever the pipeline's dtype; None: sampling starts from N(0, I)
        self.tokenizer = tokenizer or Tokenizer()
        if getattr(unet.config, "guidance_embed", False):
            # one call per step, no conditional output to rescale to or fall back to: defaults copied from a
            # two-call teacher's config do not apply (a call that asks for a rescale or an interval is still refused)
            config = dataclasses.replace(config, guidance_rescale=0.0, guidance_interval=(0.0, 1.0))
        self.config = config
        self.schedule = NoiseSchedule(config.schedule)
        self.fast = None  # snapfusion.fast.accelerate: DDIM generation through CUDA graphs over static buffers

    # ---- loading and saving -------------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             with_encoder: bool = False) -> "Pipeline":
        """Load a pipeline folder written by ``save``."""
        folder = Path(folder)
        if not folder.is_dir():
            raise WeightsError(f"model folder not found: {folder}")
        data = load_json(folder / INDEX)
        if data.get("kind") != "pipeline":
            raise WeightsError(f"{folder / INDEX}: expected kind 'pipeline', found {data.get('kind')!r}")
        config = from_dict(PipelineConfig, data["config"], where=str(folder / INDEX))
        text = load_text_encoder(part_folder(folder, "text_encoder"), device=device).to(dtype)
        unet = UNet.load(part_folder(folder, "unet"), device=device, dtype=dtype)
        from snapfusion.decoder.io import load_decoder  # any decoder kind: SD layout, channel-reduced, tiny

        decoder = load_decoder(part_folder(folder, "vae_decoder"), device=device, dtype=dtype)
        encoder = None
        if with_encoder:
            encoder = load_autoencoder(part_folder(folder, "vae_encoder"), Encoder, device=device, dtype=dtype)
        prior_dir = part_folder(folder, "prior")
        prior = LayoutPrior.load(prior_dir, device=device) if prior_dir.is_dir() else None
        return cls(text, unet, decoder, config, encoder=encoder, prior=prior).eval()

    def save(self, folder: str | Path, *, dtype: torch.dtype | None = torch.float16,
             shared: dict[str, str] | None = None, unet_int8: bool = False) -> Path:
        """Write the pipeline folder (fp16 weights by default, each file under 16 MiB).

        ``shared``: parts not written here but referenced, e.g. ``{"text_encoder": "../base/text_encoder"}`` (the
        caller vouches that those folders hold this pipeline's networks). ``unet_int8``: weight-only int8 UNet."""
        from snapfusion.decoder.io import save_decoder

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        shared = dict(shared or {})
        unknown = sorted(set(shared) - set(PARTS))
        if unknown:
            raise ConfigError(f"shared parts must be among {PARTS}, got {unknown}")
        if unet_int8 and "unet" in shared:
            raise ConfigError("unet_int8 with a shared unet: the UNet is not written here")
        writers = {"text_encoder": lambda d: save_text_encoder(d, self.text_encoder, dtype=dtype),
                   "unet": lambda d: self.unet.save(d, dtype=dtype, int8=unet_int8),
                   "vae_decoder": lambda d: save_decoder(d, self.decoder, dtype=dtype)}
        if self.encoder is not None:
            writers["vae_encoder"] = lambda d: save_autoencoder(d, self.encoder, dtype=dtype)
        if self.prior is not None:
            writers["prior"] = lambda d: self.prior.save(d, dtype=dtype)
        for name, write in writers.items():
            if name not in shared:  # written beside, fsync'd and renamed into place: a kill leaves old or new
                fileio.recover_dir(folder / name)
                fileio.write_dir(folder / name, write)
        for name in shared:  # a copy left from an earlier save would be ignored on load but still take space
            fileio.trash(folder / name)
        index = {"kind": "pipeline", "config": to_dict(self.config)}
        if shared:
            index["parts"] = shared
        save_json(index, folder / INDEX)
        for name in shared:  # refuse now, not at load time, a path that escapes or names no model
            if not (part_folder(folder, name) / "config.json").is_file():
                raise WeightsError(f"{folder / INDEX}: shared part {name!r} -> {shared[name]} holds no model")
        return folder

    def eval(self) -> "Pipeline":
        for m in (self.text_encoder, self.unet, self.decoder, self.encoder):
            if m is not None:
                m.eval().requires_grad_(False)
        return self

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "Pipeline":
        for m in (self.text_encoder, self.unet, self.decoder, self.encoder):
            if m is not None:
                m.to(device=device, dtype=dtype)
        if self.prior is not None:
            self.prior.to(device=device)  # stays fp32
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_factor(self) -> int:
        """Pixels per latent pixel times the UNet's total downsampling: sizes must be multiples of this."""
        n_down = sum(1 for s in self.unet.config.down if s.resample)
        return self.decoder.config.downscale * 2 ** n_down

    # ---- the three stages ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> context (B, 77, D) in the pipeline's dtype."""
        ids = self.tokenizer(list(prompts)).to(self.device)
        return self.text_encoder(ids).to(self.dtype)

    @property
    def embeds_guidance(self) -> bool:
        """Whether the UNet takes the guidance scale as an input (one call per step, no unconditional pass)."""
        return bool(getattr(self.unet.config, "guidance_embed", False))

    def denoiser(self, skip=None, *, guidance: Scale = None) -> Denoiser:
        """The schedule wrapper around the UNet (optionally with blocks skipped by name). ``guidance`` (a scalar or
        (B,)): the scale a guidance-embedded UNet takes as its input; required there, refused elsewhere."""
        if self.embeds_guidance != (guidance is not None):
            raise ConfigError(f"{self.config.name}: " + ("its UNet embeds the guidance scale: pass guidance= (one "
                              "call per step, no cond/uncond mix)" if self.embeds_guidance else
                              "guidance= is for guidance-embedded UNets; mix cond and uncond with sampling.guided"))
        if guidance is None:
            network = (lambda z, t, c: self.unet(z, t, c, skip=skip)) if skip else self.unet
        else:
            w = torch.as_tensor(guidance, dtype=torch.float32, device=self.device)  # () or (B,), fp32 as fast.py's

            def network(z, t, c):
                return self.unet(z, t, c, skip=skip, guidance=w.expand(z.shape[0]) if w.ndim == 0 else w)
        return Denoiser(network, self.schedule, self.unet.config.prediction_type, input_dtype=self.dtype)

    def resolve_guidance_rescale(self, phi: float | None) -> float:
        """The guidance rescale a call samples with: ``phi``, or the model's default when None, checked to be in
        [0, 1] and refused (``InputError``) above 0 for a guidance-embedded UNet."""
        phi = validation.resolve_guidance_rescale(phi, self.config.guidance_rescale)
        return validation.check_rescale_fits(phi, embeds_guidance=self.embeds_guidance, model=self.config.name)

    def resolve_guidance_interval(self, interval, *, steps: int, guidance: float) -> tuple[float, float]:
        """The guidance interval a call samples with: ``interval``, or the model's default when None, checked
        (``InputError``): 0 <= start < end <= 1, at least one of the ``steps`` steps guided at a ``guidance`` other
        than 1, and the whole range for a guidance-embedded UNet."""
        default = interval is None
        interval = validation.resolve_guidance_interval(interval, self.config.guidance_interval)
        return validation.check_interval_fits(interval, guided=guidance_steps(steps, interval), guidance=guidance,
                                              embeds_guidance=self.embeds_guidance, model=self.config.name,
                                              default=default)

    def model_fn(self, cond: torch.Tensor, uncond: torch.Tensor | None, guidance: Scale, skip=None,
                 rescale: float | None = None) -> ModelFn:
        """The sampler's model function at guidance ``guidance`` (a scalar or (B,)): classifier-free guidance over
        cond and uncond (``sampling.guided``), or, for a guidance-embedded UNet, one call on cond with w as its input
        (``uncond`` unused; w = 1 is an input too). ``rescale``: the guidance rescale phi (two-call models only;
        None: the model's default)."""
        rescale = self.resolve_guidance_rescale(rescale)
        if self.embeds_guidance:
            denoiser = self.denoiser(skip, guidance=1.0 if guidance is None else guidance)
            return lambda z, t: denoiser(z, t, cond)
        return guided(self.denoiser(skip), cond, uncond, guidance, rescale)

    def step_fns(self, cond: torch.Tensor, uncond: torch.Tensor | None, guidance: Scale, steps: int, skip=None,
                 rescale: float | None = None, interval: tuple[float, float] | None = None) -> StepFns:
        """The samplers' model functions for ``steps`` steps: ``model_fn``'s, and, for a two-call model with an
        ``uncond``, the conditional pass alone at the steps outside the guidance interval (``interval``, already
        resolved; None: the model's stored one)."""
        model_fn = self.model_fn(cond, uncond, guidance, skip, rescale)
        if self.embeds_guidance or uncond is None:
            return model_fn
        interval = self.config.guidance_interval if interval is None else interval
        return with_guidance_interval(model_fn, self.model_fn(cond, None, 1.0, skip), steps, interval)

    def timesteps(self, steps: int, sampler: Sampler) -> torch.Tensor:
        T = self.schedule.num_train_timesteps
        spacing, offset = self.config.timestep_spacing, self.config.steps_offset
        offset = (1 if spacing == "leading" else 0) if offset is None else offset
        if sampler == "ddim":
            return ddim_timesteps(steps, spacing, steps_offset=offset, num_train_timesteps=T,
                                  set_alpha_to_one=self.config.set_alpha_to_one)
        if sampler == "dpmpp_2m":
            return dpm_timesteps(steps, spacing, steps_offset=offset, num_train_timesteps=T)
        raise ConfigError(f"sampler {sampler!r} is not one of ['ddim', 'dpmpp_2m']")

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents -> images in [0, 1], (B, 3, H, W) fp32."""
        latents = latents.to(self.dtype)
        if latents.device.type == "cpu":
            # oneDNN's convolutions run faster on channels-last input (the layout propagates through the decoder):
            # about 1.3x for the halved and the full decoder on the 2-core dev CPU
            # (scripts/bench_decode_layout.py); the images differ from the default layout's by < 1e-4, under one
            # 8-bit level
            latents = latents.contiguous(memory_format=torch.channels_last)
        images = self.decoder.images_from_latents(latents).float()
        return ((images + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int] | None = None, *, steps: int | None = None,
                 guidance: float | None = None, sampler: Sampler | None = None, height: int | None = None,
                 width: int | None = None, negative_prompt: str = "", skip=None,
                 callback: Callable[[int, int, torch.Tensor], None] | None = None,
                 timings: Timings | None = None, use_prior: bool = True,
                 guidance_rescale: float | None = None,
                 guidance_interval: tuple[float, float] | None = None) -> torch.Tensor:
        """Generate images in [0, 1] (B, 3, H, W); image i depends only on (prompt_i, seed_i) and the settings.
        ``use_prior``: with a layout prior, start from the noise plus the prompt's predicted coarse layout at the
        first timestep's noise level (``snapfusion.prior``); False, or no prior: from the noise alone.
        ``guidance_rescale``: phi of ``sampling.rescale_guidance`` (default: the model's; two-call models only).
        ``guidance_interval``: (start, end), the fractions of the steps that mix guidance, the others running the
        conditional pass alone (``sampling.guidance_steps``; default: the model's; two-call models only)."""
        cfg = self.config
        prompts = check_prompts(prompts)
        validation.check_negative_prompt_fits(negative_prompt, embeds_guidance=self.embeds_guidance, model=cfg.name)
        seeds = list(range(len(prompts))) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != len(prompts):
            raise SnapFusionError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        steps = cfg.steps if steps is None else steps
        guidance = cfg.guidance if guidance is None else float(guidance)
        sampler = sampler or cfg.sampler
        height = cfg.resolution if height is None else height
        width = cfg.resolution if width is None else width
        check_size(height, width, self.latent_factor)
        validation.check_guidance(guidance)
        rescale = self.resolve_guidance_rescale(guidance_rescale)
        validation.check_steps(steps)
        interval = self.resolve_guidance_interval(guidance_interval, steps=steps, guidance=guidance)
        timesteps = self.timesteps(steps, sampler)
        timings = timings if timings is not None else Timings()
        if self.fast is not None and self.fast.accepts(sampler=sampler, skip=skip):
            return self.fast.generate(self, prompts, seeds, timesteps, guidance=guidance, rescale=rescale,
                                      interval=interval, height=height, width=width,
                                      negative_prompt=negative_prompt, use_prior=use_prior, timings=timings,
                                      callback=callback)
        dev = self.device
        t0 = time.perf_counter()
        cond = self.encode_text(prompts)  # (B, 77, D)
        plain_cfg = guidance != 1.0 and not self.embeds_guidance
        uncond = self.encode_text([negative_prompt])[:1] if plain_cfg else None  # (1, 77, D)
        _sync(dev)
        t1 = time.perf_counter()
        down = self.decoder.config.downscale
        shape = (self.unet.config.in_channels, height // down, width // down)
        z = initial_noise(shape, seeds, dev)  # (B, 4, H/8, W/8) fp32
        if use_prior and self.prior is not None:  # the forward process's share of the prompt's coarse layout
            abar = float(self.schedule.alphas_cumprod[int(timesteps[0])])
            z = z + start_shift(self.prior, cond, shape[1:], abar).to(z)
        model_fns = self.step_fns(cond, uncond, guidance, steps, skip, rescale, interval)
        run = sample_ddim if sampler == "ddim" else sample_dpmpp_2m
        latents = run(model_fns, z, timesteps, self.schedule, callback=callback)
        _sync(dev)
        t2 = time.perf_counter()
        if not torch.isfinite(latents).all():
            raise SnapFusionError(f"sampling diverged (non-finite latents) at guidance {guidance:g}, {len(timesteps)} "
                                  f"steps, dtype {str(self.dtype).removeprefix('torch.')}: lower the guidance or "
                                  "use fp32")
        images = self.decode(latents)
        _sync(dev)
        t3 = time.perf_counter()
        timings.text_encoder += t1 - t0
        timings.unet_total += t2 - t1
        timings.unet_steps += len(timesteps) - 1
        timings.decoder += t3 - t2
        timings.total += t3 - t0
        return images


    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | None = None, seed: int | None = None,
                 num_images: int = 1, steps: int | None = None, guidance: float | None = None,
                 height: int | None = None, width: int | None = None, *, sampler: Sampler | None = None,
                 use_prior: bool = True, callback: Callable[[int, int, torch.Tensor], None] | None = None,
                 guidance_rescale: float | None = None,
                 guidance_interval: tuple[float, float] | None = None) -> GenerationResult:
        """Text -> PIL images, one per prompt x ``num_images`` (prompt-major). Image k gets seed ``seed + k``
        (mod 2**64), drawn at random when ``seed`` is None; the same seed gives the same image whatever the batch."""
        prompts = validation.check_prompts(prompt)
        negative_prompt = validation.check_prompt("" if negative_prompt is None else negative_prompt,
                                                  name="negative_prompt")
        seed = validation.check_seed(seed)
        num_images = validation.check_num_images(num_images, prompts=len(prompts))
        steps = _default(validation.check_steps(steps), self.config.steps)
        guidance = _default(validation.check_guidance(guidance), self.config.guidance)
        rescale = self.resolve_guidance_rescale(guidance_rescale)
        interval = self.resolve_guidance_interval(guidance_interval, steps=steps, guidance=guidance)
        sampler = _default(validation.check_sampler(sampler), self.config.sampler)
        height = _default(validation.check_side(height, name="height"), self.config.resolution)
        width = _default(validation.check_side(width, name="width"), self.config.resolution)
        check_size(height, width, self.latent_factor)
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        all_prompts = [p for p in prompts for _ in range(num_images)]
        seeds = [(seed + k) % (validation.MAX_SEED + 1) for k in range(len(all_prompts))]
        timings = Timings()
        images = self.generate(all_prompts, seeds, steps=steps, guidance=guidance, sampler=sampler, height=height,
                               width=width, negative_prompt=negative_prompt, callback=callback, timings=timings,
                               use_prior=use_prior, guidance_rescale=rescale, guidance_interval=interval)
        settings = {"steps": steps, "guidance": guidance,
                    "guidance_rescale": validation.used_guidance_rescale(rescale, guidance),
                    "guidance_interval": list(validation.used_guidance_interval(interval, guidance)),
                    "sampler": sampler, "height": height, "width": width,
                    "negative_prompt": negative_prompt if guidance != 1.0 else "", "model": self.config.name,
                    "prior": bool(use_prior and self.prior is not None)}
        return GenerationResult(to_pil(images), all_prompts, seeds, settings, timings)


def _default(value, default):
    """``value`` unless it is None (0 is a value)."""
    return default if value is None else value


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> PIL RGB images."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def image_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile equally sized images into one grid image."""
    if not images:
        raise SnapFusionError("no images to put in a grid")
    cols = cols or int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / cols))
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid
