"""ONNX export of the tiny pipeline: parity with PyTorch, the onnxruntime backend, the CLI."""

import copy

import pytest
import torch

from snapfusion.cli import main
from snapfusion.errors import WeightsError
from snapfusion.export.components import ExportConfig
from snapfusion.export.onnx_export import export_onnx
from snapfusion.export.ort import OrtPipeline
from snapfusion.export.parity import REPORT, ParityError, check_parity, psnr
from snapfusion.models.autoencoder import Decoder
from snapfusion.models.text import TextEncoder
from snapfusion.models.unet import UNet

PROMPTS = ["a red circle above a dog", "two cats"]


@pytest.fixture(scope="module")
def onnx_dir(tiny_pipeline, tmp_path_factory):
    return export_onnx(tiny_pipeline, tmp_path_factory.mktemp("onnx"), ExportConfig())


def test_export_writes_three_graphs_and_configs(onnx_dir):
    for name in ("text_encoder", "unet", "vae_decoder", "export"):
        assert (onnx_dir / (name + (".json" if name == "export" else ".onnx"))).is_file(), name


def test_fp32_parity_passes_and_is_written(tiny_pipeline, onnx_dir):
    report = check_parity(tiny_pipeline, OrtPipeline.load(onnx_dir), ExportConfig(parity_steps=2), onnx_dir)
    assert [c.name for c in report.components] == ["text_encoder", "unet", "vae_decoder"]
    assert all(c.rel_diff < 1e-4 for c in report.components), report.summary()
    assert report.image_psnr >= 35
    assert (onnx_dir / REPORT).is_file()


def test_parity_fails_loudly_on_a_different_model(tiny_pipeline, onnx_dir, tmp_path):
    other = copy.deepcopy(tiny_pipeline)
    with torch.no_grad():
        other.unet.conv_out.bias += 0.5  # a real mismatch, not a tightened threshold
    with pytest.raises(ParityError, match="unet"):
        check_parity(other, OrtPipeline.load(onnx_dir), ExportConfig(), tmp_path)
    assert "unet" in (tmp_path / REPORT).read_text()


def test_ort_backend_matches_torch_with_dynamic_batch_and_size(tiny_pipeline, onnx_dir):
    ort_pipe = OrtPipeline.load(onnx_dir)
    kw = dict(steps=2, guidance=4.0, height=64, width=128)  # batch 2, a size the graphs were not traced at
    ref = tiny_pipeline.generate(PROMPTS, [5, 6], **kw)
    got = ort_pipe.generate(PROMPTS, [5, 6], **kw)
    assert got.shape == ref.shape == (2, 3, 64, 128)
    assert psnr(got, ref) >= 35


def test_ort_backend_runs_no_torch_network(tiny_pipeline, onnx_dir, monkeypatch):
    ort_pipe = OrtPipeline.load(onnx_dir)
    ref = tiny_pipeline.generate(PROMPTS[:1], [1], steps=2)

    def boom(*args, **kwargs):
        raise AssertionError("a PyTorch network ran")

    for cls in (UNet, Decoder, TextEncoder):
        monkeypatch.setattr(cls, "forward", boom)
    got = ort_pipe.generate(PROMPTS[:1], [1], steps=2)
    assert psnr(got, ref) >= 35


def test_missing_export_is_one_line_error(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        OrtPipeline.load(tmp_path / "nope")
    (tmp_path / "export.json").write_text('{"kind": "pipeline"}')
    with pytest.raises(WeightsError, match="onnx-pipeline"):
        OrtPipeline.load(tmp_path)


def test_cli_generate_with_onnxruntime_backend(onnx_dir, tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "a dog", "--backend", "onnxruntime", "--model", str(onnx_dir), "--steps", "2",
                 "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    assert out.is_file()
    assert main(["generate", "a dog", "--backend", "onnxruntime", "--device", "cpu", "--out", str(out)]) == 2
    assert "--model" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_cli_export_reduced_precision_passes_default_parity(tiny_pipeline, tmp_path, precision, capsys):
    tiny_pipeline.save(tmp_path / "model", dtype=None)
    out = tmp_path / precision
    assert main(["export", "--model", str(tmp_path / "model"), "--precision", precision, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"parity ({precision})" in printed and (out / REPORT).is_file()


def test_onnx_export_of_a_compact_vocabulary_text_encoder(tiny_pipeline, tmp_path):
    """The token map travels inside the text encoder's graph: ORT and torch agree, known and unknown words alike."""
    from snapfusion.export.components import ExportConfig
    from snapfusion.export.onnx_export import export_onnx
    from snapfusion.export.ort import OrtPipeline
    from snapfusion.models.text import compact_vocabulary
    from snapfusion.pipeline import Pipeline

    ids = tiny_pipeline.tokenizer(["a red circle above a cat"])
    compact = compact_vocabulary(tiny_pipeline.text_encoder, ids.unique().tolist()).eval()
    pipe = Pipeline(compact, tiny_pipeline.unet, tiny_pipeline.decoder, tiny_pipeline.config,
                    tokenizer=tiny_pipeline.tokenizer)
    export_onnx(pipe, tmp_path / "onnx", ExportConfig(format="onnx"))
    ort_pipe = OrtPipeline.load(tmp_path / "onnx")
    for prompt in ("a red circle above a cat", "an astronaut on mars"):
        a = ort_pipe.encode_text([prompt])
        b = pipe.encode_text([prompt])
        assert (a - b).abs().max() < 1e-4, prompt
