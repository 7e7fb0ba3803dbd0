"""VAE weight names: ours <-> diffusers ``AutoencoderKL``, original LDM single-file checkpoints -> ours.

Ours (snapfusion/models/autoencoder.py) -> diffusers -> LDM (prefix ``first_stage_model.``):
  encoder.down.{i}.res.{j}.*          encoder.down_blocks.{i}.resnets.{j}.*     encoder.down.{i}.block.{j}.*
  encoder.down.{i}.downsample.conv    encoder.down_blocks.{i}.downsamplers.0.*  encoder.down.{i}.downsample.conv
  decoder.up.{i}.res.{j}.*            decoder.up_blocks.{i}.resnets.{j}.*       decoder.up.{n-1-i}.block.{j}.*
  decoder.up.{i}.upsample.conv        decoder.up_blocks.{i}.upsamplers.0.*      decoder.up.{n-1-i}.upsample.conv
  *.mid.res.{0,1}.*                   *.mid_block.resnets.{0,1}.*               *.mid.block_{1,2}.*
  *.mid.attn.0.{group_norm,to_q,..}   *.mid_block.attentions.0.*                *.mid.attn_1.{norm,q,k,v,proj_out}
  *.norm_out                          *.conv_norm_out                           *.norm_out
  encoder.quant_conv                  quant_conv                                quant_conv
  decoder.post_quant_conv             post_quant_conv                           post_quant_conv
ResNet ``conv_shortcut`` is LDM's ``nin_shortcut``; LDM's attention q/k/v/proj_out are 1x1 convs (C, C, 1, 1).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from snapfusion.config import load_json
from snapfusion.errors import ConfigError, WeightsError
from snapfusion.models.autoencoder import AutoencoderConfig, AutoencoderKL
from snapfusion.weights import load_into, load_safetensors, resolve_weights

# (ours, diffusers) prefix templates; {p} is encoder|decoder, {i}/{j} are indices. First match wins.
_DIFFUSERS_RULES = [
    ("encoder.quant_conv.", "quant_conv."),
    ("decoder.post_quant_conv.", "post_quant_conv."),
    ("encoder.down.{i}.res.{j}.", "encoder.down_blocks.{i}.resnets.{j}."),
    ("encoder.down.{i}.downsample.", "encoder.down_blocks.{i}.downsamplers.0."),
    ("decoder.up.{i}.res.{j}.", "decoder.up_blocks.{i}.resnets.{j}."),
    ("decoder.up.{i}.upsample.", "decoder.up_blocks.{i}.upsamplers.0."),
    ("{p}.mid.res.{j}.", "{p}.mid_block.resnets.{j}."),
    ("{p}.mid.attn.{j}.", "{p}.mid_block.attentions.{j}."),
    ("{p}.norm_out.", "{p}.conv_norm_out."),
    ("{p}.conv_in.", "{p}.conv_in."),
    ("{p}.conv_out.", "{p}.conv_out."),
]
_GROUPS = {"p": r"(?P<p>encoder|decoder)", "i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)"}


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, group in _GROUPS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), group)
    return re.compile(pattern)


_TO_DIFFUSERS = [(_compile(ours), theirs) for ours, theirs in _DIFFUSERS_RULES]
_FROM_DIFFUSERS = [(_compile(theirs), ours) for ours, theirs in _DIFFUSERS_RULES]


def _rename(key: str, rules: list[tuple[re.Pattern, str]], source: str) -> str:
    for pattern, template in rules:
        m = pattern.match(key)
        if m:
            return template.format(**m.groupdict()) + key[m.end():]
    raise WeightsError(f"{source}: unknown VAE key '{key}'")


def vae_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our whole-VAE state dict -> diffusers ``AutoencoderKL`` names (same tensors)."""
    return {_rename(k, _TO_DIFFUSERS, "ours"): v for k, v in state.items()}


