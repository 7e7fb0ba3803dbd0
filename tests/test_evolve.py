"""Robust training, evolution actions and the evolution loop (tiny models, CPU)."""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from snapfusion.errors import ConfigError
from snapfusion.evolve.actions import Action, EvalConfig, candidates, edited_unet
from snapfusion.evolve.baselines import bk_sdm
from snapfusion.evolve.evolution import EvolveConfig, evolve, read_log
from snapfusion.evolve.latency import signatures
from snapfusion.evolve.robust import RobustConfig, draw_skips
from snapfusion.evolve.runs import clip_scorer
from snapfusion.models.unet import UNet
from snapfusion.models.unet_config import block_names, tiny_sd15

RECORDS = [{"prompt": p, "seed": s} for p, s in (("a red circle", 1), ("two cats", 2), ("a star", 3))]


pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(cfg, batch=2, side=8):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 4, side, side, generator=g), torch.tensor([10.0, 700.0][:batch]),
            torch.randn(batch, 5, cfg.context_dim, generator=g))


def test_draw_skips_rates_and_granularity():
    names = block_names(tiny_sd15())
    gen = torch.Generator().manual_seed(0)
    cfg = RobustConfig(p_res=0.8, p_attn=0.5)
    masks = [draw_skips(list(names), cfg, 64, gen) for _ in range(20)]
    res = torch.stack([m.get("down.1.res.0", torch.zeros(64, dtype=torch.bool)) for m in masks]).float().mean()
    attn = torch.stack([m.get("down.1.attn.0", torch.zeros(64, dtype=torch.bool)) for m in masks]).float().mean()
    assert abs(res - 0.2) < 0.05 and abs(attn - 0.5) < 0.05
    batch = draw_skips(list(names), RobustConfig(0.5, 0.5, "batch"), 64, gen)
    assert isinstance(batch, set) and 0 < len(batch) < len(names)
    assert draw_skips(list(names), RobustConfig(1.0, 1.0), 4, gen) == {}
    with pytest.raises(ConfigError, match="p_attn"):
        RobustConfig(p_attn=0.0)


def test_exactly_inherited_removal_equals_skipping_the_block():
    torch.manual_seed(0)
    unet = UNet(tiny_sd15()).eval()
    z, t, ctx = _inputs(unet.config)
    exact = 0
    for action in candidates(unet.config, "remove", unet.state_dict()):
        model, sliced, fresh = edited_unet(unet, action)
        assert all(".conv_shortcut." in k for k in fresh)  # a block that now changes width gets a new 1x1 conv
        if sliced or fresh:
            continue  # rewired skips: an approximation of skipping, by design (docs/efficient_unet.md)
        exact += 1
        with torch.no_grad():
            torch.testing.assert_close(model(z, t, ctx), unet(z, t, ctx, skip={action.block}))
    assert exact >= 10  # every attn block and the mid res blocks


def test_added_copy_starts_from_its_source():
    torch.manual_seed(0)
    unet = UNet(tiny_sd15())
    adds = candidates(unet.config, "add", unet.state_dict())
    assert Action("add", "up.2.attn.1", "up.2.attn.3") in adds
    assert not any(a.block.startswith("down.") and ".res." in a.block for a in adds)  # needs a spare up res block
    model, sliced, fresh = edited_unet(unet, Action("add", "up.2.attn.1"))
    assert not sliced and not fresh and "up.2.attn.3" in block_names(model.config)
    for (k1, v1), (k2, v2) in zip(model.get_submodule("up.2.attn.3").state_dict().items(),
                                  unet.get_submodule("up.2.attn.1").state_dict().items()):
        torch.testing.assert_close(v1, v2)


def test_bk_sdm_removes_one_layer_per_stage():
    cfg, removed = bk_sdm(tiny_sd15())
    assert "down.0.res.1" in removed and "up.1.res.1" in removed and "mid.attn.0" not in removed
    assert sum(n.startswith("down.") for n in block_names(cfg)) == 7


