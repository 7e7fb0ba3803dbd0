"""The benchmark: result structure, FLOP counts against the known SD-v1.5 number, the command."""

import json

import pytest

from snapfusion.bench import BenchConfig, count_flops, markdown_table, preset_pipeline, run_bench
from snapfusion.cli import main
from snapfusion.errors import ConfigError


def test_bench_tiny_reports_every_component():
    r = run_bench(BenchConfig(preset="tiny", size=64, steps=2, runs=2, warmup=0))
    for k in ("text_encoder", "unet_per_step", "decoder", "total"):
        s = r["latency_s"][k]
        assert 0 < s["min"] <= s["median"] <= s["max"], k
    assert r["flops"]["total"] == pytest.approx(
        r["flops"]["text_encoder"] + 2 * r["flops"]["unet_per_step"] + r["flops"]["decoder"])
    assert r["compute_floor_s"] > 0 and r["peak_memory_mb"]["process_rss"] > 0
    table = markdown_table([r, r]).splitlines()
    assert len(table) == 4 and table[2].startswith("| tiny | torch |")


def test_sd15_unet_flops_match_the_known_count():
    # SD-v1.5 UNet at 64x64 latents, batch 1: ~402 GMACs with attention matmuls (snapfusion-notes.md §2)
    pipe = preset_pipeline("sd15", device="meta")
    flops = count_flops(pipe, size=512, steps=50, guidance=1.0)
    assert flops["unet_per_step"] / 2e9 == pytest.approx(402, rel=0.02)


def test_bench_config_errors():
    with pytest.raises(ConfigError, match="exactly one"):
        BenchConfig(model="base", preset="tiny")
    with pytest.raises(ConfigError, match="preset"):
        BenchConfig(preset="sdxl")


def test_cli_bench_writes_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "--preset", "tiny", "--size", "64", "--steps", "1", "--runs", "1", "--warmup", "0",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["config"]["preset"] == "tiny"
    assert "UNet ms/step" in capsys.readouterr().out
    assert main(["bench", "--preset", "tiny", "--backend", "onnxruntime"]) == 2


def test_compile_options_reach_torch_compile(monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, mode="default": calls.append(mode) or fn)
    r = run_bench(BenchConfig(preset="tiny", size=64, steps=1, runs=1, warmup=0, compile=True,
                              compile_mode="reduce-overhead", compile_all=True))
    assert calls == ["reduce-overhead"] * 3  # UNet, text encoder, decoder
    assert "| reduce-overhead +all |" in markdown_table([r])
    with pytest.raises(ConfigError, match="need --compile"):
        BenchConfig(preset="tiny", compile_mode="reduce-overhead")
