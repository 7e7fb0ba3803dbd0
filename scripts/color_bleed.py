"""Does the autoencoder keep an object's color? Flat single-color images and a square of one color on a background of
another go through the encoder (posterior mean) and each given decoder; the report is the RGB at the image center.

    python scripts/color_bleed.py --decoder snapfusion/assets/models/base/vae_decoder --decoder old_decoder/ \
        --out color_bleed.json

A decoder that brings back the flat colors but not the square's shows that the latent can hold the color and that
the encoder-decoder pair mixes it with its surroundings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from snapfusion.loading import model_folder
from snapfusion.decoder.io import load_decoder
from snapfusion.errors import SnapFusionError
from snapfusion.models.autoencoder import Encoder, load_autoencoder
from snapfusion.pipeline import part_folder

COLORS = {"red": (220, 30, 30), "blue": (40, 90, 220), "orange": (245, 140, 20), "yellow": (250, 215, 30)}
CASES = [("red", None), ("blue", None), ("orange", None), ("red", "blue"), ("yellow", "red"), ("orange", "blue")]


def image(color: str, background: str | None, size: int) -> torch.Tensor:
    """(1, 3, size, size) in [-1, 1]: ``color`` everywhere, or a centered square of a quarter of the side's area on
    ``background``."""
    fill = torch.tensor(COLORS[background or color], dtype=torch.float32).view(3, 1, 1).expand(3, size, size).clone()
    if background:
        lo, hi = 3 * size // 8, 5 * size // 8
        fill[:, lo:hi, lo:hi] = torch.tensor(COLORS[color], dtype=torch.float32).view(3, 1, 1)
    return (fill / 127.5 - 1)[None]


@torch.no_grad()
def center_rgb(encoder: Encoder, decoder: torch.nn.Module, x: torch.Tensor) -> list[int]:
    out = decoder(encoder.encode(x).mean)
    c = x.shape[-1] // 2
    return ((out[0, :, c, c].clamp(-1, 1) + 1) * 127.5).round().int().tolist()


def run(model: str, decoders: list[str], size: int) -> dict:
    if size % 8 or size < 16:
        raise SnapFusionError(f"--size must be a multiple of 8 and at least 16, got {size}")
    root = model_folder(model)
    encoder = load_autoencoder(part_folder(root, "vae_encoder"), Encoder).eval()
    folders = decoders or [str(part_folder(root, "vae_decoder"))]
    loaded = {f: load_decoder(f).eval() for f in folders}
    rows = []
    for color, background in CASES:
        x = image(color, background, size)
        rows.append({"color": color, "rgb": list(COLORS[color]), "background": background,
                     "decoded_center": {f: center_rgb(encoder, d, x) for f, d in loaded.items()}})
    return {"model": str(root), "size": size, "cases": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="base", help="a pipeline with vae_encoder/ (default %(default)s)")
    p.add_argument("--decoder", action="append", default=[], help="a decoder folder (repeat; default: the model's)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--out", default=None, help="also write the report here (JSON)")
    a = p.parse_args(argv)
    try:
        report = run(a.model, a.decoder, a.size)
    except (SnapFusionError, OSError) as err:
        print(f"color_bleed: error: {err}", file=sys.stderr)
        return 2
    for row in report["cases"]:
        where = f"on {row['background']}" if row["background"] else "flat"
        print(f"{row['color']} {tuple(row['rgb'])} {where}: " +
              "  ".join(f"{Path(f).name or f} {tuple(v)}" for f, v in row["decoded_center"].items()))
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
