"""Decoder latency at 512x512 output (latent 4x64x64): base vs channel-halved vs TAESD-style, torch and onnxruntime.

Ratios are measured in one run on one machine (weights are random: latency does not depend on them).
Two CPU ratios per measure: ``*_s`` is the median of per-round ratios; ``*_best_s`` the ratio of each model's best
(minimum) round. On a CPU shared with other jobs, interference adds roughly the same absolute delay to every
multi-threaded run (tens of ms at --threads 2 on 2 cores), so it pulls the median ratio towards 1 more for the
shorter model; the best round estimates each model's uncontended latency. Read both (and --threads 1 as a check).

    nice python scripts/bench_decoder.py --threads 2 --out bench_decoder.json          # this CPU
    nice python scripts/bench_decoder.py --sd --threads 2                              # + SD-v1.5 size
    python3 scripts/bench_decoder.py --device cuda --sd --no-onnx                      # GPU (fp32 and fp16)
"""

from __future__ import annotations

import argparse
import json
import platform

import numpy as np
import torch
from torch import nn

from snapfusion.decoder.evaluate import median_seconds, onnx_runner, parameter_count, torch_latency
from snapfusion.decoder.reduce import reduce_decoder
from snapfusion.decoder.tiny import TinyDecoder, TinyDecoderConfig
from snapfusion.models.autoencoder import AutoencoderConfig, Decoder
from snapfusion.models.presets import base_autoencoder


def conv_macs(module: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of every Conv2d and Linear in one forward (attention matmuls excluded)."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        module(example)
    for h in handles:
        h.remove()
    return total


def models(args) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = Decoder(base_autoencoder())
    out = {"base": base, "base_halved": reduce_decoder(base, 0.5, method="first"),
           "tiny": TinyDecoder(TinyDecoderConfig(widths=tuple(args.tiny_widths), blocks=tuple(args.tiny_blocks)))}
    if args.taesd_size:
        out["tiny_taesd_size"] = TinyDecoder(TinyDecoderConfig())
    if args.sd:
        sd = Decoder(AutoencoderConfig.sd15())
        out.update({"sd15": sd, "sd15_halved": reduce_decoder(sd, 0.5, method="first")})
    return out


def cpu_latencies(nets: dict[str, nn.Module], example: torch.Tensor, rows: dict, args) -> None:
    """Median CPU seconds per model, torch and onnxruntime, measured round-robin so that load drift on a shared
    machine hits every model alike (the ratios are what to read)."""
    calls: dict[str, dict] = {}
    for name, m in nets.items():
        calls[name] = {"torch_s": lambda m=m: m(example)}
        if not args.no_onnx:
            calls[name]["onnx_s"] = onnx_runner(m, example, threads=args.threads)
    times: dict[str, dict[str, list[float]]] = {name: {k: [] for k in c} for name, c in calls.items()}
    with torch.no_grad():
        for name, c in calls.items():  # warm-up
            for fn in c.values():
                fn()
        for _ in range(args.repeats):
            for name, c in calls.items():
                for kind, fn in c.items():
                    times[name][kind].append(median_seconds(fn, repeats=1, warmup=0))
    for name, t in times.items():
        rows[name].update({k: float(np.median(v)) for k, v in t.items()})
        rows[name].update({k.replace("_s", "_min_s"): float(np.min(v)) for k, v in t.items()})
        rows[name].update({k.replace("_s", "_all_s"): v for k, v in t.items()})


def ratio_row(big: dict, small: dict) -> dict[str, float]:
    """big / small per measure; CPU times as the median of per-round ratios (robust to load drift, ``*_s``) and as
    the ratio of best rounds (robust to the additive delays of other jobs on a shared CPU, ``*_best_s``)."""
    out = {}
    for k, v in small.items():
        if k.endswith("_all_s"):
            out[k.replace("_all_s", "_s")] = float(np.median(np.array(big[k]) / np.array(v)))
            out[k.replace("_all_s", "_best_s")] = float(np.min(big[k]) / np.min(v))
        elif isinstance(v, (int, float)) and k in big and k not in out and not k.endswith("_min_s"):
            out[k] = big[k] / v
    return out


def _ort_version(args) -> str | None:
    if args.no_onnx or args.device != "cpu":
        return None
    import onnxruntime

    return onnxruntime.__version__


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7, help="timing rounds (each times every model once)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sd", action="store_true", help="also the SD-v1.5-size decoder and its halved version")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--tiny-widths", type=int, nargs="+", default=[64, 64, 48, 24], help="TAESD-style baseline")
    p.add_argument("--tiny-blocks", type=int, nargs="+", default=[3, 3, 2, 1])
    p.add_argument("--taesd-size", action="store_true", help="also the TAESD-sized tiny decoder (64-wide, 3-3-3-1)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    example = torch.randn(1, 4, 64, 64)
    nets = {name: m.eval() for name, m in models(args).items()}
    rows = {name: {"params": parameter_count(m), "gmacs": conv_macs(m, example) / 1e9} for name, m in nets.items()}
    if args.device == "cpu":
        cpu_latencies(nets, example, rows, args)
    for name, m in nets.items():
        row = rows[name]
        if args.device != "cpu":
            dev_m, dev_x = m.to(args.device), example.to(args.device)
            row["torch_fp32_s"] = torch_latency(dev_m, dev_x, repeats=20, warmup=5)
            row["torch_fp16_s"] = torch_latency(dev_m.half(), dev_x.half(), repeats=20, warmup=5)
            if args.device.startswith("cuda"):
                row["gpu"] = torch.cuda.get_device_name()
            m.float().cpu()
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    ratios = {}
    for small, big in (("base_halved", "base"), ("tiny", "base"), ("tiny", "base_halved"), ("sd15_halved", "sd15")):
        if small in rows and big in rows:
            ratios[f"{big}/{small}"] = ratio_row(rows[big], rows[small])
    report = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
              "torch": torch.__version__, "onnxruntime": _ort_version(args), "device": args.device, "rows": rows,
              "ratios": ratios}
    print(json.dumps(ratios, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
