"""Evaluation runner: generate images for a prompt set over a guidance sweep and score them with the domain
evaluators (CLIP score, domain FID, attribute accuracy); writes a JSON protocol, image grids and the FID-CLIP curve.

``generate_fn(prompts, seeds, guidance) -> list[PIL.Image]`` comes from the pipeline; every image has its own
seed (from the prompt records), so results do not depend on the batch size.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from snapfusion import validation
from snapfusion.errors import SnapFusionError
from snapfusion.eval.evaluators import Evaluators, clip_features, domain_fid, evaluate_images, load_evaluators
from snapfusion.eval.frechet import GaussianStats, gaussian_stats
from snapfusion.fileio import atomic_write_text

GenerateFn = Callable[[list[str], list[int], float], list[Image.Image]]
RESULT_FILE = "eval.json"
SEED_STRIDE = 1_000_003  # seed shift between copies of the prompt set (with_seeds_per_prompt)


def parse_guidance_sweep(text) -> tuple[float, ...]:
    """'1,2,4.5' (or the list validation.parse_guidance_sweep made of it) -> (1.0, 2.0, 4.5); a clear error naming
    the bad item."""
    if isinstance(text, str):
        return tuple(validation.parse_guidance_sweep(text))
    return tuple(validation.check_guidance(v, name="--guidance-sweep value") for v in text)


def load_records(prompts: str, num_emoji: int | None = None) -> list[dict[str, Any]]:
    """A prompt set by name ('test'), optionally limited to the first ``num_emoji`` emoji, or a .jsonl path."""
    from snapfusion.data import load_prompt_set

    path = Path(prompts)
    if path.suffix != ".jsonl":
        return load_prompt_set(prompts, num_emoji=num_emoji)
    if not path.is_file():
        raise SnapFusionError(f"prompt file not found: {path}")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rec = json.loads(line)
            records.append({"prompt": str(rec["prompt"]), "seed": int(rec["seed"]), "scene": rec["scene"]})
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise SnapFusionError(f"{path}:{n}: bad prompt record ({err})") from None
    return records


def with_seeds_per_prompt(records: Sequence[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """``k`` copies of the prompt records, copy j with every seed shifted by j * SEED_STRIDE (mod 2**31); copy 0 is
    the records themselves, unchanged, so the first len(records) images are those of a k = 1 run. More seeds per
    prompt lower the variance of every metric without changing what is measured."""
    if k < 1:
        raise SnapFusionError(f"--seeds-per-prompt must be at least 1, got {k}")
    return [dict(r) if j == 0 else {**r, "seed": (int(r["seed"]) + j * SEED_STRIDE) % 2**31}
            for j in range(k) for r in records]


def _check_count(num_images: int, available: int, what: str = "prompt records") -> None:
    if num_images > available:
        raise SnapFusionError(f"--num-images {num_images} exceeds the {available} {what} of the set")


def images_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> uint8 (N, 3, H, W), the evaluators' input."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)


def generate_all(generate_fn: GenerateFn, records: Sequence[dict], guidance: float, batch_size: int,
                 progress: bool = True) -> torch.Tensor:
    """All images of ``records`` at one guidance scale, in batches: uint8 (N, 3, H, W)."""
    out = []
    bar = tqdm(total=len(records), desc=f"generate w={guidance:g}", unit="img", disable=not progress)
    for i in range(0, len(records), batch_size):
        chunk = records[i: i + batch_size]
        images = generate_fn([r["prompt"] for r in chunk], [int(r["seed"]) for r in chunk], float(guidance))
        if len(images) != len(chunk):
            raise SnapFusionError(f"generate_fn returned {len(images)} images for {len(chunk)} prompts")
        out.append(images_to_tensor(images))
        bar.update(len(chunk))
    bar.close()
    sizes = {tuple(t.shape[-2:]) for t in out}
    if len(sizes) != 1:
        raise SnapFusionError(f"generated images differ in size: {sorted(sizes)}")
    return torch.cat(out)


def save_grid(images: torch.Tensor, path: Path, *, columns: int = 4, count: int = 16, side: int = 256) -> None:
    """The first ``count`` images as a PNG grid of ``side``-pixel tiles."""
    tiles = [Image.fromarray(im.permute(1, 2, 0).numpy()).resize((side, side), Image.Resampling.BICUBIC)
             for im in images[:count]]
    rows = (len(tiles) + columns - 1) // columns
    grid = Image.new("RGB", (columns * side, rows * side), "white")
    for k, tile in enumerate(tiles):
        grid.paste(tile, ((k % columns) * side, (k // columns) * side))
    grid.save(path)


def save_curve(results: list[dict[str, Any]], path: Path, title: str) -> None:
    """FID-CLIP curve over the guidance sweep (SnapFusion Fig. 7 style), annotated with the guidance scales."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    xs, ys = [r["clip_score"] for r in results], [r["domain_fid"] for r in results]
    ax.plot(xs, ys, "o-")
    for r, x, y in zip(results, xs, ys):
        ax.annotate(f"w={r['guidance']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("domain CLIP score")
    ax.set_ylabel("domain FID (scene-CLIP features)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_records(records: Sequence[dict], size: int) -> torch.Tensor:
    """uint8 (N, 3, size, size) renders of the records' own scenes: what a perfect generator would return."""
    from snapfusion.data import Scene, render

    return images_to_tensor([render(Scene.from_dict(r["scene"]), size) for r in records])


def prompt_reference(ev: Evaluators, records: Sequence[dict], size: int, *, chunk: int = 256) -> GaussianStats:
    """Scene-CLIP feature stats of the records' own scenes rendered at ``size``: the reference of ``fid_vs_renders``,
    which, unlike the cached generic test renders, follows the evaluated prompts' distribution. Rendered in chunks, so
    that only the features are kept."""
    feats = [clip_features(ev.clip, render_records(records[i: i + chunk], size)) for i in range(0, len(records), chunk)]
    return gaussian_stats(torch.cat(feats))


def evaluate(generate_fn: GenerateFn, records: Sequence[dict], *, guidance_scales: Sequence[float], steps: int,
             sampler: str, num_images: int, batch_size: int, out_dir: str | os.PathLike,
             evaluators: Evaluators | None = None, device: str | torch.device = "cpu", model: str = "",
             progress: bool = True, seeds_per_prompt: int = 1, guidance_rescale: float = 0.0,
             guidance_interval: Sequence[float] = (0.0, 1.0)) -> dict[str, Any]:
    """Generate and score ``num_images`` records at each guidance scale; write eval.json, grids and the curve.
    ``guidance_rescale`` and ``guidance_interval`` are the phi and the guided fraction of the steps ``generate_fn``
    samples with, recorded in the report.

    ``seeds_per_prompt`` only goes into the report: K > 1 says that the records are K copies of num_images / K
    prompts (``with_seeds_per_prompt``), which paired comparisons use to group an image with its prompt."""
    _check_count(num_images, len(records))
    if num_images < 2 or batch_size < 1 or not guidance_scales:
        raise SnapFusionError("need num_images >= 2 (FID), batch_size >= 1 and at least one guidance scale")
    ev = evaluators or load_evaluators(device=device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chosen = list(records[:num_images])
    results = []
    truth = None  # prompt_reference at the generated size, built once
    for w in guidance_scales:
        t0 = time.time()
        images = generate_all(generate_fn, chosen, w, batch_size, progress)
        scores = evaluate_images(ev, images, [r["prompt"] for r in chosen], [r["scene"] for r in chosen])
        if images.shape[-1] == images.shape[-2]:  # scenes render square
            if truth is None:
                truth = prompt_reference(ev, chosen, images.shape[-1])
            scores["fid_vs_renders"] = domain_fid(ev, images, truth)
        save_grid(images, out / f"grid_w{w:g}.png")
        results.append({"guidance": float(w), **scores, "seconds": round(time.time() - t0, 1),
                        "resolution": list(images.shape[-2:])})
    report = {
        "model": model, "sampler": sampler, "steps": steps, "guidance_scales": [float(w) for w in guidance_scales],
        "guidance_rescale": float(guidance_rescale), "guidance_interval": [float(x) for x in guidance_interval],
        "num_images": num_images, "seeds_per_prompt": seeds_per_prompt, "batch_size": batch_size,
        "prompts": [r["prompt"] for r in chosen], "seeds": [int(r["seed"]) for r in chosen],
        "evaluator_version": ev.version, "evaluator_folder": str(ev.folder),
        "reference_images": ev.reference.count,
        "metrics": {"clip_score": "100 * max(cos, 0), scene-CLIP, mean over images",
                    "domain_fid": "Frechet distance of scene-CLIP pooled image features to cached test renders "
                                  "(NOT Inception FID)",
                    "fid_vs_renders": "the same distance to the renders of the evaluated prompts' own scenes at the "
                                      "generated size (square images only)",
                    "attributes": "probe every-attribute accuracy and per check"},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "results": results,
    }
    atomic_write_text(out / RESULT_FILE, json.dumps(report, indent=2) + "\n")
    if len(results) > 1:
        save_curve(results, out / "fid_clip_curve.png", f"{model or 'model'}: {sampler}, {steps} steps")
    return report


def run_eval_command(generate_fn: GenerateFn, *, prompts: str = "test", steps: int, sampler: str,
                     guidance: float | None = None, guidance_sweep: str | Sequence[float] | None = None,
                     num_images: int | None = None,
                     batch_size: int = 16, out_dir: str | os.PathLike, device: str | torch.device = "cpu",
                     evaluators_dir: str | None = None, model: str = "",
                     num_emoji: int | None = None, seeds_per_prompt: int = 1,
                     guidance_rescale: float = 0.0, guidance_interval: Sequence[float] = (0.0, 1.0)) -> dict[str, Any]:
    """What ``snapfusion eval`` calls: resolve --prompts / --guidance / --guidance-sweep, then ``evaluate``.

    ``num_images`` counts prompts: the first N of the set (default: all), each with ``seeds_per_prompt`` seeds, so
    N x K images."""
    if (guidance is None) == (guidance_sweep is None):
        raise SnapFusionError("give exactly one of --guidance or --guidance-sweep")
    scales = (float(guidance),) if guidance is not None else parse_guidance_sweep(guidance_sweep)
    # user input first: fail before loading anything
    records = load_records(prompts, num_emoji)
    n = len(records) if num_images is None else num_images
    _check_count(n, len(records), "prompts")
    records = with_seeds_per_prompt(records[:n], seeds_per_prompt)
    ev = load_evaluators(evaluators_dir, device=device)
    return evaluate(generate_fn, records, guidance_scales=scales, steps=steps, sampler=sampler,
                    num_images=len(records), batch_size=batch_size, out_dir=out_dir, evaluators=ev, device=device,
                    model=model, seeds_per_prompt=seeds_per_prompt, guidance_rescale=guidance_rescale,
                    guidance_interval=guidance_interval)