def _table(cfg):
    blocks = {n: {"signature": s, "ms": 1.0 + (2.0 if s.startswith("attn") else 0.0)}
              for n, s in signatures(cfg, 8).items()}
    return {"kind": "latency-table", "meta": {"latent": 8}, "blocks": blocks, "pieces": {"conv_in": 1.0},
            "whole_ms": 1.0}


def _scorer(images, prompts):
    return images.mean((1, 2, 3)) * 100  # any per-image score: the loop only compares them


@pytest.mark.slow
def test_evolution_runs_logs_and_resumes(tiny_pipeline, tmp_path):
    start = tiny_pipeline.unet
    ev = EvalConfig(num_prompts=3, steps=2, guidance=3.0, size=64, batch=3)
    cfg = EvolveConfig(budget_fraction=0.85, iterations=2, eval=ev)
    table = _table(start.config)

    def chunk(unet, run_dir):  # stands in for robust training: a fixed nudge of the weights
        with torch.no_grad():
            unet.conv_out.bias.add_(0.01)
        return unet

    straight = evolve(tmp_path / "a", _copy(start), tiny_pipeline, RECORDS, _scorer, table, cfg, chunk)
    calls = []

    def dies_at_second(unet, run_dir):
        calls.append(run_dir)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return chunk(unet, run_dir)

    with pytest.raises(KeyboardInterrupt):
        evolve(tmp_path / "b", _copy(start), tiny_pipeline, RECORDS, _scorer, table, cfg, dies_at_second)
    resumed = evolve(tmp_path / "b", _copy(start), tiny_pipeline, RECORDS, _scorer, table, cfg, chunk)
    assert resumed == straight
    log_a, log_b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [r["block"] for r in log_a if r["type"] == "action"] == [r["block"] for r in log_b if r["type"] == "action"]
    actions = [r for r in log_a if r["type"] == "action"]
    assert len(actions) == 2 and all(r["delta_ms"] < 0 and "delta_clip" in r for r in actions)
    steps = [r for r in log_a if r["type"] == "step"]
    assert steps[0]["latency_ms"] > steps[-1]["latency_after_ms"]
    assert (tmp_path / "a" / "final" / "config.json").is_file() and (tmp_path / "a" / "trajectory.png").is_file()
    final_a = UNet.load(tmp_path / "a" / "final")
    final_b = UNet.load(tmp_path / "b" / "final")
    assert final_a.config == final_b.config
    torch.testing.assert_close(final_a.state_dict(), final_b.state_dict())


def _copy(unet):
    new = UNet(unet.config)
    new.load_state_dict(unet.state_dict())
    return new.eval()


def test_clip_scorer_uses_scene_clip():
    from snapfusion.eval.scene_clip import SceneClip, SceneClipConfig

    torch.manual_seed(0)
    clip = SceneClip(SceneClipConfig(image_size=32, widths=(8, 16), groups=4, embed_dim=16, spatial_channels=4,
                                     words=("a", "red", "circle"), text_width=16, text_layers=1, text_heads=2))
    scores = clip_scorer(SimpleNamespace(clip=clip))(torch.rand(2, 3, 64, 64), ["a red circle", "a circle"])
    assert scores.shape == (2,) and bool(((scores >= 0) & (scores <= 100)).all())


def _robust_task(tmp_path, p=0.5, granularity="sample"):
    from snapfusion.evolve.robust import RobustTask, RobustTaskConfig
    from snapfusion.models.autoencoder import AutoencoderConfig, AutoencoderKL, save_autoencoder
    from snapfusion.models.text import TextEncoder, save_text_encoder
    from snapfusion.train.tasks import UNetTaskConfig
    from tests.conftest import TINY_TEXT

    torch.manual_seed(0)
    save_autoencoder(tmp_path / "vae", AutoencoderKL(AutoencoderConfig.tiny()))
    save_text_encoder(tmp_path / "text", TextEncoder(TINY_TEXT))
    unet_cfg = dataclasses.replace(tiny_sd15(), context_dim=32)
    UNet(unet_cfg).save(tmp_path / "init")
    task_cfg = UNetTaskConfig(model=unet_cfg, vae=str(tmp_path / "vae"), text_encoder=str(tmp_path / "text"),
                              image_size=64)
    return RobustTask(RobustTaskConfig(unet=task_cfg, init=str(tmp_path / "init"),
                                       robust=RobustConfig(p, p, granularity)))


