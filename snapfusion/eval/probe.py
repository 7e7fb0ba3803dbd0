"""Attribute probe (GenEval-like, for the scene domain): a small CNN that reads objects, counts, places, background.

CenterNet-style (Zhou et al., 2019, "Objects as Points"): per-cell object-class heatmaps on a 16x16 grid
(128 px input, stride 8), trained with the penalty-reduced focal loss on Gaussian peaks at object centers, plus
per-cell color and size classifiers read at the peaks and a position-aware background classifier. Decoding keeps
cells that are 3x3 local maxima of the class-max heatmap above a threshold: one detection per drawn object copy.
Trained on renders only, never on generated images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from snapfusion.eval.scene_clip import ConvTower, preprocess


@dataclass(frozen=True)
class ProbeConfig:
    """Label lists (in vocab order) and network sizes."""

    objects: tuple[str, ...] = ()  # emoji names then shape names (snapfusion.data.vocab().objects)
    shapes: tuple[str, ...] = ()  # the object names that carry a color
    colors: tuple[str, ...] = ()
    sizes: tuple[str, ...] = ()
    image_size: int = 128
    widths: tuple[int, ...] = (32, 64, 128, 192, 192)  # last stages run at the grid resolution
    downsamples: int = 2  # stem /2 then 2 downsamples: 128 px -> 16x16 grid
    groups: int = 8
    background_channels: int = 8  # per-cell channels of the flattened background head
    peak_sigma: float = 1.0  # Gaussian target radius, grid cells
    threshold: float = 0.3  # heatmap peak threshold at decoding

    @property
    def grid(self) -> int:
        return self.image_size // 2 ** (1 + self.downsamples)


@dataclass(frozen=True)
class Detection:
    """One decoded object copy: class name, shape color (None for emoji), size, center (relative x, y), score."""

    name: str
    color: str | None
    size: str
    x: float
    y: float
    score: float


@dataclass(frozen=True)
class BackgroundReading:
    kind: str  # "solid" or "gradient"
    colors: tuple[str, ...]
    direction: str | None


class AttributeProbe(nn.Module):
    """Images -> dict of heatmap (B, K, g, g), color (B, C, g, g), size (B, S, g, g) logits and background logits."""

    def __init__(self, cfg: ProbeConfig):
        super().__init__()
        self.cfg = cfg
        self.tower = ConvTower(cfg.widths, cfg.groups, cfg.downsamples)
        w, g, n_col = cfg.widths[-1], cfg.grid, len(cfg.colors)
        self.heat = nn.Conv2d(w, len(cfg.objects), 1)
        self.color = nn.Conv2d(w, n_col, 1)
        self.size = nn.Conv2d(w, len(cfg.sizes), 1)
        self.bg_reduce = nn.Conv2d(w, cfg.background_channels, 1)
        # background heads: kind (2), first color, second color, direction (2)
        self.bg_head = nn.Linear(cfg.background_channels * g * g, 2 + n_col + n_col + 2)
        with torch.no_grad():
            self.heat.bias.fill_(-4.6)  # CenterNet prior: sigmoid(-4.6) ~ 0.01

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = preprocess(images.to(self.heat.weight.device), self.cfg.image_size)
        fmap = self.tower(x)  # (B, W, g, g)
        bg = self.bg_head(self.bg_reduce(fmap).flatten(1))  # (B, 2 + 2C + 2)
        n_col = len(self.cfg.colors)
        return {
            "heat": self.heat(fmap), "color": self.color(fmap), "size": self.size(fmap),
            "bg_kind": bg[:, :2], "bg_color0": bg[:, 2: 2 + n_col], "bg_color1": bg[:, 2 + n_col: 2 + 2 * n_col],
            "bg_direction": bg[:, 2 + 2 * n_col:],
        }


BG_KINDS, DIRECTIONS = ("solid", "gradient"), ("horizontal", "vertical")


def center_table(cfg: ProbeConfig, attributes: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """``scene.attributes()`` dicts -> centers (M, 6) float rows (image, class, cx, cy, size, color or -100) in grid
    units, and background labels (N, 4) long (kind, color0, color1 or -100, direction or -100)."""
    obj_index, col_index, size_index = ({n: i for i, n in enumerate(names)}
                                        for names in (cfg.objects, cfg.colors, cfg.sizes))
    rows, bg = [], torch.full((len(attributes), 4), -100, dtype=torch.long)
    for b, attr in enumerate(attributes):
        for obj in attr["objects"]:
            color = col_index[obj["color"]] if obj["color"] is not None else -100
            for x0, y0, x1, y1 in obj["boxes"]:
                cx, cy = (x0 + x1) / 2 * cfg.grid, (y0 + y1) / 2 * cfg.grid
                rows.append((b, obj_index[obj["name"]], cx, cy, size_index[obj["size"]], color))
        back = attr["background"]
        bg[b, 0], bg[b, 1] = BG_KINDS.index(back["kind"]), col_index[back["colors"][0]]
        if back["kind"] == "gradient":
            bg[b, 2], bg[b, 3] = col_index[back["colors"][1]], DIRECTIONS.index(back["direction"])
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 6), bg


def probe_targets(cfg: ProbeConfig, centers: torch.Tensor, bg: torch.Tensor) -> dict[str, torch.Tensor]:
    """Targets for a batch of ``len(bg)`` images from its center rows (image index = position in the batch)."""
    g, k, n = cfg.grid, len(cfg.objects), len(bg)
    dev = centers.device
    b, c = centers[:, 0].long(), centers[:, 1].long()
    cx, cy = centers[:, 2], centers[:, 3]
    i, j = cy.long().clamp(0, g - 1), cx.long().clamp(0, g - 1)  # center cells
    grid = torch.arange(g, device=dev) + 0.5
    d2 = (grid[None, None, :] - cx[:, None, None]) ** 2 + (grid[None, :, None] - cy[:, None, None]) ** 2
    peaks = torch.exp(-d2 / (2 * cfg.peak_sigma ** 2))  # (M, g, g)
    peaks[torch.arange(len(b), device=dev), i, j] = 1.0  # the center cell is the positive
    heat = torch.zeros(n * k, g, g, device=dev).index_reduce_(0, b * k + c, peaks, "amax")
    color = torch.full((n, g, g), -100, dtype=torch.long, device=dev)
    size = torch.full((n, g, g), -100, dtype=torch.long, device=dev)
    color[b, i, j], size[b, i, j] = centers[:, 5].long(), centers[:, 4].long()
    return {"heat": heat.view(n, k, g, g), "color": color, "size": size, "bg": bg.to(dev)}


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """CenterNet penalty-reduced focal loss per sample (B,), normalised by the number of peaks."""
    p = torch.sigmoid(logits.float()).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    pos_loss = -torch.log(p) * (1 - p) ** alpha * pos
    neg_loss = -torch.log(1 - p) * p ** alpha * (1 - target) ** beta * (1 - pos)
    n_pos = pos.flatten(1).sum(1).clamp(min=1)
    return (pos_loss + neg_loss).flatten(1).sum(1) / n_pos


def probe_loss(out: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample probe loss (B,): focal heatmap + center-cell color/size CE + background CE."""
    def cell_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="none")  # (B, g, g)
        return ce.flatten(1).sum(1) / labels.ne(-100).flatten(1).sum(1).clamp(min=1)

    loss = focal_loss(out["heat"], tgt["heat"])
    loss = loss + cell_ce(out["color"], tgt["color"]) + cell_ce(out["size"], tgt["size"])
    for i, name in enumerate(("bg_kind", "bg_color0", "bg_color1", "bg_direction")):
        loss = loss + F.cross_entropy(out[name].float(), tgt["bg"][:, i], ignore_index=-100, reduction="none")
    return loss


