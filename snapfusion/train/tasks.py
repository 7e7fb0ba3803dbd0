"""Training stages of the base model, each a ``Task`` for the one loop: autoencoder, text tower, UNet.

Each task owns its model construction, data, per-sample loss and saving; the loop owns everything else.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from snapfusion.config import to_dict
from snapfusion.errors import ConfigError
from snapfusion.data import SceneConfig, SceneDataset, caption, collate_scenes, load_prompt_set, sample_scene
from snapfusion.models.autoencoder import (AutoencoderConfig, AutoencoderKL, Decoder, Encoder, load_autoencoder,
                                           save_autoencoder)
from snapfusion.models.text import (TextEncoder, TextEncoderConfig, Tokenizer, load_text_encoder, save_text_encoder,
                                   skip_layers)
from snapfusion.models.unet import UNet
from snapfusion.models.unet_config import UNetConfig, stage_widths
from snapfusion.sampling import Denoiser, PredictionType
from snapfusion.schedule import NoiseSchedule, ScheduleConfig
from snapfusion.weights import load_into, load_safetensors, resolve_weights, WEIGHTS_STEM

STREAM_LENGTH = 2**40  # the training stream is procedural: effectively endless


def images_to_unit(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1] on ``device``."""
    return images.to(device, non_blocking=True).float().div(127.5).sub(1.0)


def _crop(items: list[dict], crop: int | None) -> list[dict]:
    """Deterministic random crops (offset from the caption hash and image size) for autoencoder training."""
    if not crop:
        return items
    out = []
    for it in items:
        img = it["image"]
        h, w = img.shape[1:]
        rng = np.random.default_rng([zlib.crc32(it["caption"].encode()), h])
        y, x = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
        out.append({**it, "image": img[:, y:y + crop, x:x + crop]})
    return out


# ---- losses: small callables returning per-sample values (STYLE habit 6) ------------------------------------

def sobel_l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample L1 between image gradients (edges stay sharp without a perceptual network)."""
    k = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=x.device, dtype=x.dtype)
    kernels = torch.stack([k, k.t()])[:, None].repeat(x.shape[1], 1, 1, 1)  # (2C, 1, 3, 3)
    gx = F.conv2d(x, kernels, groups=x.shape[1])
    gy = F.conv2d(y, kernels, groups=y.shape[1])
    return (gx - gy).abs().flatten(1).mean(1)


def kl_per_sample(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over latent elements, per sample."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP), per sample; a, b are L2-normalised (B, D)."""
    logits = logit_scale.exp().clamp(max=100) * a @ b.t()  # (B, B)
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target, reduction="none") +
                  F.cross_entropy(logits.t(), target, reduction="none"))


def eps_mse_min_snr(pred: torch.Tensor, eps: torch.Tensor, snr: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample eps MSE with Min-SNR-gamma weights min(SNR, gamma) / SNR (Hang et al. 2023); gamma 0 = plain."""
    mse = (pred.float() - eps.float()).pow(2).flatten(1).mean(1)
    if gamma <= 0:
        return mse
    return mse * torch.clamp(snr, max=gamma) / snr


def v_mse_min_snr(pred: torch.Tensor, v: torch.Tensor, snr: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample v MSE with Min-SNR-gamma weights min(SNR, gamma) / (SNR + 1): the same x-space weighting as
    ``eps_mse_min_snr``, since ||v_hat - v||^2 = (SNR + 1) ||x_hat - x||^2 (Hang et al. 2023); gamma 0 = plain."""
    mse = (pred.float() - v.float()).pow(2).flatten(1).mean(1)
    if gamma <= 0:
        return mse
    return mse * torch.clamp(snr, max=gamma) / (snr + 1)


def v_weights(alpha: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Per-sample weights 1 / alpha_t^2 = 1 + 1 / SNR_t, divided by their mean over the schedule's timesteps (21.3 on
    SD's): ``loss_weighting="v"``. On an eps MSE they give the plain v MSE (||v_hat - v||^2 = ||eps_hat - eps||^2 /
    alpha_t^2 for the v implied by an eps prediction), on a v MSE plain v MSE, at the loss's usual scale (gradient
    clipping stays as it was). Against Min-SNR eps weights the noisiest steps weigh up to ~10x more: an eps model's
    clean-latent estimate there is (z - sigma eps_hat) / alpha, its eps error times 1 / alpha = 15 at t = 999, and these
    steps choose the image's layout (docs/base_model.md, sessions 7 and 13)."""
    mean = (1.0 / schedule.alphas_cumprod.to(alpha.device)).mean()
    return 1.0 / (alpha.float() ** 2 * mean)


