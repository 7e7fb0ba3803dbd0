"""The benchmark: result structure, FLOP counts against the known SD-v1.5 number, the command, the fast path
(snapfusion.fast) against plain generation, the suite tables and the diffusers anchor."""

import json

import pytest
import torch

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
    monkeypatch.setattr(torch, "compile", lambda fn, mode="default", **kw: calls.append(mode) or fn)
    r = run_bench(BenchConfig(preset="tiny", size=64, steps=1, runs=1, warmup=0, compile=True,
                              compile_mode="reduce-overhead", compile_all=True))
    assert calls == ["reduce-overhead"] * 3  # UNet, text encoder, decoder
    assert "| reduce-overhead +all |" in markdown_table([r])
    with pytest.raises(ConfigError, match="need --compile"):
        BenchConfig(preset="tiny", compile_mode="reduce-overhead")


# ---- one preset table -------------------------------------------------------------------------------------------

def test_one_preset_table_for_bench_and_cli():
    from snapfusion import fast
    from snapfusion.bench import PRESETS
    from snapfusion.cli import export as commands
    from snapfusion.cli import options
    from snapfusion.evolve.runs import unet_preset
    from snapfusion.models.presets import ALIASES, ARCHITECTURES, architecture

    assert PRESETS == ARCHITECTURES == options.ARCHITECTURES
    assert commands.SDPA == fast.SDPA
    # bench-blocks reads the same table (its old names are aliases of it)
    assert unet_preset("snapfusion") == architecture("snapfusion")[1]
    assert all(unet_preset(old) == architecture(new)[1] for old, new in ALIASES.items())
    text, unet, decoder = architecture("snapfusion-guidance")
    assert unet.guidance_embed and not architecture("snapfusion")[1].guidance_embed
    assert decoder == architecture("snapfusion")[2] and text == architecture("sd15")[0]
    with pytest.raises(ConfigError, match="not one of"):
        architecture("sdxl")


def test_bench_no_longer_imports_the_cli():
    import ast
    from pathlib import Path

    import snapfusion.bench as bench

    for path in Path(bench.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert "snapfusion.cli" not in names, path


# ---- the fast path against Pipeline.generate ----------------------------------------------------------------------

def _tiny(name="tiny"):
    return preset_pipeline(name, size=64)


def _generate(pipe, **kw):
    return pipe.generate(["a red cube", "two cats"], [3, 4], steps=3, guidance=kw.pop("guidance", 5.0), height=64,
                         width=64, **kw)


@pytest.mark.parametrize("options", [dict(), dict(cache_uncond=False), dict(channels_last=False, sdpa="math")])
def test_fast_path_gives_the_images_of_plain_generate(options):
    from snapfusion.fast import FastOptions, accelerate

    pipe = _tiny()
    ref = _generate(pipe)
    accelerate(pipe, FastOptions(**options))
    for _ in range(3):  # eager first call, then the (CPU: eager) replays of the same runner
        out = _generate(pipe)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    assert len(pipe.fast.runners) == 1
    _generate(pipe, guidance=1.0)  # a second setting: a second runner
    assert len(pipe.fast.runners) == 2
    other = _generate(pipe, sampler="dpmpp_2m")  # not handled: the plain path
    assert other.shape == ref.shape


def test_split_guidance_matches_batch2_guidance():
    from snapfusion.fast import FastOptions, accelerate

    pipe = _tiny()
    ref = _generate(pipe)
    accelerate(pipe, FastOptions(cfg="split"))
    torch.testing.assert_close(_generate(pipe), ref, atol=1e-4, rtol=0)


def test_fast_path_reports_timings_and_calls_back_every_step():
    from snapfusion.fast import accelerate
    from snapfusion.pipeline import Timings

    pipe = accelerate(_tiny())
    steps, timings = [], Timings()
    _generate(pipe, callback=lambda i, t, z: steps.append((i, t, tuple(z.shape))), timings=timings)
    assert [s[0] for s in steps] == [0, 1, 2] and steps[0][2] == (2, 4, 8, 8)
    assert timings.unet_steps == 3 and 0 < timings.unet_total < timings.total
    assert timings.text_encoder > 0 and timings.decoder > 0


def test_guidance_embedded_pipeline_runs_one_call_per_step():
    from snapfusion.fast import accelerate

    pipe = _tiny("tiny-guidance")
    calls = []
    pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args[0].shape[0], kwargs["guidance"])),
                                        with_kwargs=True)
    accelerate(pipe)
    out = _generate(pipe, guidance=6.0)
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()
    assert len(calls) == 3 and all(b == 2 for b, _ in calls)  # batch 2 = the 2 prompts, no uncond half
    assert torch.equal(calls[0][1], torch.full((2,), 6.0))
    flops = count_flops(preset_pipeline("tiny-guidance", device="meta"), size=64, steps=3, guidance=6.0)
    flops_cfg = count_flops(preset_pipeline("tiny-guidance", device="meta"), size=64, steps=3, guidance=1.0)
    assert flops["unet_per_step"] == pytest.approx(flops_cfg["unet_per_step"])  # one batch-1 call either way


