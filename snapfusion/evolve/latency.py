"""Per-block latency lookup table (SnapFusion §3.1, Alg. 1: "ΔLatency from a lookup table on the target device").

Every res/attn block is timed in place: one full forward captures each block's real inputs, then the block alone
reruns on them (warm-up, median of N). The non-block pieces (conv_in, time embedding, resamples, output head) are
timed the same way, so ``predicted_ms = sum(pieces) + sum(blocks)`` is an independent estimate of the whole UNet,
checked against a timed whole forward. Blocks are also keyed by a shape signature (kind, widths, latent side), so
the latency of an edited config (an evolution action) is looked up without measuring it.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from snapfusion.errors import ConfigError, SnapFusionError
from snapfusion.fileio import atomic_write_text
from snapfusion.models.unet import UNet
from snapfusion.models.unet_config import UNetConfig, plan_blocks

Backend = Literal["torch", "onnxruntime"]
KIND = "latency-table"
CONTEXT_LEN = 77  # CLIP text length (the pipeline's context)


@dataclass(frozen=True)
class TableConfig:
    """How a per-block latency lookup table is measured (``snapfusion.bench.BenchConfig`` times whole pipelines)."""

    size: int = 512                 # image side in pixels; the latent side is size // 8
    batch: int = 2                  # UNet batch: 2 = one image with classifier-free guidance (cond + uncond)
    warmup: int = 3
    repeats: int = 10               # median of this many timings
    inner: int = 1                  # calls per timing (10+ on CUDA, where one call is launch-bound)
    backend: Backend = "torch"
    dtype: Literal["fp32", "fp16"] = "fp32"
    clock: Literal["wall", "cpu"] = "wall"  # "cpu": process CPU time, immune to other processes' load (1 thread only)
    cuda_graphs: bool = False       # CUDA, torch backend: time each piece as a replayed CUDA graph (no host dispatch,
                                    # as a deployed graph / TensorRT engine runs) instead of eager calls
    separate_whole: bool = False    # time the whole UNet first and free it before building the parts' runners:
                                    # about half the peak memory (the SD-v1.5 onnxruntime table needs it in 24 GiB),
                                    # but the whole and its parts no longer share rounds (use with clock "cpu")


def block_sides(cfg: UNetConfig, latent: int) -> dict[str, int]:
    """Latent side (pixels of the latent grid) at which each block runs."""
    sides, level = {}, 0
    stages = [(f"down.{i}", s) for i, s in enumerate(cfg.down)] + ([("mid", cfg.mid)] if cfg.mid else [])
    stages += [(f"up.{i}", s) for i, s in enumerate(cfg.up)]
    for where, stage in stages:
        for bid in stage.blocks:
            sides[f"{where}.{bid}"] = latent // 2**level
        if stage.resample:
            level += 1 if where.startswith("down.") else -1
    return sides


def signatures(cfg: UNetConfig, latent: int) -> dict[str, str]:
    """Shape signature of every block, e.g. ``res:384->192@16``; equal signatures cost the same."""
    sides = block_sides(cfg, latent)
    return {name: f"{p.kind}:{p.in_channels}->{p.out_channels}@{sides[name]}" for name, p in plan_blocks(cfg).items()}


# ---- timing ------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(fns: dict[str, Callable[[], Any]], device: torch.device, *, warmup: int, repeats: int,
                     inner: int = 1, clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median milliseconds of each ``fn()`` (``inner`` calls per timing, after ``warmup`` calls).

    The functions are timed in rounds, one timing of each per round, so that a burst of load from other processes
    on a shared machine spoils one round of every function rather than all timings of one.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = clock()
            for _ in range(inner):
                fn()
            _sync(device)
            times[name].append((clock() - t0) * 1000 / inner)
    return {name: statistics.median(v) for name, v in times.items()}


class _Head(nn.Module):
    """The UNet's output head: GroupNorm -> SiLU -> conv_out."""

    def __init__(self, unet: UNet):
        super().__init__()
        self.norm_out, self.conv_out = unet.norm_out, unet.conv_out

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(h)))


