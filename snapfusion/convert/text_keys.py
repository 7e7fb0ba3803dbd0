"""CLIP text-encoder weight names: original LDM / SD single-file checkpoints -> ours.

Ours are the names of CLIPTextModel files (``text_model.encoder.layers.0.mlp.fc1.weight``). SD-v1.x single files
hold the same tensors under ``cond_stage_model.transformer.``; checkpoints saved with old transformers versions
lack the inner ``text_model.`` (``cond_stage_model.transformer.encoder.layers.0...``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from snapfusion.errors import WeightsError
from snapfusion.models.text import POSITION_IDS_KEY

LDM_PREFIX = "cond_stage_model.transformer."
_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")


def text_from_ldm(state: Mapping[str, torch.Tensor], *, source: str = "LDM checkpoint") -> dict[str, torch.Tensor]:
    """The text encoder of an SD-v1.x single-file checkpoint, in our names (``position_ids`` dropped)."""
    out = {}
    for key, value in state.items():
        if not key.startswith(LDM_PREFIX):
            continue  # UNet, VAE and other parts of the checkpoint
        name = key[len(LDM_PREFIX):]
        if name.startswith(_PARTS):
            name = "text_model." + name
        if not name.startswith(tuple("text_model." + p for p in _PARTS)):
            raise WeightsError(f"{source}: unknown text-encoder key '{key}'")
        if name != POSITION_IDS_KEY:
            out[name] = value
    if not out:
        raise WeightsError(f"{source}: no text-encoder keys (expected the prefix '{LDM_PREFIX}')")
    return out


def text_to_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our text-encoder state dict -> SD-v1.x single-file names."""
    return {LDM_PREFIX + k: v for k, v in state.items()}


def load_ldm_text_encoder(path, config=None, *, device: str | torch.device = "cpu"):
    """The text encoder of an SD-v1.x single-file ``.safetensors`` checkpoint (config defaults to SD-v1.5's)."""
    from snapfusion.models.text import TextEncoder, TextEncoderConfig
    from snapfusion.weights import load_into, load_safetensors

    model = TextEncoder(config or TextEncoderConfig.sd15())
    load_into(model, text_from_ldm(load_safetensors(path), source=str(path)), source=str(path))
    return model.to(device)
