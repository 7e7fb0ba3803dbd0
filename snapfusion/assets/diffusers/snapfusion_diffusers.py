"""SnapFusion models as diffusers custom code: the efficient UNet, an autoencoder whose decoder is narrower than its
encoder (SnapFusion's channel-halved decoder), the terminal layout prior, and the pipeline that runs them.

Written beside the weights by ``snapfusion export --format diffusers``; it needs torch, diffusers (tested with 0.42)
and transformers, not snapfusion. Load the folder with

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(FOLDER, trust_remote_code=True)

Every network is built from diffusers' own blocks (ResnetBlock2D, BasicTransformerBlock, Downsample2D, Upsample2D,
Encoder, Decoder); what is custom is the order of the blocks, which the config lists one by one (the efficient UNet
keeps a different number of residual and attention blocks in each stage) and the skip connections between them.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from diffusers import DiffusionPipeline
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.autoencoders.vae import Decoder, DecoderOutput, DiagonalGaussianDistribution, Encoder
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from diffusers.models.upsampling import Upsample2D
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class SpatialTransformer(nn.Module):
    """SD's cross-attention block: GroupNorm, proj_in, BasicTransformerBlocks, proj_out, outer residual."""

    def __init__(self, channels: int, heads: int, context_dim: int, depth: int, groups: int, linear: bool):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        proj = (lambda: nn.Linear(channels, channels)) if linear else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, channels // heads, cross_attention_dim=context_dim)
            for _ in range(depth))
        self.proj_out = proj()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        y = y if self.linear else self.proj_in(y)
        y = y.flatten(2).transpose(1, 2)  # (B, H*W, C)
        y = self.proj_in(y) if self.linear else y
        for block in self.transformer_blocks:
            y = block(y, encoder_hidden_states=context)
        y = self.proj_out(y) if self.linear else y
        y = y.transpose(1, 2).reshape(b, c, h, w)
        return x + (y if self.linear else self.proj_out(y))


class Stage(nn.Module):
    """The blocks of one resolution stage, by id (``res.0`` is ``self.res["0"]``), and an optional resample."""

    def __init__(self, stage: dict, temb_dim: int, context_dim: int, depth: int, groups: int, linear: bool):
        super().__init__()
        res, attn = {}, {}
        for b in stage["blocks"]:
            kind, index = b["id"].split(".")
            if kind == "res":
                res[index] = ResnetBlock2D(in_channels=b["in"], out_channels=b["out"], temb_channels=temb_dim,
                                           groups=groups, eps=1e-5)
            else:
                attn[index] = SpatialTransformer(b["in"], b["heads"], context_dim, depth, groups, linear)
        self.res, self.attn = nn.ModuleDict(res), nn.ModuleDict(attn)
        resample = stage.get("resample")
        down = resample == "down"
        self.resample = (Downsample2D(stage["channels"], use_conv=True, padding=1, name="op") if down else
                         Upsample2D(stage["channels"], use_conv=True) if resample == "up" else None)


