"""How much of a two-call model's classifier-free guidance a guidance-embedded UNet reproduces.

On the same inputs, prompts and timesteps, compare the guidance-embedded UNet's change from w = 1 to w,
|GE(w) - GE(1)|, with the guided teacher's, |u + w (c - u) - c| (c, u: the teacher's conditional and unconditional
raw outputs), and its error against the guided output, |GE(w) - (u + w (c - u))| / |u + w (c - u) - c|. A fully
trained copy has response 1 and error 0; a UNet that ignores w has response 0 and error 1.

The inputs (``--inputs``) are the teacher's own guided DDIM trajectory at w over its 8-step trailing grid
(``trajectory``, the default: the latents a copy meets when it samples like the teacher), or Gaussian noise at every
listed timestep (``noise``: the sampler's own input only at t = 999).

    python scripts/guidance_response.py --teacher snapfusion-cfg snapfusion/assets/models/snapfusion/unet
"""

from __future__ import annotations

import argparse

import torch

from snapfusion.loading import model_folder
from snapfusion.models.unet import UNet
from snapfusion.pipeline import Pipeline
from snapfusion.sampling import Denoiser, guided, sample_ddim
from snapfusion.schedule import ddim_timesteps

PROMPTS = ("two green stars on a yellow background", "a red apple to the left of a cat on a blue background",
           "three little blue triangles in a row against a left-to-right gradient from white to pink",
           "a gray background with two medium white crosses")


def trajectory_inputs(pipe: Pipeline, z: torch.Tensor, cond, uncond, w: float, steps: int):
    """The (z_t, t) at which the teacher's guided DDIM sampler calls its UNet, from noise ``z``."""
    den = Denoiser(pipe.unet, pipe.schedule, pipe.unet.config.prediction_type)
    fn, seen = guided(den, cond, uncond, w), []

    def record(zz, tt):
        seen.append((zz.clone(), int(tt[0])))
        return fn(zz, tt)

    sample_ddim(record, z, ddim_timesteps(steps, "trailing"), pipe.schedule)
    return seen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("unets", nargs="+", help="guidance-embedded UNet folders")
    p.add_argument("--teacher", default="snapfusion-cfg", help="the two-call pipeline (name or folder)")
    p.add_argument("--inputs", choices=("trajectory", "noise"), default="trajectory")
    p.add_argument("--steps", type=int, default=8, help="trajectory: the teacher's DDIM steps (trailing grid)")
    p.add_argument("--timesteps", default="999,624,249", help="noise: comma-separated")
    p.add_argument("--guidance", default="4.5,7.5", help="comma-separated")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    pipe = Pipeline.load(model_folder(a.teacher)).eval()
    geds = {folder: UNet.load(folder).eval() for folder in a.unets}
    for folder, ge in geds.items():
        if not ge.config.guidance_embed:
            raise SystemExit(f"{folder}: not a guidance-embedded UNet")
    n, side = len(PROMPTS), pipe.config.resolution // 8
    with torch.no_grad():
        cond, uncond = pipe.encode_text(list(PROMPTS)), pipe.encode_text([""] * n)
        z = torch.randn(n, pipe.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(a.seed))
        print(f"inputs: {a.inputs}, {n} prompts, {side}x{side} latents\n")
        print("| UNet | t | w | response | error |\n|---|---|---|---|---|")
        for w in (float(s) for s in a.guidance.split(",")):
            points = (trajectory_inputs(pipe, z, cond, uncond, w, a.steps) if a.inputs == "trajectory"
                      else [(z, int(s)) for s in a.timesteps.split(",")])
            for folder, ge in geds.items():
                for zt, t in points:
                    tt = torch.full((n,), t)
                    c, u = pipe.unet(zt, tt, cond), pipe.unet(zt, tt, uncond)
                    target = u + w * (c - u)
                    g1 = ge(zt, tt, cond, guidance=torch.ones(n))
                    gw = ge(zt, tt, cond, guidance=torch.full((n,), w))
                    scale = (target - c).norm()
                    print(f"| {folder} | {t} | {w:g} | {float((gw - g1).norm() / scale):.3f} | "
                          f"{float((gw - target).norm() / scale):.3f} |")


if __name__ == "__main__":
    main()
