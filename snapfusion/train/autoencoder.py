"""The autoencoder stage (SD's KL-f8 recipe: L1 + MSE + edge + tiny KL on random crops) as a ``Task`` of the one
loop: its images from train/data.py, its loss terms from losses.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from snapfusion.config import to_dict
from snapfusion.data import SceneConfig, SceneDataset
from snapfusion.errors import ConfigError
from snapfusion.losses import kl_per_sample, sobel_l1
from snapfusion.models.autoencoder import (AutoencoderConfig, AutoencoderKL, Decoder, Encoder, load_autoencoder,
                                           save_autoencoder)
from snapfusion.train.data import (STREAM_LENGTH, FolderStream, check_data_folder, collate_images, crop_items,
                                   images_to_unit, training_images)
from snapfusion.train.state import load_weights_into, unwrap


@dataclass(frozen=True)
class AutoencoderTaskConfig:
    model: AutoencoderConfig = field(default_factory=lambda: AutoencoderConfig(
        encoder_widths=(32, 64, 128, 128), decoder_widths=(32, 64, 128, 128), norm_groups=16, scaling_factor=1.0))
    image_size: int = 512         # render size; training uses random crops of ``crop``
    crop: int = 256
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    edge_weight: float = 0.5
    kl_weight: float = 1e-6       # SD's KL-f8 uses a tiny KL term: latents stay close to a unit Gaussian
    data: SceneConfig = field(default_factory=SceneConfig)
    seed: int = 0
    init: str | None = None       # start from this autoencoder: a "vae" folder or a pipeline (vae_encoder/ +
                                  # vae_decoder/)
    decoder_only: bool = False    # freeze the encoder (needs init): the latent space, and every UNet trained on it,
                                  # stay valid; SD's ft-MSE decoder was trained the same way
    data_folder: str | None = None  # your own images (images + metadata.jsonl) instead of the scenes; None: scenes


def load_initial_autoencoder(folder: str | Path) -> AutoencoderKL:
    """A whole autoencoder from a "vae" folder, or from a pipeline's encoder and decoder (the pipeline's ``parts``
    honoured), to continue training."""
    from snapfusion.config import load_json
    from snapfusion.pipeline import INDEX, part_folder

    folder = Path(folder)
    if (folder / INDEX).is_file():
        enc_dir, dec_dir = part_folder(folder, "vae_encoder"), part_folder(folder, "vae_decoder")
        for part in (enc_dir, dec_dir):
            if not (part / "config.json").is_file():
                raise ConfigError(f"{folder}: no {part.name}/config.json (a pipeline shipped without its encoder "
                                  f"cannot be the start of autoencoder training)")
        encoder, decoder = load_autoencoder(enc_dir, Encoder), load_autoencoder(dec_dir, Decoder)
        if encoder.config.scaling_factor != decoder.config.scaling_factor:
            raise ConfigError(f"{folder}: the encoder's scaling factor {encoder.config.scaling_factor} differs from "
                              f"the decoder's {decoder.config.scaling_factor}")
        config = dataclasses.replace(encoder.config, decoder_widths=decoder.config.decoder_widths)
        if dataclasses.replace(decoder.config, encoder_widths=encoder.config.encoder_widths) != config:
            raise ConfigError(f"{folder}: the encoder's and decoder's configs differ beyond the decoder widths; "
                              "they are not one autoencoder")
        model = AutoencoderKL(config)
        model.encoder.load_state_dict(encoder.state_dict())
        model.decoder.load_state_dict(decoder.state_dict())
        return model
    if not (folder / "config.json").is_file():
        raise ConfigError(f"--init {folder}: neither a pipeline ({INDEX}) nor an autoencoder (config.json)")
    kind = load_json(folder / "config.json").get("kind")
    if kind != "vae":
        raise ConfigError(f"--init {folder}: kind {kind!r}, need a whole autoencoder (vae) or a pipeline")
    return load_autoencoder(folder, AutoencoderKL)


class AutoencoderTask:
    name = "autoencoder"

    def __init__(self, cfg: AutoencoderTaskConfig):
        check_data_folder(cfg.data_folder, cfg.image_size)
        self.cfg = cfg

    def describe(self) -> dict:
        d = to_dict(self.cfg)
        if self.cfg.init:  # the architecture and scaling factor are the init's, not the default config's
            d.pop("model")
        return d

    def build(self) -> nn.Module:
        if self.cfg.init is None:
            if self.cfg.decoder_only:
                raise ConfigError("decoder-only training needs a trained autoencoder to start from (--init)")
            return AutoencoderKL(self.cfg.model)
        model = load_initial_autoencoder(self.cfg.init)
        if self.cfg.decoder_only:
            model.encoder.requires_grad_(False)
        return model

    def dataset(self):
        c = self.cfg
        return training_images(c.data_folder, c.image_size, c.seed, STREAM_LENGTH, c.data)

    def collate(self, items):
        return collate_images(self.cfg.data_folder)(crop_items(items, self.cfg.crop))

    def loss(self, model, batch, generator):
        c = self.cfg
        x = images_to_unit(batch["image"], generator.device)
        with torch.set_grad_enabled(not c.decoder_only and torch.is_grad_enabled()):
            posterior = unwrap(model).encode(x)
        recon = unwrap(model).decode(posterior.sample(generator))
        recon, x = recon.float(), x.float()
        l1 = (recon - x).abs().flatten(1).mean(1)
        mse = (recon - x).pow(2).flatten(1).mean(1)
        edge = sobel_l1(recon, x)
        kl = kl_per_sample(posterior.mean.float(), posterior.logvar.float())
        total = c.l1_weight * l1 + c.mse_weight * mse + c.edge_weight * edge + c.kl_weight * kl
        psnr = 10 * torch.log10(4.0 / mse.mean().clamp(min=1e-10))  # images span [-1, 1]: peak-to-peak 2
        return total, {"l1": l1.mean().detach(), "kl": kl.mean().detach(), "psnr": psnr.detach()}

    def save(self, model, folder: Path) -> None:
        save_autoencoder(folder, unwrap(model))

    def load(self, model, folder: Path) -> None:
        load_weights_into(model, folder)

    @torch.no_grad()
    def sample_grid(self, model, path: Path) -> None:
        from snapfusion.pipeline import image_grid, to_pil

        model = unwrap(model)
        device = next(model.parameters()).device
        x = images_to_unit(test_images(self.cfg, 4), device)
        recon = model.decode(model.encode(x).mode()).float()
        pics = to_pil(torch.cat([x, recon]).add(1).div(2))
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(pics, cols=4).save(path)


@torch.no_grad()
def latent_scaling_factor(encoder: Encoder, images: torch.Tensor) -> float:
    """1 / std of the raw latents of ``images`` in [-1, 1] (how SD's 0.18215 was chosen)."""
    raw = encoder.encode(images).mode().float()
    return float(1.0 / raw.std())


def test_images(cfg: AutoencoderTaskConfig, count: int, seed: int = 123) -> torch.Tensor:
    """uint8 (count, 3, S, S) held-out images for sample grids and the scaling factor: test-split scenes, or the first
    ``count`` images of the folder (cycled) when training on one."""
    if cfg.data_folder:
        ds = FolderStream(cfg.data_folder, cfg.image_size, count)
    else:
        ds = SceneDataset("test", cfg.image_size, seed, max(count, 8), cfg.data)
    return torch.stack([ds[i]["image"] for i in range(count)])