def test_robust_training_runs_in_the_loop_from_its_init(tmp_path):
    from snapfusion.train import state as ckpt_io
    from snapfusion.train.loop import loop_config, train

    task = _robust_task(tmp_path)
    init = UNet.load(tmp_path / "init").state_dict()
    assert all(torch.equal(v, init[k]) for k, v in task.build().state_dict().items())
    cfg = loop_config(run_dir=str(tmp_path / "run"), max_steps=2, batch_size=2, warmup_steps=0, ema_decay=0.0,
                      mixed_precision="no", num_workers=0, sample_every=0, log_every=1)
    assert train(cfg, task)["step"] == 2
    trained = UNet.load(ckpt_io.latest_checkpoint(tmp_path / "run") / "model").state_dict()
    assert any(not torch.equal(v, init[k]) for k, v in trained.items())
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["task"]["robust"]["p_res"] == 0.5


def test_granularity_measurement_reports_both(tmp_path):
    from snapfusion.evolve.robust import granularity_measurement

    task = _robust_task(tmp_path)
    ds = task.dataset()
    batch = task.collate([ds[i] for i in range(4)])
    out = granularity_measurement(task, task.build().train(), batch, draws=3)
    assert set(out) == {"sample", "batch"}
    assert all(v["seconds_per_step"] > 0 and v["grad_relative_variance"] > 0 for v in out.values())


def test_bk_sdm_command_writes_a_loadable_unet(tmp_path, capsys):
    from snapfusion.cli import main

    torch.manual_seed(0)
    UNet(tiny_sd15()).save(tmp_path / "init")
    assert main(["bk-sdm", "--init", str(tmp_path / "init"), "--out", str(tmp_path / "bk")]) == 0
    model = UNet.load(tmp_path / "bk")
    assert model.config == bk_sdm(tiny_sd15())[0]
    assert "removed 14 blocks" in capsys.readouterr().out
    assert main(["evolve", "--run-dir", str(tmp_path / "e"), "--table", str(tmp_path / "none.json"),
                 "--model", str(tmp_path / "nope")]) == 2


def test_evolve_training_chunk_trains_under_the_commands_no_grad(tmp_path):
    from snapfusion.cli.compress_evolve import _train_chunk

    _robust_task(tmp_path)  # writes the tiny VAE, text tower and init UNet folders
    a = SimpleNamespace(train_steps=1, batch_size=2, lr=1e-3, mixed_precision="no", seed=0, num_workers=0,
                        model=str(tmp_path), vae=str(tmp_path / "vae"), text_encoder=str(tmp_path / "text"),
                        image_size=64, num_emoji=None, p_res=0.5, p_attn=0.5, granularity="sample",
                        offset_noise=0.0, latent_pool=0)
    unet = UNet.load(tmp_path / "init")
    with torch.no_grad():  # cmd_evolve runs the whole evolution, training chunks included, under no_grad
        trained = _train_chunk(a, "cpu")(unet, tmp_path / "evo" / "iter_000" / "train")
    before = unet.state_dict()
    assert any(not torch.equal(v, before[k]) for k, v in trained.state_dict().items())