def test_attention_backends_can_be_pinned_per_module():
    from snapfusion.fast import attention_shapes, set_attention_backends, tune_attention

    pipe = _tiny()
    z, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    ref = pipe.unet(z, torch.full((2,), 10), ctx)
    shapes = attention_shapes(pipe.unet, batch=2, size=8)
    assert shapes and all(s[0] == 2 and s[3] in (s[2], 77) for s in shapes.values())
    choice = tune_attention(pipe.unet, batch=2, size=8)
    assert set(choice) == set(shapes) and set(choice.values()) <= {"flash", "efficient", "cudnn", "math"}
    set_attention_backends(pipe.unet, "math")
    torch.testing.assert_close(pipe.unet(z, torch.full((2,), 10), ctx), ref, atol=1e-5, rtol=0)


def test_bench_fast_flags():
    assert not BenchConfig(preset="tiny").uses_fast  # the CPU default: plain generate
    assert BenchConfig(preset="tiny", device="cuda").uses_fast
    assert not BenchConfig(preset="tiny", device="cuda", fast=False).uses_fast
    assert BenchConfig(preset="tiny", device="cuda").compiles and not BenchConfig(preset="tiny").compiles
    assert not BenchConfig(preset="tiny", device="cuda", compile=False).compiles
    with pytest.raises(ConfigError, match="no-fast"):
        BenchConfig(preset="tiny", device="cuda", fast=True, compile=True, compile_mode="reduce-overhead")
    r = run_bench(BenchConfig(preset="tiny", size=64, steps=2, runs=2, warmup=1, fast=True, cfg="split"))
    assert r["config"]["fast_used"] and r["latency_s"]["total"]["median"] > 0


# ---- the suite and the anchor ----------------------------------------------------------------------------------

def _suite_config(**kw):
    from snapfusion.bench.suite import SuiteConfig

    return SuiteConfig(device="cpu", dtype="fp32", size=64, steps=2, anchor_steps=3, runs=1, warmup=1, preset="tiny",
                       guidance_preset="tiny-guidance", sd_preset="tiny", tiny_anchor=True, compile=False,
                       batches=(1, 2), throughput_runs=1, **kw)


def test_latency_suite_has_every_lever_and_anchor_row(tmp_path):
    from snapfusion.bench.report import latency_markdown
    from snapfusion.bench.suite import latency_suite

    saved = []
    r = latency_suite(_suite_config(), on_row=saved.append, log=lambda s: None)
    names = [x["row"] for x in r["rows"]]
    assert not [x for x in r["rows"] if "error" in x], [x.get("error") for x in r["rows"]]
    for part in ("eager", "CUDA graphs", "cached", "channels-last", "torch.compile", "SDPA", "split guidance",
                 "guidance-embedded", "diffusers StableDiffusionPipeline, 3 steps",
                 "diffusers StableDiffusionPipeline, 2 steps", "SD-v1.5 preset, 3 steps"):
        assert any(part in n for n in names), part
    assert len(saved) == len(r["rows"])  # the result is handed out after every row
    embedded = next(x for x in r["rows"] if "guidance-embedded" in x["row"])
    assert embedded["floor"] == "tiny-guidance@2" and embedded["preset"] == "tiny-guidance"
    table = latency_markdown(json.loads(json.dumps(r)))
    assert table.count("\n| ") >= 9 + 5 and "diffusers 3-step / this" in table


