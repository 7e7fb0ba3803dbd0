"""``snapfusion export --format diffusers`` and ``--format single-file``, loaded back by diffusers' own classes.

Tiny random pipelines stand in for the shipped ones: an SD-shaped one (a plain StableDiffusionPipeline folder) and a
SnapFusion-shaped one (efficient UNet, narrower decoder, compact vocabulary, layout prior: custom code). Given the
same starting noise (seed), diffusers' image must match ours (PSNR >= 35 dB; it is ~130 dB in fp32).
"""

import dataclasses
import json

import pytest
import torch

from snapfusion.convert.text_keys import text_from_ldm, text_to_ldm
from snapfusion.convert.unet_keys import (custom_to_ours, diffusers_to_ours, ldm_to_ours, ours_to_custom,
                                         ours_to_diffusers, ours_to_ldm)
from snapfusion.convert.vae_keys import vae_from_diffusers, vae_from_ldm, vae_to_diffusers, vae_to_ldm
from snapfusion.errors import ConfigError
from snapfusion.export.diffusers_export import export_diffusers, full_vocabulary
from snapfusion.export.single_file import export_single_file
from snapfusion.models.autoencoder import AutoencoderConfig, AutoencoderKL, Decoder
from snapfusion.models.text import TextEncoder, compact_vocabulary
from snapfusion.models.unet import UNet
from snapfusion.models.unet_config import tiny_sd15, tiny_snapfusion
from snapfusion.pipeline import Pipeline, PipelineConfig
from snapfusion.prior import LayoutPrior, LayoutPriorConfig
from snapfusion.sd15 import load_sd

from conftest import TINY_TEXT

diffusers = pytest.importorskip("diffusers")
PROMPT, SEED, STEPS, GUIDANCE = "a red apple left of a blue cat", 3, 4, 3.0


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a.float() - b.float()) ** 2).mean().clamp_min(1e-20)))


def _perturb(*modules):
    with torch.no_grad():  # random init leaves some layers at zero: make every weight matter
        for m in modules:
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)


def _pipeline(kind: str) -> Pipeline:
    torch.manual_seed(0)
    text = TextEncoder(TINY_TEXT)
    vae = AutoencoderKL(AutoencoderConfig.tiny())
    prior = LayoutPrior(LayoutPriorConfig(context_dim=32))
    if kind == "sd":
        unet = UNet(dataclasses.replace(tiny_sd15(), context_dim=32))
        decoder, spacing = vae.decoder, "leading"
    else:  # SnapFusion's shape: efficient UNet, a decoder of half the width, a compact vocabulary
        text = compact_vocabulary(text, range(300, 2000))
        unet = UNet(dataclasses.replace(tiny_snapfusion(), context_dim=32))
        decoder = Decoder(dataclasses.replace(AutoencoderConfig.tiny(), decoder_widths=(4, 8, 16, 16)))
        spacing = "trailing"
    _perturb(unet, decoder, prior)
    config = PipelineConfig(name=kind, resolution=64, steps=STEPS, guidance=GUIDANCE, timestep_spacing=spacing)
    return Pipeline(text, unet, decoder, config, encoder=vae.encoder, prior=prior).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = {}
    for kind in ("sd", "snap"):
        pipe = _pipeline(kind)
        folder = tmp_path_factory.mktemp(kind) / "export"
        out[kind] = (pipe, folder, export_diffusers(pipe, folder))
    return out


def _theirs(pipe, **kw) -> torch.Tensor:
    kw.setdefault("guidance_scale", GUIDANCE)
    return pipe(PROMPT, num_inference_steps=STEPS, height=64, width=64,
                generator=torch.Generator("cpu").manual_seed(SEED), output_type="pt", **kw).images


