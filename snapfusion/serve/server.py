"""``snapfusion serve``'s library side: build the engine from a ``ServeConfig``, load the default model, serve."""

from __future__ import annotations

import functools
import os

from snapfusion.errors import ConfigError
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


def run(config: ServeConfig) -> None:
    """Load the models and serve until interrupted (uvicorn on ``config.host``:``config.port``)."""
    config.check()
    require_extra()
    import torch
    import uvicorn

    torch.set_grad_enabled(False)
    engine, app = build(config)
    print(f"snapfusion serve: {engine.default} warm on {config.host}:{config.port}; open http://{config.host}:"
          f"{config.port}/ (models: {', '.join(engine.loaders)})", flush=True)
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    finally:
        engine.stop()
