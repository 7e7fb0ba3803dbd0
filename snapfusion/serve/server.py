"""``snapfusion serve``'s library side: build the engine from a ``ServeConfig``, load the default model, serve."""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
import sys

from snapfusion.errors import ConfigError, InputError
from snapfusion.serve.config import TOKEN_ENV, ServeConfig


def model_loaders(model: str | None, device: str, dtype: str) -> tuple[dict, str]:
    """({model id: loader}, default id): the shipped embedded models plus ``model`` when it is a path."""
    from snapfusion.loading import DEFAULT_MODELS, EMBEDDED, load
    from snapfusion.pipeline import INDEX

    names = [m for m in DEFAULT_MODELS if (EMBEDDED / m / INDEX).is_file()]
    if model is not None and model not in names:
        names.insert(0, model)
    default = model if model is not None else (names[0] if names else "snapfusion")
    return {name: functools.partial(load, name, device=device, dtype=dtype) for name in names}, default


def build(config: ServeConfig):
    """(engine, app) for ``config``: the default model loaded (all of them with ``preload``), the worker started."""
    from snapfusion.loading import resolve_device
    from snapfusion.serve.app import create_app
    from snapfusion.serve.engine import Engine

    config = config.check()
    device = resolve_device(config.device, option="--device")
    loaders, default = model_loaders(config.model, device, config.dtype)
    engine = Engine(loaders, default, queue_size=config.queue_size, max_batch=config.max_batch)
    for name in (loaders if config.preload else [default]):
        engine.load(name)
    token = config.token if config.token is not None else (os.environ.get(TOKEN_ENV) or None)
    return engine.start(), create_app(engine, token, timeout=config.timeout)


def require_extra() -> None:
    """A one-line error, before any model loads, when FastAPI or uvicorn is not installed."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"snapfusion serve needs {' and '.join(missing)}: pip install 'snapfusion[serve]'")


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` (port 0: any free one), or a one-line ``InputError``."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)  # hold the port now: a second server on it fails here, not after its models load
    except OSError as err:
        raise InputError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err})") from None
    return sock


def run(config: ServeConfig) -> None:
    """Load the models and serve until interrupted (uvicorn on ``config.host``:``config.port``)."""
    from snapfusion.loading import resolve_device

    config.check()
    resolve_device(config.device, option="--device")
    require_extra()
    sock = listen(config.host, config.port)  # before the models load: a busy port is a one-line error
    import torch
    import uvicorn

    torch.set_grad_enabled(False)
    print(f"snapfusion serve: {dataclasses.replace(config, token=config.token and '***')}", flush=True)
    engine, app = build(config)
    port = sock.getsockname()[1]
    if app.state.token is None and config.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"snapfusion: warning: listening on {config.host} without a token: anyone who can reach this port can "
              "use the models (--token)", file=sys.stderr)
    print(f"snapfusion serve: {engine.default} warm; open http://{config.host}:{port}/ (models: "
          f"{', '.join(engine.loaders)})", flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()
