"""Stable Diffusion v1.5 from local files: a diffusers folder or an original single-file ``.safetensors``.

Nothing is fetched: a missing path is an error at once. Every tensor is mapped by explicit key with a shape check
(snapfusion/convert/*). The result is our ``Pipeline`` with SD-v1.5's DDIM defaults (50 steps, guidance 7.5).
"""

from __future__ import annotations

from pathlib import Path

import torch

from snapfusion.config import load_json
from snapfusion.convert.text_keys import text_from_ldm
from snapfusion.convert.unet_keys import ldm_to_ours, unet_from_diffusers_folder
from snapfusion.convert.vae_keys import load_diffusers_vae, vae_from_ldm
from snapfusion.errors import WeightsError
from snapfusion.models.autoencoder import AutoencoderConfig, AutoencoderKL
from snapfusion.models.text import TextEncoder, TextEncoderConfig, Tokenizer, load_transformers_text_encoder
from snapfusion.models.unet import UNet
from snapfusion.models.unet_config import UNetConfig, sd15
from snapfusion.pipeline import Pipeline, PipelineConfig
from snapfusion.schedule import ScheduleConfig
from snapfusion.weights import load_into, load_safetensors

SD15_PIPELINE = PipelineConfig(name="stable-diffusion-v1-5", resolution=512, steps=50, guidance=7.5, sampler="ddim",
                               timestep_spacing="leading", schedule=ScheduleConfig())


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "unet").is_dir() and (path / "vae").is_dir()


def _prediction_type(folder: Path) -> str:
    sched = folder / "scheduler" / "scheduler_config.json"
    return load_json(sched).get("prediction_type", "epsilon") if sched.is_file() else "epsilon"


def load_diffusers_sd(folder: str | Path, *, device: str | torch.device = "cpu") -> Pipeline:
    """SD-v1.x from a diffusers folder (unet/, vae/, text_encoder/, tokenizer/; safetensors weights)."""
    folder = Path(folder)
    if not is_diffusers_folder(folder):
        raise WeightsError(f"not a diffusers Stable Diffusion folder (needs unet/ and vae/): {folder}")
    unet = unet_from_diffusers_folder(folder / "unet", device=device, prediction_type=_prediction_type(folder))
    vae = load_diffusers_vae(folder / "vae", device=device)
    text = load_transformers_text_encoder(folder / "text_encoder", device=device)
    tok_dir = folder / "tokenizer"
    tokenizer = Tokenizer(tok_dir) if (tok_dir / "vocab.json").is_file() else Tokenizer()
    return Pipeline(text, unet, vae.decoder, SD15_PIPELINE, tokenizer=tokenizer, encoder=vae.encoder).eval()


def load_single_file_sd(path: str | Path, *, device: str | torch.device = "cpu", unet_config: UNetConfig | None = None,
                        vae_config: AutoencoderConfig | None = None,
                        text_config: TextEncoderConfig | None = None) -> Pipeline:
    """SD-v1.x from an original single-file ``.safetensors`` checkpoint; configs default to SD-v1.5's."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Stable Diffusion checkpoint not found: {path}")
    if path.suffix != ".safetensors":
        raise WeightsError(f"only .safetensors checkpoints are loaded (no pickle): {path}")
    state = load_safetensors(path)
    unet_cfg = unet_config or sd15()
    unet = UNet(unet_cfg)
    load_into(unet, ldm_to_ours(state, unet_cfg), source=str(path))
    vae = AutoencoderKL(vae_config or AutoencoderConfig.sd15())
    load_into(vae, vae_from_ldm(state, source=str(path)), source=str(path))
    text = TextEncoder(text_config or TextEncoderConfig.sd15())
    load_into(text, text_from_ldm(state, source=str(path)), source=str(path))
    return Pipeline(text.to(device), unet.to(device), vae.decoder.to(device), SD15_PIPELINE,
                    encoder=vae.encoder.to(device)).eval()


def load_sd(path: str | Path, *, device: str | torch.device = "cpu") -> Pipeline:
    """Either layout, chosen by what ``path`` is."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"Stable Diffusion weights not found: {path}")
    return load_diffusers_sd(path, device=device) if path.is_dir() else load_single_file_sd(path, device=device)
