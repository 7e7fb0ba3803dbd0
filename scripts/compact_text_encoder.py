"""Shrink a domain pipeline's text encoder to the tokens its captions can use (models.text.compact_vocabulary).

The base model's text tower has CLIP's 49,408-row token embedding (12.6 MB of its 14 MB in fp16); the scene
captions use a few hundred tokens. This script enumerates the caption vocabulary by sampling captions of both
splits over every emoji (and the shipped prompt sets), shows that the set of token ids has stopped growing, keeps
those rows, checks that the new encoder's output is bit-identical on every sampled caption, and rewrites the
pipeline's text_encoder/ in place (fp16). Ids outside the kept set then read a zero row, and `generate` warns
about the words they come from.

  python scripts/compact_text_encoder.py snapfusion/assets/models/base --captions 200000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from snapfusion.data import SceneConfig, caption, load_prompt_set, sample_scene
from snapfusion.models.text import Tokenizer, compact_vocabulary, load_text_encoder, save_text_encoder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("pipeline", help="a pipeline folder (its text_encoder/ is rewritten)")
    p.add_argument("--captions", type=int, default=200_000, help="captions sampled per split")
    p.add_argument("--dry-run", action="store_true", help="measure and verify, write nothing")
    a = p.parse_args()
    folder = Path(a.pipeline) / "text_encoder"
    tok = Tokenizer()
    cfg = SceneConfig()  # every emoji, both splits
    seen = {int(i) for name in ("test", "train200", "test200")
            for i in tok([r["prompt"] for r in load_prompt_set(name)]).unique()}
    for split in ("train", "test"):
        rng = np.random.default_rng(123 if split == "train" else 456)
        done = 0
        for upto in sorted(n for n in {1_000, 10_000, 50_000, 100_000, a.captions} if n <= a.captions):
            texts = [caption(sample_scene(rng, split, cfg), rng, cfg.caption_p_omit if n % 2 else 0.0)
                     for n in range(done, upto)]
            seen |= {int(i) for i in tok(texts).unique()}
            done = upto
            print(f"{split}: after {upto:>7,} captions: {len(seen)} distinct token ids", flush=True)
    model = load_text_encoder(folder).float().eval()
    compact = compact_vocabulary(model, sorted(seen)).eval()
    # bit-identical on fresh captions (a third seed) and on every shipped prompt
    rng = np.random.default_rng(789)
    check = [caption(sample_scene(rng, "train" if i % 2 else "test", cfg), rng, cfg.caption_p_omit)
             for i in range(4096)]
    check += [r["prompt"] for r in load_prompt_set("test")]
    worst, unknown = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(check), 256):
            ids = tok(check[i: i + 256])
            unknown += int(compact.unknown_tokens(ids).sum())
            worst = max(worst, (model(ids) - compact(ids)).abs().max().item())
    before = sum(t.numel() * 2 for t in model.state_dict().values())
    after = sum(t.numel() * (t.element_size() if not t.is_floating_point() else 2)
                for t in compact.state_dict().values())
    print(f"kept {compact.config.vocab_rows - 1} token rows (+1 zero row); max |difference| on {len(check)} "
          f"unseen captions and test prompts: {worst}; unknown ids among them: {unknown}; "
          f"fp16 size {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB")
    if worst != 0.0 or unknown:
        raise SystemExit("not bit-identical: a caption token is missing; raise --captions")
    if not a.dry_run:
        save_text_encoder(folder, compact, dtype=torch.float16)
        print(f"rewrote {folder}")


if __name__ == "__main__":
    main()