def hybrid_weights(alpha: torch.Tensor, schedule: NoiseSchedule, gamma: float) -> torch.Tensor:
    """Per-sample eps-error weights max(Min-SNR-gamma, v) / their mean over the schedule's timesteps:
    ``loss_weighting="hybrid"``. Each sample takes the larger of its Min-SNR weight min(SNR, gamma) / SNR and its v
    weight (``v_weights``, mean 1), so the noisiest steps keep most of the v weighting's emphasis (6.6 against 10.1 at
    t = 999 on SD's schedule) while the middle steps keep most of Min-SNR's (0.65 against 1.09 at t = 500; the v
    weighting gives them 0.17). Shares of the total weight on SD's schedule, t >= 800 / t < 500: Min-SNR 0.22 / 0.45,
    v 0.81 / 0.04, hybrid 0.53 / 0.27 (docs/base_model.md, session 16)."""
    def raw(a: torch.Tensor) -> torch.Tensor:
        a2 = a.double() ** 2
        snr = a2 / (1 - a2).clamp(min=1e-12)
        return torch.maximum(torch.clamp(snr, max=gamma) / snr, v_weights(a, schedule).double())
    mean = raw(schedule.alphas_cumprod.double().sqrt()).mean()
    return (raw(alpha) / mean).float()


LOSS_WEIGHTINGS = ("min-snr", "v", "hybrid")
TIMESTEP_BIASES = ("none", "later", "earlier", "range")


def timestep_bias_weights(cfg: "UNetTaskConfig", num_timesteps: int) -> torch.Tensor | None:
    """Sampling weights over the training timesteps for ``timestep_bias`` (diffusers' SDXL training script's
    --timestep_bias_strategy): "later" multiplies the weight of the last ``timestep_bias_portion`` of the timesteps
    (the noisiest) by ``timestep_bias_multiplier``, "earlier" the first portion, "range" the timesteps
    [timestep_bias_begin, timestep_bias_end); None for "none" (uniform t, drawn as before). The loss weighting is
    unchanged, so a biased run trains the chosen timesteps more often, not at a larger weight."""
    bias = cfg.timestep_bias
    if bias == "none":
        return None
    w = torch.ones(num_timesteps)
    if bias == "range":
        lo, hi = cfg.timestep_bias_begin, cfg.timestep_bias_end
    else:
        n = max(1, round(cfg.timestep_bias_portion * num_timesteps))
        lo, hi = (num_timesteps - n, num_timesteps) if bias == "later" else (0, n)
    w[lo:hi] *= cfg.timestep_bias_multiplier
    return w


# ---- the autoencoder -------------------------------------------------------------------------------------

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
    init: str | None = None       # start from this autoencoder: a "vae" folder or a pipeline (vae_encoder/ + vae_decoder/)
    decoder_only: bool = False    # freeze the encoder (needs init): the latent space, and every UNet trained on it,
                                  # stay valid; SD's ft-MSE decoder was trained the same way


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
        return SceneDataset("train", self.cfg.image_size, self.cfg.seed, STREAM_LENGTH, self.cfg.data)

    def collate(self, items):
        return collate_scenes(_crop(items, self.cfg.crop))

    def loss(self, model, batch, generator):
        c = self.cfg
        x = images_to_unit(batch["image"], generator.device)
        with torch.set_grad_enabled(not c.decoder_only and torch.is_grad_enabled()):
            posterior = _unwrap(model).encode(x)
        recon = _unwrap(model).decode(posterior.sample(generator))
        recon, x = recon.float(), x.float()
        l1 = (recon - x).abs().flatten(1).mean(1)
        mse = (recon - x).pow(2).flatten(1).mean(1)
        edge = sobel_l1(recon, x)
        kl = kl_per_sample(posterior.mean.float(), posterior.logvar.float())
        total = c.l1_weight * l1 + c.mse_weight * mse + c.edge_weight * edge + c.kl_weight * kl
        psnr = 10 * torch.log10(4.0 / mse.mean().clamp(min=1e-10))  # images span [-1, 1]: peak-to-peak 2
        return total, {"l1": l1.mean().detach(), "kl": kl.mean().detach(), "psnr": psnr.detach()}

    def save(self, model, folder: Path) -> None:
        save_autoencoder(folder, _unwrap(model))

    def load(self, model, folder: Path) -> None:
        load_into(_unwrap(model), load_safetensors(resolve_weights(folder, WEIGHTS_STEM)), source=str(folder))

    @torch.no_grad()
    def sample_grid(self, model, path: Path) -> None:
        from snapfusion.pipeline import image_grid, to_pil

        model = _unwrap(model)
        device = next(model.parameters()).device
        ds = SceneDataset("test", self.cfg.image_size, 123, 8, self.cfg.data)
        x = images_to_unit(torch.stack([ds[i]["image"] for i in range(4)]), device)
        recon = model.decode(model.encode(x).mode()).float()
        pics = to_pil(torch.cat([x, recon]).add(1).div(2))
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(pics, cols=4).save(path)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


