"""scripts/ae_ceiling.py: the test prompts' renders through the shipped autoencoder, the ceiling of any UNet."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from snapfusion.loading import model_folder
from snapfusion.data import Scene, render
from snapfusion.decoder.evaluate import decode_unit, psnr
from snapfusion.decoder.io import load_decoder
from snapfusion.eval.evaluators import clip_features, domain_fid, evaluate_images, load_evaluators
from snapfusion.eval.frechet import gaussian_stats
from snapfusion.eval.runner import load_records, render_records
from snapfusion.models.autoencoder import Encoder, load_autoencoder
from snapfusion.pipeline import part_folder

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "ae_ceiling.py"
_spec = importlib.util.spec_from_file_location("ae_ceiling", SCRIPT)
ae_ceiling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ae_ceiling)


def _records(n):
    return load_records("test", 40)[:n]


@pytest.fixture(scope="module")
def autoencoder():
    root = model_folder("base")
    encoder = load_autoencoder(part_folder(root, "vae_encoder"), Encoder).eval()
    return encoder, load_decoder(part_folder(root, "vae_decoder")).eval()


def test_renders_are_the_scenes_own_pixels():
    records = _records(2)
    images = render_records(records, 64)
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 64, 64)
    expected = np.array(render(Scene.from_dict(records[1]["scene"]), 64))
    assert torch.equal(images[1].permute(1, 2, 0), torch.from_numpy(expected))


def test_round_trip_decodes_the_posterior_mean(autoencoder):
    encoder, decoder = autoencoder
    real = render_records(_records(3), 64)
    out = ae_ceiling.round_trip(encoder, decoder, real, batch_size=2)
    assert out.dtype == torch.uint8 and out.shape == real.shape
    with torch.no_grad():  # by hand: [-1, 1] input, the posterior mean scaled, decoded to [0, 1], rounded to uint8
        z = encoder.encode(real.float() / 127.5 - 1).mean * encoder.config.scaling_factor
    expected = (decode_unit(decoder, z) * 255).round().to(torch.uint8)
    assert (out.int() - expected.int()).abs().max() <= 1  # batch sizes 2 and 8 differ in float rounding only
    good = psnr(out.float() / 255, real.float() / 255)
    assert (good > 15).all(), good                           # about 20-23 dB at 64 px (22-30 dB at 512 px)


def test_sampled_round_trip_is_seeded_per_image_and_differs_from_the_mean(autoencoder):
    encoder, decoder = autoencoder
    real = render_records(_records(3), 64)
    one = ae_ceiling.round_trip(encoder, decoder, real, batch_size=1, sample=True)
    three = ae_ceiling.round_trip(encoder, decoder, real, batch_size=3, sample=True)
    assert (one.int() - three.int()).abs().max() <= 1        # the same draws whatever the batch size
    mean = ae_ceiling.round_trip(encoder, decoder, real, batch_size=3)
    assert (three.float() - mean.float()).abs().mean() > 0.5  # a draw is not the mean


def test_a_broken_decoder_scores_far_lower(autoencoder):
    encoder, decoder = autoencoder
    real = render_records(_records(2), 64)
    good = psnr(ae_ceiling.round_trip(encoder, decoder, real, batch_size=2).float() / 255, real.float() / 255)
    broken = load_decoder(part_folder(model_folder("base"), "vae_decoder")).eval()
    with torch.no_grad():
        broken.conv_out.weight.zero_()                       # every pixel decodes to the bias: a flat image
    flat = psnr(ae_ceiling.round_trip(encoder, broken, real, batch_size=2).float() / 255, real.float() / 255)
    assert (flat < good - 5).all(), (flat, good)


def test_command_reports_the_evaluators_reading(tmp_path):
    out = tmp_path / "ceiling.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--num-images", "2", "--size", "64", "--latents", "both",
                          "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert (report["images"], report["size"]) == (2, 64)
    assert set(report["results"]) == {"renders", "round_trip", "round_trip_sample"}
    records = _records(2)
    direct = evaluate_images(load_evaluators(), render_records(records, 64), [r["prompt"] for r in records],
                             [r["scene"] for r in records])
    assert report["results"]["renders"]["all_per_image"] == direct["all_per_image"]
    assert report["results"]["renders"]["clip_score"] == pytest.approx(direct["clip_score"], abs=1e-4)
    ev = load_evaluators()  # fid_vs_renders: the renders against their own stats are at 0, the round trips above it
    real = render_records(records, 64)
    assert domain_fid(ev, real, gaussian_stats(clip_features(ev.clip, real))) == pytest.approx(0, abs=1e-3)
    assert report["results"]["renders"]["fid_vs_renders"] == 0
    assert all(report["results"][k]["fid_vs_renders"] > 1e-3 for k in ("round_trip", "round_trip_sample"))


@pytest.mark.parametrize("args, message", [
    (["--size", "30"], "multiple of 8"),
    (["--model", "/nonexistent"], "not found"),
    (["--num-images", "1"], "--num-images"),
    (["--batch-size", "0"], "--batch-size"),
    (["--prompts", "nope"], "nope"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    run = subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(tmp_path / "x.json")],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ae_ceiling: error:") and message in lines[0], run.stderr
    assert not (tmp_path / "x.json").exists()
