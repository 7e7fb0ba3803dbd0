"""UNet weights: ours <-> diffusers ``UNet2DConditionModel`` and ours <-> original LDM (CompVis) single-file keys.

Every map is explicit and key-by-key, built from the config: a missing, unexpected or wrongly shaped tensor
raises ``WeightsError`` naming the key. Only configs whose stages follow the SD pattern have a foreign layout:
down stage = L x (res[, attn]), up stage = (L+1) x (res[, attn]) mirrored, mid = (res, attn, res) or none.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from snapfusion.config import load_json
from snapfusion.errors import ConfigError, WeightsError
from snapfusion.models.unet import UNet
from snapfusion.models.unet_config import StageConfig, UNetConfig
from snapfusion.weights import load_into, load_safetensors, resolve_weights

LDM_PREFIX = "model.diffusion_model."
Style = Literal["diffusers", "ldm"]

# original LDM ResBlock -> diffusers/ours ResnetBlock2D parameter names
_RES_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
            "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# ours FeedForward -> diffusers/LDM FeedForward (GEGLU at net.0, Linear at net.2)
_FF = {"proj": ["net", "0", "proj"], "out": ["net", "2"]}


def _stage_layers(where: str, stage: StageConfig) -> tuple[int, bool]:
    """(layers, has_attn) of an SD-pattern stage: (res, attn) * L or res * L; else ``ConfigError``."""
    kinds = [b.split(".")[0] for b in stage.blocks]
    n_res = kinds.count("res")
    if n_res and kinds == ["res", "attn"] * n_res:
        return n_res, True
    if n_res and kinds == ["res"] * n_res:
        return n_res, False
    raise ConfigError(f"{where}: blocks {list(stage.blocks)} do not follow the SD pattern (res, attn)*L or res*L; "
                      f"this UNet has no diffusers/LDM layout")


def sd_layout(cfg: UNetConfig) -> list[tuple[int, bool]]:
    """Per down stage (layers, has_attn), checking that the whole config follows the SD pattern."""
    n = len(cfg.down)
    layout = [_stage_layers(f"down.{i}", s) for i, s in enumerate(cfg.down)]
    for k, stage in enumerate(cfg.up):
        layers, _ = _stage_layers(f"up.{k}", stage)
        mirror = cfg.down[n - 1 - k]
        if layers != layout[n - 1 - k][0] + 1 or stage.channels != mirror.channels:
            raise ConfigError(f"up.{k}: needs {layout[n - 1 - k][0] + 1} res blocks of width {mirror.channels} "
                              f"for the SD pattern, has {layers} of width {stage.channels}")
    for path, stages in (("down", cfg.down), ("up", cfg.up)):
        for i, s in enumerate(stages):
            if s.resample != (i < n - 1):
                raise ConfigError(f"{path}.{i}: the SD pattern resamples after every stage but the last")
    if cfg.mid is not None:
        kinds = [b.split(".")[0] for b in cfg.mid.blocks]
        if kinds != ["res", "attn", "res"] or cfg.mid.channels != cfg.down[-1].channels:
            raise ConfigError(f"mid: blocks {list(cfg.mid.blocks)} are not SD's (res, attn, res) at the last width")
    return layout


def _prefix_rows(cfg: UNetConfig) -> list[tuple[str, str, str, str]]:
    """(ours prefix, kind, diffusers prefix, LDM prefix) for every module that holds weights."""
    sd_layout(cfg)
    rows = [("conv_in", "plain", "conv_in", "input_blocks.0.0"),
            ("time_embedding.linear_1", "plain", "time_embedding.linear_1", "time_embed.0"),
            ("time_embedding.linear_2", "plain", "time_embedding.linear_2", "time_embed.2"),
            ("norm_out", "plain", "conv_norm_out", "out.0"), ("conv_out", "plain", "conv_out", "out.2")]
    k = 1  # LDM input_blocks index: one per SD layer (res + its attn) and one per Downsample
    for i, stage in enumerate(cfg.down):
        res, attn = _split(stage)
        for m, bid in enumerate(res):
            rows.append((f"down.{i}.{bid}", "res", f"down_blocks.{i}.resnets.{m}", f"input_blocks.{k}.0"))
            if attn:
                rows.append((f"down.{i}.{attn[m]}", "attn", f"down_blocks.{i}.attentions.{m}", f"input_blocks.{k}.1"))
            k += 1
        if stage.resample:
            rows.append((f"down.{i}.resample.conv", "plain", f"down_blocks.{i}.downsamplers.0.conv",
                         f"input_blocks.{k}.0.op"))
            k += 1
    if cfg.mid is not None:
        (r0, r1), (a0,) = _split(cfg.mid)
        rows += [(f"mid.{r0}", "res", "mid_block.resnets.0", "middle_block.0"),
                 (f"mid.{a0}", "attn", "mid_block.attentions.0", "middle_block.1"),
                 (f"mid.{r1}", "res", "mid_block.resnets.1", "middle_block.2")]
    k = 0  # LDM output_blocks index: one per SD layer; the Upsample sits inside the stage's last one
    for i, stage in enumerate(cfg.up):
        res, attn = _split(stage)
        for m, bid in enumerate(res):
            rows.append((f"up.{i}.{bid}", "res", f"up_blocks.{i}.resnets.{m}", f"output_blocks.{k}.0"))
            if attn:
                rows.append((f"up.{i}.{attn[m]}", "attn", f"up_blocks.{i}.attentions.{m}", f"output_blocks.{k}.1"))
            k += 1
        if stage.resample:
            rows.append((f"up.{i}.resample.conv", "plain", f"up_blocks.{i}.upsamplers.0.conv",
                         f"output_blocks.{k - 1}.{2 if attn else 1}.conv"))
    return rows


def _split(stage: StageConfig) -> tuple[list[str], list[str]]:
    return [b for b in stage.blocks if b.startswith("res.")], [b for b in stage.blocks if b.startswith("attn.")]


def _inner(kind: str, rest: list[str], style: Style) -> list[str]:
    if kind == "res" and style == "ldm":
        return _RES_LDM[rest[0]].split(".") + rest[1:]
    if kind == "attn" and len(rest) > 3 and rest[0] == "transformer_blocks" and rest[2] == "ff":
        return rest[:3] + _FF[rest[3]] + rest[4:]
    return rest


def ours_shapes(cfg: UNetConfig) -> dict[str, tuple[int, ...]]:
    """Every key of our state dict and its shape, without allocating weights."""
    with torch.device("meta"):
        model = UNet(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def unet_key_map(cfg: UNetConfig, style: Style) -> dict[str, str]:
    """Our key -> the diffusers key or the LDM key (without ``model.diffusion_model.``), for every weight."""
    rows = {ours: (kind, dif if style == "diffusers" else ldm) for ours, kind, dif, ldm in _prefix_rows(cfg)}
    out = {}
    for key in ours_shapes(cfg):
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            row = rows.get(".".join(parts[:n]))
            if row is not None:
                out[key] = ".".join([row[1], *_inner(row[0], parts[n:], style)])
                break
        else:
            raise AssertionError(f"no conversion row for our key {key}")  # a bug in _prefix_rows, not user error
    return out


def _rename(state: Mapping[str, torch.Tensor], key_map: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]],
            source: str) -> dict[str, torch.Tensor]:
    """``out[dst] = state[src]`` for ``key_map`` src -> dst, with shape checks (``shapes`` keyed by src or dst)."""
    out = {}
    for src, dst in key_map.items():
        if src not in state:
            raise WeightsError(f"{source}: missing key '{src}' ({len(set(key_map) - set(state))} missing in all)")
        value, want = state[src], shapes.get(src, shapes.get(dst))
        if tuple(value.shape) != want:
            raise WeightsError(f"{source}: shape mismatch for '{src}': has {tuple(value.shape)}, expected {want}")
        out[dst] = value
    unexpected = sorted(set(state) - set(key_map))
    if unexpected:
        raise WeightsError(f"{source}: unexpected key '{unexpected[0]}' ({len(unexpected)} unexpected in all)")
    return out


def ours_to_diffusers(state: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Our UNet state dict -> diffusers ``UNet2DConditionModel`` state dict."""
    return _rename(state, unet_key_map(cfg, "diffusers"), ours_shapes(cfg), "our UNet weights")


