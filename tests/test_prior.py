"""The terminal layout prior (snapfusion/prior.py): the model, its start shift in Pipeline.generate, saving with the
pipeline, the cached training data and the train-prior command."""

import json
import math

import pytest
import torch

import snapfusion.pipeline as pipeline_module
from snapfusion.cli import main
from snapfusion.errors import ConfigError, SnapFusionError, WeightsError
from snapfusion.pipeline import Pipeline
from snapfusion.prior import LayoutPrior, LayoutPriorConfig, PriorTrainConfig, affine_map, build_targets, \
    start_shift, train_prior

CFG = LayoutPriorConfig(context_dim=32, grid=2, width=32, heads=2, layers=1)


def constant_prior(value: torch.Tensor, config: LayoutPriorConfig = CFG) -> LayoutPrior:
    """A prior that predicts ``value`` (C,) for every block of every prompt."""
    prior = LayoutPrior(config)
    with torch.no_grad():
        prior.out.weight.zero_()
        prior.out.bias.copy_(value)
    return prior.eval()


def with_prior(pipe: Pipeline, prior: LayoutPrior | None) -> Pipeline:
    return Pipeline(pipe.text_encoder, pipe.unet, pipe.decoder, pipe.config, tokenizer=pipe.tokenizer,
                    encoder=pipe.encoder, prior=prior)


def test_prior_shapes_round_trip_and_refusals(tmp_path):
    torch.manual_seed(0)
    prior = LayoutPrior(CFG).eval()
    context = torch.randn(3, 77, 32)
    out = prior(context)
    assert out.shape == (3, 4, 2, 2)
    prior.save(tmp_path / "prior")
    back = LayoutPrior.load(tmp_path / "prior")
    assert back.proj.weight.dtype == torch.float32  # stored fp16, run in fp32
    torch.testing.assert_close(back(context), out, atol=2e-2, rtol=0)
    with pytest.raises(ConfigError, match="expected text states"):
        prior(torch.randn(3, 77, 16))
    (tmp_path / "prior" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError):
        LayoutPrior.load(tmp_path / "prior")


def test_start_shift_is_the_forward_process_share_of_the_block_means():
    """sqrt(abar / (1 - abar)) x each block's predicted means, spread over its latent pixels (the oracle's formula)."""
    value = torch.tensor([1.0, -2.0, 0.5, 0.0])
    shift = start_shift(constant_prior(value), torch.zeros(2, 77, 32), (8, 8), abar=0.005)
    expected = math.sqrt(0.005 / 0.995) * value.view(1, 4, 1, 1).expand(2, 4, 8, 8)
    torch.testing.assert_close(shift, expected)
    # a prior with different blocks: each quarter of the latent takes its block's value
    prior = constant_prior(torch.zeros(4))
    with torch.no_grad():
        prior.out.bias.zero_()
    blocks = torch.arange(16.0).view(1, 4, 2, 2)
    prior.forward = lambda context: blocks.expand(context.shape[0], -1, -1, -1)
    shift = start_shift(prior, torch.zeros(1, 77, 32), (8, 8), abar=0.5)
    assert shift[0, 1, :4, 4:].unique().tolist() == [5.0] and shift[0, 3, 4:, :4].unique().tolist() == [14.0]


def test_generate_starts_from_the_noise_plus_the_shift(tiny_pipeline, monkeypatch):
    value = torch.tensor([3.0, -1.0, 2.0, 0.5])
    pipe = with_prior(tiny_pipeline, constant_prior(value))
    starts = []
    original = pipeline_module.sample_ddim
    monkeypatch.setattr(pipeline_module, "sample_ddim",
                        lambda fn, z, *args, **kw: starts.append(z.clone()) or original(fn, z, *args, **kw))
    with_ = pipe.generate(["a red star"], [5], steps=3)
    without = pipe.generate(["a red star"], [5], steps=3, use_prior=False)
    plain = tiny_pipeline.generate(["a red star"], [5], steps=3)
    t0 = int(pipe.timesteps(3, "ddim")[0])
    abar = float(pipe.schedule.alphas_cumprod[t0])
    torch.testing.assert_close(starts[0] - starts[1], math.sqrt(abar / (1 - abar)) * value.view(1, 4, 1, 1)
                               .expand_as(starts[0]))
    torch.testing.assert_close(without, plain)  # use_prior=False is the pipeline without a prior
    assert not torch.allclose(with_, without)


