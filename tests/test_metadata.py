"""AUTOMATIC1111 ``parameters`` PNG text, ``--device mps`` and the export extra's one-line error."""

import json
import sys

import pytest
import torch
from PIL import Image

from snapfusion.errors import InputError, SnapFusionError
from snapfusion.loading import resolve_device
from snapfusion.metadata import a1111_parameters, parse_a1111_parameters


def test_a1111_parameters_format():
    text = a1111_parameters("a red cat, on a mat", negative_prompt="blurry", steps=8, sampler="ddim", guidance=7.5,
                            seed=42, width=512, height=256, model="snapfusion", extra={"Note": "a: b"})
    lines = text.split("\n")
    assert lines[0] == "a red cat, on a mat" and lines[1] == "Negative prompt: blurry"
    assert lines[2].startswith("Steps: 8, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x256, Model: snapfusion")
    parsed = parse_a1111_parameters(text)
    assert parsed["Note"] == "a: b" and parsed["Seed"] == "42" and parsed["negative_prompt"] == "blurry"
    no_neg = a1111_parameters("x", steps=1, sampler="dpmpp_2m", guidance=1.0, seed=0, width=8, height=8, model="m")
    assert "Negative prompt" not in no_neg and "Sampler: DPM++ 2M" in no_neg and "CFG scale: 1," in no_neg


def test_generate_writes_parameters_and_our_keys(tmp_path, monkeypatch, tiny_pipeline):
    from snapfusion import cli
    from snapfusion.cli import generate

    monkeypatch.setattr(generate, "resolve_model", lambda name, device="cpu": tiny_pipeline)
    out = tmp_path / "a.png"
    assert 0 == cli.main(["generate", "a blue circle", "--out", str(out), "--steps", "2", "--size", "64", "--seed", "7",
              "--device", "cpu", "--quiet", "--negative-prompt", "red"])
    info = Image.open(out).info
    assert info["prompt"] == "a blue circle" and json.loads(info["seed"]) == [7]  # our keys are kept
    p = parse_a1111_parameters(info["parameters"])
    assert (p["prompt"], p["negative_prompt"], p["Steps"], p["Seed"], p["Size"]) == ("a blue circle", "red", "2", "7",
                                                                                     "64x64")
    assert p["Sampler"] == "DDIM" and p["CFG scale"] == "3" and p["Version"].startswith("snapfusion ")


def test_device_mps_is_checked(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(InputError, match="mps"):
        resolve_device("mps", option="--device")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps") == "mps"
    with pytest.raises(InputError, match="auto, cpu, cuda"):
        resolve_device("tpu")


@pytest.mark.parametrize("fmt,missing", [("onnx", "onnx"), ("onnx", "onnxruntime"), ("coreml", "coremltools")])
def test_missing_export_package_is_one_line(monkeypatch, capsys, fmt, missing):
    from snapfusion import cli
    from snapfusion.cli import export

    monkeypatch.setitem(sys.modules, missing, None)
    called = []
    monkeypatch.setattr(export, "resolve_model", lambda *a, **k: called.append(1))
    code = cli.main(["export", "--model", "base", "--format", fmt, "--out", "unused"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not called  # refused before loading anything
    assert len(err.splitlines()) == 1 and f"'{missing}'" in err and 'pip install "snapfusion[export]"' in err
