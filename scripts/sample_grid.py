"""The README's sample grids: a model's images for the first N held-out test prompts (40 training emoji), each with
its own seed, at the model's default steps and guidance (or the given ones), tiled left to right, top to bottom.

    python scripts/sample_grid.py --model snapfusion --out docs/img/student_samples.png          # 8 steps, CPU
    python scripts/sample_grid.py --model base --steps 50 --out docs/img/base_samples.png       # the teacher
"""

from __future__ import annotations

import argparse

import torch

from snapfusion.loading import resolve_model
from snapfusion.data import load_prompt_set
from snapfusion.pipeline import image_grid, to_pil


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="snapfusion")
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--steps", type=int, default=None, help="default: the model's")
    p.add_argument("--guidance", type=float, default=None, help="default: the model's")
    p.add_argument("--cell", type=int, default=192, help="side of each image in the grid")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    pipe = resolve_model(a.model).eval()
    records = load_prompt_set("test", num_emoji=40)[: a.count]
    images = []
    with torch.no_grad():
        for i in range(0, len(records), a.batch):
            chunk = records[i: i + a.batch]
            images += to_pil(pipe.generate([r["prompt"] for r in chunk], [r["seed"] for r in chunk],
                                           steps=a.steps, guidance=a.guidance))
    grid = image_grid([im.resize((a.cell, a.cell)) for im in images], cols=4)
    grid.save(a.out)
    for i, r in enumerate(records, 1):
        print(i, r["prompt"])


if __name__ == "__main__":
    main()