def diffusers_to_ours(state: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Diffusers ``UNet2DConditionModel`` state dict -> ours."""
    inverse = {v: k for k, v in unet_key_map(cfg, "diffusers").items()}
    return _rename(state, inverse, ours_shapes(cfg), "diffusers UNet weights")


def ours_to_ldm(state: Mapping[str, torch.Tensor], cfg: UNetConfig, *,
                prefix: str = LDM_PREFIX) -> dict[str, torch.Tensor]:
    """Our UNet state dict -> original LDM single-file keys (``model.diffusion_model.input_blocks...``)."""
    key_map = {k: prefix + v for k, v in unet_key_map(cfg, "ldm").items()}
    return _rename(state, key_map, ours_shapes(cfg), "our UNet weights")


def ldm_to_ours(checkpoint: Mapping[str, torch.Tensor], cfg: UNetConfig, *,
                prefix: str = LDM_PREFIX) -> dict[str, torch.Tensor]:
    """The UNet part (keys under ``prefix``) of an LDM single-file checkpoint -> ours; other keys are ignored."""
    state = {k: v for k, v in checkpoint.items() if k.startswith(prefix)}
    if not state:
        raise WeightsError(f"LDM checkpoint: no key starts with '{prefix}' (is this an SD single-file checkpoint?)")
    inverse = {prefix + v: k for k, v in unet_key_map(cfg, "ldm").items()}
    return _rename(state, inverse, ours_shapes(cfg), "LDM checkpoint")


# ours FeedForward -> diffusers BasicTransformerBlock FeedForward, the only names our blocks do not share with it
_FF_CUSTOM = {".ff.proj.": ".ff.net.0.proj.", ".ff.out.": ".ff.net.2."}


def custom_key_map(cfg: UNetConfig) -> dict[str, str]:
    """Our key -> the key of the exported diffusers custom UNet (``SnapFusionUNet``, any block layout): the same
    module paths with diffusers' feed-forward names; every other key is unchanged."""
    out = {}
    for key in ours_shapes(cfg):
        new = key
        for ours, theirs in _FF_CUSTOM.items():
            new = new.replace(ours, theirs)
        out[key] = new
    return out


def ours_to_custom(state: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Our UNet state dict -> the exported custom UNet's."""
    return _rename(state, custom_key_map(cfg), ours_shapes(cfg), "our UNet weights")


def custom_to_ours(state: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """The exported custom UNet's state dict -> ours."""
    inverse = {v: k for k, v in custom_key_map(cfg).items()}
    return _rename(state, inverse, ours_shapes(cfg), "custom UNet weights")


# ----------------------------------------------------------------------------------------------------------------
# Configs

# diffusers UNet2DConditionModel options that we accept only at these values (their defaults in diffusers)
_FIXED = {"center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "norm_eps": 1e-5,
          "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0, "dual_cross_attention": False,
          "only_cross_attention": False, "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
          "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional", "conv_in_kernel": 3,
          "conv_out_kernel": 3, "class_embed_type": None, "addition_embed_type": None, "num_class_embeds": None,
          "addition_time_embed_dim": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
          "time_cond_proj_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
          "projection_class_embeddings_input_dim": None, "class_embeddings_concat": False,
          "cross_attention_norm": None, "attention_type": "default", "num_attention_heads": None,
          "reverse_transformer_layers_per_block": None, "mid_block_only_cross_attention": None,
          "addition_embed_type_num_heads": 64}
_DEFAULTS = {"in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280],
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "mid_block_type": "UNetMidBlock2DCrossAttn",
             "layers_per_block": 2, "attention_head_dim": 8, "cross_attention_dim": 1280, "norm_num_groups": 32,
             "transformer_layers_per_block": 1, "use_linear_projection": False, "time_embedding_dim": None}
_IGNORED = {"sample_size", "upcast_attention"}  # metadata; upcast only changes fp16 rounding inside attention


def _per_stage(value: Any, n: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ConfigError(f"diffusers config: {name} has {len(values)} entries for {n} stages")
    return values


def _uniform(value: Any, n: int, name: str) -> Any:
    values = _per_stage(value, n, name)
    if len(set(values)) != 1:
        raise ConfigError(f"diffusers config: {name}={values} varies per stage; we support one value")
    return values[0]


def unet_config_from_diffusers(data: Mapping[str, Any], *,
                               prediction_type: Literal["epsilon", "v_prediction"] = "epsilon") -> UNetConfig:
    """Our UNetConfig from a diffusers ``unet/config.json`` dict; ``ConfigError`` for what we cannot represent."""
    for key, value in data.items():
        if key.startswith("_") or key in _IGNORED or key in _DEFAULTS:
            continue
        if key not in _FIXED:
            raise ConfigError(f"diffusers config: unsupported key {key!r}")
        if value != _FIXED[key] and not (isinstance(value, list) and set(value) == {_FIXED[key]}):
            raise ConfigError(f"diffusers config: {key}={value!r} is not supported (only {_FIXED[key]!r})")
    d = {**_DEFAULTS, **{k: v for k, v in data.items() if k in _DEFAULTS}}
    widths, n = list(d["block_out_channels"]), len(d["block_out_channels"])
    layers = _per_stage(d["layers_per_block"], n, "layers_per_block")
    down_attn = [_block_type(t, "Down") for t in _per_stage(d["down_block_types"], n, "down_block_types")]
    up_attn = [_block_type(t, "Up") for t in _per_stage(d["up_block_types"], n, "up_block_types")]
    heads = _per_stage(d["attention_head_dim"], n, "attention_head_dim")  # diffusers' name for the head count
    head_dims = {w // h for w, h in zip(widths, heads)}
    if d["mid_block_type"] not in ("UNetMidBlock2DCrossAttn", None):
        raise ConfigError(f"diffusers config: mid_block_type {d['mid_block_type']!r} is not supported")
    down = tuple(_stage(w, layers[i], down_attn[i], i < n - 1) for i, w in enumerate(widths))
    up = tuple(_stage(widths[n - 1 - k], layers[n - 1 - k] + 1, up_attn[k], k < n - 1) for k in range(n))
    mid = StageConfig(widths[-1], ("res.0", "attn.0", "res.1"), False) if d["mid_block_type"] else None
    uniform_heads = len(set(heads)) == 1
    if not uniform_heads and (len(head_dims) != 1 or any(w % h for w, h in zip(widths, heads))):
        raise ConfigError(f"diffusers config: heads {heads} at widths {widths} give neither one head count "
                          f"nor one head width")
    return UNetConfig(
        in_channels=d["in_channels"], out_channels=d["out_channels"], down=down, mid=mid, up=up,
        context_dim=_uniform(d["cross_attention_dim"], n, "cross_attention_dim"),
        attention_heads=heads[0], attention_head_dim=None if uniform_heads else head_dims.pop(),
        transformer_depth=_uniform(d["transformer_layers_per_block"], n, "transformer_layers_per_block"),
        linear_projection=d["use_linear_projection"], norm_groups=d["norm_num_groups"],
        time_embed_dim=d["time_embedding_dim"], prediction_type=prediction_type)


def _block_type(name: str, direction: str) -> bool:
    """True for a cross-attention block type, False for a plain one; ``ConfigError`` otherwise."""
    if name == f"CrossAttn{direction}Block2D":
        return True
    if name == f"{direction}Block2D":
        return False
    raise ConfigError(f"diffusers config: block type {name!r} is not supported")


def _stage(channels: int, layers: int, attn: bool, resample: bool) -> StageConfig:
    ids = [x for j in range(layers) for x in ((f"res.{j}", f"attn.{j}") if attn else (f"res.{j}",))]
    return StageConfig(channels, tuple(ids), resample)


def diffusers_config_from_ours(cfg: UNetConfig) -> dict[str, Any]:
    """A diffusers ``UNet2DConditionModel`` config dict for an SD-pattern UNet (``ConfigError`` otherwise)."""
    layout = sd_layout(cfg)
    widths = [s.channels for s in cfg.down]
    layers = [layers for layers, _ in layout]
    heads = [cfg.heads(w) for w in widths]
    return {
        "_class_name": "UNet2DConditionModel", "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "block_out_channels": widths, "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "down_block_types": ["CrossAttnDownBlock2D" if attn else "DownBlock2D" for _, attn in layout],
        "up_block_types": ["CrossAttnUpBlock2D" if _split(s)[1] else "UpBlock2D" for s in cfg.up],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if cfg.mid is not None else None,
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,  # diffusers' name for the head count
        "cross_attention_dim": cfg.context_dim, "norm_num_groups": cfg.norm_groups,
        "transformer_layers_per_block": cfg.transformer_depth, "use_linear_projection": cfg.linear_projection,
        "time_embedding_dim": cfg.time_embed_dim, "flip_sin_to_cos": True, "freq_shift": 0, "sample_size": 64,
    }


def unet_from_diffusers_folder(folder: str | os.PathLike, *, device: str | torch.device = "cpu",
                               prediction_type: Literal["epsilon", "v_prediction"] = "epsilon") -> UNet:
    """Our UNet from a diffusers ``unet/`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)."""
    folder = Path(folder)
    cfg = unet_config_from_diffusers(load_json(folder / "config.json"), prediction_type=prediction_type)
    path = resolve_weights(folder, "diffusion_pytorch_model", variants=("fp16",))  # fp16 variant files too
    state = diffusers_to_ours(load_safetensors(path, device=device), cfg)
    with torch.device("meta"):
        model = UNet(cfg)
    model = model.to_empty(device=device)
    load_into(model, state, source=str(folder))
    return model
