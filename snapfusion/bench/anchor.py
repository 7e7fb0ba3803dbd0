"""The anchor of the latency tables: diffusers' ``StableDiffusionPipeline`` of SD-v1.5's architecture, built from
configs with random weights (nothing downloaded), with diffusers' documented speed settings (fp16, SDPA,
channels-last UNet, ``torch.compile(unet, mode="reduce-overhead", fullgraph=True)``)."""

from __future__ import annotations

import time

import torch

from snapfusion.models.text import TOKENIZER_DIR, TextEncoderConfig, clip_text_config

# SD-v1.5's unet/config.json and vae/config.json (runwayml/stable-diffusion-v1-5) where they differ from the defaults
SD15_UNET = dict(sample_size=64, cross_attention_dim=768)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512)
# the same families at test size
TINY_UNET = dict(sample_size=8, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, layers_per_block=1,
                 norm_num_groups=8, attention_head_dim=2)
TINY_VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=4,
                sample_size=16)


def diffusers_pipeline(*, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                       tiny: bool = False):
    """A random-weight diffusers ``StableDiffusionPipeline`` of SD-v1.5's architecture (``tiny``: test size), with
    SD-v1.5's DDIM schedule and no safety checker."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    text_cfg = TextEncoderConfig.tiny() if tiny else TextEncoderConfig.sd15()
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE))
        text = CLIPTextModel(clip_text_config(text_cfg))
    tokenizer = CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"),
                              model_max_length=77)  # CLIP's context, as openai/clip-vit-large-patch14
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)  # SD-v1.5's scheduler_config.json values
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def speed_up(pipe, *, compile: bool = True, mode: str = "reduce-overhead"):
    """diffusers' documented settings (docs: "Accelerate inference", "torch2.0"): channels-last UNet and
    ``torch.compile(unet, mode="reduce-overhead", fullgraph=True)``; SDPA is diffusers' default processor."""
    pipe.unet.to(memory_format=torch.channels_last)
    if compile:
        pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=True)
    return pipe


def time_diffusers(pipe, prompt: str, *, batch: int = 1, steps: int, guidance: float = 7.5, size: int = 512,
                   runs: int, warmup: int) -> dict:
    """Prompt-to-pixels seconds of ``pipe`` (images as a device tensor, like ``Pipeline.generate``): the list of
    timed runs, the first run (compilation included) and the CUDA peak memory."""
    dev = pipe.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times, first = [], None
    for i in range(warmup + runs):
        generator = torch.Generator(dev).manual_seed(i)
        _sync(dev)
        t0 = time.perf_counter()
        out = pipe([prompt] * batch, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                   output_type="pt", generator=generator).images  # (B, 3, H, W) in [0, 1]
        _sync(dev)
        elapsed = time.perf_counter() - t0
        first = elapsed if first is None else first
        if i >= warmup:
            times.append(elapsed)
    if tuple(out.shape) != (batch, 3, size, size):
        raise RuntimeError(f"diffusers returned images of shape {tuple(out.shape)}")
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    return {"total_s": times, "first_run_s": first, "peak_memory_mb": peak}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
