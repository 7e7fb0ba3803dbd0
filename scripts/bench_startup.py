"""Start-up cost of ``snapfusion generate`` on this machine, in fresh processes: (a) importing the command line,
(b) ``snapfusion.load()``, (c) the first image (text -> PNG) and a second one (steady state), (d) the whole
``python -m snapfusion.cli generate ... --out`` process, in wall and in CPU seconds (user + system over all
threads: it moves less than wall time when other jobs share the machine). Several source trees (e.g. before and
after a change) are measured in one invocation, runs alternating between them so that other load hits all alike.

    python scripts/bench_startup.py --runs 5 --tree before=/tmp/before --tree after=.

Writes results/cpu_startup/startup.json (every run, medians, after/before ratios) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red apple to the left of a cat on a blue background"

# (b) and (c) in one fresh process: torch import, snapfusion.load(), two images saved as PNG, timed apart
CHILD = r"""
import json, sys, time
clock = lambda: (time.perf_counter(), time.process_time())
t0 = clock()
import torch
t1 = clock()
import snapfusion
pipe = snapfusion.load()
t2 = clock()
prompt, seed, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with torch.no_grad():
    pipe(prompt, seed=seed).images[0].save(out)
    t3 = clock()
    pipe(prompt, seed=seed).images[0].save(out)
    t4 = clock()
names = ("torch_import", "load", "first_image", "second_image")
spans = list(zip(names, (t0, t1, t2, t3), (t1, t2, t3, t4)))
print(json.dumps({**{f"{n}_s": b[0] - a[0] for n, a, b in spans}, **{f"{n}_cpu_s": b[1] - a[1] for n, a, b in spans}}))
"""
IMPORT = ("import time; t = time.perf_counter(); import snapfusion.cli.main; "
          "print(time.perf_counter() - t)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", action="append", default=None, metavar="LABEL=PATH",
                   help="a source tree to measure (its snapfusion package is imported through PYTHONPATH); "
                        "repeat for several (default: this checkout, labelled 'current')")
    p.add_argument("--runs", type=int, default=5, help="fresh processes per measurement and tree (default 5)")
    p.add_argument("--prompt", default=PROMPT, help="the prompt (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the children (default: unset)")
    p.add_argument("--out", default=str(ROOT / "results" / "cpu_startup" / "startup.json"))
    return p.parse_args(argv)


def _env(tree: Path, threads: int | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _run(cmd: list[str], env: dict[str, str], cwd: str) -> tuple[float, float, str]:
    """Wall and CPU (user + system) seconds of a fresh process, and its stdout; a failure stops the benchmark."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        sys.exit(f"bench_startup: {' '.join(cmd[:4])} ... failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return wall, after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime, done.stdout


def _sha(path: Path) -> str:
    """Hash of the decoded pixels (PNG text chunks may differ between versions)."""
    from PIL import Image
    import numpy as np

    return hashlib.sha256(np.asarray(Image.open(path)).tobytes()).hexdigest()[:16]


def measure_once(tree: Path, a: argparse.Namespace, tmp: Path, label: str) -> dict:
    """One run of every measurement for one tree."""
    env = _env(tree, a.threads)
    row: dict = {}
    wall, cpu, out = _run([sys.executable, "-c", IMPORT], env, str(tmp))
    row["cli_import_s"], row["cli_import_process_s"] = float(out.strip().splitlines()[-1]), wall
    png = tmp / f"{label}_api.png"
    wall, cpu, out = _run([sys.executable, "-c", CHILD, a.prompt, str(a.seed), str(png)], env, str(tmp))
    row.update(json.loads(out.strip().splitlines()[-1]))
    row["api_process_s"] = wall
    cli_png = tmp / f"{label}_cli.png"
    wall, cpu, out = _run([sys.executable, "-m", "snapfusion.cli", "generate", a.prompt, "--seed", str(a.seed),
                           "--out", str(cli_png), "--quiet"], env, str(tmp))
    row["generate_process_s"], row["generate_process_cpu_s"] = wall, cpu
    row["generate_reported"] = out.strip().splitlines()[-1]
    row["api_pixels"], row["cli_pixels"] = _sha(png), _sha(cli_png)
    return row


