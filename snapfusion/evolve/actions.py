"""Evolution actions (SnapFusion Alg. 1): remove a named block, or add a copy of one; scoring and applying them.

A candidate is scored on the current weights, without training: a removal runs the UNet with ``skip={name}``
(what robust training prepares it for), an addition runs a new UNet whose copy starts from its source's weights.
Applying an action builds the edited config and inherits every tensor it can; a tensor whose shape changed
(a res block that now concatenates a different skip) keeps the overlapping slice and zeros elsewhere, which is
the block reading zeros where the old skip channels were (``transplant``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Sequence

import torch

from snapfusion.errors import ConfigError
from snapfusion.models.unet import UNet, inherit_weights
from snapfusion.models.unet_config import UNetConfig, block_names, copy_block, remove_block

Scorer = Callable[[torch.Tensor, list[str]], torch.Tensor]  # (images (N, 3, H, W) in [0, 1], prompts) -> (N,)


@dataclass(frozen=True)
class Action:
    """One edit: ``remove`` a block, or ``add`` a copy of ``block`` (named ``new_block`` in the result)."""

    op: Literal["remove", "add"]
    block: str
    new_block: str | None = None


@dataclass(frozen=True)
class EvalConfig:
    """How ΔCLIP of a candidate is measured (SnapFusion: 2K COCO prompts, 50 steps, CFG 7.5; ours is smaller)."""

    prompt_set: str = "test200"   # snapfusion/assets/prompts/<name>.jsonl
    num_prompts: int = 32         # the first N records (fixed prompts and seeds)
    steps: int = 10               # DDIM steps during search (the final comparison uses 50)
    guidance: float = 7.5
    size: int = 512               # image side in pixels
    batch: int = 16               # images per generate call


def apply_action(cfg: UNetConfig, action: Action) -> tuple[UNetConfig, Action]:
    """The edited config and the action with ``new_block`` filled in; ``ConfigError`` if the edit is invalid."""
    if action.op == "remove":
        return remove_block(cfg, action.block), action
    if action.op == "add":
        new_cfg, new_name = copy_block(cfg, action.block)
        return new_cfg, Action("add", action.block, new_name)
    raise ConfigError(f"unknown action op {action.op!r} (expected 'remove' or 'add')")


def transplant(model: UNet, old_state: Mapping[str, torch.Tensor], sources: Mapping[str, str] | None = None
               ) -> tuple[list[str], list[str]]:
    """``inherit_weights``, then overlapping-slice copies for tensors whose shape changed; returns (sliced, fresh)."""
    left = inherit_weights(model, old_state, sources=sources)
    sliced, fresh = [], []
    state = model.state_dict()
    with torch.no_grad():
        for key in left:
            old, new = old_state.get(key), state[key]
            if old is None or old.ndim != new.ndim:
                fresh.append(key)
                continue
            new.zero_()
            region = tuple(slice(0, min(a, b)) for a, b in zip(old.shape, new.shape))
            new[region] = old[region].to(new.dtype)
            sliced.append(key)
    return sliced, fresh


def candidates(cfg: UNetConfig, op: Literal["remove", "add"], state: Mapping[str, torch.Tensor]) -> list[Action]:
    """Every valid action of kind ``op``; an addition must leave every other tensor inheritable unchanged."""
    out = []
    for name in block_names(cfg):
        try:
            new_cfg, action = apply_action(cfg, Action(op, name))
        except ConfigError:
            continue
        if op == "add":
            with torch.device("meta"):
                probe = UNet(new_cfg)
            shapes = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
            src = {k.replace(action.new_block + ".", action.block + ".", 1) if k.startswith(action.new_block + ".")
                   else k: s for k, s in shapes.items()}
            if any(k not in state or tuple(state[k].shape) != s for k, s in src.items()):
                continue
        out.append(action)
    return out


def edited_unet(unet: UNet, action: Action) -> tuple[UNet, list[str], list[str]]:
    """A new UNet with ``action`` applied and the weights carried over; also (sliced, fresh) keys."""
    new_cfg, action = apply_action(unet.config, action)
    p = next(unet.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"{action.op} {action.block}".encode()))  # fresh tensors: same on every run
        model = UNet(new_cfg)
    model = model.to(device=p.device, dtype=p.dtype).eval().requires_grad_(False)
    sources = {action.new_block: action.block} if action.op == "add" else None
    sliced, fresh = transplant(model, unet.state_dict(), sources)
    return model, sliced, fresh


@torch.no_grad()
def score(pipe, records: Sequence[dict], scorer: Scorer, ev: EvalConfig, *, unet: UNet | None = None,
          skip: set[str] | None = None) -> float:
    """Mean score of images generated for ``records`` (prompt, seed) with ``unet`` (default: the pipeline's)."""
    old = pipe.unet
    pipe.unet = unet if unet is not None else old
    try:
        scores = []
        for i in range(0, len(records), ev.batch):
            chunk = records[i: i + ev.batch]
            prompts = [r["prompt"] for r in chunk]
            images = pipe.generate(prompts, [r["seed"] for r in chunk], steps=ev.steps, guidance=ev.guidance,
                                   height=ev.size, width=ev.size, skip=skip or None)
            scores.append(scorer(images, prompts).float().cpu())
    finally:
        pipe.unet = old
    return float(torch.cat(scores).mean())