class SnapFusionUNet(ModelMixin, ConfigMixin):
    """``(sample, timestep, encoder_hidden_states) -> prediction`` for any SnapFusion block layout.

    ``stages`` lists every stage (down..., mid, up...) with its blocks in execution order; each block gives its id,
    input and output width, whether it first concatenates the top skip connection (``pop``) and whether its output
    is pushed as one (``push``). Downsample outputs are pushed too, as in SD."""

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, in_channels: int = 4, out_channels: int = 4, stages: list | None = None,
                 context_dim: int = 768, transformer_depth: int = 1, linear_projection: bool = False,
                 norm_groups: int = 32, time_embed_dim: int | None = None, prediction_type: str = "epsilon",
                 sample_size: int = 64):
        super().__init__()
        stages = stages or []
        c0 = stages[0]["channels"]
        temb = time_embed_dim or 4 * c0
        self.conv_in = nn.Conv2d(in_channels, c0, 3, padding=1)
        self.time_proj = Timesteps(c0, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(c0, temb)
        args = (temb, context_dim, transformer_depth, norm_groups, linear_projection)
        self.down = nn.ModuleList(Stage(s, *args) for s in stages if s["path"] == "down")
        mids = [Stage(s, *args) for s in stages if s["path"] == "mid"]
        self.mid = mids[0] if mids else None
        self.up = nn.ModuleList(Stage(s, *args) for s in stages if s["path"] == "up")
        c_out = stages[-1]["channels"]
        self.norm_out = nn.GroupNorm(norm_groups, c_out, eps=1e-5)
        self.conv_out = nn.Conv2d(c_out, out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, return_dict: bool = True,
                **_):
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(sample.shape[0]) if t.ndim == 0 else t.expand(sample.shape[0])  # (B,)
        temb = self.time_embedding(self.time_proj(t).to(self.conv_in.weight.dtype))  # (B, temb)
        modules = [*self.down, *([self.mid] if self.mid is not None else []), *self.up]
        h = self.conv_in(sample)
        skips = [h]
        for stage, module in zip(self.config.stages, modules):
            for b in stage["blocks"]:
                if b["pop"]:
                    h = torch.cat([h, skips.pop()], dim=1)
                kind, index = b["id"].split(".")
                h = module.res[index](h, temb) if kind == "res" else module.attn[index](h, encoder_hidden_states)
                if b["push"]:
                    skips.append(h)
            if module.resample is not None:
                h = module.resample(h)
                if stage["resample"] == "down":
                    skips.append(h)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


class SnapFusionAutoencoder(ModelMixin, ConfigMixin):
    """A KL autoencoder whose decoder may be narrower than its encoder (diffusers' Encoder and Decoder, separate
    widths); ``encoder_widths`` None: a decoder only. ``block_out_channels`` are the decoder's."""

    @register_to_config
    def __init__(self, in_channels: int = 3, out_channels: int = 3, latent_channels: int = 4,
                 encoder_widths: list | None = None, block_out_channels: list = (128, 256, 512, 512),
                 encoder_norm_groups: int = 32, norm_num_groups: int = 32, layers_per_block: int = 2,
                 mid_block_add_attention: bool = True, scaling_factor: float = 0.18215, sample_size: int = 512):
        super().__init__()
        if encoder_widths:
            n = len(encoder_widths)
            self.encoder = Encoder(in_channels=in_channels, out_channels=latent_channels,
                                   down_block_types=("DownEncoderBlock2D",) * n, block_out_channels=encoder_widths,
                                   layers_per_block=layers_per_block, norm_num_groups=encoder_norm_groups,
                                   double_z=True, mid_block_add_attention=mid_block_add_attention)
            self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        else:
            self.encoder = self.quant_conv = None
        n = len(block_out_channels)
        self.decoder = Decoder(in_channels=latent_channels, out_channels=out_channels,
                               up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=block_out_channels,
                               layers_per_block=layers_per_block, norm_num_groups=norm_num_groups,
                               mid_block_add_attention=mid_block_add_attention)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        if self.encoder is None:
            raise ValueError("this autoencoder was exported without its encoder")
        posterior = DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, **_):
        image = self.decoder(self.post_quant_conv(z))
        return DecoderOutput(sample=image) if return_dict else (image,)


