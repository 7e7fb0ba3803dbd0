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


class _Parser(argparse.ArgumentParser):
    """argparse without the usage block on errors: a bad command line is one line, like every other user error
    (sub-parsers are of this class too)."""

    def error(self, message: str):
        from snapfusion.errors import InputError

        raise InputError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="snapfusion", description="SnapFusion: fast text-to-image diffusion.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of the commands below")
    listings = []
    for title, register in GROUPS:
        listing: list[tuple[str, str]] = []
        register(_Listed(sub, listing))
        listings.append((title, listing))
    parser.epilog = _grouped(listings)
    return parser


def _fail(err: Exception) -> int:
    """The one line of a user error (line breaks in a path or value are shown escaped), exit status 2."""
    text = str(err).replace("\r", "\\r").replace("\n", "\\n")
    print(f"snapfusion: error: {text}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    from snapfusion.errors import SnapFusionError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:  # every option is checked here, its type and then the command's cross-option check, before any work
        args = build_parser().parse_args(argv)
        if getattr(args, "check", None) is not None:
            args.check(args)
    except (SnapFusionError, OSError) as err:
        return _fail(err)
    import torch

    grad_enabled = torch.is_grad_enabled()  # commands may switch autograd off; restore it for in-process callers
    try:
        args.func(args)
    except (SnapFusionError, OSError) as err:  # OSError: an unreadable input or unwritable output path
        return _fail(err)
    except KeyboardInterrupt:
        print("snapfusion: interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_grad_enabled(grad_enabled)
    return 0
