"""``snapfusion bench-blocks``, ``robust-train`` and ``evolve``: thin commands around snapfusion.evolve."""

from __future__ import annotations

import argparse
from pathlib import Path

PRESETS = ("base", "sd15", "snapfusion", "tiny_sd15", "tiny_snapfusion")


def preset_config(name: str):
    """A UNet config by preset name (random weights are fine for latency)."""
    from snapfusion.errors import SnapFusionError
    from snapfusion.models import presets, unet_config

    table = {"base": presets.base_unet, "sd15": unet_config.sd15, "snapfusion": unet_config.snapfusion,
             "tiny_sd15": unet_config.tiny_sd15, "tiny_snapfusion": unet_config.tiny_snapfusion}
    if name not in table:
        raise SnapFusionError(f"unknown --preset {name!r} (known: {sorted(table)})")
    return table[name]()


def _unet_of(model: str | None, preset: str | None):
    import torch

    from snapfusion.errors import SnapFusionError
    from snapfusion.models.unet import UNet

    if (model is None) == (preset is None):
        raise SnapFusionError("give exactly one of --model or --preset")
    if preset is not None:
        torch.manual_seed(0)
        return UNet(preset_config(preset)), f"preset:{preset}"
    path = Path(model)
    if (path / "config.json").is_file() and not (path / "model_index.json").is_file():
        return UNet.load(path), str(path)  # a UNet folder
    from snapfusion.cli import resolve_model

    return resolve_model(model).unet, model


def cmd_bench_blocks(a: argparse.Namespace) -> None:
    import torch

    from snapfusion.cli import _device
    from snapfusion.evolve.latency import BenchConfig, measure_table, save_table

    torch.set_grad_enabled(False)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = _device(a.device)
    unet, source = _unet_of(a.model, a.preset)
    inner = a.inner or (10 if device.startswith("cuda") else 1)
    cfg = BenchConfig(size=a.size, batch=a.batch, warmup=a.warmup, repeats=a.repeats, inner=inner,
                      backend=a.backend, dtype=a.dtype, clock=a.clock, cuda_graphs=a.cuda_graphs,
                      separate_whole=a.separate_whole)
    table = measure_table(unet, cfg, device=device, meta={"model": source})
    save_table(table, a.out)
    top = sorted(table["blocks"].items(), key=lambda kv: -kv[1]["ms"])[:5]
    print(f"wrote {a.out}: {len(table['blocks'])} blocks; whole UNet {table['whole_ms']:.2f} ms, sum of parts "
          f"{table['predicted_ms']:.2f} ms ({100 * table['relative_error']:+.1f}%); slowest: "
          + ", ".join(f"{n} {v['ms']:.2f}" for n, v in top))


def register(sub: argparse._SubParsersAction) -> None:
    """Add the efficient-UNet commands to the ``snapfusion`` parser."""
    b = sub.add_parser("bench-blocks", help="per-block latency lookup table of a UNet (JSON)",
                       epilog="example: snapfusion bench-blocks --preset base --device cpu --out base_cpu.json")
    b.add_argument("--model", default=None, help="'base', a pipeline folder or a UNet folder")
    b.add_argument("--preset", default=None, help=f"a UNet preset at random weights: {', '.join(PRESETS)}")
    b.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    b.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch")
    b.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    b.add_argument("--size", type=int, default=512, help="image side in pixels; latent = size / 8 (default 512)")
    b.add_argument("--batch", type=int, default=2, help="UNet batch; 2 = one image with guidance (default 2)")
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--repeats", type=int, default=10, help="timings per block; the median is kept (default 10)")
    b.add_argument("--inner", type=int, default=0, help="calls per timing (default: 1 on cpu, 10 on cuda)")
    b.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    b.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: process CPU time, robust to load from other processes (needs --threads 1)")
    b.add_argument("--cuda-graphs", action="store_true", help="cuda: time every piece as a replayed CUDA graph "
                   "(GPU time without Python dispatch, as a deployed engine runs)")
    b.add_argument("--separate-whole", action="store_true", help="time the whole UNet in its own phase, freed "
                   "before the parts: about half the peak memory (SD-v1.5 with onnxruntime in 24 GiB); use with "
                   "--clock cpu, as the whole and its parts no longer share timing rounds")
    b.add_argument("--out", required=True, help="output JSON")
    b.set_defaults(func=cmd_bench_blocks)
    _register_evolution(sub)


def _register_evolution(sub: argparse._SubParsersAction) -> None:
    """Robust training and evolution commands (defined in evolve/run_commands.py)."""
    from snapfusion.evolve.run_commands import register_runs

    register_runs(sub)
