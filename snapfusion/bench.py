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
from snapfusion.pipeline import Pipeline, PipelineConfig, Timings

PRESETS = ("sd15", "snapfusion", "base", "base-snapfusion", "tiny")
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
    compile: bool = False             # torch.compile the UNet (torch backend)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"  # reduce-overhead: CUDA graphs
    compile_all: bool = False         # with compile: also the text encoder and the decoder
    runs: int = 5                     # timed runs after warm-up
    warmup: int = 2

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


def preset_pipeline(name: str, *, device: str | torch.device = "cpu", size: int = 512) -> Pipeline:
    """A random-weight pipeline of a preset's architecture (latency does not depend on the weights)."""
    import dataclasses as dc

    from snapfusion.models import presets, unet_config
    from snapfusion.models.autoencoder import AutoencoderConfig, Decoder
    from snapfusion.models.text import TextEncoder, TextEncoderConfig
    from snapfusion.models.unet import UNet

    sd_ae = AutoencoderConfig.sd15()
    table = {  # (text, unet, decoder)
        "sd15": (TextEncoderConfig.sd15(), unet_config.sd15(), sd_ae),
        "snapfusion": (TextEncoderConfig.sd15(), unet_config.snapfusion(), sd_ae.with_halved_decoder()),
        "base": (presets.base_text_encoder(), presets.base_unet(), presets.base_autoencoder()),
        "base-snapfusion": (presets.base_text_encoder(),
                            dc.replace(unet_config.snapfusion((64, 128, 192, 192), context_dim=128, norm_groups=16),
                                       attention_head_dim=32),
                            presets.base_autoencoder().with_halved_decoder()),
        "tiny": (TextEncoderConfig.tiny(), dc.replace(unet_config.tiny_sd15(), context_dim=32),
                 AutoencoderConfig.tiny()),
    }
    if name not in table:
        raise ConfigError(f"preset {name!r} is not one of {list(table)}")
    text_cfg, unet_cfg, dec_cfg = table[name]
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the target device (SD-v1.5 size is slow to init on a CPU)
        text, unet, decoder = TextEncoder(text_cfg), UNet(unet_cfg), Decoder(dec_cfg)
    cfg = PipelineConfig(name=name, resolution=size, steps=8, guidance=7.5)
    return Pipeline(text, unet, decoder, cfg).eval()


def count_flops(pipe: Pipeline, *, size: int, steps: int, guidance: float) -> dict[str, float]:
    """FLOPs (2 x MACs, torch.utils.flop_counter) of one image: text encoder, one UNet call, decoder, total."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = 1 if guidance == 1.0 else 2  # cond + uncond in one UNet batch (sampling.guided)
    c, down = pipe.unet.config, pipe.decoder.config.downscale
    dev, dtype = pipe.device, pipe.dtype
    z = torch.zeros(batch, c.in_channels, size // down, size // down, device=dev, dtype=dtype)
    ids = torch.zeros(batch, 77, dtype=torch.long, device=dev)
    flops = {}
    with torch.no_grad():
        for name, fn in (("text_encoder", lambda: pipe.text_encoder(ids)),
                         ("unet_per_step", lambda: pipe.unet(z, torch.full((batch,), 500, device=dev),
                                                             torch.zeros(batch, 77, c.context_dim, device=dev,
                                                                         dtype=dtype))),
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


def compile_pipeline(pipe, mode: str = "default", *, everything: bool = False) -> None:
    """torch.compile the pipeline's UNet in place (inductor ``mode``; "reduce-overhead" adds CUDA graphs, which
    remove the per-kernel launch cost that dominates small UNets at batch 2); ``everything``: also the text
    encoder and the decoder's ``images_from_latents``."""
    # CUDA graphs (reduce-overhead; max-autotune uses them too) reuse their output buffers: the text encoder's cond
    # output would be overwritten by the uncond call (a GPU run failed that way). There each call starts a new
    # graph step and hands out a copy.
    graphs = mode in ("reduce-overhead", "max-autotune")
    targets = [(pipe.unet, "forward")]
    if everything:
        targets += [(pipe.text_encoder, "forward"), (pipe.decoder, "images_from_latents")]
    for module, name in targets:
        compiled = torch.compile(getattr(module, name), mode=mode)
        setattr(module, name, _graph_safe(compiled) if graphs else compiled)


def _graph_safe(fn):
    def run(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return fn(*args, **kwargs).clone()
    return run


def _compile_label(c: dict) -> str:
    if not c["compile"]:
        return "False"
    mode = c.get("compile_mode", "default")
    return ("True" if mode == "default" else mode) + (" +all" if c.get("compile_all") else "")


def run_bench(cfg: BenchConfig) -> dict:
    """Time ``cfg.warmup`` + ``cfg.runs`` generations; return per-component stats, memory, FLOPs and floor."""
    pipe, torch_pipe = _load(cfg)
    dev = torch.device(cfg.device)
    flops = count_flops(torch_pipe, size=cfg.size, steps=cfg.steps, guidance=cfg.guidance) if torch_pipe else None
    if cfg.compile:
        compile_pipeline(pipe, cfg.compile_mode, everything=cfg.compile_all)  # compile time is in first_run_s
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    runs: list[dict[str, float]] = []
    t_first = time.perf_counter()
    for i in range(cfg.warmup + cfg.runs):
        timings = Timings()
        pipe.generate([PROMPT], [i], steps=cfg.steps, guidance=cfg.guidance, height=cfg.size, width=cfg.size,
                      timings=timings)
        if i == 0:
            first_run_s = time.perf_counter() - t_first  # includes compilation
        if i >= cfg.warmup:
            runs.append(timings.as_dict())
    result = {"config": to_dict(cfg), "pipeline": pipe.config.name, "latency_s": {
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

