"""The ``snapfusion`` command line (the library below it never imports it): ``main`` runs it, ``build_parser``
builds its parser. One module per command group: generate (use), train, compress_* (the SnapFusion stages),
export; shared options in options.py."""

from snapfusion.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
