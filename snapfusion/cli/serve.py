"""``snapfusion serve``: a local web page and an OpenAI-images-compatible HTTP API over warm models."""

from __future__ import annotations

import argparse


def _config(a: argparse.Namespace):
    from snapfusion.serve import ServeConfig

    return ServeConfig(host=a.host, port=a.port, model=a.model, device=a.device, dtype=a.dtype, preload=a.preload,
                       queue_size=a.queue_size, max_batch=a.max_batch, timeout=a.timeout, token=a.token)


def check_serve(a: argparse.Namespace) -> None:
    """The server's config (ServeConfig.check), its device and its default model, before the port is taken."""
    from snapfusion.loading import check_model, resolve_device

    _config(a).check()
    resolve_device(a.device, option="--device")
    check_model(a.model)


def cmd_serve(a: argparse.Namespace) -> None:
    from snapfusion.serve import run

    run(_config(a))


def register(sub) -> None:
    """Add the ``serve`` command."""
    v = sub.add_parser("serve", help="a local web page and an OpenAI-compatible HTTP API (models stay loaded)",
                       epilog="example: snapfusion serve --port 7860   (then open http://127.0.0.1:7860/ or POST "
                       "/v1/images/generations; needs pip install 'snapfusion[serve]')")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only)")
    v.add_argument("--port", type=int, default=7860, help="TCP port (default %(default)s)")
    v.add_argument("--model", default=None, help="the default model: 'snapfusion', 'snapfusion-cfg', 'base' or a "
                   "pipeline folder (default: the embedded SnapFusion model); requests may name any embedded model")
    v.add_argument("--device", default="auto", help="auto, cpu or cuda (default %(default)s)")
    v.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="network precision")
    v.add_argument("--preload", action="store_true", help="load every model at start (default: the default model "
                   "at start, the others on first use)")
    v.add_argument("--queue-size", type=int, default=16, help="requests waiting before new ones get 429 "
                   "(default %(default)s)")
    v.add_argument("--max-batch", type=int, default=4, help="images generated together when queued requests share "
                   "their settings (default %(default)s)")
    v.add_argument("--timeout", type=float, default=120.0, help="seconds per request, queue wait included, before "
                   "504 (default %(default)s)")
    v.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' on /v1 calls (default: "
                   "$SNAPFUSION_SERVE_TOKEN if set, else no token)")
    v.set_defaults(func=cmd_serve, check=check_serve)
