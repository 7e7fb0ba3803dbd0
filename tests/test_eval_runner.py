"""The evaluation runner end to end with a render-the-scene 'generator' and tiny random evaluators."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from snapfusion.data import Scene, render
from snapfusion.data.prompts import make_prompt_set
from snapfusion.errors import SnapFusionError
from snapfusion.eval.evaluators import Evaluators
from snapfusion.eval.frechet import gaussian_stats
from snapfusion.eval.probe import AttributeProbe, ProbeConfig
from snapfusion.eval.runner import (SEED_STRIDE, evaluate, parse_guidance_sweep, run_eval_command,
                                   with_seeds_per_prompt)
from snapfusion.eval.scene_clip import SceneClip, SceneClipConfig
from snapfusion.data import vocab


def _tiny_evaluators(tmp_path):
    torch.manual_seed(0)
    v = vocab()
    clip = SceneClip(SceneClipConfig(words=("a", "star"), widths=(8, 8), groups=4, embed_dim=8,
                                     spatial_channels=2, text_width=16, text_layers=1, text_heads=2, image_size=32))
    probe = AttributeProbe(ProbeConfig(objects=v.objects, shapes=v.shapes, colors=v.colors, sizes=v.sizes,
                                       widths=(8, 8, 8), downsamples=2, groups=4, image_size=64))
    return Evaluators(clip.eval(), probe.eval(), gaussian_stats(torch.randn(50, 8)), "test00000000", tmp_path)


def _renderer(calls):
    by_prompt = {}

    def generate(prompts, seeds, guidance):
        calls.append((len(prompts), guidance))
        return [render(Scene.from_dict(by_prompt[p]), 64) for p in prompts]

    return generate, by_prompt


def test_evaluate_writes_protocol_grid_and_curve(tmp_path):
    records = make_prompt_set("test", 6, seed=5)
    calls = []
    gen, by_prompt = _renderer(calls)
    by_prompt.update({r["prompt"]: r["scene"] for r in records})
    ev = _tiny_evaluators(tmp_path)
    rep = evaluate(gen, records, guidance_scales=(1.0, 3.0), steps=8, sampler="ddim", num_images=5, batch_size=2,
                   out_dir=tmp_path / "out", evaluators=ev, progress=False)
    assert calls == [(2, 1.0), (2, 1.0), (1, 1.0), (2, 3.0), (2, 3.0), (1, 3.0)]
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["seeds"] == [r["seed"] for r in records[:5]] and saved["evaluator_version"] == "test00000000"
    assert saved["sampler"] == "ddim" and saved["steps"] == 8 and len(saved["results"]) == 2
    assert saved["results"][0]["resolution"] == [64, 64]
    for key in ("clip_score", "domain_fid", "attributes"):
        assert key in saved["results"][0]
    assert (tmp_path / "out" / "grid_w1.png").is_file() and (tmp_path / "out" / "fid_clip_curve.png").is_file()
    again = evaluate(gen, records, guidance_scales=(1.0, 3.0), steps=8, sampler="ddim", num_images=5, batch_size=5,
                     out_dir=tmp_path / "out2", evaluators=ev, progress=False)  # batch size must not matter
    for a, b in zip(rep["results"], again["results"]):
        assert a["clip_score"] == pytest.approx(b["clip_score"], abs=1e-4)
        assert a["domain_fid"] == pytest.approx(b["domain_fid"], rel=1e-6)


def test_the_report_records_the_guidance_rescale_and_interval(tmp_path):
    records = make_prompt_set("test", 3, seed=5)
    gen, by_prompt = _renderer([])
    by_prompt.update({r["prompt"]: r["scene"] for r in records})
    kw = dict(guidance_scales=(3.0,), steps=8, sampler="ddim", num_images=3, batch_size=3,
              evaluators=_tiny_evaluators(tmp_path), progress=False)
    plain = evaluate(gen, records, out_dir=tmp_path / "a", **kw)
    assert plain["guidance_rescale"] == 0.0 and plain["guidance_interval"] == [0.0, 1.0]
    evaluate(gen, records, out_dir=tmp_path / "b", guidance_rescale=0.7, guidance_interval=(0.0, 0.5), **kw)
    report = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert report["guidance_rescale"] == 0.7 and report["guidance_interval"] == [0.0, 0.5]


def test_fid_vs_renders_is_zero_for_the_prompts_own_renders(tmp_path):
    from PIL import Image

    records = make_prompt_set("test", 6, seed=5)
    gen, by_prompt = _renderer([])
    by_prompt.update({r["prompt"]: r["scene"] for r in records})
    ev = _tiny_evaluators(tmp_path)
    common = dict(guidance_scales=(1.0,), steps=8, sampler="ddim", num_images=6, batch_size=4, evaluators=ev,
                  progress=False)
    exact = evaluate(gen, records, out_dir=tmp_path / "exact", **common)["results"][0]
    assert exact["fid_vs_renders"] == pytest.approx(0, abs=1e-6)
    assert exact["domain_fid"] > 1e-3  # the generic reference is not these prompts' renders
    gray = lambda prompts, seeds, w: [Image.new("RGB", (64, 64), (128, 128, 128 + i))  # noqa: E731
                                      for i in range(len(prompts))]
    assert evaluate(gray, records, out_dir=tmp_path / "gray", **common)["results"][0]["fid_vs_renders"] > 1e-3
    wide = lambda prompts, seeds, w: [Image.new("RGB", (96, 64)) for _ in prompts]  # noqa: E731
    assert "fid_vs_renders" not in evaluate(wide, records, out_dir=tmp_path / "wide", **common)["results"][0]


def test_bad_options_are_clear_errors(tmp_path):
    assert parse_guidance_sweep("1, 2,4.5") == (1.0, 2.0, 4.5)
    with pytest.raises(SnapFusionError, match="x"):
        parse_guidance_sweep("1,x")
    with pytest.raises(SnapFusionError, match="exactly one"):
        run_eval_command(lambda *a: [], steps=8, sampler="ddim", out_dir=tmp_path)
    with pytest.raises(SnapFusionError, match="missing.jsonl"):
        run_eval_command(lambda *a: [], prompts=str(tmp_path / "missing.jsonl"), steps=8, sampler="ddim",
                         guidance=2.0, out_dir=tmp_path, evaluators_dir=None)
    records = make_prompt_set("test", 3, seed=5)
    with pytest.raises(SnapFusionError, match="returned 0 images"):
        evaluate(lambda p, s, g: [], records, guidance_scales=(1.0,), steps=8, sampler="ddim", num_images=3,
                 batch_size=2, out_dir=tmp_path, evaluators=_tiny_evaluators(tmp_path), progress=False)


def test_per_image_results_follow_the_probe_rows(tmp_path, monkeypatch):
    """all_per_image is the probe's per-image "all" verdict, in record order ("1" = every attribute right)."""
    import snapfusion.eval.evaluators as evaluators

    verdicts = [True, False, False, True, True]

    def fake_accuracy(probe, images, scenes):
        rows = [{"all": v} for v in verdicts[: len(scenes)]]
        return {"all": sum(verdicts) / len(verdicts), "per_image": rows}

    monkeypatch.setattr(evaluators, "attribute_accuracy", fake_accuracy)
    records = make_prompt_set("test", 5, seed=5)
    gen, by_prompt = _renderer([])
    by_prompt.update({r["prompt"]: r["scene"] for r in records})
    rep = evaluate(gen, records, guidance_scales=(2.0,), steps=8, sampler="ddim", num_images=5, batch_size=2,
                   out_dir=tmp_path / "out", evaluators=_tiny_evaluators(tmp_path), progress=False)
    assert rep["results"][0]["all_per_image"] == "10011"
    assert rep["seeds_per_prompt"] == 1