def test_pipeline_saves_and_loads_its_prior(tiny_pipeline, tmp_path):
    torch.manual_seed(1)
    prior = LayoutPrior(CFG).eval()
    pipe = with_prior(tiny_pipeline, prior)
    pipe.save(tmp_path / "p")
    back = Pipeline.load(tmp_path / "p")
    assert back.prior is not None
    torch.testing.assert_close(back.prior(torch.ones(1, 77, 32)), prior(torch.ones(1, 77, 32)), atol=2e-2, rtol=0)
    tiny_pipeline.save(tmp_path / "q")
    assert Pipeline.load(tmp_path / "q").prior is None
    with pytest.raises(ConfigError, match="context_dim"):
        with_prior(tiny_pipeline, LayoutPrior(LayoutPriorConfig(context_dim=16, width=32, heads=2)))


def test_train_prior_learns_a_caption_to_layout_map():
    """Captions that name a direction get the matching block means, on held-out pairs too."""
    torch.manual_seed(0)
    words = {"left": torch.tensor([1.0, -1.0]), "right": torch.tensor([-1.0, 1.0]), "none": torch.zeros(2)}
    codes = {w: torch.randn(32) for w in words}
    captions = [["left", "right", "none"][i % 3] for i in range(300)]
    targets = torch.stack([words[c].view(1, 1, 2).expand(4, 2, 2) for c in captions])  # (N, 4, 2, 2)

    def encode(batch):
        return torch.stack([codes.get(c, torch.zeros(32)).expand(77, 32) for c in batch])

    prior, report = train_prior(encode, captions, targets, CFG, PriorTrainConfig(steps=300, batch_size=64, lr=3e-3),
                                progress=lambda _: None)
    assert report["held_out"] == 30 and report["held_out_r2"] > 0.95
    with torch.no_grad():
        assert prior(encode(["left"]))[0, 0, 0, 0] > 0.8 and prior(encode(["right"]))[0, 0, 0, 0] < -0.8


def test_train_prior_keeps_the_best_held_out_step():
    """Early stopping: on noisy targets the prior memorises its training pairs; the kept weights are those of the
    evaluated step with the lowest MSE on the first held-out half, better there than the last step's."""
    torch.manual_seed(1)
    captions = [f"scene {i % 6} {i}" for i in range(80)]  # 6 learnable layouts, each pair its own code
    codes = {c: torch.randn(32) for c in captions}
    layout = torch.randn(6, 4, 2, 2)
    targets = torch.stack([layout[i % 6] for i in range(80)]) + 2.0 * torch.randn(80, 4, 2, 2)

    def encode(batch):
        return torch.stack([(codes.get(c, torch.zeros(32)) + torch.eye(32)[int(c.split()[1]) if c else 0] * 3)
                            .expand(77, 32) for c in batch])

    runs = {}
    for keep_best in (True, False):
        train = PriorTrainConfig(steps=400, batch_size=32, lr=3e-3, eval_every=25, val_fraction=0.25,
                                 keep_best=keep_best, uncond_prob=0.0)
        runs[keep_best] = train_prior(encode, captions, targets, CFG, train, progress=lambda _: None)[1]
    best, last = runs[True], runs[False]
    held = {e["step"]: e["held_out_mse"] for e in best["log"]}
    assert best["log"] == last["log"] and len(held) == 16  # same seed, same run; evaluated every 25 steps
    assert best["kept_step"] == min(held, key=held.get) < 400 and last["kept_step"] == 400
    assert held[best["kept_step"]] < held[400] - 0.05  # it overfit, and early stopping undid it
    assert best["held_out_mse"] < last["held_out_mse"] and best["unselected_held_out"] == 10


def test_train_prior_refuses_a_diverged_run():
    captions = [f"c{i}" for i in range(20)]
    targets = torch.full((20, 4, 2, 2), float("nan"))
    with pytest.raises(SnapFusionError, match="diverged"):
        train_prior(lambda b: torch.ones(len(b), 77, 32), captions, targets, CFG,
                    PriorTrainConfig(steps=3, batch_size=4, eval_every=1), progress=lambda _: None)