@torch.no_grad()
def latent_scaling_factor(encoder: Encoder, images: torch.Tensor) -> float:
    """1 / std of the raw latents of ``images`` in [-1, 1] (how SD's 0.18215 was chosen)."""
    raw = encoder.encode(images).mode().float()
    return float(1.0 / raw.std())


# ---- the text tower (CLIP-style contrastive pretraining, then frozen) ------------------------------------

class ImageTower(nn.Module):
    """A small conv net image encoder used only to pretrain the text tower contrastively."""

    def __init__(self, dim: int, width: int = 64):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.proj = nn.Linear(chans[-1], dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.body(x).mean((2, 3)))  # (B, dim)


class ContrastivePair(nn.Module):
    """Text tower + image tower + projections + temperature."""

    def __init__(self, text: TextEncoderConfig, embed_dim: int):
        super().__init__()
        self.text = TextEncoder(text)
        self.text_proj = nn.Linear(text.hidden_size, embed_dim, bias=False)
        self.image = ImageTower(embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def forward(self, ids: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.text.text_model(input_ids=ids).pooler_output  # (B, D) at the first EOS token
        t = F.normalize(self.text_proj(pooled).float(), dim=-1)
        i = F.normalize(self.image(images).float(), dim=-1)
        return t, i


@dataclass(frozen=True)
class TextTaskConfig:
    model: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(
        hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512, projection_dim=128))
    embed_dim: int = 128
    image_size: int = 128         # the image tower sees small renders: enough for identity and layout
    data: SceneConfig = field(default_factory=SceneConfig)
    seed: int = 1


class TextTask:
    name = "text"

    def __init__(self, cfg: TextTaskConfig):
        self.cfg = cfg
        self.tokenizer = Tokenizer()

    def describe(self) -> dict:
        return to_dict(self.cfg)

    def build(self) -> nn.Module:
        return ContrastivePair(self.cfg.model, self.cfg.embed_dim)

    def dataset(self):
        return SceneDataset("train", self.cfg.image_size, self.cfg.seed, STREAM_LENGTH, self.cfg.data)

    def collate(self, items):
        batch = collate_scenes(items)
        batch["ids"] = self.tokenizer(batch["caption"])
        return batch

    def loss(self, model, batch, generator):
        device = generator.device
        t, i = model(batch["ids"].to(device), images_to_unit(batch["image"], device))
        loss = contrastive_loss(t, i, _unwrap(model).logit_scale)
        acc = ((t @ i.t()).argmax(1) == torch.arange(len(t), device=device)).float().mean()
        return loss, {"retrieval_acc": acc, "temperature": _unwrap(model).logit_scale.detach().exp()}

    def save(self, model, folder: Path) -> None:
        from snapfusion.weights import save_pretrained

        model = _unwrap(model)
        save_text_encoder(folder / "text_encoder", model.text)
        save_pretrained(folder / "towers", model, self.cfg, kind="text-contrastive")

    def load(self, model, folder: Path) -> None:
        load_into(_unwrap(model), load_safetensors(resolve_weights(folder / "towers", WEIGHTS_STEM)),
                  source=str(folder))

    def sample_grid(self, model, path: Path) -> None:
        pass  # nothing visual: retrieval accuracy is logged every step


# ---- the UNet (eps- or v-prediction latent diffusion, 10% empty captions for guidance) ------------------

@dataclass(frozen=True)
class UNetTaskConfig:
    model: UNetConfig
    vae: str                      # folder of the trained autoencoder (kind "vae" or "vae-encoder")
    text_encoder: str             # folder of the frozen text tower
    clip_skip: int = 0            # > 0: condition on the tower without its last clip_skip layers (diffusers'
                                  # clip_skip; SD 2 uses the penultimate layer): assemble the pipeline with the same
    image_size: int = 512
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    uncond_prob: float = 0.1      # SD: 10% empty captions so that classifier-free guidance works
    min_snr_gamma: float = 5.0    # 0 = plain eps or v MSE (SD); 5 speeds up convergence (Hang et al. 2023)
    data: SceneConfig = field(default_factory=SceneConfig)
    sample_prompts: int = 8
    seed: int = 2
    latent_pool: int = 0          # > 0: encode this many training scenes once and train on their latents (the frozen
                                  # encoder costs 3x a UNet forward per 512² image); 0: render and encode every batch
    pool_workers: int = 8         # DataLoader workers that render the pool
    offset_noise: float = 0.0     # > 0: add offset * N(0, 1) per sample and channel to the noise (docs/base_model.md:
                                  # SD's schedule leaks each channel's mean at t = T, so without it the model
                                  # cannot choose a flat background's color at sampling time)
    offset_noise_grid: int = 1    # > 1 (a power of 2): the offset noise also on coarse grids up to this one. SD's
                                  # schedule leaks the contrast between image halves as it leaks the mean (a gradient
                                  # background's direction is readable at t = T; docs/base_model.md, session 12)
    loss_weighting: str = "min-snr"  # "v": the plain v MSE's weights 1 + 1 / SNR on the eps error, rescaled to mean 1
                                  # over t (v_weights; min_snr_gamma unused): the noisiest steps, which choose the
                                  # layout, weigh more; "hybrid": per sample the larger of the Min-SNR and v
                                  # weights, rescaled to mean 1 (hybrid_weights): the noisy end as v, the middle
                                  # nearly as Min-SNR
    timestep_bias: str = "none"   # "later" / "earlier" / "range": draw those timesteps timestep_bias_multiplier
                                  # times as often (timestep_bias_weights; diffusers' --timestep_bias_strategy)
    timestep_bias_multiplier: float = 2.0  # the CLI's default too
    timestep_bias_portion: float = 0.25  # "later" / "earlier": the share of the timesteps that are favoured
    timestep_bias_begin: int = 0  # "range": the favoured timesteps [begin, end)
    timestep_bias_end: int = 1000
    init_unet: str = ""           # folder of a UNet to start from (a fresh run only; --resume reads the checkpoint)
    kd_unet: str = ""             # folder of a frozen UNet, eps or v (the teacher): adds kd_weight x the eps-space MSE
                                  # to its prediction on the same input (BK-SDM's output-level distillation)
    kd_weight: float = 1.0
    kd_feature_weight: float = 0.0  # > 0 (needs kd_unet): adds this x the MSE between student and teacher stage
                                    # outputs, summed over stages (BK-SDM's feature-level distillation)
    vae_decoder: str = ""         # decoder folder for sample grids when ``vae`` holds only an encoder
    mix_size: int = 0             # > 0 (needs latent_pool): mixed-resolution training. Each step, with probability
                                  # mix_prob, trains on mix_batch scenes of a second latent pool rendered at mix_size
                                  # instead of the batch at image_size (e.g. most steps at 256², some at 512²: the
                                  # cheap size teaches layout, the target size keeps the model working there)
    mix_prob: float = 0.0
    mix_batch: int = 0            # scenes in a mix_size step (e.g. batch x (image_size / mix_size)²: equal work)
    mix_pool: int = 0             # scenes in the mix_size latent pool (its own first mix_pool training scenes)


PREDICTION_TYPES = get_args(PredictionType)  # what sampling.Denoiser converts: the one list of them


def require_known_prediction(model: UNetConfig, command: str) -> None:
    """The UNet stage trains eps- and v-prediction UNets (its Min-SNR loss in the model's own parameterisation);
    refuse anything else rather than train it toward the wrong target."""
    if model.prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"{command} trains {' or '.join(PREDICTION_TYPES)} UNets; this one predicts "
                          f"{model.prediction_type}")


