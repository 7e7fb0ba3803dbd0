"""Training throughput on 1, 2 and 4 processes, measured in one run: base UNet training (`snapfusion train-unet`) and
step distillation with the two-step teacher (`snapfusion distill`), a fixed number of steps at two per-process batch
sizes, each through `accelerate launch`. Writes one table: images/s (median of the training loop's logged rate
after the warm-up steps, all processes together), scaling against one process at the same per-process batch, peak
memory per process, and the mean logged loss over the same steps (the runs train the same model).

    python scripts/bench_scaling.py --processes 1,2,4 --batches 64,128 --steps 60 --out runs/scaling
    python scripts/bench_scaling.py --cpu --processes 1,2 --batches 2 --steps 4 --image-size 64 --out /tmp/scaling

Each run is `accelerate launch [--multi_gpu] --num_processes N scripts/bench_scaling.py --worker RUN_DIR --
<snapfusion arguments>` (with --cpu and N > 1: torchrun, gloo): the worker runs the command and writes its
process's peak memory beside the run's metrics.jsonl. Step time is not split into compute and communication here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TASKS = ("train-unet", "distill")


def worker(run_dir: str, args: list[str]) -> None:
    """Run one snapfusion command in this process and record the process's peak memory."""
    import resource

    import torch

    from snapfusion.cli import main

    code = main(args)
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    peak = {"rank": rank, "cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    Path(run_dir, f"peak_memory_rank{rank}.json").write_text(json.dumps(peak))
    sys.exit(code)


def command(task: str, run_dir: Path, *, batch: int, a: argparse.Namespace) -> list[str]:
    """The snapfusion arguments of one run."""
    args = [task, "--run-dir", str(run_dir), "--max-steps", str(a.steps), "--batch-size", str(batch),
            "--image-size", str(a.image_size), "--log-every", str(a.log_every), "--sample-every", "0",
            "--checkpoint-every", str(10**9), "--num-workers", str(a.num_workers),
            "--mixed-precision", a.mixed_precision, "--latent-pool", str(a.latent_pool)]
    args += ["--from-pipeline", a.model] if task == "train-unet" else ["--model", a.model]
    return args + (["--compile"] if a.compile else [])


def launch(task: str, processes: int, batch: int, a: argparse.Namespace) -> dict:
    """One `accelerate launch` run; its images/s, loss and peak memory from the run directory."""
    run_dir = Path(a.out) / f"{task}_p{processes}_b{batch}"
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in run_dir.glob("*"):  # a fresh run: stale metrics would be averaged in
        if old.is_file():
            old.unlink()
    if a.cpu and processes > 1:  # accelerate launches several CPU processes only through mpirun: torchrun (gloo)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    else:
        mode = ["--cpu"] if a.cpu else (["--multi_gpu"] if processes > 1 else [])
        launcher = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(processes),
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd = [*launcher, __file__, "--worker", str(run_dir), "--", *command(task, run_dir, batch=batch, a=a)]
    t0 = time.perf_counter()
    env = {**os.environ, **({"ACCELERATE_USE_CPU": "true"} if a.cpu else {})}  # torchrun + this: gloo processes
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    row = {"task": task, "processes": processes, "batch_per_process": batch, "wall_s": time.perf_counter() - t0,
           "returncode": done.returncode}
    if done.returncode != 0:
        return {**row, "error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = [r for r in records if r["step"] > a.warmup_steps] or records[-1:]
    peaks = [json.loads(p.read_text()) for p in sorted(run_dir.glob("peak_memory_rank*.json"))]
    return {**row, "images_per_s": statistics.median(r["samples_per_s"] for r in timed),
            "mean_loss": statistics.fmean(r["loss"] for r in records), "logged_steps": [r["step"] for r in records],
            "peak_cuda_mb": max((p["cuda_mb"] or 0 for p in peaks), default=None) or None,
            "peak_rss_mb": max((p["rss_mb"] for p in peaks), default=None)}


def table(rows: list[dict]) -> str:
    """One markdown row per run, with the scaling against one process at the same task and batch."""
    base = {(r["task"], r["batch_per_process"]): r.get("images_per_s") for r in rows if r["processes"] == 1}
    lines = ["| task | processes | batch per process | images/s | scaling vs 1 | peak MiB per process | mean loss |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['task']} | {r['processes']} | {r['batch_per_process']} | failed: {r['error']} | | | |")
            continue
        one = base.get((r["task"], r["batch_per_process"]))
        mem = r["peak_cuda_mb"] if r["peak_cuda_mb"] else r["peak_rss_mb"]
        lines.append(f"| {r['task']} | {r['processes']} | {r['batch_per_process']} | {r['images_per_s']:.1f} | "
                     f"{r['images_per_s'] / one:.2f}× | {mem:,.0f} | {r['mean_loss']:.4f} |" if one else
                     f"| {r['task']} | {r['processes']} | {r['batch_per_process']} | {r['images_per_s']:.1f} | — | "
                     f"{mem:,.0f} | {r['mean_loss']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        sep = argv.index("--")
        return worker(argv[1], argv[sep + 1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog="example: python scripts/bench_scaling.py --processes 1,2,4 --batches 64,128 "
                                       "--steps 60 --out runs/scaling")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated among %s" % ", ".join(TASKS))
    p.add_argument("--processes", default="1,2,4", help="process counts (GPUs), comma-separated")
    p.add_argument("--batches", default="64,128", help="per-process batch sizes, comma-separated")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=20, help="logged steps up to this one are not timed")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--model", default="base", help="pipeline whose UNet trains / teaches (default %(default)s)")
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--latent-pool", type=int, default=0, help="passed on (0: encode every batch)")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="bf16")
    p.add_argument("--compile", action="store_true", help="pass --compile to the training commands")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (a smoke test of the launch path)")
    p.add_argument("--out", required=True, help="folder for the runs, scaling.json and scaling.md")
    a = p.parse_args(argv)
    tasks = [t for t in a.tasks.split(",") if t]
    if set(tasks) - set(TASKS):
        p.error(f"--tasks must be among {TASKS}")
    rows = []
    for task in tasks:
        for batch in (int(b) for b in a.batches.split(",")):
            for n in (int(x) for x in a.processes.split(",")):
                rows.append(launch(task, n, batch, a))
                print(json.dumps(rows[-1]), flush=True)
                Path(a.out, "scaling.json").write_text(json.dumps({"args": vars(a), "rows": rows}, indent=2))
    text = table(rows)
    Path(a.out, "scaling.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
