"""Shared fixtures: tiny models on the CPU, offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from snapfusion.models.autoencoder import AutoencoderConfig, AutoencoderKL  # noqa: E402
from snapfusion.models.text import TextEncoder, TextEncoderConfig  # noqa: E402
from snapfusion.models.unet import UNet  # noqa: E402
from snapfusion.models.unet_config import tiny_sd15  # noqa: E402
from snapfusion.pipeline import Pipeline, PipelineConfig  # noqa: E402

TINY_TEXT = TextEncoderConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, projection_dim=32)


def tiny_loop(run_dir, steps, **kw):
    """A ``LoopConfig`` for a few CPU training steps of a tiny model (every step logged, no samples, one checkpoint
    at the end); ``kw`` overrides any field."""
    from snapfusion.train.loop import LoopConfig

    base = dict(run_dir=str(run_dir), max_steps=steps, batch_size=2, num_workers=0, mixed_precision="no",
                log_every=1, sample_every=0, checkpoint_every=100, warmup_steps=1, ema_decay=0.9, lr=1e-3)
    return LoopConfig(**{**base, **kw})


def read_metrics(run_dir):
    """The training loop's ``metrics.jsonl`` records of a run folder."""
    import json

    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def doubled_stage_widths(cfg):
    """``cfg`` (a UNetConfig) with every stage twice as wide: the same channels in and out and context width, other
    stage widths (what feature distillation must refuse to pair)."""
    widths = [2 * s.channels for s in cfg.down]
    return dataclasses.replace(cfg, down=tuple(dataclasses.replace(s, channels=w) for s, w in zip(cfg.down, widths)),
                               up=tuple(dataclasses.replace(s, channels=w) for s, w in zip(cfg.up, reversed(widths))),
                               mid=dataclasses.replace(cfg.mid, channels=widths[-1]))


@pytest.fixture(scope="session")
def tiny_pipeline() -> Pipeline:
    """A random-weight pipeline with SD's structure at toy size (64 px images, 8 px latents)."""
    torch.manual_seed(0)
    text = TextEncoder(TINY_TEXT)
    unet = UNet(dataclasses.replace(tiny_sd15(), context_dim=32))
    vae = AutoencoderKL(AutoencoderConfig.tiny())
    return Pipeline(text, unet, vae.decoder, PipelineConfig(name="tiny", resolution=64, steps=4, guidance=3.0),
                    encoder=vae.encoder).eval()


@pytest.fixture(scope="module")
def ge_pipeline(tiny_pipeline) -> Pipeline:
    """The tiny pipeline around a random guidance-embedded UNet (its embedding non-zero: images depend on w)."""
    torch.manual_seed(1)
    unet = UNet(dataclasses.replace(tiny_pipeline.unet.config, guidance_embed=True))
    cfg = dataclasses.replace(tiny_pipeline.config, name="tiny-ge", steps=3)
    return Pipeline(tiny_pipeline.text_encoder, unet, tiny_pipeline.decoder, cfg).eval()


@pytest.fixture()
def one_thread():
    """One torch thread for the test (timings on a shared 2-core machine: no OpenMP spin-waits under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def two_and_one_call_client(tiny_pipeline, ge_pipeline):
    """A server client over the tiny two-call pipeline ("two", the default model) and its guidance-embedded
    sibling ("one"), both loaded; the engine stops after the test."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from snapfusion.serve.app import create_app
    from snapfusion.serve.engine import Engine

    engine = Engine({"two": lambda: tiny_pipeline, "one": lambda: ge_pipeline}, "two")
    engine.load("two")
    engine.load("one")
    engine.start()
    try:
        yield TestClient(create_app(engine, timeout=30))
    finally:
        engine.stop()


@pytest.fixture()
def assemble_student(tiny_pipeline, ge_pipeline, tmp_path):
    """``run(unet, out, *flags)``: scripts/assemble_student.py over the tiny pipeline saved as the base (fp16, no
    prior), ``unet`` "two" (the base's own UNet) or "one" (a guidance-embedded UNet), the folder written at
    tmp_path / out; returns the finished process."""
    import subprocess
    import sys

    tiny_pipeline.save(tmp_path / "base", dtype=None)
    ge_pipeline.unet.save(tmp_path / "ge_unet")
    unets = {"two": tmp_path / "base" / "unet", "one": tmp_path / "ge_unet"}
    script = Path(__file__).resolve().parents[1] / "scripts" / "assemble_student.py"

    def run(unet: str, out: str, *flags: str):
        return subprocess.run([sys.executable, str(script), "--unet", str(unets[unet]),
                               "--base", str(tmp_path / "base"), "--decoder", str(tmp_path / "base" / "vae_decoder"),
                               "--prior", "none", "--out", str(tmp_path / out), "--fp16", *flags],
                              capture_output=True, text=True, timeout=300)
    return run
