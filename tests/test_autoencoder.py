"""Autoencoder: parity with diffusers AutoencoderKL, key conversion (diffusers, LDM), save/load, latent scaling."""

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from snapfusion.convert.vae_keys import (config_from_diffusers, config_to_diffusers, load_diffusers_vae,
                                         load_ldm_vae, vae_from_diffusers, vae_from_ldm, vae_to_diffusers, vae_to_ldm)
from snapfusion.errors import ConfigError, WeightsError
from snapfusion.models.autoencoder import (AutoencoderConfig, AutoencoderKL, Decoder, Encoder, load_autoencoder,
                                           parameter_count, save_autoencoder)
from snapfusion.weights import save_safetensors

diffusers = pytest.importorskip("diffusers")

# runwayml/stable-diffusion-v1-5 vae/config.json (no scaling_factor key: diffusers' default 0.18215 applies)
SD15_VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3,
    "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def _random_vae(cfg: AutoencoderConfig, seed: int = 0) -> AutoencoderKL:
    """Tiny VAE with every parameter perturbed (norm scales and biases too, so a swapped norm would show)."""
    torch.manual_seed(seed)
    model = AutoencoderKL(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _diffusers_vae(cfg: AutoencoderConfig, state=None):
    kwargs = {k: v for k, v in config_to_diffusers(cfg).items() if not k.startswith("_")}
    model = diffusers.AutoencoderKL(**kwargs).eval()
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model


@pytest.mark.parametrize("mid_attention", [True, False])
def test_parity_with_diffusers(mid_attention):
    cfg = dataclasses.replace(AutoencoderConfig.tiny(), mid_attention=mid_attention)
    ours = _random_vae(cfg)
    theirs = _diffusers_vae(cfg, vae_to_diffusers(ours.state_dict()))
    images, raw = torch.randn(2, 3, 32, 32), torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        post, ref = ours.encode(images), theirs.encode(images).latent_dist
        assert (post.mean - ref.mean).abs().max() <= 1e-4
        assert (post.logvar - ref.logvar).abs().max() <= 1e-4
        out, ref_out = ours.decode(raw), theirs.decode(raw).sample
        assert out.shape == (2, 3, 32, 32)
        assert (out - ref_out).abs().max() <= 1e-4
        assert out.abs().max() > 1e-2  # not a trivially zero output
    back = vae_from_diffusers(theirs.state_dict())
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


def test_ldm_keys_match_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = AutoencoderConfig.tiny()
    ours = _random_vae(cfg, seed=1)
    ldm = vae_to_ldm(ours.state_dict())
    assert torch.equal(ldm["first_stage_model.decoder.up.3.block.0.norm1.weight"],  # LDM numbers levels by size
                       ours.state_dict()["decoder.up.0.res.0.norm1.weight"])
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)  # LDM: 1x1 conv
    # independent reference: diffusers' own LDM converter, loaded strictly into diffusers' AutoencoderKL
    theirs = _diffusers_vae(cfg, convert_ldm_vae_checkpoint(ldm, config_to_diffusers(cfg)))
    raw = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert (theirs.decode(raw).sample - ours.decode(raw)).abs().max() <= 1e-4
    mixed = {**ldm, "model.diffusion_model.conv_in.weight": torch.zeros(1)}  # other parts of a single file
    back = vae_from_ldm(mixed)
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


def test_ldm_known_names_and_errors(tmp_path):
    cfg = AutoencoderConfig.tiny()
    ldm = vae_to_ldm(_random_vae(cfg).state_dict())
    back = vae_from_ldm(ldm)
    assert "decoder.up.0.upsample.conv.weight" in back and "decoder.up.3.upsample.conv.weight" not in back
    assert back["decoder.mid.attn.0.to_out.0.weight"].shape == (32, 32)
    assert torch.equal(back["encoder.down.1.res.0.conv_shortcut.weight"],
                       ldm["first_stage_model.encoder.down.1.block.0.nin_shortcut.weight"])
    save_safetensors(ldm, tmp_path / "sd.safetensors", max_shard_bytes=None)
    loaded = load_ldm_vae(tmp_path / "sd.safetensors", cfg)
    assert torch.equal(loaded.decoder.conv_out.weight, back["decoder.conv_out.weight"])
    with pytest.raises(WeightsError, match="first_stage_model.encoder.mid.attn_2"):
        vae_from_ldm({**ldm, "first_stage_model.encoder.mid.attn_2.q.weight": torch.zeros(1)}, source="x")
    with pytest.raises(WeightsError, match="decoder.upsamplers"):
        vae_from_diffusers({"decoder.upsamplers.0.conv.weight": torch.zeros(1)})


