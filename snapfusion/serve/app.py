"""The HTTP API (OpenAI-images-compatible) and the web page, as an ASGI app around an ``Engine``.

POST /v1/images/generations, GET /v1/models, GET /health, GET / (the page). Errors are OpenAI's JSON shape
``{"error": {"message", "type", "param", "code"}}``; the message of a bad setting is the one-line message of
``snapfusion.validation``, the same the command line prints.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest

from snapfusion import validation
from snapfusion.errors import InputError, SnapFusionError
from snapfusion.serve.engine import Cancelled, Engine, QueueFull, Request

PAGE = Path(__file__).parent / "page" / "index.html"
FIELDS = ("prompt", "n", "size", "response_format", "negative_prompt", "seed", "steps", "guidance", "guidance_rescale",
          "guidance_interval", "sampler", "model", "user")  # user: OpenAI's end-user id, accepted and ignored
POLL_SECONDS = 0.1  # how often a waiting request checks its deadline and its client
log = logging.getLogger("snapfusion.serve")


class ApiError(Exception):
    """An HTTP error answered as OpenAI's JSON error object."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


def _field(data: dict, key: str, check, *args, **kwargs):
    """``check(data[key])``, a validation error becoming a 400 that names the field."""
    try:
        return check(data.get(key), *args, **kwargs)
    except InputError as err:
        raise ApiError(400, str(err), param=key) from None


def parse_generation(body: bytes) -> Request:
    """The JSON body of POST /v1/images/generations -> a validated ``Request`` (``ApiError`` 400 otherwise)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}; known fields: {', '.join(FIELDS)}", param=unknown[0])
    if "prompt" not in data:
        raise ApiError(400, "prompt is required", param="prompt")
    prompt = _field(data, "prompt", validation.check_prompt, allow_empty=False)
    fmt = data.get("response_format") or "b64_json"
    if fmt != "b64_json":
        raise ApiError(400, f"response_format must be b64_json (images come back inline; no URLs are kept), "
                       f"got {fmt!r}", param="response_format")
    n = 1 if data.get("n") is None else _field(data, "n", validation.check_num_images, name="n")
    height = width = None
    if data.get("size") is not None:
        height, width = _field(data, "size", validation.parse_size)
    negative = "" if data.get("negative_prompt") is None else _field(data, "negative_prompt", validation.check_prompt,
                                                                      name="negative_prompt")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, f"model must be a model id (text), got {model!r}", param="model")
    if data.get("user") is not None and not isinstance(data["user"], str):
        raise ApiError(400, f"user must be text, got {data['user']!r}", param="user")
    return Request(prompt=prompt, n=n, seed=_field(data, "seed", validation.check_seed),
                   negative_prompt=negative, steps=_field(data, "steps", validation.check_steps),
                   guidance=_field(data, "guidance", validation.check_guidance),
                   guidance_rescale=_field(data, "guidance_rescale", validation.check_guidance_rescale),
                   guidance_interval=_field(data, "guidance_interval", validation.check_guidance_interval),
                   sampler=_field(data, "sampler", validation.check_sampler), height=height, width=width, model=model)


def _error_response(status: int, message: str, kind: str, param=None, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status, headers=headers)


def create_app(engine: Engine, token: str | None = None, *, timeout: float = 120.0):
    """The FastAPI app serving ``engine``; ``token``: a bearer token every /v1 call must carry (None: open)."""
    app = FastAPI(title="snapfusion serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.token = engine, token

    @app.exception_handler(ApiError)
    async def api_error(_, err: ApiError):
        return _error_response(err.status, err.message, err.kind, err.param, err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_, err: HTTPException):  # 404, 405 from routing
        return _error_response(err.status_code, str(err.detail), "invalid_request_error", headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, err: RequestValidationError):  # no route declares a body model; kept as a guard
        return _error_response(400, "the request does not match the API", "invalid_request_error")

    @app.exception_handler(Exception)
    async def unexpected(_, err: Exception):  # logged with its traceback here; the client sees one line, no trace
        log.error("unexpected error", exc_info=err)
        return _error_response(500, "internal server error (the server's log has the details)", "server_error")

    def authorize(request: HttpRequest) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ApiError(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                           kind="authentication_error", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "auth": token is not None, **engine.status()}

    @app.get("/v1/models")
    async def models(request: HttpRequest):
        authorize(request)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "snapfusion", "default": name == engine.default,
             "loaded": name in engine.models} for name in engine.loaders]}

    @app.post("/v1/images/generations")
    async def generations(request: HttpRequest):
        authorize(request)
        req = parse_generation(await request.body())
        try:
            job = engine.submit(req)
        except QueueFull as err:
            raise ApiError(429, str(err), kind="rate_limit_error",
                           headers={"Retry-After": str(err.retry_after)}) from None
        except InputError as err:
            raise ApiError(400, str(err), param=_param(err)) from None
        result = await _wait(engine, job, request, timeout)
        return JSONResponse({
            "created": int(time.time()), "model": job.model,
            "data": [{"b64_json": base64.b64encode(png).decode("ascii"), "seed": seed, "revised_prompt": req.prompt}
                     for png, seed in zip(result.pngs, result.seeds)],
            "settings": result.settings, "timings": {k: round(v, 4) for k, v in result.timings.items()}})

    return app


def _param(err: InputError) -> str:
    """The request field a model-dependent ``InputError`` is about: the model, a negative prompt, the guidance
    rescale or interval, else the size."""
    text = str(err)
    if text.startswith("model "):
        return "model"
    if text.startswith("negative "):
        return "negative_prompt"
    if text.startswith(("guidance interval ", "guidance_interval ", "a guidance interval ")):
        return "guidance_interval"
    return "guidance_rescale" if text.startswith(("guidance rescale ", "guidance_rescale ")) else "size"


async def _wait(engine: Engine, job, request, timeout: float):
    """The job's result; cancels the job (freeing its slot) on timeout or when the client goes away."""
    waiting = asyncio.wrap_future(job.future)
    waiting.add_done_callback(lambda f: f.cancelled() or f.exception())  # an abandoned job's error is not "lost"
    deadline = time.monotonic() + timeout
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=POLL_SECONDS)
        if done:
            break
        if await request.is_disconnected():
            engine.cancel(job)
            raise ApiError(499, "the client closed the request", param=None)
        if time.monotonic() >= deadline:
            engine.cancel(job)
            raise ApiError(504, f"the request took longer than the server's timeout of {timeout:g} s (queue wait "
                           "included); try again, or fewer images", kind="timeout_error")
    try:
        return waiting.result()
    except InputError as err:  # a size off a model's grid or a negative prompt it cannot use, found once it loaded
        raise ApiError(400, str(err), param=_param(err)) from None
    except Cancelled as err:
        raise ApiError(503, str(err), kind="server_error") from None
    except SnapFusionError as err:  # e.g. a model's files missing, or sampling diverged: one line, no trace
        raise ApiError(500, str(err), kind="server_error") from None