def vae_from_diffusers(state: Mapping[str, torch.Tensor], *, source: str = "diffusers") -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` state dict -> our names; an unknown key raises ``WeightsError``."""
    return {_rename(k, _FROM_DIFFUSERS, source): v for k, v in state.items()}


# LDM (CompVis ldm/modules/diffusionmodules/model.py) -> ours. Decoder levels are numbered by resolution there.
_LDM_RULES = [
    (r"quant_conv\.", "encoder.quant_conv."),
    (r"post_quant_conv\.", "decoder.post_quant_conv."),
    (r"encoder\.down\.(\d+)\.block\.(\d+)\.", "encoder.down.{0}.res.{1}."),
    (r"encoder\.down\.(\d+)\.downsample\.", "encoder.down.{0}.downsample."),
    (r"decoder\.up\.(\d+)\.block\.(\d+)\.", "decoder.up.{flip0}.res.{1}."),
    (r"decoder\.up\.(\d+)\.upsample\.", "decoder.up.{flip0}.upsample."),
    (r"(encoder|decoder)\.mid\.block_([12])\.", "{0}.mid.res.{minus1}."),
    (r"(encoder|decoder)\.mid\.attn_1\.", "{0}.mid.attn.0."),
    (r"(encoder|decoder)\.(conv_in|norm_out|conv_out)\.", "{0}.{1}."),
]
_LDM_LEAF = {"nin_shortcut": "conv_shortcut", "norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
             "proj_out": "to_out.0"}
LDM_PREFIXES = ("first_stage_model.", "vae.")
_LDM_UP_PART = {"res": "block", "upsample": "upsample"}


def vae_from_ldm(state: Mapping[str, torch.Tensor], *, source: str = "LDM checkpoint") -> dict[str, torch.Tensor]:
    """An LDM / SD single-file checkpoint (whole or VAE part) -> our whole-VAE state dict.

    Keys outside the VAE prefix (UNet, text encoder) are ignored; unknown keys inside it raise ``WeightsError``.
    The attention q/k/v/proj_out 1x1 convs (C, C, 1, 1) become linear weights (C, C).
    """
    prefix = next((p for p in LDM_PREFIXES if any(k.startswith(p) for k in state)), "")
    vae = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    levels = 1 + max((int(m.group(1)) for k in vae if (m := re.match(r"decoder\.up\.(\d+)\.", k))), default=0)
    out = {}
    for key, value in vae.items():
        new = _ldm_key(key, levels, source, prefix)
        if ".mid.attn." in new and value.ndim == 4:
            value = value[:, :, 0, 0]  # 1x1 conv -> linear
        out[new] = value
    return out


def _ldm_key(key: str, levels: int, source: str, prefix: str) -> str:
    for pattern, template in _LDM_RULES:
        m = re.match(pattern, key)
        if not m:
            continue
        groups = m.groups()
        extra = {"flip0": levels - 1 - int(groups[0])} if "flip0" in template else {}
        if "minus1" in template:
            extra["minus1"] = int(groups[1]) - 1
        head = template.format(*groups, **extra)
        leaf, _, param = key[m.end():].rpartition(".")
        if ".mid.attn." in head or leaf == "nin_shortcut":
            leaf = _LDM_LEAF.get(leaf, leaf)
        return head + (f"{leaf}." if leaf else "") + param
    raise WeightsError(f"{source}: unknown VAE key '{prefix}{key}'")


def vae_to_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our whole-VAE state dict -> LDM names with ``first_stage_model.`` prefix (attention as 1x1 convs)."""
    levels = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"decoder\.up\.(\d+)\.", k))), default=0)
    leaf_back = {v: k for k, v in _LDM_LEAF.items()}
    out = {}
    for key, value in state.items():
        k = re.sub(r"^encoder\.quant_conv\.", "quant_conv.", key)
        k = re.sub(r"^decoder\.post_quant_conv\.", "post_quant_conv.", k)
        k = re.sub(r"^encoder\.down\.(\d+)\.res\.(\d+)\.", r"encoder.down.\1.block.\2.", k)
        k = re.sub(r"^decoder\.up\.(\d+)\.(res|upsample)\.",  # LDM numbers decoder levels by resolution
                   lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.{_LDM_UP_PART[m.group(2)]}.", k)
        k = re.sub(r"\.mid\.res\.(\d)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", k)
        k = k.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid.attn.0." in k:
            head, leaf = k.split(".mid.attn.0.")
            name, _, param = leaf.rpartition(".")
            k = f"{head}.mid.attn_1.{leaf_back[name]}.{param}"
            value = value[:, :, None, None] if value.ndim == 2 else value  # linear -> 1x1 conv
        out["first_stage_model." + k] = value
    return out


def config_from_diffusers(data: Mapping, *, where: str = "vae/config.json") -> AutoencoderConfig:
    """Our config from a diffusers ``AutoencoderKL`` config.json dict; options we do not model raise ``ConfigError``."""
    if data.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ConfigError(f"{where}: expected an AutoencoderKL config, got {data.get('_class_name')!r}")
    unsupported = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True, "shift_factor": None,
                   "latents_mean": None, "latents_std": None}
    for key, expected in unsupported.items():
        if data.get(key, expected) != expected:
            raise ConfigError(f"{where}: {key}={data[key]!r} is not supported (expected {expected!r})")
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(t != block for t in data.get(key, [block])):
            raise ConfigError(f"{where}: {key} must all be {block}, got {data[key]}")
    try:
        widths = tuple(int(w) for w in data["block_out_channels"])
        return AutoencoderConfig(
            in_channels=int(data.get("in_channels", 3)), out_channels=int(data.get("out_channels", 3)),
            latent_channels=int(data.get("latent_channels", 4)), encoder_widths=widths, decoder_widths=widths,
            layers_per_block=int(data.get("layers_per_block", 1)), norm_groups=int(data.get("norm_num_groups", 32)),
            scaling_factor=float(data.get("scaling_factor", 0.18215)),
            mid_attention=bool(data.get("mid_block_add_attention", True)), double_z=True)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{where}: bad or missing field ({type(err).__name__}: {err})") from None


def config_to_diffusers(cfg: AutoencoderConfig) -> dict:
    """A diffusers ``AutoencoderKL`` config dict; needs equal encoder/decoder widths and double_z (KL)."""
    if cfg.encoder_widths != cfg.decoder_widths or not cfg.double_z:
        raise ConfigError("diffusers AutoencoderKL needs encoder_widths == decoder_widths and double_z=True, "
                          f"got {cfg.encoder_widths} / {cfg.decoder_widths}, double_z={cfg.double_z}")
    n = len(cfg.encoder_widths)
    return {
        "_class_name": "AutoencoderKL", "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(cfg.encoder_widths), "layers_per_block": cfg.layers_per_block, "act_fn": "silu",
        "latent_channels": cfg.latent_channels, "norm_num_groups": cfg.norm_groups,
        "scaling_factor": cfg.scaling_factor, "mid_block_add_attention": cfg.mid_attention,
    }


def load_diffusers_vae(folder: str | os.PathLike, *, device: str | torch.device = "cpu") -> AutoencoderKL:
    """Load a diffusers ``vae/`` folder (config.json + diffusion_pytorch_model.safetensors) as our AutoencoderKL."""
    folder = Path(folder)
    config = config_from_diffusers(load_json(folder / "config.json"), where=str(folder / "config.json"))
    path = resolve_weights(folder, "diffusion_pytorch_model", variants=("fp16",))
    model = AutoencoderKL(config)
    load_into(model, vae_from_diffusers(load_safetensors(path), source=str(path)), source=str(path))
    return model.to(device)


def load_ldm_vae(path: str | os.PathLike, config: AutoencoderConfig | None = None, *,
                 device: str | torch.device = "cpu") -> AutoencoderKL:
    """Load the VAE of an SD single-file ``.safetensors`` checkpoint (config defaults to SD-v1.5's)."""
    model = AutoencoderKL(config or AutoencoderConfig.sd15())
    load_into(model, vae_from_ldm(load_safetensors(path), source=str(path)), source=str(path))
    return model.to(device)
