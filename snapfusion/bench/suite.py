"""The SD-scale tables of one run: each latency lever of ``snapfusion.fast`` as one row (cumulative, in order), the
anchors (diffusers' StableDiffusionPipeline at 50 and 8 steps, our SD-v1.5 preset at 50 steps) with ratios
against diffusers at 50 steps, and throughput at several batch sizes with peak memory, ours against diffusers'."""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from snapfusion.bench.core import PROMPT, _environment, count_flops, matmul_peak, preset_pipeline
from snapfusion.fast import (FastGenerate, FastOptions, compile_pipeline, default_backend, set_attention_backends,
                             time_attention_shapes)
from snapfusion.pipeline import Pipeline, Timings

COMPONENTS = ("text_encoder", "unet_per_step", "decoder", "total")


@dataclass(frozen=True)
class SuiteConfig:
    """One suite run: where, what sizes, how many runs, and how long it may take."""

    device: str = "cuda"
    dtype: str = "fp16"
    size: int = 512                      # image side in pixels
    steps: int = 8                       # the SnapFusion rows
    anchor_steps: int = 50               # the SD-v1.5 rows
    guidance: float = 7.5
    runs: int = 20                       # timed runs per latency row, after warm-up
    warmup: int = 3                      # eager (compilation), graph capture, first replay
    budget_s: float = 480.0              # rows not started by then are reported as skipped
    anchors: bool = True                 # latency: also diffusers and our SD-v1.5 preset
    batches: tuple[int, ...] = (1, 4, 16, 64)  # throughput
    throughput_runs: int = 3
    preset: str = "snapfusion"           # tests use the tiny presets
    guidance_preset: str = "snapfusion-guidance"
    sd_preset: str = "sd15"
    tiny_anchor: bool = False            # diffusers pipeline at test size
    compile: bool = True                 # torch.compile in the compiled rows (tests on a CPU turn it off)


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def time_pipe(pipe: Pipeline, *, batch: int = 1, steps: int, guidance: float, size: int, runs: int,
              warmup: int) -> dict:
    """Per-component seconds (median/min/max) of ``pipe.generate`` on ``batch`` prompts, first run, peak memory."""
    dev = pipe.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    done: list[dict[str, float]] = []
    first = None
    for i in range(warmup + runs):
        timings = Timings()
        t0 = time.perf_counter()
        pipe.generate([PROMPT] * batch, [i * batch + k for k in range(batch)], steps=steps, guidance=guidance,
                      height=size, width=size, timings=timings)
        first = time.perf_counter() - t0 if first is None else first
        if i >= warmup:
            done.append(timings.as_dict())
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    return {"latency_s": {k: _stats([r[k] for r in done]) for k in COMPONENTS}, "first_run_s": first,
            "peak_memory_mb": peak, "batch": batch, "steps": steps,
            "graphed_stages": pipe.fast.graphed if pipe.fast is not None else []}


def _diffusers_row(pipe, *, batch: int = 1, steps: int, cfg: SuiteConfig, runs: int, warmup: int) -> dict:
    from snapfusion.bench.anchor import time_diffusers

    r = time_diffusers(pipe, PROMPT, batch=batch, steps=steps, guidance=cfg.guidance, size=cfg.size, runs=runs,
                       warmup=warmup)
    return {"latency_s": {"total": _stats(r["total_s"])}, "first_run_s": r["first_run_s"],
            "peak_memory_mb": r["peak_memory_mb"], "batch": batch, "steps": steps}


class _Rows:
    """Runs rows in order under a time budget; an error or the budget ends a row, never the suite."""

    def __init__(self, cfg: SuiteConfig, on_row: Callable[[list[dict]], None] | None, log: Callable[[str], None]):
        self.cfg, self.on_row, self.log = cfg, on_row, log
        self.t0 = time.perf_counter()
        self.rows: list[dict] = []

    def __call__(self, name: str, group: str, fn: Callable[[], dict], **facts) -> dict | None:
        elapsed = time.perf_counter() - self.t0
        if elapsed > self.cfg.budget_s:
            r = {"skipped": f"time budget of {self.cfg.budget_s:.0f} s spent"}
        else:
            try:
                r = fn()
            except Exception as e:  # noqa: BLE001  (one failing lever must not hide the others)
                r = {"error": f"{type(e).__name__}: {e}"[:800]}
        r = {"row": name, "group": group, **facts, **r, "started_s": round(elapsed, 1)}
        self.rows.append(r)
        total = r.get("latency_s", {}).get("total", {}).get("median")
        self.log(f"[{elapsed:6.1f} s] {group} | {name}: " + (f"{total * 1e3:.2f} ms" if total else
                                                            r.get("error", r.get("skipped", r.get("note", "")))))
        if self.on_row:
            self.on_row(self.rows)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return r if "latency_s" in r else None


