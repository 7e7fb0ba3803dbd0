"""The command line: generate from a pipeline folder, and one-line errors with exit status 2 for bad input."""

import subprocess
import sys

import pytest
from PIL import Image

from snapfusion.cli import main


@pytest.fixture(scope="module")
def pipeline_dir(tiny_pipeline, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe") / "tiny"
    tiny_pipeline.save(folder)
    return folder


def test_generate_writes_png(pipeline_dir, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert main(["generate", "a red circle", "--model", str(pipeline_dir), "--out", str(out), "--steps", "2",
                 "--quiet", "--device", "cpu"]) == 0
    image = Image.open(out)
    assert image.size == (64, 64)
    assert image.text["prompt"] == "a red circle" and image.text["steps"] == "2" and image.text["seed"] == "[0]"
    assert "ms/step" in capsys.readouterr().out


def test_generate_grid(pipeline_dir, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["generate", "a cat", "--model", str(pipeline_dir), "--out", str(out), "--steps", "1",
                 "--num-images", "4", "--quiet"]) == 0
    assert Image.open(out).size == (128, 128)


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model"], "not found"),
    (["--size", "63"], "multiple of"),
    (["--steps", "-3"], "steps"),
    (["--device", "tpu"], "--device"),
    (["--steps", "0"], "steps"),
    (["--guidance", "-1"], "guidance"),
    (["--guidance", "inf"], "guidance"),
    (["--num-images", "0"], "num-images"),
])
def test_bad_input_is_one_line(pipeline_dir, tmp_path, capsys, args, message):
    argv = ["generate", "a cat", "--model", str(pipeline_dir), "--out", str(tmp_path / "x.png"), "--quiet", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("snapfusion: error:") and message in err and "\n" not in err


def test_empty_prompt_and_unwritable_output(pipeline_dir, tmp_path, capsys):
    assert main(["generate", "  ", "--model", str(pipeline_dir), "--quiet"]) == 2
    assert "empty" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["generate", "a cat", "--model", str(pipeline_dir), "--steps", "1", "--quiet",
                 "-o", str(blocker / "out.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("snapfusion: error:") and "\n" not in err


def test_long_prompt_is_truncated_with_a_warning(pipeline_dir, tmp_path, capsys):
    assert main(["generate", "cat " * 100, "--model", str(pipeline_dir), "--steps", "1", "--quiet",
                 "-o", str(tmp_path / "long.png")]) == 0
    assert "warning" in capsys.readouterr().err


def test_corrupt_weights_exit_2_without_traceback(pipeline_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(pipeline_dir, broken)
    (broken / "vae_decoder" / "model.safetensors").write_bytes(b"\x00" * 10)
    proc = subprocess.run([sys.executable, "-m", "snapfusion.cli", "generate", "x", "--model", str(broken),
                           "--out", str(tmp_path / "y.png"), "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "vae_decoder" in proc.stderr


def test_help_has_an_example():
    proc = subprocess.run([sys.executable, "-m", "snapfusion.cli", "generate", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "example:" in proc.stdout


def test_eval_command_writes_protocol_json_grid_and_curve(pipeline_dir, tmp_path):
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(pipeline_dir), "--prompts", "test200", "--num-images", "4", "--steps", "1",
                 "--guidance-sweep", "1,3", "--size", "64", "--batch-size", "2", "--out", str(out),
                 "--device", "cpu"]) == 0
    files = {p.name for p in out.rglob("*")}
    assert any(f.endswith(".json") for f in files) and any(f.endswith(".png") for f in files)
    import json

    report = json.loads(next(p for p in out.rglob("*.json")).read_text())
    text = json.dumps(report)
    for key in ("clip_score", "fid", "attribute", "seed", "steps", "sampler"):
        assert key in text, key


def test_eval_needs_one_guidance_option(pipeline_dir, tmp_path, capsys):
    assert main(["eval", "--model", str(pipeline_dir), "--guidance", "2", "--guidance-sweep", "1,2",
                 "--out", str(tmp_path)]) == 2
    assert "exactly one" in capsys.readouterr().err


def test_generate_with_the_shipped_halved_decoder(tmp_path):
    """--decoder half swaps in the distilled channel-halved decoder of the base model (the distilled student)."""
    from snapfusion.loading import SHIPPED_DECODERS, resolve_model, swap_decoder

    base = resolve_model("base")
    half = swap_decoder(base, "half")
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(base.decoder) / n(half.decoder) > 3.5
    assert half.unet is base.unet and half.text_encoder is base.text_encoder
    out = tmp_path / "h.png"
    assert main(["generate", "a red circle", "--model", "base", "--decoder", "half", "--size", "64", "--steps", "1",
                 "--out", str(out), "--quiet"]) == 0
    assert Image.open(out).text["decoder"] == "half"
    assert (SHIPPED_DECODERS["half"] / "config.json").is_file()


def test_generate_with_a_missing_decoder_is_one_line(pipeline_dir, capsys):
    assert main(["generate", "a cat", "--model", str(pipeline_dir), "--decoder", "/nonexistent/dec", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "decoder not found" in err and len(err.strip().splitlines()) == 1


def test_generate_warns_about_words_the_base_model_cannot_read(tmp_path, capsys):
    assert main(["generate", "an astronaut riding a horse", "--model", "base", "--size", "64", "--steps", "1",
                 "--out", str(tmp_path / "w.png"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "does not know the word(s) astronaut, riding" in err and "horse" not in err


def test_eval_option_errors_come_before_loading(capsys):
    for args in (["--seeds-per-prompt", "0"], ["--num-images", "1"]):
        assert main(["eval", "--model", "/nonexistent/model", "--guidance", "2", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("snapfusion: error:") and "at least" in err and "\n" not in err


def test_diverged_sampling_is_one_line_and_writes_nothing(pipeline_dir, tmp_path, capsys, monkeypatch):
    """Non-finite latents end the command with one line and exit 2, never a black image."""
    import torch

    from snapfusion.models.unet import UNet

    monkeypatch.setattr(UNet, "forward", lambda self, z, *args, **kwargs: torch.full_like(z, float("nan")))
    out = tmp_path / "nan.png"
    assert main(["generate", "a cat", "--model", str(pipeline_dir), "--steps", "1", "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("snapfusion: error:") and "non-finite" in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".jpg", ".webp", ".png"])
def test_generate_keeps_the_settings_in_jpeg_webp_and_png(pipeline_dir, tmp_path, suffix):
    from snapfusion.images import read_metadata

    out = tmp_path / f"a{suffix}"
    assert main(["generate", "a red circle", "--model", str(pipeline_dir), "--out", str(out), "--steps", "1",
                 "--guidance", "3", "--negative-prompt", "blurry", "--quiet"]) == 0
    meta = read_metadata(out)
    assert meta["prompt"] == "a red circle" and meta["negative_prompt"] == "blurry" and meta["steps"] == "1"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left


def test_unused_negative_prompt_is_not_recorded_and_a_long_one_is_warned_about(pipeline_dir, tmp_path, capsys):
    from snapfusion.images import read_metadata

    out = tmp_path / "g1.png"
    assert main(["generate", "a cat", "--model", str(pipeline_dir), "--out", str(out), "--steps", "1",
                 "--guidance", "1", "--negative-prompt", "dog " * 100, "--quiet"]) == 0
    assert read_metadata(out)["negative_prompt"] == ""  # guidance 1: no unconditional pass, the text is unused
    err = capsys.readouterr().err
    assert "warning: the negative prompt is longer than CLIP's" in err


def test_argparse_errors_are_one_line_without_usage(capsys):
    for argv in (["generate"], ["generate", "a cat", "--seed", "x"], ["paint"], [], ["eval", "--nope"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("snapfusion: error:") and err.count("\n") == 1 and "usage:" not in err
