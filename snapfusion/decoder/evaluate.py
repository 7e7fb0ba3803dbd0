"""Held-out evaluation of a distilled decoder: PSNR against the teacher decoder, latency, pipeline metrics."""

from __future__ import annotations

import dataclasses
from copy import deepcopy
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from snapfusion.data import load_prompt_set
from snapfusion.decoder.io import with_decoder
from snapfusion.decoder.task import LatentSource, teacher_latents
from snapfusion.pipeline import Pipeline


@torch.no_grad()
def heldout_latents(pipe: Pipeline, count: int, src: LatentSource, *, batch_size: int = 8,
                    num_emoji: int | None = None) -> torch.Tensor:
    """Latents of the first ``count`` test-split prompts (their own seeds; guidance evenly over the range)."""
    records = load_prompt_set("test", num_emoji)[:count]
    guidance = torch.linspace(src.guidance_min, src.guidance_max, len(records))
    out = []
    for i in range(0, len(records), batch_size):
        part = records[i: i + batch_size]
        out.append(teacher_latents(pipe, [r["prompt"] for r in part], [r["seed"] for r in part],
                                   guidance[i: i + batch_size], src).cpu())
    return torch.cat(out)  # (N, 4, h, w)


@torch.no_grad()
def decode_unit(decoder: nn.Module, latents: torch.Tensor, *, batch_size: int = 8) -> torch.Tensor:
    """Diffusion latents -> images in [0, 1] on the CPU, as the pipeline outputs them."""
    device = next(decoder.parameters()).device
    out = [decoder.images_from_latents(latents[i: i + batch_size].to(device)).float().add(1).div(2).clamp(0, 1).cpu()
           for i in range(0, len(latents), batch_size)]
    return torch.cat(out)


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1] (peak 1), (N,)."""
    mse = (images.float() - reference.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))


def psnr_report(students: dict[str, nn.Module], teacher: nn.Module, latents: torch.Tensor) -> dict[str, Any]:
    """Mean, min and 5th-percentile per-image PSNR of each student against the teacher decoder."""
    reference = decode_unit(teacher, latents)
    report = {}
    for name, student in students.items():
        p = psnr(decode_unit(student, latents), reference).numpy()
        report[name] = {"psnr_mean": float(p.mean()), "psnr_min": float(p.min()),
                        "psnr_p5": float(np.percentile(p, 5)), "images": len(p)}
    return report


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def median_seconds(fn: Callable[[], object], *, repeats: int = 3, warmup: int = 1,
                   sync: Callable[[], None] = lambda: None) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


@torch.no_grad()
def torch_latency(module: nn.Module, example: torch.Tensor, *, repeats: int = 3, warmup: int = 1) -> float:
    """Median seconds of ``module(example)`` (device-synchronised)."""
    cuda = example.device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(example.device)) if cuda else (lambda: None)
    return median_seconds(lambda: module(example), repeats=repeats, warmup=warmup, sync=sync)


def onnx_runner(module: nn.Module, example: torch.Tensor, *, threads: int | None = None) -> Callable[[], object]:
    """``module`` exported to ONNX (opset 17, TorchScript exporter) in an onnxruntime CPU session, as a call."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "decoder.onnx"
        copy = deepcopy(module).cpu().float().eval()  # the caller's module keeps its device and dtype
        torch.onnx.export(copy, (example.cpu().float(),), str(path), input_names=["latents"],
                          output_names=["image"], opset_version=17, dynamo=False)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {"latents": example.cpu().float().numpy()}
    return lambda: session.run(None, feed)


def onnx_latency(module: nn.Module, example: torch.Tensor, *, repeats: int = 3, warmup: int = 1,
                 threads: int | None = None) -> float:
    """Median seconds of the module run by onnxruntime on the CPU."""
    return median_seconds(onnx_runner(module, example, threads=threads), repeats=repeats, warmup=warmup)


@torch.no_grad()
def pipeline_metrics(pipe: Pipeline, decoders: dict[str, nn.Module], count: int, *, steps: int = 25,
                     guidance: float = 5.0, batch_size: int = 16, evaluators=None,
                     num_emoji: int | None = None) -> dict[str, Any]:
    """Domain CLIP score, FID and attribute accuracy of the full pipeline with each decoder on the same latents
    (the first ``count`` test prompts, restricted to the first ``num_emoji`` emoji if given)."""
    from snapfusion.eval.evaluators import evaluate_images, load_evaluators

    ev = evaluators or load_evaluators(device=pipe.device)
    records = load_prompt_set("test", num_emoji)[:count]
    src = dataclasses.replace(LatentSource(sampler="ddim", steps=steps), guidance_min=guidance, guidance_max=guidance)
    latents = heldout_latents(pipe, count, src, batch_size=batch_size, num_emoji=num_emoji)
    prompts = [r["prompt"] for r in records]
    scenes = [r["scene"] for r in records]
    out = {}
    for name, decoder in decoders.items():
        images = decode_unit(with_decoder(pipe, decoder).decoder, latents)
        out[name] = evaluate_images(ev, images.to(pipe.device), prompts, scenes)
    return out