def test_sd_shaped_export_is_a_plain_stable_diffusion_folder(exported):
    pipe, folder, report = exported["sd"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and report.custom == () and report.prior
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    assert type(theirs.scheduler).__name__ == "DDIMScheduler"
    ours = pipe.generate([PROMPT], [SEED], steps=STEPS, guidance=GUIDANCE, use_prior=False)
    assert _psnr(_theirs(theirs), ours) >= 35
    # the layout prior through the custom pipeline over the same folder
    code = str(folder / "snapfusion_diffusers.py")
    custom = diffusers.DiffusionPipeline.from_pretrained(folder, custom_pipeline=code, trust_remote_code=True)
    custom.set_progress_bar_config(disable=True)
    with_prior = pipe.generate([PROMPT], [SEED], steps=STEPS, guidance=GUIDANCE)
    assert _psnr(with_prior, ours) < 35  # the prior matters in this test
    assert _psnr(_theirs(custom), with_prior) >= 35
    assert _psnr(_theirs(custom, use_prior=False), ours) >= 35


def test_snapfusion_shaped_export_loads_as_custom_code(exported):
    pipe, folder, report = exported["snap"]
    assert set(report.custom) == {"unet", "vae"} and report.prior
    for part in ("unet", "vae", "layout_prior"):
        assert (folder / part / "snapfusion_diffusers.py").is_file()
    assert "import snapfusion" not in (folder / "snapfusion_diffusers.py").read_text()  # self-contained
    with pytest.raises(ValueError, match="trust_remote_code"):
        diffusers.DiffusionPipeline.from_pretrained(folder)
    theirs = diffusers.DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    theirs.set_progress_bar_config(disable=True)
    names = {k: type(getattr(theirs, k)).__name__ for k in ("unet", "vae", "layout_prior", "text_encoder")}
    assert names == {"unet": "SnapFusionUNet", "vae": "SnapFusionAutoencoder", "layout_prior": "LayoutPrior",
                     "text_encoder": "CLIPTextModel"}
    ours = pipe.generate([PROMPT], [SEED], steps=STEPS, guidance=GUIDANCE)
    assert _psnr(_theirs(theirs), ours) >= 35
    default = theirs(PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), output_type="pt").images
    assert default.shape == (1, 3, 64, 64) and _psnr(default, ours) >= 35  # the model's own defaults
    # the encoder, wider than the decoder, is exported too
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(theirs.vae.encode(x).latent_dist.mean, pipe.encoder.encode(x).mean, atol=1e-5)


def test_guidance_rescale_matches_diffusers_and_a_models_default_travels(exported, tmp_path):
    w = 9.0  # high guidance: where the rescale changes the most
    pipe, folder, _ = exported["sd"]
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder)  # its own guidance_rescale argument
    theirs.set_progress_bar_config(disable=True)
    ours = pipe.generate([PROMPT], [SEED], steps=STEPS, guidance=w, use_prior=False, guidance_rescale=0.7)
    effect = _psnr(ours, pipe.generate([PROMPT], [SEED], steps=STEPS, guidance=w, use_prior=False))
    assert _psnr(_theirs(theirs, guidance_rescale=0.7, guidance_scale=w), ours) >= max(35, effect + 20)
    snap = exported["snap"][0]  # a model whose stored default is 0.7: the custom pipeline's default too
    snap = Pipeline(snap.text_encoder, snap.unet, snap.decoder,
                    dataclasses.replace(snap.config, guidance=w, guidance_rescale=0.7), encoder=snap.encoder,
                    prior=snap.prior).eval()
    export_diffusers(snap, tmp_path / "snap")
    assert "guidance rescale 0.7" in (tmp_path / "snap" / "README.md").read_text()
    custom = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "snap", trust_remote_code=True)
    custom.set_progress_bar_config(disable=True)
    ours, plain = snap.generate([PROMPT], [SEED], steps=STEPS), snap.generate([PROMPT], [SEED], steps=STEPS,
                                                                             guidance_rescale=0.0)
    effect = _psnr(ours, plain)
    default = custom(PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), output_type="pt").images
    assert _psnr(default, ours) >= max(35, effect + 20)
    assert _psnr(_theirs(custom, guidance_rescale=0.0, guidance_scale=w), plain) >= max(35, effect + 20)


@pytest.mark.parametrize("kind", ["sd", "snap"])
def test_a_models_guidance_interval_travels_through_the_custom_pipeline(exported, tmp_path, kind):
    # an SD-shaped model with a stored interval is no plain StableDiffusionPipeline (it guides every step)
    src = exported[kind][0]
    pipe = Pipeline(src.text_encoder, src.unet, src.decoder,
                    dataclasses.replace(src.config, guidance=GUIDANCE, guidance_interval=(0.0, 0.5)),
                    encoder=src.encoder, prior=src.prior).eval()
    report = export_diffusers(pipe, tmp_path / kind)
    assert report.pipeline_class == "SnapFusionPipeline" and report.limited and "guidance interval" in report.summary()
    assert json.loads((tmp_path / kind / "model_index.json").read_text())["default_guidance_interval"] == [0.0, 0.5]
    assert "guidance interval 0-0.5" in (tmp_path / kind / "README.md").read_text()
    custom = diffusers.DiffusionPipeline.from_pretrained(tmp_path / kind, trust_remote_code=True)
    custom.set_progress_bar_config(disable=True)
    ours = pipe.generate([PROMPT], [SEED], steps=STEPS, height=64, width=64)
    full = pipe.generate([PROMPT], [SEED], steps=STEPS, height=64, width=64, guidance_interval=(0, 1))
    effect = _psnr(ours, full)
    assert _psnr(_theirs(custom), ours) >= max(35, effect + 20)  # the stored default
    assert _psnr(_theirs(custom, guidance_interval=(0, 1)), full) >= max(35, effect + 20)  # a call's value


def test_exported_tokenizer_matches_ours(exported):
    from transformers import CLIPTokenizer

    pipe, folder, _ = exported["snap"]
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    prompts = [PROMPT, "Two  CATS, above a yellow star!", "", "an émoji 🐱 and 3 dogs"]
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, pipe.tokenizer(prompts))


