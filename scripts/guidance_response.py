"""How much of a two-call model's classifier-free guidance a guidance-embedded UNet reproduces.

On the same inputs (Gaussian noise, the sampler's own input at t = 999 and off its path below), prompts and
timesteps (levels of the 8-step trailing grid by default), compare the
guidance-embedded UNet's change from w = 1 to w, |GE(w) - GE(1)|, with the guided teacher's, |u + w (c - u) - c|
(c, u: the teacher's conditional and unconditional outputs), and its error against the guided output,
|GE(w) - (u + w (c - u))| / |u + w (c - u) - c|. A fully trained copy has response 1 and error 0; a UNet that ignores
w has response 0 and error 1.

    python scripts/guidance_response.py --teacher snapfusion-cfg snapfusion/assets/models/snapfusion/unet
"""

from __future__ import annotations

import argparse

import torch

from snapfusion.loading import model_folder
from snapfusion.models.unet import UNet
from snapfusion.pipeline import Pipeline

PROMPTS = ("two green stars on a yellow background", "a red apple to the left of a cat on a blue background",
           "three little blue triangles in a row against a left-to-right gradient from white to pink",
           "a gray background with two medium white crosses")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("unets", nargs="+", help="guidance-embedded UNet folders")
    p.add_argument("--teacher", default="snapfusion-cfg", help="the two-call pipeline (name or folder)")
    p.add_argument("--timesteps", default="999,624,249", help="comma-separated")
    p.add_argument("--guidance", default="4.5,7.5", help="comma-separated")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    pipe = Pipeline.load(model_folder(a.teacher)).eval()
    n = len(PROMPTS)
    with torch.no_grad():
        cond, uncond = pipe.encode_text(list(PROMPTS)), pipe.encode_text([""] * n)
        z = torch.randn(n, pipe.unet.config.in_channels, 64, 64, generator=torch.Generator().manual_seed(a.seed))
        print("| UNet | t | w | response | error |\n|---|---|---|---|---|")
        for folder in a.unets:
            ge = UNet.load(folder).eval()
            if not ge.config.guidance_embed:
                raise SystemExit(f"{folder}: not a guidance-embedded UNet")
            for t in (int(s) for s in a.timesteps.split(",")):
                tt = torch.full((n,), t)
                c, u = pipe.unet(z, tt, cond), pipe.unet(z, tt, uncond)
                g1 = ge(z, tt, cond, guidance=torch.ones(n))
                for w in (float(s) for s in a.guidance.split(",")):
                    target = u + w * (c - u)
                    gw = ge(z, tt, cond, guidance=torch.full((n,), w))
                    scale = (target - c).norm()
                    print(f"| {folder} | {t} | {w:g} | {float((gw - g1).norm() / scale):.3f} | "
                          f"{float((gw - target).norm() / scale):.3f} |")


if __name__ == "__main__":
    main()
