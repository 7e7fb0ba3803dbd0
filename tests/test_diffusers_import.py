"""Faithful import of diffusers folders: the scheduler config, the tokenizer's added tokens, fp16-variant files, and a
hub id refused in one line. Each checked against diffusers itself on a folder diffusers wrote (tiny random weights)."""

import json
import shutil

import pytest
import torch

from snapfusion.convert.scheduler_keys import scheduler_settings
from snapfusion.convert.unet_keys import diffusers_config_from_ours
from snapfusion.convert.vae_keys import config_to_diffusers
from snapfusion.errors import ConfigError, WeightsError
from snapfusion.models.autoencoder import AutoencoderConfig
from snapfusion.models.text import TOKENIZER_DIR
from snapfusion.models.unet_config import tiny_sd15
from snapfusion.sd15 import load_sd, scheduler_pipeline_config

diffusers = pytest.importorskip("diffusers")
PROMPT, SEED, STEPS = "a photo of <cat-toy> on a red mat", 5, 5
# what the old import ignored: a linear beta schedule, trailing spacing
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                 timestep_spacing="trailing", steps_offset=0, clip_sample=False, set_alpha_to_one=False,
                 prediction_type="epsilon")


def _psnr(a, b) -> float:
    return float(10 * torch.log10(1 / ((a.float() - b.float()) ** 2).mean().clamp_min(1e-20)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A Stable Diffusion folder written by diffusers' save_pretrained: DDIM with SCHEDULER, CLIP's tokenizer with
    an added token <cat-toy> (textual inversion) and a text encoder with its extra embedding row."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet_cfg = {k: v for k, v in diffusers_config_from_ours(tiny_sd15()).items() if k != "_class_name"}
    unet = diffusers.UNet2DConditionModel(**{**unet_cfg, "cross_attention_dim": 32})
    vae_cfg = {k: v for k, v in config_to_diffusers(AutoencoderConfig.tiny()).items() if k != "_class_name"}
    vae = diffusers.AutoencoderKL(**vae_cfg)
    tokenizer = CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"),
                              pad_token="<|endoftext|>", model_max_length=77)
    assert tokenizer.add_tokens(["<cat-toy>"]) == 1
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=77, projection_dim=32))
    text.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        for m in (unet, vae, text):  # make every weight matter
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                             scheduler=diffusers.DDIMScheduler(**SCHEDULER), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    root = tmp_path_factory.mktemp("sd") / "tiny-sd"
    pipe.save_pretrained(root)
    return root


def _theirs(folder, **kw) -> torch.Tensor:
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=4.0, height=64, width=64, output_type="pt",
                generator=torch.Generator("cpu").manual_seed(SEED)).images


def test_scheduler_and_tokenizer_give_diffusers_image(folder):
    ours = load_sd(folder)
    cfg = ours.config
    assert (cfg.schedule.beta_schedule, cfg.schedule.beta_start, cfg.timestep_spacing) == ("linear", 0.0001, "trailing")
    theirs = _theirs(folder)
    image = ours.generate([PROMPT], [SEED], steps=STEPS, guidance=4.0, height=64, width=64)
    assert _psnr(image, theirs) >= 35


@pytest.mark.parametrize("change", [
    # scaled_linear, leading spacing, steps_offset 1, set_alpha_to_one, v-prediction: the same weights
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading",
         steps_offset=1, set_alpha_to_one=True, prediction_type="v_prediction"),
    # the DPM-Solver++(2M) class: our dpmpp_2m sampler
    dict(_class_name="DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", solver_order=2,
         final_sigmas_type="zero", timestep_spacing="linspace"),
])
def test_other_scheduler_fields_give_diffusers_image(folder, tmp_path, change):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    path = copy / "scheduler" / "scheduler_config.json"
    data = json.loads(path.read_text())
    data.update(change)
    path.write_text(json.dumps(data))
    ours = load_sd(copy)
    if "prediction_type" in change:
        assert ours.unet.config.prediction_type == "v_prediction" and ours.config.set_alpha_to_one
    else:
        assert ours.config.sampler == "dpmpp_2m"
    image = ours.generate([PROMPT], [SEED], steps=STEPS, guidance=4.0, height=64, width=64)
    assert _psnr(image, _theirs(copy)) >= 35


@pytest.mark.parametrize("spacing,offset,steps", [("leading", 1, 50), ("leading", 0, 8), ("trailing", 0, 8),
                                                  ("linspace", 0, 10), ("leading", 3, 20)])
def test_timesteps_equal_diffusers(spacing, offset, steps):
    data = {"_class_name": "DDIMScheduler", **SCHEDULER, "timestep_spacing": spacing, "steps_offset": offset}
    s = scheduler_settings(data)
    from snapfusion.pipeline import Pipeline, PipelineConfig

    cfg = PipelineConfig(schedule=s["schedule"], timestep_spacing=s["timestep_spacing"], steps_offset=s["steps_offset"])
    ours = Pipeline.timesteps(type("P", (), {"schedule": type("S", (), {"num_train_timesteps": 1000})(),
                                             "config": cfg})(), steps, "ddim")
    theirs = diffusers.DDIMScheduler.from_config(data)
    theirs.set_timesteps(steps)
    assert ours[:-1].tolist() == theirs.timesteps.tolist()