def _fresh_unet(preset: str, dev, dtype, *, channels_last: bool):
    from snapfusion.models.presets import architecture
    from snapfusion.models.unet import UNet

    torch.manual_seed(0)
    with torch.device(dev):
        unet = UNet(architecture(preset)[1])
    unet = unet.to(dev, dtype).eval().requires_grad_(False)
    return unet.to(memory_format=torch.channels_last) if channels_last else unet


def _compiled(unet, cfg: SuiteConfig):
    if cfg.compile:
        unet.forward = torch.compile(unet.forward, dynamic=False)
    return unet


def _options(**kw) -> FastOptions:
    """Levers off unless named (the rows add them one at a time)."""
    return FastOptions(**{**dict(graph=False, compile=False, channels_last=False, cache_uncond=False), **kw})


def _floors(cfg: SuiteConfig, peak: float) -> dict[str, dict]:
    """FLOPs per image (counted on the meta device) and the floor at ``peak`` FLOP/s, per (preset, steps)."""
    out = {}
    for name, steps in ((cfg.preset, cfg.steps), (cfg.guidance_preset, cfg.steps), (cfg.sd_preset, cfg.anchor_steps),
                        (cfg.sd_preset, cfg.steps)):
        flops = count_flops(preset_pipeline(name, device="meta", size=cfg.size), size=cfg.size, steps=steps,
                            guidance=cfg.guidance)
        out[f"{name}@{steps}"] = {"flops": flops, "floor_s": flops["total"] / peak}
    return out


def _start(suite: str, cfg: SuiteConfig, on_row, log) -> tuple:
    """A suite's device, dtype, result dict (its "rows" filled as rows finish, each reported to ``on_row`` with the
    whole result so far) and row runner."""
    from snapfusion.loading import resolve_dtype

    dev, dtype = torch.device(cfg.device), resolve_dtype(cfg.dtype)
    result = {"suite": suite, "config": dataclasses.asdict(cfg), "environment": _versions(dev), "rows": []}
    rows = _Rows(cfg, on_row and (lambda r: on_row({**result, "rows": r})), log)
    result["rows"] = rows.rows
    return dev, dtype, result, rows


def _channels_last_preset(cfg: SuiteConfig, dev, dtype) -> Pipeline:
    """The suite's preset pipeline at random weights, UNet and decoder channels-last."""
    pipe = preset_pipeline(cfg.preset, device=dev, size=cfg.size).to(dev, dtype)
    for m in (pipe.unet, pipe.decoder):
        m.to(memory_format=torch.channels_last)
    return pipe


