"""Write the fixed evaluation prompt sets to snapfusion/assets/prompts/*.jsonl (deterministic; re-run to check).

test.jsonl: 1,000 held-out-composition prompts; test200.jsonl: its first 200 (quick evaluation, evolution
actions); val.jsonl: 1,000 more held-out-composition prompts from another seed, none of them in test.jsonl, to choose
between models without looking at the test prompts; train200.jsonl: 200 prompts of seen compositions, to tell
memorisation from composition.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from snapfusion.data.prompts import PROMPT_DIR, make_prompt_set

SEEDS = {"test": 1001, "train": 2002, "val": 3003}


def write(path: Path, records: list[dict]) -> None:
    """One JSON record per line."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    print(f"wrote {len(records)} prompts to {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=PROMPT_DIR)
    ap.add_argument("--count", type=int, default=1000, help="size of test.jsonl")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    test = make_prompt_set("test", args.count, SEEDS["test"])
    write(args.out / "test.jsonl", test)
    write(args.out / "test200.jsonl", test[:200])
    taken = {r["prompt"] for r in test}
    val = make_prompt_set("test", args.count + len(taken), SEEDS["val"])
    write(args.out / "val.jsonl", [r for r in val if r["prompt"] not in taken][:args.count])
    write(args.out / "train200.jsonl", make_prompt_set("train", 200, SEEDS["train"]))


if __name__ == "__main__":
    main()
