"""``snapfusion generate`` and ``snapfusion eval``: use a model."""

from __future__ import annotations

import argparse
import json
import sys

from snapfusion.cli import options, types
from snapfusion.errors import InputError, SnapFusionError
from snapfusion.loading import check_decoder, check_model, check_unet_folder, resolve_model, swap_decoder, swap_unet
from snapfusion.validation import (MAX_EVAL_BATCH, MAX_SEED, check_negative_prompt_fits, truncation_warning,
                                   used_guidance_interval, used_guidance_rescale, used_negative_prompt)

RESCALE_HELP = ("guidance rescale phi in [0, 1] (Lin et al. 2024): the guided output is scaled toward the spread of "
                "the conditional one; keeps high guidance from over-saturating (two-call models; default: the "
                "model's, 0 for most)")
INTERVAL_HELP = ("START,END: guide only the steps i (of n) with START <= i/n < END, the others run the conditional "
                 "pass alone (one UNet call instead of two), e.g. 0,0.5 guides the first half (two-call models; "
                 "default: the model's, 0,1: every step)")


def _ort_pipeline(model: str | None, device: str):
    """The ONNX Runtime pipeline of an export folder (``generate --backend onnxruntime``)."""
    from snapfusion.export.ort import OrtPipeline, providers_for

    return OrtPipeline.load(model, providers=providers_for(device))


def _warn_unreadable(pipe, prompt: str, negative_prompt: str = "") -> None:
    """Say which words a compact-vocabulary model reads as blanks, and whether CLIP truncates either prompt."""
    unknown = getattr(pipe.text_encoder, "unknown_tokens", None)
    if unknown is not None:  # a compact vocabulary (our domain models): say which words the model cannot read
        ids = pipe.tokenizer([prompt])[0]
        words = sorted({pipe.tokenizer.decode([int(i)]) for i in ids[unknown(ids[None])[0]]})
        if words:
            print(f"snapfusion: warning: {pipe.config.name} does not know the word(s) {', '.join(words)}; "
                  "they are read as blanks", file=sys.stderr)
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        warning = truncation_warning(pipe.tokenizer, text, name=name)
        if warning:
            print(f"snapfusion: warning: {warning}", file=sys.stderr)


def check_generate(a: argparse.Namespace) -> None:
    """generate's cross-option checks (each option's own are its argparse type)."""
    if a.backend == "onnxruntime":
        if a.decoder:
            raise InputError("--decoder works with --backend torch; export a pipeline holding that decoder instead")
        if not a.model:
            raise InputError("--backend onnxruntime needs --model pointing to a folder written by "
                             "'snapfusion export --format onnx'")
    check_model(a.model)
    check_decoder(a.decoder)