def test_each_evolution_iteration_trains_on_its_own_scenes(tmp_path, monkeypatch):
    """Every chunk's run dir is named train; its data seed comes from the iteration's folder (iter_000, iter_001)."""
    import snapfusion.train.loop as loop
    from snapfusion.cli.compress_evolve import _train_chunk

    _robust_task(tmp_path)
    a = SimpleNamespace(train_steps=1, batch_size=2, lr=1e-3, mixed_precision="no", seed=0, num_workers=0,
                        model=str(tmp_path), vae=str(tmp_path / "vae"), text_encoder=str(tmp_path / "text"),
                        image_size=64, num_emoji=None, p_res=0.5, p_attn=0.5, granularity="sample",
                        offset_noise=0.0, latent_pool=0)
    tasks, real = [], loop.train
    monkeypatch.setattr(loop, "train", lambda cfg, task, **kw: tasks.append(task) or real(cfg, task, **kw))
    chunk, unet = _train_chunk(a, "cpu"), UNet.load(tmp_path / "init")
    with torch.no_grad():
        for k in range(2):
            chunk(unet, tmp_path / "evo" / f"iter_{k:03d}" / "train")
    assert len(tasks) == 2 and tasks[0].cfg.seed != tasks[1].cfg.seed
    first = [[t.dataset()[i]["caption"] for i in range(a.batch_size)] for t in tasks]  # the loop's first batch
    assert first[0] != first[1]


def test_a_training_chunk_stopped_by_its_time_limit_says_so(tmp_path):
    from snapfusion.evolve.robust import RobustTaskConfig
    from snapfusion.evolve.runs import ChunkConfig, ChunkStopped, training_chunk

    task = _robust_task(tmp_path)
    chunk = ChunkConfig(steps=50, batch_size=2, mixed_precision="no", num_workers=0)
    config = RobustTaskConfig(unet=task.cfg, init=None, robust=task.robust_cfg.robust)
    run = training_chunk(lambda unet_cfg, init: dataclasses.replace(config, init=init), chunk, "cpu",
                         time_left=lambda: 1e-4)
    with pytest.raises(ChunkStopped, match="stopped at step 1 of 50"), torch.no_grad():
        run(UNet.load(tmp_path / "init"), tmp_path / "evo" / "iter_000" / "train")


