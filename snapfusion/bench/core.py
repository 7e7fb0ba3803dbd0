"""Per-component latency of text -> image generation: median, min and max over runs, peak memory, FLOPs and the
compute floor (FLOPs per image / measured matmul peak). Backends: PyTorch (eager or torch.compile'd UNet) and
ONNX Runtime (an export folder). Numbers from the same run are comparable; across machines only ratios are.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Literal

import torch

from snapfusion.config import to_dict
from snapfusion.errors import ConfigError
from snapfusion.fast import FastOptions, accelerate, compile_pipeline
from snapfusion.models.presets import ARCHITECTURES
from snapfusion.pipeline import Pipeline, PipelineConfig, Timings

PRESETS = ARCHITECTURES
COMPONENTS = ("text_encoder", "unet_per_step", "unet_total", "decoder", "total")
PROMPT = "a red apple to the left of a cat on a blue background"


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark: which pipeline, where, and how it samples."""

    model: str = ""                   # a pipeline folder / embedded name, or an ONNX export folder (onnxruntime)
    preset: str = ""                  # or a random-weight preset: one of PRESETS
    device: str = "cpu"
    backend: Literal["torch", "onnxruntime"] = "torch"
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    size: int = 512                   # image side in pixels
    steps: int = 8
    guidance: float = 7.5             # 1.0: no unconditional pass
    compile: bool | None = None       # torch.compile (torch backend); None: on with the fast path on CUDA
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"  # reduce-overhead: CUDA graphs
    compile_all: bool = False         # with compile: also the text encoder and the decoder
    runs: int = 5                     # timed runs after warm-up
    warmup: int = 2
    fast: bool | None = None          # snapfusion.fast (CUDA graphs over the loop, ...); None: on for CUDA + torch
    channels_last: bool = True        # with fast: NHWC UNet and decoder
    sdpa: str = "default"             # with fast: SDPA kernel (fast.SDPA); "tuned": fastest per attention shape
    cfg: Literal["batch2", "split"] = "batch2"  # with fast: guidance as one batch-2 call or two batch-1 calls

    def __post_init__(self):
        if bool(self.model) == bool(self.preset):
            raise ConfigError("bench: give exactly one of --model and --preset")
        if self.preset and self.preset not in PRESETS:
            raise ConfigError(f"bench: preset {self.preset!r} is not one of {list(PRESETS)}")
        if self.runs < 1 or self.warmup < 0 or self.steps < 1:
            raise ConfigError("bench: runs and steps must be >= 1, warmup >= 0")
        if (self.compile_mode != "default" or self.compile_all) and not self.compile:
            raise ConfigError("bench: --compile-mode and --compile-all need --compile")
        if self.backend == "onnxruntime" and self.preset:
            raise ConfigError("bench --backend onnxruntime needs --model pointing to an ONNX export folder")
        if self.backend == "onnxruntime" and self.compile:
            raise ConfigError("bench --compile needs --backend torch")
        if self.fast and (self.backend != "torch" or self.compile_mode != "default"):
            raise ConfigError("bench: the fast path needs --backend torch and --compile-mode default (it makes its "
                              "own CUDA graphs); add --no-fast")

    @property
    def uses_fast(self) -> bool:
        """Whether this run goes through snapfusion.fast (explicitly, or by default on CUDA)."""
        if self.fast is not None:
            return self.fast
        return self.backend == "torch" and self.device.startswith("cuda") and self.compile_mode == "default"

    @property
    def compiles(self) -> bool:
        """Whether the networks are torch.compile'd (explicitly, or by default with the fast path on CUDA)."""
        if self.compile is not None:
            return self.compile
        return self.uses_fast and self.device.startswith("cuda")

    def fast_options(self) -> FastOptions:
        """The snapfusion.fast levers of this run."""
        return FastOptions(compile=self.compiles, channels_last=self.channels_last, sdpa=self.sdpa, cfg=self.cfg)


def preset_pipeline(name: str, *, device: str | torch.device = "cpu", size: int = 512) -> Pipeline:
    """A random-weight pipeline of a preset's architecture (latency does not depend on the weights)."""
    from snapfusion.models.autoencoder import Decoder
    from snapfusion.models.presets import architecture
    from snapfusion.models.text import TextEncoder
    from snapfusion.models.unet import UNet

    text_cfg, unet_cfg, dec_cfg = architecture(name)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the target device (SD-v1.5 size is slow to init on a CPU)
        text, unet, decoder = TextEncoder(text_cfg), UNet(unet_cfg), Decoder(dec_cfg)
    cfg = PipelineConfig(name=name, resolution=size, steps=8, guidance=7.5)
    return Pipeline(text, unet, decoder, cfg).eval()


