"""End-to-end text -> PNG latency of two pipelines in one run: the student at its defaults and the
base at 50 DDIM steps with guidance, alternating, each after one warm-up, in this process (models loaded once).
Also the cold start of the `snapfusion generate` command (process start, model load, one image) for the first.

    python scripts/bench_cpu_e2e.py --runs 3 --threads 2 --out results/cpu_latency/e2e.json
"""

import argparse
import io
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from snapfusion.loading import resolve_model
from snapfusion.pipeline import to_pil

PROMPT = "a red apple to the left of a cat on a blue background"


def one_image(pipe, steps: int | None, seed: int, sampler: str | None = None, **settings) -> float:
    """Seconds for one image of PROMPT, text -> PNG bytes (steps and sampler: None for the model's; ``settings``:
    more ``Pipeline.generate`` arguments, e.g. guidance_interval)."""
    t0 = time.perf_counter()
    image = to_pil(pipe.generate([PROMPT], [seed], steps=steps, sampler=sampler, **settings))[0]
    image.save(io.BytesIO(), format="PNG")  # the PNG encode is part of text -> PNG
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", default="snapfusion")
    p.add_argument("--base", default="base")
    p.add_argument("--base-steps", type=int, default=50)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--base-runs", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    student, base = resolve_model(a.student), resolve_model(a.base)
    times = {"student": [], "base": []}
    one_image(student, None, 0), one_image(base, 2, 0)  # warm-up (the base's with 2 steps: same kernels)
    for r in range(max(a.runs, a.base_runs)):
        if r < a.runs:
            times["student"].append(one_image(student, None, r))
        if r < a.base_runs:
            times["base"].append(one_image(base, a.base_steps, r))
        print(r, {k: [round(x, 3) for x in v] for k, v in times.items()}, flush=True)
    cmd = [sys.executable, "-m", "snapfusion.cli", "generate", PROMPT, "--model", a.student, "--out",
           "/tmp/bench_e2e.png", "--quiet"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    cold = time.perf_counter() - t0
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"prompt": PROMPT, "student": {"model": a.student, "steps": student.config.steps,
                                            "guidance": student.config.guidance, "seconds": times["student"],
                                            "median_s": med["student"], "cli_cold_start_s": cold},
              "base": {"model": a.base, "steps": a.base_steps, "guidance": base.config.guidance,
                       "seconds": times["base"], "median_s": med["base"]},
              "speedup": med["base"] / med["student"], "threads": torch.get_num_threads(),
              "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
              "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(result, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
