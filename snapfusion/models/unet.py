"""The SD-family UNet with named, individually skippable blocks (SnapFusion §3.1).

Module paths equal block names: ``model.get_submodule("down.1.attn.0")``. State-dict keys read e.g.
``down.1.res.0.conv1.weight``, ``up.2.attn.1.transformer_blocks.0.attn2.to_k.weight``, ``down.0.resample.conv.bias``.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from snapfusion.errors import ConfigError
from snapfusion.models.layers import Attention, Downsample, ResnetBlock, Upsample, timestep_embedding
from snapfusion.models.unet_config import (  # noqa: F401  (re-exported: the UNet family lives here)
    BlockPlan, StageConfig, UNetConfig, block_names, copy_block, plan_blocks, remove_block, sd15, snapfusion,
    tiny_sd15, tiny_snapfusion,
)
from snapfusion.weights import (WEIGHTS_STEM, build_loaded, load_safetensors, read_config, resolve_weights,
                                save_pretrained)

KIND = "unet"
SkipSpec = Collection[str] | Mapping[str, torch.Tensor] | None


class FeedForward(nn.Module):
    """GEGLU feed-forward, 4x wide (diffusers ``FeedForward``; its ``net.0.proj``/``net.2`` are ``proj``/``out``)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(hidden * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text context, GEGLU MLP (diffusers ``BasicTransformerBlock``)."""

    def __init__(self, dim: int, *, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads=heads, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """An SD "CA" block: GroupNorm, proj_in, transformer blocks, proj_out, outer residual (``Transformer2DModel``)."""

    def __init__(self, channels: int, *, heads: int, context_dim: int, depth: int, groups: int, linear: bool):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        proj = (lambda: nn.Linear(channels, channels)) if linear else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, heads=heads, context_dim=context_dim) for _ in range(depth))
        self.proj_out = proj()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        y = y if self.linear else self.proj_in(y)
        y = y.flatten(2).transpose(1, 2)  # (B, H*W, C)
        y = self.proj_in(y) if self.linear else y
        for block in self.transformer_blocks:
            y = block(y, context)
        y = self.proj_out(y) if self.linear else y
        y = y.transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        y = y if self.linear else self.proj_out(y)
        return x + y

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Stage(nn.Module):
    """The blocks of one stage, keyed by id (``res.0`` is ``self.res["0"]``), plus an optional resample."""

    def __init__(self, cfg: UNetConfig, where: str, stage: StageConfig, plans: dict[str, BlockPlan], resample):
        super().__init__()
        self.order = [plans[f"{where}.{bid}"] for bid in stage.blocks]
        res, attn = {}, {}
        for p in self.order:
            index = p.name.rsplit(".", 1)[1]
            if p.kind == "res":
                res[index] = ResnetBlock(p.in_channels, p.out_channels, temb_channels=cfg.temb_dim,
                                         groups=cfg.norm_groups, eps=1e-5)
            else:
                attn[index] = SpatialTransformer(p.in_channels, heads=cfg.heads(p.in_channels),
                                                 context_dim=cfg.context_dim, depth=cfg.transformer_depth,
                                                 groups=cfg.norm_groups, linear=cfg.linear_projection)
        self.res, self.attn = nn.ModuleDict(res), nn.ModuleDict(attn)
        self.resample = resample(stage.channels) if stage.resample else None

    def block(self, plan: BlockPlan) -> nn.Module:
        kind, index = plan.name.rsplit(".", 2)[1:]
        return (self.res if kind == "res" else self.attn)[index]


class TimestepEmbedding(nn.Module):
    """Sinusoidal features -> Linear -> SiLU -> Linear (diffusers ``TimestepEmbedding``)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.in_dim = in_dim
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.in_dim).to(self.linear_1.weight.dtype)  # (B, in_dim)
        return self.linear_2(F.silu(self.linear_1(emb)))


