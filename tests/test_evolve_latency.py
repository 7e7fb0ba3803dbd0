"""Latency lookup table: measurement structure, signatures, predictions for edited configs, the command."""

import json

import pytest
import torch

from snapfusion.cli import main
from snapfusion.errors import SnapFusionError
from snapfusion.evolve.latency import (TableConfig, block_sides, load_table, measure_table, predict_ms, save_table,
                                       signatures)
from snapfusion.models.unet import UNet
from snapfusion.models.unet_config import block_names, copy_block, remove_block, sd15, tiny_sd15


pytestmark = pytest.mark.usefixtures("one_thread")


def _synthetic_table(cfg, latent=8):
    """A table whose block latencies are known numbers (1 ms per 100 in+out channels, x side)."""
    blocks = {}
    for name, sig in signatures(cfg, latent).items():
        widths, side = sig.split(":")[1].split("@")
        cin, cout = (int(x) for x in widths.split("->"))
        blocks[name] = {"signature": sig, "ms": (cin + cout) / 100 * int(side) + (1.0 if "attn" in sig else 0.0)}
    return {"kind": "latency-table", "meta": {"latent": latent}, "blocks": blocks, "pieces": {"conv_in": 0.5},
            "whole_ms": 1.0}


def test_sides_and_signatures_of_sd15():
    sides = block_sides(sd15(), 64)
    assert sides["down.0.attn.0"] == 64 and sides["down.2.res.1"] == 16 and sides["mid.attn.0"] == 8
    assert sides["up.1.res.0"] == 16 and sides["up.3.attn.2"] == 64
    sigs = signatures(sd15(), 64)
    assert sigs["up.1.res.2"] == "res:1920->1280@16"  # 1280 + 640 skip (docs/unet.md)
    assert sigs["down.0.attn.0"] == "attn:320->320@64"


def test_measured_table_has_every_block_and_piece(tmp_path):
    torch.manual_seed(0)
    unet = UNet(tiny_sd15())
    table = measure_table(unet, TableConfig(size=64, warmup=1, repeats=2))
    assert list(table["blocks"]) == list(block_names(unet.config))
    assert set(table["pieces"]) == {"conv_in", "time_embedding", "down.0.resample", "down.1.resample",
                                    "down.2.resample", "up.0.resample", "up.1.resample", "up.2.resample", "head",
                                    "skip_concat"}
    assert all(v["ms"] > 0 for v in table["blocks"].values()) and table["whole_ms"] > 0
    expected = sum(table["pieces"].values()) + sum(v["ms"] for v in table["blocks"].values())
    assert table["predicted_ms"] == pytest.approx(expected)
    save_table(table, tmp_path / "t.json")
    assert load_table(tmp_path / "t.json") == json.loads(json.dumps(table))


def test_prediction_of_edited_configs_follows_the_table():
    cfg = tiny_sd15()
    table = _synthetic_table(cfg)
    full, estimated = predict_ms(cfg, table)
    assert not estimated
    assert full == pytest.approx(0.5 + sum(b["ms"] for b in table["blocks"].values()))
    fewer, _ = predict_ms(remove_block(cfg, "down.1.attn.0"), table)
    assert fewer == pytest.approx(full - table["blocks"]["down.1.attn.0"]["ms"])
    more, _ = predict_ms(copy_block(cfg, "up.2.attn.1")[0], table)
    assert more == pytest.approx(full + table["blocks"]["up.2.attn.1"]["ms"])


def test_unknown_signature_is_estimated_and_reported():
    cfg = sd15()
    table = _synthetic_table(cfg, 64)
    full, _ = predict_ms(cfg, table)
    del table["blocks"]["down.1.res.1"]  # the only block of signature res:640->640@32
    ms, estimated = predict_ms(cfg, table)
    assert estimated == ["res:640->640@32"]
    # synthetic latency is linear in in+out channels at a side, so the scaled estimate is exact
    assert ms == pytest.approx(full)


def test_bad_table_file_is_one_line_error(tmp_path):
    (tmp_path / "x.json").write_text('{"kind": "other"}')
    with pytest.raises(SnapFusionError, match="not a latency table"):
        load_table(tmp_path / "x.json")


def test_separate_whole_frees_the_whole_runner_before_the_parts(monkeypatch):
    """--separate-whole: the whole UNet's runner is built first and is gone when the parts' runners are built (the
    peak holds one copy of the weights in runners, not two); the table has the same entries."""
    import weakref

    import snapfusion.evolve.latency as latency

    whole, alive_at_parts = [], []
    real = latency._runner

    def spy(module, inputs, cfg, tmp, name, device):
        runner = real(module, inputs, cfg, tmp, name, device)
        if name == "unet":
            whole.append(weakref.ref(runner))
        else:
            alive_at_parts.append(bool(whole) and whole[0]() is not None)
        return runner

    monkeypatch.setattr(latency, "_runner", spy)
    torch.manual_seed(0)
    table = measure_table(UNet(tiny_sd15()), TableConfig(size=64, warmup=1, repeats=1, separate_whole=True))
    assert whole and alive_at_parts and not any(alive_at_parts)
    assert list(table["blocks"]) == list(block_names(tiny_sd15())) and table["whole_ms"] > 0
    whole.clear(), alive_at_parts.clear()
    measure_table(UNet(tiny_sd15()), TableConfig(size=64, warmup=1, repeats=1))  # default: all in one round robin
    assert not any(alive_at_parts) and whole  # the whole is built last, after every part


def test_onnxruntime_backend_times_blocks(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    table = measure_table(UNet(tiny_sd15()), TableConfig(size=64, warmup=1, repeats=1, backend="onnxruntime"))
    assert len(table["blocks"]) == len(block_names(tiny_sd15())) and table["whole_ms"] > 0


def test_bench_blocks_command(tmp_path, capsys):
    out = tmp_path / "tiny.json"
    assert main(["bench-blocks", "--preset", "tiny_sd15", "--size", "64", "--repeats", "2", "--warmup", "1",
                 "--out", str(out)]) == 0
    assert load_table(out)["meta"]["model"] == "preset:tiny_sd15"
    assert main(["bench-blocks", "--preset", "nope", "--out", str(out)]) == 2
    assert "unknown --preset" in capsys.readouterr().err


def test_skip_concat_piece_writes_every_skip_concatenation():
    """The glue piece concatenates one pair per up block that pops a skip, each as large as that block's input."""
    from snapfusion.evolve.latency import _SkipConcat, _concat_inputs, capture_inputs

    torch.manual_seed(0)
    unet = UNet(tiny_sd15()).eval()
    z, t, ctx = torch.randn(2, 4, 8, 8), torch.full((2,), 500.0), torch.randn(2, 77, unet.config.context_dim)
    inputs = capture_inputs(unet, z, t, ctx)
    outs = _SkipConcat()(*_concat_inputs(unet, inputs))
    popping = [p.name for stage in unet.up for p in stage.order if p.pop_skip]
    assert len(outs) == len(popping) > 0
    for out, name in zip(outs, popping):
        assert torch.equal(out, inputs[name][0])


def test_cuda_graph_timing_needs_cuda_and_torch():
    with pytest.raises(SnapFusionError, match="cuda-graphs"):
        measure_table(UNet(tiny_sd15()), TableConfig(size=64, warmup=1, repeats=1, cuda_graphs=True))
