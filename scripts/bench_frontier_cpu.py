"""CPU seconds per image (text -> PNG) of several models and step counts in one process, round-robin (each row once
per round, after one warm-up), so that the rows are compared under the same machine load: the x axis of the
speed-quality frontier (scripts/plot_frontier.py).

    python scripts/bench_frontier_cpu.py --threads 2 --runs 3 --out results/frontier_485x4/cpu_seconds.json \
        snapfusion=snapfusion snapfusion-cfg=snapfusion-cfg base-ddim-8=base:8:ddim base-ddim-50=base:50:ddim:2

A row is LABEL=MODEL[:STEPS[:SAMPLER[:RUNS[:INTERVAL]]]] (steps and sampler default to the model's; RUNS caps that
row's timed runs, for slow rows; INTERVAL, e.g. 0,0.5, is the guidance interval, default the model's):

    python scripts/bench_frontier_cpu.py --threads 2 --runs 5 snapfusion=snapfusion cfg=snapfusion-cfg \
        cfg-half=snapfusion-cfg::::0,0.5
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from snapfusion.errors import InputError
from snapfusion.loading import resolve_model
from snapfusion.validation import parse_guidance_interval

sys.path.insert(0, str(Path(__file__).parent))
from bench_cpu_e2e import PROMPT, one_image  # noqa: E402  (the same timed unit: text -> PNG bytes)


def parse_row(text: str) -> dict:
    """LABEL=MODEL[:STEPS[:SAMPLER[:RUNS[:INTERVAL]]]] -> {label, model, steps, sampler, runs, guidance_interval}."""
    if "=" not in text:
        raise SystemExit(f"bench_frontier_cpu: error: row {text!r} is not "
                         "LABEL=MODEL[:STEPS[:SAMPLER[:RUNS[:INTERVAL]]]]")
    label, spec = text.split("=", 1)
    parts = spec.split(":")
    steps = int(parts[1]) if len(parts) > 1 and parts[1] else None
    sampler = parts[2] if len(parts) > 2 and parts[2] else None
    runs = int(parts[3]) if len(parts) > 3 and parts[3] else None
    try:
        interval = parse_guidance_interval(parts[4], name=f"row {label}: INTERVAL") if len(parts) > 4 and parts[4] \
            else None
    except InputError as err:
        raise SystemExit(f"bench_frontier_cpu: error: {err}") from None
    return {"label": label, "model": parts[0], "steps": steps, "sampler": sampler, "runs": runs,
            "guidance_interval": interval}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rows", nargs="+", help="LABEL=MODEL[:STEPS[:SAMPLER[:RUNS[:INTERVAL]]]]")
    p.add_argument("--runs", type=int, default=3, help="timed runs per row (a row's own RUNS caps it)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=None, help="write the result JSON here")
    a = p.parse_args()
    rows = [parse_row(r) for r in a.rows]
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    pipes = {r["label"]: resolve_model(r["model"]) for r in rows}
    for r in rows:  # warm-up, 2 steps: the same kernels
        one_image(pipes[r["label"]], 2, 0, r["sampler"], guidance_interval=(0, 1))
    times = {r["label"]: [] for r in rows}
    for k in range(a.runs):
        for r in rows:
            if k < min(a.runs, r["runs"] or a.runs):
                times[r["label"]].append(one_image(pipes[r["label"]], r["steps"], k, r["sampler"],
                                                   guidance_interval=r["guidance_interval"]))
        print(k, {label: round(v[-1], 3) for label, v in times.items() if v}, flush=True)
    out = {"prompt": PROMPT, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"), "rows": []}
    for r in rows:
        pipe = pipes[r["label"]]
        out["rows"].append({**r, "steps": r["steps"] or pipe.config.steps, "sampler": r["sampler"] or pipe.config.sampler,
                            "guidance": pipe.config.guidance,
                            "guidance_interval": list(r["guidance_interval"] or pipe.config.guidance_interval),
                            "seconds": times[r["label"]],
                            "median_s": statistics.median(times[r["label"]])})
    print(json.dumps(out, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
