"""Stable Diffusion v1.5 from local files: a diffusers folder or an original single-file ``.safetensors``.

Nothing is fetched: a missing path is an error at once. Every tensor is mapped by explicit key with a shape check
(snapfusion/convert/*). The result is our ``Pipeline`` with SD-v1.5's DDIM defaults (50 steps, guidance 7.5).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from snapfusion.config import from_dict, load_json
from snapfusion.convert.scheduler_keys import scheduler_settings
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
from snapfusion.weights import load_into, load_safetensors, safetensors_metadata

SD15_PIPELINE = PipelineConfig(name="stable-diffusion-v1-5", resolution=512, steps=50, guidance=7.5, sampler="ddim",
                               timestep_spacing="leading", schedule=ScheduleConfig())


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "unet").is_dir() and (path / "vae").is_dir()


def scheduler_pipeline_config(folder: Path) -> tuple[PipelineConfig, str]:
    """(sampling defaults, prediction type) from ``folder/scheduler/scheduler_config.json``; SD-v1.5's without one."""
    sched = folder / "scheduler" / "scheduler_config.json"
    if not sched.is_file():
        return SD15_PIPELINE, "epsilon"
    s = scheduler_settings(load_json(sched), where=str(sched))
    config = dataclasses.replace(SD15_PIPELINE, sampler=s["sampler"], schedule=s["schedule"],
                                 timestep_spacing=s["timestep_spacing"], steps_offset=s["steps_offset"],
                                 set_alpha_to_one=s["set_alpha_to_one"])
    return config, s["prediction_type"]


def load_diffusers_sd(folder: str | Path, *, device: str | torch.device = "cpu") -> Pipeline:
    """SD-v1.x from a diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/; safetensors weights,
    fp16-variant files too): the scheduler config sets the schedule and sampling defaults, the tokenizer folder
    (added tokens included) the tokenizer."""
    folder = Path(folder)
    if not is_diffusers_folder(folder):
        raise WeightsError(f"not a diffusers Stable Diffusion folder (needs unet/ and vae/): {folder}")
    config, prediction_type = scheduler_pipeline_config(folder)
    unet = unet_from_diffusers_folder(folder / "unet", device=device, prediction_type=prediction_type)
    vae = load_diffusers_vae(folder / "vae", device=device)
    text = load_transformers_text_encoder(folder / "text_encoder", device=device)
    tok_dir = folder / "tokenizer"
    has_tokenizer = (tok_dir / "vocab.json").is_file() or (tok_dir / "tokenizer.json").is_file()
    tokenizer = Tokenizer(tok_dir) if has_tokenizer else Tokenizer()
    if tokenizer.vocab_size > text.config.vocab_size:
        raise WeightsError(f"{tok_dir}: {tokenizer.vocab_size} tokens, but the text encoder embeds only "
                           f"{text.config.vocab_size}")
    return Pipeline(text, unet, vae.decoder, config, tokenizer=tokenizer, encoder=vae.encoder).eval()


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
    saved = _saved_configs(path)  # written by snapfusion's single-file export: models of any width
    unet_config = unet_config or saved.get("unet")
    vae_config = vae_config or saved.get("vae")
    text_config = text_config or saved.get("text_encoder")
    unet_cfg = unet_config or sd15()
    unet = UNet(unet_cfg)
    load_into(unet, ldm_to_ours(state, unet_cfg), source=str(path))
    vae = AutoencoderKL(vae_config or AutoencoderConfig.sd15())
    load_into(vae, vae_from_ldm(state, source=str(path)), source=str(path))
    text = TextEncoder(text_config or TextEncoderConfig.sd15())
    load_into(text, text_from_ldm(state, source=str(path)), source=str(path))
    return Pipeline(text.to(device), unet.to(device), vae.decoder.to(device), saved.get("pipeline", SD15_PIPELINE),
                    encoder=vae.encoder.to(device)).eval()


def _saved_configs(path: Path) -> dict:
    """Our configs from the ``snapfusion`` metadata entry of a single file (empty for other checkpoints)."""
    text = safetensors_metadata(path).get("snapfusion")
    if text is None:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise WeightsError(f"{path}: malformed 'snapfusion' metadata ({err.msg})") from None
    classes = {"unet": UNetConfig, "vae": AutoencoderConfig, "text_encoder": TextEncoderConfig,
               "pipeline": PipelineConfig}
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: malformed 'snapfusion' metadata")
    return {k: from_dict(classes[k], v, where=f"{path} metadata {k}") for k, v in data.items() if k in classes}


def looks_like_hub_id(name: str) -> bool:
    """'runwayml/stable-diffusion-v1-5': owner/name, no file suffix, not an existing path."""
    parts = name.split("/")
    return (len(parts) == 2 and all(p and not p.startswith(".") for p in parts) and not Path(name).exists()
            and not name.endswith((".safetensors", ".ckpt", ".json")))


def hub_id_error(name: str) -> WeightsError:
    return WeightsError(f"{name!r} looks like a Hugging Face hub id, and nothing is downloaded: pass a local diffusers "
                        "folder or .safetensors file (e.g. the folder that `huggingface-cli download "
                        f"{name}` writes)")


def load_sd(path: str | Path, *, device: str | torch.device = "cpu") -> Pipeline:
    """Either layout, chosen by what ``path`` is."""
    if not Path(path).exists() and looks_like_hub_id(str(path)):
        raise hub_id_error(str(path))
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"Stable Diffusion weights not found: {path}")
    return load_diffusers_sd(path, device=device) if path.is_dir() else load_single_file_sd(path, device=device)