class _SkipConcat(nn.Module):
    """The forward's skip-connection concatenations, which run between blocks (one per up block with a skip).

    A concatenation's cost is the bytes it writes, not where the split falls, so each is timed as the concatenation
    of the two channel halves of the block input it made (captured), which writes the same tensor. ``predict_ms``
    prices it as a fixed piece, as measured: an edit that changes the number of skips (a down res block removed)
    moves it by one concatenation, 0.02-0.11 ms in the shipped GPU tables.
    """

    def forward(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        return [torch.cat(inputs[i: i + 2], dim=1) for i in range(0, len(inputs), 2)]


def _concat_inputs(unet: UNet, inputs: dict[str, tuple]) -> tuple[torch.Tensor, ...]:
    """Two contiguous halves of the input of every block that pops a skip (flattened pairs for ``_SkipConcat``)."""
    out: list[torch.Tensor] = []
    for stage in unet.up:
        for plan in stage.order:
            if plan.pop_skip:
                x = inputs[plan.name][0]
                k = x.shape[1] // 2
                out += [x[:, :k].contiguous(), x[:, k:].contiguous()]
    return tuple(out)


class CudaGraphRunner:
    """``module(*inputs)`` captured once as a CUDA graph and replayed: GPU time without host dispatch."""

    def __init__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graphs asks
            for _ in range(3):
                module(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = module(*inputs)  # kept: the graph writes into these tensors on every replay

    def __call__(self) -> None:
        self.graph.replay()


def _pieces(unet: UNet) -> list[tuple[str, nn.Module]]:
    """The non-block modules, in execution order (their inputs are captured with hooks)."""
    out = [("conv_in", unet.conv_in), ("time_embedding", unet.time_embedding)]
    for i, stage in enumerate(unet.down):
        if stage.resample is not None:
            out.append((f"down.{i}.resample", stage.resample))
    for i, stage in enumerate(unet.up):
        if stage.resample is not None:
            out.append((f"up.{i}.resample", stage.resample))
    return out


@torch.no_grad()
def capture_inputs(unet: UNet, z: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> dict[str, tuple]:
    """Inputs of every block and non-block piece from one forward (the head's input under ``head``)."""
    return unet.capture_block_inputs(z, t, ctx, extra=[*_pieces(unet), ("head", unet.norm_out)])


class OrtRunner:
    """One module exported to ONNX and run by onnxruntime on the inputs it was exported with."""

    def __init__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], folder: Path, name: str,
                 providers: list[str]):
        import onnxruntime as ort

        path = folder / f"{name}.onnx"
        names = [f"in{i}" for i in range(len(inputs))]
        torch.onnx.export(module, inputs, str(path), input_names=names, output_names=["out"], dynamo=False,
                          opset_version=17)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = torch.get_num_threads()  # the same CPU threads as the torch backend
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        feed_names = [i.name for i in self.session.get_inputs()]
        self.feed = {n: x.cpu().numpy() for n, x in zip(names, inputs) if n in feed_names}

    def __call__(self) -> None:
        self.session.run(None, self.feed)


def _runner(module: nn.Module, inputs: tuple, cfg: TableConfig, tmp: Path, name: str, device: torch.device):
    if cfg.backend == "torch":
        return CudaGraphRunner(module, inputs) if cfg.cuda_graphs else lambda: module(*inputs)
    providers = ["CUDAExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    return OrtRunner(module, inputs, tmp, name.replace(".", "_"), providers)


@torch.no_grad()
def measure_table(unet: UNet, cfg: TableConfig, *, device: torch.device | str = "cpu",
                  meta: dict | None = None, progress: Callable[[str, float], None] | None = None) -> dict:
    """Time every block and piece of ``unet`` in place, and the whole forward; returns the table (JSON-ready)."""
    from snapfusion.config import to_dict

    device = torch.device(device)
    if cfg.backend not in ("torch", "onnxruntime"):
        raise ConfigError(f"backend must be 'torch' or 'onnxruntime', got {cfg.backend!r}")
    if cfg.size % 64 or cfg.batch < 1:
        raise SnapFusionError(f"--size must be a multiple of 64 and --batch >= 1, got {cfg.size}, {cfg.batch}")
    if cfg.cuda_graphs and (device.type != "cuda" or cfg.backend != "torch"):
        raise SnapFusionError("--cuda-graphs times torch modules on a CUDA device: use it with --device cuda "
                              "--backend torch")
    if cfg.clock == "cpu" and (device.type != "cpu" or torch.get_num_threads() != 1):
        raise SnapFusionError("--clock cpu measures one CPU thread: use it with --device cpu --threads 1")
    clock = time.process_time if cfg.clock == "cpu" else time.perf_counter
    dtype = torch.float16 if cfg.dtype == "fp16" else torch.float32
    unet = unet.to(device=device, dtype=dtype).eval()
    latent = cfg.size // 8
    gen = torch.Generator("cpu").manual_seed(0)
    z = torch.randn(cfg.batch, unet.config.in_channels, latent, latent, generator=gen).to(device, dtype)  # (B, 4, h, w)
    ctx = torch.randn(cfg.batch, CONTEXT_LEN, unet.config.context_dim, generator=gen).to(device, dtype)  # (B, 77, D)
    t = torch.full((cfg.batch,), 500.0, device=device)  # (B,)
    inputs = capture_inputs(unet, z, t, ctx)
    concat = _concat_inputs(unet, inputs)
    if concat:
        inputs["skip_concat"] = concat
    sigs = signatures(unet.config, latent)
    timing = dict(warmup=cfg.warmup, repeats=cfg.repeats, inner=cfg.inner, clock=clock)
    with tempfile.TemporaryDirectory() as tmp:
        whole: dict[str, float] = {}
        if cfg.separate_whole:
            runner = _runner(unet, (z, t, ctx), cfg, Path(tmp), "unet", device)
            whole = time_round_robin({"unet": runner}, device, **timing)
            del runner  # its session (a second copy of every weight) goes before the parts' sessions come
            gc.collect()
        modules = unet.named_blocks() + _pieces(unet) + [("head", _Head(unet))]
        if concat:
            modules.append(("skip_concat", _SkipConcat()))
        runners = {name: _runner(m, inputs[name], cfg, Path(tmp), name, device) for name, m in modules}
        if not cfg.separate_whole:
            runners["unet"] = _runner(unet, (z, t, ctx), cfg, Path(tmp), "unet", device)
        ms = time_round_robin(runners, device, **timing) | whole
    if progress:
        for name, value in ms.items():
            progress(name, value)
    blocks = {name: {"signature": sigs[name], "ms": ms[name]} for name, _ in unet.named_blocks()}
    pieces = {name: ms[name] for name in ms if name not in sigs and name != "unet"}
    whole = ms["unet"]
    predicted = sum(pieces.values()) + sum(b["ms"] for b in blocks.values())
    return {"kind": KIND, "meta": {**_machine(device), **to_dict(cfg), "latent": latent, **(meta or {})},
            "unet_config": to_dict(unet.config), "blocks": blocks, "pieces": pieces, "whole_ms": whole,
            "predicted_ms": predicted, "relative_error": predicted / whole - 1.0}


def _machine(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


# ---- the table as a file, and lookups ----------------------------------------------------------------------

def save_table(table: dict, path: str | os.PathLike) -> None:
    """Write the table as JSON (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(table, indent=1) + "\n")


def load_table(path: str | os.PathLike) -> dict:
    """Read a table written by ``save_table``; a wrong or incomplete file is a one-line error naming it."""
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SnapFusionError(f"cannot read latency table {path}: {err}") from None
    missing = [k for k in ("kind", "meta", "blocks", "pieces", "whole_ms") if k not in table]
    if missing or table["kind"] != KIND:
        raise SnapFusionError(f"{path}: not a latency table (kind {table.get('kind')!r}, missing {missing})")
    return table


def _signature_ms(table: dict) -> dict[str, float]:
    by_sig: dict[str, list[float]] = {}
    for entry in table["blocks"].values():
        by_sig.setdefault(entry["signature"], []).append(entry["ms"])
    return {s: statistics.median(v) for s, v in by_sig.items()}


def _estimate(sig: str, known: dict[str, float]) -> float:
    """A signature not in the table: same kind and side, scaled by in+out width (an estimate, flagged by callers)."""
    kind, rest = sig.split(":")
    widths, side = rest.split("@")
    cin, cout = (int(x) for x in widths.split("->"))
    same = [(s, ms) for s, ms in known.items() if s.startswith(kind + ":") and s.endswith("@" + side)]
    if not same:
        raise SnapFusionError(f"latency table has no {kind} block at side {side} to estimate {sig} from")
    ref_sig, ref_ms = min(same, key=lambda x: abs(sum(int(v) for v in x[0].split(":")[1].split("@")[0].split("->"))
                                                  - cin - cout))
    rin, rout = (int(x) for x in ref_sig.split(":")[1].split("@")[0].split("->"))
    return ref_ms * (cin + cout) / (rin + rout)


def predict_ms(cfg: UNetConfig, table: dict) -> tuple[float, list[str]]:
    """Predicted per-forward latency of ``cfg`` from ``table``; also the signatures that had to be estimated."""
    known = _signature_ms(table)
    sigs = signatures(cfg, table["meta"]["latent"])
    estimated = sorted({s for s in sigs.values() if s not in known})
    total = sum(table["pieces"].values())
    total += sum(known[s] if s in known else _estimate(s, known) for s in sigs.values())
    return total, estimated
