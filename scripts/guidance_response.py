"""How much of a two-call model's classifier-free guidance a guidance-embedded UNet reproduces.

On the same inputs, prompts and timesteps, compare the guidance-embedded UNet's change from w = 1 to w,
|GE(w) - GE(1)|, with the guided teacher's, |u + w (c - u) - c| (c, u: the teacher's conditional and unconditional
raw outputs), and its error against the guided output, |GE(w) - (u + w (c - u))| / |u + w (c - u) - c|. A fully
trained copy has response 1 and error 0; a UNet that ignores w has response 0 and error 1. The drift,
|GE(1) - c| / |u + w (c - u) - c|, is how far the UNet at w = 1 is from the teacher's conditional output on the
same scale: 0 for a copy at its zero-initialised start, and what makes the error exceed 1 where guidance changes
the output little (low t). Along is the part of the guidance direction d = u + w (c - u) - c that GE(w) takes,
<GE(w) - c, d> / |d|^2: 1 for the guided output, 0 for the conditional one, whether GE gets there through w or not.

The inputs (``--inputs``) are the teacher's own guided DDIM trajectory at w over its 8-step trailing grid
(``trajectory``, the default: the latents a copy meets when it samples like the teacher), or Gaussian noise at every
listed timestep (``noise``: the sampler's own input only at t = 999).

    python scripts/guidance_response.py --teacher snapfusion-cfg snapfusion/assets/models/snapfusion/unet
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

import torch

from snapfusion.errors import SnapFusionError
from snapfusion.loading import model_folder
from snapfusion.models.unet import UNet
from snapfusion.pipeline import Pipeline
from snapfusion.sampling import cfg_mix, sample_ddim
from snapfusion.schedule import ddim_timesteps

PROMPTS = ("two green stars on a yellow background", "a red apple to the left of a cat on a blue background",
           "three little blue triangles in a row against a left-to-right gradient from white to pink",
           "a gray background with two medium white crosses")


def trajectory_inputs(pipe: Pipeline, z: torch.Tensor, cond, uncond, w: float, steps: int):
    """The (z_t, t) at which the teacher's guided DDIM sampler calls its UNet, from noise ``z``."""
    fn, seen = pipe.model_fn(cond, uncond, w), []

    def record(zz, tt):
        seen.append((zz.clone(), int(tt[0])))
        return fn(zz, tt)

    sample_ddim(record, z, ddim_timesteps(steps, "trailing"), pipe.schedule)
    return seen


COLUMNS = ("response", "error", "drift", "along")


def _fail(message: str) -> NoReturn:
    """A bad input: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


@torch.no_grad()
def measure(teacher: UNet, ge: UNet, zt: torch.Tensor, t: int, cond, uncond, w: float) -> dict[str, float]:
    """The four figures (module docstring) of one guidance-embedded UNet at one (z_t, t) and w."""
    n = zt.shape[0]
    tt = torch.full((n,), t)
    c, u = teacher(zt, tt, cond), teacher(zt, tt, uncond)
    d = cfg_mix(c, u, w) - c  # the guidance direction; the guided output is c + d
    g1, gw = ge(zt, tt, cond, guidance=torch.ones(n)), ge(zt, tt, cond, guidance=torch.full((n,), w))
    scale = d.norm()
    return {"response": float((gw - g1).norm() / scale), "error": float((gw - c - d).norm() / scale),
            "drift": float((g1 - c).norm() / scale), "along": float(((gw - c) * d).sum() / scale ** 2)}


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
    scales = [float(s) for s in a.guidance.split(",")]
    if any(w == 1 for w in scales):
        _fail("--guidance: w = 1 has no guidance to compare against (every figure divides by it)")
    try:
        pipe = Pipeline.load(model_folder(a.teacher)).eval()
        geds = {folder: UNet.load(folder).eval() for folder in a.unets}
    except SnapFusionError as err:
        _fail(str(err))
    for folder, ge in geds.items():
        if not ge.config.guidance_embed:
            _fail(f"{folder}: not a guidance-embedded UNet")
    n, side = len(PROMPTS), pipe.config.resolution // 8
    with torch.no_grad():
        cond, uncond = pipe.encode_text(list(PROMPTS)), pipe.encode_text([""] * n)
        z = torch.randn(n, pipe.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(a.seed))
        print(f"inputs: {a.inputs}, {n} prompts, {side}x{side} latents\n")
        print("| UNet | t | w | " + " | ".join(COLUMNS) + " |\n|---|---|---|" + "---|" * len(COLUMNS))
        for w in scales:
            points = (trajectory_inputs(pipe, z, cond, uncond, w, a.steps) if a.inputs == "trajectory"
                      else [(z, int(s)) for s in a.timesteps.split(",")])
            for folder, ge in geds.items():
                for zt, t in points:
                    m = measure(pipe.unet, ge, zt, t, cond, uncond, w)
                    print(f"| {folder} | {t} | {w:g} | " + " | ".join(f"{m[k]:.3f}" for k in COLUMNS) + " |")


if __name__ == "__main__":
    main()
