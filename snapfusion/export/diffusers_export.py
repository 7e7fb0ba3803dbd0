"""``snapfusion export --format diffusers``: a pipeline as a diffusers folder.

What diffusers' own classes express is written for them: an SD-pattern UNet as ``UNet2DConditionModel``, a KL
autoencoder with equal encoder and decoder widths as ``AutoencoderKL``, the text tower as transformers'
``CLIPTextModel`` (a compact vocabulary is expanded back to CLIP's 49,408 rows: the same output for every id),
the tokenizer as ``CLIPTokenizer`` and the sampler as ``DDIMScheduler`` / ``DPMSolverMultistepScheduler``. Such a
folder is a plain ``StableDiffusionPipeline``. The rest (the efficient UNet, the channel-halved decoder, the layout
prior) is diffusers custom code: ``snapfusion_diffusers.py`` (snapfusion/assets/diffusers, self-contained) is copied
beside the weights of each such part and at the root, where it defines ``SnapFusionPipeline``; ``model_index.json``
names it, and diffusers loads it with ``trust_remote_code=True``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from snapfusion.config import to_dict
from snapfusion.convert.unet_keys import diffusers_config_from_ours, ours_to_custom, ours_to_diffusers
from snapfusion.convert.vae_keys import config_to_diffusers, vae_to_diffusers
from snapfusion.errors import ConfigError
from snapfusion.export.components import refuse_guidance_embed
from snapfusion.models.autoencoder import Decoder, Encoder
from snapfusion.models.text import EMBEDDING_KEY, TextEncoder, clip_text_config
from snapfusion.models.unet_config import UNetConfig, plan_blocks
from snapfusion.weights import save_safetensors

CODE = Path(__file__).resolve().parents[1] / "assets" / "diffusers" / "snapfusion_diffusers.py"
MODULE = CODE.stem  # the library name model_index.json gives the custom classes
DIFFUSERS_VERSION = "0.42.1"  # the version the custom code was written and tested against
WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclasses.dataclass(frozen=True)
class DiffusersExport:
    """What was written: the folder, the pipeline class, the parts that are custom code, and the prior."""

    folder: Path
    pipeline_class: str
    custom: tuple[str, ...]  # of unet, vae
    prior: bool
    limited: bool = False  # a stored guidance interval, which only the custom pipeline class applies

    def summary(self) -> str:
        if self.custom or self.limited:
            what = list(self.custom) + (["the layout prior"] if self.prior else []) + (
                ["the guidance interval"] if self.limited else [])
            listed = ", ".join(what[:-1]) + (" and " if len(what) > 1 else "") + what[-1]
            return (f"wrote {self.folder} (diffusers SnapFusionPipeline; custom code for {listed}): load with "
                    "DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)")
        with_prior = ("; with the layout prior: DiffusionPipeline.from_pretrained(folder, custom_pipeline="
                      f"folder + '/{CODE.name}', trust_remote_code=True)") if self.prior else ""
        return (f"wrote {self.folder} (diffusers StableDiffusionPipeline): load with "
                f"StableDiffusionPipeline.from_pretrained(folder){with_prior}")


def load_for_export(name: str | None, *, device: str = "cpu"):
    """The pipeline ``name`` (as ``snapfusion.load`` resolves it) with its VAE encoder where it has one, so that
    the exported autoencoder is whole."""
    from snapfusion.loading import DEFAULT_MODELS, model_folder, resolve_model
    from snapfusion.models.autoencoder import load_autoencoder
    from snapfusion.pipeline import part_folder

    pipe = resolve_model(name, device=device)
    if pipe.encoder is None:
        folder = model_folder(name if name is not None else DEFAULT_MODELS[0])
        enc = part_folder(folder, "vae_encoder") if folder.is_dir() else None
        if enc is not None and (enc / "config.json").is_file():
            pipe.encoder = load_autoencoder(enc, Encoder, device=device).eval()
    return pipe


def unet_stages(cfg: UNetConfig) -> list[dict]:
    """Every stage of ``cfg`` with its blocks in execution order, as ``SnapFusionUNet``'s ``stages`` config."""
    plans = plan_blocks(cfg)
    stages = [("down", i, s) for i, s in enumerate(cfg.down)] + ([("mid", None, cfg.mid)] if cfg.mid else [])
    stages += [("up", i, s) for i, s in enumerate(cfg.up)]
    out = []
    for path, i, stage in stages:
        where = path if i is None else f"{path}.{i}"
        blocks = []
        for bid in stage.blocks:
            p = plans[f"{where}.{bid}"]
            block = {"id": bid, "in": p.in_channels, "out": p.out_channels, "pop": p.pop_skip, "push": p.push_after}
            if p.kind == "attn":
                block["heads"] = cfg.heads(p.in_channels)
            blocks.append(block)
        out.append({"path": path, "channels": stage.channels, "blocks": blocks,
                    "resample": (path if path != "mid" and stage.resample else None)})
    return out


