"""v-prediction fine-tuning and CFG-aware step distillation as ``Task``s of the one training loop (SnapFusion §4).

Both combine the pieces of the base model's UNet stage: its data (train/data.py: scenes or your own images, 10%
empty captions, frozen VAE encoder and text tower), its noise (train/noise.py) and the losses of snapfusion/losses.py.
The teacher is a frozen UNet held by the task, outside the trained module.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from snapfusion.config import from_dict, load_json, to_dict
from snapfusion.data import SceneConfig, load_prompt_set
from snapfusion.decoder.io import load_decoder
from snapfusion.distill.evaluate import Row, mse_to, sample_rows, write_comparison
from snapfusion.distill.teacher import step_grid
from snapfusion.errors import ConfigError, WeightsError
from snapfusion.losses import distill_loss, feature_mse, guidance_scales, rescaled, v_loss, with_rescaled_ori
from snapfusion.models.unet import KIND as UNET_KIND
from snapfusion.models.unet import UNet, UNetConfig
from snapfusion.models.unet_config import stage_widths
from snapfusion.pipeline import INDEX, Pipeline, PipelineConfig, part_folder
from snapfusion.sampling import Denoiser, guided
from snapfusion.schedule import NoiseSchedule
from snapfusion.train.data import LatentData
from snapfusion.train.kd import Distillation
from snapfusion.train.noise import NoiseSampler
from snapfusion.train.state import load_weights_into, unwrap
from snapfusion.train.unet import UNetTaskConfig
from snapfusion.weights import read_config


@dataclass(frozen=True)
class ModelSource:
    """Where the frozen parts and the teacher UNet come from."""

    pipeline: str                      # pipeline folder: text_encoder/, vae_decoder/, unet/, maybe vae_encoder/
    teacher_unet: str | None = None    # UNet folder replacing the pipeline's unet/ (e.g. a v fine-tune's final/)
    vae_encoder: str | None = None     # autoencoder or encoder folder, if the pipeline ships no vae_encoder/

    def unet_folder(self) -> Path:
        """The teacher UNet's folder."""
        return Path(self.teacher_unet) if self.teacher_unet else part_folder(self.pipeline, "unet")

    def encoder_folder(self) -> Path:
        """The VAE encoder's folder (needed to encode training images)."""
        folder = Path(self.vae_encoder) if self.vae_encoder else part_folder(self.pipeline, "vae_encoder")
        if not (folder / "config.json").is_file():
            raise WeightsError(f"no VAE encoder at {folder}: assemble the pipeline with --with-encoder or pass "
                               f"--vae-encoder (an autoencoder or encoder folder)")
        return folder

    def pipeline_config(self) -> PipelineConfig:
        """The pipeline's sampling defaults (its schedule is the training schedule)."""
        data = load_json(Path(self.pipeline) / INDEX)
        if data.get("kind") != "pipeline":
            raise WeightsError(f"{Path(self.pipeline) / INDEX}: expected kind 'pipeline', found {data.get('kind')!r}")
        return from_dict(PipelineConfig, data["config"], where=str(Path(self.pipeline) / INDEX))


@dataclass(frozen=True)
class VFinetuneConfig:
    """v-prediction fine-tuning (L_ori) of the source's UNet, starting from its weights (SnapFusion §4)."""

    source: ModelSource
    image_size: int = 512
    uncond_prob: float = 0.1           # as the base model: 10% empty captions keep guidance working
    data: SceneConfig = field(default_factory=SceneConfig)
    sample_prompts: int = 8
    sample_steps: int = 16             # grid and fidelity check: both models at this many trailing DDIM steps
    sample_guidance: float | None = None   # None: the pipeline's default
    seed: int = 3
    offset_noise: float = 0.0          # as train-unet --offset-noise (docs/base_model.md); 0: plain N(0, 1) noise
    latent_pool: int = 0               # as train-unet --latent-pool; 0: render and encode every batch
    pool_workers: int = 8              # DataLoader workers that render the pool
    kd_unet: str = ""                  # frozen eps or v teacher (e.g. the base UNet): adds robust-train's distillation
                                       # terms on the v student's implied eps (docs/step_distillation.md)
    kd_weight: float = 1.0             # x the Min-SNR eps MSE to the teacher's (implied) eps
    kd_feature_weight: float = 0.0     # x the MSE of the stage outputs to the teacher's (0: off)
    data_folder: str | None = None     # your own images (images + metadata.jsonl) instead of the scenes


