"""``snapfusion serve``: a local web page and an OpenAI-images-compatible HTTP API over warm models.

>>> from snapfusion.serve import ServeConfig, run
>>> run(ServeConfig(port=7860))          # then open http://127.0.0.1:7860/

Needs the ``serve`` extra (FastAPI and uvicorn): ``pip install snapfusion[serve]``.
"""

from snapfusion.serve.config import TOKEN_ENV, ServeConfig

__all__ = ["ServeConfig", "TOKEN_ENV", "run", "create_app", "Engine"]


def run(config: ServeConfig) -> None:
    """Serve ``config`` until interrupted; see ``snapfusion.serve.server.run``."""
    from snapfusion.serve.server import run as _run

    _run(config)


def __getattr__(name):  # create_app and Engine without importing FastAPI or torch at package import
    if name == "create_app":
        from snapfusion.serve.app import create_app

        return create_app
    if name == "Engine":
        from snapfusion.serve.engine import Engine

        return Engine
    raise AttributeError(name)
