"""``snapfusion export --format single-file``: an SD-shaped pipeline as one original-LDM (CompVis) checkpoint.

Keys are those of SD-v1.x single files (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.transformer.*``), written through the explicit maps of snapfusion/convert/; the safetensors
metadata holds our configs under ``snapfusion`` so that ``snapfusion.sd15.load_single_file_sd`` rebuilds models of any
width. Other tools take the architecture from elsewhere: diffusers' ``from_single_file(path, config=FOLDER)`` from a
diffusers folder of the same model (``--format diffusers`` writes one). The layout prior has no place in the LDM
layout and is left out; the efficient UNet and a decoder narrower than its encoder cannot be expressed (one error line
naming them).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from snapfusion.config import to_dict
from snapfusion.convert.text_keys import text_to_ldm
from snapfusion.convert.unet_keys import _stage_layers, ours_to_ldm, sd_layout
from snapfusion.convert.vae_keys import vae_to_ldm
from snapfusion.errors import ConfigError
from snapfusion.models.autoencoder import Decoder, Encoder
from snapfusion.models.unet_config import UNetConfig
from snapfusion.weights import save_safetensors

METADATA_KEY = "snapfusion"  # safetensors metadata entry with our configs (JSON)


@dataclasses.dataclass(frozen=True)
class SingleFileExport:
    path: Path
    tensors: int
    prior_dropped: bool

    def summary(self) -> str:
        note = "; the layout prior is not part of the LDM layout (use --format diffusers to keep it)" \
            if self.prior_dropped else ""
        return f"wrote {self.path} (LDM single file, {self.tensors} tensors){note}"


def unet_ldm_problems(cfg: UNetConfig) -> list[str]:
    """Each stage of ``cfg`` that the LDM layout cannot hold, with its blocks (empty: SD-shaped)."""
    problems = []
    n = len(cfg.down)
    for path, stages in (("down", cfg.down), ("up", cfg.up)):
        for i, stage in enumerate(stages):
            try:
                layers, _ = _stage_layers(f"{path}.{i}", stage)
                if path == "up":
                    want = _stage_layers(f"down.{n - 1 - i}", cfg.down[n - 1 - i])[0] + 1
                    if layers != want:
                        raise ConfigError(f"needs {want} layers")
            except ConfigError:
                problems.append(f"{path}.{i} ({', '.join(stage.blocks) or 'no blocks'})")
    if cfg.mid is not None and [b.split(".")[0] for b in cfg.mid.blocks] != ["res", "attn", "res"]:
        problems.append(f"mid ({', '.join(cfg.mid.blocks)})")
    return problems


def _check_unet(cfg: UNetConfig) -> None:
    problems = unet_ldm_problems(cfg)
    if problems:
        raise ConfigError("export --format single-file: the LDM layout holds only SD's block pattern ((res, attn) x L "
                          "down, L + 1 up, mid res-attn-res); this UNet's stages " + "; ".join(problems) +
                          " differ (use --format diffusers)")
    sd_layout(cfg)  # widths and resampling: raises a one-line ConfigError of its own


def ldm_state(pipe) -> dict[str, torch.Tensor]:
    """The whole pipeline (UNet, KL autoencoder, text tower) in LDM single-file keys."""
    from snapfusion.export.diffusers_export import full_vocabulary

    _check_unet(pipe.unet.config)
    decoder, encoder = pipe.decoder, pipe.encoder
    if not isinstance(decoder, Decoder):
        raise ConfigError(f"export --format single-file: the {type(decoder).__name__} decoder has no LDM form")
    if not isinstance(encoder, Encoder):
        raise ConfigError("export --format single-file: the pipeline has no VAE encoder, which an LDM checkpoint holds")
    if encoder.config.encoder_widths != decoder.config.decoder_widths or \
            encoder.config.norm_groups != decoder.config.norm_groups:
        raise ConfigError(f"export --format single-file: the decoder (widths {list(decoder.config.decoder_widths)}) "
                          f"is narrower than the encoder ({list(encoder.config.encoder_widths)}); the LDM layout has "
                          "one width for both (use --format diffusers)")
    vae = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    vae.update({f"decoder.{k}": v for k, v in decoder.state_dict().items()})
    return {**ours_to_ldm(pipe.unet.state_dict(), pipe.unet.config), **vae_to_ldm(vae),
            **text_to_ldm(full_vocabulary(pipe.text_encoder).state_dict())}


def export_single_file(pipe, out: str | Path, *, dtype: torch.dtype | None = None) -> SingleFileExport:
    """Write ``pipe`` as one LDM-layout ``.safetensors`` at ``out`` (a folder gets ``<name>.safetensors``)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        out = out / f"{pipe.config.name}.safetensors"
    state = ldm_state(pipe)
    text_cfg = dataclasses.replace(pipe.text_encoder.config, vocab_rows=0)
    configs = {"unet": to_dict(pipe.unet.config), "vae": to_dict(dataclasses.replace(
        pipe.decoder.config, encoder_widths=pipe.encoder.config.encoder_widths)),
        "text_encoder": to_dict(text_cfg), "pipeline": to_dict(pipe.config)}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, out, dtype=dtype, max_shard_bytes=None,
                     metadata={"format": "pt", METADATA_KEY: json.dumps(configs)})
    return SingleFileExport(out, len(state), pipe.prior is not None)
