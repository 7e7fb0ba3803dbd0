"""The data piece of the training stages: captioned images (the built-in scenes or your own folder), latent pools,
and the frozen VAE encoder and text tower that turn a UNet stage's batch into latents and contexts.

Every stage reads items ``{"image": uint8 (3, H, W), "caption": str}`` from ``training_images``: the procedural
scene stream, or, when ``data_folder`` is set, an image-caption folder (snapfusion/data/folder.py): every image
once per pass, in a seeded order per pass.
"""

from __future__ import annotations

import functools
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from snapfusion.data import SceneConfig, SceneDataset, caption, collate_scenes, sample_scene
from snapfusion.data.folder import ImageCaptionFolder, collate_folder
from snapfusion.models.autoencoder import AutoencoderKL, Decoder, Encoder, load_autoencoder
from snapfusion.models.text import Tokenizer, load_text_encoder, skip_layers

STREAM_LENGTH = 2**40  # the training stream is procedural: effectively endless


def images_to_unit(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1] on ``device``."""
    return images.to(device, non_blocking=True).float().div(127.5).sub(1.0)


def crop_items(items: list[dict], crop: int | None) -> list[dict]:
    """Deterministic random crops (offset from the caption hash and image size) for autoencoder training."""
    if not crop:
        return items
    out = []
    for it in items:
        img = it["image"]
        h, w = img.shape[1:]
        rng = np.random.default_rng([zlib.crc32(it["caption"].encode()), h])
        y, x = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
        out.append({**it, "image": img[:, y:y + crop, x:x + crop]})
    return out


@functools.lru_cache(maxsize=8)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """A seeded permutation of range(n) for one pass over a folder: each epoch visits every image once, in its own
    order, the same in every process and DataLoader worker."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{epoch}".encode()))
    return tuple(torch.randperm(n, generator=g).tolist())


class FolderStream(Dataset):
    """An image-caption folder as an endless stream, resized and center-cropped to ``size``: with ``seed``, item i
    is image ``epoch_order(N, seed, i // N)[i % N]`` (every image once per pass, shuffled per pass); without, image
    i mod N (the folder's order: latent pools and held-out grids)."""

    def __init__(self, folder: str, size: int, length: int = STREAM_LENGTH, seed: int | None = None):
        self.folder, self.length, self.seed = ImageCaptionFolder(folder, size), length, seed

    def __len__(self) -> int:
        return self.length

    def index(self, i: int) -> int:
        """The folder image that stream item ``i`` is."""
        epoch, j = divmod(i, len(self.folder))
        return j if self.seed is None else epoch_order(len(self.folder), self.seed, epoch)[j]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.folder[self.index(i)]

    def caption(self, i: int) -> str:
        return self.folder.rows[self.index(i)][1]


def training_images(folder: str | None, size: int, seed: int, length: int, data: SceneConfig, *,
                    shuffle: bool = True) -> Dataset:
    """The training images of a stage: ``folder``'s (every image once per pass, in a ``seed``ed order per pass;
    ``shuffle=False``: the folder's order) when given, else the scene stream (seed, data)."""
    if folder:
        return FolderStream(folder, size, length, seed if shuffle else None)
    return SceneDataset("train", size, seed, length, data)


def collate_images(folder: str | None) -> Callable[[list[dict]], dict]:
    """The collate function of ``training_images``."""
    return collate_folder if folder else collate_scenes


def check_data_folder(folder: str | None, size: int) -> None:
    """A bad image folder fails in one line here, before any model loads."""
    if folder:
        ImageCaptionFolder(folder, size)


def pooled_caption(i: int, pool: int, seed: int, data: SceneConfig) -> tuple[int, str]:
    """Stream item i over a pool of ``pool`` scenes: the scene's index i mod pool and a fresh paraphrase of its
    caption (new each pass over the pool)."""
    j, epoch = i % pool, i // pool
    scene = sample_scene(np.random.default_rng([seed, 0, j]), "train", data)  # = SceneDataset item j
    return j, caption(scene, np.random.default_rng([seed, 0, j, epoch]), data.caption_p_omit)


