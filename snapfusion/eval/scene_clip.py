"""A small CLIP-style dual encoder for the rendered scene domain: CNN image tower, word-level transformer text tower.

Trained with symmetric InfoNCE and a learnable temperature (Radford et al., 2021, CLIP §2.3) on rendered train
scenes and their captions. Its normalised embeddings give the domain CLIP score; its pooled penultimate image
features (``image_features``) give the domain FID.

The text tower reads whole words: captions come from a closed grammar, so a word list (shipped in the config)
covers them exactly and keeps the embedding table tiny (the 49K-token CLIP BPE table alone would be ~25 MB fp16).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from snapfusion.models.layers import Downsample, ResnetBlock

PAD, UNK, CLS = 0, 1, 2
SPECIALS = ("<pad>", "<unk>", "<cls>")
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def split_words(text: str) -> list[str]:
    """Lower-cased words and single punctuation/emoji characters of a caption."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class SceneClipConfig:
    """Sizes of the dual encoder; ``words`` is the text vocabulary (after the 3 special tokens)."""

    image_size: int = 128  # images are resized (antialiased) to this square size
    widths: tuple[int, ...] = (32, 64, 128, 256)  # CNN stage widths; stem stride 2, then /2 per stage
    groups: int = 8  # GroupNorm groups in the ResNet blocks
    embed_dim: int = 256  # shared embedding size
    spatial_channels: int = 32  # channels of the flattened, position-keeping head of the image tower
    words: tuple[str, ...] = ()
    text_width: int = 192
    text_layers: int = 3
    text_heads: int = 4
    max_words: int = 48


def preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) or float [0, 1] -> float (B, 3, size, size) in [-1, 1], antialiased resize."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x * 2.0 - 1.0


class ConvTower(nn.Module):
    """Stride-2 stem, then one ResNet block per stage, the first ``downsamples`` stages each followed by a
    Downsample: (B, 3, S, S) -> (B, widths[-1], S / 2^(1 + downsamples), ...)."""

    def __init__(self, widths: tuple[int, ...], groups: int, downsamples: int | None = None):
        super().__init__()
        downsamples = len(widths) - 1 if downsamples is None else downsamples
        self.stem = nn.Conv2d(3, widths[0], 3, stride=2, padding=1)
        blocks, downs = [], []
        for i, w in enumerate(widths):
            blocks.append(ResnetBlock(widths[max(i - 1, 0)], w, temb_channels=None, groups=groups))
            downs.append(Downsample(w) if i < downsamples else nn.Identity())
        self.blocks, self.downs = nn.ModuleList(blocks), nn.ModuleList(downs)
        self.norm_out = nn.GroupNorm(groups, widths[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block, down in zip(self.blocks, self.downs):
            h = down(block(h))
        return F.silu(self.norm_out(h))  # (B, C, S/16, S/16) for 4 stages, 3 downsamples


class TextTower(nn.Module):
    """Word embeddings + learned positions + pre-norm transformer encoder; the <cls> token's output is the text."""

    def __init__(self, cfg: SceneClipConfig):
        super().__init__()
        self.token = nn.Embedding(len(SPECIALS) + len(cfg.words), cfg.text_width)
        self.position = nn.Parameter(torch.randn(cfg.max_words, cfg.text_width) * 0.02)
        layer = nn.TransformerEncoderLayer(cfg.text_width, cfg.text_heads, 4 * cfg.text_width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.text_width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token(ids) + self.position[: ids.shape[1]]  # (B, L, W)
        x = self.encoder(x, src_key_padding_mask=ids == PAD)
        return self.norm(x[:, 0])  # (B, W)


class SceneClip(nn.Module):
    """Dual encoder: ``encode_image`` / ``encode_text`` give L2-normalised (B, embed_dim) embeddings."""

    def __init__(self, cfg: SceneClipConfig):
        super().__init__()
        self.cfg = cfg
        self.word_index = {w: i + len(SPECIALS) for i, w in enumerate(cfg.words)}
        self.image_tower = ConvTower(cfg.widths, cfg.groups)
        grid = cfg.image_size // 2 ** len(cfg.widths)
        self.spatial = nn.Conv2d(cfg.widths[-1], cfg.spatial_channels, 1)
        self.image_proj = nn.Linear(cfg.spatial_channels * grid * grid + cfg.widths[-1], cfg.embed_dim)
        self.text_tower = TextTower(cfg)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Captions -> (B, L) word ids: <cls> first, unknown words -> <unk>, truncated to ``max_words``."""
        rows = [[CLS] + [self.word_index.get(w, UNK) for w in split_words(c)] for c in captions]
        rows = [r[: self.cfg.max_words] for r in rows]
        ids = torch.full((len(rows), max(map(len, rows))), PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids.to(self.logit_scale.device)

    def image_trunk(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (feature map (B, C, g, g), pooled penultimate features (B, C)); the latter feed domain FID."""
        fmap = self.image_tower(preprocess(images.to(self.logit_scale.device), self.cfg.image_size))
        return fmap, fmap.mean(dim=(2, 3))

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate image features (B, widths[-1]) used for the domain FID."""
        return self.image_trunk(images)[1]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        fmap, pooled = self.image_trunk(images)
        spatial = self.spatial(fmap).flatten(1)  # (B, spatial_channels * g * g): keeps where things are
        return F.normalize(self.image_proj(torch.cat([spatial, pooled], 1)), dim=-1)

    def encode_text(self, captions: list[str] | torch.Tensor) -> torch.Tensor:
        """Captions (or their (B, L) word ids from ``tokenize``) -> (B, embed_dim) unit vectors."""
        ids = self.tokenize(captions) if isinstance(captions, list) else captions
        return F.normalize(self.text_proj(self.text_tower(ids)), dim=-1)

    def forward(self, images: torch.Tensor, captions: list[str] | torch.Tensor) -> torch.Tensor:
        """Per-pair symmetric InfoNCE loss (B,) with the learnable temperature (CLIP §2.3)."""
        img, txt = self.encode_image(images), self.encode_text(captions)
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * img @ txt.T  # (B, B)
        target = torch.arange(len(captions), device=logits.device)
        return (F.cross_entropy(logits, target, reduction="none")
                + F.cross_entropy(logits.T, target, reduction="none")) / 2


def clip_score_from_embeddings(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """Per-pair CLIP score 100 * max(cos(img, txt), 0) (torchmetrics' CLIPScore definition), shape (B,)."""
    cos = F.cosine_similarity(img.float(), txt.float(), dim=-1)
    return 100.0 * cos.clamp(min=0)
