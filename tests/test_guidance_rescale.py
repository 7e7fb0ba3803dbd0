"""Guidance rescale (Lin et al. 2024) through every way in: the Python API, a model's stored default, the fast path,
the CLI (image metadata) and the server; refused for guidance-embedded models and out-of-range values."""

import dataclasses
import json

import pytest
import torch
from PIL import Image

from snapfusion.cli.main import main
from snapfusion.errors import InputError
from snapfusion.pipeline import Pipeline

REFUSAL = "guidance rescale needs two UNet calls per step"


def _gen(pipe, **kw):
    return pipe.generate(["a red cube", "two cats"], [3, 4], steps=3, guidance=kw.pop("guidance", 7.5), **kw)


def _with_default(pipe, phi) -> Pipeline:
    cfg = dataclasses.replace(pipe.config, guidance_rescale=phi)
    return Pipeline(pipe.text_encoder, pipe.unet, pipe.decoder, cfg, encoder=pipe.encoder).eval()


def test_rescale_changes_the_images_and_zero_or_guidance_one_leaves_them(tiny_pipeline):
    plain = _gen(tiny_pipeline)
    assert torch.equal(_gen(tiny_pipeline, guidance_rescale=0.0), plain)
    rescaled = _gen(tiny_pipeline, guidance_rescale=0.7)
    assert (rescaled - plain).abs().max() > 1e-3
    assert not torch.equal(_gen(tiny_pipeline, guidance_rescale=1.0), rescaled)
    # guidance 1 makes no unconditional pass: there is nothing to rescale
    assert torch.equal(_gen(tiny_pipeline, guidance=1.0, guidance_rescale=0.7), _gen(tiny_pipeline, guidance=1.0))


def test_a_models_default_applies_round_trips_and_a_call_overrides_it(tiny_pipeline, tmp_path):
    pipe = _with_default(tiny_pipeline, 0.7)
    torch.testing.assert_close(_gen(pipe), _gen(tiny_pipeline, guidance_rescale=0.7), atol=0, rtol=0)
    torch.testing.assert_close(_gen(pipe, guidance_rescale=0.0), _gen(tiny_pipeline), atol=0, rtol=0)
    pipe.save(tmp_path / "p", dtype=None)
    assert json.loads((tmp_path / "p" / "model_index.json").read_text())["config"]["guidance_rescale"] == 0.7
    assert Pipeline.load(tmp_path / "p").config.guidance_rescale == 0.7
    result = pipe("a red cube", seed=1, steps=2)
    assert result.settings["guidance_rescale"] == 0.7
    assert pipe("a red cube", seed=1, steps=2, guidance=1.0).settings["guidance_rescale"] == 0.0  # as used


@pytest.mark.parametrize("phi", [1.5, -0.1, float("nan"), float("inf"), True, "0.5"])
def test_bad_values_are_refused_in_one_line(tiny_pipeline, phi):
    for call in (lambda: _gen(tiny_pipeline, guidance_rescale=phi),
                 lambda: tiny_pipeline("a cat", guidance_rescale=phi),
                 lambda: _gen(_with_default(tiny_pipeline, phi))):  # a bad stored default too
        with pytest.raises(InputError, match="guidance_rescale") as err:
            call()
        assert "\n" not in str(err.value)


def test_guidance_embedded_models_refuse_it_before_any_work(ge_pipeline):
    calls = []
    handle = ge_pipeline.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for call in (lambda: _gen(ge_pipeline, guidance_rescale=0.5),
                     lambda: ge_pipeline("a cat", guidance_rescale=0.5),
                     lambda: ge_pipeline.model_fn(torch.zeros(1, 77, 32), None, 3.0, rescale=0.5)):
            with pytest.raises(InputError, match=REFUSAL) as err:
                call()
            assert "tiny-ge" in str(err.value) and "\n" not in str(err.value)
        assert not calls
        _gen(ge_pipeline, guidance_rescale=0.0)  # 0 is plain guidance: allowed
    finally:
        handle.remove()


@pytest.mark.parametrize("cfg", ["batch2", "split"])
def test_the_fast_path_gives_the_images_of_plain_generate(tiny_pipeline, cfg):
    from snapfusion.fast import FastOptions, accelerate

    pipe = _with_default(tiny_pipeline, 0.0)
    ref = _gen(pipe, guidance_rescale=0.7)
    accelerate(pipe, FastOptions(cfg=cfg, channels_last=False))
    torch.testing.assert_close(_gen(pipe, guidance_rescale=0.7), ref, atol=1e-4, rtol=0)
    plain = _gen(pipe)  # another phi: another runner, not the cached one
    assert len(pipe.fast.runners) == 2 and (plain - ref).abs().max() > 1e-3


def test_cli_generate_records_it_and_refuses_it_for_a_one_call_model(tiny_pipeline, ge_pipeline, tmp_path, capsys):
    tiny_pipeline.save(tmp_path / "two", dtype=None)
    ge_pipeline.save(tmp_path / "one", dtype=None)
    out = tmp_path / "x.png"
    argv = ["generate", "a cat", "--steps", "2", "--size", "64", "--out", str(out), "--quiet"]
    assert main([*argv, "--model", str(tmp_path / "two"), "--guidance-rescale", "0.7"]) == 0
    text = Image.open(out).text
    assert text["guidance_rescale"] == "0.7" and "Guidance rescale: 0.7" in text["parameters"]
    assert main([*argv, "--model", str(tmp_path / "two")]) == 0
    assert "guidance_rescale" not in Image.open(out).text  # plain guidance: nothing to record
    out.unlink()
    capsys.readouterr()
    assert main([*argv, "--model", str(tmp_path / "one"), "--guidance-rescale", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert REFUSAL in err and "\n" not in err and not out.exists()


def test_server_applies_reports_and_refuses_it(two_and_one_call_client):
    client, url = two_and_one_call_client, "/v1/images/generations"
    r = client.post(url, json={"prompt": "a cat", "steps": 2, "seed": 3, "guidance_rescale": 0.7})
    assert r.status_code == 200, r.text
    assert r.json()["settings"]["guidance_rescale"] == 0.7
    plain = client.post(url, json={"prompt": "a cat", "steps": 2, "seed": 3}).json()
    assert plain["settings"]["guidance_rescale"] == 0.0
    assert plain["data"][0]["b64_json"] != r.json()["data"][0]["b64_json"]
    for body in ({"guidance_rescale": 2}, {"guidance_rescale": "x"}, {"guidance_rescale": 0.5, "model": "one"}):
        r = client.post(url, json={"prompt": "a cat", "steps": 2, **body})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "guidance_rescale"
    assert r.json()["error"]["message"].startswith(REFUSAL)


def test_assemble_student_stores_a_default_and_refuses_bad_ones(assemble_student, tmp_path):
    ok = assemble_student("two", "two", "--guidance-rescale", "0.7")
    assert ok.returncode == 0, ok.stderr
    assert Pipeline.load(tmp_path / "two").config.guidance_rescale == 0.7
    for unet, phi, message in (("two", "1.7", "--guidance-rescale must be between 0 and 1"), ("one", "0.7", REFUSAL)):
        bad = assemble_student(unet, "bad", "--guidance-rescale", phi)
        assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "bad").exists()
