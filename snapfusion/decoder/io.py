"""Load and save any image decoder by the kind in its config.json, and put one into a pipeline."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from snapfusion.config import load_json
from snapfusion.errors import WeightsError
from snapfusion.models.autoencoder import AutoencoderKL, Decoder, load_autoencoder, save_autoencoder
from snapfusion.decoder.tiny import KIND as TINY_KIND, TinyDecoder, load_tiny_decoder, save_tiny_decoder
from snapfusion.folders import INDEX, part_folder

AnyDecoder = Decoder | TinyDecoder


def load_decoder(folder: str | os.PathLike, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> AnyDecoder:
    """A decoder from a pipeline folder (its vae_decoder/), a whole-VAE, decoder or tiny-decoder folder."""
    folder = Path(folder)
    if (folder / INDEX).is_file() and load_json(folder / INDEX).get("kind") == "pipeline":
        folder = part_folder(folder, "vae_decoder")
    kind = load_json(folder / "config.json").get("kind")
    if kind == TINY_KIND:
        return load_tiny_decoder(folder, device=device, dtype=dtype)
    if kind == "vae-decoder":
        return load_autoencoder(folder, Decoder, device=device, dtype=dtype)
    if kind == "vae":
        return load_autoencoder(folder, AutoencoderKL, device=device, dtype=dtype).decoder
    raise WeightsError(f"{folder / 'config.json'}: kind {kind!r} is not a decoder (vae, vae-decoder, {TINY_KIND})")


def save_decoder(folder: str | os.PathLike, decoder: nn.Module, *, dtype: torch.dtype | None = None) -> None:
    """Save a ``Decoder`` (kind vae-decoder) or a ``TinyDecoder`` (kind tiny-decoder)."""
    decoder = getattr(decoder, "module", decoder)  # never a DDP-wrapped state dict
    if isinstance(decoder, TinyDecoder):
        save_tiny_decoder(folder, decoder, dtype=dtype)
    elif isinstance(decoder, Decoder):
        save_autoencoder(folder, decoder, dtype=dtype)
    else:
        raise TypeError(f"not a decoder: {type(decoder).__name__}")


def with_decoder(pipe, decoder: nn.Module):
    """The same ``Pipeline`` (shared text encoder and UNet) decoding with ``decoder``."""
    if decoder.config.scaling_factor != pipe.decoder.config.scaling_factor:
        raise WeightsError(f"decoder scaling factor {decoder.config.scaling_factor} != the pipeline's "
                           f"{pipe.decoder.config.scaling_factor}: it was distilled for another latent space")
    return type(pipe)(pipe.text_encoder, pipe.unet, decoder, pipe.config, tokenizer=pipe.tokenizer,
                      encoder=pipe.encoder, prior=pipe.prior)
