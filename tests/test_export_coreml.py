"""Core ML export: conversion runs on Linux; the packages cannot run here, so their interfaces are checked."""

import platform
import re

import pytest

ct = pytest.importorskip("coremltools", reason="coremltools is not installed (optional 'export' extra)")

from snapfusion.export.components import ExportConfig  # noqa: E402
from snapfusion.export.coreml_export import can_run_coreml, export_coreml, package_interface  # noqa: E402


def test_coreml_cannot_run_on_linux():
    assert can_run_coreml() == (platform.system() == "Darwin")


@pytest.mark.slow
def test_coreml_packages_have_the_pipeline_interface(tiny_pipeline, tmp_path):
    fp16 = export_coreml(tiny_pipeline, tmp_path / "fp16", ExportConfig(format="coreml", precision="fp16"))
    d = tiny_pipeline.text_encoder.config.hidden_size
    expected = {
        "text_encoder": ({"input_ids": [1, 77]}, {"hidden_states": [1, 77, d]}),
        "unet": ({"z": [2, 4, 8, 8], "t": [2], "context": [2, 77, d]}, {"prediction": [2, 4, 8, 8]}),
        "vae_decoder": ({"latents": [1, 4, 8, 8]}, {"images": [1, 3, 64, 64]}),
    }
    for name, (inputs, outputs) in expected.items():
        assert package_interface(fp16 / f"{name}.mlpackage") == {"inputs": inputs, "outputs": outputs}, name
    int8 = export_coreml(tiny_pipeline, tmp_path / "int8", ExportConfig(format="coreml", precision="int8"))
    size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())  # noqa: E731
    assert size(int8 / "unet.mlpackage") < 0.7 * size(fp16 / "unet.mlpackage")  # int8 weights, not fp16


@pytest.mark.slow
def test_coreml_exports_the_layout_prior_in_fp32(tiny_pipeline, tmp_path):
    import torch

    from snapfusion.pipeline import Pipeline
    from snapfusion.prior import LayoutPrior, LayoutPriorConfig

    p = tiny_pipeline
    prior = LayoutPrior(LayoutPriorConfig(context_dim=32, grid=2, width=32, heads=2, layers=1)).eval()
    pipe = Pipeline(p.text_encoder, p.unet, p.decoder, p.config, tokenizer=p.tokenizer, prior=prior)
    out = export_coreml(pipe, tmp_path / "int8", ExportConfig(format="coreml", precision="int8"))
    assert package_interface(out / "prior.mlpackage") == {"inputs": {"context": [1, 77, 32]},
                                                          "outputs": {"block_means": [1, 4, 2, 2]}}
    types = {name: set(re.findall(r"dataType: (\w+)", str(ct.models.MLModel(
        str(out / f"{name}.mlpackage"), skip_model_load=True).get_spec().mlProgram))) for name in ("unet", "prior")}
    assert {"FLOAT16", "INT8"} <= types["unet"]  # the int8 export's UNet: int8 weights, fp16 math
    assert "FLOAT32" in types["prior"] and not {"FLOAT16", "INT8"} & types["prior"]  # the prior: fp32 throughout
    assert torch.backends.mha.get_fastpath_enabled()  # restored after tracing
