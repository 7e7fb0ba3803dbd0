"""Pipeline -> ONNX graphs (dynamic batch and image size), optionally fp16 or int8-weight, plus export.json.

Folder layout: ``text_encoder.onnx``, ``unet.onnx``, ``vae_decoder.onnx`` (``*.onnx.data`` beside a graph over
1.5 GB), ``prior.onnx`` where the pipeline has a layout prior (always fp32, as the PyTorch pipeline runs it),
``export.json`` (kind "onnx-pipeline": pipeline, network and export configs) and ``parity.json``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from snapfusion.config import save_json, to_dict
from snapfusion.export.components import (PRIOR, UNET, ExportConfig, Graph, graphs, refuse_guidance_embed,
                                          traceable_attention)

KIND = "onnx-pipeline"
MANIFEST = "export.json"
EXTERNAL_BYTES = 1_500_000_000  # above this, weights go to a .onnx.data file (protobuf's 2 GB limit)


def _dynamic_axes(graph: Graph) -> dict[str, dict[int, str]]:
    # batch everywhere; height and width of latents and images
    axes = {name: {0: "batch"} for name in (*graph.inputs, graph.output)}
    for name in ("z", "latents", "prediction", "images"):
        if name in axes:
            axes[name] = {0: "batch", 2: f"{name}_height", 3: f"{name}_width"}
    return axes


def _export_fp32(graph: Graph, path: Path, opset: int) -> None:
    # the TorchScript-based exporter: no onnxscript dependency; it saves external data itself above 2 GB
    with warnings.catch_warnings(), torch.no_grad(), traceable_attention():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph.module.eval(), graph.examples, str(path), dynamo=False, opset_version=opset,
                          input_names=list(graph.inputs), output_names=[graph.output],
                          dynamic_axes=_dynamic_axes(graph), do_constant_folding=True)


def _weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def _to_fp16(path: Path, name: str) -> None:
    """Convert weights and math to fp16 in place; graph inputs/outputs stay fp32 (cast inside the graph)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(path))
    # the sinusoidal timestep features need fp32: t * freq at t ~ 1000 loses whole radians in fp16
    keep = [n.name for n in model.graph.node if "/time_embedding/" in n.name] if name == UNET else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert_float_to_float16(model, keep_io_types=True, node_block_list=keep)
    _save(model, path)


def _to_int8(path: Path) -> None:
    """Dynamic int8 quantization of MatMul/Gemm/Conv weights (activations quantized at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_name(path.stem + ".int8.onnx")
    big = _weight_bytes(path) > EXTERNAL_BYTES
    # reduce_range: 7-bit weights. Without it, onnxruntime's u8 x s8 kernels on x86 CPUs without VNNI (e.g. this AMD
    # EPYC dev machine, AVX2 only) can saturate their 16-bit intermediate sums: the tiny test pipeline's text encoder
    # then missed parity (0.212 > 0.2 of max|ref|) on such a CPU and passed on VNNI ones. An export does not know the
    # CPU it will run on, so it takes the setting that is right on both (onnxruntime's quantize_dynamic docstring).
    quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                     use_external_data_format=big)
    for old in path.parent.glob(path.name + "*"):
        old.unlink()
    tmp.rename(path)  # a big graph's external data keeps its file name; the graph refers to it by that name


def _save(model, path: Path) -> None:
    import onnx

    for old in path.parent.glob(path.name + ".data"):
        old.unlink()
    big = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_BYTES
    onnx.save_model(model, str(path), save_as_external_data=big, location=path.name + ".data" if big else None)


def export_onnx(pipe, out: str | Path, cfg: ExportConfig) -> Path:
    """Write ``pipe``'s text encoder, UNet, decoder (and layout prior) as ONNX graphs plus ``export.json``; return
    the folder."""
    refuse_guidance_embed(pipe, "ONNX")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = pipe.eval()
    for graph in graphs(pipe, batch=2, resolution=cfg.resolution or None):
        path = out / f"{graph.name}.onnx"
        _export_fp32(graph, path, cfg.opset)
        if graph.name == PRIOR:
            continue  # fp32 in every precision (0.6 MB)
        if cfg.precision == "fp16":
            _to_fp16(path, graph.name)
        elif cfg.precision == "int8":
            _to_int8(path)
    write_manifest(pipe, out, cfg, kind=KIND)
    return out


def write_manifest(pipe, out: Path, cfg: ExportConfig, *, kind: str) -> None:
    """``export.json``: every config the exported files need to run (pipeline, networks, export; ``prior`` only where
    the pipeline has a layout prior)."""
    data = {"kind": kind, "pipeline": to_dict(pipe.config), "export": to_dict(cfg),
            "text_encoder": to_dict(pipe.text_encoder.config), "unet": to_dict(pipe.unet.config),
            "decoder": to_dict(pipe.decoder.config), "decoder_kind": decoder_kind(pipe.decoder)}
    if pipe.prior is not None:
        data[PRIOR] = to_dict(pipe.prior.config)
    save_json(data, out / MANIFEST)


def decoder_kind(decoder) -> str:
    """The folder kind of a decoder module, so that a reader parses its config with the right class."""
    from snapfusion.decoder.tiny import KIND as TINY_KIND, TinyDecoder

    return TINY_KIND if isinstance(decoder, TinyDecoder) else "vae-decoder"
