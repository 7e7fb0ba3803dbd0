"""CPU time of the decoders and the UNet with default (NCHW) and channels-last input, in one run: the measurement
behind `Pipeline.decode`'s channels-last input on the CPU (docs/benchmarks.md).

    python scripts/bench_decode_layout.py --threads 2 --repeats 5 --out results/cpu_latency/decode_channels_last.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from snapfusion.loading import resolve_model
from snapfusion.evolve.latency import time_round_robin


def paired_seconds(default, last, repeats: int) -> tuple[float, float]:
    """Median seconds of the two layouts, timed in alternating rounds (load hits both alike), one warm-up each."""
    with torch.inference_mode():
        ms = time_round_robin({"default": default, "last": last}, torch.device("cpu"), warmup=1, repeats=repeats)
    return ms["default"] / 1000, ms["last"] / 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.threads < 1 or a.repeats < 1:
        p.error("--threads and --repeats must be >= 1")
    torch.set_num_threads(a.threads)
    student, base = resolve_model("snapfusion"), resolve_model("base")
    torch.manual_seed(0)
    lat = torch.randn(1, 4, 64, 64)
    z, t, ctx = torch.randn(2, 4, 64, 64), torch.tensor([500, 500]), torch.randn(2, 77, 128)
    cl = torch.channels_last
    rows = {}
    for name, dec in (("halved decoder", student.decoder), ("full decoder", base.decoder)):
        default, last = paired_seconds(lambda: dec.images_from_latents(lat),
                                       lambda: dec.images_from_latents(lat.contiguous(memory_format=cl)), a.repeats)
        with torch.inference_mode():
            diff = (dec.images_from_latents(lat) - dec.images_from_latents(lat.contiguous(memory_format=cl)))
        rows[name] = {"default_s": default, "channels_last_s": last, "speedup": default / last,
                      "max_abs_diff": diff.abs().max().item()}
    unet = student.unet
    default, last = paired_seconds(lambda: unet(z, t, ctx), lambda: unet(z.contiguous(memory_format=cl), t, ctx),
                                   a.repeats)
    rows["student UNet (one guided call)"] = {"default_s": default, "channels_last_s": last, "speedup": default / last}
    for name, r in rows.items():
        print(f"{name:32s} {r['default_s']:.3f} s -> {r['channels_last_s']:.3f} s ({r['speedup']:.2f}x)"
              + (f", max |diff| {r['max_abs_diff']:.1e}" if "max_abs_diff" in r else ""))
    if a.out:
        meta = {"threads": a.threads, "repeats": a.repeats, "torch": torch.__version__, "cpu": platform.machine(),
                "date": time.strftime("%Y-%m-%d"), "input": "random latents (1, 4, 64, 64); UNet batch 2"}
        Path(a.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