def pooled_caption(i: int, pool: int, seed: int, data: SceneConfig) -> tuple[int, str]:
    """Stream item i over a pool of ``pool`` scenes: the scene's index i mod pool and a fresh paraphrase of its
    caption (new each pass over the pool)."""
    j, epoch = i % pool, i // pool
    scene = sample_scene(np.random.default_rng([seed, 0, j]), "train", data)  # = SceneDataset item j
    return j, caption(scene, np.random.default_rng([seed, 0, j, epoch]), data.caption_p_omit)


class PooledCaptions(torch.utils.data.Dataset):
    """Item i: the index of pooled scene i mod P and its caption (``pooled_caption``); with a second pool
    (mixed-resolution training) also "item" = i, from which the collate draws the second pool's scene for the few
    items a mixed step uses (``pooled_caption(i, P2, ..)``), instead of every item drawing one."""

    def __init__(self, pool: int, seed: int, data: SceneConfig, pool2: int = 0):
        self.pool, self.seed, self.data, self.pool2 = pool, seed, data, pool2

    def __len__(self) -> int:
        return STREAM_LENGTH

    def __getitem__(self, i: int) -> dict[str, Any]:
        j, text = pooled_caption(i, self.pool, self.seed, self.data)
        return {"index": j, "caption": text} | ({"item": i} if self.pool2 else {})


