"""Train the scene-domain evaluators and write them (plus sanity figures) to a folder.

Example: python scripts/train_evaluators.py --out snapfusion/assets/evaluators --device cuda --sanity 5000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from snapfusion.errors import SnapFusionError
from snapfusion.eval.train import EvalTrainConfig, train_evaluators


def main() -> int:
    d = EvalTrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output evaluator folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for f in dataclasses.fields(EvalTrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"(default {f.default})")
    p.add_argument("--sanity", type=int, default=0, help="also write sanity.json from N fresh test renders")
    args = p.parse_args()
    tc = EvalTrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EvalTrainConfig)})
    try:
        train_evaluators(args.out, tc, device=torch.device(args.device))
        if args.sanity:
            from snapfusion.eval.evaluators import load_evaluators
            from snapfusion.eval.sanity import render_test, sanity_figures

            ev = load_evaluators(args.out, device=args.device)
            images, captions, scenes = render_test(args.sanity, seed=1, workers=tc.workers)
            figures = sanity_figures(ev, images, captions, scenes)
            figures["evaluator_version"] = ev.version
            (args.out / "sanity.json").write_text(json.dumps(figures, indent=2) + "\n")
            print(json.dumps(figures, indent=2))
    except SnapFusionError as err:
        print(f"error: {err}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
