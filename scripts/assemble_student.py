"""Assemble the shipped SnapFusion pipeline (snapfusion/assets/models/snapfusion) from a distilled student UNet.

The student UNet is stored as weight-only int8 (weights.quantize_int8: 34 MB fp16 -> 17 MB); its text encoder and
the halved decoder are not copied but shared with the base pipeline and parts/ through model_index.json "parts",
so that every network is in the repository once (all shipped models stay under 90 MB).

    python scripts/assemble_student.py --unet runs/distill8/final --guidance 7.5
"""

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch

from snapfusion.errors import SnapFusionError
from snapfusion.loading import EMBEDDED
from snapfusion.decoder.io import load_decoder
from snapfusion.models.text import load_text_encoder
from snapfusion.models.unet import UNet
from snapfusion.pipeline import Pipeline, part_folder
from snapfusion.validation import check_guidance_rescale, parse_guidance_interval


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--unet", required=True, help="the distilled student UNet folder (v-prediction)")
    p.add_argument("--base", default=str(EMBEDDED / "base"), help="pipeline whose text encoder the student uses")
    p.add_argument("--decoder", default=str(EMBEDDED / "parts" / "vae_decoder_half"))
    p.add_argument("--prior", default=str(EMBEDDED / "base" / "prior"),
                   help="the layout prior on the same text tower (default: the base's, shared); 'none': no prior")
    p.add_argument("--out", default=str(EMBEDDED / "snapfusion"))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--guidance-rescale", type=float, default=0.0,
                   help="the model's default guidance rescale phi (two-call students; 0: plain guidance)")
    p.add_argument("--guidance-interval", default="0,1",
                   help="START,END: the model's default fraction of the steps that mix guidance (two-call students; "
                   "0,1: every step)")
    p.add_argument("--fp16", action="store_true", help="store the UNet in fp16 instead of int8")
    a = p.parse_args()
    check_guidance_rescale(a.guidance_rescale, name="--guidance-rescale")  # before anything loads
    interval = parse_guidance_interval(a.guidance_interval)
    out, base, decoder = Path(a.out), Path(a.base), Path(a.decoder)
    base_cfg = Pipeline.load(base).config
    cfg = dataclasses.replace(base_cfg, name="snapfusion", steps=a.steps, guidance=a.guidance, sampler="ddim",
                              timestep_spacing="trailing", guidance_rescale=a.guidance_rescale,
                              guidance_interval=interval)
    pipe = Pipeline(load_text_encoder(part_folder(base, "text_encoder")), UNet.load(a.unet), load_decoder(decoder),
                    cfg)
    pipe.resolve_guidance_rescale(a.guidance_rescale)  # these two: refused for a guidance-embedded UNet
    pipe.resolve_guidance_interval(interval, steps=a.steps, guidance=a.guidance)
    out.mkdir(parents=True, exist_ok=True)
    where = {"text_encoder": part_folder(base, "text_encoder"), "vae_decoder": decoder,
             "vae_encoder": part_folder(base, "vae_encoder")}  # the student trains in base's latent space
    if a.prior != "none":  # the prior reads the text tower's states, which the student shares with the base
        where["prior"] = Path(a.prior)
    rel = {k: Path(os.path.relpath(v.resolve(), out.resolve())).as_posix() for k, v in where.items()
           if (v / "config.json").is_file()}
    pipe.save(out, dtype=torch.float16, shared=rel, unet_int8=not a.fp16)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB; shared parts: {rel})")


if __name__ == "__main__":
    try:
        main()
    except SnapFusionError as err:  # a bad option or file: one line, exit 2
        print(f"assemble_student: error: {err}", file=sys.stderr)
        sys.exit(2)