def test_full_vocabulary_is_exact():
    torch.manual_seed(0)
    text = compact_vocabulary(TextEncoder(TINY_TEXT), range(300, 400))
    full = full_vocabulary(text)
    ids = torch.tensor([[49406, 310, 350, 5000, 49407] + [49407] * 72])
    with torch.no_grad():
        assert torch.equal(full(ids), text(ids))
    assert full.config.vocab_rows == 0


def test_key_maps_are_exact_inverses():
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_snapfusion(), context_dim=32)
    state = UNet(cfg).state_dict()
    custom = ours_to_custom(state, cfg)
    back = custom_to_ours(custom, cfg)
    assert any(".ff.net.0.proj." in k for k in custom) and back.keys() == state.keys()
    assert all(torch.equal(back[k], v) for k, v in state.items())
    vae = AutoencoderKL(AutoencoderConfig.tiny()).state_dict()
    back = vae_from_ldm(vae_to_ldm(vae))
    assert back.keys() == vae.keys() and all(torch.equal(back[k], v) for k, v in vae.items())
    back = vae_from_diffusers(vae_to_diffusers(vae))
    assert back.keys() == vae.keys() and all(torch.equal(back[k], v) for k, v in vae.items())
    text = TextEncoder(TINY_TEXT).state_dict()
    assert text_from_ldm(text_to_ldm(text)).keys() == text.keys()
    sd_cfg = tiny_sd15()
    sd = UNet(sd_cfg).state_dict()
    for there, back_again in ((ours_to_diffusers, diffusers_to_ours), (ours_to_ldm, ldm_to_ours)):
        back = back_again(there(sd, sd_cfg), sd_cfg)
        assert back.keys() == sd.keys() and all(torch.equal(back[k], v) for k, v in sd.items())


def test_single_file_loads_in_ours_and_in_diffusers(exported, tmp_path):
    pipe, folder, _ = exported["sd"]
    report = export_single_file(pipe, tmp_path / "model.safetensors")
    assert report.path.is_file() and report.prior_dropped
    from safetensors import safe_open

    with safe_open(str(report.path), "pt") as f:
        keys = list(f.keys())
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    ours = pipe.generate([PROMPT], [SEED], steps=STEPS, guidance=GUIDANCE, use_prior=False)
    back = load_sd(report.path)  # widths from the file's metadata
    assert back.config.timestep_spacing == "leading" and back.prior is None
    assert _psnr(back.generate([PROMPT], [SEED], steps=STEPS, guidance=GUIDANCE), ours) >= 35
    theirs = diffusers.StableDiffusionPipeline.from_single_file(str(report.path), config=str(folder),
                                                                local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    assert _psnr(_theirs(theirs), ours) >= 35


def test_single_file_refuses_the_efficient_unet_in_one_line(exported, tmp_path):
    pipe, _, _ = exported["snap"]
    with pytest.raises(ConfigError) as info:
        export_single_file(pipe, tmp_path / "x.safetensors")
    message = str(info.value)
    assert "\n" not in message and "up.1 (res.0, attn.0, attn.1" in message and "mid (res.0, attn.0)" in message
    assert "--format diffusers" in message
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_export_diffusers(tmp_path, monkeypatch, capsys):
    from snapfusion import cli
    from snapfusion.export import diffusers_export

    monkeypatch.setattr(diffusers_export, "load_for_export", lambda name, device="cpu": _pipeline("snap"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").mkdir()  # --model x is checked to exist before the (mocked) load
    assert cli.main(["export", "--model", "x", "--format", "diffusers", "--out", str(tmp_path / "d")]) == 0
    assert "SnapFusionPipeline" in capsys.readouterr().out
    assert (tmp_path / "d" / "model_index.json").is_file()
    assert cli.main(["export", "--model", "x", "--format", "single-file", "--out", str(tmp_path / "s")]) == 2
    assert "LDM layout" in capsys.readouterr().err


def test_prior_latents_helper_with_plain_pipeline(exported):
    """The documented route for the plain StableDiffusionPipeline: starting latents with the prior's shift."""
    import importlib.util

    pipe, folder, _ = exported["sd"]
    spec = importlib.util.spec_from_file_location("snapfusion_diffusers_test", folder / "snapfusion_diffusers.py")
    code = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(code)
    plain = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    plain.set_progress_bar_config(disable=True)
    prior = code.LayoutPrior.from_pretrained(folder / "layout_prior")
    latents = code.prior_latents(plain, prior, PROMPT, STEPS, height=64, width=64,
                                 generator=torch.Generator("cpu").manual_seed(SEED))
    image = plain(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents, output_type="pt").images
    ours = pipe.generate([PROMPT], [SEED], steps=STEPS, guidance=GUIDANCE)
    assert _psnr(image, ours) >= 35
