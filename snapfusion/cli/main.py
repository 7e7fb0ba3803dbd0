"""The ``snapfusion`` command: the parser, assembled from one module per command group, and the error handling.

Each command parses typed options, builds a config and calls one library function. Errors a user can cause
(``SnapFusionError``) print one line and exit with status 2."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from snapfusion.cli import compress, export, generate, serve, train

GROUPS = (("use", generate.register), ("serve", serve.register), ("train", train.register),
          ("compress", compress.register), ("export", export.register))


class _Listed:
    """The sub-parsers action of one command group: each command's ``help`` goes to the grouped listing of
    ``snapfusion --help`` and becomes the command's own description."""

    def __init__(self, sub: argparse._SubParsersAction, listing: list[tuple[str, str]]):
        self.sub, self.listing = sub, listing

    def add_parser(self, name: str, *, help: str, **kwargs) -> argparse.ArgumentParser:
        self.listing.append((name, help))
        return self.sub.add_parser(name, description=help, **kwargs)


def _grouped(listings: list[tuple[str, list[tuple[str, str]]]]) -> str:
    """The commands by group, one line (wrapped) per command."""
    lines = ["commands:"]
    for title, listing in listings:
        lines.append(f"  {title}:")
        for name, text in listing:
            lines.extend(textwrap.wrap(text, 116, initial_indent=f"    {name:<19} ", subsequent_indent=" " * 24,
                                       break_on_hyphens=False))
    return "\n".join(lines) + "\n\nrun 'snapfusion COMMAND --help' for a command's options and an example"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="snapfusion", description="SnapFusion: fast text-to-image diffusion.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of the commands below")
    listings = []
    for title, register in GROUPS:
        listing: list[tuple[str, str]] = []
        register(_Listed(sub, listing))
        listings.append((title, listing))
    parser.epilog = _grouped(listings)
    return parser


def main(argv: list[str] | None = None) -> int:
    from snapfusion.errors import SnapFusionError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    import torch

    grad_enabled = torch.is_grad_enabled()  # commands may switch autograd off; restore it for in-process callers
    try:
        args.func(args)
    except SnapFusionError as err:
        print(f"snapfusion: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an unreadable input or unwritable output path
        print(f"snapfusion: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("snapfusion: interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_grad_enabled(grad_enabled)
    return 0