@pytest.mark.parametrize("steps", [1, 2, 3, 20, 39])
def test_train_prior_runs_any_step_count(steps):
    """Short runs (the CLI takes --steps >= 1) train with a rate schedule that exists: OneCycleLR's 5 % warm-up
    would be a zero-length phase below 40 steps."""
    torch.manual_seed(0)
    captions = [f"c{i}" for i in range(20)]
    prior, report = train_prior(lambda b: torch.randn(len(b), 77, 32), captions, torch.randn(20, 4, 2, 2), CFG,
                                PriorTrainConfig(steps=steps, batch_size=4, eval_every=1), progress=lambda _: None)
    assert 1 <= report["kept_step"] <= steps and all(torch.isfinite(p).all() for p in prior.parameters())


def test_build_targets_caches_chunks_and_resumes(tiny_pipeline, tmp_path, monkeypatch):
    import snapfusion.data.dataset as dataset

    calls = []
    original = dataset.make_item
    monkeypatch.setattr(dataset, "make_item", lambda *a: calls.append(a[3]) or original(*a))
    encoder = tiny_pipeline.encoder
    caps, means = build_targets(encoder, 7, tmp_path, size=32, calibrate=0, full_size=64, chunk=3,
                                progress=lambda _: None)
    assert len(caps) == 7 and means.shape == (7, 4, 2, 2) and len(calls) == 7
    (tmp_path / "chunk_0000006_2_32.json").unlink()  # a killed build: the last chunk is missing
    caps2, means2 = build_targets(encoder, 7, tmp_path, size=32, calibrate=0, full_size=64, chunk=3,
                                  progress=lambda _: None)
    assert calls[7:] == [6] and caps2 == caps
    torch.testing.assert_close(means2, means)
    with pytest.raises(SnapFusionError, match="another build"):  # another latent space must not reuse the cache
        build_targets(encoder, 7, tmp_path, size=32, calibrate=0, full_size=64, chunk=3, source="other",
                      progress=lambda _: None)


def test_affine_map_fits_per_channel():
    x = torch.randn(50, 4, 2, 2)
    y = x * torch.tensor([2.0, 1.0, -1.0, 0.5]).view(1, 4, 1, 1) + torch.tensor([0.1, 0, 0.3, -1]).view(1, 4, 1, 1)
    torch.testing.assert_close(affine_map(x, y)(x), y, atol=1e-5, rtol=0)


def test_train_prior_command(tiny_pipeline, tmp_path, capsys):
    tiny_pipeline.save(tmp_path / "pipe")
    out = tmp_path / "prior"
    assert main(["train-prior", "--model", str(tmp_path / "pipe"), "--out", str(out), "--scenes", "20",
                 "--encode-size", "32", "--calibrate", "4", "--steps", "5", "--batch-size", "8",
                 "--cache", str(tmp_path / "cache")]) == 0
    report = json.loads((out / "train_report.json").read_text())
    assert report["scenes"] == 20 and report["held_out"] == 2
    assert LayoutPrior.load(out).config.context_dim == 32
    assert main(["train-prior", "--model", str(tmp_path / "pipe"), "--out", str(out), "--scenes", "5"]) == 2
    assert "--scenes" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["base", "snapfusion"])
def test_shipped_models_carry_their_priors(name):
    """Both embedded pipelines sample from their layout priors by default (docs/base_model.md):
    each prior reads its own pipeline's text states and predicts block means that depend on the prompt."""
    from snapfusion.loading import resolve_model

    pipe = resolve_model(name, device="cpu")
    assert pipe.prior is not None and pipe.prior.config.grid == 2
    assert pipe.prior.config.context_dim == pipe.text_encoder.config.hidden_size
    ctx = pipe.encode_text(["a blue to yellow left-to-right gradient background with a cat",
                            "a yellow to blue left-to-right gradient background with a cat"])
    means = pipe.prior(ctx)  # (2, 4, 2, 2): the two directions' left and right halves swap
    left_minus_right = means[:, :, :, 0] - means[:, :, :, 1]
    assert (left_minus_right[0] * left_minus_right[1]).sum() < 0
