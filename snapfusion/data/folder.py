"""Your own images: an image-caption folder in the imagefolder layout, and prompt files.

The folder holds images and a ``metadata.jsonl`` with one JSON object per line, ``{"file_name": "cat.png",
"text": "a cat on a mat"}`` (``"caption"`` is accepted for ``"text"``): the layout of diffusers' text-to-image
example and of the ``imagefolder`` loader of the datasets library. Items are those of the built-in scene data
(snapfusion/data/dataset.py): ``{"image": uint8 (3, size, size), "caption": str}``, each image resized (shorter side
to ``size``, bicubic) and center-cropped. Every line and every image header is checked when the folder is opened, so
a bad folder fails in one line before training starts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from snapfusion.errors import InputError, WeightsError

METADATA = "metadata.jsonl"
CAPTION_KEYS = ("text", "caption")  # the first one present is the caption
PROMPT_KEYS = ("text", "prompt", "caption")


def _caption(record: dict, keys: tuple[str, ...]) -> str | None:
    return next((record[k] for k in keys if isinstance(record.get(k), str)), None)


def read_metadata(folder: str | os.PathLike) -> list[tuple[str, str]]:
    """(file name relative to ``folder``, caption) per line of ``folder/metadata.jsonl``; ``InputError`` naming the
    line for a bad one, ``WeightsError`` for a missing folder, metadata file or image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"image folder not found: {folder}")
    meta = folder / METADATA
    if not meta.is_file():
        raise WeightsError(f"no {METADATA} in {folder} (one line per image: "
                           '{"file_name": "a.png", "text": "a caption"})')
    rows, root = [], folder.resolve()
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{meta} line {n}: not JSON ({err.msg})") from None
        name, text = (record.get("file_name"), _caption(record, CAPTION_KEYS)) if isinstance(record, dict) else (0, 0)
        if not isinstance(name, str) or not name or text is None:
            raise InputError(f"{meta} line {n}: needs a \"file_name\" and a \"text\" (or \"caption\") string")
        path = (folder / name).resolve()
        if Path(name).is_absolute() or not path.is_relative_to(root):
            raise InputError(f"{meta} line {n}: file_name {name!r} must be a path inside {folder}")
        if not path.is_file():
            raise WeightsError(f"{meta} line {n}: image not found: {folder / name}")
        rows.append((name, text))
    if not rows:
        raise InputError(f"{meta} lists no images")
    return rows


def load_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """An image file -> uint8 (3, size, size): RGB, EXIF-rotated, shorter side resized to ``size``, center crop."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise WeightsError(f"unreadable or corrupt image: {path} ({type(err).__name__}: {err})") from None
    w, h = im.size
    scale = size / min(w, h)
    rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((rw, rh), Image.Resampling.BICUBIC)
    left, top = (rw - size) // 2, (rh - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).contiguous()  # (3, size, size) uint8


def _check_header(path: Path) -> None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if min(im.size) < 1:
                raise ValueError("empty image")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise WeightsError(f"unreadable or corrupt image: {path} ({type(err).__name__}: {err})") from None


class ImageCaptionFolder(Dataset):
    """Map-style dataset over an image-caption folder: item i is {"image": uint8 (3, size, size), "caption": str,
    "file_name": str}."""

    def __init__(self, folder: str | os.PathLike, size: int = 512):
        if isinstance(size, bool) or not isinstance(size, int) or size < 8:
            raise InputError(f"image size must be an integer >= 8, got {size!r}")
        self.folder, self.size = Path(folder), size
        self.rows = read_metadata(self.folder)
        for name, _ in self.rows:  # headers only: a non-image fails now, not hours into training
            _check_header(self.folder / name)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        name, text = self.rows[index]
        return {"image": load_image(self.folder / name, self.size), "caption": text, "file_name": name}

    def captions(self) -> list[str]:
        """Every caption, in order (for stages that need only prompts)."""
        return [text for _, text in self.rows]


def collate_folder(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images to (B, 3, H, W) uint8; keep captions and file names as lists."""
    return {"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items],
            "file_name": [it["file_name"] for it in items]}


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a file: ``.jsonl`` (a "text", "prompt" or "caption" string per line), an image folder's
    metadata.jsonl (a folder path), or plain text (one prompt per non-blank line)."""
    path = Path(path)
    if path.is_dir():
        return [text for _, text in read_metadata(path)]
    if not path.is_file():
        raise WeightsError(f"prompt file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err.reason})") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path} line {n}: not JSON ({err.msg})") from None
            text = _caption(record, PROMPT_KEYS) if isinstance(record, dict) else None
            if text is None:
                raise InputError(f"{path} line {n}: needs a \"text\" (or \"prompt\", \"caption\") string")
            prompts.append(text)
        else:
            prompts.append(line.strip())
    if not prompts:
        raise InputError(f"{path} holds no prompts")
    return prompts
