"""Parity with diffusers' UNet2DConditionModel on the same random weights, and the key converters (CPU, fp32)."""

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402

from snapfusion.convert.unet_keys import (  # noqa: E402
    diffusers_config_from_ours, diffusers_to_ours, ldm_to_ours, ours_to_diffusers, ours_to_ldm,
    unet_config_from_diffusers, unet_from_diffusers_folder,
)
from snapfusion.errors import ConfigError, WeightsError  # noqa: E402
from snapfusion.models.unet import UNet, sd15, tiny_snapfusion  # noqa: E402

SMALL_SD15 = sd15((32, 64, 128, 128), context_dim=64, heads=8, norm_groups=32)
# SD-v2 style: linear proj_in/out, one head width (16) instead of one head count, 2 transformer layers
SMALL_SD2 = {"block_out_channels": [32, 64, 64, 64], "attention_head_dim": [2, 4, 4, 4], "cross_attention_dim": 32,
             "use_linear_projection": True, "norm_num_groups": 16, "layers_per_block": 1,
             "transformer_layers_per_block": 2, "upcast_attention": True, "sample_size": 32}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Perturb every parameter so that zero-initialised layers cannot hide a wrong mapping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _inputs(cfg, size=16):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, cfg.in_channels, size, size, generator=g)
    return z, torch.tensor([5.0, 901.0]), torch.randn(2, 7, cfg.context_dim, generator=g)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ref = UNet2DConditionModel.from_config(diffusers_config_from_ours(SMALL_SD15)).eval()
    _randomize(ref, 0)
    ours = UNet(SMALL_SD15).eval()
    ours.load_state_dict(diffusers_to_ours(ref.state_dict(), SMALL_SD15), strict=True)
    return ours, ref


def test_forward_matches_diffusers(pair):
    ours, ref = pair
    z, t, ctx = _inputs(SMALL_SD15)
    with torch.no_grad():
        a, b = ours(z, t, ctx), ref(z, t, ctx).sample
    assert a.abs().max() > 0.1
    assert (a - b).abs().max().item() <= 1e-4


def test_config_round_trips_through_diffusers(pair):
    _, ref = pair
    assert unet_config_from_diffusers(dict(ref.config)) == SMALL_SD15


def test_save_convert_load_into_diffusers_and_back(pair, tmp_path):
    ours, ref = pair
    z, t, ctx = _inputs(SMALL_SD15)
    ours.save(tmp_path / "ours")
    reloaded = UNet.load(tmp_path / "ours")
    fresh = UNet2DConditionModel.from_config(diffusers_config_from_ours(reloaded.config)).eval()
    fresh.load_state_dict(ours_to_diffusers(reloaded.state_dict(), reloaded.config), strict=True)
    fresh.save_pretrained(tmp_path / "dif", safe_serialization=True)
    back = unet_from_diffusers_folder(tmp_path / "dif")
    with torch.no_grad():
        a = ours(z, t, ctx)
        torch.testing.assert_close(fresh(z, t, ctx).sample, a, atol=1e-4, rtol=0)
        assert torch.equal(back(z, t, ctx), a)


def test_ldm_keys_agree_with_diffusers_converter(pair):
    ours, _ = pair
    state = ours.state_dict()
    ldm = ours_to_ldm(state, SMALL_SD15) | {"first_stage_model.decoder.conv_in.weight": torch.zeros(1)}
    theirs = convert_ldm_unet_checkpoint(ldm, diffusers_config_from_ours(SMALL_SD15))
    mine = ours_to_diffusers(state, SMALL_SD15)
    assert sorted(theirs) == sorted(mine)
    assert all(torch.equal(theirs[k], mine[k]) for k in mine)
    back = ldm_to_ours(ldm, SMALL_SD15)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_sd2_style_config_matches_diffusers():
    torch.manual_seed(0)
    ref = UNet2DConditionModel.from_config(SMALL_SD2).eval()
    _randomize(ref, 1)
    cfg = unet_config_from_diffusers(SMALL_SD2, prediction_type="v_prediction")
    assert cfg.attention_head_dim == 16 and cfg.linear_projection and cfg.transformer_depth == 2
    ours = UNet(cfg).eval()
    ours.load_state_dict(diffusers_to_ours(ref.state_dict(), cfg), strict=True)
    z, t, ctx = _inputs(cfg, size=8)
    with torch.no_grad():
        assert (ours(z, t, ctx) - ref(z, t, ctx).sample).abs().max().item() <= 1e-4


def test_converters_reject_what_they_cannot_represent(pair):
    ours, _ = pair
    with pytest.raises(ConfigError, match="down.2: blocks .* do not follow the SD pattern"):
        diffusers_config_from_ours(tiny_snapfusion())
    with pytest.raises(ConfigError, match="class_embed_type='timestep'"):
        unet_config_from_diffusers({"class_embed_type": "timestep"})
    with pytest.raises(ConfigError, match="block type 'AttnDownBlock2D'"):
        unet_config_from_diffusers({"down_block_types": ["AttnDownBlock2D"] * 4})
    with pytest.raises(ConfigError, match="unsupported key 'foo'"):
        unet_config_from_diffusers({"foo": 1})
    state = ours_to_diffusers(ours.state_dict(), SMALL_SD15)
    with pytest.raises(WeightsError, match="shape mismatch for 'conv_in.weight'"):
        diffusers_to_ours(state | {"conv_in.weight": state["conv_in.weight"][:, :3]}, SMALL_SD15)
    del state["mid_block.attentions.0.proj_in.bias"]
    with pytest.raises(WeightsError, match="missing key 'mid_block.attentions.0.proj_in.bias'"):
        diffusers_to_ours(state, SMALL_SD15)
    with pytest.raises(WeightsError, match="no key starts with"):
        ldm_to_ours({"conv_in.weight": torch.zeros(1)}, SMALL_SD15)
