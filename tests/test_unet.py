"""UNet config, skip plan, presets, block skipping, introspection, evolution edits, save/load (tiny, CPU)."""

import dataclasses

import pytest
import torch

from snapfusion.config import from_dict, to_dict
from snapfusion.errors import ConfigError, WeightsError
from snapfusion.models.unet import (
    StageConfig, UNet, UNetConfig, block_names, copy_block, inherit_weights, num_parameters, plan_blocks,
    remove_block, sd15, snapfusion, tiny_sd15, tiny_snapfusion,
)


def _meta_params(cfg: UNetConfig) -> int:
    with torch.device("meta"):
        return num_parameters(UNet(cfg))


def _inputs(cfg: UNetConfig, batch: int = 2, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    ctx = torch.randn(batch, 5, cfg.context_dim, generator=g)
    return z, torch.tensor([17.0, 803.0])[:batch], ctx


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return UNet(tiny_sd15()).eval()


def _counts(stage: StageConfig | None) -> tuple[int, int]:
    """(CA, RN) of a stage."""
    blocks = stage.blocks if stage else ()
    return sum(b.startswith("attn.") for b in blocks), sum(b.startswith("res.") for b in blocks)


def test_sd15_parameter_count_is_exact():
    assert _meta_params(sd15()) == 859_520_964


def test_snapfusion_preset_matches_table3():
    cfg = snapfusion()
    assert [_counts(s) for s in cfg.down[:3]] == [(0, 2), (2, 2), (2, 1)]
    assert [_counts(s) for s in cfg.up[1:]] == [(6, 2), (3, 3), (0, 3)]
    low = [_counts(cfg.down[3]), _counts(cfg.mid), _counts(cfg.up[0])]  # every 8x8 block
    assert (sum(a for a, _ in low), sum(r for _, r in low)) == (1, 4)
    assert _meta_params(cfg) == 759_327_364  # our measured count (the paper prints 848M)


def test_sd15_skip_plan_reproduces_sd_channels():
    plans = plan_blocks(sd15())
    assert sum(p.push_after for p in plans.values()) == 8 and sum(p.pop_skip for p in plans.values()) == 12
    # diffusers UNet2DConditionModel SD-v1.5 resnet input widths
    expected = {"up.0.res.0": 2560, "up.0.res.2": 2560, "up.1.res.2": 1920, "up.2.res.0": 1920,
                "up.2.res.2": 960, "up.3.res.0": 960, "up.3.res.2": 640, "down.1.res.0": 320, "mid.res.0": 1280}
    assert {k: plans[k].in_channels for k in expected} == expected
    assert len(block_names(sd15())) == 16 + 3 + 19


def test_config_json_round_trip_and_strictness():
    cfg = tiny_snapfusion()
    assert from_dict(UNetConfig, to_dict(cfg)) == cfg
    bad = to_dict(cfg) | {"heads": 3}
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(UNetConfig, bad)


@pytest.mark.parametrize("edit, message", [
    (lambda c: dataclasses.replace(c, up=(dataclasses.replace(c.up[0], blocks=("res.0", "res.1")),) + c.up[1:]),
     "up.0: has 2 res block"),
    (lambda c: dataclasses.replace(c, mid=StageConfig(64, ("res.0", "res.0"), False)), "duplicated"),
    (lambda c: dataclasses.replace(c, mid=StageConfig(64, ("resnet.0",), False)), "malformed block id"),
    (lambda c: dataclasses.replace(c, down=(dataclasses.replace(c.down[0], resample=False),) + c.down[1:]),
     "resolution level"),
    (lambda c: dataclasses.replace(c, up=c.up[:3]), "3 up stages for 4 down"),
    (lambda c: dataclasses.replace(c, norm_groups=5), "not divisible by norm_groups"),
])
def test_invalid_configs_raise_clear_errors(edit, message):
    with pytest.raises(ConfigError, match=message):
        edit(tiny_sd15())


def test_forward_shapes_scalar_t_and_empty_skip(tiny):
    z, t, ctx = _inputs(tiny.config)
    with torch.no_grad():
        out = tiny(z, t, ctx)
        assert out.shape == z.shape and torch.isfinite(out).all()
        assert torch.equal(tiny(z, t, ctx, skip=set()), out)
        same_t = tiny(z, torch.tensor([17.0, 17.0]), ctx)
        assert torch.allclose(tiny(z, 17.0, ctx), same_t, atol=1e-6)


def test_per_sample_skip_mask_equals_separate_runs(tiny):
    z, t, ctx = _inputs(tiny.config)
    names = ["down.1.attn.0", "up.2.res.0", "mid.res.1", "down.0.res.1"]
    with torch.no_grad():
        full = tiny(z, t, ctx)
        skipped = tiny(z, t, ctx, skip=names)
        mask = torch.tensor([True, False])
        mixed = tiny(z, t, ctx, skip={n: mask for n in names})
    assert not torch.allclose(full, skipped, atol=1e-3)
    torch.testing.assert_close(mixed[0], skipped[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], full[1], atol=1e-5, rtol=0)


def test_skipped_blocks_are_not_computed_and_all_attn_skip_is_finite(tiny):
    z, t, ctx = _inputs(tiny.config)
    attn = [n for n, _ in tiny.named_blocks() if ".attn." in n]
    calls = []
    hooks = [m.register_forward_hook(lambda *a, n=n: calls.append(n)) for n, m in tiny.named_blocks()]
    with torch.no_grad():
        out = tiny(z, t, ctx, skip=attn)
    for h in hooks:
        h.remove()
    assert not set(calls) & set(attn) and len(calls) == len(tiny.named_blocks()) - len(attn)
    assert torch.isfinite(out).all() and not torch.allclose(out, tiny(z, t, ctx).detach(), atol=1e-3)
    with pytest.raises(ConfigError, match="no block named 'down.9.res.0'"):
        tiny(z, t, ctx, skip=["down.9.res.0"])
    with pytest.raises(ConfigError, match="bool tensor"):
        tiny(z, t, ctx, skip={"mid.attn.0": torch.tensor([1, 0])})


def test_named_blocks_and_captured_inputs_rerun_alone(tiny):
    z, t, ctx = _inputs(tiny.config)
    blocks = tiny.named_blocks()
    assert [n for n, _ in blocks] == list(block_names(tiny.config))
    assert all(tiny.get_submodule(n) is m for n, m in blocks)
    captured = tiny.capture_block_inputs(z, t, ctx)
    assert list(captured) == [n for n, _ in blocks]
    torch.testing.assert_close(captured["down.0.res.0"][0], tiny.conv_in(z).detach())
    with torch.no_grad():  # the output of down.1.res.0 is the input of the attn block that follows it
        out = tiny.get_submodule("down.1.res.0")(*captured["down.1.res.0"])
    torch.testing.assert_close(out, captured["down.1.attn.0"][0])
    assert captured["up.1.res.0"][0].shape[1] == plan_blocks(tiny.config)["up.1.res.0"].in_channels


def test_copy_and_remove_keep_names_and_inherit_weights(tiny):
    cfg = tiny.config
    cfg2, new = copy_block(cfg, "up.1.attn.0")
    assert new == "up.1.attn.3" and cfg2.up[1].blocks[:3] == ("res.0", "attn.0", "attn.3")
    cfg3 = remove_block(cfg2, "down.1.attn.0")
    assert set(block_names(cfg3)) == set(block_names(cfg)) - {"down.1.attn.0"} | {"up.1.attn.3"}
    child = UNet(cfg3)
    assert inherit_weights(child, tiny.state_dict(), sources={new: "up.1.attn.0"}) == []
    src, dst = tiny.get_submodule("up.1.attn.0"), child.get_submodule(new)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    with pytest.raises(ConfigError, match="up.2: has 3 res block"):  # a down res adds a skip up.2 cannot take
        copy_block(cfg, "down.1.res.0")
    cfg4, new_res = copy_block(cfg, "up.3.res.2")  # source concatenates a skip (64 -> 32), its copy runs 32 -> 32
    missing = inherit_weights(UNet(cfg4), tiny.state_dict(), sources={new_res: "up.3.res.2"})
    assert new_res == "up.3.res.3" and set(missing) == {f"up.3.res.3.{k}" for k in ("norm1.weight", "norm1.bias",
                                                                                    "conv1.weight")}
    with pytest.raises(ConfigError, match="no block named"):
        remove_block(cfg, "up.0.attn.0")
    with pytest.raises(ConfigError, match="up.0: has 2 res block"):
        remove_block(cfg, "up.0.res.1")


def test_inherit_reports_shape_mismatches(tiny):
    cfg = remove_block(tiny.config, "down.3.res.1")  # up.0 now takes 2 skips: up.0.res.2 has no concat
    child = UNet(cfg)
    missing = inherit_weights(child, tiny.state_dict())
    assert set(missing) == {"up.0.res.2.norm1.weight", "up.0.res.2.norm1.bias", "up.0.res.2.conv1.weight"}


def test_save_load_round_trip(tiny, tmp_path):
    z, t, ctx = _inputs(tiny.config)
    tiny.save(tmp_path / "u")
    loaded = UNet.load(tmp_path / "u")
    assert loaded.config == tiny.config
    with torch.no_grad():
        assert torch.equal(loaded(z, t, ctx), tiny(z, t, ctx))
    half = UNet.load(tmp_path / "u", dtype=torch.bfloat16)
    assert half.conv_in.weight.dtype == torch.bfloat16
    other = UNet(tiny_snapfusion())
    other.save(tmp_path / "s")
    (tmp_path / "s" / "config.json").write_text((tmp_path / "u" / "config.json").read_text())
    with pytest.raises(WeightsError, match="missing key|unexpected key|shape mismatch"):
        UNet.load(tmp_path / "s")


def test_sd15_diffusers_config_json_gives_sd15():
    from snapfusion.convert.unet_keys import diffusers_config_from_ours, unet_config_from_diffusers

    hub_config = {  # runwayml/stable-diffusion-v1-5 unet/config.json, verbatim keys and values
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
        "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
        "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    }
    assert unet_config_from_diffusers(hub_config) == sd15()
    assert unet_config_from_diffusers(diffusers_config_from_ours(sd15())) == sd15()


def test_guidance_embedding_is_optional_and_changes_the_output(tmp_path):
    import dataclasses

    cfg = dataclasses.replace(tiny_snapfusion(), guidance_embed=True)
    torch.manual_seed(0)
    model = UNet(cfg).eval()
    plain = UNet(tiny_snapfusion())
    assert not any(k.startswith("guidance_embedding.") for k in plain.state_dict())
    assert any(k.startswith("guidance_embedding.") for k in model.state_dict())
    z, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 77, 32)
    with torch.no_grad():
        a = model(z, t, ctx, guidance=7.5)
        b = model(z, t, ctx, guidance=torch.tensor([7.5, 7.5]))
        c = model(z, t, ctx, guidance=2.0)
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-4
    with pytest.raises(ConfigError, match="guidance"):
        model(z, t, ctx)
    with pytest.raises(ConfigError, match="guidance"):
        plain(z, t, ctx, guidance=7.5)
    model.save(tmp_path / "u")
    loaded = UNet.load(tmp_path / "u")
    assert loaded.config.guidance_embed
    with torch.no_grad():
        torch.testing.assert_close(loaded(z, t, ctx, guidance=7.5), a)
