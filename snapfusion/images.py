"""Generated images to files with their settings: PNG text chunks, or EXIF for JPEG and WebP; written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from snapfusion.fileio import atomic_write_with
from snapfusion.metadata import a1111_parameters
from snapfusion.validation import IMAGE_FORMATS, check_output_image, used_negative_prompt

EXIF_DESCRIPTION = 0x010E  # ImageDescription: the settings as one JSON object
EXIF_SOFTWARE = 0x0131


def image_metadata(*, prompt: str, negative_prompt: str | None, seeds, steps: int, guidance: float, sampler: str,
                   model: str, decoder: str = "model's", size: tuple[int, int] | None = None,
                   **extra: Any) -> dict[str, str]:
    """The settings an image records, as text; the negative prompt only when it was used (guidance != 1). With
    ``size`` (width, height), also AUTOMATIC1111's ``parameters`` text, which image tools and sites read."""
    negative = used_negative_prompt(negative_prompt, guidance)
    items = {"prompt": prompt, "negative_prompt": negative, "seed": seeds, "steps": steps, "guidance": guidance,
             "sampler": sampler, "model": model, "decoder": decoder, **extra, "software": "snapfusion"}
    if size is not None:
        first = seeds[0] if isinstance(seeds, (list, tuple)) else seeds
        items["parameters"] = a1111_parameters(prompt, negative_prompt=negative or "", steps=steps, sampler=sampler,
                                               guidance=guidance, seed=first, width=size[0], height=size[1],
                                               model=model, extra={"Decoder": None if decoder == "model's" else decoder})
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in items.items()}


def save_image(image: Image.Image, path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Write ``image`` to ``path`` (format from the extension) with ``metadata``, through a temporary file."""
    path = check_output_image(path)
    fmt = IMAGE_FORMATS[path.suffix.lower()]
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "PNG":
        info = PngInfo()
        for key, value in metadata.items():
            info.add_text(key, value)
        return atomic_write_with(path, lambda tmp: image.save(tmp, format=fmt, pnginfo=info))
    exif = Image.Exif()
    exif[EXIF_DESCRIPTION] = json.dumps(metadata)
    exif[EXIF_SOFTWARE] = "snapfusion"
    extra = {"quality": 95} if fmt == "JPEG" else {"quality": 95, "method": 4}
    return atomic_write_with(path, lambda tmp: image.convert("RGB").save(tmp, format=fmt, exif=exif, **extra))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The settings ``save_image`` wrote into ``path`` (PNG text chunks or the EXIF description)."""
    with Image.open(path) as im:
        if im.format == "PNG":
            return dict(getattr(im, "text", {}))
        raw = im.getexif().get(EXIF_DESCRIPTION)
    return json.loads(raw) if raw else {}