def latency_suite(cfg: SuiteConfig, *, on_row=None, log: Callable[[str], None] = print) -> dict:
    """The lever rows of the SnapFusion preset and the anchor rows, in one process, in this order."""
    dev, dtype, result, rows = _start("latency", cfg, on_row, log)
    peak = matmul_peak(dev, dtype)
    result.update(matmul_peak_tflops=peak / 1e12, floors=_floors(cfg, peak))
    t = dict(steps=cfg.steps, guidance=cfg.guidance, size=cfg.size, runs=cfg.runs, warmup=cfg.warmup)
    key = f"{cfg.preset}@{cfg.steps}"
    pipe = preset_pipeline(cfg.preset, device=dev, size=cfg.size).to(dev, dtype)

    def lever(name, options, target=pipe, floor=key):
        target.fast = FastGenerate(options) if options is not None else None
        r = rows(name, "lever", lambda: time_pipe(target, **t), preset=target.config.name, floor=floor,
                 options=dataclasses.asdict(options) if options is not None else None)
        target.fast = None  # frees the runners' graphs
        return r

    lever(f"eager: Pipeline.generate, {cfg.dtype}, SDPA", None)
    lever(f"+ CUDA graphs: text encoder, whole {cfg.steps}-step loop, decoder", _options(graph=True))
    lever("+ negative-prompt context cached", _options(graph=True, cache_uncond=True))
    for m in (pipe.unet, pipe.decoder):
        m.to(memory_format=torch.channels_last)
    lever("+ channels-last UNet and decoder", _options(graph=True, cache_uncond=True, channels_last=True))
    if cfg.compile:
        compile_pipeline(pipe, dynamic=False)
    everything = dict(compile=cfg.compile, cache_uncond=True, channels_last=True)
    lever("torch.compile (UNet, text, decoder), static shapes, no graphs", _options(**everything))
    lever("+ CUDA graphs (all levers)", _options(graph=True, **everything))
    if cfg.compile:
        rows("GroupNorm+SiLU fused by the compiler?", "lever", lambda: groupnorm_silu_check(dev, dtype))
    _sdpa_row(rows, pipe, cfg, dev, dtype, lever)
    lever("split guidance: two batch-1 UNet calls per step (all levers)",
          _options(graph=True, cfg="split", **everything))
    unet = _compiled(_fresh_unet(cfg.guidance_preset, dev, dtype, channels_last=True), cfg)
    embedded = Pipeline(pipe.text_encoder, unet, pipe.decoder, dataclasses.replace(
        pipe.config, name=cfg.guidance_preset))  # compiled text encoder and decoder shared
    lever("guidance-embedded UNet: one batch-1 call per step (all levers)", _options(graph=True, **everything),
          target=embedded, floor=f"{cfg.guidance_preset}@{cfg.steps}")
    del embedded, unet, pipe
    if cfg.anchors:
        _anchor_rows(rows, cfg, dev, dtype)
    return result


def _sdpa_row(rows, pipe, cfg, dev, dtype, lever) -> None:
    """Time every SDPA backend on every attention shape; compile a UNet with the fastest per shape if that is
    not what PyTorch picks by itself."""
    batch = 2 if cfg.guidance != 1.0 else 1
    latent = cfg.size // pipe.decoder.config.downscale
    facts: dict = {}
    unet = _fresh_unet(cfg.preset, dev, dtype, channels_last=True)  # eager: the shape probe hooks its modules

    def probe():
        shapes, times = time_attention_shapes(unet, batch=batch, size=latent)
        default = {s: default_backend(s, device=dev, dtype=dtype) for s in times}
        best = {s: min(ts, key=ts.get) for s, ts in times.items()}
        facts.update(choice={n: best[s] for n, s in shapes.items()}, differs=any(best[s] != default[s] for s in times))
        return {"note": "SDPA seconds per call by shape (B, heads, Nq, Nk, head dim) and backend",
                "sdpa": [{"shape": list(s), "default": default[s], "best": best[s],
                          "seconds": {k: (v if v != float("inf") else None) for k, v in ts.items()}}
                         for s, ts in times.items()]}
    rows("SDPA backends per attention shape", "lever", probe)
    if not facts:
        return
    if not facts["differs"]:
        rows("+ fastest SDPA kernel per shape", "lever", lambda: {"note": "PyTorch's own pick is the fastest for "
                                                                          "every shape: same as the row above"})
        return
    set_attention_backends(unet, facts["choice"])
    tuned = Pipeline(pipe.text_encoder, _compiled(unet, cfg), pipe.decoder, pipe.config)
    lever("+ fastest SDPA kernel per shape (all levers)",
          _options(graph=True, compile=cfg.compile, cache_uncond=True, channels_last=True), target=tuned)