METRICS = (("cli_import_s", "import snapfusion.cli.main (in process)"),
           ("cli_import_process_s", "python -c 'import snapfusion.cli.main' (process)"),
           ("torch_import_s", "import torch"),
           ("load_s", "snapfusion.load() (after torch)"),
           ("first_image_s", "first image, text -> PNG"),
           ("second_image_s", "second image (steady state)"),
           ("generate_process_s", "whole `python -m snapfusion.cli generate` process"),
           ("torch_import_cpu_s", "CPU time: import torch"),
           ("load_cpu_s", "CPU time: snapfusion.load()"),
           ("first_image_cpu_s", "CPU time: first image"),
           ("second_image_cpu_s", "CPU time: second image"),
           ("generate_process_cpu_s", "CPU time: whole generate process"))


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Medians and minimums (the least disturbed run) per tree, and their ratios to the first tree's."""
    out: dict = {}
    for stat, fn in (("medians", statistics.median), ("minimums", min)):
        out[stat] = {label: {k: fn(r[k] for r in rows) for k, _ in METRICS} for label, rows in runs.items()}
        first = out[stat][next(iter(runs))]
        out[f"{stat}_ratio_to_first"] = {label: {k: v[k] / first[k] for k, _ in METRICS}
                                         for label, v in list(out[stat].items())[1:]}
    pixels = {label: sorted({r["cli_pixels"] for r in rows} | {r["api_pixels"] for r in rows})
              for label, rows in runs.items()}
    return {**out, "pixel_hashes": pixels, "identical_images": len({h for hs in pixels.values() for h in hs}) == 1}


def table(summary: dict) -> str:
    """Markdown: median and minimum of every measurement per tree, with ratios to the first tree when there are 2."""
    labels = list(summary["medians"])
    two = len(labels) == 2
    cols = [f"{lab} {stat}" for stat in ("median", "min") for lab in labels]
    if two:
        cols.insert(2, "ratio")
        cols.append("ratio")
    lines = ["| seconds | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for k, name in METRICS:
        cells = []
        for stat in ("medians", "minimums"):
            cells += [f"{summary[stat][lab][k]:.2f}" for lab in labels]
            if two:
                cells.append(f"{summary[f'{stat}_ratio_to_first'][labels[1]][k]:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    trees = {}
    for spec in a.tree or [f"current={ROOT}"]:
        label, _, path = spec.partition("=")
        if not path or not (Path(path) / "snapfusion" / "__init__.py").is_file():
            sys.exit(f"bench_startup: --tree must be LABEL=PATH of a source tree with snapfusion/, got {spec!r}")
        trees[label] = Path(path).resolve()
    runs: dict[str, list[dict]] = {label: [] for label in trees}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.runs):
            for label, tree in (trees.items() if i % 2 == 0 else reversed(trees.items())):  # alternate the order
                runs[label].append(measure_once(tree, a, Path(tmp), label))
                print(f"run {i + 1}/{a.runs} {label}: " + ", ".join(
                    f"{k} {runs[label][-1][k]:.2f}" for k, _ in METRICS), file=sys.stderr, flush=True)
    summary = summarize(runs)
    result = {"command": "python scripts/bench_startup.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "trees": {k: str(v) for k, v in trees.items()}, "prompt": a.prompt, "seed": a.seed, "runs": a.runs,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "load_average_before": load_before, "load_average_after": os.getloadavg(),
                          "OMP_NUM_THREADS": a.threads},
              **summary, "all_runs": runs}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(summary))
    print(f"identical images across trees and runs: {summary['identical_images']}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
