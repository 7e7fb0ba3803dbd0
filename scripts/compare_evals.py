"""Paired comparison of two `snapfusion eval` runs on the same prompts and seeds: the difference in all-attribute
accuracy, its standard error over images and a 95 % interval, per guidance scale both runs have.

Each image of run A is paired with the image of run B of the same prompt and seed, so what the two runs share
(hard prompts, lucky seeds) cancels; the interval is the normal one on the per-image differences (n in the
thousands: 485 prompts x --seeds-per-prompt). Needs eval.json files with "all_per_image" (written since session 6).

    python scripts/compare_evals.py runs/student/eval.json runs/base50/eval.json --names student base-50
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def paired_difference(a: str, b: str) -> dict[str, float]:
    """Mean of a - b over images (strings of '0'/'1' per image, the same order), its standard error and counts."""
    if len(a) != len(b) or not a:
        raise ValueError(f"per-image strings differ in length ({len(a)} vs {len(b)})")
    d = [int(x) - int(y) for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / max(n - 1, 1)
    return {"n": n, "a": a.count("1") / n, "b": b.count("1") / n, "diff": mean, "se": math.sqrt(var / n),
            "only_a": sum(1 for x in d if x > 0), "only_b": sum(1 for x in d if x < 0)}


def _load(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        sys.exit(f"error: {path}: {err}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", help="eval.json of run A")
    p.add_argument("b", help="eval.json of run B (the reference)")
    p.add_argument("--names", nargs=2, default=("A", "B"))
    p.add_argument("--out", help="also write the comparison as JSON here")
    args = p.parse_args()
    ra, rb = _load(args.a), _load(args.b)
    if (ra.get("prompts"), ra.get("seeds")) != (rb.get("prompts"), rb.get("seeds")):
        sys.exit("error: the two runs differ in prompts or seeds: a paired comparison needs the same images")
    by_w = {r["guidance"]: r for r in rb["results"]}
    rows = []
    for r in ra["results"]:
        other = by_w.get(r["guidance"])
        if other is None or "all_per_image" not in r or "all_per_image" not in other:
            continue
        rows.append({"guidance": r["guidance"], **paired_difference(r["all_per_image"], other["all_per_image"])})
    if not rows:
        sys.exit("error: no guidance scale with per-image results in both runs (eval.json from before session 6?)")
    na, nb = args.names
    print(f"| w | images | {na} | {nb} | {na} - {nb} (95 % interval) | right only in {na} / only in {nb} |")
    print("|---|---|---|---|---|---|")
    for x in rows:
        lo, hi = x["diff"] - 1.96 * x["se"], x["diff"] + 1.96 * x["se"]
        print(f"| {x['guidance']:g} | {x['n']} | {100 * x['a']:.1f} % | {100 * x['b']:.1f} % | "
              f"{100 * x['diff']:+.2f} ({100 * lo:+.2f}, {100 * hi:+.2f}) | {x['only_a']} / {x['only_b']} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"a": args.a, "b": args.b, "names": [na, nb], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
