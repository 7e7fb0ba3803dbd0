"""SD-v1.x from local files end to end: a diffusers folder written by diffusers itself, and a single-file checkpoint.

Tiny random models with SD-v1.5's structure stand in for the real weights (which cannot be downloaded here).
"""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from snapfusion.convert.text_keys import text_to_ldm
from snapfusion.convert.unet_keys import diffusers_config_from_ours, ours_to_ldm
from snapfusion.convert.vae_keys import config_to_diffusers, vae_to_ldm
from snapfusion.errors import WeightsError
from snapfusion.models.autoencoder import AutoencoderConfig
from snapfusion.models.unet_config import tiny_sd15
from snapfusion.sd15 import load_sd, load_single_file_sd

from conftest import TINY_TEXT

diffusers = pytest.importorskip("diffusers")
UNET_CFG = dataclasses.replace(tiny_sd15(), context_dim=32)


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    """A Stable Diffusion folder as diffusers and transformers write it (safetensors)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("sd") / "tiny-sd"
    torch.manual_seed(0)
    unet_cfg = {k: v for k, v in diffusers_config_from_ours(UNET_CFG).items() if k != "_class_name"}
    diffusers.UNet2DConditionModel(**unet_cfg).save_pretrained(root / "unet")
    vae_cfg = {k: v for k, v in config_to_diffusers(AutoencoderConfig.tiny()).items() if k != "_class_name"}
    diffusers.AutoencoderKL(**vae_cfg).save_pretrained(root / "vae")
    text_cfg = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=77, projection_dim=32)
    CLIPTextModel(text_cfg).save_pretrained(root / "text_encoder")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "epsilon"}))
    return root


def test_diffusers_folder_matches_diffusers_unet(diffusers_folder):
    pipe = load_sd(diffusers_folder)
    ref = diffusers.UNet2DConditionModel.from_pretrained(diffusers_folder / "unet").eval()
    z, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 77, 32)
    with torch.no_grad():
        ours = pipe.unet(z, t, ctx)
        theirs = ref(z, t, encoder_hidden_states=ctx).sample
    assert (ours - theirs).abs().max() < 1e-4
    ref_vae = diffusers.AutoencoderKL.from_pretrained(diffusers_folder / "vae").eval()
    lat = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert (pipe.decoder(lat) - ref_vae.decode(lat).sample).abs().max() < 1e-4
    images = pipe.generate(["a cat"], [0], steps=2, height=64, width=64)
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


def test_single_file_checkpoint_gives_the_same_model(diffusers_folder, tmp_path):
    pipe = load_sd(diffusers_folder)
    vae_state = {**{f"encoder.{k}": v for k, v in pipe.encoder.state_dict().items()},
                 **{f"decoder.{k}": v for k, v in pipe.decoder.state_dict().items()}}
    state = {**ours_to_ldm(pipe.unet.state_dict(), UNET_CFG), **vae_to_ldm(vae_state),
             **text_to_ldm(pipe.text_encoder.state_dict())}
    path = tmp_path / "tiny-sd.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    single = load_single_file_sd(path, unet_config=UNET_CFG, vae_config=AutoencoderConfig.tiny(), text_config=TINY_TEXT)
    a = pipe.generate(["two dogs"], [4], steps=2, height=64, width=64)
    b = single.generate(["two dogs"], [4], steps=2, height=64, width=64)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_missing_paths_fail_fast(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_sd(tmp_path / "nothing-here")
    with pytest.raises(WeightsError, match="not a diffusers"):
        load_sd(tmp_path)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not a pickle we would ever open")
    with pytest.raises(WeightsError, match="no pickle"):
        load_sd(ckpt)


def test_sd15_missing_key_is_named(diffusers_folder, tmp_path):
    import shutil

    from safetensors.torch import load_file

    broken = tmp_path / "broken"
    shutil.copytree(diffusers_folder, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state.pop("conv_in.weight")
    save_file(state, str(weights))
    with pytest.raises(WeightsError, match="conv_in.weight"):
        load_sd(broken)
