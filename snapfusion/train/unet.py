"""The UNet stage (eps- or v-prediction latent diffusion, 10% empty captions for guidance) as a ``Task`` of the one
loop, composed of the pieces every UNet stage shares: ``LatentData`` (train/data.py), ``NoiseSampler``
(train/noise.py), ``DiffusionLoss`` (losses.py) and optional ``Distillation`` from a teacher (train/kd.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from snapfusion.config import to_dict
from snapfusion.data import SceneConfig, load_prompt_set
from snapfusion.errors import ConfigError
from snapfusion.losses import PREDICTION_TYPES, DiffusionLoss
from snapfusion.models.unet import UNet
from snapfusion.models.unet_config import UNetConfig
from snapfusion.sampling import Denoiser
from snapfusion.schedule import NoiseSchedule, ScheduleConfig
from snapfusion.train.data import LatentData
from snapfusion.train.kd import Distillation
from snapfusion.train.noise import NoiseSampler
from snapfusion.train.state import load_weights_into, unwrap


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
    latent_pool: int = 0          # > 0: encode this many training images once and train on their latents (the frozen
                                  # encoder costs 3x a UNet forward per 512² image); 0: render and encode every batch
    pool_workers: int = 8         # DataLoader workers that render the pool
    offset_noise: float = 0.0     # > 0: add offset * N(0, 1) per sample and channel to the noise (docs/base_model.md:
                                  # SD's schedule leaks each channel's mean at t = T, so without it the model
                                  # cannot choose a flat background's color at sampling time)
    offset_noise_grid: int = 1    # > 1 (a power of 2): the offset noise also on coarse grids up to this one. SD's
                                  # schedule leaks the contrast between image halves as it leaks the mean (a gradient
                                  # background's direction is readable at t = T; docs/base_model.md)
    loss_weighting: str = "min-snr"  # a key of losses.WEIGHTINGS. "v": the plain v MSE's weights 1 + 1 / SNR on the
                                  # eps error, rescaled to mean 1 over t (min_snr_gamma unused): the noisiest steps,
                                  # which choose the layout, weigh more; "hybrid": per sample the larger of the
                                  # Min-SNR and v weights, rescaled to mean 1: the noisy end as v, the middle nearly
                                  # as Min-SNR
    timestep_bias: str = "none"   # "later" / "earlier" / "range": draw those timesteps timestep_bias_multiplier
                                  # times as often (noise.timestep_bias_weights; diffusers' --timestep_bias_strategy)
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
                                  # mix_prob, trains on mix_batch images of a second latent pool rendered at mix_size
                                  # instead of the batch at image_size (e.g. most steps at 256², some at 512²: the
                                  # cheap size teaches layout, the target size keeps the model working there)
    mix_prob: float = 0.0
    mix_batch: int = 0            # images in a mix_size step (e.g. batch x (image_size / mix_size)²: equal work)
    mix_pool: int = 0             # images in the mix_size latent pool (its own first mix_pool training images)
    data_folder: str | None = None  # your own images: a folder of images + metadata.jsonl (snapfusion/data/folder.py)
                                    # instead of the built-in scenes; None: the scenes


def require_known_prediction(model: UNetConfig, command: str) -> None:
    """The UNet stage trains eps- and v-prediction UNets (its Min-SNR loss in the model's own parameterisation);
    refuse anything else rather than train it toward the wrong target."""
    if model.prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"{command} trains {' or '.join(PREDICTION_TYPES)} UNets; this one predicts "
                          f"{model.prediction_type}")


class UNetTask:
    """train-unet: the data, noise and loss pieces of its config, one step = one diffusion loss (+ distillation)."""

    name = "unet"
    compiles = True  # the loss calls the UNet itself (loop --compile)

    def __init__(self, cfg: UNetTaskConfig):
        self.cfg = cfg
        self.schedule = NoiseSchedule(cfg.schedule)
        self.noising = NoiseSampler(cfg, self.schedule)  # checks the offset, bias and mix options first
        self.diffusion_loss = DiffusionLoss(self.schedule, cfg.model.prediction_type, cfg.loss_weighting,
                                            cfg.min_snr_gamma)
        self.data = LatentData(cfg)
        self._decoder_folder = Path(cfg.vae_decoder or cfg.vae)
        self._mix_counts = [0, 0]  # this process's plain and mixed steps since it started (logged as a share)
        self.kd = Distillation(cfg, self.data.text.config.hidden_size, self.schedule) if cfg.kd_unet else None

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
        return self.data.dataset()

    def collate(self, items):
        return self.data.collate(items)

    def loss(self, model, batch, generator):
        device = generator.device
        with torch.no_grad():
            self.data.build_pools(device)
            mixed = self.noising.mixed_step(generator)
            self._mix_counts[mixed] += 1
            if mixed:
                x0, ids = self.data.mixed_latents(batch, generator)
            else:
                x0, ids = self.data.latents(batch, generator), batch["ids"]
            context = self.data.context(ids, device)  # (B, 77, D)
        t = self.noising.timesteps(x0.shape[0], generator)
        eps = self.noising.noise(x0, generator)
        z = self.schedule.add_noise(x0, eps, t)
        student_features: list[torch.Tensor] | None = [] if self.kd is not None and self.kd.wants_features else None
        pred = model(z, t, context, features=student_features) if student_features is not None else model(z, t, context)
        loss = self.diffusion_loss(pred, x0, eps, t)
        # the share of this process's steps at mix_size so far (a resumed run counts anew)
        logs = {"mixed_share": self._mix_counts[1] / sum(self._mix_counts)} if self.data.mixing else {}
        if self.kd is None:
            return loss, logs
        pred_eps = Denoiser(model, self.schedule, self.cfg.model.prediction_type).to_prediction(pred, z, t).eps
        loss, kd_logs = self.kd(loss, pred_eps, z, t, context, student_features)
        return loss, {**logs, **kd_logs}

    def save(self, model, folder: Path) -> None:
        unwrap(model).save(folder)

    def load(self, model, folder: Path) -> None:
        load_weights_into(model, folder)

    @torch.no_grad()
    def sample_grid(self, model, path: Path) -> None:
        from snapfusion.decoder.io import load_decoder
        from snapfusion.pipeline import Pipeline, PipelineConfig, image_grid, to_pil

        unet = unwrap(model)
        device = next(unet.parameters()).device
        decoder = load_decoder(self._decoder_folder, device=device)  # any decoder kind
        pipe = Pipeline(self.data.text.to(device), unet, decoder, PipelineConfig(schedule=self.cfg.schedule),
                        tokenizer=self.data.tokenizer)
        records = load_prompt_set("test")[: self.cfg.sample_prompts]
        was_training = unet.training
        unet.eval()
        images = pipe.generate([r["prompt"] for r in records], [r["seed"] for r in records], steps=25,
                               guidance=5.0, height=self.cfg.image_size, width=self.cfg.image_size)
        unet.train(was_training)
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(to_pil(images), cols=4).resize((1024, 512 * ((len(records) + 3) // 4) // 2)).save(path)
        (path.with_suffix(".txt")).write_text("\n".join(r["prompt"] for r in records) + "\n")