def test_suite_budget_skips_rows_and_throughput_reports_each_batch():
    from snapfusion.bench.report import throughput_markdown
    from snapfusion.bench.suite import latency_suite, throughput_suite

    r = latency_suite(_suite_config(budget_s=0.0, anchors=False), log=lambda s: None)
    assert r["rows"][0].get("latency_s") is None or r["rows"][0]["started_s"] == 0.0
    assert all("skipped" in x for x in r["rows"][1:])
    t = throughput_suite(_suite_config(), log=lambda s: None)
    assert sorted(x["batch"] for x in t["rows"]) == [1, 1, 2, 2]
    assert "| 2 |" in throughput_markdown(t)


def test_kernel_categories():
    from snapfusion.bench.suite import kernel_kind

    assert kernel_kind("pytorch_flash::flash_fwd_kernel<...>") == "attention"
    assert kernel_kind("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_nhwckrsc_nhwc") == "convolution"
    assert kernel_kind("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_TNT") == "matmul"
    assert kernel_kind("triton_red_fused_native_group_norm_silu_3") == "compiled elementwise / norms (Triton)"
    assert kernel_kind("triton_poi_fused_add_convolution_7") == "compiled elementwise / norms (Triton)"
    assert kernel_kind("void at::native::elementwise_kernel<128, 2>") == "other"


def test_diffusers_anchor_at_test_size():
    from snapfusion.bench.anchor import diffusers_pipeline, speed_up, time_diffusers

    pipe = speed_up(diffusers_pipeline(tiny=True), compile=False)
    r = time_diffusers(pipe, "a red cube", batch=2, steps=2, size=32, runs=2, warmup=0)
    assert len(r["total_s"]) == 2 and all(x > 0 for x in r["total_s"])
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


# ---- CUDA only: the captured graphs replay the eager images -----------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("compile_", [False, True])
def test_cuda_graphs_replay_the_eager_images(compile_):
    from snapfusion.fast import FastOptions, accelerate

    pipe = preset_pipeline("tiny", device="cuda", size=64)
    plain = _generate(pipe)
    accelerate(pipe, FastOptions(compile=compile_))
    fast, pipe.fast = pipe.fast, None
    ref = _generate(pipe)  # the same (channels-last, compiled) networks through plain generate
    torch.testing.assert_close(ref, plain, atol=5e-3, rtol=0)  # TF32 convolutions: other algorithms, same image
    pipe.fast = fast
    outs = [_generate(pipe) for _ in range(4)]  # eager, capture, replay, replay
    assert pipe.fast.graphed == ["decoder", "loop", "text"]
    for out in outs:
        torch.testing.assert_close(out, ref, atol=1e-3, rtol=0)
    other = pipe.generate(["x", "y"], [7, 8], steps=3, guidance=5.0, height=64, width=64)  # new seeds: new images
    assert (other - outs[-1]).abs().max() > 1e-3


def test_scaling_script_builds_commands_and_table():
    import argparse
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_scaling", Path(__file__).parents[1] / "scripts" /
                                                  "bench_scaling.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a = argparse.Namespace(steps=10, image_size=64, log_every=5, num_workers=0, mixed_precision="no", latent_pool=0,
                           model="base", compile=True)
    unet = mod.command("train-unet", Path("r"), batch=8, a=a)
    assert unet[:3] == ["train-unet", "--run-dir", "r"] and "--from-pipeline" in unet and "--compile" in unet
    assert "--model" in mod.command("distill", Path("r"), batch=8, a=a)
    rows = [dict(task="distill", processes=n, batch_per_process=8, images_per_s=100.0 * s, mean_loss=0.01,
                 peak_cuda_mb=1000.0, peak_rss_mb=1.0) for n, s in ((1, 1.0), (2, 1.8))]
    rows.append(dict(task="distill", processes=4, batch_per_process=8, error=["oom"]))
    text = mod.table(rows)
    assert "| distill | 2 | 8 | 180.0 | 1.80× | 1,000 | 0.0100 |" in text and "failed: ['oom']" in text
