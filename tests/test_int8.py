"""Int8 weight storage: per-output-channel quantization, its files and their errors."""

import json

import pytest
import torch

from snapfusion.errors import WeightsError
from snapfusion.models.unet import UNet
from snapfusion.weights import QSCALE_SUFFIX, load_safetensors, quantize_int8, save_safetensors


def test_int8_roundtrip_error_is_at_most_half_a_step_per_output_channel(tmp_path):
    torch.manual_seed(0)
    state = {"conv.weight": torch.randn(32, 16, 3, 3) * torch.linspace(0.01, 3, 32)[:, None, None, None],
             "norm.weight": torch.randn(64), "tiny.weight": torch.randn(4, 4), "ids": torch.arange(10)}
    q = quantize_int8(state)
    assert q["conv.weight"].dtype == torch.int8 and q["conv.weight" + QSCALE_SUFFIX].shape == (32, 1, 1, 1)
    assert q["norm.weight"] is state["norm.weight"] and q["tiny.weight"] is state["tiny.weight"]  # left in float
    files = save_safetensors(state, tmp_path / "m.safetensors", int8=True, max_shard_bytes=3000)  # several shards
    assert len(files) > 2
    back = load_safetensors(files[-1])
    assert set(back) == set(state) and back["ids"].dtype == torch.int64
    w, r = state["conv.weight"], back["conv.weight"].float()
    step = w.abs().amax(dim=(1, 2, 3), keepdim=True) / 127
    assert bool(((w - r).abs() <= step / 2 * (1 + 1e-4)).all())
    assert float((w - r).abs().max()) > 0  # it is lossy: the test would notice a no-op


def test_int8_scale_without_weight_is_a_clear_error(tmp_path):
    save_safetensors({"a" + QSCALE_SUFFIX: torch.ones(2, 1)}, tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError, match="without its int8 weight"):
        load_safetensors(tmp_path / "bad.safetensors")


def test_unet_int8_output_stays_close_and_file_is_smaller(tiny_pipeline, tmp_path):
    unet = tiny_pipeline.unet
    unet.save(tmp_path / "fp16", dtype=torch.float16)
    unet.save(tmp_path / "int8", dtype=torch.float16, int8=True)
    size = {k: sum(f.stat().st_size for f in (tmp_path / k).glob("*.safetensors")) for k in ("fp16", "int8")}
    assert size["int8"] < 0.7 * size["fp16"]
    z, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 32)
    a, b = (UNet.load(tmp_path / k)(z, t, c) for k in ("fp16", "int8"))
    rel = float((a - b).norm() / a.norm())
    assert 0 < rel < 0.05


def test_corrupt_int8_files_are_clear_errors(tmp_path):
    from snapfusion.weights import load_into

    save_safetensors({"w": torch.ones(4, 3, dtype=torch.int8), "w" + QSCALE_SUFFIX: torch.ones(1, 4)},
                     tmp_path / "shape.safetensors")
    with pytest.raises(WeightsError, match="expected a float tensor of shape"):  # would broadcast to (4, 4, 3)
        load_safetensors(tmp_path / "shape.safetensors")
    module = torch.nn.Linear(3, 4, bias=False)
    with pytest.raises(WeightsError, match="int8 without its scale"):
        load_into(module, {"weight": torch.ones(4, 3, dtype=torch.int8)})
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../elsewhere.safetensors"}}))
    with pytest.raises(WeightsError, match="not a file name"):
        load_safetensors(tmp_path / "m.safetensors.index.json")
