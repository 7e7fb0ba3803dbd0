"""snapfusion serve, in process: the OpenAI-style API over a tiny pipeline (valid and invalid input, queue, batching,
timeouts, cancellation, token) and the command's option checks."""

import asyncio
import base64
import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from snapfusion import validation
from snapfusion.errors import InputError

fastapi = pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from snapfusion.serve.app import create_app  # noqa: E402
from snapfusion.serve.config import ServeConfig  # noqa: E402
from snapfusion.serve.engine import Engine, QueueFull, Request  # noqa: E402

URL = "/v1/images/generations"


def make_engine(pipe, *, start=True, loaders=None, **kw):
    engine = Engine(loaders or {"tiny": lambda: pipe, "other": lambda: pipe}, "tiny", **kw)
    engine.load("tiny")
    return engine.start() if start else engine


@pytest.fixture()
def engine(tiny_pipeline):
    engine = make_engine(tiny_pipeline)
    yield engine
    engine.stop()


@pytest.fixture()
def client(engine):
    return TestClient(create_app(engine, timeout=30))


@pytest.fixture(autouse=True)
def no_unexpected_errors(caplog):
    """No test here reaches the catch-all 500 handler unless it means to (it logs 'unexpected error')."""
    caplog.set_level(logging.ERROR, logger="snapfusion.serve")
    yield
    if not getattr(caplog, "expect_unexpected", False):
        assert not [r for r in caplog.records if r.getMessage() == "unexpected error"]


def decode(item) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))


