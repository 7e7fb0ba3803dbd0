"""The decoder commands end to end on a tiny random pipeline: reduce, latents cache, distill + resume, evaluate."""

import json

import pytest
import torch

from snapfusion.cli import main
from snapfusion.decoder.io import load_decoder
from snapfusion.decoder.tiny import TinyDecoder
from snapfusion.models.autoencoder import Decoder

LATENT_OPTS = ["--latent-steps", "1", "--resolution", "64", "--guidance-range", "1", "8"]
LOOP_OPTS = ["--batch-size", "2", "--num-workers", "0", "--mixed-precision", "no", "--log-every", "1",
             "--sample-every", "0", "--warmup-steps", "1"]


@pytest.fixture(scope="module")
def pipe_dir(tiny_pipeline, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe") / "tiny"
    tiny_pipeline.save(folder, dtype=None)
    return folder


def test_reduce_decoder_command(pipe_dir, tmp_path, capsys):
    assert main(["reduce-decoder", "--teacher", str(pipe_dir), "--out", str(tmp_path / "half")]) == 0
    student = load_decoder(tmp_path / "half")
    assert isinstance(student, Decoder) and student.config.decoder_widths == (4, 8, 16, 16)
    assert "fewer" in capsys.readouterr().out


@pytest.mark.slow
def test_distill_with_cache_resume_and_eval(pipe_dir, tmp_path, capsys):
    cache = tmp_path / "latents.safetensors"
    assert main(["decoder-latents", "--teacher", str(pipe_dir), "--latent-pool", "4", "--out", str(cache),
                 "--device", "cpu", *LATENT_OPTS]) == 0
    run = tmp_path / "run"
    args = ["distill-decoder", "--teacher", str(pipe_dir), "--run-dir", str(run), "--latent-cache", str(cache),
            "--latent-pool", "4", "--student", "tiny", "--tiny-widths", "8", "8", "8", "8", *LATENT_OPTS, *LOOP_OPTS]
    assert main([*args, "--max-steps", "2"]) == 0
    assert main([*args, "--max-steps", "3", "--resume"]) == 0
    assert json.loads((run / "final" / "step.json").read_text())["step"] == 3
    assert isinstance(load_decoder(run / "final"), TinyDecoder)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["loss"] > 0 for r in records)
    capsys.readouterr()
    assert main(["eval-decoder", str(run / "final"), "--teacher", str(pipe_dir), "--count", "3", "--device", "cpu",
                 *LATENT_OPTS]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["heldout_images"] == 3 and 0 < report["psnr_vs_teacher"][str(run / "final")]["psnr_mean"] < 100


def test_mismatched_latent_cache_is_a_one_line_error(pipe_dir, tmp_path, capsys):
    cache = tmp_path / "latents.safetensors"
    assert main(["decoder-latents", "--teacher", str(pipe_dir), "--latent-pool", "2", "--out", str(cache),
                 "--device", "cpu", *LATENT_OPTS]) == 0
    other_steps = ["--latent-steps", "2", "--resolution", "64", "--guidance-range", "1", "8"]
    code = main(["distill-decoder", "--teacher", str(pipe_dir), "--run-dir", str(tmp_path / "r"), "--latent-cache",
                 str(cache), "--latent-pool", "2", "--max-steps", "1", *other_steps, *LOOP_OPTS])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "latent_source" in err and len(err.splitlines()) == 1


def test_cache_latents_match_fresh_ones(tiny_pipeline, tmp_path):
    from snapfusion.decoder.task import (LatentSource, PromptStream, collate_prompts, read_latent_cache,
                                         teacher_latents, write_latent_cache)

    src = LatentSource(steps=1, resolution=64, pool=3)
    write_latent_cache(tiny_pipeline, src, 5, tmp_path / "c.safetensors", teacher="t", batch_size=2)
    cache = read_latent_cache(tmp_path / "c.safetensors", src, 5, "t")
    batch = collate_prompts([PromptStream(src, 5)[n] for n in (3, 5)])  # -> latents 0 and 2
    fresh = teacher_latents(tiny_pipeline, batch["prompt"], batch["seed"], batch["guidance"], src)
    torch.testing.assert_close(torch.stack([cache[0], cache[2]]), fresh, atol=1e-5, rtol=1e-5)


def test_start_from_continues_a_decoder_and_refuses_another_architecture(pipe_dir, tmp_path, capsys):
    """--start-from trains on from a decoder folder's weights; a folder of another architecture is a one-line error."""
    from snapfusion.decoder.task import StudentSpec, build_student

    assert main(["reduce-decoder", "--teacher", str(pipe_dir), "--out", str(tmp_path / "half"), "--init",
                 "random"]) == 0
    teacher = load_decoder(pipe_dir)
    start = load_decoder(tmp_path / "half")
    student = build_student(StudentSpec(init="l1", start=str(tmp_path / "half")), teacher)
    for (name, a), b in zip(student.state_dict().items(), start.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    capsys.readouterr()
    code = main(["distill-decoder", "--teacher", str(pipe_dir), "--run-dir", str(tmp_path / "r"), "--student", "tiny",
                 "--start-from", str(tmp_path / "half"), "--max-steps", "1", *LATENT_OPTS, *LOOP_OPTS])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "--start-from" in err and "\n" not in err


def test_eval_decoder_checks_its_pipeline_options_first(tmp_path, capsys):
    code = main(["eval-decoder", str(tmp_path / "never_read"), "--pipeline-metrics", "4", "--pipeline-steps", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--pipeline-steps" in err and "\n" not in err
