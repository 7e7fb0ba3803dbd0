"""scripts/ae_ceiling.py: the test prompts' renders through the shipped autoencoder, the ceiling of any UNet."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from snapfusion.cli import model_folder
from snapfusion.data import Scene, render
from snapfusion.decoder.evaluate import psnr
from snapfusion.decoder.io import load_decoder
from snapfusion.eval.runner import load_records
from snapfusion.models.autoencoder import Encoder, load_autoencoder
from snapfusion.pipeline import part_folder

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ae_ceiling", ROOT / "scripts" / "ae_ceiling.py")
ae_ceiling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ae_ceiling)


def _records(n):
    return load_records("test", 40)[:n]


def test_renders_are_the_scenes_own_pixels():
    records = _records(2)
    images = ae_ceiling.renders(records, 64)
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 64, 64)
    expected = np.array(render(Scene.from_dict(records[1]["scene"]), 64))
    assert torch.equal(images[1].permute(1, 2, 0), torch.from_numpy(expected))


def test_round_trip_reconstructs_and_a_broken_decoder_does_not():
    root = model_folder("base")
    encoder = load_autoencoder(part_folder(root, "vae_encoder"), Encoder).eval()
    decoder = load_decoder(part_folder(root, "vae_decoder")).float().eval()
    real = ae_ceiling.renders(_records(2), 64)
    out = ae_ceiling.round_trip(encoder, decoder, real, batch_size=1)
    assert out.dtype == torch.uint8 and out.shape == real.shape
    good = psnr(out.float() / 255, real.float() / 255)
    assert (good > 18).all(), good                           # the shipped autoencoder: about 29 dB at 512²
    with torch.no_grad():
        decoder.conv_out.weight.zero_()                      # every pixel decodes to the bias: a flat image
    flat = psnr(ae_ceiling.round_trip(encoder, decoder, real, batch_size=2).float() / 255, real.float() / 255)
    assert (flat < good - 5).all(), (flat, good)


def test_command_writes_both_rows(tmp_path):
    out = tmp_path / "ceiling.json"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "ae_ceiling.py"), "--num-images", "2", "--size",
                          "64", "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert report["images"] == 2 and set(report["results"]) == {"renders", "round_trip"}
    for row in report["results"].values():
        assert len(row["all_per_image"]) == 2 and 0 <= row["attributes"]["all"] <= 1
