"""The autoencoder's ceiling on the evaluation: the test prompts' own renders, sent through the encoder and a decoder
(no UNet), read by the same evaluators. No UNet on this latent space can score more than what survives the round
trip, so this is the upper bound the base model's attribute target is measured against.

    python scripts/ae_ceiling.py --model base --num-emoji 40 --out docs/img/s9_eval/ae_ceiling.json
    python scripts/ae_ceiling.py --model base --decoder snapfusion/assets/models/parts/vae_decoder_half ...

Rows: the renders themselves, and the round trip through the posterior mean (the latent a UNet aims at). Same
metrics as ``snapfusion eval`` (CLIP score, domain FID, attribute accuracy with per-image results).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from snapfusion.cli import model_folder
from snapfusion.data import Scene, render
from snapfusion.decoder.evaluate import decode_unit
from snapfusion.decoder.io import load_decoder
from snapfusion.eval.evaluators import evaluate_images, load_evaluators
from snapfusion.eval.runner import load_records
from snapfusion.models.autoencoder import Encoder, load_autoencoder
from snapfusion.pipeline import part_folder


def renders(records: list[dict], size: int) -> torch.Tensor:
    """uint8 (N, 3, size, size) renders of the records' scenes."""
    return torch.from_numpy(np.stack([np.asarray(render(Scene.from_dict(r["scene"]), size)) for r in records])
                            ).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def round_trip(encoder: Encoder, decoder: torch.nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """uint8 images -> posterior-mean latents -> decoded uint8 images, in batches on the encoder's device."""
    device = next(encoder.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i: i + batch_size].to(device).float() / 127.5 - 1
        z = encoder.latents_from_images(x, sample=False)
        out.append((decode_unit(decoder, z, batch_size=batch_size) * 255).round().to(torch.uint8))
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="base", help="a pipeline with an encoder (vae_encoder/)")
    p.add_argument("--decoder", default="", help="a decoder folder (default: the model's own)")
    p.add_argument("--prompts", default="test")
    p.add_argument("--num-emoji", type=int, default=40)
    p.add_argument("--num-images", type=int, default=0, help="the first N records (0: all)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True)
    a = p.parse_args()

    root = model_folder(a.model)
    encoder = load_autoencoder(part_folder(root, "vae_encoder"), Encoder).to(a.device).eval()
    decoder = load_decoder(a.decoder or part_folder(root, "vae_decoder"), device=a.device).float().eval()
    records = load_records(a.prompts, a.num_emoji)
    records = records[: a.num_images] if a.num_images else records
    prompts, scenes = [r["prompt"] for r in records], [r["scene"] for r in records]
    ev = load_evaluators(device=a.device)
    t0 = time.time()
    real = renders(records, a.size)
    rows = {"renders": evaluate_images(ev, real, prompts, scenes)}
    rows["round_trip"] = evaluate_images(ev, round_trip(encoder, decoder, real, a.batch_size), prompts, scenes)
    report = {"model": str(root), "decoder": str(a.decoder or part_folder(root, "vae_decoder")),
              "prompts": a.prompts, "num_emoji": a.num_emoji, "images": len(records), "size": a.size,
              "seconds": round(time.time() - t0, 1), "results": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))
    for name, r in rows.items():
        print(f"{name}: CLIP {r['clip_score']:.2f}  FID {r['domain_fid']:.3f}  "
              + "  ".join(f"{k} {100 * v:.1f}" for k, v in r["attributes"].items()))


if __name__ == "__main__":
    main()
