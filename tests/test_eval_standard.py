"""Frechet arithmetic, the FID Inception network and the transformers CLIP path (random weights, no network)."""

import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import scipy.linalg
import torch

from snapfusion.errors import SnapFusionError
from snapfusion.eval.frechet import fid_from_features, frechet_distance, gaussian_stats, load_stats, save_stats
from snapfusion.eval.inception import FIDInceptionV3, load_fid_inception
from snapfusion.eval.standard import HFClipScorer, inception_fid
from snapfusion.weights import save_safetensors


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_frechet_closed_form_diagonal():
    # N(mu1, diag(a)) vs N(mu2, diag(b)): |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 4, 7), rng.uniform(0.1, 4, 7)
    mu1, mu2 = rng.normal(size=7), rng.normal(size=7)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_matches_scipy_sqrtm_and_commuting_closed_form():
    rng = np.random.default_rng(1)
    s1, s2 = _random_spd(rng, 12), _random_spd(rng, 12)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)
    # Scaled covariances commute: sigma2 = c^2 sigma1 -> tr term = (1 - c)^2 tr(sigma1)
    assert frechet_distance(mu1, s1, mu1, 4 * s1) == pytest.approx(np.trace(s1), rel=1e-10)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-8)


def test_stats_round_trip_and_fid_of_samples(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4000, 5))
    stats = gaussian_stats(x)
    path = save_stats(stats, tmp_path / "ref.safetensors", metadata={"source": "test"})
    back = load_stats(path)
    assert back.count == 4000 and np.array_equal(back.mu, stats.mu) and np.array_equal(back.sigma, stats.sigma)
    assert fid_from_features(rng.normal(size=(4000, 5)), back) < 0.05  # same law, small-sample bias only
    assert fid_from_features(rng.normal(size=(4000, 5)) + 1.0, back) == pytest.approx(5.0, rel=0.05)
    with pytest.raises(SnapFusionError, match="N >= 2"):
        gaussian_stats(np.zeros((1, 5)))


def test_inception_missing_path_is_fast_and_named(tmp_path):
    t = time.perf_counter()
    with pytest.raises(SnapFusionError, match="nowhere.safetensors"):
        load_fid_inception(tmp_path / "nowhere.safetensors")
    assert time.perf_counter() - t < 1.0


def test_inception_random_weights_load_and_fid(tmp_path):
    torch.manual_seed(0)
    net = FIDInceptionV3()
    state = {k: torch.randn_like(v) * (2 / v[0].numel()) ** 0.5 if k.endswith("conv.weight") else v  # He init
             for k, v in net.state_dict().items()}
    state["fc.weight"] = torch.zeros(1008, 2048)  # pytorch-fid files carry the classifier: ignored
    state["Conv2d_1a_3x3.bn.num_batches_tracked"] = torch.tensor(0)
    path = tmp_path / "inception.safetensors"
    save_safetensors(state, path, max_shard_bytes=None)
    loaded = load_fid_inception(path)
    assert torch.equal(loaded.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])
    images = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8)
    assert inception_fid(loaded, images, images) == pytest.approx(0, abs=1e-6)
    other = torch.randint(0, 64, (6, 3, 64, 64), dtype=torch.uint8)
    assert inception_fid(loaded, images, other) > 1e-3
    bad = dict(state)
    bad["Mixed_5b.branch1x1.conv.weight"] = torch.zeros(64, 192, 3, 3)
    save_safetensors(bad, path, max_shard_bytes=None)
    with pytest.raises(SnapFusionError, match="Mixed_5b.branch1x1.conv.weight"):
        load_fid_inception(path)


def test_hf_clip_missing_folder_is_fast_and_named(tmp_path):
    t = time.perf_counter()
    with pytest.raises(SnapFusionError, match="no_clip_here"):
        HFClipScorer(tmp_path / "no_clip_here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SnapFusionError, match="config.json"):
        HFClipScorer(tmp_path / "empty")
    assert time.perf_counter() - t < 1.0


def _tiny_clip_folder(folder):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in keep] + [chr(256 + i) for i in range(256 - len(keep))]  # GPT-2 byte alphabet
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    text = {"vocab_size": len(tokens), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 77,
            "bos_token_id": len(tokens) - 2, "eos_token_id": len(tokens) - 1}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)


def test_hf_clip_random_tiny_model_end_to_end(tmp_path):
    _tiny_clip_folder(tmp_path)
    scorer = HFClipScorer(tmp_path)
    images = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8)
    scores = scorer.scores(images, ["a red circle", "two cats", "a blue star above a dog"])
    assert scores.shape == (3,) and torch.all(scores >= 0) and torch.all(scores <= 100)
    img = scorer.model.get_image_features(pixel_values=torch.zeros(1, 3, 32, 32))
    assert torch.isfinite(getattr(img, "pooler_output", img)).all()