def full_vocabulary(text: TextEncoder) -> TextEncoder:
    """``text`` with CLIP's whole token embedding: a compact vocabulary's rows put back at their ids (the zero row
    for every other id), so that a plain CLIPTextModel gives the same output for every id."""
    if not text.config.vocab_rows:
        return text
    out = TextEncoder(dataclasses.replace(text.config, vocab_rows=0))
    state = {k: v for k, v in text.state_dict().items() if k != "token_map"}
    state[EMBEDDING_KEY] = state[EMBEDDING_KEY][text.token_map.long()]  # (49408, D)
    out.load_state_dict(state)
    return out.eval()


def _scheduler(pipe) -> dict:
    cfg, sched = pipe.config, pipe.config.schedule
    offset = getattr(cfg, "steps_offset", None)
    offset = (1 if cfg.timestep_spacing == "leading" else 0) if offset is None else offset
    common = {"num_train_timesteps": sched.num_train_timesteps, "beta_start": sched.beta_start,
              "beta_end": sched.beta_end, "beta_schedule": sched.beta_schedule, "trained_betas": None,
              "prediction_type": pipe.unet.config.prediction_type, "timestep_spacing": cfg.timestep_spacing,
              "steps_offset": offset, "_diffusers_version": DIFFUSERS_VERSION}
    if cfg.sampler == "dpmpp_2m":
        return {"_class_name": "DPMSolverMultistepScheduler", **common, "algorithm_type": "dpmsolver++",
                "solver_order": 2, "solver_type": "midpoint", "lower_order_final": True, "final_sigmas_type": "zero",
                "thresholding": False, "use_karras_sigmas": False, "euler_at_final": False}
    return {"_class_name": "DDIMScheduler", **common, "clip_sample": False,
            "set_alpha_to_one": bool(getattr(cfg, "set_alpha_to_one", False)), "thresholding": False,
            "rescale_betas_zero_snr": False}


