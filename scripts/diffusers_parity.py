"""PSNR of diffusers' image against ours for a model exported with ``snapfusion export --format diffusers`` (and,
for SD-shaped models, ``--format single-file`` loaded by ``from_single_file``): same prompt, seed and settings.

    python scripts/diffusers_parity.py --model base --steps 8 --size 512
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from snapfusion.errors import ConfigError
from snapfusion.export.diffusers_export import export_diffusers, load_for_export
from snapfusion.export.single_file import export_single_file


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a.float() - b.float()) ** 2).mean().clamp_min(1e-20)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="base")
    p.add_argument("--prompt", default="a red apple to the left of a cat on a blue background")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=512)
    a = p.parse_args()
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    torch.set_grad_enabled(False)
    pipe = load_for_export(a.model)
    guidance = pipe.config.guidance
    ours = pipe.generate([a.prompt], [a.seed], steps=a.steps, guidance=guidance, height=a.size, width=a.size)
    ours_plain = pipe.generate([a.prompt], [a.seed], steps=a.steps, guidance=guidance, height=a.size, width=a.size,
                               use_prior=False, guidance_interval=(0, 1))  # as StableDiffusionPipeline: every step
    kw = dict(num_inference_steps=a.steps, guidance_scale=guidance, height=a.size, width=a.size, output_type="pt",
              guidance_rescale=pipe.config.guidance_rescale)  # the model's stored default, as generate applies it
    gen = lambda: torch.Generator("cpu").manual_seed(a.seed)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "export"
        report = export_diffusers(pipe, folder)
        print(report.summary())
        t0 = time.time()
        if report.custom or report.limited:
            theirs = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
        else:
            plain = StableDiffusionPipeline.from_pretrained(folder)
            image = plain(a.prompt, generator=gen(), **kw).images
            print(f"{a.model}: StableDiffusionPipeline vs ours without the prior: "
                  f"PSNR {psnr(image, ours_plain):.1f} dB")
            theirs = DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(folder / "snapfusion_diffusers.py"),
                                                       trust_remote_code=True)
        image = theirs(a.prompt, generator=gen(), **kw).images
        print(f"{a.model}: {type(theirs).__name__} ({type(theirs.unet).__name__}, {type(theirs.vae).__name__}) vs "
              f"ours: PSNR {psnr(image, ours):.1f} dB, max |diff| {(image - ours).abs().max():.2e} "
              f"({a.size}x{a.size}, {a.steps} steps, guidance {guidance}, seed {a.seed}; {time.time() - t0:.0f} s)")
        try:
            single = export_single_file(pipe, Path(tmp) / "model.safetensors")
        except ConfigError as err:
            print(f"{a.model}: single-file: {err}")
            return
        sf = StableDiffusionPipeline.from_single_file(str(single.path), config=str(folder), local_files_only=True)
        image = sf(a.prompt, generator=gen(), **kw).images
        print(f"{a.model}: from_single_file vs ours without the prior: PSNR {psnr(image, ours_plain):.1f} dB")


if __name__ == "__main__":
    main()