def test_schedule_alphas_equal_diffusers():
    from snapfusion.schedule import NoiseSchedule

    for beta_schedule in ("linear", "scaled_linear"):
        data = {"_class_name": "DDIMScheduler", **SCHEDULER, "beta_schedule": beta_schedule}
        ours = NoiseSchedule(scheduler_settings(data)["schedule"]).alphas_cumprod
        assert torch.allclose(ours, diffusers.DDIMScheduler.from_config(data).alphas_cumprod, rtol=1e-6)


@pytest.mark.parametrize("change,match", [
    ({"clip_sample": True}, "clip_sample=True"),
    ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule='squaredcos_cap_v2'"),
    ({"thresholding": True}, "thresholding"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
    ({"timestep_spacing": "karras"}, "timestep_spacing"),
    ({"prediction_type": "sample"}, "prediction_type"),
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
    ({"_class_name": "HeunDiscreteScheduler"}, "HeunDiscreteScheduler"),
])
def test_unsupported_scheduler_values_are_refused(folder, tmp_path, change, match):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    path = copy / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ConfigError, match=match) as info:
        load_sd(copy)
    assert "\n" not in str(info.value)


def test_class_defaults_apply_to_missing_keys(tmp_path):
    # a DDIMScheduler config without clip_sample clips in diffusers (its default): refused, not ignored
    with pytest.raises(ConfigError, match="diffusers' default"):
        scheduler_settings({"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear"})
    # SD-v1.5's own folder names PNDM: its schedule is kept, DDIM samples
    s = scheduler_settings({"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                            "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
                            "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False})
    assert (s["sampler"], s["timestep_spacing"], s["steps_offset"]) == ("ddim", "leading", 1)
    dpm = scheduler_settings({"_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "scaled_linear"})
    assert (dpm["sampler"], dpm["timestep_spacing"]) == ("dpmpp_2m", "linspace")
    (tmp_path / "scheduler").mkdir()
    assert scheduler_pipeline_config(tmp_path)[0].steps == 50  # no file: SD-v1.5's


def test_added_token_stays_one_token(folder):
    from transformers import CLIPTokenizer

    ours = load_sd(folder).tokenizer
    theirs = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    prompts = [PROMPT, "<cat-toy>", "two <cat-toy>s, a <CAT-TOY> and a cat-toy", "plain words only"]
    ids = theirs(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours(prompts), ids)
    assert ours(["<cat-toy>"])[0, :3].tolist() == [49406, 49408, 49407] and ours.added_tokens == {"<cat-toy>": 49408}


def test_fp16_variant_loads(folder, tmp_path):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    root = tmp_path / "fp16"
    pipe.to(torch.float16).save_pretrained(root, variant="fp16")
    assert (root / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (root / "unet" / "diffusion_pytorch_model.safetensors").exists()
    ours = load_sd(root)
    image = ours.generate([PROMPT], [SEED], steps=STEPS, guidance=4.0, height=64, width=64)
    assert _psnr(image, _theirs(root, variant="fp16")) >= 35


def test_hub_id_is_one_line(capsys):
    from snapfusion import cli
    from snapfusion.loading import resolve_model

    for load in (load_sd, resolve_model):
        with pytest.raises(WeightsError, match="nothing is downloaded") as info:
            load("runwayml/stable-diffusion-v1-5")
        assert "\n" not in str(info.value) and "local diffusers folder or .safetensors" in str(info.value)
    assert cli.main(["generate", "x", "--model", "runwayml/stable-diffusion-v1-5", "--out", "unused.png"]) == 2
    assert "hub id" in capsys.readouterr().err


def test_added_tokens_of_a_vocab_json_folder(tmp_path):
    """The older layout (vocab.json, merges.txt, added tokens in tokenizer_config.json / added_tokens.json)."""
    from transformers import CLIPTokenizer

    from snapfusion.models.text import Tokenizer

    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(TOKENIZER_DIR / name, tmp_path / name)
    token = {"content": "<cat-toy>", "lstrip": False, "rstrip": False, "normalized": True, "single_word": False,
             "special": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": "<|endoftext|>",
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "added_tokens_decoder": {"49408": token}}))
    ours = Tokenizer(tmp_path)
    theirs = CLIPTokenizer.from_pretrained(tmp_path)
    prompts = [PROMPT, "two <cat-toy>s and a cat-toy"]
    ids = theirs(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours(prompts), ids) and ours.added_tokens == {"<cat-toy>": 49408}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"49410": token}}))
    with pytest.raises(WeightsError, match="should have id 49410"):
        Tokenizer(tmp_path)


def test_sharded_fp16_variant_loads(folder, tmp_path):
    from snapfusion.convert.unet_keys import diffusers_to_ours, unet_from_diffusers_folder

    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    unet.to(torch.float16).save_pretrained(tmp_path / "unet", variant="fp16", max_shard_size="200KB")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    ours = unet_from_diffusers_folder(tmp_path / "unet")
    want = diffusers_to_ours(unet.state_dict(), ours.config)
    assert all(torch.equal(v, want[k].float()) for k, v in ours.state_dict().items())
