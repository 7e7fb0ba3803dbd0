"""Is the frozen text tower the bottleneck? Probe its token states for every attribute the evaluator checks.

The base UNet reads a prompt only through the text tower's ``last_hidden_state`` (77 x 128, no attention mask:
the UNet's cross-attention sees all 77 positions, EOS padding included). If an attribute of a prompt - or its
binding to the right object - is not linearly extractable from those states by attention, no UNet can draw it.

Method (CPU, minutes):
  1. Examples: training-split scenes of the UNet's domain (``SceneConfig(num_emoji=40)``), one fresh caption each
     (``--p-omit``, default 0: complete captions, like the test prompts); an in-distribution validation set of
     fresh training-split scenes; and the held-out test prompts of the evaluation
     (``load_prompt_set("test", num_emoji=40)``, 485 prompts). Labels come from the scene, in two object slots:
     slot a = ``scene.objects[0]`` (the single object or group; in a pair the LEFT or TOP one) and slot b =
     ``scene.objects[1]`` (a pair's right / bottom object, else "none"). Captions name the pair in either order
     ("A to the left of B", "B to the right of A"), so the slots test binding: a bag of words knows both names and
     the relation word but not which name goes with which side, nor which color word is the shape's and which the
     background's.
  2. Every caption is encoded once by the frozen shipped tower; states are cached in memory.
  3. A learned-query attention-pooling probe (Q queries attend over the 77 states, a linear head per attribute
     reads the concatenated pooled vectors; trained with the summed cross-entropy) is fit on the training
     states, for each feature set:
       encoder - the tower's output, what the UNet cross-attends to;
       bow     - the tower's token-embedding rows alone (no positions, no transformer): a bag of words;
       input   - token + position embeddings, the transformer's input (optional: position without context);
       skipK   - the output of the K-th layer from the end through the final layer norm (``--clip-skip K``).
  4. Predictions are scored with the evaluator's checks (``snapfusion.eval.attributes.check_scene``) transposed to
     labels: presence, count, color (shapes), position (single slot / group at the center / pair relation with
     each object exactly matched), background (kind, colors in order, direction), size (reported, not in "all").

Example (11.5 minutes on one thread of the 2-core CPU: 3 min to encode 42,485 captions, 3 min per probe):
  HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python scripts/probe_text_encoder.py --train 40000 --steps 6000 \
      --features encoder bow input --out text_probe.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from snapfusion.data import Scene, SceneConfig, caption, held_out_in, load_prompt_set, sample_scene, vocab
from snapfusion.data.vocab import BACKGROUND_KINDS, COLOR_NAMES, DIRECTIONS, POSITIONS, SIZES
from snapfusion.eval.attributes import REPORTED
from snapfusion.models.text import TextEncoder, Tokenizer, load_text_encoder, skip_layers

NONE = "none"  # label of an absent slot-b object, of an emoji's color, of a solid background's second color
PAIR_SLOTS = {"left": "left of", "top": "above"}  # slot a's position in a pair -> the scene's relation


def head_labels(num_emoji: int) -> dict[str, tuple[str, ...]]:
    """Class names of every probe head, in label order."""
    names = vocab().emoji[:num_emoji] + vocab().shapes
    return {
        "name_a": names, "name_b": (NONE, *names),
        "count_a": ("1", "2", "3"),
        "position_a": POSITIONS,  # a pair's slot a is at "left" or "top": the relation
        "color_a": (NONE, *COLOR_NAMES), "color_b": (NONE, *COLOR_NAMES),
        "size_a": SIZES, "size_b": (NONE, *SIZES),
        "bg_kind": BACKGROUND_KINDS, "bg_color0": COLOR_NAMES,
        "bg_color1": (NONE, *COLOR_NAMES), "bg_direction": (NONE, *DIRECTIONS),
    }


def scene_labels(scene: Scene) -> dict[str, str]:
    """The ground truth of ``scene`` as one class name per head."""
    a = scene.objects[0]
    b = scene.objects[1] if len(scene.objects) == 2 else None
    bg = scene.background
    return {
        "name_a": a.name, "name_b": b.name if b else NONE,
        "count_a": str(a.count), "position_a": a.position,
        "color_a": a.color or NONE, "color_b": (b.color or NONE) if b else NONE,
        "size_a": a.size, "size_b": b.size if b else NONE,
        "bg_kind": bg.kind, "bg_color0": bg.colors[0],
        "bg_color1": bg.colors[1] if bg.kind == "gradient" else NONE, "bg_direction": bg.direction or NONE,
    }


@dataclass
class Split:
    """Captions, label indices (N, heads) and scenes of one example set."""

    captions: list[str]
    labels: torch.Tensor
    scenes: list[Scene]


def make_split(scenes: list[Scene], captions: list[str], heads: dict[str, tuple[str, ...]]) -> Split:
    index = {h: {c: i for i, c in enumerate(classes)} for h, classes in heads.items()}
    rows = [[index[h][scene_labels(s)[h]] for h in heads] for s in scenes]
    return Split(captions, torch.tensor(rows, dtype=torch.long), scenes)


def sample_split(count: int, split: str, seed: int, cfg: SceneConfig, p_omit: float,
                 heads: dict[str, tuple[str, ...]]) -> Split:
    """``count`` scenes of ``split``, each with a fresh caption."""
    scenes, captions = [], []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        scene = sample_scene(rng, split, cfg)
        scenes.append(scene)
        captions.append(caption(scene, rng, p_omit))
    return make_split(scenes, captions, heads)


@torch.no_grad()
def encode(model: TextEncoder, ids: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The tower's last_hidden_state (N, 77, D) of token ids (N, 77), in batches."""
    return torch.cat([model(ids[i: i + batch_size]) for i in range(0, len(ids), batch_size)])


