"""The committed emoji atlas: one RGBA PNG of square cells plus a JSON index (built by scripts/build_emoji_atlas.py)."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

from PIL import Image

from snapfusion.errors import SnapFusionError

ATLAS_DIR = Path(__file__).resolve().parent.parent / "assets" / "emoji"
ATLAS_PNG = "atlas.png"
ATLAS_JSON = "atlas.json"


@dataclasses.dataclass(frozen=True)
class EmojiEntry:
    """One emoji of the atlas: caption names, source codepoints and where its sprite lies."""

    name: str  # canonical caption name, e.g. "red apple"
    plural: str  # e.g. "red apples"
    synonyms: tuple[str, ...]  # from CLDR en annotations
    synonym_plurals: tuple[str, ...]
    codepoints: str  # e.g. "1F34E" or "2708 FE0F"
    group: str  # "animal", "food", "vehicle", "object", "nature"
    cell: tuple[int, int]  # (column, row) in the atlas grid
    extent: tuple[float, float]  # sprite content (width, height) as a fraction of the cell side


@dataclasses.dataclass(frozen=True)
class Atlas:
    """The loaded atlas: entries in curated order (most distinct first) and the sheet image."""

    cell: int
    entries: tuple[EmojiEntry, ...]
    sheet: Image.Image  # RGBA

    def entry(self, name: str) -> EmojiEntry:
        """The entry called ``name``."""
        for e in self.entries:
            if e.name == name:
                return e
        raise SnapFusionError(f"unknown emoji name '{name}' (not in {ATLAS_DIR / ATLAS_JSON})")


@functools.lru_cache(maxsize=4)
def load_atlas(folder: str | None = None) -> Atlas:
    """Load the atlas PNG + JSON from ``folder`` (default: the packaged snapfusion/assets/emoji)."""
    root = Path(folder) if folder else ATLAS_DIR
    index_path, png_path = root / ATLAS_JSON, root / ATLAS_PNG
    if not index_path.is_file() or not png_path.is_file():
        raise SnapFusionError(f"emoji atlas missing in {root}: run scripts/build_emoji_atlas.py")
    index = json.loads(index_path.read_text())
    entries = tuple(
        EmojiEntry(
            name=e["name"], plural=e["plural"], synonyms=tuple(e["synonyms"]),
            synonym_plurals=tuple(e["synonym_plurals"]), codepoints=e["codepoints"], group=e["group"],
            cell=(e["cell"][0], e["cell"][1]), extent=(e["extent"][0], e["extent"][1]),
        )
        for e in index["entries"]
    )
    sheet = Image.open(png_path)
    sheet.load()
    if sheet.mode != "RGBA":
        raise SnapFusionError(f"{png_path}: expected an RGBA image, got mode {sheet.mode}")
    return Atlas(cell=int(index["cell"]), entries=entries, sheet=sheet)


@functools.lru_cache(maxsize=4096)
def emoji_sprite(name: str, side: int) -> Image.Image:
    """The RGBA sprite of emoji ``name`` resized to a ``side`` x ``side`` square (cached per size)."""
    atlas = load_atlas()
    col, row = atlas.entry(name).cell
    c = atlas.cell
    tile = atlas.sheet.crop((col * c, row * c, (col + 1) * c, (row + 1) * c))
    # Pillow resamples RGBA with premultiplied alpha, so edges do not pick up dark fringes.
    resample = Image.Resampling.LANCZOS if side < c else Image.Resampling.BICUBIC
    return tile.resize((side, side), resample)
