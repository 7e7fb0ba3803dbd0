"""Final comparison of UNets inside the same pipeline: domain CLIP score and attribute accuracy at 50 steps."""

from __future__ import annotations

import torch

from snapfusion.eval.attributes import attribute_accuracy
from snapfusion.eval.evaluators import clip_scores
from snapfusion.evolve.latency import predict_ms
from snapfusion.models.unet import UNet, num_parameters


@torch.no_grad()
def compare_unets(pipe, unets: dict[str, UNet], records: list[dict], evaluators, *, steps: int = 50,
                  guidance: float = 7.5, batch: int = 16, table: dict | None = None) -> dict[str, dict]:
    """Per UNet: CLIP score, attribute accuracy ("all"), parameters and (with a table) predicted latency."""
    out = {}
    old = pipe.unet
    try:
        for name, unet in unets.items():
            pipe.unet = unet.to(pipe.device).eval()
            images, prompts = [], []
            for i in range(0, len(records), batch):
                chunk = records[i: i + batch]
                prompts += [r["prompt"] for r in chunk]
                images.append(pipe.generate([r["prompt"] for r in chunk], [r["seed"] for r in chunk], steps=steps,
                                            guidance=guidance).cpu())
            images = torch.cat(images)
            dev = next(evaluators.clip.parameters()).device
            attrs = attribute_accuracy(evaluators.probe, images.to(dev), [r["scene"] for r in records])
            out[name] = {"clip_score": float(clip_scores(evaluators.clip, images.to(dev), prompts).mean()),
                         "attribute_accuracy": attrs["all"], "parameters": num_parameters(unet)}
            if table is not None:
                out[name]["predicted_ms"] = predict_ms(unet.config, table)[0]
    finally:
        pipe.unet = old
    return out
