"""The ``snapfusion`` command. Each sub-command parses typed options, builds a config and calls one library function.

Errors a user can cause (``SnapFusionError``) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from snapfusion.loading import (DEFAULT_MODELS, EMBEDDED, SHIPPED_DECODERS, model_folder,  # noqa: F401
                                resolve_device, resolve_dtype, resolve_model, swap_decoder, swap_unet)


def _device(name: str) -> str:
    return resolve_device(name, option="--device")


def _dtype(name: str):
    return resolve_dtype(name, option="--dtype")


# ---- generate ------------------------------------------------------------------------------------------------

def _first(*values):
    """The first value that is not None (0 is a value: it must reach validation, not fall back to a default)."""
    return next((v for v in values if v is not None), None)


def cmd_generate(a: argparse.Namespace) -> None:
    import torch
    from PIL.PngImagePlugin import PngInfo
    from tqdm import tqdm

    from snapfusion.errors import SnapFusionError
    from snapfusion.pipeline import Timings, image_grid, to_pil

    if a.num_images < 1:
        raise SnapFusionError(f"--num-images must be at least 1, got {a.num_images}")
    if not a.prompt.strip():
        raise SnapFusionError("the prompt is empty (use --guidance 1 with a blank prompt via the Python API for "
                              "unconditional samples)")
    torch.set_grad_enabled(False)
    device = _device(a.device)
    if a.backend == "onnxruntime" and a.decoder:
        raise SnapFusionError("--decoder works with --backend torch; export a pipeline holding that decoder instead")
    if a.backend == "onnxruntime":
        from snapfusion.export.commands import load_backend

        pipe = load_backend(a.model, device)  # the same generate(); the networks run in onnxruntime
    else:
        pipe = swap_decoder(resolve_model(a.model, device=device), a.decoder, device=device)
    if a.dtype != "fp32" and a.backend == "torch":
        pipe.to(device, _dtype(a.dtype))
    if device.startswith("cuda") and a.backend == "torch" and not getattr(a, "no_fast", False):
        from snapfusion.fast import FastOptions, accelerate

        # channels-last, cached negative prompt; CUDA graphs from the second call with the same settings on
        accelerate(pipe, FastOptions(compile=getattr(a, "compile", False)))
    unknown = getattr(pipe.text_encoder, "unknown_tokens", None)
    if unknown is not None:  # a compact vocabulary (our domain models): say which words the model cannot read
        ids = pipe.tokenizer([a.prompt])[0]
        words = sorted({pipe.tokenizer.decode([int(i)]) for i in ids[unknown(ids[None])[0]]})
        if words:
            print(f"snapfusion: warning: {pipe.config.name} does not know the word(s) {', '.join(words)}; "
                  "they are read as blanks", file=sys.stderr)
    if pipe.tokenizer.is_truncated(a.prompt):
        print(f"snapfusion: warning: the prompt is longer than CLIP's {pipe.tokenizer.max_length - 2} tokens; "
              "the rest is dropped", file=sys.stderr)
    prompts = [a.prompt] * a.num_images
    seeds = [a.seed + i for i in range(a.num_images)]
    steps = _first(a.steps, pipe.config.steps)
    guidance = _first(a.guidance, pipe.config.guidance)
    timings = Timings()
    with tqdm(total=steps, desc="denoising", disable=a.quiet) as bar:
        images = pipe.generate(prompts, seeds, steps=steps, guidance=guidance, sampler=a.sampler,
                               height=_first(a.height, a.size), width=_first(a.width, a.size),
                               negative_prompt=a.negative_prompt, callback=lambda *_: bar.update(1),
                               timings=timings, use_prior=not a.no_prior)
    pics = to_pil(images)
    meta = PngInfo()
    for key, value in (("prompt", a.prompt), ("negative_prompt", a.negative_prompt), ("seed", seeds),
                       ("steps", steps), ("guidance", guidance), ("sampler", a.sampler or pipe.config.sampler),
                       ("model", a.model or pipe.config.name), ("decoder", a.decoder or "model's"),
                       ("software", "snapfusion")):
        meta.add_text(key, json.dumps(value) if not isinstance(value, str) else value)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    (pics[0] if len(pics) == 1 else image_grid(pics)).save(out, pnginfo=meta)
    t = timings.as_dict()
    print(f"wrote {out} ({pipe.config.name}, {steps} steps, guidance {guidance}, seed {a.seed}) in {t['total']:.2f} s: "
          f"text encoder {t['text_encoder']:.2f} s, UNet {t['unet_total']:.2f} s "
          f"({t['unet_per_step'] * 1000:.0f} ms/step), decoder {t['decoder']:.2f} s")


# ---- evaluation ----------------------------------------------------------------------------------------------

def cmd_eval(a: argparse.Namespace) -> None:
    import torch

    from snapfusion.errors import SnapFusionError
    from snapfusion.eval.runner import run_eval_command
    from snapfusion.pipeline import to_pil

    torch.set_grad_enabled(False)
    if a.seeds_per_prompt < 1 or (a.num_images is not None and a.num_images < 2):
        raise SnapFusionError("--seeds-per-prompt must be at least 1 and --num-images at least 2 (FID)")
    device = _device(a.device)
    pipe = swap_decoder(resolve_model(a.model, device=device), a.decoder, device=device)
    pipe = swap_unet(pipe, a.unet, device=device)
    if a.dtype != "fp32":
        pipe.to(device, _dtype(a.dtype))
    steps = a.steps or pipe.config.steps
    sampler = a.sampler or pipe.config.sampler

    def generate_fn(prompts, seeds, guidance):
        return to_pil(pipe.generate(prompts, seeds, steps=steps, guidance=guidance, sampler=sampler,
                                    height=a.size, width=a.size, use_prior=not a.no_prior))

    guidance = a.guidance if a.guidance is not None or a.guidance_sweep else pipe.config.guidance
    result = run_eval_command(generate_fn, prompts=a.prompts, steps=steps, sampler=sampler, guidance=guidance,
                              guidance_sweep=a.guidance_sweep, num_images=a.num_images, batch_size=a.batch_size,
                              out_dir=a.out, device=device,
                              model=(a.model or pipe.config.name) + (f" + decoder {a.decoder}" if a.decoder else "")
                              + (f" + unet {a.unet}" if a.unet else "")
                              + (f" ({a.dtype})" if a.dtype != "fp32" else "")
                              + (" (no prior)" if a.no_prior and pipe.prior is not None else ""),
                              num_emoji=a.num_emoji, seeds_per_prompt=a.seeds_per_prompt)
    rows = [{k: v for k, v in r.items() if k != "all_per_image"} for r in result.get("results", [])]
    print(json.dumps(rows or result, indent=1)[:4000])


# ---- training ------------------------------------------------------------------------------------------------

def _loop_cfg(a: argparse.Namespace):
    from snapfusion.train.loop import loop_config

    return loop_config(run_dir=a.run_dir, max_steps=a.max_steps, batch_size=a.batch_size, lr=a.lr,
                       warmup_steps=a.warmup_steps, ema_decay=a.ema_decay, mixed_precision=a.mixed_precision,
                       log_every=a.log_every, sample_every=a.sample_every, checkpoint_every=a.checkpoint_every,
                       max_minutes=a.max_minutes, seed=a.seed, num_workers=a.num_workers, compile=a.compile)


def _data_cfg(a: argparse.Namespace):
    from snapfusion.data import SceneConfig

    return SceneConfig(num_emoji=a.num_emoji)


def cmd_train_autoencoder(a: argparse.Namespace) -> None:
    from snapfusion.errors import SnapFusionError
    from snapfusion.train.stages import train_autoencoder
    from snapfusion.train.tasks import AutoencoderTaskConfig

    init = None
    if a.init:
        init = model_folder(a.init)
        if not init.is_dir():
            raise SnapFusionError(f"--init {a.init}: no such model or folder")
    if a.decoder_only and init is None:
        raise SnapFusionError("--decoder-only needs --init (the trained autoencoder whose decoder is fine-tuned)")
    train_autoencoder(_loop_cfg(a), AutoencoderTaskConfig(data=_data_cfg(a), init=str(init) if init else None,
                                                          decoder_only=a.decoder_only), resume=a.resume)


def cmd_train_text(a: argparse.Namespace) -> None:
    from snapfusion.train.stages import train_text
    from snapfusion.train.tasks import TextTaskConfig

    train_text(_loop_cfg(a), TextTaskConfig(data=_data_cfg(a)), resume=a.resume)


def cmd_train_unet(a: argparse.Namespace) -> None:
    import dataclasses

    from snapfusion.config import load_json
    from snapfusion.errors import SnapFusionError
    from snapfusion.models.presets import base_unet
    from snapfusion.pipeline import part_folder
    from snapfusion.train.stages import train_unet
    from snapfusion.train.tasks import UNetTaskConfig

    vae, text, init, decoder = a.vae, a.text_encoder, a.init_unet, a.vae_decoder
    if a.from_pipeline:  # continue training a pipeline's UNet on its own frozen text tower and autoencoder
        root = model_folder(a.from_pipeline)
        if not vae:  # the pipeline's encoder, so its decoder is the matching one for sample grids (if any)
            vae = str(part_folder(root, "vae_encoder"))
            decoder = decoder or (str(part_folder(root, "vae_decoder")) if a.sample_every else None)
        text, init = text or str(part_folder(root, "text_encoder")), init or str(part_folder(root, "unet"))
    if not vae or not text:
        raise SnapFusionError("train-unet needs --vae and --text-encoder, or --from-pipeline")
    check_noise_data_options(a)
    for flag, folder in (("--vae", vae), ("--text-encoder", text), ("--init-unet", init), ("--vae-decoder", decoder)):
        if folder and not Path(folder, "config.json").is_file():
            raise SnapFusionError(f"{flag} {folder}: no config.json there")
    if a.sample_every and not decoder and load_json(Path(vae, "config.json")).get("kind") != "vae":
        raise SnapFusionError(f"--vae {vae} holds no decoder: pass --vae-decoder for the sample grids "
                              "(or --sample-every 0)")
    model = base_unet()
    if init:  # continuing a trained UNet: keep its prediction type (e.g. the v-tuned base)
        model = dataclasses.replace(model, prediction_type=load_json(Path(init, "config.json"))["config"].get(
            "prediction_type", model.prediction_type))
    cfg = UNetTaskConfig(model=model, vae=vae, text_encoder=text, image_size=a.image_size,
                         data=_data_cfg(a), latent_pool=a.latent_pool, pool_workers=a.num_workers,
                         init_unet=init or "", vae_decoder=decoder or "", offset_noise=a.offset_noise,
                         clip_skip=a.clip_skip, offset_noise_grid=a.offset_noise_grid,
                         loss_weighting=a.loss_weighting, **_timestep_bias_options(a), **_mix_options(a))
    train_unet(_loop_cfg(a), cfg, resume=a.resume)


def _timestep_bias_options(a: argparse.Namespace) -> dict:
    """train-unet's --timestep-bias* flags as UNetTaskConfig fields."""
    from snapfusion.errors import SnapFusionError

    begin, end = a.timestep_bias_range if a.timestep_bias_range else (0, 1000)
    if bool(a.timestep_bias_range) != (a.timestep_bias == "range"):
        raise SnapFusionError("--timestep-bias range and --timestep-bias-range BEGIN END go together")
    return dict(timestep_bias=a.timestep_bias, timestep_bias_multiplier=a.timestep_bias_multiplier,
                timestep_bias_portion=a.timestep_bias_portion, timestep_bias_begin=begin, timestep_bias_end=end)


