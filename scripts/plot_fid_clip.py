"""FID-CLIP curves of several `snapfusion eval --guidance-sweep` runs on one plot (SnapFusion Fig. 7 style):
domain FID (lower is better) against CLIP score (higher is better), one point per guidance scale.

    python scripts/plot_fid_clip.py --out fid_clip.png \
        "student, 8 steps=runs/eval_student/eval.json" "base, 50 DDIM=runs/eval_base/eval.json"
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("curves", nargs="+", help="LABEL=path/to/eval.json, or LABEL=a.json,b.json for one curve whose "
                   "guidance scales were evaluated in several runs")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="held-out test prompts, 512x512")
    a = p.parse_args()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for spec in a.curves:
        label, path = spec.rsplit("=", 1)
        rows = sorted((r for one in path.split(",") for r in json.loads(Path(one).read_text())["results"]),
                      key=lambda r: r["guidance"])
        scales = [r["guidance"] for r in rows]
        if len(set(scales)) != len(scales):
            p.error(f"{label}: a guidance scale appears in more than one of its runs ({path})")
        x, y = [r["clip_score"] for r in rows], [r["domain_fid"] for r in rows]
        ax.plot(x, y, "o-", label=label)
        for r in rows:
            ax.annotate(f"{r['guidance']:g}", (r["clip_score"], r["domain_fid"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("CLIP score (scene CLIP, higher is better)")
    ax.set_ylabel("domain FID (lower is better)")
    ax.set_yscale("log")
    ax.set_title(a.title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=130)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