def test_config_from_and_to_diffusers(tmp_path):
    cfg = config_from_diffusers(SD15_VAE_CONFIG)
    assert cfg == AutoencoderConfig.sd15()
    assert config_from_diffusers(config_to_diffusers(cfg)) == cfg
    with pytest.raises(ConfigError, match="encoder_widths == decoder_widths"):
        config_to_diffusers(cfg.with_halved_decoder())
    with pytest.raises(ConfigError, match="latents_mean"):
        config_from_diffusers({**SD15_VAE_CONFIG, "latents_mean": [0.0] * 4})
    # a folder written by diffusers itself loads as ours with identical outputs
    tiny = AutoencoderConfig.tiny()
    theirs = _diffusers_vae(tiny, vae_to_diffusers(_random_vae(tiny, seed=2).state_dict()))
    theirs.save_pretrained(tmp_path / "vae")
    ours = load_diffusers_vae(tmp_path / "vae").eval()
    raw = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert (ours.decode(raw) - theirs.decode(raw).sample).abs().max() <= 1e-4


def test_save_load_round_trip(tmp_path):
    cfg = AutoencoderConfig.tiny().with_halved_decoder()  # decoder widths (4, 8, 16, 16)
    vae = _random_vae(cfg, seed=3)
    save_autoencoder(tmp_path / "vae", vae)
    save_autoencoder(tmp_path / "dec", vae.decoder)
    save_autoencoder(tmp_path / "enc", vae.encoder)
    raw, images = torch.randn(1, 4, 4, 4), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_autoencoder(tmp_path / "vae").decode(raw), vae.decode(raw))
        assert torch.equal(load_autoencoder(tmp_path / "dec", Decoder).eval()(raw), vae.decoder(raw))
        assert torch.equal(load_autoencoder(tmp_path / "enc", Encoder).eval()(images), vae.encoder(images))
    with pytest.raises(WeightsError, match="vae-encoder"):
        load_autoencoder(tmp_path / "dec", Encoder)
    with pytest.raises(WeightsError, match="nowhere"):
        load_autoencoder(tmp_path / "nowhere")
    (tmp_path / "dec" / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="model.safetensors"):
        load_autoencoder(tmp_path / "dec", Decoder)


def test_latent_scaling_helpers():
    cfg = dataclasses.replace(AutoencoderConfig.tiny(), scaling_factor=0.5)
    vae = _random_vae(cfg, seed=4)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        post = vae.encode(images)
        assert torch.equal(vae.latents_from_images(images, sample=False), post.mean * 0.5)
        draw1 = vae.latents_from_images(images, torch.Generator().manual_seed(7))
        draw2 = vae.latents_from_images(images, torch.Generator().manual_seed(7))
        assert torch.equal(draw1, draw2) and not torch.equal(draw1, post.mean * 0.5)
        latents = torch.randn(2, 4, 4, 4)
        assert torch.allclose(vae.images_from_latents(latents), vae.decode(latents / 0.5))
        assert post.kl().shape == (2,) and (post.kl() >= 0).all()
        point = _random_vae(dataclasses.replace(cfg, double_z=False), seed=5)  # deterministic encoder
        assert point.encoder.conv_out.out_channels == 4
        assert torch.equal(point.latents_from_images(images), point.encode(images).mean * 0.5)


def test_sd15_parameter_counts():
    with torch.device("meta"):
        vae = AutoencoderKL(AutoencoderConfig.sd15())
        halved = Decoder(AutoencoderConfig.sd15().with_halved_decoder())
    assert parameter_count(vae.decoder) == 49_490_199  # SD's decoder incl. post_quant_conv: ~49.5M
    assert parameter_count(vae.encoder) == 34_163_664
    assert parameter_count(halved) == 12_387_479  # SnapFusion §3.2: "13M"
    with pytest.raises(ConfigError, match="norm_groups"):
        AutoencoderConfig(decoder_widths=(48, 96, 100, 100))


@pytest.mark.slow
def test_parity_with_diffusers_sd15_size():
    cfg = AutoencoderConfig.sd15()
    ours = _random_vae(cfg, seed=6)
    theirs = _diffusers_vae(cfg, vae_to_diffusers(ours.state_dict()))
    images, raw = torch.rand(1, 3, 64, 64) * 2 - 1, torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert (ours.encode(images).mean - theirs.encode(images).latent_dist.mean).abs().max() <= 1e-4
        assert (ours.decode(raw) - theirs.decode(raw).sample).abs().max() <= 1e-4