def _anchor_rows(rows, cfg: SuiteConfig, dev, dtype) -> None:
    from snapfusion.bench.anchor import diffusers_pipeline, speed_up

    holder = {}

    def build():
        holder["d"] = speed_up(diffusers_pipeline(device=dev, dtype=dtype, tiny=cfg.tiny_anchor), compile=cfg.compile)
        return {"note": "built"}
    rows("diffusers StableDiffusionPipeline (SD-v1.5 architecture)", "anchor-build", build)
    if "d" in holder:
        for steps in (cfg.anchor_steps, cfg.steps):
            rows(f"diffusers StableDiffusionPipeline, {steps} steps", "anchor",
                 lambda: _diffusers_row(holder["d"], steps=steps, cfg=cfg, runs=cfg.runs, warmup=cfg.warmup),
                 preset="diffusers-sd15", floor=f"{cfg.sd_preset}@{steps}")
    holder.clear()
    gc.collect()
    sd = preset_pipeline(cfg.sd_preset, device=dev, size=cfg.size).to(dev, dtype)
    for m in (sd.unet, sd.decoder):
        m.to(memory_format=torch.channels_last)
    if cfg.compile:
        compile_pipeline(sd, dynamic=False)
    sd.fast = FastGenerate(_options(graph=True, compile=cfg.compile, cache_uncond=True, channels_last=True))
    rows(f"ours, SD-v1.5 preset, {cfg.anchor_steps} steps (all levers)", "anchor",
         lambda: time_pipe(sd, steps=cfg.anchor_steps, guidance=cfg.guidance, size=cfg.size, runs=cfg.runs,
                           warmup=cfg.warmup), preset=cfg.sd_preset, floor=f"{cfg.sd_preset}@{cfg.anchor_steps}")
    sd.fast = None


def throughput_suite(cfg: SuiteConfig, *, on_row=None, log: Callable[[str], None] = print) -> dict:
    """Images/s and peak memory of our SnapFusion preset (all levers, compiled with automatic dynamic shapes) and of
    diffusers' pipeline at 50 steps, at each batch size."""
    from snapfusion.bench.anchor import diffusers_pipeline, speed_up
    dev, dtype, result, rows = _start("throughput", cfg, on_row, log)
    pipe = _channels_last_preset(cfg, dev, dtype)
    if cfg.compile:
        compile_pipeline(pipe, dynamic=None)
    options = _options(graph=True, compile=cfg.compile, cache_uncond=True, channels_last=True, dynamic=None)
    for b in cfg.batches:
        pipe.fast = FastGenerate(options)
        rows(f"ours, {cfg.preset}, {cfg.steps} steps", "throughput",
             lambda: time_pipe(pipe, batch=b, steps=cfg.steps, guidance=cfg.guidance, size=cfg.size,
                               runs=cfg.throughput_runs, warmup=3), preset=cfg.preset)
        pipe.fast = None
    del pipe
    holder = {"d": speed_up(diffusers_pipeline(device=dev, dtype=dtype, tiny=cfg.tiny_anchor), compile=cfg.compile)}
    for b in cfg.batches:
        rows(f"diffusers, {cfg.anchor_steps} steps", "throughput",
             lambda: _diffusers_row(holder["d"], batch=b, steps=cfg.anchor_steps, cfg=cfg,
                                    runs=max(1, cfg.throughput_runs - (b >= 64)), warmup=1 if b > 1 else 2),
             preset="diffusers-sd15")
    return result


KERNEL_KINDS = (  # (category, substrings of kernel names), first match wins
    ("compiled elementwise / norms (Triton)", ("triton",)),  # first: inductor names them after the ops they fuse
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("convolution", ("conv", "fprop", "dgrad", "nhwc", "implicit", "winograd")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "sm90")),
    ("copies", ("copy", "memcpy", "memset")),
)


def kernel_kind(name: str) -> str:
    """The category of a CUDA kernel by its name (KERNEL_KINDS), else "other"."""
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def kernel_breakdown(pipe: Pipeline, *, steps: int, guidance: float, size: int) -> dict:
    """GPU time per kernel category in one ``generate`` call (after two warm-up calls), and the call's wall time."""
    from torch.profiler import ProfilerActivity, profile

    for i in range(2):
        pipe.generate([PROMPT], [i], steps=steps, guidance=guidance, height=size, width=size)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        pipe.generate([PROMPT], [2], steps=steps, guidance=guidance, height=size, width=size)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kinds: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0:
            k = kinds.setdefault(kernel_kind(e.name), [0.0, 0])
            k[0] += e.device_time_total / 1e6
            k[1] += 1
    busy = sum(v[0] for v in kinds.values())
    return {"note": "GPU seconds by kernel category in one call", "wall_s": wall, "gpu_busy_s": busy,
            "kernels": {k: {"seconds": v[0], "count": v[1]} for k, v in sorted(kinds.items())}}