class UNet(nn.Module):
    """``(z, t, context) -> prediction``; any block can be skipped by name, for the batch or per sample."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        plans = plan_blocks(config)
        c0 = config.down[0].channels
        self.conv_in = nn.Conv2d(config.in_channels, c0, 3, padding=1)
        self.time_embedding = TimestepEmbedding(c0, config.temb_dim)
        # guidance-distilled UNets (Meng et al. 2023 §3; FLUX.1-dev): w is embedded like a timestep, scaled by 1000
        self.guidance_embedding = TimestepEmbedding(c0, config.temb_dim) if config.guidance_embed else None
        self.down = nn.ModuleList(Stage(config, f"down.{i}", s, plans, Downsample) for i, s in enumerate(config.down))
        self.mid = Stage(config, "mid", config.mid, plans, None) if config.mid else None
        self.up = nn.ModuleList(Stage(config, f"up.{i}", s, plans, Upsample) for i, s in enumerate(config.up))
        c_out = config.up[-1].channels
        self.norm_out = nn.GroupNorm(config.norm_groups, c_out, eps=1e-5)
        self.conv_out = nn.Conv2d(c_out, config.out_channels, 3, padding=1)

    def _stages(self) -> list[Stage]:
        return [*self.down, *([self.mid] if self.mid is not None else []), *self.up]

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        """Every res/attn block as (full name, module), in execution order."""
        return [(p.name, stage.block(p)) for stage in self._stages() for p in stage.order]

    def _parse_skip(self, skip: SkipSpec, batch: int) -> tuple[frozenset[str], dict[str, torch.Tensor]]:
        if skip is None:
            return frozenset(), {}
        skip = [skip] if isinstance(skip, str) else skip  # one name
        names = set(p.name for stage in self._stages() for p in stage.order)
        unknown = sorted(set(skip) - names)
        if unknown:
            raise ConfigError(f"skip: no block named {unknown[0]!r} in this UNet")
        if not isinstance(skip, Mapping):
            return frozenset(skip), {}
        masks = {}
        for name, mask in skip.items():
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (batch,):
                got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ConfigError(f"skip mask for {name!r} must be a bool tensor of shape ({batch},), got {got}")
            masks[name] = mask
        return frozenset(), masks

    def _run_block(self, block: nn.Module, plan: BlockPlan, h, extra, skip_all, masks) -> torch.Tensor:
        if plan.name in skip_all:
            return block.shortcut(h)  # res: residual branch dropped; attn: identity
        out = block(h, extra)
        mask = masks.get(plan.name)
        if mask is not None:
            out = torch.where(mask.view(-1, 1, 1, 1), block.shortcut(h), out)
        return out

    def forward(self, z: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor,
                skip: SkipSpec = None, features: list[torch.Tensor] | None = None,
                guidance: torch.Tensor | float | None = None) -> torch.Tensor:
        """Predict from latents (B, Cin, H, W), timesteps (B,) or scalar, context (B, L, context_dim).

        ``guidance``: the guidance scale (B,) or scalar, for a UNet built with ``guidance_embed`` (required there).

        ``features``: a list that receives each stage's output (down stages before their downsample, the mid stage,
        up stages before their upsample), in order: what feature-level distillation compares (BK-SDM).
        """
        if features:  # DDP copies non-empty list arguments on their way in: the outputs would land in the copy
            raise ValueError("UNet.forward: features must be an empty list")
        skip_all, masks = self._parse_skip(skip, z.shape[0])
        t = torch.as_tensor(t, device=z.device)
        t = t.expand(z.shape[0]) if t.ndim == 0 else t  # (B,)
        temb = self.time_embedding(t)  # (B, temb_dim)
        if (guidance is None) != (self.guidance_embedding is None):
            raise ConfigError("UNet: guidance is required with guidance_embed and refused without it")
        if self.guidance_embedding is not None:
            w = torch.as_tensor(guidance, device=z.device, dtype=torch.float32)
            temb = temb + self.guidance_embedding(1000 * (w.expand(z.shape[0]) if w.ndim == 0 else w))
        h = self.conv_in(z)  # (B, C0, H, W)
        skips = [h]
        for stage in self._stages():
            for plan in stage.order:
                if plan.pop_skip:
                    h = torch.cat([h, skips.pop()], dim=1)  # SD U-Net concatenation on channels
                extra = temb if plan.kind == "res" else context
                h = self._run_block(stage.block(plan), plan, h, extra, skip_all, masks)
                if plan.push_after:
                    skips.append(h)
            if features is not None:
                features.append(h)
            if stage.resample is not None:
                h = stage.resample(h)
                if isinstance(stage.resample, Downsample):
                    skips.append(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, Cout, H, W)

    @torch.no_grad()
    def capture_block_inputs(self, z: torch.Tensor, t, context: torch.Tensor,
                             extra: Sequence[tuple[str, nn.Module]] = ()) -> dict[str, tuple[torch.Tensor, ...]]:
        """Run once and return each block's (and each ``extra`` module's) positional inputs; ``block(*inputs)``
        then reruns it alone."""
        captured: dict[str, tuple[torch.Tensor, ...]] = {}
        hooks = [module.register_forward_pre_hook(lambda m, args, name=name: captured.__setitem__(name, args))
                 for name, module in [*self.named_blocks(), *extra]]
        try:
            self(z, t, context)
        finally:
            for hook in hooks:
                hook.remove()
        return captured

    def save(self, folder: str | os.PathLike, *, dtype: torch.dtype | None = None, int8: bool = False) -> None:
        """Write ``folder/model.safetensors`` (sharded if large) and ``folder/config.json``; ``int8``: weight-only
        int8 storage of the large weights (weights.quantize_int8), loaded back as float by ``load``."""
        save_pretrained(folder, self, self.config, kind=KIND, dtype=dtype, int8=int8)

    @classmethod
    def load(cls, folder: str | os.PathLike, *, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> UNet:
        """Load a folder written by ``save``; every key and shape must match its config."""
        config = read_config(folder, UNetConfig, kind=KIND)
        state = load_safetensors(resolve_weights(folder, WEIGHTS_STEM), device=device)
        return build_loaded(lambda: cls(config), state, source=str(folder), device=device, dtype=dtype)


def num_parameters(model: nn.Module) -> int:
    """Total number of parameters."""
    return sum(p.numel() for p in model.parameters())


def inherit_weights(model: nn.Module, old_state: Mapping[str, torch.Tensor], *,
                    sources: Mapping[str, str] | None = None) -> list[str]:
    """Copy every same-key same-shape tensor of ``old_state`` into ``model``; return the keys left as initialised.

    ``sources`` maps a copied block's name to its source (from ``copy_block``): the copy takes the source's weights.
    """
    sources = dict(sources or {})
    not_inherited = []
    with torch.no_grad():
        for key, target in model.state_dict().items():
            src_key = key
            for new, old in sources.items():
                if key.startswith(new + "."):
                    src_key = old + key[len(new):]
            value = old_state.get(src_key)
            if value is None or tuple(value.shape) != tuple(target.shape):
                not_inherited.append(key)
                continue
            target.copy_(value.to(dtype=target.dtype, device=target.device))
    return not_inherited