@dataclass(frozen=True)
class DistillConfig:
    """Direct step distillation: one student DDIM step = ``teacher_ratio`` teacher DDIM steps (two in SnapFusion §4)."""

    source: ModelSource                # the teacher: a v fine-tuned base, or an already distilled 2n-step model
    student_unet: str | None = None    # UNet folder to start the student from; None: the teacher's weights
    student_steps: int = 8             # the teacher runs teacher_ratio times as many (16 -> 8)
    teacher_ratio: int = 2             # teacher DDIM steps per student step: 2 (the paper's 16 -> 8), 4 (32 -> 8), ...
    cfg_prob: float = 0.1              # p: probability of the CFG-aware loss in an iteration, else vanilla
    guidance_range: tuple[float, float] = (2.0, 14.0)   # w ~ U[2, 14] for the CFG-aware loss
    ori_weight: float = 0.2            # gamma of gamma * L_ori (rescaled to L_dstl's scale)
    image_size: int = 512
    uncond_prob: float = 0.1
    data: SceneConfig = field(default_factory=SceneConfig)
    sample_prompts: int = 8
    sample_guidance: float | None = None
    seed: int = 4
    offset_noise: float = 0.0
    latent_pool: int = 0
    pool_workers: int = 8
    feature_weight: float = 0.0        # > 0: adds this x r x the MSE of the student's stage outputs to the teacher's
                                       # at (z_t, t, c), r = stopgrad(mean L_dstl / mean L_feat) (a variant, not the
                                       # paper's; docs/step_distillation.md)
    data_folder: str | None = None     # your own images (images + metadata.jsonl) instead of the scenes
    guidance_embed: bool = False       # a guidance-embedded student (Meng et al. 2023): w is a UNet input, one call
                                       # per step; every iteration CFG-aware, no L_ori (docs/step_distillation.md)
    embedding_only: bool = False       # with guidance_embed: train the guidance embedding alone, the rest frozen (the
                                       # student's output at w = 1 can then move only through the embedding of 1)
    teacher_guidance_rescale: float = 0.0  # with guidance_embed: the teacher's guided steps use guidance rescale phi
                                       # (sampling.rescale_guidance), which the one-call student then learns at w

    def __post_init__(self) -> None:
        low, high = self.guidance_range
        if isinstance(self.teacher_ratio, bool) or not isinstance(self.teacher_ratio, int) or self.teacher_ratio < 1:
            raise ConfigError(f"--teacher-ratio must be an integer >= 1, got {self.teacher_ratio!r}")
        if self.teacher_ratio == 1 and not self.guidance_embed:
            raise ConfigError("--teacher-ratio 1 needs --guidance-embed: one teacher step per student step reduces no "
                              "steps; it only makes a guidance-embedded copy of a two-call model")
        if not 0.0 <= self.cfg_prob <= 1.0:
            raise ConfigError(f"cfg_prob must be in [0, 1], got {self.cfg_prob}")
        if not 1.0 <= low <= high:
            raise ConfigError(f"guidance range must satisfy 1 <= low <= high, got {self.guidance_range}")
        if self.ori_weight < 0:
            raise ConfigError(f"ori_weight (gamma) must be >= 0, got {self.ori_weight}")
        if not (math.isfinite(self.feature_weight) and self.feature_weight >= 0):
            raise ConfigError(f"--feature-weight must be a finite number >= 0, got {self.feature_weight}")
        if self.embedding_only and not self.guidance_embed:
            raise ConfigError("--embedding-only needs --guidance-embed: only a guidance-embedded student has a "
                              "guidance embedding to train")
        phi = self.teacher_guidance_rescale
        if isinstance(phi, bool) or not isinstance(phi, (int, float)) or not 0.0 <= phi <= 1.0:
            raise ConfigError(f"--teacher-guidance-rescale must be a number in [0, 1], got {phi!r}")
        if phi and not self.guidance_embed:
            raise ConfigError("--teacher-guidance-rescale needs --guidance-embed: a two-call student mixes its own "
                              "guidance at sampling time, where --guidance-rescale applies")
        if self.guidance_embed and self.feature_weight > 0:
            raise ConfigError("--feature-weight with --guidance-embed: the teacher's conditional stage outputs are "
                              "not the target of a guided student")


