"""Why the base model paints flat backgrounds gray: SD's schedule leaks each latent channel's mean at t = T.

SD-v1.5's scaled-linear schedule ends at alpha_bar_T = 0.0047, not 0 (Lin et al. 2024, "Common diffusion noise
schedules and sample steps are flawed"). A training input at t = T still holds sqrt(alpha_bar_T) = 0.068 of the clean
latent. Over an h x w latent the noise's spatial mean has std 1/sqrt(h w) (1/64 at 512²), so the *spatial mean of
each channel* - in our domain, mostly the flat background's color - is still readable at the last step. The UNet
learns to keep it instead of choosing it from the prompt; at sampling time pure noise has mean ~0 and the
backgrounds come out as the average color.

This script measures both halves on the CPU:
  1. the leak: std over test renders of each channel's spatial latent mean, times sqrt(alpha_bar_T), against the
     noise's spatial-mean std, i.e. the per-channel SNR of the mean at the first sampling step;
  2. an oracle test: K test prompts sampled from plain noise, and from the same noise with each channel's mean
     set to what the forward process would give for the true scene (rendered and encoded). If the leak explains the
     failure, the probe's background accuracy jumps with the oracle mean and nothing else changes.

With ``--gradients`` the same two halves for the next spatial frequency, on gradient-background prompts only (offset
noise randomises each channel's mean during training, not the contrast between image halves that
a gradient is made of):
  1. the leak of that contrast: the std over gradient renders of each channel's left-minus-right (or
     top-minus-bottom, along the gradient) half-mean difference, times sqrt(alpha_bar_T), against the noise's
     half-mean difference (2 / sqrt(h w));
  2. a third start, "oracle_2x2": the noise plus the forward process's share of the true latent's 2 x 2 block means
     (each channel's mean and its half-to-half contrasts). If background accuracy rises from "oracle_mean" to
     "oracle_2x2", the UNet reads the gradient's direction from the noise, not from the prompt.

With ``--trajectory`` (gradient prompts only) no oracle: where the sampler takes the direction from. For each image, at
each DDIM step, the model's clean-latent estimate's half contrast along the gradient is projected on the true
render's; its sign says whether the estimate has the prompt's direction. Against it the sign of the starting noise's
own half contrast projected the same way: a model that follows the prompt is right whatever that sign, one that
follows the noise is right where it is positive and wrong where it is negative. Also the step at which each image's
direction is settled (the estimate's sign no longer changes).

With ``--prior`` (a pipeline with a terminal layout prior, ``prior/``; snapfusion/prior.py) the trajectory starts
from the noise plus the prior's shift, as ``Pipeline.generate`` does; the oracle test adds a fourth start, "prior",
the noise plus the predicted (not the true) 2 x 2 block means.

Examples (about 12, 20 and 10 minutes on a 2-core CPU):
  python scripts/diagnose_mean_leak.py --model base --count 24 --steps 20 --out results/schedule_leak/channel_means.json
  python scripts/diagnose_mean_leak.py --model base --count 24 --steps 20 --gradients --out gradient_leak.json
  python scripts/diagnose_mean_leak.py --model base --count 32 --steps 20 --trajectory --out trajectory.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from snapfusion.loading import model_folder, resolve_model
from snapfusion.data import Scene, load_prompt_set
from snapfusion.data.render import render
from snapfusion.eval.attributes import attribute_accuracy
from snapfusion.eval.evaluators import load_evaluators
from snapfusion.models.autoencoder import Encoder, load_autoencoder
from snapfusion.pipeline import image_grid, to_pil
from snapfusion.prior import block_means as render_block_means, means_shift, start_shift
from snapfusion.sampling import guided, initial_noise, sample_ddim


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="base")
    p.add_argument("--count", type=int, default=24, help="test prompts for the oracle test")
    p.add_argument("--leak-count", type=int, default=128, help="test renders for the leak measurement")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--num-emoji", type=int, default=40)
    p.add_argument("--gradients", action="store_true",
                   help="gradient-background prompts only, and the 2 x 2 (half-to-half contrast) leak and oracle")
    p.add_argument("--trajectory", action="store_true",
                   help="gradient prompts only: per DDIM step, does the estimate have the prompt's direction, and "
                        "does the final image follow the starting noise's (no oracle test)")
    p.add_argument("--prompts", choices=["test", "val"], default="test", help="the prompt set (default: test)")
    p.add_argument("--prior", action="store_true", help="also (oracle test) or only (trajectory) starts shifted by "
                   "the pipeline's layout prior")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: fp32 either way; seeds draw on the CPU")
    p.add_argument("--out", default="mean_leak.json")
    a = p.parse_args()
    torch.manual_seed(0)
    device = torch.device(a.device)

    pipe = resolve_model(a.model).eval().to(device)
    if a.prior and pipe.prior is None:
        raise SystemExit(f"diagnose_mean_leak: {a.model} has no layout prior (prior/)")
    encoder = load_autoencoder(model_folder(a.model) / "vae_encoder", Encoder).eval().to(device)
    records = load_prompt_set(a.prompts, num_emoji=a.num_emoji)
    a.gradients = a.gradients or a.trajectory
    if a.gradients:
        records = [r for r in records if r["scene"]["background"]["direction"] is not None]
    res = pipe.config.resolution

    @torch.no_grad()
    def block_means(recs, g: int = 1) -> torch.Tensor:  # (N, 4, g, g) scaled latents' block means, on `device`
        return torch.cat([render_block_means(encoder, torch.from_numpy(np.array(render(Scene.from_dict(r["scene"]),
                                                                                    res))).permute(2, 0, 1)[None],
                                             g, res) for r in recs]).to(device)

    def channel_means(recs) -> torch.Tensor:
        return block_means(recs).flatten(1)  # (N, 4) scaled latents' spatial means

    t0 = time.time()
    means = channel_means(records[: a.leak_count])
    sched = pipe.schedule
    timesteps = pipe.timesteps(a.steps, "ddim")
    t_first = int(timesteps[0])
    abar_T = float(sched.alphas_cumprod[-1])
    abar_first = float(sched.alphas_cumprod[t_first])
    hw = (res // 8) ** 2
    noise_mean_std = (1 - abar_T) ** 0.5 / hw ** 0.5
    leak = {
        "alpha_bar_T": abar_T, "sqrt_alpha_bar_T": abar_T ** 0.5, "first_sampling_timestep": t_first,
        "latent_pixels": hw, "noise_spatial_mean_std": noise_mean_std,
        "channel_mean_std_over_renders": means.std(0).tolist(),
        "snr_of_channel_mean_at_T": (abar_T ** 0.5 * means.std(0) / noise_mean_std).tolist(),
        "renders": len(means),
    }
    if a.gradients:  # the half-to-half contrast along each render's gradient, against the noise's
        quads = block_means(records[: a.leak_count], 2)  # (N, 4, 2, 2)
        along = [r["scene"]["background"]["direction"] for r in records[: a.leak_count]]
        diff = half_contrast(quads, along)  # (N, 4): left - right (or top - bottom) half means
        noise_diff_std = 2 * (1 - abar_T) ** 0.5 / hw ** 0.5
        leak |= {"noise_half_difference_std": noise_diff_std,
                 "half_difference_std_over_gradient_renders": diff.std(0).tolist(),
                 "snr_of_half_difference_at_T": (abar_T ** 0.5 * diff.std(0) / noise_diff_std).tolist()}
    print(json.dumps(leak, indent=1), flush=True)

    chosen = records[: a.count]
    target = channel_means(chosen)  # (K, 4)
    cond = pipe.encode_text([r["prompt"] for r in chosen])
    uncond = pipe.encode_text([""])
    model_fn = guided(pipe.denoiser(), cond, uncond, a.guidance)
    shape = (pipe.unet.config.in_channels, res // 8, res // 8)
    z = initial_noise(shape, [int(r["seed"]) for r in chosen], device)
    # Forward process at the first step: z_t = sqrt(abar) x0 + sqrt(1 - abar) eps; the DDIM sampler starts from
    # eps (unit variance), so the oracle adds sqrt(abar / (1 - abar)) * mean(x0) per channel.
    prior_shift = start_shift(pipe.prior, cond, shape[1:], abar_first) if a.prior else None
    if a.trajectory:
        if prior_shift is not None:
            z = z + prior_shift
        report = trajectory(pipe, model_fn, z, timesteps, block_means(chosen, 2), chosen, (cond, uncond))
        report = {"model": a.model, "prompt_set": a.prompts, "steps": a.steps, "guidance": a.guidance,
                  "prompts": len(chosen), "prior": a.prior, "leak": leak,
                  **report, "seconds": round(time.time() - t0)}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps({k: v for k, v in report.items() if k != "leak"}, indent=1))
        return
    shift = (abar_first / (1 - abar_first)) ** 0.5 * target[:, :, None, None]
    starts = [("plain", z), ("oracle_mean", z + shift)]
    if a.gradients:  # the 2 x 2 block means, upsampled to the latent grid: the mean plus the half contrasts
        starts.append(("oracle_2x2", z + means_shift(block_means(chosen, 2), shape[1:], abar_first)))
    if prior_shift is not None:
        starts.append(("prior", z + prior_shift))
    ev = load_evaluators()
    scenes = [r["scene"] for r in chosen]
    results, grids = {}, []
    for name, start in starts:
        with torch.no_grad():
            images = pipe.decode(sample_ddim(model_fn, start.clone(), timesteps, sched))
        u8 = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        acc = attribute_accuracy(ev.probe, u8, scenes)
        acc.pop("per_image")
        results[name] = acc
        grids.append(image_grid(to_pil(images[:8].cpu()), cols=8))
        print(name, json.dumps(acc), f"{time.time() - t0:.0f}s", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"model": a.model, "steps": a.steps, "guidance": a.guidance, "prompts": len(chosen),
              "gradients_only": a.gradients, "leak": leak,
              "oracle_test": results, "seconds": round(time.time() - t0)}
    out.write_text(json.dumps(report, indent=2) + "\n")
    grid = image_grid(grids, cols=1)
    grid.resize((grid.width // 4, grid.height // 4)).save(out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def half_contrast(x: torch.Tensor, directions: list[str]) -> torch.Tensor:
    """(N, C): each channel's first-half minus second-half mean of x (N, C, H, W; 2 x 2 block means pass through),
    left - right for a horizontal gradient, top - bottom for a vertical one."""
    q = torch.nn.functional.adaptive_avg_pool2d(x, 2)  # (N, C, 2, 2)
    return torch.stack([(qi[:, :, 0] - qi[:, :, 1]).mean(-1) if d == "horizontal" else (qi[:, 0] - qi[:, 1]).mean(-1)
                        for qi, d in zip(q, directions)])


@torch.no_grad()
def trajectory(pipe, model_fn, z: torch.Tensor, timesteps: torch.Tensor, quads: torch.Tensor, records,
               contexts: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """The --trajectory report: per step the share of estimates with the prompt's direction and their contrast as a
    fraction of the true one; the final share split by the sign of the starting noise's contrast; when each image's
    direction settles; and at the first step the conditional and unconditional estimates apart (does the prompt
    push the right way?)."""
    directions = [r["scene"]["background"]["direction"] for r in records]
    truth = half_contrast(quads, directions)  # (N, C): the true render's half contrast
    estimates = []

    def along_truth(x0: torch.Tensor) -> torch.Tensor:  # (N,): the estimate's contrast projected on the true one,
        return (half_contrast(x0, directions) * truth).sum(1) / (truth * truth).sum(1)  # 1 = the true contrast

    def recording(zt, t):
        pred = model_fn(zt, t)
        estimates.append(along_truth(pred.x0))
        return pred

    denoiser, (cond, uncond) = pipe.denoiser(), contexts
    t1 = timesteps[0].expand(z.shape[0]).to(z.device)
    first_cond = along_truth(denoiser(z, t1, cond).x0)
    first_uncond = along_truth(denoiser(z, t1, uncond.expand(len(cond), *uncond.shape[1:])).x0)

    sample_ddim(recording, z.clone(), timesteps, pipe.schedule)
    projections = torch.stack(estimates)  # (steps, N)
    agree = projections > 0
    noise_agrees = (half_contrast(z, directions) * truth).sum(1) > 0  # (N,)
    final = agree[-1]
    changed = (agree != final[None]).float()  # 1 where a step's sign differs from the final one
    steps = torch.arange(1, len(agree) + 1, device=agree.device)[:, None]
    settled = (changed * steps).amax(0) + 1  # first step from which the sign stays the final one
    ts = [int(t) for t in timesteps[:-1]]
    return {
        "per_step": [{"step": i + 1, "t": t, "estimate_has_prompt_direction": float(agree[i].float().mean()),
                      "median_fraction_of_true_contrast": float(projections[i].median())} for i, t in enumerate(ts)],
        "first_step": {"cond_has_prompt_direction": float((first_cond > 0).float().mean()),
                       "uncond_has_prompt_direction": float((first_uncond > 0).float().mean()),
                       "cond_minus_uncond_has_prompt_direction": float((first_cond > first_uncond).float().mean()),
                       "median_cond_minus_uncond_fraction": float((first_cond - first_uncond).median())},
        "final_right_where_noise_agrees": float(final[noise_agrees].float().mean()) if noise_agrees.any() else None,
        "final_right_where_noise_disagrees": float(final[~noise_agrees].float().mean()) if (~noise_agrees).any()
        else None,
        "noise_agrees": int(noise_agrees.sum()), "noise_disagrees": int((~noise_agrees).sum()),
        "final_right": float(final.float().mean()),
        "settled_at_step": {"median": float(settled.float().median()),
                            "histogram": {str(k): int((settled == k).sum()) for k in settled.unique().tolist()}},
    }


if __name__ == "__main__":
    main()
