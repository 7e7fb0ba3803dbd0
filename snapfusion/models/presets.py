"""Configs of the project's own base (teacher) model: SD-v1.5's design scaled down for the scene domain."""

from __future__ import annotations

import dataclasses

from snapfusion.models.autoencoder import AutoencoderConfig
from snapfusion.models.text import TextEncoderConfig
from snapfusion.models.unet_config import UNetConfig, sd15


def base_text_encoder() -> TextEncoderConfig:
    """CLIP text transformer, CLIP tokenizer, width 128, 4 layers (about 7M parameters, 6.3M of them embeddings)."""
    return TextEncoderConfig(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512, projection_dim=128)


def base_autoencoder() -> AutoencoderConfig:
    """KL-f8, 4 latent channels, SD's layout at a quarter of SD's widths; scaling factor set after training."""
    return AutoencoderConfig(encoder_widths=(32, 64, 128, 128), decoder_widths=(32, 64, 128, 128), norm_groups=16,
                             scaling_factor=1.0)


def base_unet() -> UNetConfig:
    """SD-v1.5's block structure (attention at 64/32/16 latent px, 2 res per down stage, 3 per up stage, mid block)
    at widths 64/128/192/192, head dim 32, context 128: about 22M parameters."""
    return dataclasses.replace(sd15((64, 128, 192, 192), context_dim=128, norm_groups=16), attention_head_dim=32)