class Features:
    """Per-token features (B, 77, D) of a batch of example indices, for one feature set."""

    def __init__(self, kind: str, model: TextEncoder, ids: torch.Tensor, states: torch.Tensor | None):
        self.kind, self.states = kind, states
        emb = model.text_model.embeddings
        rows = model.token_map[ids].long() if model.config.vocab_rows else ids  # CLIP ids -> compact rows
        self.rows = rows
        self.table = emb.token_embedding.weight.detach()
        self.positions = emb.position_embedding.weight.detach()  # (77, D)

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        if self.kind == "encoder" or self.kind.startswith("skip"):
            return self.states[index]
        tokens = self.table[self.rows[index]]  # (B, 77, D): the bag of words (order lost to the pooling)
        return tokens + self.positions if self.kind == "input" else tokens


class AttentionPoolProbe(nn.Module):
    """Q learned queries attend over the token states; one linear head per attribute reads the pooled vectors.

    A one-head cross-attention with a learned query scores tokens by q . W_k h = (W_k^T q) . h and returns
    W_v sum_i a_i h_i; before a linear head both projections fold away, so the probe keeps only the queries
    (plus a fixed per-channel standardisation of the states, computed on the training set).
    """

    def __init__(self, dim: int, heads: dict[str, int], queries: int, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.query = nn.Parameter(torch.randn(queries, dim) / math.sqrt(dim))
        self.heads = nn.ModuleDict({name: nn.Linear(queries * dim, n) for name, n in heads.items()})

    def forward(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        h = (states - self.mean) / self.std  # (B, T, D)
        scores = torch.einsum("qd,btd->bqt", self.query, h) / math.sqrt(h.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        pooled = torch.einsum("bqt,btd->bqd", scores.softmax(-1), h).flatten(1)  # (B, Q * D)
        return {name: head(pooled) for name, head in self.heads.items()}


def train_probe(feats: Features, labels: torch.Tensor, mask: torch.Tensor | None, heads: dict[str, tuple],
                a: argparse.Namespace) -> AttentionPoolProbe:
    """Fit a probe on all training examples: AdamW, linear warm-up then cosine decay, summed cross-entropy."""
    gen = torch.Generator().manual_seed(a.seed)
    sample = feats(torch.arange(min(4096, len(labels))))
    probe = AttentionPoolProbe(sample.shape[-1], {h: len(c) for h, c in heads.items()}, a.queries,
                               sample.mean((0, 1)), sample.std((0, 1)) + 1e-5)
    opt = torch.optim.AdamW(probe.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    warmup = max(1, a.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / a.steps)))
    running = 0.0
    for step in range(1, a.steps + 1):
        index = torch.randint(len(labels), (a.batch_size,), generator=gen)
        out = probe(feats(index), None if mask is None else mask[index])
        loss = sum(F.cross_entropy(out[h], labels[index, j]) for j, h in enumerate(heads))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += float(loss.detach())
        if step % a.log_every == 0:
            print(f"    step {step:5d}  loss {running / a.log_every:.4f}", flush=True)
            running = 0.0
    return probe.eval()


@torch.no_grad()
def predict(probe: AttentionPoolProbe, feats: Features, mask: torch.Tensor | None, n: int) -> torch.Tensor:
    """Argmax class index per head (n, heads)."""
    preds = []
    for i in range(0, n, 1024):
        index = torch.arange(i, min(i + 1024, n))
        out = probe(feats(index), None if mask is None else mask[index])
        preds.append(torch.stack([o.argmax(-1) for o in out.values()], 1))
    return torch.cat(preds)


def objects(lab: dict[str, str]) -> list[dict[str, Any]]:
    """Slot objects of a label dict: name, color (None for emoji), size, count, position."""
    objs = [{"name": lab["name_a"], "color": None if lab["color_a"] == NONE else lab["color_a"],
             "size": lab["size_a"], "count": int(lab["count_a"]), "position": lab["position_a"]}]
    if lab["name_b"] != NONE:
        objs.append({"name": lab["name_b"], "color": None if lab["color_b"] == NONE else lab["color_b"],
                     "size": lab["size_b"], "count": 1, "position": None})
    return objs


def _exact(got: dict[str, Any], want: dict[str, Any]) -> bool:
    """The evaluator's exact match: same name and, for a shape, same color."""
    return got["name"] == want["name"] and (want["color"] is None or got["color"] == want["color"])


def check_labels(true: dict[str, str], pred: dict[str, str]) -> dict[str, bool]:
    """The evaluator's checks (attributes.check_scene) with the probe's reading of the text in place of the image's.

    Objects are matched by name as the evaluator matches detections: presence = every true name is predicted,
    count = each true name is predicted as many times as drawn, color / size = every predicted slot of a true
    shape's name has its color / size. Position needs the exact (name, color) match the evaluator uses: a single
    or group in slot a at the true position; a pair with both objects in their true slots and the true relation.
    """
    want, got = objects(true), objects(pred)
    by_name = [[g for g in got if g["name"] == o["name"]] for o in want]
    if len(want) == 2:  # pair: slot a = the left/top object, so both slots and the relation must be right
        position = (len(got) == 2 and all(_exact(g, o) for g, o in zip(got, want))
                    and PAIR_SLOTS.get(pred["position_a"]) == PAIR_SLOTS[true["position_a"]])
    else:  # single object or group (a group sits at "center")
        position = _exact(got[0], want[0]) and pred["position_a"] == true["position_a"]
    bg_keys = ("bg_kind", "bg_color0", "bg_color1", "bg_direction")
    result = {
        "presence": all(by_name),
        "count": all(sum(g["count"] for g in f) == o["count"] for f, o in zip(by_name, want)),
        "color": all(o["color"] is None or (f and all(g["color"] == o["color"] for g in f))
                     for f, o in zip(by_name, want)),
        "position": position,
        "background": all(pred[k] == true[k] for k in bg_keys),
        "size": all(f and all(g["size"] == o["size"] for g in f) for f, o in zip(by_name, want)),
    }
    result["all"] = all(result[c] for c in ("presence", "count", "color", "position", "background"))
    return result


def score(pred: torch.Tensor, split: Split, heads: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """Check accuracies (overall and per layout), per-head accuracies and the pair slot-swap rate."""
    names = list(heads)

    def decode(row: torch.Tensor) -> dict[str, str]:
        return {h: heads[h][int(row[j])] for j, h in enumerate(names)}

    rows, layouts, swaps, pairs = [], [], 0, 0
    for p, t, scene in zip(pred, split.labels, split.scenes):
        true, got = decode(t), decode(p)
        rows.append(check_labels(true, got))
        layouts.append(scene.layout)
        if scene.layout == "pair":
            pairs += 1
            swaps += got["name_a"] == true["name_b"] and got["name_b"] == true["name_a"]
    n = len(rows)
    result: dict[str, Any] = {k: sum(r[k] for r in rows) / n for k in REPORTED}
    result["by_layout"] = {
        lay: {"n": layouts.count(lay), **{k: sum(r[k] for r, l in zip(rows, layouts) if l == lay)
                                          / max(layouts.count(lay), 1) for k in REPORTED}}
        for lay in ("single", "group", "pair")}
    result["heads"] = {h: float((pred[:, j] == split.labels[:, j]).float().mean()) for j, h in enumerate(names)}
    result["pair_slot_swap"] = swaps / max(pairs, 1)
    result["n"] = n
    return result


def print_table(results: dict[str, dict[str, dict[str, Any]]]) -> None:
    cols = (*REPORTED, "pair_slot_swap")
    print("\n| features | set | n | " + " | ".join(cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    for feat, sets in results.items():
        for name, r in sets.items():
            print(f"| {feat} | {name} | {r['n']} | " + " | ".join(f"{100 * r[c]:.1f}" for c in cols) + " |")
    print("\nper-head accuracy (%), test set:")
    heads = next(iter(results.values()))["test"]["heads"]
    print("| features | " + " | ".join(heads) + " |")
    print("|---|" + "---|" * len(heads))
    for feat, sets in results.items():
        print(f"| {feat} | " + " | ".join(f"{100 * v:.1f}" for v in sets["test"]["heads"].values()) + " |")
    print("\n'all' by layout (%), test set:")
    for feat, sets in results.items():
        print(f"  {feat}: " + ", ".join(f"{lay} {100 * v['all']:.1f} (n={v['n']})"
                                      for lay, v in sets["test"]["by_layout"].items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="snapfusion/assets/models/base/text_encoder", help="text encoder folder")
    p.add_argument("--num-emoji", type=int, default=40, help="the UNet's domain: the first N atlas emoji")
    p.add_argument("--train", type=int, default=30000, help="training captions (training-split scenes)")
    p.add_argument("--val", type=int, default=2000, help="in-distribution captions (fresh training-split scenes)")
    p.add_argument("--p-omit", type=float, default=0.0,
                   help="caption_p_omit of the probe's training captions (the UNet trained with 0.1)")
    p.add_argument("--features", nargs="+", default=["encoder", "bow"],
                   help="encoder, bow, input, or skipK (K = 1 .. the tower's layers: an earlier layer's states)")
    p.add_argument("--attend", choices=["all", "tokens"], default="all",
                   help="all: the 77 positions, as the UNet's cross-attention; tokens: BOS..first EOS only")
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--log-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args()
    bad = [f for f in a.features if f not in ("encoder", "bow", "input")
           and not (f.startswith("skip") and f[4:].isdigit() and int(f[4:]) > 0)]
    if bad:
        p.error(f"--features: unknown {bad}; choose from encoder, bow, input, skipK")
    if min(a.train, a.val, a.queries, a.steps, a.batch_size, a.log_every) < 1 or a.lr <= 0 or not 0 <= a.p_omit <= 1:
        p.error("--train, --val, --queries, --steps, --batch-size and --log-every must be >= 1, --lr > 0, "
                "--p-omit in [0, 1]")
    torch.manual_seed(a.seed)
    t0 = time.time()

    cfg = SceneConfig(num_emoji=a.num_emoji)
    heads = head_labels(a.num_emoji)
    records = load_prompt_set("test", num_emoji=a.num_emoji)
    test_scenes = [Scene.from_dict(r["scene"]) for r in records]
    splits = {
        "train": sample_split(a.train, "train", a.seed * 10 + 1, cfg, a.p_omit, heads),
        "val": sample_split(a.val, "train", a.seed * 10 + 2, cfg, 0.0, heads),
        "test": make_split(test_scenes, [r["prompt"] for r in records], heads),
    }
    held = [h.split()[0] for s in test_scenes for h in held_out_in(s)]
    print("examples: " + ", ".join(f"{k} {len(v.captions)}" for k, v in splits.items())
          + "; test held-out kinds: " + ", ".join(f"{k} {held.count(k)}" for k in sorted(set(held)))
          + f" ({time.time() - t0:.0f}s)", flush=True)

    tokenizer = Tokenizer()
    model = load_text_encoder(a.model).eval()
    ids = {k: tokenizer(v.captions) for k, v in splits.items()}
    # tokens proper: BOS .. first EOS (padding repeats EOS); the UNet attends to all 77 regardless
    masks = {k: torch.cumsum((v == tokenizer.eos_id).long(), 1) - (v == tokenizer.eos_id).long() == 0
             for k, v in ids.items()}
    states = {k: encode(model, v) for k, v in ids.items()}
    lengths = masks["train"].sum(1)
    print(f"encoded {sum(len(v) for v in ids.values())} captions once: states {tuple(states['train'].shape[1:])}, "
          f"tokens per caption {lengths.float().mean():.1f} mean / {int(lengths.max())} max "
          f"({time.time() - t0:.0f}s)", flush=True)

    results: dict[str, dict[str, dict[str, Any]]] = {}
    for kind in a.features:
        t1 = time.time()
        print(f"probe on '{kind}' features:", flush=True)
        if kind.startswith("skip"):  # an earlier layer's states, encoded for this probe only
            short = skip_layers(model, int(kind[4:]))
            layer_states = {k: encode(short, v) for k, v in ids.items()}
        feats = {k: Features(kind, model, ids[k], layer_states[k] if kind.startswith("skip") else states[k])
                 for k in splits}
        mask = {k: masks[k] if a.attend == "tokens" else None for k in splits}
        probe = train_probe(feats["train"], splits["train"].labels, mask["train"], heads, a)
        results[kind] = {k: score(predict(probe, feats[k], mask[k], len(splits[k].labels)), splits[k], heads)
                         for k in ("val", "test")}
        r = results[kind]
        print(f"  all: test {100 * r['test']['all']:.1f} %, val {100 * r['val']['all']:.1f} % "
              f"({time.time() - t1:.0f}s)", flush=True)

    print_table(results)
    seconds = time.time() - t0
    print(f"\ntotal {seconds:.0f}s")
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        report = {"args": vars(a), "heads": {h: list(c) for h, c in heads.items()},
                  "examples": {k: len(v.captions) for k, v in splits.items()},
                  "results": results, "seconds": round(seconds)}
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
