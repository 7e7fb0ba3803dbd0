"""Core ML export: conversion runs on Linux; the packages cannot run here, so their interfaces are checked."""

import platform

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