def test_generation_returns_png_with_seed_timings_and_metadata(client):
    r = client.post(URL, json={"prompt": "a red apple", "n": 1, "size": "64x64", "response_format": "b64_json",
                               "seed": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 1
    image = decode(body["data"][0])
    assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
    assert body["data"][0]["seed"] == 7
    assert image.text["prompt"] == "a red apple" and image.text["seed"] == "7" and image.text["steps"] == "4"
    assert image.text["model"] == "tiny"
    assert body["settings"] == {"model": "tiny", "steps": 4, "guidance": 3.0, "guidance_rescale": 0.0,
                                "guidance_interval": [0.0, 1.0], "sampler": "ddim", "height": 64, "width": 64,
                                "negative_prompt": ""}
    t = body["timings"]
    assert set(t) == {"text_encoder", "unet", "decoder", "total", "queue_wait", "batch_images"}
    assert t["total"] > 0 and t["unet"] > 0 and t["total"] >= t["unet"] and t["batch_images"] == 1


def test_n_images_get_consecutive_seeds_and_settings_apply(client):
    r = client.post(URL, json={"prompt": "a cat", "n": 3, "seed": 10, "steps": 2, "guidance": 1.0,
                               "sampler": "dpmpp_2m", "size": "128x64", "negative_prompt": "blur", "model": "other"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["seed"] for d in body["data"]] == [10, 11, 12]
    assert [decode(d).size for d in body["data"]] == [(128, 64)] * 3  # width x height
    assert body["settings"] == {"model": "other", "steps": 2, "guidance": 1.0, "guidance_rescale": 0.0,
                                "guidance_interval": [0.0, 1.0], "sampler": "dpmpp_2m", "height": 64, "width": 128,
                                "negative_prompt": ""}  # guidance 1: no unconditional pass
    pixels = [np.asarray(decode(d)) for d in body["data"]]
    assert not np.array_equal(pixels[0], pixels[1])


def test_same_seed_same_image_and_random_seed_reported(client):
    a, b, c = (client.post(URL, json={"prompt": "a dog", "seed": s, "size": "64x64"}).json() for s in (3, 3, 4))
    assert a["data"][0]["b64_json"] == b["data"][0]["b64_json"]
    assert not np.array_equal(np.asarray(decode(a["data"][0])), np.asarray(decode(c["data"][0])))
    drawn = client.post(URL, json={"prompt": "a dog"}).json()["data"][0]["seed"]
    assert 0 <= drawn <= validation.MAX_SEED
    again = client.post(URL, json={"prompt": "a dog", "seed": drawn}).json()
    assert again["data"][0]["seed"] == drawn


def _message(check, *args, **kwargs) -> str:
    with pytest.raises(InputError) as err:
        check(*args, **kwargs)
    return str(err.value)


BAD_FIELDS = [
    ("prompt", "", lambda v: _message(validation.check_prompt, v, allow_empty=False)),
    ("prompt", "   ", lambda v: _message(validation.check_prompt, v, allow_empty=False)),
    ("prompt", 12, lambda v: _message(validation.check_prompt, v)),
    ("prompt", "x" * (validation.MAX_PROMPT_CHARS + 1), lambda v: _message(validation.check_prompt, v)),
    ("prompt", "a\x00b", lambda v: _message(validation.check_prompt, v)),
    ("negative_prompt", 5, lambda v: _message(validation.check_prompt, v, name="negative_prompt")),
    ("seed", -1, lambda v: _message(validation.check_seed, v)),
    ("seed", 2**64, lambda v: _message(validation.check_seed, v)),
    ("seed", "7", lambda v: _message(validation.check_seed, v)),
    ("seed", 1.5, lambda v: _message(validation.check_seed, v)),
    ("n", 0, lambda v: _message(validation.check_num_images, v, name="n")),
    ("n", validation.MAX_IMAGES + 1, lambda v: _message(validation.check_num_images, v, name="n")),
    ("n", True, lambda v: _message(validation.check_num_images, v, name="n")),
    ("steps", 0, lambda v: _message(validation.check_steps, v)),
    ("steps", validation.MAX_STEPS + 1, lambda v: _message(validation.check_steps, v)),
    ("steps", "8", lambda v: _message(validation.check_steps, v)),
    ("guidance", -0.5, lambda v: _message(validation.check_guidance, v)),
    ("guidance", 101, lambda v: _message(validation.check_guidance, v)),
    ("guidance", "7.5", lambda v: _message(validation.check_guidance, v)),
    ("guidance_rescale", 1.5, lambda v: _message(validation.check_guidance_rescale, v)),
    ("guidance_rescale", -0.1, lambda v: _message(validation.check_guidance_rescale, v)),
    ("guidance_rescale", "0.7", lambda v: _message(validation.check_guidance_rescale, v)),
    ("size", "big", lambda v: _message(validation.parse_size, v)),
    ("size", "512x512x3", lambda v: _message(validation.parse_size, v)),
    ("size", "-64x64", lambda v: _message(validation.parse_size, v)),
    ("size", "4096x4096", lambda v: _message(validation.parse_size, v)),
    ("size", 512, lambda v: _message(validation.parse_size, v)),
    ("sampler", "euler", lambda v: _message(validation.check_sampler, v)),
]


@pytest.mark.parametrize("field,value,expected", BAD_FIELDS, ids=[f"{f}={v!r:.20}" for f, v, _ in BAD_FIELDS])
def test_invalid_field_is_400_with_the_validators_message(client, engine, field, value, expected):
    body = {"prompt": "a cat", "size": "64x64", field: value}
    r = client.post(URL, json=body)
    assert r.status_code == 400, r.text
    assert r.json() == {"error": {"message": expected(value), "type": "invalid_request_error", "param": field,
                                  "code": None}}
    assert engine.counts["requests"] == 0  # refused before it was queued


@pytest.mark.parametrize("raw", [b'{"prompt": "a", "guidance": NaN}', b'{"prompt": "a", "guidance": Infinity}'])
def test_non_finite_guidance_is_400(client, raw):
    r = client.post(URL, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guidance"
    assert r.json()["error"]["message"] == _message(validation.check_guidance, float(json.loads(raw)["guidance"]))


@pytest.mark.parametrize("raw,param,start", [
    (b'{"prompt": "a", "quality": "hd"}', "quality", "unknown field 'quality'"),
    (b'{"prompt": "a",', None, "the request body is not valid JSON"),
    (b'\xff\xfe', None, "the request body is not valid JSON"),
    (b'', None, "the request body is not valid JSON"),
    (b'["a cat"]', None, "the request body must be a JSON object"),
    (b'{"n": 1}', "prompt", "prompt is required"),
    (b'{"prompt": "a", "response_format": "url"}', "response_format", "response_format must be b64_json"),
    (b'{"prompt": "a", "model": "dall-e-3"}', "model", "model must be one of other, tiny, got 'dall-e-3'"),
    (b'{"prompt": "a", "model": 3}', "model", "model must be a model id"),
    (b'{"prompt": "a", "size": "96x96"}', "size", "height must be a positive multiple of 64"),
])
def test_malformed_unknown_and_unsupported_requests_are_400(client, raw, param, start):
    r = client.post(URL, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"].startswith(start) and error["param"] == param and error["type"] == "invalid_request_error"
    assert "Traceback" not in r.text and "\n" not in error["message"]


def test_size_off_the_grid_of_a_model_loaded_on_first_use_is_400(tiny_pipeline):
    engine = Engine({"tiny": lambda: tiny_pipeline, "cold": lambda: tiny_pipeline}, "tiny").start()
    try:
        client = TestClient(create_app(engine, timeout=30))
        r = client.post(URL, json={"prompt": "a", "size": "96x96", "model": "cold"})  # checked once it loaded
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("height must be a positive multiple")
        assert "cold" in engine.models  # loaded on first use, and kept
        assert client.post(URL, json={"prompt": "a", "model": "cold"}).status_code == 200
    finally:
        engine.stop()


def test_unknown_route_and_method_are_json_errors(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found"
    r = client.get(URL)
    assert r.status_code == 405 and "error" in r.json()


def test_unexpected_failure_is_a_json_500_without_traceback(tiny_pipeline, caplog):
    def broken():
        raise RuntimeError("secret internal detail")

    engine = Engine({"tiny": lambda: tiny_pipeline, "broken": broken}, "tiny").start()
    caplog.expect_unexpected = True
    try:
        client = TestClient(create_app(engine, timeout=30), raise_server_exceptions=False)
        r = client.post(URL, json={"prompt": "a", "model": "broken"})
        assert r.status_code == 500
        assert r.json() == {"error": {"message": "internal server error (the server's log has the details)",
                                      "type": "server_error", "param": None, "code": None}}
        assert "secret" not in r.text and "Traceback" not in r.text
        assert [rec.getMessage() for rec in caplog.records] == ["unexpected error"]  # logged on the server side
        assert client.post(URL, json={"prompt": "a"}).status_code == 200  # the worker lives on
    finally:
        engine.stop()


def test_queue_full_is_429_with_retry_after(tiny_pipeline):
    engine = make_engine(tiny_pipeline, start=False, queue_size=2)
    engine.submit(Request("a"))
    engine.submit(Request("b"))
    with pytest.raises(QueueFull):
        engine.submit(Request("c"))
    r = TestClient(create_app(engine, timeout=30)).post(URL, json={"prompt": "c"})
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    assert int(r.headers["retry-after"]) >= 1
    assert engine.counts["rejected"] == 2 and engine.status()["queue_waiting"] == 2
    engine.stop()


def test_timeout_is_504_and_frees_the_slot(tiny_pipeline):
    engine = make_engine(tiny_pipeline, start=False, queue_size=1)  # no worker: the request can only wait
    client = TestClient(create_app(engine, timeout=0.3))
    r = client.post(URL, json={"prompt": "a"})
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
    assert "0.3 s" in r.json()["error"]["message"]
    assert engine.status()["queue_waiting"] == 0 and engine.counts["cancelled"] == 1
    assert client.post(URL, json={"prompt": "a"}).status_code == 504  # the slot was free again (not 429)
    engine.stop()


def test_concurrent_requests_with_the_same_settings_run_as_one_batch(tiny_pipeline):
    engine = make_engine(tiny_pipeline, start=False, max_batch=4)
    app = create_app(engine, timeout=30)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            posts = [asyncio.create_task(c.post(URL, json={"prompt": p, "seed": s, "n": n}))
                     for p, s, n in (("a cat", 1, 1), ("a dog", 2, 2), ("a cow", 5, 1), ("a cat", 1, 1))]
            while engine.status()["queue_waiting"] < 4:
                await asyncio.sleep(0.01)
            engine.start()
            return [await p for p in posts]

    responses = asyncio.run(asyncio.wait_for(scenario(), 30))
    engine.stop()
    assert [r.status_code for r in responses] == [200] * 4
    # the first three fill max_batch (4 images) together; the fourth runs next
    assert list(engine.batches) == [("tiny", 3, 4), ("tiny", 1, 1)]
    assert [r.json()["timings"]["batch_images"] for r in responses] == [4, 4, 4, 1]
    assert [d["seed"] for d in responses[1].json()["data"]] == [2, 3]
    # an image depends on its prompt and seed, not its batch: the same within one 8-bit level
    first, last = (np.asarray(decode(r.json()["data"][0])).astype(int) for r in (responses[0], responses[3]))
    assert np.abs(first - last).max() <= 1


def test_requests_with_other_settings_are_not_batched_together(tiny_pipeline):
    engine = make_engine(tiny_pipeline, start=False, max_batch=8)
    jobs = [engine.submit(Request("a", steps=2)), engine.submit(Request("b", steps=3)),
            engine.submit(Request("c", steps=2)), engine.submit(Request("d", steps=2, model="other"))]
    engine.start()
    for job in jobs:
        job.future.result(timeout=30)
    engine.stop()
    assert list(engine.batches) == [("tiny", 2, 2), ("tiny", 1, 1), ("other", 1, 1)]


def test_client_disconnect_frees_the_queue_slot(tiny_pipeline):
    engine = make_engine(tiny_pipeline, start=False, queue_size=1)
    app = create_app(engine, timeout=30)
    sent = []

    async def scenario():
        messages = [{"type": "http.request", "body": b'{"prompt": "a"}', "more_body": False}]

        async def receive():
            if messages:
                return messages.pop(0)
            while engine.status()["queue_waiting"] == 0:  # the client goes away once its request is queued
                await asyncio.sleep(0.01)
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": URL, "raw_path": URL.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1),
                 "server": ("127.0.0.1", 80)}
        await asyncio.wait_for(app(scope, receive, send), 10)

    asyncio.run(asyncio.wait_for(scenario(), 30))
    assert sent[0]["status"] == 499
    assert engine.status()["queue_waiting"] == 0 and engine.counts["cancelled"] == 1
    engine.submit(Request("b"))  # the slot is free: no QueueFull
    engine.stop()


def test_cancelling_every_request_of_a_running_batch_stops_it(tiny_pipeline):
    import threading

    entered, release = threading.Event(), threading.Event()

    class Slow:  # the tiny pipeline, pausing at its first sampler step
        def __getattr__(self, name):
            return getattr(tiny_pipeline, name)

        def generate(self, *args, callback, **kwargs):
            def step(*a):
                entered.set()
                release.wait(10)
                callback(*a)
            return tiny_pipeline.generate(*args, callback=step, **kwargs)

    engine = Engine({"slow": Slow}, "slow").start()
    job = engine.submit(Request("a"))
    assert entered.wait(10)
    engine.cancel(job)
    release.set()
    with pytest.raises(Exception, match="cancelled"):
        job.future.result(timeout=10)
    assert engine.counts["batches"] == 0 and engine.counts["failed"] == 0
    engine.stop()


def test_bearer_token(engine):
    client = TestClient(create_app(engine, token="s3cret", timeout=30))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = client.post(URL, json={"prompt": "a"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
        assert client.get("/v1/models", headers=headers).status_code == 401
    ok = {"Authorization": "Bearer s3cret"}
    assert client.post(URL, json={"prompt": "a"}, headers=ok).status_code == 200
    assert client.get("/v1/models", headers=ok).status_code == 200
    assert client.get("/health").status_code == 200 and client.get("/").status_code == 200
    assert engine.counts["requests"] == 1  # the refused ones never reached the queue


def test_health_and_models(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["default_model"] == "tiny" and h["models_loaded"] == ["tiny"]
    assert h["queue_waiting"] == 0 and h["queue_capacity"] == 16 and h["peak_rss_mib"] > 10
    assert 10 < h["rss_mib"] <= h["peak_rss_mib"] + 1
    assert h["auth"] is False
    m = client.get("/v1/models").json()
    assert m["object"] == "list"
    assert [(d["id"], d["object"], d["default"], d["loaded"]) for d in m["data"]] == [
        ("tiny", "model", True, True), ("other", "model", False, False)]


def test_page_is_self_contained_with_labelled_controls(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    for control in ("prompt", "negative_prompt", "seed", "steps", "guidance", "guidance_rescale", "guided", "size",
                    "model", "n"):
        assert f'<label for="{control}"' in html and f'id="{control}"' in html
    assert 'id="dice"' in html and "<progress" in html and "download" in html and "localStorage" in html
    assert "http://" not in html and "https://" not in html  # nothing fetched from elsewhere


@pytest.mark.parametrize("argv,message", [
    (["--queue-size", "0"], "--queue-size must be between 1 and 10000, got 0"),
    (["--max-batch", "65"], "--max-batch must be between 1 and 64, got 65"),
    (["--timeout", "0"], "--timeout must be a positive number of seconds, got 0.0"),
    (["--timeout", "nan"], "--timeout must be a positive number of seconds, got nan"),
    (["--port", "70000"], "--port must be between 0 and 65535, got 70000"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda[:N] or mps, got 'tpu'"),
    (["--token", ""], "--token must be a non-empty string without spaces"),
])
def test_serve_command_rejects_bad_options_in_one_line(capsys, monkeypatch, argv, message):
    from snapfusion import cli, loading

    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    assert cli.main(["serve", *argv]) == 2
    assert capsys.readouterr().err == f"snapfusion: error: {message}\n"


def test_serve_config_defaults_listen_on_this_machine_only():
    config = ServeConfig().check()
    assert config.host == "127.0.0.1" and config.port == 7860 and config.token is None


def test_serve_command_refuses_a_busy_port_before_loading(capsys, monkeypatch):
    import socket

    from snapfusion import cli, loading

    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert cli.main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"snapfusion: error: --host 127.0.0.1 --port {port}: cannot listen there (")
    assert err.count("\n") == 1
