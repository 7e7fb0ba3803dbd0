"""All-attribute accuracy of a `snapfusion eval` run by layout (single object, group, pair) and background (solid,
left-to-right or top-to-bottom gradient), from its per-image results and the prompt set it ran on.

  python scripts/eval_breakdown.py runs/eval/eval.json --prompts test --num-emoji 40 [--out breakdown.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from snapfusion.data.prompts import load_prompt_set
from snapfusion.errors import SnapFusionError
from snapfusion.eval.runner import with_seeds_per_prompt


def layout(scene: dict) -> str:
    objects = scene["objects"]
    if len(objects) > 1:
        return "pair"
    return "group" if objects[0].get("count", 1) > 1 else "single"


def background(scene: dict) -> str:
    direction = scene["background"].get("direction")
    return {None: "solid", "horizontal": "gradient left to right", "vertical": "gradient top to bottom"}.get(
        direction, str(direction))


def breakdown(report: dict, records: list[dict]) -> dict:
    """{guidance: {"layout": {name: {"n", "all"}}, "background": {...}}} for each row of the report."""
    out = {}
    for row in report["results"]:
        bits = row["all_per_image"]
        if len(bits) != len(records):
            raise SnapFusionError(f"the report has {len(bits)} images, the prompt set gives {len(records)}: "
                                  "pass the --prompts, --num-emoji and --num-images the eval ran with")
        groups: dict[str, dict[str, list[int]]] = {"layout": defaultdict(list), "background": defaultdict(list)}
        for bit, rec in zip(bits, records):
            groups["layout"][layout(rec["scene"])].append(bit == "1")
            groups["background"][background(rec["scene"])].append(bit == "1")
        out[str(row["guidance"])] = {kind: {name: {"n": len(v), "all": sum(v) / len(v)}
                                            for name, v in sorted(g.items())} for kind, g in groups.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path, help="eval.json of a snapfusion eval run")
    ap.add_argument("--prompts", default="test")
    ap.add_argument("--num-emoji", type=int, default=None)
    ap.add_argument("--num-images", type=int, default=None, help="as the eval ran (default: the report's)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    try:
        report = json.loads(args.report.read_text())
        k = int(report.get("seeds_per_prompt", 1))
        n = args.num_images or report["num_images"] // k
        records = with_seeds_per_prompt(load_prompt_set(args.prompts, args.num_emoji)[:n], k)
        result = breakdown(report, records)
    except (OSError, json.JSONDecodeError, KeyError, SnapFusionError) as err:
        sys.exit(f"eval_breakdown: {err}")
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
