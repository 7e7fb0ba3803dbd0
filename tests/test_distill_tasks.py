"""v fine-tuning and step distillation as Tasks of the one loop: they run, resume exactly, export, and the CLI."""

import json

import pytest
import torch

from snapfusion.cli import main
from snapfusion.distill.stages import distill_steps, finetune_v
from snapfusion.distill.tasks import DistillConfig, DistillTask, ModelSource, VFinetuneConfig, VFinetuneTask
from snapfusion.errors import ConfigError
from snapfusion.models.unet import UNet
from snapfusion.pipeline import Pipeline
from snapfusion.train import state as ckpt_io
from snapfusion.train.loop import LoopConfig, train
from snapfusion.weights import load_safetensors


@pytest.fixture(scope="module")
def source(tiny_pipeline, tmp_path_factory) -> ModelSource:
    folder = tmp_path_factory.mktemp("teacher") / "pipe"
    tiny_pipeline.save(folder, dtype=None)
    return ModelSource(pipeline=str(folder))


def _loop(run_dir, steps, **kw):
    base = dict(run_dir=str(run_dir), max_steps=steps, batch_size=2, num_workers=0, mixed_precision="no",
                log_every=1, sample_every=0, checkpoint_every=100, warmup_steps=1, ema_decay=0.9, lr=1e-3)
    return LoopConfig(**{**base, **kw})


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_weights(a_dir, b_dir):
    for which in ("model", "ema"):
        a = load_safetensors(ckpt_io.latest_checkpoint(a_dir) / which / "model.safetensors")
        b = load_safetensors(ckpt_io.latest_checkpoint(b_dir) / which / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=f"{which}:{k}")


def test_v_finetune_runs_resumes_and_exports(source, tmp_path):
    cfg = VFinetuneConfig(source=source, image_size=64, sample_prompts=2, sample_steps=2)
    task = VFinetuneTask(cfg)
    model = task.build()
    assert model.config.prediction_type == "v_prediction"
    teacher = UNet.load(source.unet_folder())
    for (k, a), b in zip(model.state_dict().items(), teacher.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)  # starts from the source's weights
    train(_loop(tmp_path / "straight", 3), VFinetuneTask(cfg))
    train(_loop(tmp_path / "split", 2), VFinetuneTask(cfg))
    final = finetune_v(_loop(tmp_path / "split", 3, sample_every=3), cfg, resume=True)
    _assert_same_weights(tmp_path / "straight", tmp_path / "split")
    assert [r["loss"] for r in _metrics(tmp_path / "split")] == [r["loss"] for r in _metrics(tmp_path / "straight")]
    assert UNet.load(final).config.prediction_type == "v_prediction"
    pipe = Pipeline.load(tmp_path / "split" / "pipeline")
    assert pipe.unet.config.prediction_type == "v_prediction" and pipe.config.name == "base-v"
    report = json.loads((tmp_path / "split" / "samples" / "step_0000003.json").read_text())
    assert set(report["mse_to_source@2"]) == {"v@2"} and report["mse_to_source@2"]["v@2"] >= 0


@pytest.mark.parametrize("cfg_prob", [0.0, 1.0])
def test_distill_loss_paths(source, cfg_prob):
    task = DistillTask(DistillConfig(source=source, student_steps=2, cfg_prob=cfg_prob, image_size=64))
    model = task.build()
    batch = task.collate([task.dataset()[i] for i in range(2)])
    gen = torch.Generator().manual_seed(0)
    per_sample, logs = task.loss(model, batch, gen)
    assert per_sample.shape == (2,) and bool(torch.isfinite(per_sample).all())
    assert logs["cfg_aware"] == cfg_prob
    # student == teacher at the start: L_dstl > 0 (one step is not two), L_ori adds gamma of it
    torch.testing.assert_close(per_sample.mean(), 1.2 * torch.tensor(logs["l_dstl"]), rtol=1e-5, atol=0)
    per_sample.mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad is None for p in task.teacher.parameters())


def test_distill_runs_resumes_and_exports(source, tmp_path):
    cfg = DistillConfig(source=source, student_steps=2, cfg_prob=0.5, image_size=64, sample_prompts=2)
    train(_loop(tmp_path / "straight", 3), DistillTask(cfg))
    train(_loop(tmp_path / "split", 1), DistillTask(cfg))
    final = distill_steps(_loop(tmp_path / "split", 3, sample_every=3), cfg, resume=True)
    _assert_same_weights(tmp_path / "straight", tmp_path / "split")
    split, straight = _metrics(tmp_path / "split"), _metrics(tmp_path / "straight")
    assert [r["cfg_aware"] for r in split] == [r["cfg_aware"] for r in straight]
    assert [r["loss"] for r in split] == [r["loss"] for r in straight]
    pipe = Pipeline.load(tmp_path / "split" / "pipeline")
    assert (pipe.config.steps, pipe.config.timestep_spacing) == (2, "trailing")
    assert UNet.load(final).config == pipe.unet.config
    report = json.loads((tmp_path / "split" / "samples" / "step_0000003.json").read_text())
    assert set(report["mse_to_teacher@4"]) == {"teacher@2", "student@2"}
    run = json.loads((tmp_path / "split" / "run_config.json").read_text())
    assert run["task"]["student_grid"] == [999, 499, 0] and run["task"]["teacher_grid"] == [999, 749, 499, 249, 0]


def test_bad_settings_are_one_line_errors(source, tmp_path, capsys):
    with pytest.raises(ConfigError, match="cfg_prob"):
        DistillConfig(source=source, cfg_prob=1.5)
    with pytest.raises(ConfigError, match="guidance range"):
        DistillConfig(source=source, guidance_range=(14.0, 2.0))
    assert main(["distill", "--run-dir", str(tmp_path / "r"), "--model", str(tmp_path / "nope")]) == 2
    assert "no snapfusion pipeline folder" in capsys.readouterr().err
    no_encoder = tmp_path / "pipe"
    Pipeline.load(source.pipeline).save(no_encoder, dtype=None)
    assert main(["finetune-v", "--run-dir", str(tmp_path / "r"), "--model", str(no_encoder)]) == 2
    err = capsys.readouterr().err
    assert "no VAE encoder" in err and len(err.strip().splitlines()) == 1


def test_export_pipeline_keeps_a_tiny_decoder(tiny_pipeline, tmp_path):
    from snapfusion.decoder.io import with_decoder
    from snapfusion.decoder.tiny import TinyDecoder, TinyDecoderConfig
    from snapfusion.distill.stages import export_pipeline

    tiny = TinyDecoder(TinyDecoderConfig(widths=(8, 8, 8, 8), blocks=(1, 1, 1, 1),
                                         scaling_factor=tiny_pipeline.decoder.config.scaling_factor))
    with_decoder(tiny_pipeline, tiny).save(tmp_path / "pipe", dtype=None)
    out = export_pipeline(ModelSource(pipeline=str(tmp_path / "pipe")), tmp_path / "pipe" / "unet",
                          tmp_path / "exported", tiny_pipeline.config)
    assert isinstance(Pipeline.load(out).decoder, TinyDecoder)


def test_corrupt_model_index_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{not json")
    assert main(["distill", "--run-dir", str(tmp_path / "r"), "--model", str(tmp_path / "pipe")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
