"""Export of a pipeline with a terminal layout prior: prior.onnx (fp32 in every precision) beside the three networks,
the onnxruntime backend starts from the same shifted noise as PyTorch, and parity covers the prior."""

import json

import onnx
import pytest
import torch

from snapfusion.export.components import ExportConfig
from snapfusion.export.onnx_export import MANIFEST, export_onnx
from snapfusion.export.ort import OrtPipeline
from snapfusion.export.parity import ParityError, check_parity, psnr
from snapfusion.pipeline import Pipeline
from snapfusion.prior import LayoutPrior, LayoutPriorConfig

PROMPTS = ["a red circle above a dog", "a cat on a gradient background"]


@pytest.fixture(scope="module")
def prior_pipeline(tiny_pipeline) -> Pipeline:
    """The tiny pipeline with a random prior whose block means are large enough to change the image."""
    torch.manual_seed(3)
    prior = LayoutPrior(LayoutPriorConfig(context_dim=32, grid=2, width=32, heads=2, layers=1))
    with torch.no_grad():
        prior.out.weight.mul_(20)
    p = tiny_pipeline
    return Pipeline(p.text_encoder, p.unet, p.decoder, p.config, tokenizer=p.tokenizer, encoder=p.encoder,
                    prior=prior.eval())


@pytest.fixture(scope="module")
def prior_onnx(prior_pipeline, tmp_path_factory):
    return export_onnx(prior_pipeline, tmp_path_factory.mktemp("onnx_prior"), ExportConfig())


def test_prior_graph_and_manifest_are_written(prior_pipeline, prior_onnx):
    assert (prior_onnx / "prior.onnx").is_file()
    assert json.loads((prior_onnx / MANIFEST).read_text())["prior"]["grid"] == 2
    ort_pipe = OrtPipeline.load(prior_onnx)
    context = torch.randn(3, 77, 32)
    assert (ort_pipe.prior(context) - prior_pipeline.prior(context)).abs().max() < 1e-4  # dynamic batch


def test_onnxruntime_applies_the_prior_as_torch_does(prior_pipeline, prior_onnx):
    ort_pipe = OrtPipeline.load(prior_onnx)
    report = check_parity(prior_pipeline, ort_pipe, ExportConfig(parity_steps=2), prior_onnx)
    assert [c.name for c in report.components] == ["text_encoder", "unet", "vae_decoder", "prior"]
    assert report.image_psnr >= 35, report.summary()
    kw = dict(steps=2, guidance=3.0)
    with_prior = ort_pipe.generate(PROMPTS, [1, 2], **kw)
    without = ort_pipe.generate(PROMPTS, [1, 2], use_prior=False, **kw)
    assert psnr(with_prior, prior_pipeline.generate(PROMPTS, [1, 2], **kw)) >= 35
    assert psnr(without, prior_pipeline.generate(PROMPTS, [1, 2], use_prior=False, **kw)) >= 35
    assert psnr(with_prior, without) < 30  # the prior changed the start, in both backends alike


def test_an_export_without_the_prior_fails_parity_by_name(prior_pipeline, tiny_pipeline, tmp_path):
    plain = export_onnx(tiny_pipeline, tmp_path / "plain", ExportConfig())
    with pytest.raises(ParityError, match="prior"):
        check_parity(prior_pipeline, OrtPipeline.load(plain), ExportConfig(parity_steps=1))


@pytest.mark.slow
def test_reduced_precision_keeps_the_prior_fp32(prior_pipeline, tmp_path):
    out = export_onnx(prior_pipeline, tmp_path / "fp16", ExportConfig(precision="fp16"))
    types = {t.data_type for t in onnx.load(str(out / "prior.onnx")).graph.initializer}
    assert types == {onnx.TensorProto.FLOAT}
    unet_types = {t.data_type for t in onnx.load(str(out / "unet.onnx")).graph.initializer}
    assert onnx.TensorProto.FLOAT16 in unet_types
    check_parity(prior_pipeline, OrtPipeline.load(out), ExportConfig(precision="fp16", parity_steps=2))