def profile_suite(cfg: SuiteConfig, *, on_row=None, log: Callable[[str], None] = print) -> dict:
    """Where the time of the SnapFusion preset goes: kernel categories, eager and compiled (no graphs, so the
    profiler sees each kernel; graph replay runs the same kernels without the gaps)."""
    dev, dtype, result, rows = _start("profile", cfg, on_row, log)
    pipe = _channels_last_preset(cfg, dev, dtype)
    probe = dict(steps=cfg.steps, guidance=cfg.guidance, size=cfg.size)
    pipe.fast = FastGenerate(_options(cache_uncond=True, channels_last=True))
    rows("kernels, eager, channels-last", "profile", lambda: kernel_breakdown(pipe, **probe))
    if cfg.compile:
        compile_pipeline(pipe, dynamic=False)
        pipe.fast = FastGenerate(_options(compile=True, cache_uncond=True, channels_last=True))
        rows("kernels, compiled, channels-last", "profile", lambda: kernel_breakdown(pipe, **probe))
    return result


def groupnorm_silu_check(dev, dtype) -> dict:
    """How many kernels inductor makes of GroupNorm followed by SiLU (1-2: fused, no hand kernel needed), timed."""
    import torch.nn.functional as F

    x = torch.randn(2, 320, 64, 64, device=dev, dtype=dtype).to(memory_format=torch.channels_last)
    w, b = torch.randn(320, device=dev, dtype=dtype), torch.randn(320, device=dev, dtype=dtype)

    def gn_silu(x):
        return F.silu(F.group_norm(x, 32, w, b, 1e-5))
    compiled = torch.compile(gn_silu, dynamic=False)
    from torch._inductor.utils import run_and_get_code

    _, code = run_and_get_code(compiled, x)
    kernels = sum(c.count("@triton.jit") + c.count("def cpp_fused") for c in code)
    return {"note": "GroupNorm(32 groups) + SiLU on (2, 320, 64, 64)", "compiled_kernels": kernels,
            "eager_ms": _median_ms(lambda: gn_silu(x), dev), "compiled_ms": _median_ms(lambda: compiled(x), dev)}


def _median_ms(fn, dev, reps: int = 50) -> float:
    fn()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _versions(dev) -> dict:
    env = _environment(dev)
    for name in ("diffusers", "transformers"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    if dev.type == "cuda":
        env["cuda"] = torch.version.cuda
    return env


def run_suite(name: str, *, device: str, dtype: str, size: int, steps: int, guidance: float, runs: int, warmup: int,
              budget_s: float, batches: str = "1,4,16,64", json_path: str | None = None,
              compile: bool = True) -> tuple[dict, str]:
    """Run the ``latency`` or ``throughput`` suite; the result is rewritten to ``json_path`` after every row."""
    from pathlib import Path

    from snapfusion.bench.core import dumps
    from snapfusion.bench.report import latency_markdown, profile_markdown, throughput_markdown
    from snapfusion.errors import ConfigError

    try:
        sizes = tuple(int(b) for b in batches.split(","))
    except ValueError:
        raise ConfigError(f"--batches must be comma-separated integers, got {batches!r}") from None
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"--batches must be positive, got {batches!r}")
    cfg = SuiteConfig(device=device, dtype=dtype, size=size, steps=steps, guidance=guidance, runs=runs,
                      warmup=warmup, budget_s=budget_s, batches=sizes, throughput_runs=runs, compile=compile)
    save = None
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        save = lambda r: Path(json_path).write_text(dumps(r))  # noqa: E731
    if name == "latency":
        result = latency_suite(cfg, on_row=save)
        return result, latency_markdown(result)
    if name == "profile":
        result = profile_suite(cfg, on_row=save)
        return result, profile_markdown(result)
    result = throughput_suite(cfg, on_row=save)
    return result, throughput_markdown(result)
