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


# ---- architecture presets (random weights in `snapfusion bench --preset`): (text encoder, UNet, decoder) --------

def architecture(name: str) -> tuple[TextEncoderConfig, UNetConfig, AutoencoderConfig]:
    """The (text encoder, UNet, decoder) configs of a named architecture: one of ``ARCHITECTURES``."""
    from snapfusion.errors import ConfigError
    from snapfusion.models import unet_config

    sd_ae = AutoencoderConfig.sd15()
    sd_text = TextEncoderConfig.sd15()
    table = {
        "sd15": lambda: (sd_text, unet_config.sd15(), sd_ae),
        "snapfusion": lambda: (sd_text, unet_config.snapfusion(), sd_ae.with_halved_decoder()),
        # the SnapFusion UNet with a guidance-scale embedding: one batch-1 call per guided step
        "snapfusion-guidance": lambda: (sd_text, dataclasses.replace(unet_config.snapfusion(), guidance_embed=True),
                                        sd_ae.with_halved_decoder()),
        "base": lambda: (base_text_encoder(), base_unet(), base_autoencoder()),
        "base-snapfusion": lambda: (base_text_encoder(),
                                    dataclasses.replace(unet_config.snapfusion((64, 128, 192, 192), context_dim=128,
                                                                               norm_groups=16),
                                                        attention_head_dim=32),
                                    base_autoencoder().with_halved_decoder()),
        "tiny": lambda: (TextEncoderConfig.tiny(), dataclasses.replace(unet_config.tiny_sd15(), context_dim=32),
                         AutoencoderConfig.tiny()),
        "tiny-snapfusion": lambda: (TextEncoderConfig.tiny(), dataclasses.replace(unet_config.tiny_snapfusion(),
                                                                                  context_dim=32),
                                    AutoencoderConfig.tiny()),
        "tiny-guidance": lambda: (TextEncoderConfig.tiny(),
                                  dataclasses.replace(unet_config.tiny_snapfusion(), guidance_embed=True),
                                  AutoencoderConfig.tiny()),
    }
    name = ALIASES.get(name, name)
    if name not in table:
        raise ConfigError(f"preset {name!r} is not one of {list(ARCHITECTURES)}")
    return table[name]()


ARCHITECTURES = ("sd15", "snapfusion", "snapfusion-guidance", "base", "base-snapfusion", "tiny", "tiny-snapfusion",
                 "tiny-guidance")
ALIASES = {"tiny_sd15": "tiny", "tiny_snapfusion": "tiny-snapfusion"}  # the names bench-blocks took before
