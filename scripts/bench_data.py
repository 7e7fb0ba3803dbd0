"""Measure scene-dataset throughput (images/s): single process, then optionally a DataLoader with workers.

Example: PYTHONPATH=. python scripts/bench_data.py --sizes 256 512 --count 500 --workers 0 8
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from torch.utils.data import DataLoader

from snapfusion.data import SceneDataset, collate_scenes


def bench(size: int, count: int, workers: int, batch: int) -> float:
    """Images per second for ``count`` dataset items at ``size`` (warm sprite caches excluded from timing)."""
    ds = SceneDataset("train", size=size, seed=0, length=count + 200)
    for i in range(count, count + 200):  # warm the per-size sprite and background caches
        ds[i]
    if workers == 0:
        start = time.perf_counter()
        for i in range(count):
            ds[i]
        return count / (time.perf_counter() - start)
    loader = DataLoader(torch.utils.data.Subset(ds, range(count)), batch_size=batch, num_workers=workers,
                        collate_fn=collate_scenes, persistent_workers=False)
    start = time.perf_counter()
    n = sum(len(b["caption"]) for b in loader)
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--count", type=int, default=300, help="items timed per setting")
    ap.add_argument("--workers", type=int, nargs="+", default=[0], help="0 = in-process, no DataLoader")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    for size in args.sizes:
        for workers in args.workers:
            rate = bench(size, args.count, workers, args.batch)
            print(f"size {size:5d}  workers {workers:3d}  {rate:8.1f} images/s")


if __name__ == "__main__":
    main()
