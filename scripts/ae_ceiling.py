"""The autoencoder's ceiling on the evaluation: the test prompts' own renders, sent through the encoder and a decoder
(no UNet), read by the same evaluators.

    python scripts/ae_ceiling.py --model base --num-emoji 40 --out results/autoencoder_ceiling_485/base_decoder.json
    python scripts/ae_ceiling.py --model base --decoder snapfusion/assets/models/parts/vae_decoder_half --out ...

Rows, each with the metrics of ``snapfusion eval`` (CLIP score, domain FID, attribute accuracy with per-image
results): ``renders`` (the true images), ``round_trip`` (decoded from the posterior mean, the encoder's best latent;
``--latents mean``, the default) and ``round_trip_sample`` (``--latents sample``: decoded from one seeded posterior
draw per image, the kind of latent a UNet is trained to generate, so about what a UNet that modelled its training
data perfectly would score); ``--latents both`` gives both. The decoder runs in fp32.

Every row also has ``fid_vs_renders``: the Frechet distance of its scene-CLIP features to those of the same prompts'
true renders (0 for the renders themselves). The domain FID compares with 10,000 generic test renders instead, whose
distribution the filtered prompt set does not follow (docs/evaluation.md): there the renders themselves
score far from 0, and a decoder closer to them can score worse.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from snapfusion.loading import model_folder, resolve_device as _device
from snapfusion.decoder.evaluate import decode_unit
from snapfusion.decoder.io import load_decoder
from snapfusion.errors import SnapFusionError
from snapfusion.eval.evaluators import clip_features, domain_fid, evaluate_images, load_evaluators
from snapfusion.eval.frechet import gaussian_stats
from snapfusion.eval.runner import load_records, render_records
from snapfusion.models.autoencoder import Encoder, load_autoencoder
from snapfusion.pipeline import check_size, part_folder
from snapfusion.train.data import images_to_unit

SAMPLE_SEED = 0  # the posterior draws of --latents sample: image i uses seed SAMPLE_SEED + i


@torch.no_grad()
def round_trip(encoder: Encoder, decoder: torch.nn.Module, images: torch.Tensor, batch_size: int, *,
               sample: bool = False) -> torch.Tensor:
    """uint8 images -> diffusion latents (the posterior mean, or with ``sample`` a draw seeded by the image's index, so
    the result does not depend on the batch size) -> decoded uint8 images, in batches on the encoder's device."""
    device = next(encoder.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        posterior = encoder.encode(images_to_unit(images[start: start + batch_size], device))
        raw = posterior.mean
        if sample:
            noise = torch.stack([torch.randn(raw.shape[1:], device=device, dtype=raw.dtype,
                                             generator=torch.Generator(device).manual_seed(SAMPLE_SEED + start + i))
                                 for i in range(len(raw))])
            raw = raw + posterior.std * noise
        z = raw * encoder.config.scaling_factor
        out.append((decode_unit(decoder, z, batch_size=batch_size) * 255).round().to(torch.uint8))
    result = torch.cat(out)
    if result.shape != images.shape:
        raise SnapFusionError(f"the round trip turned {tuple(images.shape[1:])} images into {tuple(result.shape[1:])}")
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="base", help="a pipeline with an encoder (vae_encoder/) (default %(default)s)")
    p.add_argument("--decoder", default=None, help="a decoder or pipeline folder (default: the model's own)")
    p.add_argument("--prompts", default="test", help="a shipped prompt set or a .jsonl (default %(default)s)")
    p.add_argument("--num-emoji", type=int, default=40,
                   help="keep prompts with the first N emoji (default %(default)s)")
    p.add_argument("--num-images", type=int, default=0, help="the first N records, N >= 2 (default: all)")
    p.add_argument("--size", type=int, default=512, help="render side, a multiple of 8 (default %(default)s)")
    p.add_argument("--latents", choices=("mean", "sample", "both"), default="mean",
                   help="round trip through the posterior mean, seeded posterior draws, or both (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="images per encoder/decoder call (default %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default %(default)s)")
    p.add_argument("--out", required=True, help="the JSON report")
    return p.parse_args(argv)


def run(a: argparse.Namespace) -> dict:
    """Check every argument, then render, round-trip and evaluate; the report written to ``a.out``."""
    check_size(a.size, a.size, 8)
    if a.batch_size < 1:
        raise SnapFusionError(f"--batch-size must be at least 1, got {a.batch_size}")
    device = _device(a.device)
    records = load_records(a.prompts, a.num_emoji)
    if a.num_images:
        if not 2 <= a.num_images <= len(records):
            raise SnapFusionError(f"--num-images must be from 2 to the set's {len(records)} records (the domain FID "
                                  f"needs two images), got {a.num_images}")
        records = records[: a.num_images]
    root = model_folder(a.model)
    decoder_folder = Path(a.decoder) if a.decoder else part_folder(root, "vae_decoder")
    encoder = load_autoencoder(part_folder(root, "vae_encoder"), Encoder).to(device).eval()
    decoder = load_decoder(decoder_folder, device=device).eval()
    ev = load_evaluators(device=device)
    prompts, scenes = [r["prompt"] for r in records], [r["scene"] for r in records]
    t0 = time.time()
    real = render_records(records, a.size)
    truth = gaussian_stats(clip_features(ev.clip, real))  # the reference of fid_vs_renders: these prompts' renders
    rows = {"renders": evaluate_images(ev, real, prompts, scenes) | {"fid_vs_renders": 0.0}}
    for name, sample in (("round_trip", False), ("round_trip_sample", True)):
        if a.latents in ("both", "sample" if sample else "mean"):
            decoded = round_trip(encoder, decoder, real, a.batch_size, sample=sample)
            rows[name] = evaluate_images(ev, decoded, prompts, scenes) | {
                "fid_vs_renders": domain_fid(ev, decoded, truth)}
    report = {"model": str(root), "decoder": str(decoder_folder), "decoder_dtype": "fp32", "prompts": a.prompts,
              "num_emoji": a.num_emoji, "images": len(records), "size": a.size, "latents": a.latents,
              "sample_seed": SAMPLE_SEED, "seconds": round(time.time() - t0, 1), "results": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    try:
        report = run(parse_args(argv))
    except (SnapFusionError, OSError) as err:
        print(f"ae_ceiling: error: {err}", file=sys.stderr)
        return 2
    for name, r in report["results"].items():
        print(f"{name}: CLIP {r['clip_score']:.2f}  FID {r['domain_fid']:.3f}  FID vs renders "
              f"{r['fid_vs_renders']:.3f}  "
              + "  ".join(f"{k} {100 * v:.1f}" for k, v in r["attributes"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