class PriorBlock(nn.Module):
    """Pre-norm cross-attention of the queries to the text states, self-attention among queries, then an MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_s, self.norm_m = (nn.LayerNorm(width) for _ in range(4))
        self.cross = nn.MultiheadAttention(width, heads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(kv)
        q = q + self.cross(self.norm_q(q), kv, kv, need_weights=False)[0]
        s = self.norm_s(q)
        q = q + self.self_attn(s, s, s, need_weights=False)[0]
        return q + self.mlp(self.norm_m(q))


class LayoutPrior(ModelMixin, ConfigMixin):
    """Text states (B, L, D) -> the clean latent's grid x grid block means (B, C, G, G), in scaled latent units."""

    @register_to_config
    def __init__(self, context_dim: int = 256, latent_channels: int = 4, grid: int = 2, width: int = 64,
                 heads: int = 4, layers: int = 2):
        super().__init__()
        self.proj = nn.Linear(context_dim, width)
        self.queries = nn.Parameter(torch.zeros(grid ** 2, width))
        self.blocks = nn.ModuleList(PriorBlock(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, latent_channels)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        kv = self.proj(context.to(self.proj.weight.dtype))
        q = self.queries.expand(context.shape[0], -1, -1)
        for block in self.blocks:
            q = block(q, kv)
        g, c = self.config.grid, self.config.latent_channels
        return self.out(self.norm(q)).transpose(1, 2).reshape(-1, c, g, g)

    @torch.no_grad()
    def start_shift(self, context: torch.Tensor, shape: tuple[int, int], alpha_cumprod: float) -> torch.Tensor:
        """What is added to the starting noise: sqrt(abar / (1 - abar)) x the block means spread over the latent."""
        means = self(context.float()).float()
        return math.sqrt(alpha_cumprod / (1 - alpha_cumprod)) * F.interpolate(means, size=shape, mode="nearest")


def prior_latents(pipe, prior: LayoutPrior, prompt: str | list[str], num_inference_steps: int, *, height: int,
                  width: int, generator=None, latents: torch.Tensor | None = None) -> torch.Tensor:
    """Starting latents with the layout prior applied, for any diffusers SD pipeline: pass them as ``latents=``
    (the noise is drawn as the pipeline would draw it, from ``generator``, unless ``latents`` is given)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        context = pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    shape = (len(prompts), pipe.unet.config.in_channels, height // scale, width // scale)
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=context.device, dtype=torch.float32)
    pipe.scheduler.set_timesteps(num_inference_steps)
    abar = float(pipe.scheduler.alphas_cumprod[int(pipe.scheduler.timesteps[0])])
    return latents + prior.start_shift(context, shape[2:], abar).to(latents)


def _guidance_interval(interval, steps: int, guidance: float) -> tuple[float, float]:
    """(start, end), checked: two numbers with 0 <= start < end <= 1 that guide at least one of ``steps`` steps
    (step i is guided when start <= i / steps < end); ``ValueError`` in one line otherwise."""
    try:
        start, end = (float(x) for x in interval)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_interval must be two numbers (start, end), got {interval!r}") from None
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"guidance_interval must satisfy 0 <= start < end <= 1, got ({start:g}, {end:g})")
    if guidance != 1.0 and not any(start <= i / steps < end for i in range(steps)):
        raise ValueError(f"guidance_interval ({start:g}, {end:g}) guides none of the {steps} steps")
    return start, end


class SnapFusionPipeline(DiffusionPipeline):
    """Text -> image with a SnapFusion model: CLIP text tower, UNet (efficient or SD's), DDIM (or DPM-Solver++)
    with classifier-free guidance, the layout prior on the starting noise, and the (channel-halved) decoder."""

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["layout_prior"]

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, layout_prior=None, default_steps: int = 50,
                 default_guidance: float = 7.5, resolution: int = 512, default_guidance_rescale: float = 0.0,
                 default_guidance_interval: tuple = (0.0, 1.0)):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              scheduler=scheduler, layout_prior=layout_prior)
        self.register_to_config(default_steps=default_steps, default_guidance=default_guidance,
                                resolution=resolution, default_guidance_rescale=default_guidance_rescale,
                                default_guidance_interval=list(default_guidance_interval))

    def _layout_prior(self):
        """The layout prior: the component, or (a plain StableDiffusionPipeline folder, whose model_index.json does
        not name it) the ``layout_prior/`` folder beside the other parts, loaded on first use."""
        if self.layout_prior is None and not getattr(self, "_prior_looked_up", False):
            self._prior_looked_up = True
            folder = os.path.join(str(getattr(self.config, "_name_or_path", "") or ""), "layout_prior")
            if os.path.isfile(os.path.join(folder, "config.json")):
                self.layout_prior = LayoutPrior.from_pretrained(folder).to(self._execution_device)
        return self.layout_prior

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self._execution_device))[0]

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str = "", num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
                 generator=None, latents: torch.Tensor | None = None, use_prior: bool = True,
                 output_type: str = "pil", return_dict: bool = True, guidance_rescale: float | None = None,
                 guidance_interval: tuple | None = None):
        """``guidance_interval`` (start, end): guide only the steps i of n with start <= i / n < end, the others
        run the conditional pass alone (default: the model's, (0, 1): every step)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        steps = num_inference_steps or self.config.default_steps
        guidance = self.config.default_guidance if guidance_scale is None else guidance_scale
        phi = getattr(self.config, "default_guidance_rescale", 0.0) if guidance_rescale is None else guidance_rescale
        start, end = _guidance_interval(getattr(self.config, "default_guidance_interval", (0.0, 1.0))
                                        if guidance_interval is None else guidance_interval, steps, guidance)
        height, width = height or self.config.resolution, width or self.config.resolution
        device, dtype = self._execution_device, self.unet.dtype
        cond = self.encode_prompt(prompts)  # (B, 77, D)
        uncond = self.encode_prompt([negative_prompt or ""]).expand_as(cond) if guidance != 1.0 else None
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        shape = (len(prompts), self.unet.config.in_channels, height // scale, width // scale)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents.to(device, torch.float32)
        self.scheduler.set_timesteps(steps, device=device)
        prior = self._layout_prior() if use_prior else None
        if prior is not None:
            abar = float(self.scheduler.alphas_cumprod[int(self.scheduler.timesteps[0])])
            latents = latents + prior.start_shift(cond, shape[2:], abar).to(latents)
        latents = latents * self.scheduler.init_noise_sigma
        timesteps = self.scheduler.timesteps
        for i, t in enumerate(self.progress_bar(timesteps)):
            guided = uncond is not None and start <= i / steps < end
            z = torch.cat([latents, latents]) if guided else latents
            context = torch.cat([cond, uncond]) if guided else cond
            z = self.scheduler.scale_model_input(z, t)
            out = self.unet(z.to(dtype), t, encoder_hidden_states=context.to(dtype)).sample.float()
            if guided:
                out_cond, out_uncond = out.chunk(2)
                out = out_uncond + guidance * (out_cond - out_uncond)
                if phi:  # guidance rescale (Lin et al. 2024): towards the conditional output's per-sample spread
                    dims = tuple(range(1, out.ndim))
                    rescaled = out * (out_cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
                    out = phi * rescaled + (1 - phi) * out
            latents = self.scheduler.step(out, t, latents).prev_sample
        if output_type == "latent":
            images = latents
        else:
            vae_dtype = next(self.vae.parameters()).dtype
            images = self.vae.decode(latents.to(vae_dtype) / self.vae.config.scaling_factor).sample.float()
            images = (images / 2 + 0.5).clamp(0, 1)
            if output_type in ("pil", "np"):
                images = images.permute(0, 2, 3, 1).cpu().numpy()
                images = self.numpy_to_pil(images) if output_type == "pil" else images
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