def cmd_generate(a: argparse.Namespace) -> None:
    import torch
    from tqdm import tqdm

    from snapfusion.images import image_metadata, save_image
    from snapfusion.pipeline import Timings, image_grid, to_pil

    torch.set_grad_enabled(False)
    device = options.device(a.device)
    if a.backend == "onnxruntime":
        pipe = _ort_pipeline(a.model, device)  # the same generate(); the networks run in onnxruntime
    else:
        pipe = swap_decoder(resolve_model(a.model, device=device), a.decoder, device=device)
    if a.dtype != "fp32" and a.backend == "torch":
        pipe.to(device, options.dtype(a.dtype))
    if device.startswith("cuda") and a.backend == "torch" and not a.no_fast:
        from snapfusion.fast import FastOptions, accelerate

        # channels-last, cached negative prompt; CUDA graphs from the second call with the same settings on
        accelerate(pipe, FastOptions(compile=a.compile))
    check_negative_prompt_fits(a.negative_prompt, embeds_guidance=pipe.embeds_guidance, model=pipe.config.name)
    rescale = pipe.resolve_guidance_rescale(a.guidance_rescale)
    _warn_unreadable(pipe, a.prompt, a.negative_prompt)
    prompts = [a.prompt] * a.num_images
    seeds = [(a.seed + i) % (MAX_SEED + 1) for i in range(a.num_images)]
    steps = options.first(a.steps, pipe.config.steps)
    guidance = options.first(a.guidance, pipe.config.guidance)
    interval = pipe.resolve_guidance_interval(a.guidance_interval, steps=steps, guidance=guidance)
    timings = Timings()
    with tqdm(total=steps, desc="denoising", disable=a.quiet) as bar:
        images = pipe.generate(prompts, seeds, steps=steps, guidance=guidance, sampler=a.sampler,
                               height=options.first(a.height, a.size), width=options.first(a.width, a.size),
                               negative_prompt=a.negative_prompt, callback=lambda *_: bar.update(1),
                               timings=timings, use_prior=not a.no_prior, guidance_rescale=rescale,
                               guidance_interval=interval)
    pics = to_pil(images)
    rescale = used_guidance_rescale(rescale, guidance)
    interval = used_guidance_interval(interval, guidance)
    limited = interval != (0.0, 1.0)
    from snapfusion.metadata import a1111_parameters  # the text AUTOMATIC1111-style tools read

    sampler = a.sampler or pipe.config.sampler
    parameters = a1111_parameters(
        a.prompt, negative_prompt=used_negative_prompt(a.negative_prompt, guidance), steps=steps, sampler=sampler,
        guidance=guidance, seed=seeds[0], width=pics[0].width, height=pics[0].height,
        model=a.model or pipe.config.name,
        extra={"Guidance rescale": rescale or None,
               "Guidance interval": f"{interval[0]:g}-{interval[1]:g}" if limited else None, "Decoder": a.decoder,
               "Layout prior": "off" if a.no_prior else None})
    meta = image_metadata(prompt=a.prompt, negative_prompt=a.negative_prompt, seeds=seeds, steps=steps,
                          guidance=guidance, sampler=sampler, model=a.model or pipe.config.name,
                          decoder=a.decoder or "model's", parameters=parameters,
                          **({"guidance_rescale": rescale} if rescale else {}),
                          **({"guidance_interval": list(interval)} if limited else {}))
    out = save_image(pics[0] if len(pics) == 1 else image_grid(pics), a.out, meta)
    t = timings.as_dict()
    phi = (f", guidance rescale {rescale:g}" if rescale else "") + (
        f", guidance interval {interval[0]:g}-{interval[1]:g}" if limited else "")
    print(f"wrote {out} ({pipe.config.name}, {steps} steps, guidance {guidance}{phi}, seed {a.seed}) in "
          f"{t['total']:.2f} s: "
          f"text encoder {t['text_encoder']:.2f} s, UNet {t['unet_total']:.2f} s "
          f"({t['unet_per_step'] * 1000:.0f} ms/step), decoder {t['decoder']:.2f} s")


def check_eval(a: argparse.Namespace) -> None:
    """eval's cross-option checks: one guidance option, the prompt set and its size, the model's files."""
    from snapfusion.eval.runner import load_records, with_seeds_per_prompt

    if a.guidance is not None and a.guidance_sweep is not None:
        raise InputError("give exactly one of --guidance or --guidance-sweep")
    if a.num_images is not None and a.num_images < 2:
        raise InputError(f"--num-images must be at least 2 (FID compares sets of images), got {a.num_images}")
    with_seeds_per_prompt([], a.seeds_per_prompt)  # the runner's own check: at least 1
    try:
        records = load_records(a.prompts, a.num_emoji)
    except SnapFusionError as err:
        raise InputError(f"--prompts: {err}") from None
    if a.num_images is not None and a.num_images > len(records):
        raise InputError(f"--num-images {a.num_images} exceeds the {len(records)} prompts of {a.prompts}")
    check_model(a.model)
    check_decoder(a.decoder)
    check_unet_folder(a.unet)


