"""The compression stages' commands: the efficient UNet (compress_evolve), the efficient decoder (compress_decoder)
and step distillation (compress_distill)."""

from __future__ import annotations

import argparse

from snapfusion.cli import compress_decoder, compress_distill, compress_evolve


def register(sub: argparse._SubParsersAction) -> None:
    """Add every compression command, in the order of the SnapFusion recipe."""
    compress_evolve.register(sub)
    compress_decoder.register(sub)
    compress_distill.register(sub)