def count_flops(pipe: Pipeline, *, size: int, steps: int, guidance: float) -> dict[str, float]:
    """FLOPs (2 x MACs, torch.utils.flop_counter) of one image: text encoder, one UNet call, decoder, total."""
    from torch.utils.flop_counter import FlopCounterMode

    c, down = pipe.unet.config, pipe.decoder.config.downscale
    embedded = getattr(c, "guidance_embed", False)  # one call per step, w as an input
    batch = 1 if guidance == 1.0 or embedded else 2  # cond + uncond in one UNet batch (sampling.guided)
    extra = {"guidance": torch.full((batch,), guidance, device=pipe.device)} if embedded else {}
    dev, dtype = pipe.device, pipe.dtype
    z = torch.zeros(batch, c.in_channels, size // down, size // down, device=dev, dtype=dtype)
    ids = torch.zeros(batch, 77, dtype=torch.long, device=dev)
    flops = {}
    with torch.no_grad():
        for name, fn in (("text_encoder", lambda: pipe.text_encoder(ids)),
                         ("unet_per_step", lambda: pipe.unet(z, torch.full((batch,), 500, device=dev),
                                                             torch.zeros(batch, 77, c.context_dim, device=dev,
                                                                         dtype=dtype), **extra)),
                         ("decoder", lambda: pipe.decoder(z[:1]))):
            counter = FlopCounterMode(display=False)
            with counter:
                fn()
            flops[name] = float(counter.get_total_flops())
    flops["total"] = flops["text_encoder"] + steps * flops["unet_per_step"] + flops["decoder"]
    return flops


def matmul_peak(device: str | torch.device, dtype: torch.dtype, *, n: int = 8192, reps: int = 20) -> float:
    """Best measured FLOP/s of an n x n x n matmul (the compute floor's denominator)."""
    dev = torch.device(device)
    n = n if dev.type == "cuda" else 1024
    dtype = dtype if dev.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    best = float("inf")
    for _ in range(reps if dev.type == "cuda" else 3):
        _sync(dev)
        t0 = time.perf_counter()
        a @ b
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _load(cfg: BenchConfig):
    """The pipeline to time (and a torch pipeline for FLOP counting, when there is one)."""
    from snapfusion.loading import resolve_dtype, resolve_model

    if cfg.backend == "onnxruntime":
        from snapfusion.export.ort import OrtPipeline, providers_for

        return OrtPipeline.load(cfg.model, providers=providers_for(cfg.device)), None
    pipe = preset_pipeline(cfg.preset, device=cfg.device, size=cfg.size) if cfg.preset else \
        resolve_model(cfg.model, device=cfg.device)
    pipe.to(cfg.device, resolve_dtype(cfg.dtype))
    return pipe, pipe


def _compile_label(c: dict) -> str:
    fast = " +fast" if c.get("fast_used") else ""
    if not c["compile"]:
        return "False" + fast
    mode = c.get("compile_mode", "default")
    return ("True" if mode == "default" else mode) + (" +all" if c.get("compile_all") else "") + fast


def run_bench(cfg: BenchConfig) -> dict:
    """Time ``cfg.warmup`` + ``cfg.runs`` generations; return per-component stats, memory, FLOPs and floor."""
    pipe, torch_pipe = _load(cfg)
    dev = torch.device(cfg.device)
    flops = count_flops(torch_pipe, size=cfg.size, steps=cfg.steps, guidance=cfg.guidance) if torch_pipe else None
    if cfg.uses_fast:
        accelerate(pipe, cfg.fast_options())  # compile time is in first_run_s
    elif cfg.compiles:
        compile_pipeline(pipe, cfg.compile_mode, everything=cfg.compile_all)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    runs: list[dict[str, float]] = []
    t_first = time.perf_counter()
    warmup = max(cfg.warmup, 3) if cfg.uses_fast and dev.type == "cuda" else cfg.warmup  # eager, capture, first replay
    for i in range(warmup + cfg.runs):
        timings = Timings()
        pipe.generate([PROMPT], [i], steps=cfg.steps, guidance=cfg.guidance, height=cfg.size, width=cfg.size,
                      timings=timings)
        if i == 0:
            first_run_s = time.perf_counter() - t_first  # includes compilation
        if i >= warmup:
            runs.append(timings.as_dict())
    config = {**to_dict(cfg), "compile": cfg.compiles, "fast_used": cfg.uses_fast}
    result = {"config": config, "pipeline": pipe.config.name, "latency_s": {
        k: _stats([r[k] for r in runs]) for k in COMPONENTS}, "first_run_s": first_run_s,
        "peak_memory_mb": _peak_memory_mb(dev, cfg.backend), "environment": _environment(dev)}
    if flops is not None:
        peak = matmul_peak(dev, torch_pipe.dtype)
        result.update(flops=flops, matmul_peak_tflops=peak / 1e12, compute_floor_s=flops["total"] / peak)
    return result


def _peak_memory_mb(dev: torch.device, backend: str) -> dict[str, float | None]:
    gpu = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" and backend == "torch" else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the whole process
    return {"torch_cuda_allocated": gpu, "process_rss": rss}


def _environment(dev: torch.device) -> dict[str, str]:
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    return {"device": name, "torch": torch.__version__, "python": platform.python_version(),
            "threads": str(torch.get_num_threads())}


def markdown_table(results: list[dict]) -> str:
    """One row per benchmark: config, per-component medians in ms, total median/min/max, memory, floor."""
    head = ("| pipeline | backend | dtype | compile | steps | guidance | size | text ms | UNet ms/step | decoder ms "
            "| total ms (median [min, max]) | peak MB | TFLOP/image | floor ms |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        c, lat = r["config"], r["latency_s"]
        ms = {k: v["median"] * 1e3 for k, v in lat.items()}
        mem = r["peak_memory_mb"]["torch_cuda_allocated"] or r["peak_memory_mb"]["process_rss"]
        flops = f"{r['flops']['total'] / 1e12:.2f}" if "flops" in r else "—"
        floor = f"{r['compute_floor_s'] * 1e3:.1f}" if "compute_floor_s" in r else "—"
        total = f"{ms['total']:.1f} [{lat['total']['min'] * 1e3:.1f}, {lat['total']['max'] * 1e3:.1f}]"
        lines.append(f"| {r['pipeline']} | {c['backend']} | {c['dtype']} | {_compile_label(c)} | {c['steps']} | "
                     f"{c['guidance']} | {c['size']} | {ms['text_encoder']:.1f} | {ms['unet_per_step']:.2f} | "
                     f"{ms['decoder']:.1f} | {total} | {mem:.0f} | {flops} | {floor} |")
    return "\n".join(lines) + "\n"


def dumps(result: dict) -> str:
    """JSON text of a result (inf-free)."""
    return json.dumps(result, indent=2, default=str) + "\n"

