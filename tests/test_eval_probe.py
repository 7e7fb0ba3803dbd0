"""Scene-CLIP and probe logic with tiny random models: targets -> decode -> checks, tokenizer, score clamp, I/O."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from snapfusion.data import SceneDataset, vocab
from snapfusion.errors import SnapFusionError
from snapfusion.eval.attributes import check_scene
from snapfusion.eval.evaluators import evaluator_version, load_evaluators, save_evaluators
from snapfusion.eval.frechet import gaussian_stats
from snapfusion.eval.probe import AttributeProbe, ProbeConfig, center_table, decode, probe_loss, probe_targets
from snapfusion.eval.scene_clip import CLS, UNK, SceneClip, SceneClipConfig, clip_score_from_embeddings


def _probe_cfg():
    v = vocab()
    return ProbeConfig(objects=v.objects, shapes=v.shapes, colors=v.colors, sizes=v.sizes, widths=(8, 8, 8),
                       downsamples=2, groups=4)


def _scenes(n, split="test"):
    ds = SceneDataset(split, size=64, seed=3, length=n)
    return [ds[i]["scene"].attributes() for i in range(n)]


def _oracle_outputs(cfg, attrs):
    """Probe outputs that encode the targets exactly (what a perfect probe would say)."""
    centers, bg = center_table(cfg, attrs)
    t = probe_targets(cfg, centers, bg)
    heat = torch.where(t["heat"] == 1, 10.0, torch.where(t["heat"] > 0.5, 0.0, -10.0))  # peaks only at centers

    def onehot(labels, n):
        return torch.nn.functional.one_hot(labels.clamp(min=0), n).permute(0, 3, 1, 2).float()

    out = {"heat": heat, "color": onehot(t["color"], len(cfg.colors)), "size": onehot(t["size"], len(cfg.sizes))}
    for i, (name, n) in enumerate((("bg_kind", 2), ("bg_color0", 11), ("bg_color1", 11), ("bg_direction", 2))):
        out[name] = torch.nn.functional.one_hot(bg[:, i].clamp(min=0), n).float()
    return out


def test_oracle_probe_outputs_pass_every_check_and_wrong_scenes_fail():
    cfg = _probe_cfg()
    attrs = _scenes(40)
    dets, bgs = decode(cfg, _oracle_outputs(cfg, attrs))
    rows = [check_scene(a, d, b) for a, d, b in zip(attrs, dets, bgs)]
    assert all(r["all"] and r["size"] for r in rows), [r for r in rows if not r["all"]][:3]
    assert sum(len(d) for d in dets) == sum(o["count"] for a in attrs for o in a["objects"])
    shifted = attrs[1:] + attrs[:1]  # every image checked against another scene
    wrong = [check_scene(a, d, b)["all"] for a, d, b in zip(shifted, dets, bgs)]
    assert sum(wrong) <= 2


def test_count_and_relation_checks_catch_errors():
    cfg = _probe_cfg()
    attrs = [a for a in _scenes(60) if a["layout"] == "pair"][:5]
    dets, bgs = decode(cfg, _oracle_outputs(cfg, attrs))
    for a, d, b in zip(attrs, dets, bgs):
        assert check_scene(a, d, b)["position"]
        swapped = [type(x)(x.name, x.color, x.size, 1 - x.x, 1 - x.y, x.score) for x in d]  # mirrored image
        assert not check_scene(a, swapped, b)["position"]
        assert not check_scene(a, d + d[:1], b)["count"]


def test_probe_loss_and_shapes_tiny():
    cfg = _probe_cfg()
    probe = AttributeProbe(cfg)
    attrs = _scenes(3)
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    out = probe(images)
    assert out["heat"].shape == (3, len(cfg.objects), cfg.grid, cfg.grid)
    loss = probe_loss(out, probe_targets(cfg, *center_table(cfg, attrs)))
    assert loss.shape == (3,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert probe.heat.weight.grad.abs().sum() > 0


def test_tokenizer_and_clip_score_definition():
    clip = SceneClip(SceneClipConfig(words=("a", "red", "star"), widths=(8, 8), groups=4, embed_dim=8,
                                     spatial_channels=2, text_width=16, text_layers=1, text_heads=2, image_size=32))
    ids = clip.tokenize(["A red star!", "a"])
    assert ids[0].tolist() == [CLS, 3, 4, 5, UNK] and ids[1].tolist() == [CLS, 3, 0, 0, 0]
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])
    b = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    assert torch.allclose(clip_score_from_embeddings(a, b), torch.tensor([100.0, 0.0, 60.0]))
    loss = clip(torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8), ["a red star", "a star"])
    assert loss.shape == (2,) and torch.isfinite(loss).all()


def test_save_load_round_trip_and_version(tmp_path):
    torch.manual_seed(0)
    clip = SceneClip(SceneClipConfig(words=("a", "star"), widths=(8, 8), groups=4, embed_dim=8,
                                     spatial_channels=2, text_width=16, text_layers=1, text_heads=2, image_size=32))
    probe = AttributeProbe(_probe_cfg())
    save_evaluators(tmp_path, clip, probe, gaussian_stats(torch.randn(10, 8)), {"note": "test"})
    ev = load_evaluators(tmp_path)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(ev.clip.encode_image(x), clip.half().float().encode_image(x), atol=1e-3)
    assert ev.version == evaluator_version(tmp_path) and len(ev.version) == 12
    (tmp_path / "probe" / "model.safetensors").unlink()
    with pytest.raises(SnapFusionError, match="probe/model.safetensors"):
        load_evaluators(tmp_path)