def pooled_folder_caption(i: int, pool: int, stream: FolderStream, seed: int) -> tuple[int, str]:
    """Stream item i over a pool of the folder's first ``pool`` images: each pass visits the pool in its own seeded
    order; the pool index and its caption (``stream`` in the folder's order, as the pool was encoded)."""
    epoch, j = divmod(i, pool)
    k = epoch_order(pool, seed, epoch)[j]
    return k, stream.caption(k)


class PooledCaptions(Dataset):
    """Item i: the index of pooled image i mod P and its caption (``caption_of(i, P)``); with a second pool
    (mixed-resolution training) also "item" = i, from which the collate draws the second pool's image for the few
    items a mixed step uses, instead of every item drawing one."""

    def __init__(self, pool: int, caption_of: Callable[[int, int], tuple[int, str]], pool2: int = 0):
        self.pool, self.caption_of, self.pool2 = pool, caption_of, pool2

    def __len__(self) -> int:
        return STREAM_LENGTH

    def __getitem__(self, i: int) -> dict[str, Any]:
        j, text = self.caption_of(i, self.pool)
        return {"index": j, "caption": text} | ({"item": i} if self.pool2 else {})


class LatentPool:
    """Posterior mean and std (fp16, on the training device) of the first P training images at one size, encoded
    once (P, size: the task's latent_pool and image_size, or its mix_pool and mix_size)."""

    def __init__(self, encoder: Encoder, cfg, device: torch.device, mixed: bool = False):
        from torch.utils.data import DataLoader, Subset

        size, count = (cfg.mix_size, cfg.mix_pool) if mixed else (cfg.image_size, cfg.latent_pool)
        # under DDP every process renders and encodes a contiguous 1/N of the images, then all gather the whole pool
        # (the same pool in every process, in the time of its share: rendering bounds the build)
        rank, world = _rank_and_world()
        share = -(-count // world)
        folder = cfg.data_folder
        ds = Subset(training_images(folder, size, cfg.seed, count, cfg.data, shuffle=False),
                    range(min(count, rank * share), min(count, (rank + 1) * share)))
        loader = DataLoader(ds, batch_size=64, num_workers=cfg.pool_workers, collate_fn=collate_images(folder))
        means, stds = [], []
        # built lazily inside the loop's autocast: encode in the encoder's own precision (and CPU autocast cannot
        # concatenate the fp16 pool)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            for batch in loader:
                posterior = encoder.encode(images_to_unit(batch["image"], device))
                means.append(posterior.mean.half())
                stds.append(posterior.std.half())
            h = size // encoder.config.downscale
            empty = torch.empty(0, encoder.config.latent_channels, h, h, dtype=torch.float16, device=device)
            self.mean, self.std = (_gather_rows(torch.cat([empty, *rows]), share, count, world)
                                   for rows in (means, stds))  # (P, 4, h, w) each
        self.scale = encoder.config.scaling_factor

    def sample(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scaled diffusion latents of pooled images ``index`` (B,): a fresh posterior draw each time."""
        mean, std = self.mean[index].float(), self.std[index].float()
        return (mean + std * torch.randn(mean.shape, device=mean.device, generator=generator)) * self.scale


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside torch.distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_rows(local: torch.Tensor, share: int, count: int, world: int) -> torch.Tensor:
    """Every process's rows (each process holds ``share`` rows, the last maybe fewer) in rank order, ``count`` in
    all, in every process."""
    if world == 1:
        return local
    import torch.distributed as dist

    padded = torch.zeros(share, *local.shape[1:], dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[:count]


def load_encoder(folder: Path) -> Encoder:
    """The VAE encoder of an autoencoder, encoder or (with its encoder) decoder folder."""
    from snapfusion.config import load_json

    kind = load_json(folder / "config.json").get("kind")
    cls = {"vae": AutoencoderKL, "vae-encoder": Encoder, "vae-decoder": Decoder}.get(kind, AutoencoderKL)
    model = load_autoencoder(folder, cls)
    return model.encoder if isinstance(model, AutoencoderKL) else model


class LatentData:
    """The data of every UNet stage (a ``UNetTaskConfig``'s data fields): captioned images -> scaled diffusion
    latents through the frozen VAE encoder (or a latent pool), captions -> token ids with uncond_prob of them
    emptied, ids -> text contexts through the frozen text tower; with mix_size also the second pool."""

    def __init__(self, cfg):
        self.cfg = cfg
        if cfg.data_folder:  # captions of pooled images: the folder's own (a bad folder fails here, before the models)
            stream = FolderStream(cfg.data_folder, cfg.image_size)
            self.caption_of = functools.partial(pooled_folder_caption, stream=stream, seed=cfg.seed)
        else:  # a fresh paraphrase of the pooled scene's caption each pass
            self.caption_of = functools.partial(pooled_caption, seed=cfg.seed, data=cfg.data)
        self.tokenizer = Tokenizer()
        self.encoder = load_encoder(Path(cfg.vae)).eval().requires_grad_(False)
        self.text = skip_layers(load_text_encoder(cfg.text_encoder), cfg.clip_skip).eval().requires_grad_(False)
        self.pool: LatentPool | None = None
        self.mix_pool: LatentPool | None = None

    @property
    def mixing(self) -> bool:
        """Mixed-resolution training (--mix-size; check_mixed_resolution has made sure the latent pool is on)."""
        return self.cfg.mix_size > 0

    def dataset(self) -> Dataset:
        c = self.cfg
        if c.latent_pool > 0:
            return PooledCaptions(c.latent_pool, self.caption_of, c.mix_pool if self.mixing else 0)
        return training_images(c.data_folder, c.image_size, c.seed, STREAM_LENGTH, c.data)

    def collate(self, items: list[dict]) -> dict:
        if self.cfg.latent_pool > 0:
            batch = {"index": torch.tensor([it["index"] for it in items]), "caption": [it["caption"] for it in items]}
        else:
            batch = collate_images(self.cfg.data_folder)(items)
        batch["ids"] = self.caption_ids(batch["caption"])
        if self.mixing:  # the first mix_batch items' images of the second pool
            second = [self.caption_of(it["item"], self.cfg.mix_pool) for it in items[: self.cfg.mix_batch]]
            batch["index2"] = torch.tensor([j for j, _ in second])
            batch["ids2"] = self.caption_ids([text for _, text in second])
        return batch

    def caption_ids(self, texts: list[str]) -> torch.Tensor:
        """Token ids of ``texts`` with uncond_prob of them emptied (for guidance), seeded by the texts themselves."""
        rng = np.random.default_rng(zlib.crc32("\n".join(texts).encode()))
        return self.tokenizer(["" if rng.random() < self.cfg.uncond_prob else c for c in texts])

    def build_pools(self, device: torch.device) -> None:
        """Both pools of a mixed run at its first step, mixed or not: under DDP every process builds them at once and
        in the same order (each gathers its share from the others), not at its own first step of each size."""
        if self.mixing and self.mix_pool is None:
            if self.pool is None:
                self.pool = LatentPool(self.encoder.to(device), self.cfg, device)
            self.mix_pool = LatentPool(self.encoder.to(device), self.cfg, device, mixed=True)

    def latents(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Scaled diffusion latents of the batch's images: from the pool, or rendered images encoded now."""
        device = generator.device
        self.encoder.to(device)
        if self.cfg.latent_pool <= 0:
            return self.encoder.latents_from_images(images_to_unit(batch["image"], device), generator)
        if self.pool is None:
            self.pool = LatentPool(self.encoder, self.cfg, device)
        return self.pool.sample(batch["index"].to(device), generator)

    def mixed_latents(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents and token ids of a mixed step: the second pool's images at mix_size."""
        return self.mix_pool.sample(batch["index2"].to(generator.device), generator), batch["ids2"]

    @torch.no_grad()
    def context(self, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Text contexts (B, 77, D) of token ids from the frozen tower."""
        return self.text.to(device)(ids.to(device))