@torch.no_grad()
def decode(cfg: ProbeConfig, out: dict[str, torch.Tensor]) -> tuple[list[list[Detection]], list[BackgroundReading]]:
    """Raw outputs -> per-image detections (3x3 peak NMS over the class-max heatmap) and background readings."""
    prob = torch.sigmoid(out["heat"].float())  # (B, K, g, g)
    best, cls = prob.max(1)  # (B, g, g)
    peaks = (best == F.max_pool2d(best[:, None], 3, stride=1, padding=1)[:, 0]) & (best > cfg.threshold)
    color, size = out["color"].argmax(1), out["size"].argmax(1)  # (B, g, g)
    g, shapes = cfg.grid, set(cfg.shapes)
    detections = []
    for b in range(prob.shape[0]):
        found = []
        for i, j in peaks[b].nonzero().tolist():
            name = cfg.objects[int(cls[b, i, j])]
            col = cfg.colors[int(color[b, i, j])] if name in shapes else None
            found.append(Detection(name=name, color=col, size=cfg.sizes[int(size[b, i, j])],
                                   x=(j + 0.5) / g, y=(i + 0.5) / g, score=float(best[b, i, j])))
        detections.append(found)
    backgrounds = []
    for b in range(prob.shape[0]):
        kind = BG_KINDS[int(out["bg_kind"][b].argmax())]
        c0 = cfg.colors[int(out["bg_color0"][b].argmax())]
        if kind == "solid":
            backgrounds.append(BackgroundReading("solid", (c0,), None))
        else:
            c1 = cfg.colors[int(out["bg_color1"][b].argmax())]
            direction = DIRECTIONS[int(out["bg_direction"][b].argmax())]
            backgrounds.append(BackgroundReading("gradient", (c0, c1), direction))
    return detections, backgrounds
