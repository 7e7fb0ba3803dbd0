"""The drop-one-block probe (block-importance, SnapFusion Fig. 5) and its plot."""

import pytest

from snapfusion.evolve.actions import EvalConfig
from snapfusion.evolve.evolution import block_importance, plot_importance


def test_block_importance_drops_each_valid_block_once(tiny_pipeline, tmp_path):
    records = [{"prompt": "a red cat", "seed": 0}, {"prompt": "two blue stars", "seed": 1}]
    ev = EvalConfig(num_prompts=2, steps=2, guidance=3.0, size=64, batch=2)

    def scorer(images, prompts):
        return images.mean((1, 2, 3)) * 100

    unet = tiny_pipeline.unet
    report = block_importance(tiny_pipeline, unet, records, scorer, ev, label="tiny")
    names = [r["block"] for r in report["blocks"]]
    assert len(names) == len(set(names)) and names and set(names) <= {n for n, _ in unet.named_blocks()}
    assert any(r["delta_clip"] != 0 for r in report["blocks"])  # dropping a block changes the images
    assert report["clip"] == pytest.approx(float(scorer(tiny_pipeline.generate(
        [r["prompt"] for r in records], [0, 1], steps=2, guidance=3.0, height=64, width=64),
        None).mean()), rel=1e-5)
    out = plot_importance([report, {**report, "label": "again"}], tmp_path / "imp.png")
    assert out.stat().st_size > 1000