def test_seeds_per_prompt_keeps_the_first_copy_and_shifts_the_rest(tmp_path):
    records = make_prompt_set("test", 4, seed=5)
    records[0] = {**records[0], "seed": -7}           # a custom seed outside [0, 2**31) stays as it is in copy 0
    more = with_seeds_per_prompt(records, 3)
    assert len(more) == 12 and more[:4] == records    # copy 0: the records themselves, in order
    assert [r["prompt"] for r in more[4:8]] == [r["prompt"] for r in records]
    assert [r["seed"] for r in more[8:]] == [(r["seed"] + 2 * SEED_STRIDE) % 2**31 for r in records]
    assert len({r["seed"] for r in more}) == 12
    with pytest.raises(SnapFusionError, match="at least 1"):
        with_seeds_per_prompt(records, 0)


def test_run_eval_command_counts_prompts_and_scores_k_copies(tmp_path, monkeypatch):
    import snapfusion.eval.runner as runner

    records = make_prompt_set("test", 4, seed=5)
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(SnapFusionError, match="exceeds the 4 prompts"):  # checked before the evaluators load
        run_eval_command(lambda *a: [], prompts=str(path), steps=8, sampler="ddim", guidance=2.0, num_images=5,
                         out_dir=tmp_path, evaluators_dir=str(tmp_path / "none"))
    monkeypatch.setattr(runner, "load_evaluators", lambda *a, **k: _tiny_evaluators(tmp_path))
    calls = []
    gen, by_prompt = _renderer(calls)
    by_prompt.update({r["prompt"]: r["scene"] for r in records})
    rep = run_eval_command(gen, prompts=str(path), steps=8, sampler="ddim", guidance=2.0, num_images=3,
                           seeds_per_prompt=2, batch_size=16, out_dir=tmp_path / "k2")
    assert rep["num_images"] == 6 and rep["seeds_per_prompt"] == 2       # the first 3 prompts, 2 seeds each
    assert rep["prompts"] == [r["prompt"] for r in records[:3]] * 2
    assert rep["seeds"][:3] == [r["seed"] for r in records[:3]] and len(set(rep["seeds"])) == 6
    assert len(rep["results"][0]["all_per_image"]) == 6 and calls == [(6, 2.0)]
    whole = run_eval_command(gen, prompts=str(path), steps=8, sampler="ddim", guidance=2.0, batch_size=16,
                             out_dir=tmp_path / "all")
    assert whole["num_images"] == 4                                       # default: every prompt of the set
