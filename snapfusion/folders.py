"""Where a pipeline folder keeps its parts: ``model_index.json`` and the shared-part rule (no model code here, so
that the pipeline and the part loaders can both use it)."""

from __future__ import annotations

from pathlib import Path

from snapfusion.config import load_json
from snapfusion.errors import WeightsError

INDEX = "model_index.json"


def part_folder(folder: str | Path, name: str) -> Path:
    """Where pipeline ``folder`` keeps its part ``name``: ``folder/name``, or the shared folder that its
    ``model_index.json`` names under "parts" (relative to ``folder``, and inside ``folder``'s parent)."""
    folder = Path(folder)
    index = folder / INDEX
    shared = load_json(index).get("parts", {}) if index.is_file() else {}
    if not isinstance(shared, dict):
        raise WeightsError(f"{index}: \"parts\" must map part names to relative folder paths")
    if name not in shared:
        return folder / name
    if not isinstance(shared[name], str) or not shared[name].strip():
        raise WeightsError(f"{index}: part {name!r} must be a relative folder path, got {shared[name]!r}")
    rel = Path(shared[name])
    target = (folder / rel).resolve()
    if rel.is_absolute() or not target.is_relative_to(folder.resolve().parent):
        raise WeightsError(f"{index}: part {name!r} must be a relative path next to the pipeline, got {rel}")
    return target