def cmd_eval(a: argparse.Namespace) -> None:
    import torch

    from snapfusion.eval.runner import run_eval_command
    from snapfusion.pipeline import to_pil

    torch.set_grad_enabled(False)
    device = options.device(a.device)
    pipe = swap_decoder(resolve_model(a.model, device=device), a.decoder, device=device)
    pipe = swap_unet(pipe, a.unet, device=device)
    if a.dtype != "fp32":
        pipe.to(device, options.dtype(a.dtype))
    steps = a.steps or pipe.config.steps
    sampler = a.sampler or pipe.config.sampler

    rescale = pipe.resolve_guidance_rescale(a.guidance_rescale)
    guidance = a.guidance if a.guidance is not None or a.guidance_sweep else pipe.config.guidance
    # the interval must guide some step at every scale other than 1 (at 1 nothing is guided): check it at one
    guided_w = next((w for w in (a.guidance_sweep or [guidance]) if w != 1.0), 1.0)
    interval = pipe.resolve_guidance_interval(a.guidance_interval, steps=steps, guidance=guided_w)

    def generate_fn(prompts, seeds, guidance):
        return to_pil(pipe.generate(prompts, seeds, steps=steps, guidance=guidance, sampler=sampler,
                                    height=a.size, width=a.size, use_prior=not a.no_prior, guidance_rescale=rescale,
                                    guidance_interval=interval))

    result = run_eval_command(generate_fn, prompts=a.prompts, steps=steps, sampler=sampler, guidance=guidance,
                              guidance_sweep=a.guidance_sweep, num_images=a.num_images, batch_size=a.batch_size,
                              out_dir=a.out, device=device,
                              model=(a.model or pipe.config.name) + (f" + decoder {a.decoder}" if a.decoder else "")
                              + (f" + unet {a.unet}" if a.unet else "")
                              + (f" ({a.dtype})" if a.dtype != "fp32" else "")
                              + (f" (guidance rescale {rescale:g})" if rescale else "")
                              + (f" (guidance interval {interval[0]:g}-{interval[1]:g})"
                                 if interval != (0.0, 1.0) else "")
                              + (" (no prior)" if a.no_prior and pipe.prior is not None else ""),
                              num_emoji=a.num_emoji, seeds_per_prompt=a.seeds_per_prompt,
                              guidance_rescale=rescale, guidance_interval=interval)
    rows = [{k: v for k, v in r.items() if k != "all_per_image"} for r in result.get("results", [])]
    print(json.dumps(rows or result, indent=1)[:4000])


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``generate`` and ``eval``."""
    g = sub.add_parser("generate", help="text -> PNG with the embedded model or a local SD-v1.5",
                       epilog='example: snapfusion generate "a red apple left of a cat on a blue background"')
    g.add_argument("prompt", type=types.prompt("prompt", allow_empty=False), help="what to draw")
    g.add_argument("--model", default=None, help="'snapfusion' (guidance embedded: one UNet call per step, no negative "
                   "prompt), 'snapfusion-cfg' (two calls per step, negative prompts), 'base', a pipeline folder, a "
                   "diffusers SD folder or an SD .safetensors file (default: the embedded SnapFusion model)")
    g.add_argument("-o", "--out", default="snapfusion.png", type=types.output_image(),
                   help="output image, .png, .jpg or .webp, with the settings in its metadata (a grid if "
                   "--num-images > 1)")
    g.add_argument("--seed", type=types.seed(), default=0, help="seed of the first image (default %(default)s)")
    g.add_argument("--num-images", "--batch", type=types.num_images(), default=1,
                   help="images of the prompt, seeds seed..seed+n-1")
    g.add_argument("--steps", type=types.steps(), default=None, help="default: the model's")
    g.add_argument("--guidance", type=types.guidance(), default=None,
                   help="classifier-free guidance scale (default: the model's)")
    g.add_argument("--guidance-rescale", type=types.guidance_rescale(), default=None, help=RESCALE_HELP)
    g.add_argument("--guidance-interval", type=types.guidance_interval(), default=None, help=INTERVAL_HELP)
    options.add_sampler(g)
    g.add_argument("--size", type=types.side("--size"), default=None,
                   help="square image side in pixels (default: the model's)")
    g.add_argument("--height", type=types.side("--height"), default=None,
                   help="image height in pixels (default: --size)")
    g.add_argument("--width", type=types.side("--width"), default=None, help="image width in pixels (default: --size)")
    g.add_argument("--negative-prompt", default="", type=types.prompt("--negative-prompt"),
                   help="what to steer away from (the unconditional prompt)")
    g.add_argument("--decoder", default=None, help="'half' (the distilled channel-halved decoder of base) or a "
                   "decoder folder, in place of the model's own")
    options.add_device(g)
    options.add_dtype(g)
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--no-prior", action="store_true", help="start from plain noise even if the model has a layout "
                   "prior (prior/: the prompt's coarse layout at the first step's noise level)")
    g.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                   help="onnxruntime: --model is a folder from 'snapfusion export --format onnx'")
    g.add_argument("--no-fast", action="store_true", help="CUDA: plain generation, without snapfusion.fast")
    g.add_argument("--compile", action="store_true", help="CUDA: also torch.compile the networks (about a minute "
                   "at SD scale before the first image)")
    g.set_defaults(func=cmd_generate, check=check_generate)

    e = sub.add_parser("eval", help="CLIP score, domain FID and attribute accuracy of a model on held-out prompts",
                       epilog="example: snapfusion eval --model base --num-images 200 --guidance-sweep 1,2,4,7.5")
    e.add_argument("--model", default=None, help="as for generate (default: the embedded model)")
    e.add_argument("--prompts", default="test", help="a shipped prompt set name (test, test200, val) or a .jsonl file")
    e.add_argument("--decoder", default=None, help="as for generate: 'half' or a decoder folder")
    e.add_argument("--unet", default=None, help="a UNet folder in place of the model's (e.g. a checkpoint's model/)")
    e.add_argument("--steps", type=types.steps(), default=None, help="default: the model's")
    e.add_argument("--guidance", type=types.guidance(), default=None, help="guidance scale (default: the model's)")
    e.add_argument("--guidance-sweep", type=types.guidance_sweep(), default=None,
                   help="comma-separated guidance scales, e.g. 1,2,4,7.5")
    e.add_argument("--guidance-rescale", type=types.guidance_rescale(), default=None, help=RESCALE_HELP)
    e.add_argument("--guidance-interval", type=types.guidance_interval(), default=None, help=INTERVAL_HELP)
    options.add_sampler(e)
    e.add_argument("--num-images", type=int, default=None,
                   help="use the first N prompts of the set (default: all; with --seeds-per-prompt K: N x K images)")
    e.add_argument("--num-emoji", type=types.positive("--num-emoji"), default=None,
                   help="keep only prompts whose emoji are among the first N (the base model trains on 40)")
    e.add_argument("--seeds-per-prompt", type=int, default=1,
                   help="K > 1: every prompt K times with K seeds (the first copy is the set's own seeds): lower "
                        "variance on a small prompt set, and paired comparisons (scripts/compare_evals.py)")
    e.add_argument("--batch-size", type=types.positive("--batch-size", maximum=MAX_EVAL_BATCH), default=16,
                   help="images per generate call (default %(default)s)")
    e.add_argument("--size", type=types.side("--size"), default=None, help="image side (default: the model's)")
    e.add_argument("--out", default="eval_out", type=types.output_dir(), help="folder for the JSON, grid and curve")
    options.add_device(e)
    options.add_dtype(e, help="network precision (bf16 or fp16 on a GPU: about twice as fast)")
    e.add_argument("--no-prior", action="store_true", help="as for generate: plain-noise starts")
    e.set_defaults(func=cmd_eval, check=check_eval)
