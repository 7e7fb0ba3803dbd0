"""The text tower stage (CLIP-style contrastive pretraining against a small image tower, then frozen) as a ``Task``
of the one loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from snapfusion.config import to_dict
from snapfusion.data import SceneConfig
from snapfusion.losses import contrastive_loss
from snapfusion.models.text import TextEncoder, TextEncoderConfig, Tokenizer, save_text_encoder
from snapfusion.train.data import STREAM_LENGTH, check_data_folder, collate_images, images_to_unit, training_images
from snapfusion.train.state import load_weights_into, unwrap


class ImageTower(nn.Module):
    """A small conv net image encoder used only to pretrain the text tower contrastively."""

    def __init__(self, dim: int, width: int = 64):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.proj = nn.Linear(chans[-1], dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.body(x).mean((2, 3)))  # (B, dim)


class ContrastivePair(nn.Module):
    """Text tower + image tower + projections + temperature."""

    def __init__(self, text: TextEncoderConfig, embed_dim: int):
        super().__init__()
        self.text = TextEncoder(text)
        self.text_proj = nn.Linear(text.hidden_size, embed_dim, bias=False)
        self.image = ImageTower(embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def forward(self, ids: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.text.text_model(input_ids=ids).pooler_output  # (B, D) at the first EOS token
        t = F.normalize(self.text_proj(pooled).float(), dim=-1)
        i = F.normalize(self.image(images).float(), dim=-1)
        return t, i


@dataclass(frozen=True)
class TextTaskConfig:
    model: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(
        hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512, projection_dim=128))
    embed_dim: int = 128
    image_size: int = 128         # the image tower sees small renders: enough for identity and layout
    data: SceneConfig = field(default_factory=SceneConfig)
    seed: int = 1
    data_folder: str | None = None  # your own images (images + metadata.jsonl) instead of the scenes; None: scenes


class TextTask:
    name = "text"

    def __init__(self, cfg: TextTaskConfig):
        check_data_folder(cfg.data_folder, cfg.image_size)
        self.cfg = cfg
        self.tokenizer = Tokenizer()

    def describe(self) -> dict:
        return to_dict(self.cfg)

    def build(self) -> nn.Module:
        return ContrastivePair(self.cfg.model, self.cfg.embed_dim)

    def dataset(self):
        c = self.cfg
        return training_images(c.data_folder, c.image_size, c.seed, STREAM_LENGTH, c.data)

    def collate(self, items):
        batch = collate_images(self.cfg.data_folder)(items)
        batch["ids"] = self.tokenizer(batch["caption"])
        return batch

    def loss(self, model, batch, generator):
        device = generator.device
        t, i = model(batch["ids"].to(device), images_to_unit(batch["image"], device))
        loss = contrastive_loss(t, i, unwrap(model).logit_scale)
        acc = ((t @ i.t()).argmax(1) == torch.arange(len(t), device=device)).float().mean()
        return loss, {"retrieval_acc": acc, "temperature": unwrap(model).logit_scale.detach().exp()}

    def save(self, model, folder: Path) -> None:
        from snapfusion.weights import save_pretrained

        model = unwrap(model)
        save_text_encoder(folder / "text_encoder", model.text)
        save_pretrained(folder / "towers", model, self.cfg, kind="text-contrastive")

    def load(self, model, folder: Path) -> None:
        load_weights_into(model, folder / "towers")

    def sample_grid(self, model, path: Path) -> None:
        pass  # nothing visual: retrieval accuracy is logged every step