def _write_json(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _write_part(folder: Path, config: dict, state: dict, dtype, code: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _write_json({**config, "_diffusers_version": DIFFUSERS_VERSION}, folder / "config.json")
    save_safetensors(state, folder / WEIGHTS, dtype=dtype, max_shard_bytes=None)
    if code:
        shutil.copyfile(CODE, folder / CODE.name)


def _write_tokenizer(pipe, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    source = Path(pipe.tokenizer.folder)
    names = ("vocab.json", "merges.txt") if (source / "vocab.json").is_file() else ("tokenizer.json",)
    for name in names:
        shutil.copyfile(source / name, folder / name)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": pipe.tokenizer.max_length,
              "do_lower_case": True, "errors": "replace", "add_prefix_space": False, **special}
    added = getattr(pipe.tokenizer, "added_tokens", {})
    if added:  # e.g. a textual-inversion token: transformers' added_tokens_decoder format
        config["added_tokens_decoder"] = {str(i): {"content": t, "lstrip": False, "rstrip": False,
                                                   "normalized": True, "single_word": False, "special": False}
                                          for t, i in sorted(added.items(), key=lambda kv: kv[1])}
    _write_json(config, folder / "tokenizer_config.json")
    _write_json(special, folder / "special_tokens_map.json")


def _vae(pipe, resolution: int) -> tuple[list, dict, dict, bool]:
    """(model_index entry, config, state, custom?) of the autoencoder."""
    decoder, encoder = pipe.decoder, pipe.encoder
    if not isinstance(decoder, Decoder):
        raise ConfigError(f"export --format diffusers: the {type(decoder).__name__} decoder has no diffusers form "
                          "(a KL decoder, full or channel-reduced, has)")
    state = {f"decoder.{k}": v for k, v in decoder.state_dict().items()}
    if isinstance(encoder, Encoder):
        state.update({f"encoder.{k}": v for k, v in encoder.state_dict().items()})
    dcfg = decoder.config
    plain = isinstance(encoder, Encoder) and encoder.config.encoder_widths == dcfg.decoder_widths and \
        encoder.config.norm_groups == dcfg.norm_groups and dcfg.double_z
    if plain:
        cfg = dataclasses.replace(dcfg, encoder_widths=dcfg.decoder_widths)
        return (["diffusers", "AutoencoderKL"], {**config_to_diffusers(cfg), "sample_size": resolution},
                vae_to_diffusers(state), False)
    ecfg = encoder.config if isinstance(encoder, Encoder) else None
    config = {"_class_name": "SnapFusionAutoencoder", "in_channels": dcfg.in_channels,
              "out_channels": dcfg.out_channels, "latent_channels": dcfg.latent_channels,
              "encoder_widths": list(ecfg.encoder_widths) if ecfg else None,
              "encoder_norm_groups": ecfg.norm_groups if ecfg else dcfg.norm_groups,
              "block_out_channels": list(dcfg.decoder_widths), "norm_num_groups": dcfg.norm_groups,
              "layers_per_block": dcfg.layers_per_block, "mid_block_add_attention": dcfg.mid_attention,
              "scaling_factor": dcfg.scaling_factor, "sample_size": resolution}
    return [MODULE, "SnapFusionAutoencoder"], config, vae_to_diffusers(state), True


def _unet(pipe) -> tuple[list, dict, dict, bool]:
    cfg, state = pipe.unet.config, pipe.unet.state_dict()
    sample_size = pipe.config.resolution // pipe.decoder.config.downscale
    try:
        config = {**diffusers_config_from_ours(cfg), "sample_size": sample_size}
        return ["diffusers", "UNet2DConditionModel"], config, ours_to_diffusers(state, cfg), False
    except ConfigError:  # not SD's block pattern: the custom UNet
        pass
    config = {"_class_name": "SnapFusionUNet", "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
              "stages": unet_stages(cfg), "context_dim": cfg.context_dim, "transformer_depth": cfg.transformer_depth,
              "linear_projection": cfg.linear_projection, "norm_groups": cfg.norm_groups,
              "time_embed_dim": cfg.time_embed_dim, "prediction_type": cfg.prediction_type,
              "sample_size": sample_size}
    return [MODULE, "SnapFusionUNet"], config, ours_to_custom(state, cfg), True


def export_diffusers(pipe, out: str | Path, *, dtype: torch.dtype | None = None) -> DiffusersExport:
    """Write ``pipe`` as a diffusers pipeline folder at ``out`` (weights in ``dtype``, default: as they are)."""
    refuse_guidance_embed(pipe, "diffusers")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unet_entry, unet_cfg, unet_state, unet_custom = _unet(pipe)
    vae_entry, vae_cfg, vae_state, vae_custom = _vae(pipe, pipe.config.resolution)
    _write_part(out / "unet", unet_cfg, unet_state, dtype, unet_custom)
    _write_part(out / "vae", vae_cfg, vae_state, dtype, vae_custom)
    text = full_vocabulary(pipe.text_encoder)  # transformers' CLIPTextModel layout: config.json, model.safetensors
    clip_text_config(text.config).save_pretrained(out / "text_encoder")
    save_safetensors(text.text_model.state_dict(), out / "text_encoder" / "model.safetensors", dtype=dtype,
                     max_shard_bytes=None, metadata={"format": "pt"})
    _write_tokenizer(pipe, out / "tokenizer")
    scheduler = _scheduler(pipe)
    _write_json(scheduler, out / "scheduler" / "scheduler_config.json")
    custom = tuple(n for n, c in (("unet", unet_custom), ("vae", vae_custom)) if c)
    # StableDiffusionPipeline guides every step: a stored guidance interval needs the custom pipeline class too
    limited = tuple(pipe.config.guidance_interval) != (0.0, 1.0)
    index = {"_diffusers_version": DIFFUSERS_VERSION, "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": unet_entry, "vae": vae_entry,
             "scheduler": ["diffusers", scheduler["_class_name"]]}
    if pipe.prior is not None:  # custom code in every case
        prior_cfg = {"_class_name": "LayoutPrior", **to_dict(pipe.prior.config)}
        _write_part(out / "layout_prior", prior_cfg, pipe.prior.state_dict(), torch.float32, True)
        if custom or limited:  # a plain StableDiffusionPipeline folder does not name it (diffusers would warn on
            # every load):
            index["layout_prior"] = [MODULE, "LayoutPrior"]  # SnapFusionPipeline finds layout_prior/ by itself
    shutil.copyfile(CODE, out / CODE.name)  # the custom pipeline, also usable over a plain SD folder
    if custom or limited:
        cls = "SnapFusionPipeline"
        index = {"_class_name": [MODULE, cls], **index, "default_steps": pipe.config.steps,
                 "default_guidance": pipe.config.guidance, "resolution": pipe.config.resolution,
                 "default_guidance_rescale": pipe.config.guidance_rescale,
                 "default_guidance_interval": list(pipe.config.guidance_interval)}
    else:
        cls = "StableDiffusionPipeline"
        index = {"_class_name": cls, **index, "safety_checker": [None, None], "feature_extractor": [None, None],
                 "image_encoder": [None, None], "requires_safety_checker": False}
    _write_json(index, out / "model_index.json")
    (out / "README.md").write_text(_readme(pipe, cls, custom))
    return DiffusersExport(out, cls, custom, pipe.prior is not None, limited)


def _readme(pipe, cls: str, custom: tuple[str, ...]) -> str:
    name, steps, guidance, phi = pipe.config.name, pipe.config.steps, pipe.config.guidance, pipe.config.guidance_rescale
    if cls == "StableDiffusionPipeline":
        rescale = f", guidance_rescale={phi}" if phi else ""  # StableDiffusionPipeline's own argument
        load = ("from diffusers import StableDiffusionPipeline\n"
                "pipe = StableDiffusionPipeline.from_pretrained(FOLDER)\n"
                f"image = pipe(prompt, num_inference_steps={steps}, guidance_scale={guidance}{rescale}).images[0]\n")
        prior = ("" if pipe.prior is None else
                 "\nWith the layout prior (what `snapfusion generate` does), through the custom pipeline:\n\n"
                 "```python\nfrom diffusers import DiffusionPipeline\n"
                 "pipe = DiffusionPipeline.from_pretrained(FOLDER, custom_pipeline=FOLDER + "
                 "'/snapfusion_diffusers.py', trust_remote_code=True)\n"
                 f"image = pipe(prompt, num_inference_steps={steps}, guidance_scale={guidance}{rescale}).images[0]"
                 "\n```\n")
    else:
        load = ("from diffusers import DiffusionPipeline\n"
                "pipe = DiffusionPipeline.from_pretrained(FOLDER, trust_remote_code=True)\n"
                "image = pipe(prompt).images[0]\n")
        prior = ""
    parts = list(custom) + (["layout_prior"] if pipe.prior is not None else [])
    code = ("The custom code (" + ", ".join(parts) + ", and the pipeline `SnapFusionPipeline`) is "
            "`snapfusion_diffusers.py`; it" if parts else "`snapfusion_diffusers.py` (the pipeline `SnapFusionPipeline`)")
    start, end = pipe.config.guidance_interval
    defaults = (f"{steps} steps, guidance {guidance}" + (f", guidance rescale {phi}" if phi else "")
                + (f", guidance interval {start:g}-{end:g} of the steps" if (start, end) != (0.0, 1.0) else ""))
    return (f"# {name} (diffusers)\n\nWritten by `snapfusion export --format diffusers`: a diffusers `{cls}` "
            f"folder (defaults: {defaults}).\n\n```python\n{load}```\n{prior}\n"
            f"{code} needs torch, diffusers and transformers, not snapfusion. Given the same seed (or starting "
            "latents) the images match `snapfusion generate`.\n")
