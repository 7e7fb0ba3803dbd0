"""Paired comparison of two `snapfusion eval` runs on the same prompts and seeds: the difference in all-attribute
accuracy, its standard error and a 95 % interval, per guidance scale both runs have (two runs of one guidance
scale each, different ones, are paired as they are: each model at its own scale).

Each image of run A is paired with the image of run B of the same prompt and seed, so what the two runs share
(hard prompts, lucky seeds) cancels. With several seeds per prompt (`eval --seeds-per-prompt K`, recorded in
eval.json) the images of one prompt are not independent: the standard error is then clustered by prompt (the
sum of each prompt's differences is one draw). The interval is the normal one. Needs eval.json files with
"all_per_image" (every `snapfusion eval` run writes them).

    python scripts/compare_evals.py runs/student/eval.json runs/base50/eval.json --names student base-50

A run given as FILE+FILE[+...] is the runs pooled, their images one after another (one seed per prompt each, the
same guidance scales): two halves of a prompt set evaluated apart compare as the whole set.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def paired_difference(a: str, b: str, seeds_per_prompt: int = 1) -> dict[str, float]:
    """Mean of a - b over images ('0'/'1' per image, the same order: K copies of the prompt list, as
    ``with_seeds_per_prompt`` writes them), its standard error clustered by prompt, and the one-sided counts."""
    if len(a) != len(b) or not a:
        raise ValueError(f"per-image results differ in length ({len(a)} vs {len(b)})")
    n = len(a)
    if seeds_per_prompt < 1 or n % seeds_per_prompt:
        raise ValueError(f"{n} images are not {seeds_per_prompt} copies of one prompt list")
    prompts = n // seeds_per_prompt
    d = [int(x) - int(y) for x, y in zip(a, b)]
    mean = sum(d) / n
    per_prompt = [sum(d[p::prompts]) - mean * seeds_per_prompt for p in range(prompts)]  # image i: prompt i % P
    if prompts < 2:
        raise ValueError("need at least 2 prompts for a standard error")
    var = prompts / (prompts - 1) * sum(x * x for x in per_prompt) / n ** 2
    return {"images": n, "prompts": prompts, "a": a.count("1") / n, "b": b.count("1") / n, "diff": mean,
            "se": math.sqrt(var), "only_a": sum(1 for x in d if x > 0), "only_b": sum(1 for x in d if x < 0)}


def compare(ra: dict, rb: dict) -> list[dict]:
    """Rows of ``paired_difference`` for every guidance scale with per-image results in both runs."""
    k = int(ra.get("seeds_per_prompt", 1))
    if k != int(rb.get("seeds_per_prompt", 1)):
        raise ValueError("the two runs have different seeds per prompt")
    # the docs' copies drop the prompt list (prompts_note); the seeds, one per image, still pair the images
    prompts_differ = "prompts" in ra and "prompts" in rb and ra["prompts"] != rb["prompts"]
    if prompts_differ or not ra.get("seeds") or ra.get("seeds") != rb.get("seeds"):
        raise ValueError("the two runs differ in prompts or seeds: a paired comparison needs the same images")
    by_w = {r["guidance"]: r for r in rb["results"]}
    pairs = [(r["guidance"], r, by_w[r["guidance"]]) for r in ra["results"] if r["guidance"] in by_w]
    if not pairs and len(ra["results"]) == 1 and len(rb["results"]) == 1:  # each model at its own guidance scale
        (r,), (other,) = ra["results"], rb["results"]
        pairs = [(f"{r['guidance']:g} vs {other['guidance']:g}", r, other)]
    rows = []
    for w, r, other in pairs:
        if "all_per_image" in r and "all_per_image" in other:
            rows.append({"guidance": w, **paired_difference(r["all_per_image"], other["all_per_image"], k)})
    if not rows:
        raise ValueError("no guidance scale with per-image results in both runs (eval.json without all_per_image?)")
    return rows


def pool(runs: list[dict]) -> dict:
    """Runs of one seed per prompt and the same guidance scales as one run: prompts, seeds and per-image results
    concatenated in order (the other metrics, which do not pool, are dropped)."""
    if len(runs) == 1:
        return runs[0]
    if any(int(r.get("seeds_per_prompt", 1)) != 1 for r in runs):
        raise ValueError("pooled runs (A+B) must have one seed per prompt")
    scales = [[x["guidance"] for x in r["results"]] for r in runs]
    if any(s != scales[0] for s in scales):
        raise ValueError(f"pooled runs (A+B) differ in guidance scales: {scales}")
    for r in runs:
        images = [len(x.get("all_per_image", "")) for x in r["results"]]
        if not r.get("seeds") or any(n != len(r["seeds"]) for n in images):
            raise ValueError("pooled runs (A+B) need their per-image seeds and results")
    merged = {"seeds_per_prompt": 1, "seeds": [s for r in runs for s in r["seeds"]], "results": []}
    if all("prompts" in r for r in runs):
        merged["prompts"] = [p for r in runs for p in r["prompts"]]
    for j, w in enumerate(scales[0]):
        per_image = [r["results"][j].get("all_per_image") for r in runs]
        merged["results"].append({"guidance": w} | ({"all_per_image": "".join(per_image)} if all(per_image) else {}))
    return merged


def _load(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        sys.exit(f"error: {path}: {err}")
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        sys.exit(f"error: {path}: not an eval.json (no 'results' list)")
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", help="eval.json of run A (FILE+FILE: runs pooled)")
    p.add_argument("b", help="eval.json of run B, the reference (FILE+FILE: runs pooled)")
    p.add_argument("--names", nargs=2, default=("A", "B"))
    p.add_argument("--out", help="also write the comparison as JSON here")
    args = p.parse_args()
    try:
        rows = compare(pool([_load(f) for f in args.a.split("+")]), pool([_load(f) for f in args.b.split("+")]))
    except (ValueError, KeyError, TypeError) as err:
        sys.exit(f"error: {err}")
    na, nb = args.names
    print(f"| w | images (prompts) | {na} | {nb} | {na} - {nb} (95 % interval) | right only in {na} / only in {nb} |")
    print("|---|---|---|---|---|---|")
    for x in rows:
        lo, hi = x["diff"] - 1.96 * x["se"], x["diff"] + 1.96 * x["se"]
        w = x["guidance"] if isinstance(x["guidance"], str) else f"{x['guidance']:g}"
        print(f"| {w} | {x['images']} ({x['prompts']}) | {100 * x['a']:.1f} % | {100 * x['b']:.1f} % | "
              f"{100 * x['diff']:+.2f} ({100 * lo:+.2f}, {100 * hi:+.2f}) | {x['only_a']} / {x['only_b']} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"a": args.a, "b": args.b, "names": [na, nb], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
