"""Training of the scene-domain evaluators (dual encoder, attribute probe) and the cached domain-FID reference.

Renders a fixed pool of train-split scenes (512 px, downsampled to the evaluators' 128 px), trains each model on
it with AdamW + cosine schedule, then renders test-split scenes at 512 px to cache the reference feature stats.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from snapfusion.config import format_config
from snapfusion.eval.evaluators import (CLIP_KIND, PROBE_KIND, REFERENCE_FILE, clip_features, save_evaluators)
from snapfusion.eval.frechet import gaussian_stats
from snapfusion.eval.probe import AttributeProbe, ProbeConfig, center_table, probe_loss, probe_targets
from snapfusion.eval.scene_clip import SceneClip, SceneClipConfig, split_words


@dataclasses.dataclass(frozen=True)
class EvalTrainConfig:
    """What ``train_evaluators`` does; defaults are the shipped evaluators' recipe."""

    train_images: int = 120_000  # fixed pool of train-split renders
    reference_images: int = 10_000  # test-split renders behind the cached domain-FID stats
    image_size: int = 128  # evaluator input side
    clip_steps: int = 4000
    clip_batch: int = 512
    probe_steps: int = 4000
    probe_batch: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 200
    clip_seconds: float = 1e9  # time budget per model: steps are cut to fit, measured after 20 steps
    probe_seconds: float = 1e9
    workers: int = 8  # DataLoader workers that render
    seed: int = 0


class _Downsampled(torch.utils.data.Dataset):
    """SceneDataset items with the image downsampled (antialiased) to ``size`` and the scene as attributes."""

    def __init__(self, split: str, length: int, seed: int, size: int | None):
        from snapfusion.data import SceneDataset

        self.ds, self.size = SceneDataset(split, size=512, seed=seed, length=length), size

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        item = self.ds[i]
        img = item["image"]
        if self.size is not None:
            x = F.interpolate(img[None].float(), size=(self.size, self.size), mode="bilinear", antialias=True)
            img = x[0].round().clamp(0, 255).to(torch.uint8)
        return {"image": img, "caption": item["caption"], "attributes": item["scene"].attributes()}


def _collate(items: list[dict]) -> dict:
    return {"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items],
            "attributes": [it["attributes"] for it in items]}


def scene_batches(split: str, length: int, seed: int, size: int | None, *, batch_size: int, workers: int):
    """Rendered (split, seed) items in order, in batches, rendered by ``workers`` processes."""
    return DataLoader(_Downsampled(split, length, seed, size), batch_size=batch_size, num_workers=workers,
                      collate_fn=_collate, persistent_workers=False)


def render_pool(tc: EvalTrainConfig, log=print) -> dict:
    """The training pool: uint8 images (N, 3, s, s), captions, attributes."""
    t0, images, captions, attributes = time.time(), [], [], []
    for batch in scene_batches("train", tc.train_images, tc.seed, tc.image_size, batch_size=256,
                               workers=tc.workers):
        images.append(batch["image"])
        captions += batch["caption"]
        attributes += batch["attributes"]
    seconds = round(time.time() - t0, 1)
    log(f"rendered {len(captions)} train scenes in {seconds} s")
    return {"images": torch.cat(images), "captions": captions, "attributes": attributes, "seconds": seconds}


def word_list(captions: list[str]) -> tuple[str, ...]:
    """Text vocabulary: every word of the training captions and of every name and synonym of the atlas."""
    from snapfusion.data import vocab
    from snapfusion.data.atlas import load_atlas

    words = {w for c in captions for w in split_words(c)}
    v = vocab()
    names = [*v.objects, *v.colors, *v.sizes, *v.positions, *v.relations, *v.directions]
    for e in load_atlas().entries:
        names += [e.name, e.plural, *e.synonyms, *e.synonym_plurals]
    words |= {w for n in names for w in split_words(n)}
    return tuple(sorted(words))


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def _fit(model: torch.nn.Module, loss_of_batch, steps: int, budget_s: float, tc: EvalTrainConfig, name: str,
         log) -> dict:
    """The one training loop: AdamW, warmup + cosine, bf16 autocast on CUDA; the step count shrinks to fit
    ``budget_s`` (timed over the first 20 steps). Returns {"steps", "seconds"}."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay}, {"params": rest, "weight_decay": 0}],
                            lr=tc.lr, betas=(0.9, 0.98))
    plan = {"total": steps}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, plan["total"], tc.warmup))
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(tc.seed)
    t0, step = time.time(), 0
    model.train()
    while step < plan["total"]:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_of_batch(gen).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step == 20:
            t20 = time.time()  # the first steps include warm-up (kernel selection): time steps 21..40
        if step == 40:
            per_step = (time.time() - t20) / 20
            plan["total"] = max(41, min(steps, 41 + int((budget_s - (time.time() - t0)) / per_step)))
            log(f"{name}: {per_step * 1000:.0f} ms/step -> {plan['total']} steps")
        if step % 250 == 0 or step == plan["total"] - 1:
            log(f"{name} step {step}/{plan['total']} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
        step += 1
    model.eval()
    return {"steps": step, "seconds": round(time.time() - t0, 1)}


def _tokenize_all(model: SceneClip, captions: list[str]) -> torch.Tensor:
    """All captions as one (N, max_words) id tensor on the model's device (padding = 0)."""
    ids = torch.zeros(len(captions), model.cfg.max_words, dtype=torch.long)
    for i in range(0, len(captions), 4096):
        chunk = model.tokenize(captions[i: i + 4096]).cpu()
        ids[i: i + len(chunk), : chunk.shape[1]] = chunk
    return ids.to(next(model.parameters()).device)


