"""The diffusers and single-file exports behind ``snapfusion export``: resolve, check, write, one summary line."""

from __future__ import annotations

from snapfusion.errors import InputError


def export_interop(model: str | None, out: str, fmt: str, precision: str = "fp32") -> str:
    """Write ``model`` as a diffusers folder or an LDM single file at ``out``; returns the summary line."""
    import torch

    if precision not in ("fp32", "fp16"):
        raise InputError(f"--format {fmt} writes fp32 or fp16 weights, got --precision {precision}")
    dtype = torch.float16 if precision == "fp16" else None
    from snapfusion.export.diffusers_export import export_diffusers, load_for_export

    pipe = load_for_export(model)
    if fmt == "diffusers":
        return export_diffusers(pipe, out, dtype=dtype).summary()
    from snapfusion.export.single_file import export_single_file

    return export_single_file(pipe, out, dtype=dtype).summary()