def _data_config(source: ModelSource, model: UNetConfig, cfg: VFinetuneConfig | DistillConfig, **kd) -> UNetTaskConfig:
    """The UNet-stage config of the pieces both tasks share: data, frozen encoder and text tower, noise (and ``kd``:
    the distillation teacher, UNetTaskConfig's kd_* fields)."""
    return UNetTaskConfig(model=model, vae=str(source.encoder_folder()),
                          text_encoder=str(part_folder(source.pipeline, "text_encoder")),
                          image_size=cfg.image_size, schedule=source.pipeline_config().schedule,
                          uncond_prob=cfg.uncond_prob, data=cfg.data, sample_prompts=cfg.sample_prompts,
                          seed=cfg.seed, offset_noise=cfg.offset_noise, latent_pool=cfg.latent_pool,
                          pool_workers=cfg.pool_workers, data_folder=cfg.data_folder, **kd)


@torch.no_grad()
def _encode(data: LatentData, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Training latents x0 (B, 4, h, w) and text contexts (B, 77, D), as the base model's UNet stage."""
    return data.latents(batch, generator), data.context(batch["ids"], generator.device)


class _Tap:
    """Calls a network and keeps its last raw output: the student's unguided v_hat(c) for L_ori, no second pass
    (and, with ``features``, its stage outputs of that call)."""

    def __init__(self, network: nn.Module, keep_features: bool = False):
        self.network = network
        self.last: torch.Tensor | None = None          # (B or 2B, C, H, W); guided() puts cond first
        self.features: list[torch.Tensor] | None = None  # its stage outputs, same batch layout
        self.keep_features = keep_features

    def __call__(self, z: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        if self.keep_features:
            self.features = []
            self.last = self.network(z, t, context, features=self.features)
        else:
            self.last = self.network(z, t, context)
        return self.last


class _Sampler:
    """Sample grids and the fidelity check shared by both tasks."""

    def __init__(self, data: LatentData, source: ModelSource, cfg: VFinetuneConfig | DistillConfig):
        self.data, self.source, self.cfg = data, source, cfg
        self.pipe_cfg = source.pipeline_config()

    @torch.no_grad()
    def compare(self, models: list[tuple[str, UNet, int]], path: Path) -> dict:
        """Rows of (name, UNet, steps) on the test prompts; MSE of every row to the first; grid + JSON at path."""
        device = next(models[0][1].parameters()).device
        decoder = load_decoder(part_folder(self.source.pipeline, "vae_decoder"), device=device)
        pcfg = dataclasses.replace(self.pipe_cfg, timestep_spacing="trailing")
        text = self.data.text.to(device)
        rows = [Row(name, Pipeline(text, unet, decoder, pcfg, tokenizer=self.data.tokenizer), steps)
                for name, unet, steps in models]
        records = load_prompt_set("test", self.cfg.data.num_emoji)[: self.cfg.sample_prompts]
        prompts = [r["prompt"] for r in records]
        guidance = self.cfg.sample_guidance if self.cfg.sample_guidance is not None else self.pipe_cfg.guidance
        modes = [(unet, unet.training) for _, unet, _ in models]
        for unet, _ in modes:
            unet.eval()
        images = sample_rows(rows, prompts, [r["seed"] for r in records], guidance=guidance,
                             size=self.cfg.image_size)
        for unet, was_training in modes:
            unet.train(was_training)
        metrics = {"guidance": guidance, "mse_to_" + rows[0].name: mse_to(images, rows[0].name)}
        write_comparison(images, metrics, prompts, path)
        return metrics


def _pieces(dcfg: UNetTaskConfig) -> tuple[NoiseSchedule, NoiseSampler, LatentData]:
    """The schedule, noise sampling and data of a UNet-stage config: what both tasks combine."""
    schedule = NoiseSchedule(dcfg.schedule)
    return schedule, NoiseSampler(dcfg, schedule), LatentData(dcfg)


# ---- v-prediction fine-tuning ------------------------------------------------------------------------------

class VFinetuneTask:
    """eps -> v: the same network trained with L_ori = ||v_hat - v||^2 from the source UNet's weights."""

    name = "finetune-v"
    compiles = True  # the loss calls the trained UNet itself (through _Tap)

    def __init__(self, cfg: VFinetuneConfig):
        self.cfg = cfg
        source_config = read_config(cfg.source.unet_folder(), UNetConfig, kind=UNET_KIND)
        self.model_config = dataclasses.replace(source_config, prediction_type="v_prediction")
        kd = {}
        if cfg.kd_unet:
            kd = dict(kd_unet=cfg.kd_unet, kd_weight=cfg.kd_weight, kd_feature_weight=cfg.kd_feature_weight)
        dcfg = _data_config(cfg.source, self.model_config, cfg, **kd)
        self.schedule, self.noising, self.data = _pieces(dcfg)
        self.kd = Distillation(dcfg, self.data.text.config.hidden_size, self.schedule) if cfg.kd_unet else None
        self.sampler = _Sampler(self.data, cfg.source, cfg)

    def describe(self) -> dict:
        return to_dict(self.cfg)

    def build(self) -> nn.Module:
        model = UNet(self.model_config)
        model.load_state_dict(UNet.load(self.cfg.source.unet_folder()).state_dict())
        return model

    def dataset(self):
        return self.data.dataset()

    def collate(self, items):
        return self.data.collate(items)

    def save(self, model, folder: Path) -> None:
        unwrap(model).save(folder)

    def load(self, model, folder: Path) -> None:
        load_weights_into(model, folder)

    def loss(self, model, batch, generator):
        x0, context = _encode(self.data, batch, generator)
        t = self.noising.timesteps(x0.shape[0], generator)  # (B,) uniform
        eps = self.noising.noise(x0, generator)
        z = self.schedule.add_noise(x0, eps, t)  # (B, 4, h, w)
        tap = _Tap(model, keep_features=self.kd is not None and self.kd.wants_features)
        pred = Denoiser(tap, self.schedule, "v_prediction")(z, t, context)
        loss = v_loss(pred, x0, eps, t, self.schedule)
        if self.kd is None:
            return loss, {}
        return self.kd(loss, pred.eps, z, t, context, tap.features)  # eps-space, as robust-train's

    def sample_grid(self, model, path: Path) -> None:
        unet = unwrap(model)
        source = UNet.load(self.cfg.source.unet_folder(), device=next(unet.parameters()).device)
        n = self.cfg.sample_steps
        self.sampler.compare([(f"source@{n}", source, n), (f"v@{n}", unet, n)], path)


# ---- step distillation ---------------------------------------------------------------------------------------

class DistillTask:
    """Student n steps vs teacher r n steps (r = 2: the paper's); per iteration L_cfg with probability p else L_vani,
    plus gamma L_ori."""

    name = "distill"
    compiles = True

    def __init__(self, cfg: DistillConfig):
        self.cfg = cfg
        self.teacher = UNet.load(cfg.source.unet_folder()).eval().requires_grad_(False)
        self.student_folder = Path(cfg.student_unet) if cfg.student_unet else cfg.source.unet_folder()
        source_config = read_config(self.student_folder, UNetConfig, kind=UNET_KIND)
        if self.teacher.config.guidance_embed:
            raise ConfigError(f"the teacher {cfg.source.unet_folder()} embeds the guidance scale: distillation needs "
                              "a teacher with classifier-free guidance (cond and uncond passes)")
        if source_config.guidance_embed and not cfg.guidance_embed:
            raise ConfigError(f"the student {self.student_folder} embeds the guidance scale: pass --guidance-embed")
        self.student_config = dataclasses.replace(source_config, guidance_embed=cfg.guidance_embed)
        if self.student_config.context_dim != self.teacher.config.context_dim:
            raise ConfigError(f"student context_dim {self.student_config.context_dim} != teacher's "
                              f"{self.teacher.config.context_dim} ({self.student_folder})")
        if cfg.feature_weight > 0 and stage_widths(self.student_config) != stage_widths(self.teacher.config):
            raise ConfigError(f"--feature-weight: the teacher's stage widths {stage_widths(self.teacher.config)} "
                              f"differ from the student's {stage_widths(self.student_config)}")
        self.schedule, self.noising, self.data = _pieces(_data_config(cfg.source, self.student_config, cfg))
        self.grid = step_grid(cfg.student_steps, self.schedule.num_train_timesteps, cfg.teacher_ratio)
        self.sampler = _Sampler(self.data, cfg.source, cfg)
        self._uncond: torch.Tensor | None = None

    def describe(self) -> dict:
        return {**to_dict(self.cfg), "student_grid": self.grid.student.tolist(),
                "teacher_grid": self.grid.teacher.tolist()}

    def build(self) -> nn.Module:
        source = UNet.load(self.student_folder)
        model = with_guidance_embedding(source) if self.cfg.guidance_embed else source
        if self.cfg.embedding_only:  # the optimizer takes only parameters that require grad
            model.requires_grad_(False)
            model.guidance_embedding.requires_grad_(True)
        return model

    def dataset(self):
        return self.data.dataset()

    def collate(self, items):
        return self.data.collate(items)

    def save(self, model, folder: Path) -> None:
        unwrap(model).save(folder)

    def load(self, model, folder: Path) -> None:
        load_weights_into(model, folder)

    @torch.no_grad()
    def _uncond_context(self, device: torch.device) -> torch.Tensor:
        if self._uncond is None or self._uncond.device != device:
            self._uncond = self.data.text(self.data.tokenizer([""]).to(device))  # (1, 77, D)
        return self._uncond

    def loss(self, model, batch, generator):
        c = self.cfg
        x0, cond = _encode(self.data, batch, generator)  # (B, 4, h, w), (B, 77, D)
        uncond = self._uncond_context(x0.device)
        B = x0.shape[0]
        levels = self.grid.sample(B, generator)  # r + 1 of (B,): student step t -> t_end, the teacher's levels
        t = levels[0]
        eps = self.noising.noise(x0, generator)
        z = self.schedule.add_noise(x0, eps, t)
        teacher = Denoiser(_outside_autocast(self.teacher.to(x0.device)), self.schedule,
                           self.teacher.config.prediction_type)
        if c.guidance_embed:
            return self._embedded_loss(model, teacher, z, levels, cond, uncond, generator)
        cfg_aware = bool(torch.rand((), device=x0.device, generator=generator) < c.cfg_prob)
        w = guidance_scales(B, *c.guidance_range, generator) if cfg_aware else None  # None: L_vani, no uncond pass
        tap = _Tap(model, keep_features=c.feature_weight > 0)
        student = Denoiser(tap, self.schedule, self.student_config.prediction_type)
        l_dstl = distill_loss(guided(student, cond, uncond, w), guided(teacher, cond, uncond, w), z, levels,
                              self.schedule)
        l_ori = v_loss(student.to_prediction(tap.last[:B].float(), z, t), x0, eps, t, self.schedule)
        total = with_rescaled_ori(l_dstl, l_ori, c.ori_weight)
        logs = {"cfg_aware": float(cfg_aware), "l_dstl": l_dstl.mean().item(), "l_ori": l_ori.mean().item()}
        if c.feature_weight > 0:  # the teacher's stage outputs on the cond input, in the loop's autocast (bf16 on
            # GPUs: a feature target, not the x-space regression target the fp32 two steps give)
            teacher_features: list[torch.Tensor] = []
            with torch.no_grad():
                self.teacher(z, t, cond, features=teacher_features)
            l_feat = feature_mse([f[:B] for f in tap.features], teacher_features)  # cond half of a guided pass
            total = total + rescaled(l_dstl, l_feat, c.feature_weight)
            logs["l_feat"] = l_feat.mean().item()
        return total, logs

    def _embedded_loss(self, model, teacher, z, levels, cond, uncond, generator):
        """L_cfg of a guidance-embedded student: w ~ U[guidance_range] per sample; the teacher's r guided DDIM
        steps (cond and uncond, rescaled by ``teacher_guidance_rescale``) against ONE student call on the cond batch
        with w as its input. No L_ori: the student's output at w is the guided prediction, not the data's v."""
        w = guidance_scales(z.shape[0], *self.cfg.guidance_range, generator).to(z.device)  # (B,)
        student = Denoiser(lambda zz, tt, ctx: model(zz, tt, ctx, guidance=w), self.schedule,
                           self.student_config.prediction_type)
        target = guided(teacher, cond, uncond, w, self.cfg.teacher_guidance_rescale)
        l_dstl = distill_loss(lambda zz, tt: student(zz, tt, cond), target, z, levels, self.schedule)
        return l_dstl, {"cfg_aware": 1.0, "l_dstl": l_dstl.mean().item()}

    def sample_grid(self, model, path: Path) -> None:
        unet = unwrap(model)
        teacher = self.teacher.to(next(unet.parameters()).device)
        n, r = self.cfg.student_steps, self.cfg.teacher_ratio
        rows = [(f"teacher@{r * n}", teacher, r * n)] + ([(f"teacher@{n}", teacher, n)] if r > 1 else [])
        self.sampler.compare(rows + [(f"student@{n}", unet, n)], path)


def with_guidance_embedding(source: UNet) -> UNet:
    """``source`` as a guidance-embedded UNet (``guidance_embed=True``): the same weights and a new
    ``guidance_embedding`` whose last linear is zero, so that its output is exactly zero and the UNet starts as
    ``source``'s conditional prediction for every w. A source that already embeds guidance is returned as is."""
    if source.config.guidance_embed:
        return source
    model = UNet(dataclasses.replace(source.config, guidance_embed=True)).to(next(source.parameters()).dtype)
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    if unexpected or any(not k.startswith("guidance_embedding.") for k in missing):
        raise WeightsError(f"guidance embedding: unexpected keys {unexpected[:1]} or missing {missing[:1]}")
    with torch.no_grad():
        model.guidance_embedding.linear_2.weight.zero_()
        model.guidance_embedding.linear_2.bias.zero_()
    return model


def _outside_autocast(network):
    """The frozen teacher in fp32 (TF32 matmuls on GPUs), not in the loop's bf16 autocast: its two DDIM steps give
    the student's regression target, and bf16 rounding there is noise the student would learn."""
    def run(z, t, context):
        with torch.autocast(z.device.type, enabled=False):
            return network(z.float(), t, None if context is None else context.float())
    return run
