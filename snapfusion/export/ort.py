"""The ONNX Runtime backend: ``Pipeline`` with its networks (and layout prior) replaced by onnxruntime sessions.

A foreign model enters through a thin adapter (STYLE habit 1): tokenizer, schedule, samplers, guidance and the
``generate`` loop are the PyTorch pipeline's own; only the networks run in onnxruntime. Tensors stay on the CPU
between sessions (a CUDA execution provider copies them in and out).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from snapfusion.config import from_dict, load_json
from snapfusion.errors import SnapFusionError, WeightsError
from snapfusion.export.components import DECODER, PRIOR, TEXT, UNET
from snapfusion.export.onnx_export import KIND, MANIFEST
from snapfusion.models.autoencoder import AutoencoderConfig
from snapfusion.models.text import TextEncoderConfig
from snapfusion.models.unet_config import UNetConfig
from snapfusion.pipeline import Pipeline, PipelineConfig
from snapfusion.prior import LayoutPriorConfig

_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
          "tensor(int32)": np.int32}


class OrtNetwork:
    """An onnxruntime session called like a module: torch tensors in (cast to the graph's types), fp32 out."""

    def __init__(self, path: Path, config, providers: Sequence[str]):
        import onnxruntime as ort

        if not path.is_file():
            raise WeightsError(f"ONNX graph not found: {path}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        except Exception as err:  # onnxruntime raises its own untyped errors for corrupt or unloadable graphs
            raise WeightsError(f"{path}: onnxruntime cannot load it: {str(err).splitlines()[0]}") from None
        self.config = config
        self.path = path
        self.inputs = [(i.name, _NUMPY[i.type]) for i in self.session.get_inputs()]

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        feeds = {name: t.detach().cpu().numpy().astype(dtype, copy=False)
                 for (name, dtype), t in zip(self.inputs, tensors, strict=True)}
        return torch.from_numpy(self.session.run(None, feeds)[0]).float()


class OrtDecoder(OrtNetwork):
    """The decoder graph takes diffusion latents (the scaling factor is inside the graph)."""

    def images_from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self(latents)  # (B, 3, H, W) in [-1, 1]


class OrtPipeline(Pipeline):
    """``Pipeline.generate`` over an ONNX export folder written by ``snapfusion export --format onnx``."""

    @classmethod
    def load(cls, folder: str | Path, *, providers: Sequence[str] = ("CPUExecutionProvider",)) -> "OrtPipeline":
        """Open the graphs of an export folder with the given onnxruntime execution providers (``prior.onnx``
        where the manifest names a layout prior)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise WeightsError(f"ONNX export folder not found: {folder}")
        data = load_json(folder / MANIFEST)
        if data.get("kind") != KIND:
            raise WeightsError(f"{folder / MANIFEST}: expected kind {KIND!r}, found {data.get('kind')!r}")
        missing = [k for k in ("pipeline", "text_encoder", "unet", "decoder") if k not in data]
        if missing:
            raise WeightsError(f"{folder / MANIFEST}: missing key(s) {missing}")
        where = str(folder / MANIFEST)
        text = OrtNetwork(folder / f"{TEXT}.onnx", from_dict(TextEncoderConfig, data[TEXT], where=where), providers)
        unet = OrtNetwork(folder / f"{UNET}.onnx", from_dict(UNetConfig, data[UNET], where=where), providers)
        from snapfusion.decoder.tiny import KIND as TINY_KIND, TinyDecoderConfig

        decoder_cls = TinyDecoderConfig if data.get("decoder_kind") == TINY_KIND else AutoencoderConfig
        decoder = OrtDecoder(folder / f"{DECODER}.onnx", from_dict(decoder_cls, data["decoder"], where=where),
                             providers)
        prior = None
        if PRIOR in data:  # called like a LayoutPrior: text states in, block means out
            prior = OrtNetwork(folder / f"{PRIOR}.onnx", from_dict(LayoutPriorConfig, data[PRIOR], where=where),
                               providers)
        return cls(text, unet, decoder, from_dict(PipelineConfig, data["pipeline"], where=where), prior=prior)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # where the tensors between sessions live

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # the graphs' input and output type (fp16 graphs cast inside)

    def eval(self) -> "OrtPipeline":
        return self

    def to(self, device, dtype=None) -> "OrtPipeline":
        raise SnapFusionError("an ONNX Runtime pipeline has no device or dtype to change; choose providers at load")

    def denoiser(self, skip=None):
        if skip:
            raise SnapFusionError("skipping UNet blocks needs the PyTorch backend (the ONNX graph is fixed)")
        return super().denoiser()


def providers_for(device: str) -> tuple[str, ...]:
    """onnxruntime execution providers for a command's --device (cpu, cuda, cuda:N)."""
    import onnxruntime as ort

    if device == "cpu":
        return ("CPUExecutionProvider",)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SnapFusionError(f"--device {device}: this onnxruntime has no CUDA execution provider "
                              "(install onnxruntime-gpu)")
    return ("CUDAExecutionProvider", "CPUExecutionProvider")
