"""Variance explained (R²) by layout priors on the held-out scenes of ``snapfusion train-prior``'s defaults, per half:
the first half chooses the early-stopping step, the second never does. Lets priors trained before early stopping
(the shipped base's prior) be compared with later ones on the same split. Reads the target cache that train-prior built.

    python scripts/prior_heldout_r2.py --model base --cache runs/prior_cache snapfusion/assets/models/base/prior new_prior
"""

import argparse
import json
from pathlib import Path

import torch

from snapfusion.loading import model_folder, resolve_model
from snapfusion.models.autoencoder import Encoder, load_autoencoder
from snapfusion.pipeline import part_folder
from snapfusion.prior import LayoutPrior, PriorTrainConfig, build_targets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("priors", nargs="+", help="prior folders")
    p.add_argument("--model", default="base", help="the pipeline whose text states the priors read")
    p.add_argument("--encoder", default=None, help="as for train-prior (default: the base's vae_encoder)")
    p.add_argument("--cache", default="runs/prior_cache")
    p.add_argument("--scenes", type=int, default=10000)
    p.add_argument("--num-emoji", type=int, default=40)
    a = p.parse_args()
    pipe = resolve_model(a.model, device="cpu")
    enc_dir = Path(a.encoder) if a.encoder else part_folder(model_folder("base"), "vae_encoder")
    encoder = load_autoencoder(enc_dir, Encoder, device="cpu").eval()
    captions, targets = build_targets(encoder, a.scenes, Path(a.cache), num_emoji=a.num_emoji,
                                      source=str(enc_dir.resolve()), progress=lambda _: None)
    n_val = max(2, int(a.scenes * PriorTrainConfig().val_fraction))  # train_prior's split
    n_train = a.scenes - n_val
    mean = targets[:n_train].mean(0, keepdim=True)
    halves = {"first_half_chooses": slice(0, n_val // 2), "second_half_unselected": slice(n_val // 2, n_val),
              "all": slice(0, n_val)}
    held = targets[n_train:]
    with torch.no_grad():
        states = torch.cat([pipe.encode_text(captions[i:i + 500]).float() for i in range(n_train, a.scenes, 500)])
        for folder in a.priors:
            pred = LayoutPrior.load(folder)(states)
            r2 = {k: 1 - (pred[s] - held[s]).pow(2).mean().item() / (held[s] - mean).pow(2).mean().item()
                  for k, s in halves.items()}
            print(folder, json.dumps({k: round(v, 4) for k, v in r2.items()}))


if __name__ == "__main__":
    main()
