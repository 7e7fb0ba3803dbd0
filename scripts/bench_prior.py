"""CPU time of a pipeline's layout prior per image: text states -> the shifted start (``snapfusion.prior.start_shift``),
median and min of N calls after a warm-up, at 512² (64² latents) and the first DDIM timestep of 50 steps.

    python scripts/bench_prior.py --model base --threads 2
"""

import argparse
import statistics
import time

import torch

from snapfusion.loading import resolve_model
from snapfusion.prior import start_shift

PROMPT = "a red apple to the left of a cat on a blue background"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="base")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=50)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    pipe = resolve_model(a.model, device="cpu")
    if pipe.prior is None:
        raise SystemExit(f"{a.model} has no layout prior (prior/)")
    cond = pipe.encode_text([PROMPT])
    abar = float(pipe.schedule.alphas_cumprod[int(pipe.timesteps(50, "ddim")[0])])
    for _ in range(5):
        start_shift(pipe.prior, cond, (64, 64), abar)
    times = []
    for _ in range(a.calls):
        t0 = time.perf_counter()
        start_shift(pipe.prior, cond, (64, 64), abar)
        times.append(time.perf_counter() - t0)
    print(f"{a.model} prior: median {statistics.median(times) * 1e3:.2f} ms, min {min(times) * 1e3:.2f} ms "
          f"over {a.calls} calls ({a.threads} threads)")


if __name__ == "__main__":
    main()
