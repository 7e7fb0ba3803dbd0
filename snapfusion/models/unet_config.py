"""UNet config: stages of named blocks, the skip-connection plan, presets and evolution edits.

A stage is an ordered tuple of block ids (``res.0``, ``attn.1`` ...). A block's full name is ``down.{i}.{id}``,
``mid.{id}`` or ``up.{i}.{id}``; it is also the block's module path in ``UNet``. Order comes from the tuple, never
from the index, so adding a block never renames the others (SnapFusion Alg. 1 actions address names).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal

from snapfusion.errors import ConfigError

_BLOCK_ID = re.compile(r"^(res|attn)\.(0|[1-9][0-9]*)$")
_FULL_NAME = re.compile(r"^(?:(down|up)\.(0|[1-9][0-9]*)|(mid))\.((?:res|attn)\.(?:0|[1-9][0-9]*))$")


@dataclass(frozen=True)
class StageConfig:
    """One resolution stage: output width, ordered block ids, and a resample after the blocks."""

    channels: int
    blocks: tuple[str, ...]  # ordered ids, e.g. ("res.0", "attn.0", "res.1", "attn.1")
    resample: bool  # down: stride-2 Downsample after the blocks; up: Upsample after; mid: must be False


@dataclass(frozen=True, kw_only=True)
class UNetConfig:
    """The whole UNet; ``up`` is listed low resolution first (SD order). Validated on construction."""

    in_channels: int = 4
    out_channels: int = 4
    down: tuple[StageConfig, ...]
    mid: StageConfig | None
    up: tuple[StageConfig, ...]
    context_dim: int = 768  # width of the text-encoder states (CLIP ViT-L/14: 768)
    attention_heads: int = 8  # heads of every attn block (SD-v1.5: 8 at every width)
    attention_head_dim: int | None = None  # if set, heads = width // head_dim instead (SD-v2 style)
    transformer_depth: int = 1  # BasicTransformerBlocks per attn block
    linear_projection: bool = False  # proj_in/proj_out as Linear (SD-v2) instead of 1x1 conv (SD-v1.5)
    norm_groups: int = 32
    time_embed_dim: int | None = None  # None -> 4 * down[0].channels
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"  # metadata for the schedule wrapper
    guidance_embed: bool = False  # add an embedding of the guidance scale to the timestep's (one call per step)

    def __post_init__(self):
        plan_blocks(self)

    def heads(self, width: int) -> int:
        """Number of attention heads for an attn block of ``width`` channels."""
        return width // self.attention_head_dim if self.attention_head_dim else self.attention_heads

    @property
    def temb_dim(self) -> int:
        return self.time_embed_dim or 4 * self.down[0].channels


@dataclass(frozen=True)
class BlockPlan:
    """Build-time facts of one block, from simulating the skip stack (see ``plan_blocks``)."""

    name: str
    kind: Literal["res", "attn"]
    in_channels: int  # input width including a concatenated skip
    out_channels: int
    pop_skip: bool  # up-path res block that concatenates the top of the skip stack before running
    push_after: bool  # down-path block after which the hidden state is pushed on the skip stack


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _n_res(stage: StageConfig) -> int:
    return sum(b.startswith("res.") for b in stage.blocks)


def _check_stage(where: str, stage: StageConfig) -> None:
    _check(isinstance(stage.channels, int) and stage.channels > 0, f"{where}: channels must be > 0")
    for bid in stage.blocks:
        _check(isinstance(bid, str) and bool(_BLOCK_ID.match(bid)),
               f"{where}: malformed block id {bid!r} (expected 'res.N' or 'attn.N')")
    dup = sorted({b for b in stage.blocks if stage.blocks.count(b) > 1})
    _check(not dup, f"{where}: duplicated block id(s) {dup}")


def _check_width(cfg: UNetConfig, name: str, width: int, attn: bool) -> None:
    _check(width % cfg.norm_groups == 0, f"{name}: width {width} not divisible by norm_groups {cfg.norm_groups}")
    if attn:
        heads = cfg.heads(width)
        _check(heads > 0 and width % heads == 0, f"{name}: width {width} does not split into {heads} heads")


def plan_blocks(cfg: UNetConfig) -> dict[str, BlockPlan]:
    """Simulate SD's skip stack; return every block's plan in execution order, or raise ``ConfigError``.

    Down path pushes the conv_in output, the hidden state after each res block plus the attn blocks that follow
    it (one SD "layer"), and each Downsample output. Up stage k pops ``n_res(down[n-1-k]) + 1`` skips (LIFO), one
    into each of its first that-many res blocks. SD-v1.5: 1 + 8 + 3 = 12 pushes, 3 x 4 pops.
    """
    _check(len(cfg.down) > 0, "UNet config: needs at least one down stage")
    _check(len(cfg.up) == len(cfg.down), f"UNet config: {len(cfg.up)} up stages for {len(cfg.down)} down stages")
    _check(cfg.mid is None or not cfg.mid.resample, "mid: resample must be False")
    _check(cfg.transformer_depth >= 1, "transformer_depth must be >= 1")
    stages = [(f"down.{i}", s) for i, s in enumerate(cfg.down)] + ([("mid", cfg.mid)] if cfg.mid else [])
    stages += [(f"up.{i}", s) for i, s in enumerate(cfg.up)]
    for where, stage in stages:
        _check_stage(where, stage)
    plans: dict[str, BlockPlan] = {}
    width, level = cfg.down[0].channels, 0
    stack = [(width, level)]  # (channels, resolution level) of each pushed skip
    for where, stage in stages:
        kind_of = [b.split(".")[0] for b in stage.blocks]
        n_pop = 0
        if where.startswith("up."):
            mirror = cfg.down[len(cfg.down) - 1 - int(where.split(".")[1])]
            n_pop = _n_res(mirror) + 1
            _check(_n_res(stage) >= n_pop, f"{where}: has {_n_res(stage)} res block(s) but must take {n_pop} skip "
                   f"connections (res blocks of the mirrored down stage + 1)")
        seen_res = False
        for j, (bid, kind) in enumerate(zip(stage.blocks, kind_of)):
            name = f"{where}.{bid}"
            pop = kind == "res" and n_pop > 0
            in_ch = width
            if pop:
                skip_ch, skip_level = stack.pop()
                _check(skip_level == level, f"{name}: skip connection comes from resolution level {skip_level}, "
                       f"block runs at level {level} (Downsample/Upsample counts do not mirror)")
                in_ch, n_pop = width + skip_ch, n_pop - 1
            out_ch = stage.channels if kind == "res" else width
            _check_width(cfg, name, in_ch, kind == "attn")
            _check_width(cfg, name, out_ch, kind == "attn")
            seen_res = seen_res or kind == "res"
            last_of_layer = j + 1 == len(stage.blocks) or kind_of[j + 1] == "res"
            push = where.startswith("down.") and seen_res and last_of_layer
            plans[name] = BlockPlan(name, kind, in_ch, out_ch, pop, push)
            width = out_ch
            if push:
                stack.append((width, level))
        _check(width == stage.channels, f"{where}: ends at width {width} but channels is {stage.channels} "
               f"(a stage that changes width needs a res block)")
        if stage.resample and where.startswith("down."):
            level += 1
            stack.append((width, level))
        elif stage.resample:
            level -= 1
    _check(not stack and level == 0, f"UNet config: {len(stack)} skip connection(s) left unused and resolution "
           f"level {level} at the output (Downsample/Upsample counts do not mirror)")
    return plans


# ----------------------------------------------------------------------------------------------------------------
# Presets

def _sd_stage(channels: int, n_res: int, attn: bool, resample: bool) -> StageConfig:
    ids = [x for j in range(n_res) for x in ((f"res.{j}", f"attn.{j}") if attn else (f"res.{j}",))]
    return StageConfig(channels, tuple(ids), resample)


def sd15(channels: tuple[int, int, int, int] = (320, 640, 1280, 1280), *, context_dim: int = 768,
         heads: int = 8, norm_groups: int = 32) -> UNetConfig:
    """SD-v1.5 UNet (859,520,964 parameters at the default widths)."""
    c0, c1, c2, c3 = channels
    down = (_sd_stage(c0, 2, True, True), _sd_stage(c1, 2, True, True), _sd_stage(c2, 2, True, True),
            _sd_stage(c3, 2, False, False))
    mid = StageConfig(c3, ("res.0", "attn.0", "res.1"), False)
    up = (_sd_stage(c3, 3, False, True), _sd_stage(c2, 3, True, True), _sd_stage(c1, 3, True, True),
          _sd_stage(c0, 3, True, False))
    return UNetConfig(down=down, mid=mid, up=up, context_dim=context_dim, attention_heads=heads,
                      norm_groups=norm_groups)


def snapfusion(channels: tuple[int, int, int, int] = (320, 640, 1280, 1280), *, context_dim: int = 768,
               heads: int = 8, norm_groups: int = 32) -> UNetConfig:
    """SnapFusion Table 3 as printed; 8x8 split and in-stage order are our choice (docs/unet.md)."""
    c0, c1, c2, c3 = channels
    down = (
        StageConfig(c0, ("res.0", "res.1"), True),  # Down-1: 0 CA, 2 RN
        StageConfig(c1, ("res.0", "attn.0", "res.1", "attn.1"), True),  # Down-2: 2 CA, 2 RN
        StageConfig(c2, ("res.0", "attn.0", "attn.1"), True),  # Down-3: 2 CA, 1 RN
        StageConfig(c3, ("res.0",), False),  # 8x8: 1 RN
    )
    mid = StageConfig(c3, ("res.0", "attn.0"), False)  # 8x8: 1 RN, 1 CA
    up = (
        StageConfig(c3, ("res.0", "res.1"), True),  # 8x8: 2 RN (the skip rule needs >= 2)
        StageConfig(c2, ("res.0", "attn.0", "attn.1", "attn.2", "res.1", "attn.3", "attn.4", "attn.5"), True),
        StageConfig(c1, ("res.0", "attn.0", "res.1", "attn.1", "res.2", "attn.2"), True),  # Up-2: 3 CA, 3 RN
        StageConfig(c0, ("res.0", "res.1", "res.2"), False),  # Up-3: 0 CA, 3 RN
    )
    return UNetConfig(down=down, mid=mid, up=up, context_dim=context_dim, attention_heads=heads,
                      norm_groups=norm_groups)


def tiny_sd15() -> UNetConfig:
    """SD-v1.5 block structure at test size (widths 32/64/64/64, 8 groups, context 32, 2 heads)."""
    return sd15((32, 64, 64, 64), context_dim=32, heads=2, norm_groups=8)


def tiny_snapfusion() -> UNetConfig:
    """SnapFusion block structure at test size."""
    return snapfusion((32, 64, 64, 64), context_dim=32, heads=2, norm_groups=8)


# ----------------------------------------------------------------------------------------------------------------
# Evolution edits (SnapFusion Alg. 1): pure functions returning new, validated configs

def block_names(cfg: UNetConfig) -> tuple[str, ...]:
    """Full names of every res/attn block, in execution order."""
    return tuple(plan_blocks(cfg))


def parse_name(name: str) -> tuple[str, int | None, str]:
    """``'down.1.attn.0'`` -> ``('down', 1, 'attn.0')``; ``'mid.res.1'`` -> ``('mid', None, 'res.1')``."""
    m = _FULL_NAME.match(name) if isinstance(name, str) else None
    if not m:
        raise ConfigError(f"malformed block name {name!r} (expected e.g. 'down.1.res.0', 'mid.attn.0')")
    if m.group(3):
        return "mid", None, m.group(4)
    return m.group(1), int(m.group(2)), m.group(4)


def _stage_of(cfg: UNetConfig, name: str) -> tuple[str, int | None, str, StageConfig]:
    path, i, bid = parse_name(name)
    stages = {"down": cfg.down, "up": cfg.up}.get(path)
    stage = cfg.mid if path == "mid" else (stages[i] if stages is not None and i < len(stages) else None)
    if stage is None or bid not in stage.blocks:
        raise ConfigError(f"no block named {name!r} in this UNet config")
    return path, i, bid, stage


def _with_stage(cfg: UNetConfig, path: str, i: int | None, stage: StageConfig) -> UNetConfig:
    if path == "mid":
        return dataclasses.replace(cfg, mid=stage)
    stages = list(getattr(cfg, path))
    stages[i] = stage
    return dataclasses.replace(cfg, **{path: tuple(stages)})


def stage_widths(cfg: UNetConfig) -> tuple[int, ...]:
    """Output width of every stage in execution order (down, mid, up): the shapes of ``UNet.forward``'s features.
    Every valid config ends each stage at its ``channels`` (``plan_blocks``), whatever blocks it keeps."""
    return tuple(s.channels for s in (*cfg.down, *([cfg.mid] if cfg.mid else []), *cfg.up))


def remove_block(cfg: UNetConfig, name: str) -> UNetConfig:
    """Config without block ``name``; ``ConfigError`` if the result is not a valid UNet."""
    path, i, bid, stage = _stage_of(cfg, name)
    blocks = tuple(b for b in stage.blocks if b != bid)
    return _with_stage(cfg, path, i, dataclasses.replace(stage, blocks=blocks))


def copy_block(cfg: UNetConfig, name: str) -> tuple[UNetConfig, str]:
    """Config with a copy of ``name`` right after it, under the next free index of its kind; returns the new name."""
    path, i, bid, stage = _stage_of(cfg, name)
    kind = bid.split(".")[0]
    new_id = f"{kind}.{1 + max(int(b.split('.')[1]) for b in stage.blocks if b.startswith(kind + '.'))}"
    at = stage.blocks.index(bid) + 1
    blocks = stage.blocks[:at] + (new_id,) + stage.blocks[at:]
    new_name = name[: -len(bid)] + new_id
    return _with_stage(cfg, path, i, dataclasses.replace(stage, blocks=blocks)), new_name
