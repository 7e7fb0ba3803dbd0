"""A fixed-rule baseline to compare evolution with: BK-SDM-style block removal (Kim et al. 2023, "BK-SDM").

BK-SDM removes one (res, attn) layer from every down stage that has two, the matching one from every up stage
(keeping the skip rule valid: an up stage takes n_res(down) + 1 skips), and optionally the mid stage's blocks.
Here: the last layer of each down stage, the middle layer of each up stage; no search, no latency table.
"""

from __future__ import annotations

from snapfusion.models.unet_config import StageConfig, UNetConfig, remove_block


def _layers(stage: StageConfig) -> list[list[str]]:
    """A stage's blocks grouped into SD layers: a res block and the attn blocks after it."""
    layers: list[list[str]] = []
    for bid in stage.blocks:
        if bid.startswith("res.") or not layers:
            layers.append([bid])
        else:
            layers[-1].append(bid)
    return layers


def bk_sdm(cfg: UNetConfig, *, drop_mid: bool = False) -> tuple[UNetConfig, list[str]]:
    """The BK-SDM-style config and the removed block names (one layer per stage with two or more layers)."""
    removed: list[str] = []
    for i, stage in enumerate(cfg.down):
        if len(_layers(stage)) >= 2:
            removed += [f"down.{i}.{b}" for b in _layers(stage)[-1]]
    for i, stage in enumerate(cfg.up):
        layers = _layers(stage)
        if len(layers) >= 3:
            removed += [f"up.{i}.{b}" for b in layers[len(layers) // 2]]
    if drop_mid and cfg.mid is not None:
        removed += [f"mid.{b}" for b in cfg.mid.blocks[1:]]  # BK-SDM-Base: the mid block goes (keep one res)
    # down blocks first: removing a down layer lowers the mirrored up stage's skip count, then its layer can go
    for name in removed:
        cfg = remove_block(cfg, name)
    return cfg, removed
