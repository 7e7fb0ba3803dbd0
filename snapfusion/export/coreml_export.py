"""Pipeline -> Core ML ``.mlpackage`` (ML Program) files through coremltools: text encoder, UNet, decoder, and the
layout prior where the pipeline has one (fp32 in every precision, as the PyTorch pipeline runs it).

Conversion runs anywhere coremltools installs; the packages only run on macOS/iOS, so on Linux the export is
checked by reading each package's interface (inputs, outputs, shapes), not by running it. Shapes are fixed:
coremltools 9.0 cannot lower GroupNorm with a symbolic batch, so the UNet is built for ``ExportConfig.batch``
(2 = cond + uncond of one guided image) and the text encoder, decoder and prior for batch 1.
"""

from __future__ import annotations

import platform
import warnings
from pathlib import Path

import numpy as np
import torch

from snapfusion.errors import SnapFusionError
from snapfusion.export.components import (PRIOR, TEXT, UNET, ExportConfig, Graph, graphs, refuse_guidance_embed,
                                         traceable_attention)
from snapfusion.export.onnx_export import write_manifest

KIND = "coreml-pipeline"
MIN_VERSION = "9.0"


def _coremltools():
    try:
        import coremltools as ct
    except ImportError:
        raise SnapFusionError("Core ML export needs coremltools (pip install coremltools==9.0)") from None
    return ct


def _graph_for(pipe, name: str, cfg: ExportConfig) -> Graph:
    batch = cfg.batch if name == UNET else 1
    return next(g for g in graphs(pipe, batch=batch, resolution=cfg.resolution or None) if g.name == name)


def _convert(ct, graph: Graph, cfg: ExportConfig):
    examples = graph.examples
    if graph.name == TEXT:
        examples = (examples[0].to(torch.int32),)  # Core ML has no int64 tensors
    with warnings.catch_warnings(), torch.no_grad(), traceable_attention():
        warnings.simplefilter("ignore")
        program = _program(graph, examples)
        inputs = [ct.TensorType(name=n, shape=tuple(x.shape), dtype=np.int32 if x.dtype == torch.int32 else np.float32)
                  for n, x in zip(graph.inputs, examples)]
        full = cfg.precision == "fp32" or graph.name == PRIOR
        precision = ct.precision.FLOAT32 if full else ct.precision.FLOAT16
        model = ct.convert(program, inputs=inputs, outputs=[ct.TensorType(name=graph.output)],
                           convert_to="mlprogram", compute_precision=precision,
                           minimum_deployment_target=ct.target.iOS16, skip_model_load=True)
        if cfg.precision == "int8" and graph.name != PRIOR:
            model = _quantize_int8(ct, model)
    return model


def _program(graph: Graph, examples: tuple[torch.Tensor, ...]):
    # transformers' CLIP leaves an `alias` node in torch.export graphs that coremltools 9.0 cannot read, so the
    # text encoder goes through TorchScript tracing; the UNet and decoder only convert through torch.export
    if graph.name == TEXT:
        return torch.jit.trace(graph.module.eval(), examples, strict=False)
    return torch.export.export(graph.module.eval(), examples).run_decompositions({})


def _quantize_int8(ct, model):
    """Linear symmetric int8 weights (coremltools.optimize; dequantized to fp16 at load)."""
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig, linear_quantize_weights

    config = OptimizationConfig(global_config=OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8"))
    return linear_quantize_weights(model, config=config)


def export_coreml(pipe, out: str | Path, cfg: ExportConfig) -> Path:
    """Write ``pipe``'s networks as ``text_encoder.mlpackage``, ``unet.mlpackage``, ``vae_decoder.mlpackage`` (and
    ``prior.mlpackage`` where it has a layout prior)."""
    refuse_guidance_embed(pipe, "Core ML")
    ct = _coremltools()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = pipe.eval()
    for name in (g.name for g in graphs(pipe, batch=1, resolution=cfg.resolution or None)):
        graph = _graph_for(pipe, name, cfg)
        model = _convert(ct, graph, cfg)
        model.save(str(out / f"{name}.mlpackage"))
    write_manifest(pipe, out, cfg, kind=KIND)
    return out


def package_interface(path: str | Path) -> dict[str, dict[str, list[int]]]:
    """{"inputs": {name: shape}, "outputs": {name: shape}} read from a saved package's spec (works on Linux)."""
    ct = _coremltools()
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    read = lambda features: {f.name: list(f.type.multiArrayType.shape) for f in features}  # noqa: E731
    return {"inputs": read(spec.description.input), "outputs": read(spec.description.output)}


def can_run_coreml() -> bool:
    """Core ML packages run only on macOS."""
    return platform.system() == "Darwin"
