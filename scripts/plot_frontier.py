"""The speed-quality frontier: attribute accuracy and CLIP score of every model against its CPU seconds per image,
as one markdown table and one figure. Quality from `snapfusion eval` JSONs, speed from
scripts/bench_frontier_cpu.py (rows joined by label).

    python scripts/plot_frontier.py --cpu results/frontier_485x4/cpu_seconds.json \
        --out docs/img/frontier.png --table results/frontier_485x4/frontier.md \
        snapfusion=results/frontier_485x4/latency_0.283_guidance_embedded_8_steps.json ...

The paired 95 % interval against the reference (the first row, or --reference) is scripts/compare_evals.py's
(clustered by prompt); rows on other prompts or seeds get none.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from compare_evals import compare  # noqa: E402


def load(path: str) -> dict:
    data = json.loads(Path(path).read_text())
    row = data["results"][0]
    return {"data": data, "all": row["attributes"]["all"] * 100, "clip": row["clip_score"],
            "fid": row["domain_fid"], "images": data["num_images"], "steps": data["steps"], "w": row["guidance"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("evals", nargs="+", help="LABEL[:CPU_LABEL]=eval.json (CPU_LABEL, default LABEL: the label of "
                   "its scripts/bench_frontier_cpu.py row; one model at two guidance scales shares one CPU row)")
    p.add_argument("--cpu", required=True, help="scripts/bench_frontier_cpu.py's JSON")
    p.add_argument("--reference", default=None, help="label of the paired reference (default: the first)")
    p.add_argument("--out", required=True, help="the figure (.png)")
    p.add_argument("--table", default=None, help="also write the markdown table here")
    a = p.parse_args()
    seconds = {r["label"]: r for r in json.loads(Path(a.cpu).read_text())["rows"]}
    rows = []
    for item in a.evals:
        label, path = item.split("=", 1)
        label, _, cpu_label = label.partition(":")
        cpu_label = cpu_label or label
        if cpu_label not in seconds:
            raise SystemExit(f"plot_frontier: error: {cpu_label!r} has no CPU row in {a.cpu}")
        rows.append({"label": label, "path": path, **load(path), "s": seconds[cpu_label]["median_s"],
                     "cpu_steps": seconds[cpu_label]["steps"]})
    ref = next(r for r in rows if r["label"] == (a.reference or rows[0]["label"]))
    lines = [f"| model | steps | w | CPU s / image | attribute accuracy | vs {ref['label']} (95 % interval, paired) | "
             "CLIP | domain FID | images |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r is ref:
            diff = "reference"
        else:
            try:
                d = compare(r["data"], ref["data"])[0]
                diff = (f"{100 * d['diff']:+.2f} ({100 * (d['diff'] - 1.96 * d['se']):+.2f}, "
                        f"{100 * (d['diff'] + 1.96 * d['se']):+.2f})")
            except ValueError:  # other images: no pairing
                diff = "not paired"
        lines.append(f"| {r['label']} | {r['steps']} | {r['w']:g} | {r['s']:.2f} | {r['all']:.1f} % | {diff} | "
                     f"{r['clip']:.2f} | {r['fid']:.3f} | {r['images']} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if a.table:
        Path(a.table).write_text(table)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, name in ((axes[0], "all", "attribute accuracy (%)"), (axes[1], "clip", "CLIP score (scene CLIP)")):
        for r in rows:
            ax.scatter(r["s"], r[key], s=40)
            ax.annotate(f"{r['label']} ({r['steps']}, w {r['w']:g})", (r["s"], r[key]), textcoords="offset points",
                        xytext=(5, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("CPU seconds per image (text -> PNG, log scale)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    fig.suptitle("Speed-quality frontier: 485 test prompts x 4 seeds (quality on an H100, speed on a 2-core CPU)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