def _mix_options(a: argparse.Namespace) -> dict:
    """train-unet's --mix-* flags as UNetTaskConfig fields, their defaults filled in (none without --mix-size)."""
    if not a.mix_size:
        return {}
    return dict(mix_size=a.mix_size, mix_prob=a.mix_prob,
                mix_batch=a.mix_batch_size or max(1, a.batch_size * a.image_size ** 2 // a.mix_size ** 2),
                mix_pool=a.mix_pool or max(1, a.latent_pool // 4))


def cmd_train_prior(a: argparse.Namespace) -> None:
    import dataclasses

    import torch

    from snapfusion.config import save_json
    from snapfusion.errors import SnapFusionError
    from snapfusion.models.autoencoder import Encoder, load_autoencoder
    from snapfusion.pipeline import part_folder
    from snapfusion.prior import LayoutPriorConfig, PriorTrainConfig, build_targets, train_prior

    if a.scenes < 10 or a.steps < 1 or a.eval_every < 1 or not 0 <= a.calibrate <= a.scenes:
        raise SnapFusionError("--scenes must be >= 10, --steps and --eval-every >= 1 and --calibrate between 0 and "
                              "--scenes")
    device = _device(a.device)
    pipe = resolve_model(a.model, device=device)
    encoder_dir = Path(a.encoder) if a.encoder else part_folder(model_folder(a.model), "vae_encoder")
    if not (encoder_dir / "config.json").is_file():
        raise SnapFusionError(f"the layout prior needs a VAE encoder of {a.model}'s latent space: none at "
                              f"{encoder_dir} (--encoder)")
    encoder = load_autoencoder(encoder_dir, Encoder, device=device).eval()
    captions, targets = build_targets(encoder, a.scenes, Path(a.cache), grid=a.grid, size=a.encode_size,
                                      calibrate=a.calibrate, full_size=pipe.config.resolution,
                                      num_emoji=a.num_emoji, seed=a.seed, source=str(encoder_dir.resolve()))
    config = LayoutPriorConfig(context_dim=pipe.text_encoder.config.hidden_size,
                               latent_channels=pipe.unet.config.in_channels, grid=a.grid)
    train = PriorTrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, eval_every=a.eval_every,
                             keep_best=not a.keep_last)
    prior, report = train_prior(lambda c: pipe.encode_text(c).float().cpu(), captions, targets, config, train)
    out = Path(a.out)
    prior.save(out)
    save_json({"model": str(a.model), "scenes": a.scenes, "encode_size": a.encode_size, "calibrate": a.calibrate,
               "num_emoji": a.num_emoji, "seed": a.seed, "config": dataclasses.asdict(config), **report},
              out / "train_report.json")
    print(f"wrote {out} (step {report['kept_step']}): held-out R^2 {report['held_out_r2']:.3f} (MSE "
          f"{report['held_out_mse']:.4f}, target variance {report['held_out_variance']:.4f}; "
          f"{report['unselected_r2']:.3f} on the half that did not choose the step); put it in the pipeline folder "
          "as prior/ to use it")


def cmd_assemble(a: argparse.Namespace) -> None:
    from snapfusion.train.stages import assemble_pipeline

    out = assemble_pipeline(a.text_encoder, a.vae, a.unet, a.out, name=a.name, with_encoder=a.with_encoder,
                            clip_skip=a.clip_skip)
    print(f"wrote pipeline {out}")


def cmd_convert_sd(a: argparse.Namespace) -> None:
    import torch

    from snapfusion.sd15 import load_sd

    pipe = load_sd(a.path)
    pipe.save(a.out, dtype=torch.float16 if a.fp16 else None)
    print(f"wrote {a.out}")


# ---- argument parsing ----------------------------------------------------------------------------------------

def add_noise_data_options(p: argparse.ArgumentParser) -> None:
    """--offset-noise and --latent-pool: every command that trains a UNet on the scenes (train-unet, robust-train,
    evolve, finetune-v, distill) takes them."""
    p.add_argument("--offset-noise", type=float, default=0.0, help="per-channel noise offset, e.g. 0.1: lets the "
                   "model move a channel's mean, i.e. a flat background's color (docs/base_model.md)")
    p.add_argument("--latent-pool", type=int, default=0,
                   help="encode this many training scenes once and train on their latents (0: encode every batch)")


def check_noise_data_options(a: argparse.Namespace) -> None:
    from snapfusion.errors import SnapFusionError

    if a.offset_noise < 0:
        raise SnapFusionError(f"--offset-noise must be >= 0, got {a.offset_noise}")
    if a.latent_pool < 0:
        raise SnapFusionError(f"--latent-pool must be >= 0, got {a.latent_pool}")


def add_kd_options(p: argparse.ArgumentParser) -> None:
    """--kd-unet, --kd-weight, --kd-feature-weight: distillation from a frozen eps or v teacher UNet (robust-train,
    finetune-v)."""
    p.add_argument("--kd-unet", default=None, help="frozen teacher UNet folder (eps or v): add its (implied) eps as a "
                   "target, on the student's (implied) eps (output-level knowledge distillation, as BK-SDM fine-tunes "
                   "a pruned UNet)")
    p.add_argument("--kd-weight", type=float, default=None, help="weight of the distillation term (default 1)")
    p.add_argument("--kd-feature-weight", type=float, default=None, help="with --kd-unet: also match the "
                   "teacher's stage outputs, MSE summed over stages times this weight (BK-SDM's feature-level "
                   "distillation; default 0: off)")


def kd_options(a: argparse.Namespace) -> dict:
    """UNetTaskConfig's kd_* fields from add_kd_options' flags ({} without --kd-unet); a weight without a teacher is
    a one-line error."""
    from snapfusion.errors import SnapFusionError

    for flag, value in (("--kd-weight", a.kd_weight), ("--kd-feature-weight", a.kd_feature_weight)):
        if value is not None and not a.kd_unet:
            raise SnapFusionError(f"{flag} needs --kd-unet (the teacher it distills from)")
    if not a.kd_unet:
        return {}
    return dict(kd_unet=a.kd_unet, kd_weight=1.0 if a.kd_weight is None else a.kd_weight,
                kd_feature_weight=a.kd_feature_weight or 0.0)


def _add_train_options(p: argparse.ArgumentParser, *, steps: int, batch: int, lr: float) -> None:
    p.add_argument("--run-dir", required=True, help="checkpoints, logs and samples go here")
    p.add_argument("--resume", action="store_true", help="continue from the run dir's last checkpoint")
    p.add_argument("--max-steps", type=int, default=steps, help="total optimizer steps (default %(default)s)")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop cleanly with a checkpoint after this long")
    p.add_argument("--batch-size", type=int, default=batch, help="per process (default %(default)s)")
    p.add_argument("--lr", type=float, default=lr, help="AdamW learning rate (default %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="bf16")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--sample-every", type=int, default=1000)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--num-emoji", type=int, default=None, help="train on the first N atlas emoji (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the trained UNet (train-unet, finetune-v, distill): faster steps on a GPU "
                   "after a one-off compile of a few minutes, which counts against --max-minutes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="snapfusion", description="SnapFusion: fast text-to-image diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text -> PNG with the embedded model or a local SD-v1.5",
                       epilog='example: snapfusion generate "a red apple left of a cat on a blue background"')
    g.add_argument("prompt")
    g.add_argument("--model", default=None, help="'base', 'snapfusion', a pipeline folder, a diffusers SD folder "
                   "or an SD .safetensors file (default: the embedded SnapFusion model, else base)")
    g.add_argument("-o", "--out", default="snapfusion.png", help="output PNG (a grid if --num-images > 1)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-images", "--batch", type=int, default=1, help="images of the prompt, seeds seed..seed+n-1")
    g.add_argument("--steps", type=int, default=None, help="default: the model's")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    g.add_argument("--sampler", choices=["ddim", "dpmpp_2m"], default=None)
    g.add_argument("--size", type=int, default=None, help="square image side in pixels (default: the model's)")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--decoder", default=None, help="'half' (the distilled channel-halved decoder of base) or a "
                   "decoder folder, in place of the model's own")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--no-prior", action="store_true", help="start from plain noise even if the model has a layout "
                   "prior (prior/: the prompt's coarse layout at the first step's noise level)")
    g.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                   help="onnxruntime: --model is a folder from 'snapfusion export --format onnx'")
    g.add_argument("--no-fast", action="store_true", help="CUDA: plain generation, without snapfusion.fast")
    g.add_argument("--compile", action="store_true", help="CUDA: also torch.compile the networks (about a minute "
                   "at SD scale before the first image)")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="CLIP score, domain FID and attribute accuracy of a model on held-out prompts",
                       epilog="example: snapfusion eval --model base --num-images 200 --guidance-sweep 1,2,4,7.5")
    e.add_argument("--model", default=None, help="as for generate (default: the embedded model)")
    e.add_argument("--prompts", default="test", help="a shipped prompt set name (test, test200, val) or a .jsonl file")
    e.add_argument("--decoder", default=None, help="as for generate: 'half' or a decoder folder")
    e.add_argument("--unet", default=None, help="a UNet folder in place of the model's (e.g. a checkpoint's model/)")
    e.add_argument("--steps", type=int, default=None)
    e.add_argument("--guidance", type=float, default=None)
    e.add_argument("--guidance-sweep", default=None, help="comma-separated guidance scales, e.g. 1,2,4,7.5")
    e.add_argument("--sampler", choices=["ddim", "dpmpp_2m"], default=None)
    e.add_argument("--num-images", type=int, default=None,
                   help="use the first N prompts of the set (default: all; with --seeds-per-prompt K: N x K images)")
    e.add_argument("--num-emoji", type=int, default=None,
                   help="keep only prompts whose emoji are among the first N (the base model trains on 40)")
    e.add_argument("--seeds-per-prompt", type=int, default=1,
                   help="K > 1: every prompt K times with K seeds (the first copy is the set's own seeds): lower "
                        "variance on a small prompt set, and paired comparisons (scripts/compare_evals.py)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    e.add_argument("--out", default="eval_out", help="folder for the JSON, grid and curve")
    e.add_argument("--device", default="auto")
    e.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="network precision (bf16 or fp16 on a GPU: about twice as fast)")
    e.add_argument("--no-prior", action="store_true", help="as for generate: plain-noise starts")
    e.set_defaults(func=cmd_eval)

    t = sub.add_parser("train-autoencoder", help="train the KL-f8 autoencoder on rendered scenes")
    _add_train_options(t, steps=6000, batch=32, lr=2e-4)
    t.add_argument("--init", default=None, metavar="MODEL",
                   help="start from this autoencoder: 'base', a pipeline folder or a train-autoencoder final/")
    t.add_argument("--decoder-only", action="store_true",
                   help="with --init: freeze the encoder and train the decoder alone, so that the latent space and "
                   "every UNet trained on it stay valid (as SD's ft-MSE decoder)")
    t.set_defaults(func=cmd_train_autoencoder)
    t = sub.add_parser("train-text", help="pretrain the CLIP text tower contrastively (then it stays frozen)")
    _add_train_options(t, steps=4000, batch=256, lr=5e-4)
    t.set_defaults(func=cmd_train_text)
    t = sub.add_parser("train-unet", help="train the base UNet (frozen text tower and autoencoder): eps-prediction "
                       "from scratch; a --init-unet / --from-pipeline UNet keeps its own prediction type")
    _add_train_options(t, steps=40000, batch=64, lr=2e-4)
    t.add_argument("--vae", default=None, help="folder of the trained autoencoder (its final/ export)")
    t.add_argument("--text-encoder", default=None, help="folder of the trained text encoder")
    t.add_argument("--init-unet", default=None, help="start from this UNet folder instead of random weights")
    t.add_argument("--vae-decoder", default=None, help="decoder for sample grids when --vae is an encoder alone")
    t.add_argument("--from-pipeline", default=None, metavar="MODEL",
                   help="'base' or a pipeline folder: continue its UNet on its text encoder and autoencoder")
    t.add_argument("--image-size", type=int, default=512)
    t.add_argument("--clip-skip", type=int, default=0, metavar="K",
                   help="condition on the text tower without its last K layers (diffusers' clip_skip; SD 2 uses the "
                   "penultimate layer, K = 1); pass the same K to assemble")
    add_noise_data_options(t)
    t.add_argument("--offset-noise-grid", type=int, default=1, metavar="G",
                   help="also add the --offset-noise on coarse grids 2x2, 4x4, .. GxG, bilinearly upsampled (G a power "
                   "of 2): lets the model choose a gradient background's direction, as --offset-noise its color")
    t.add_argument("--loss-weighting", choices=["min-snr", "v", "hybrid"], default="min-snr",
                   help="min-snr (default): Min-SNR-5 weights on the eps error; v: the plain v MSE's weights 1 + 1/SNR "
                   "rescaled to mean 1 over t, so the noisiest steps, which choose the layout, weigh up to 10x more; "
                   "hybrid: per sample the larger of the two, rescaled to mean 1 (the noisy end as v, the middle "
                   "nearly as min-snr)")
    t.add_argument("--timestep-bias", choices=["none", "later", "earlier", "range"], default="none",
                   help="draw some timesteps more often (diffusers' --timestep_bias_strategy): later = the noisiest "
                   "--timestep-bias-portion of them, earlier = the least noisy, range = --timestep-bias-range")
    t.add_argument("--timestep-bias-multiplier", type=float, default=2.0,
                   help="how many times as often the favoured timesteps are drawn (0: never)")
    t.add_argument("--timestep-bias-portion", type=float, default=0.25, help="later / earlier: their share of the "
                   "timesteps (default 0.25)")
    t.add_argument("--timestep-bias-range", type=int, nargs=2, default=None, metavar=("BEGIN", "END"),
                   help="range: the favoured timesteps, BEGIN <= t < END")
    t.add_argument("--mix-size", type=int, default=0, help="mixed-resolution training (with --latent-pool): some "
                   "steps train at this size instead of --image-size, e.g. --image-size 256 --mix-size 512")
    t.add_argument("--mix-prob", type=float, default=0.25, help="share of the steps at --mix-size (default 0.25)")
    t.add_argument("--mix-batch-size", type=int, default=0, help="scenes per --mix-size step (default: "
                   "--batch-size x (image-size / mix-size)², the same latent positions as a normal step)")
    t.add_argument("--mix-pool", type=int, default=0, help="scenes in the --mix-size latent pool (default: "
                   "--latent-pool / 4)")
    t.set_defaults(func=cmd_train_unet)

    t = sub.add_parser("train-prior", help="train a pipeline's terminal layout prior (prior/): the prompt's coarse "
                       "layout, which SD's schedule leaks into the starting latent (CPU: minutes)")
    t.add_argument("--model", default="base", help="the pipeline whose text states and latent space it serves")
    t.add_argument("--out", required=True, help="the prior's folder (copy it to <pipeline>/prior to use it)")
    t.add_argument("--encoder", default=None, help="the VAE encoder folder of the model's latent space (default: "
                   "the pipeline's vae_encoder/; the SnapFusion student has none, it shares base's)")
    t.add_argument("--scenes", type=int, default=10000, help="training renders (the last 10%% are held out)")
    t.add_argument("--encode-size", type=int, default=128, help="renders are encoded at this size (cheap)")
    t.add_argument("--calibrate", type=int, default=64, help="renders also encoded at full size, for a per-channel "
                   "affine map of the reduced-size block means (0: none)")
    t.add_argument("--grid", type=int, default=2, help="predict the latent's G x G block means")
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--eval-every", type=int, default=250, help="held-out MSE every N steps (default %(default)s)")
    t.add_argument("--keep-last", action="store_true", help="keep the last step's weights (default: early stopping, "
                   "the evaluated step with the lowest MSE on the first half of the held-out scenes)")
    t.add_argument("--num-emoji", type=int, default=None, help="as the UNet trained (the base: 40)")
    t.add_argument("--seed", type=int, default=16, help="the training scenes' seed")
    t.add_argument("--cache", default="runs/prior_cache", help="encoded block means, in chunks (a killed run resumes)")
    t.add_argument("--device", default="cpu")
    t.set_defaults(func=cmd_train_prior)

    s = sub.add_parser("assemble", help="put trained parts together into a pipeline folder (fp16)")
    s.add_argument("--text-encoder", required=True)
    s.add_argument("--vae", required=True)
    s.add_argument("--unet", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--name", default="base")
    s.add_argument("--with-encoder", action="store_true", help="also ship the VAE encoder")
    s.add_argument("--clip-skip", type=int, default=0, metavar="K",
                   help="ship the text tower without its last K layers: the train-unet --clip-skip of the UNet")
    s.set_defaults(func=cmd_assemble)

    c = sub.add_parser("convert-sd", help="convert a local SD-v1.x (diffusers folder or .safetensors) to our format")
    c.add_argument("path")
    c.add_argument("--out", required=True)
    c.add_argument("--fp16", action="store_true")
    c.set_defaults(func=cmd_convert_sd)

    # Commands of the compression stages live beside their library code; each module adds its sub-parsers here.
    from snapfusion.export.commands import register as register_export  # export, bench
    register_export(sub)
    from snapfusion.evolve.commands import register as register_evolve
    register_evolve(sub)
    from snapfusion.distill.commands import register as register_distill
    register_distill(sub)
    from snapfusion.decoder.commands import register as add_decoder_commands
    add_decoder_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from snapfusion.errors import SnapFusionError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    import torch

    grad_enabled = torch.is_grad_enabled()  # commands may switch autograd off; restore it for in-process callers
    try:
        args.func(args)
    except SnapFusionError as err:
        print(f"snapfusion: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an unreadable input or unwritable output path
        print(f"snapfusion: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("snapfusion: interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_grad_enabled(grad_enabled)
    return 0


if __name__ == "__main__":
    sys.exit(main())