def train_clip(pool: dict, tc: EvalTrainConfig, device, log=print) -> tuple[SceneClip, float]:
    """Train the dual encoder on the pool with symmetric InfoNCE; returns (model, seconds)."""
    torch.manual_seed(tc.seed)
    cfg = SceneClipConfig(image_size=tc.image_size, words=word_list(pool["captions"]))
    log(format_config(dataclasses.replace(cfg, words=(f"{len(cfg.words)} words",))))
    model = SceneClip(cfg).to(device)
    images = pool["images"].to(device)  # the whole uint8 pool fits on one GPU
    ids = _tokenize_all(model, pool["captions"])

    def batch_loss(gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(images), (tc.clip_batch,), generator=gen).to(device)
        batch_ids = ids[idx]
        return model(images[idx], batch_ids[:, : int(batch_ids.ne(0).sum(1).max())])

    return model, _fit(model, batch_loss, tc.clip_steps, tc.clip_seconds, tc, "clip", log)


def train_probe(pool: dict, tc: EvalTrainConfig, device, log=print) -> tuple[AttributeProbe, float]:
    """Train the attribute probe on the pool (CenterNet heatmaps + background); returns (model, seconds)."""
    from snapfusion.data import vocab

    torch.manual_seed(tc.seed + 1)
    v = vocab()
    cfg = ProbeConfig(objects=v.objects, shapes=v.shapes, colors=v.colors, sizes=v.sizes, image_size=tc.image_size)
    log(format_config(dataclasses.replace(cfg, objects=(f"{len(cfg.objects)} objects",))))
    model = AttributeProbe(cfg).to(device)
    centers, bg = center_table(cfg, pool["attributes"])
    centers, bg, images = centers.to(device), bg.to(device), pool["images"].to(device)
    slot = torch.full((len(images),), -1, dtype=torch.long, device=device)  # image index -> batch position

    def batch_loss(gen: torch.Generator) -> torch.Tensor:
        idx = torch.randperm(len(images), generator=gen)[: tc.probe_batch].to(device)
        slot.fill_(-1)
        slot[idx] = torch.arange(len(idx), device=device)
        rows = centers[slot[centers[:, 0].long()] >= 0].clone()
        rows[:, 0] = slot[rows[:, 0].long()].float()
        x = images[idx].float()
        std = torch.rand(len(idx), 1, 1, 1, device=device) * 8.0 * (torch.rand(len(idx), 1, 1, 1, device=device) < 0.5)
        x = (x + std * torch.randn_like(x)).clamp(0, 255) / 255.0  # mild noise augment on half the images
        return probe_loss(model(x), probe_targets(cfg, rows, bg[idx]))

    return model, _fit(model, batch_loss, tc.probe_steps, tc.probe_seconds, tc, "probe", log)


@torch.no_grad()
def reference_stats(clip: SceneClip, tc: EvalTrainConfig, log=print):
    """Domain-FID reference: stats of ``clip`` features of the first N test-split renders (seed 0, 512 px)."""
    t0, feats = time.time(), []
    for batch in scene_batches("test", tc.reference_images, 0, None, batch_size=250, workers=tc.workers):
        feats.append(clip_features(clip, batch["image"]))
    log(f"reference features of {tc.reference_images} test renders in {time.time() - t0:.0f} s")
    return gaussian_stats(torch.cat(feats))


def train_evaluators(out_dir: str | Path, tc: EvalTrainConfig = EvalTrainConfig(), *, device, log=print) -> dict:
    """Render, train both evaluators, cache the reference stats and save all under ``out_dir``; returns timings."""
    log(format_config(tc))
    pool = render_pool(tc, log)
    clip, clip_run = train_clip(pool, tc, device, log)
    probe, probe_run = train_probe(pool, tc, device, log)
    stats = reference_stats(clip, tc, log)
    meta = {"config": dataclasses.asdict(tc), "render_seconds": pool["seconds"], "clip": clip_run, "probe": probe_run,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    save_evaluators(out_dir, clip, probe, stats, meta)
    log(f"saved {CLIP_KIND}, {PROBE_KIND} and {REFERENCE_FILE} to {out_dir}")
    return meta
