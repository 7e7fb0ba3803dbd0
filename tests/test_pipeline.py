"""Prompt -> pixels on a tiny random pipeline: determinism, per-image seeds, save/load, bad input."""

import pytest
import torch

from snapfusion.errors import SnapFusionError, WeightsError
from snapfusion.pipeline import Pipeline, Timings, image_grid, to_pil


def test_generate_shape_range_and_determinism(tiny_pipeline):
    a = tiny_pipeline.generate(["a red circle", "two cats"], [1, 2])
    b = tiny_pipeline.generate(["a red circle", "two cats"], [1, 2])
    assert a.shape == (2, 3, 64, 64)
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])


def test_image_depends_only_on_its_prompt_and_seed(tiny_pipeline):
    """STYLE habit 7: batch size and position in the batch do not change an image."""
    batch = tiny_pipeline.generate(["a dog", "a blue star", "a cat"], [5, 6, 7])
    alone = tiny_pipeline.generate(["a blue star"], [6])
    torch.testing.assert_close(batch[1], alone[0], atol=1e-5, rtol=0)


def test_guidance_and_sampler_change_the_image(tiny_pipeline):
    base = tiny_pipeline.generate(["a dog"], [0], guidance=1.0)
    guided = tiny_pipeline.generate(["a dog"], [0], guidance=5.0)
    dpm = tiny_pipeline.generate(["a dog"], [0], guidance=1.0, sampler="dpmpp_2m")
    assert (base - guided).abs().max() > 1e-4
    assert (base - dpm).abs().max() > 1e-4


def test_timings_are_filled(tiny_pipeline):
    t = Timings()
    tiny_pipeline.generate(["x"], [0], steps=3, timings=t)
    d = t.as_dict()
    assert d["unet_steps"] == 3 and d["total"] >= d["unet_total"] > 0 and d["unet_per_step"] > 0


def test_save_load_round_trip(tiny_pipeline, tmp_path):
    tiny_pipeline.save(tmp_path / "p", dtype=None)
    loaded = Pipeline.load(tmp_path / "p")
    assert loaded.config == tiny_pipeline.config
    a = tiny_pipeline.generate(["a green heart"], [3])
    b = loaded.generate(["a green heart"], [3])
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, message", [
    ({"height": 60}, "multiple of"),
    ({"width": 0}, "multiple of"),
    ({"guidance": float("nan")}, "guidance"),
    ({"steps": 0}, "steps"),
    ({"sampler": "euler"}, "sampler"),
])
def test_bad_settings_are_one_line_errors(tiny_pipeline, kwargs, message):
    with pytest.raises(SnapFusionError, match=message):
        tiny_pipeline.generate(["a cat"], [0], **kwargs)


def test_bad_prompts(tiny_pipeline):
    with pytest.raises(SnapFusionError, match="prompt must be text"):
        tiny_pipeline.generate([None], [0])
    with pytest.raises(SnapFusionError, match="limit"):
        tiny_pipeline.generate(["x" * 30_000], [0])
    with pytest.raises(SnapFusionError, match="seeds"):
        tiny_pipeline.generate(["a", "b"], [0])


def test_missing_and_corrupt_folders(tiny_pipeline, tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        Pipeline.load(tmp_path / "nope")
    tiny_pipeline.save(tmp_path / "p")
    weights = tmp_path / "p" / "unet" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(WeightsError, match="truncated|corrupt"):
        Pipeline.load(tmp_path / "p")


def test_grid_and_pil():
    pics = to_pil(torch.rand(3, 3, 8, 8))
    assert pics[0].size == (8, 8)
    assert image_grid(pics).size == (16, 16)


def test_cpu_decode_in_channels_last_matches_the_default_layout(tiny_pipeline):
    torch.manual_seed(3)
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        reference = ((tiny_pipeline.decoder.images_from_latents(latents.contiguous()) + 1) / 2).clamp(0, 1)
    images = tiny_pipeline.decode(latents)
    assert images.shape == reference.shape
    torch.testing.assert_close(images, reference, atol=1e-4, rtol=0)