class LatentPool:
    """Posterior mean and std (fp16, on the training device) of the first P training scenes at one size, encoded
    once (P, size: the task's latent_pool and image_size, or its mix_pool and mix_size)."""

    def __init__(self, encoder: Encoder, cfg: UNetTaskConfig, device: torch.device, mixed: bool = False):
        from torch.utils.data import DataLoader, Subset

        size, count = (cfg.mix_size, cfg.mix_pool) if mixed else (cfg.image_size, cfg.latent_pool)
        # under DDP every process renders and encodes a contiguous 1/N of the scenes, then all gather the whole pool
        # (the same pool in every process, in the time of its share: rendering bounds the build)
        rank, world = _rank_and_world()
        share = -(-count // world)
        ds = Subset(SceneDataset("train", size, cfg.seed, count, cfg.data),
                    range(min(count, rank * share), min(count, (rank + 1) * share)))
        loader = DataLoader(ds, batch_size=64, num_workers=cfg.pool_workers, collate_fn=collate_scenes)
        means, stds = [], []
        # built lazily inside the loop's autocast: encode in the encoder's own precision (and CPU autocast cannot
        # concatenate the fp16 pool)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            for batch in loader:
                posterior = encoder.encode(images_to_unit(batch["image"], device))
                means.append(posterior.mean.half())
                stds.append(posterior.std.half())
            h = size // encoder.config.downscale
            empty = torch.empty(0, encoder.config.latent_channels, h, h, dtype=torch.float16, device=device)
            self.mean, self.std = (_gather_rows(torch.cat([empty, *rows]), share, count, world)
                                   for rows in (means, stds))  # (P, 4, h, w) each
        self.scale = encoder.config.scaling_factor

    def sample(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scaled diffusion latents of pooled scenes ``index`` (B,): a fresh posterior draw each time."""
        mean, std = self.mean[index].float(), self.std[index].float()
        return (mean + std * torch.randn(mean.shape, device=mean.device, generator=generator)) * self.scale


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside torch.distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_rows(local: torch.Tensor, share: int, count: int, world: int) -> torch.Tensor:
    """Every process's rows (each process holds ``share`` rows, the last maybe fewer) in rank order, ``count`` in
    all, in every process."""
    if world == 1:
        return local
    import torch.distributed as dist

    padded = torch.zeros(share, *local.shape[1:], dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[:count]


def check_offset_noise(cfg: UNetTaskConfig) -> None:
    """Offset-noise options that cannot train are refused before anything is built."""
    grid = cfg.offset_noise_grid
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1 or grid & (grid - 1):
        raise ConfigError(f"--offset-noise-grid must be a power of 2 (1, 2, 4, ..), got {grid!r}")
    if grid > 1 and cfg.offset_noise <= 0:
        raise ConfigError("--offset-noise-grid needs --offset-noise > 0 (the strength on every grid)")


def check_loss_weighting(cfg: UNetTaskConfig) -> None:
    """An unknown loss weighting is refused before anything is built."""
    if cfg.loss_weighting not in LOSS_WEIGHTINGS:
        raise ConfigError(f"--loss-weighting must be one of {list(LOSS_WEIGHTINGS)}, got {cfg.loss_weighting!r}")


def check_timestep_bias(cfg: UNetTaskConfig) -> None:
    """An unknown bias, a negative multiplier, a portion outside (0, 1] or an empty range is refused up front."""
    T = cfg.schedule.num_train_timesteps
    if cfg.timestep_bias not in TIMESTEP_BIASES:
        raise ConfigError(f"--timestep-bias must be one of {list(TIMESTEP_BIASES)}, got {cfg.timestep_bias!r}")
    if cfg.timestep_bias == "none":
        return
    if not cfg.timestep_bias_multiplier >= 0:
        raise ConfigError(f"--timestep-bias-multiplier must be >= 0, got {cfg.timestep_bias_multiplier!r}")
    if cfg.timestep_bias in ("later", "earlier") and not 0 < cfg.timestep_bias_portion <= 1:
        raise ConfigError(f"--timestep-bias-portion must be in (0, 1], got {cfg.timestep_bias_portion!r}")
    if cfg.timestep_bias == "range" and not 0 <= cfg.timestep_bias_begin < cfg.timestep_bias_end <= T:
        raise ConfigError(f"--timestep-bias-range needs 0 <= BEGIN < END <= {T}, got "
                          f"{cfg.timestep_bias_begin} {cfg.timestep_bias_end}")
    if timestep_bias_weights(cfg, T).sum() <= 0:
        raise ConfigError("--timestep-bias-multiplier 0 over every timestep leaves nothing to train on")


def check_mixed_resolution(cfg: UNetTaskConfig) -> None:
    """Mixed-resolution options that cannot train are refused before anything is built."""
    if not cfg.mix_size:
        return
    if cfg.mix_size < 0 or cfg.mix_size % 8:
        raise ConfigError(f"--mix-size must be a positive multiple of 8, got {cfg.mix_size}")
    if cfg.latent_pool <= 0:
        raise ConfigError("--mix-size needs --latent-pool (both sizes train on pooled latents)")
    if not 0.0 < cfg.mix_prob <= 1.0:
        raise ConfigError(f"--mix-prob must be in (0, 1], got {cfg.mix_prob}")
    if cfg.mix_batch < 1 or cfg.mix_pool < 1:
        raise ConfigError(f"--mix-batch-size and --mix-pool must be >= 1, got {cfg.mix_batch} and {cfg.mix_pool}")


class UNetTask:
    name = "unet"
    compiles = True  # the loss calls the UNet itself (loop --compile)

    def __init__(self, cfg: UNetTaskConfig):
        self.cfg = cfg
        self.tokenizer = Tokenizer()
        self.schedule = NoiseSchedule(cfg.schedule)
        self.encoder = _load_encoder(Path(cfg.vae)).eval().requires_grad_(False)
        self.text = skip_layers(load_text_encoder(cfg.text_encoder), cfg.clip_skip).eval().requires_grad_(False)
        self._decoder_folder = Path(cfg.vae_decoder or cfg.vae)
        self._pool: LatentPool | None = None
        self._mix_pool: LatentPool | None = None
        self._mix_counts = [0, 0]  # this process's plain and mixed steps since it started (logged as a share)
        check_mixed_resolution(cfg)
        check_offset_noise(cfg)
        check_loss_weighting(cfg)
        check_timestep_bias(cfg)
        self._t_weights = timestep_bias_weights(cfg, self.schedule.num_train_timesteps)
        self.kd = _load_kd_teacher(cfg, self.text.config.hidden_size) if cfg.kd_unet else None

    def describe(self) -> dict:
        return to_dict(self.cfg)

    def build(self) -> nn.Module:
        require_known_prediction(self.cfg.model, "train-unet")
        if not self.cfg.init_unet:
            return UNet(self.cfg.model)
        unet = UNet.load(self.cfg.init_unet, dtype=torch.float32)  # fp32 master weights
        if unet.config != self.cfg.model:
            raise ConfigError(f"--init-unet {self.cfg.init_unet}: its config differs from the run's UNet config")
        return unet

    def dataset(self):
        if self.cfg.latent_pool > 0:
            return PooledCaptions(self.cfg.latent_pool, self.cfg.seed, self.cfg.data,
                                  self.cfg.mix_pool if self.mixing else 0)
        return SceneDataset("train", self.cfg.image_size, self.cfg.seed, STREAM_LENGTH, self.cfg.data)

    def collate(self, items):
        if self.cfg.latent_pool > 0:
            batch = {"index": torch.tensor([it["index"] for it in items]), "caption": [it["caption"] for it in items]}
        else:
            batch = collate_scenes(items)
        batch["ids"] = self._caption_ids(batch["caption"])
        if self.mixing:  # the first mix_batch items' scenes of the second pool
            second = [pooled_caption(it["item"], self.cfg.mix_pool, self.cfg.seed, self.cfg.data)
                      for it in items[: self.cfg.mix_batch]]
            batch["index2"] = torch.tensor([j for j, _ in second])
            batch["ids2"] = self._caption_ids([text for _, text in second])
        return batch

    def _caption_ids(self, texts: list[str]) -> torch.Tensor:
        """Token ids of ``texts`` with uncond_prob of them emptied (for guidance), seeded by the texts themselves."""
        rng = np.random.default_rng(zlib.crc32("\n".join(texts).encode()))
        return self.tokenizer(["" if rng.random() < self.cfg.uncond_prob else c for c in texts])

    def latents(self, batch, generator: torch.Generator) -> torch.Tensor:
        """Scaled diffusion latents of the batch's scenes: from the pool, or rendered images encoded now."""
        device = generator.device
        self.encoder.to(device)
        if self.cfg.latent_pool <= 0:
            return self.encoder.latents_from_images(images_to_unit(batch["image"], device), generator)
        if self._pool is None:
            self._pool = LatentPool(self.encoder, self.cfg, device)
        return self._pool.sample(batch["index"].to(device), generator)

    def noise(self, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Training noise eps like ``x0`` (B, C, h, w): N(0, 1), plus offset * N(0, 1) per sample and channel when
        ``offset_noise`` > 0 (the same draw serves every task that trains on this data: v fine-tuning, distillation),
        and with ``offset_noise_grid`` G > 1 also offset * N(0, 1) on each coarser grid 2 x 2, 4 x 4, .. G x G,
        bilinearly upsampled (ramps between image halves, quarters, ..: multi-resolution offset noise)."""
        eps = torch.randn(x0.shape, device=x0.device, generator=generator)
        if self.cfg.offset_noise > 0:
            B, C = x0.shape[:2]
            eps = eps + self.cfg.offset_noise * torch.randn(B, C, 1, 1, device=x0.device, generator=generator)
            grid = 2
            while grid <= self.cfg.offset_noise_grid:
                coarse = torch.randn(B, C, grid, grid, device=x0.device, generator=generator)
                eps = eps + self.cfg.offset_noise * F.interpolate(coarse, size=x0.shape[-2:], mode="bilinear",
                                                                  align_corners=False)
                grid *= 2
        return eps

    def timesteps(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` training timesteps: uniform, or drawn by the timestep bias's weights."""
        if self._t_weights is None:  # the same draw as before the option existed
            return torch.randint(0, self.schedule.num_train_timesteps, (count,), device=generator.device,
                                 generator=generator)
        weights = self._t_weights.to(generator.device)
        return torch.multinomial(weights, count, replacement=True, generator=generator)

    @property
    def mixing(self) -> bool:
        """Mixed-resolution training (--mix-size; check_mixed_resolution has made sure the latent pool is on)."""
        return self.cfg.mix_size > 0

    def mixed_step(self, generator: torch.Generator) -> bool:
        """Whether this step trains at mix_size (drawn from the run's generator, so a resumed run draws the same)."""
        if not self.mixing:
            return False  # no draw: runs without mixing keep their random stream
        return torch.rand((), device=generator.device, generator=generator).item() < self.cfg.mix_prob

    def loss(self, model, batch, generator):
        device = generator.device
        self.text.to(device)
        with torch.no_grad():
            if self.mixing and self._mix_pool is None:
                # both pools at the first step, mixed or not: under DDP every process builds them at once and in the
                # same order (each gathers its share from the others), not at its own first step of each size
                if self._pool is None:
                    self._pool = LatentPool(self.encoder.to(device), self.cfg, device)
                self._mix_pool = LatentPool(self.encoder.to(device), self.cfg, device, mixed=True)
            mixed = self.mixed_step(generator)
            self._mix_counts[mixed] += 1
            if mixed:
                x0 = self._mix_pool.sample(batch["index2"].to(device), generator)
                ids = batch["ids2"]
            else:
                x0, ids = self.latents(batch, generator), batch["ids"]
            context = self.text(ids.to(device))  # (B, 77, D)
        B = x0.shape[0]
        t = self.timesteps(B, generator)
        eps = self.noise(x0, generator)
        z = self.schedule.add_noise(x0, eps, t)
        use_features = self.kd is not None and self.cfg.kd_feature_weight > 0
        student_features: list[torch.Tensor] | None = [] if use_features else None
        pred = model(z, t, context, features=student_features) if use_features else model(z, t, context)
        alpha, sigma = self.schedule.alpha_sigma(t)
        snr = (alpha / sigma) ** 2
        weighting = self.cfg.loss_weighting
        gamma = self.cfg.min_snr_gamma if weighting == "min-snr" else 0.0
        eps_weights = {"v": lambda: v_weights(alpha, self.schedule),  # on the plain eps MSE, at the usual scale
                       "hybrid": lambda: hybrid_weights(alpha, self.schedule, self.cfg.min_snr_gamma)}.get(weighting)
        if self.cfg.model.prediction_type == "v_prediction":  # a v model (e.g. the v-tuned base): the v target
            loss = v_mse_min_snr(pred, self.schedule.velocity(x0, eps, t), snr, gamma)
            if eps_weights is not None:  # ||eps_hat - eps||^2 = alpha^2 ||v_hat - v||^2
                loss = loss * alpha.float() ** 2 * eps_weights()
        else:
            loss = eps_mse_min_snr(pred, eps, snr, gamma)
            if eps_weights is not None:
                loss = loss * eps_weights()
        # the share of this process's steps at mix_size so far (a resumed run counts anew)
        logs = {"mixed_share": self._mix_counts[1] / sum(self._mix_counts)} if self.mixing else {}
        if self.kd is None:
            return loss, logs
        pred_eps = Denoiser(model, self.schedule, self.cfg.model.prediction_type).to_prediction(pred, z, t).eps
        loss, kd_logs = self.add_kd_terms(loss, pred_eps, z, t, context, student_features)
        return loss, {**logs, **kd_logs}

    def add_kd_terms(self, loss: torch.Tensor, pred_eps: torch.Tensor, z: torch.Tensor, t: torch.Tensor,
                     context: torch.Tensor, student_features: list[torch.Tensor] | None) -> tuple[torch.Tensor, dict]:
        """``loss`` (B,) plus the distillation terms against the frozen ``kd`` teacher on the student's input
        (z, t, context): kd_weight x the Min-SNR eps MSE of the student's (implied) eps to the teacher's (implied)
        eps, then, when ``student_features`` holds the student's stage outputs, kd_feature_weight x their MSE to the
        teacher's.
        Shared by train-unet / robust-train (eps or v students) and finetune-v."""
        alpha, sigma = self.schedule.alpha_sigma(t)
        snr = (alpha / sigma) ** 2
        teacher_features: list[torch.Tensor] | None = [] if student_features is not None else None
        with torch.no_grad():  # under the loop's autocast, as the student: the target costs a mixed-precision pass
            raw = self.kd.to(z.device)(z, t, context, features=teacher_features)
        target = Denoiser(self.kd, self.schedule, self.kd.config.prediction_type).to_prediction(raw, z, t).eps
        kd = eps_mse_min_snr(pred_eps, target, snr, self.cfg.min_snr_gamma)
        loss, logs = loss + self.cfg.kd_weight * kd, {"kd": kd.detach().mean()}
        if student_features is not None:
            feat = feature_mse(student_features, teacher_features)
            loss, logs = loss + self.cfg.kd_feature_weight * feat, {**logs, "kd_feat": feat.detach().mean()}
        return loss, logs

    def save(self, model, folder: Path) -> None:
        _unwrap(model).save(folder)

    def load(self, model, folder: Path) -> None:
        load_into(_unwrap(model), load_safetensors(resolve_weights(folder, WEIGHTS_STEM)), source=str(folder))

    @torch.no_grad()
    def sample_grid(self, model, path: Path) -> None:
        from snapfusion.decoder.io import load_decoder
        from snapfusion.pipeline import Pipeline, PipelineConfig, image_grid, to_pil

        unet = _unwrap(model)
        device = next(unet.parameters()).device
        decoder = load_decoder(self._decoder_folder, device=device)  # any decoder kind
        pipe = Pipeline(self.text.to(device), unet, decoder, PipelineConfig(schedule=self.cfg.schedule),
                        tokenizer=self.tokenizer)
        records = load_prompt_set("test")[: self.cfg.sample_prompts]
        was_training = unet.training
        unet.eval()
        images = pipe.generate([r["prompt"] for r in records], [r["seed"] for r in records], steps=25,
                               guidance=5.0, height=self.cfg.image_size, width=self.cfg.image_size)
        unet.train(was_training)
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(to_pil(images), cols=4).resize((1024, 512 * ((len(records) + 3) // 4) // 2)).save(path)
        (path.with_suffix(".txt")).write_text("\n".join(r["prompt"] for r in records) + "\n")


def feature_mse(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Per-sample (B,) sum over stages of the mean squared difference of the stage outputs (``UNet.forward``'s
    ``features``). Student and teacher must have the same stages with the same output shapes: evolution and the
    BK-SDM rule remove blocks, never stages, and keep every stage's width."""
    if len(student) != len(teacher):
        raise ConfigError(f"feature distillation: the student has {len(student)} stages, the teacher {len(teacher)}")
    total = 0.0
    for i, (s, t) in enumerate(zip(student, teacher)):
        if s.shape != t.shape:
            raise ConfigError(f"feature distillation: stage {i} outputs {tuple(s.shape[1:])} in the student but "
                              f"{tuple(t.shape[1:])} in the teacher")
        total = total + (s.float() - t.float()).pow(2).flatten(1).mean(1)
    return total


def _load_kd_teacher(cfg: UNetTaskConfig, context_dim: int) -> UNet:
    """The frozen teacher (eps or v) of output-level distillation; it must read the run's latents and text context."""
    if not (math.isfinite(cfg.kd_weight) and cfg.kd_weight > 0):
        raise ConfigError(f"--kd-weight must be a finite number > 0, got {cfg.kd_weight}")
    if not (math.isfinite(cfg.kd_feature_weight) and cfg.kd_feature_weight >= 0):
        raise ConfigError(f"--kd-feature-weight must be a finite number >= 0, got {cfg.kd_feature_weight}")
    if not (Path(cfg.kd_unet) / "config.json").is_file():
        raise ConfigError(f"--kd-unet: no UNet folder at {cfg.kd_unet}")
    teacher = UNet.load(cfg.kd_unet, dtype=torch.float32).eval().requires_grad_(False)
    got, want = teacher.config, cfg.model
    if got.prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"--kd-unet {cfg.kd_unet}: the teacher must predict {' or '.join(PREDICTION_TYPES)}, it "
                          f"predicts {got.prediction_type}")
    if (got.in_channels, got.out_channels, got.context_dim) != (want.in_channels, want.out_channels, context_dim):
        raise ConfigError(f"--kd-unet {cfg.kd_unet}: channels in/out and context width "
                          f"{(got.in_channels, got.out_channels, got.context_dim)} do not match the run's "
                          f"{(want.in_channels, want.out_channels, context_dim)}")
    if cfg.kd_feature_weight > 0 and stage_widths(got) != stage_widths(want):
        raise ConfigError(f"--kd-feature-weight: the teacher's stage widths {stage_widths(got)} differ from the "
                          f"student's {stage_widths(want)} (feature distillation compares stage outputs)")
    return teacher


def _vae_cls(folder: Path) -> type[nn.Module]:
    from snapfusion.config import load_json

    kind = load_json(folder / "config.json").get("kind")
    return {"vae": AutoencoderKL, "vae-encoder": Encoder, "vae-decoder": Decoder}.get(kind, AutoencoderKL)


def _load_encoder(folder: Path) -> Encoder:
    model = load_autoencoder(folder, _vae_cls(folder))
    return model.encoder if isinstance(model, AutoencoderKL) else model
