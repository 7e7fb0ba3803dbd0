"""SD-v1.5-scale checks on one GPU: robust-training steps and one evolution action, full size.

Random weights and synthetic latents/context (no SD weights are available offline): time and peak memory of a
robust-training step (per-sample skips, bf16 autocast, AdamW) and of one evolution action (score one removal
candidate with skip= over a short DDIM run, then build the edited UNet with inherited weights).
"""

import argparse
import json
import time

import torch

from snapfusion.evolve.actions import Action, edited_unet
from snapfusion.evolve.robust import RobustConfig, draw_skips
from snapfusion.models.unet import UNet, num_parameters
from snapfusion.models.unet_config import sd15
from snapfusion.sampling import Denoiser, guided, sample_ddim
from snapfusion.schedule import NoiseSchedule, ScheduleConfig, ddim_timesteps


def robust_steps(unet, batch, steps, device):
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    names = [n for n, _ in unet.named_blocks()]
    gen = torch.Generator(device).manual_seed(0)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps):
        z = torch.randn(batch, 4, 64, 64, device=device)
        ctx = torch.randn(batch, 77, 768, device=device)
        t = torch.randint(0, 1000, (batch,), device=device)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = unet(z, t, ctx, skip=draw_skips(names, RobustConfig(), batch, gen))
        loss = (pred.float() - z).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"batch": batch, "seconds_per_step": sorted(times[1:])[len(times[1:]) // 2],
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


@torch.no_grad()
def one_action(unet, images, steps, device):
    sched = NoiseSchedule(ScheduleConfig())
    ctx = torch.randn(images, 77, 768, device=device, dtype=torch.float16)
    uncond = torch.randn(1, 77, 768, device=device, dtype=torch.float16)
    z = torch.randn(images, 4, 64, 64, device=device)
    ts = ddim_timesteps(steps, "leading", steps_offset=1, num_train_timesteps=1000)
    half = unet.half().eval()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    den = Denoiser(lambda zz, tt, cc: half(zz, tt, cc, skip={"up.1.attn.2"}), sched, input_dtype=torch.float16)
    sample_ddim(guided(den, ctx, uncond, 7.5), z, ts, sched)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    edited, sliced, fresh = edited_unet(half, Action("remove", "up.1.attn.2"))
    torch.cuda.synchronize()
    return {"images": images, "ddim_steps": steps, "score_candidate_s": t1 - t0,
            "apply_action_s": time.perf_counter() - t1, "edited_parameters": num_parameters(edited)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    unet = UNet(sd15()).to(device)
    result = {"gpu": torch.cuda.get_device_name(), "parameters": num_parameters(unet),
              "robust_training": robust_steps(unet.train(), a.batch, a.steps, device)}
    result["one_action"] = one_action(unet, 8, 10, device)
    print(json.dumps(result, indent=1))
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