def test_evolve_apply_replays_a_run_on_other_weights(tiny_pipeline, tmp_path, capsys):
    """evolve-apply: the logged actions on the start weights give the run's final architecture with those
    weights carried over (equal to the run's own final UNet when the chunks do not train); actions of an iteration
    without its step record (a killed run) are left out; a log that does not fit the UNet, a corrupt or malformed
    log, a missing one and a missing table are one-line errors that write nothing."""
    from snapfusion.cli import main

    start = tiny_pipeline.unet
    ev = EvalConfig(num_prompts=3, steps=2, guidance=3.0, size=64, batch=3)
    evolve(tmp_path / "run", _copy(start), tiny_pipeline, RECORDS, _scorer, _table(start.config),
           EvolveConfig(budget_fraction=0.85, iterations=2, eval=ev))
    start.save(tmp_path / "start")
    assert main(["evolve-apply", "--log", str(tmp_path / "run"), "--init", str(tmp_path / "start"),
                 "--out", str(tmp_path / "out")]) == 0
    assert "2 actions replayed" in capsys.readouterr().out
    final, replayed = UNet.load(tmp_path / "run" / "final"), UNet.load(tmp_path / "out")
    assert replayed.config == final.config != start.config
    torch.testing.assert_close(replayed.state_dict(), final.state_dict())

    lines = (tmp_path / "run" / "evolve.jsonl").read_text().splitlines()
    first_step = next(i for i, line in enumerate(lines) if json.loads(line)["type"] == "step")
    killed = tmp_path / "killed.jsonl"  # iteration 0 complete, then one action of iteration 1 and no step
    extra = {**json.loads(lines[first_step - 1]), "iteration": 1}
    killed.write_text("\n".join(lines[: first_step + 1] + [json.dumps(extra)]) + "\n")
    assert main(["evolve-apply", "--log", str(killed), "--init", str(tmp_path / "start"),
                 "--out", str(tmp_path / "out1")]) == 0
    assert "1 actions replayed" in capsys.readouterr().out

    other = tiny_sd15()
    torch.manual_seed(1)
    UNet(dataclasses.replace(other, context_dim=start.config.context_dim, norm_groups=4)).save(tmp_path / "other")
    bad = {"corrupt": '{"type": "step"\n', "list": "[1, 2]\n", "no_op": '{"type": "action", "applied": true, '
           '"iteration": 0, "block": "x"}\n{"type": "step", "iteration": 0}\n', "no_step": lines[0] + "\n"}
    for name, text in bad.items():
        (tmp_path / f"{name}.jsonl").write_text(text)
    log = str(tmp_path / "run" / "evolve.jsonl")
    start_ = str(tmp_path / "start")
    for args, words in (((log, str(tmp_path / "other")), "does not give"),
                        ((str(tmp_path / "corrupt.jsonl"), start_), "not a valid evolution log"),
                        ((str(tmp_path / "list.jsonl"), start_), "record 1 is not a JSON object"),
                        ((str(tmp_path / "no_op.jsonl"), start_), "lacks a field"),
                        ((str(tmp_path / "no_step.jsonl"), start_), "no step record"),
                        ((str(tmp_path / "nothing"), start_), "no evolution log"),
                        ((log, start_, "--table", str(tmp_path / "none.json")), "none.json")):
        log_, init, *more = args
        assert main(["evolve-apply", "--log", log_, "--init", init, "--out", str(tmp_path / "x"), *more]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err, err
    assert not (tmp_path / "x").exists()


def _step(k, start, end, budget_ms=20.0):
    return {"iteration": k, "type": "step", "latency_ms": start, "latency_after_ms": end, "budget_ms": budget_ms}


def _act(k, op, block):
    return {"iteration": k, "type": "action", "op": op, "block": block, "applied": True}


def test_a_log_cut_at_a_larger_budget_stops_where_that_search_would_have():
    """within_budget: the first iteration that ends within the budget, then only the growing (add-only) iterations
    that stay within it; the whole log at its own budget or below, or when it never gets within; the shipped 20 %
    log passes through 56.9 % and 28.3 % of its start."""
    from snapfusion.errors import SnapFusionError
    from snapfusion.evolve.evolution import reached_fraction, within_budget

    log = [_act(0, "remove", "a"), _step(0, 100, 70), _act(1, "remove", "b"), _step(1, 70, 40),
           _act(2, "add", "c"), _step(2, 40, 45), _act(3, "remove", "d"), _step(3, 45, 15), _act(4, "add", "e"),
           _step(4, 15, 19)]
    def iterations(cut):
        return sorted({r["iteration"] for r in cut})
    assert iterations(within_budget(log, 0.8)) == [0]
    assert iterations(within_budget(log, 0.5)) == [0, 1, 2]  # iteration 2 only adds and ends at 45 %
    assert iterations(within_budget(log, 0.42)) == [0, 1]    # its add would end over 42 %
    assert iterations(within_budget(log, 0.3)) == [0, 1, 2, 3, 4]
    assert within_budget(log, 0.2) == log and within_budget(log, 0.05) == log  # own budget, and beyond reach
    assert reached_fraction(within_budget(log, 0.42)) == pytest.approx(0.4)
    assert reached_fraction(log) == pytest.approx(0.19)
    shipped = read_log(Path(__file__).parents[1] / "results/unet_evolution/evolve_budget_0.2.jsonl")
    assert [round(reached_fraction(within_budget(shipped, b)), 3) for b in (0.6, 0.35, 0.2)] == [0.569, 0.283, 0.199]
    for bad, words in (([_act(0, "remove", "a")], "no step record"),
                       ([{"type": "step", "iteration": 0}], "budget and latency")):
        with pytest.raises(SnapFusionError, match=words):
            within_budget(bad, 0.5)
    with pytest.raises(SnapFusionError, match="latency"):
        reached_fraction([{"type": "step", "iteration": 0}])
