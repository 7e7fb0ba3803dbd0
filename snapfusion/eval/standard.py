"""Standard metrics for users with real weights: Inception FID and CLIP score from a local transformers CLIP folder.

Nothing here downloads: paths are checked first (a missing one raises at once, naming it), transformers loads with
``local_files_only=True`` and safetensors only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from snapfusion.errors import WeightsError
from snapfusion.eval.frechet import GaussianStats, fid_from_features
from snapfusion.eval.inception import FIDInceptionV3
from snapfusion.eval.scene_clip import clip_score_from_embeddings


def to_float_images(images: torch.Tensor | Iterable) -> torch.Tensor:
    """uint8 (B, 3, H, W) tensor, float [0, 1] tensor or PIL images -> float (B, 3, H, W) in [0, 1]."""
    if isinstance(images, torch.Tensor):
        return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    arrays = [np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def inception_features(net: FIDInceptionV3, images: torch.Tensor, *, batch_size: int = 50) -> torch.Tensor:
    """(N, 3, H, W) images (uint8 or [0, 1]) -> (N, 2048) float64 pool3 features, on the network's device."""
    device = next(net.parameters()).device
    out = [net(to_float_images(images[i: i + batch_size]).to(device)).double().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def inception_fid(net: FIDInceptionV3, images: torch.Tensor, reference: torch.Tensor | GaussianStats) -> float:
    """Inception FID between ``images`` and reference images (or their cached pool3 stats)."""
    ref = reference if isinstance(reference, GaussianStats) else inception_features(net, reference)
    return fid_from_features(inception_features(net, images), ref)


def _check_clip_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise WeightsError(f"CLIP model folder not found: {folder}")
    if not (folder / "config.json").is_file():
        raise WeightsError(f"no config.json in CLIP model folder {folder}")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.safetensors.index.json")):
        raise WeightsError(f"no .safetensors weights in CLIP model folder {folder} (pickle checkpoints are refused)")


class HFClipScorer:
    """CLIP score with a transformers ``CLIPModel`` + processor read from a local folder (e.g. ViT-g/14, ViT-L/14)."""

    def __init__(self, folder: str | os.PathLike, *, device: str | torch.device = "cpu"):
        folder = Path(folder)
        _check_clip_folder(folder)
        from transformers import CLIPModel, CLIPProcessor

        kw = {"local_files_only": True}
        self.model = CLIPModel.from_pretrained(str(folder), use_safetensors=True, **kw).eval().to(device)
        self.processor = CLIPProcessor.from_pretrained(str(folder), **kw)
        self.device = torch.device(device)

    @torch.no_grad()
    def scores(self, images: torch.Tensor | list, prompts: list[str]) -> torch.Tensor:
        """Per-image CLIP score 100 * max(cos, 0), shape (B,)."""
        pixels = (to_float_images(images) * 255).round().to(torch.uint8)
        inputs = self.processor(text=prompts, images=list(pixels), return_tensors="pt", padding=True,
                                truncation=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        img, txt = (getattr(t, "pooler_output", t) for t in (img, txt))  # plain tensors or output objects
        return clip_score_from_embeddings(img, txt).cpu()
