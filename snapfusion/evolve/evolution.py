"""Architecture evolution (SnapFusion Alg. 1) with robust training between steps; resumable after a kill.

Each iteration k: (1) robust-train the current UNet for ``train_steps`` (the one training loop, its own run dir);
(2) score every candidate: ΔCLIP against the current model on a fixed prompt subset, ΔLatency from the lookup
table, value = ΔCLIP / ΔLatency; (3) while the predicted latency is over budget remove the lowest-value blocks,
otherwise add the highest-value copies that keep it within budget; (4) save the new UNet, append every action to
``evolve.jsonl`` and write ``state.json``. A killed run resumes at the first iteration without a ``state.json``
entry (the training chunk itself resumes from its checkpoint; scoring is deterministic and simply reruns).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from snapfusion import fileio
from snapfusion.config import from_dict, save_json, to_dict
from snapfusion.errors import ConfigError, SnapFusionError
from snapfusion.evolve.actions import Action, EvalConfig, Scorer, candidates, edited_unet, score
from snapfusion.evolve.latency import predict_ms
from snapfusion.models.unet import UNet
from snapfusion.models.unet_config import UNetConfig

LOG, STATE = "evolve.jsonl", "state.json"
TrainChunk = Callable[[UNet, Path], UNet]  # (current UNet, run dir of the chunk) -> trained UNet


@dataclass(frozen=True)
class EvolveConfig:
    budget_fraction: float = 0.3   # latency budget = this x the starting UNet's predicted per-step latency
    iterations: int = 8            # evolution steps (each: train chunk, score, act)
    actions_per_step: int = 1      # actions applied per step, best value first
    allow_add: bool = True         # under budget: add copies of the highest-value blocks
    eval: EvalConfig = field(default_factory=EvalConfig)
    max_minutes: float = 0.0       # > 0: stop cleanly after the iteration that passes this wall time


def _read_state(run_dir: Path) -> dict | None:
    path = run_dir / STATE
    return json.loads(path.read_text()) if path.is_file() else None


def _trim_log(run_dir: Path, done: int) -> None:
    """Drop log records of iterations after the last completed one (a kill between log and state)."""
    path = run_dir / LOG
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["iteration"] < done]
        path.write_text("".join(line + "\n" for line in keep))


def _log(run_dir: Path, record: dict) -> None:
    with (run_dir / LOG).open("a") as f:
        f.write(json.dumps(record) + "\n")


def _save_unet(unet: UNet, folder: Path) -> None:
    fileio.recover_dir(folder)
    fileio.write_dir(folder, unet.save)  # written beside, then renamed into place: never deleted first


def score_candidates(pipe, unet: UNet, records: list[dict], scorer: Scorer, ev: EvalConfig, table: dict | None,
                     op: str, base_clip: float | None = None) -> tuple[float, float | None, list[dict]]:
    """(CLIP of the current UNet, its predicted ms, one row per candidate with ΔCLIP, ΔLatency and value).

    ``base_clip``: the current UNet's score if the caller has it (scoring is deterministic; not scored twice).
    ``table`` None: ΔCLIP only (no latency columns; the predicted ms is None)."""
    if base_clip is None:
        base_clip = score(pipe, records, scorer, ev, unet=unet)
    base_ms = predict_ms(unet.config, table)[0] if table is not None else None
    rows = []
    for action in candidates(unet.config, op, unet.state_dict()):
        if op == "remove":
            clip = score(pipe, records, scorer, ev, unet=unet, skip={action.block})
            new_cfg, _ = _edit_config(unet.config, action)
        else:
            model, _, _ = edited_unet(unet, action)
            clip, new_cfg = score(pipe, records, scorer, ev, unet=model), model.config
            action = Action("add", action.block, _new_name(unet.config, model.config))
        row = {"op": action.op, "block": action.block, "new_block": action.new_block, "clip": clip,
               "delta_clip": clip - base_clip}
        if table is not None:
            ms, estimated = predict_ms(new_cfg, table)
            d_ms = ms - base_ms
            value = row["delta_clip"] / d_ms if d_ms != 0 else float("inf") * (1 if row["delta_clip"] >= 0 else -1)
            row.update(latency_ms=ms, delta_ms=d_ms, value=value, estimated_signatures=estimated)
        rows.append(row)
    return base_clip, base_ms, rows


def block_importance(pipe, unet: UNet, records: list[dict], scorer: Scorer, ev: EvalConfig, table: dict | None = None,
                     *, label: str = "unet") -> dict:
    """ΔCLIP of dropping each block alone (identity in its place; every block whose removal leaves a valid UNet),
    the probe of SnapFusion Fig. 5: a UNet that was not robust-trained collapses when some blocks go, a
    robust-trained one degrades gracefully. These are the evolution's removal candidates, scored the same way; with
    a latency table each row also has ΔLatency and value = ΔCLIP / ΔLatency (Alg. 1)."""
    clip, _, rows = score_candidates(pipe, unet, records, scorer, ev, table, "remove")
    return {"label": label, "clip": clip, "eval": to_dict(ev), "blocks": rows}


def plot_importance(reports: list[dict], out: str | Path) -> Path:
    """One bar per block and report (e.g. before and after robust training): ΔCLIP when that block alone is dropped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["block"] for r in reports[0]["blocks"]]
    width = 0.8 / len(reports)
    fig, ax = plt.subplots(figsize=(max(8, 0.28 * len(names)), 4))
    for k, rep in enumerate(reports):
        by = {r["block"]: r["delta_clip"] for r in rep["blocks"]}
        ax.bar([i + k * width for i in range(len(names))], [by.get(n, 0.0) for n in names], width,
               label=f"{rep['label']} (CLIP {rep['clip']:.1f})")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=90, fontsize=7)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_ylabel("ΔCLIP when dropped alone")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _edit_config(cfg: UNetConfig, action: Action):
    from snapfusion.evolve.actions import apply_action

    return apply_action(cfg, action)


def _new_name(old: UNetConfig, new: UNetConfig) -> str:
    from snapfusion.models.unet_config import block_names

    (name,) = set(block_names(new)) - set(block_names(old))
    return name


def choose(rows: list[dict], over_budget: bool, budget_ms: float, current_ms: float, k: int) -> list[dict]:
    """Alg. 1: over budget, the k lowest-value removals; under, the k highest-value additions that fit the budget."""
    if over_budget:
        return sorted((r for r in rows if r["delta_ms"] < 0), key=lambda r: r["value"])[:k]
    fits = [r for r in rows if r["delta_ms"] > 0 and r["delta_clip"] > 0 and current_ms + r["delta_ms"] <= budget_ms]
    return sorted(fits, key=lambda r: -r["value"])[:k]


def _apply_rows(unet: UNet, rows: list[dict], table: dict) -> tuple[UNet, list[dict]]:
    """Apply the chosen actions one after the other (skipping any that a previous one made invalid)."""
    applied = []
    for row in rows:
        try:
            new_unet, sliced, fresh = edited_unet(unet, Action(row["op"], row["block"]))
        except ConfigError as err:
            applied.append({**row, "applied": False, "reason": str(err)})
            continue
        unet = new_unet
        applied.append({**row, "applied": True, "sliced_tensors": len(sliced), "fresh_tensors": len(fresh),
                        "latency_after_ms": predict_ms(unet.config, table)[0]})
    return unet, applied


def evolve(run_dir: str | Path, start: UNet, pipe, records: list[dict], scorer: Scorer, table: dict,
           cfg: EvolveConfig, train_chunk: TrainChunk | None = None) -> dict:
    """Run (or resume) evolution from ``start``; returns the final state; writes ``final/`` and the log."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = _read_state(run_dir)
    if state is None:
        start_ms, _ = predict_ms(start.config, table)
        state = {"iteration": 0, "unet": None, "budget_ms": cfg.budget_fraction * start_ms, "start_ms": start_ms,
                 "done": False}
        save_json({"evolve": to_dict(cfg), "table_meta": table["meta"]}, run_dir / "evolve_config.json")
    unet = start if state["unet"] is None else UNet.load(run_dir / state["unet"], device=_device_of(start))
    _trim_log(run_dir, state["iteration"])
    t0 = time.time()
    while not state["done"] and state["iteration"] < cfg.iterations:
        k = state["iteration"]
        if train_chunk is not None:
            unet = train_chunk(unet, run_dir / f"iter_{k:03d}" / "train")
        unet.eval().requires_grad_(False)
        current_ms, _ = predict_ms(unet.config, table)
        over = current_ms > state["budget_ms"]
        op = "remove" if over else "add"
        rows: list[dict] = []
        clip = score(pipe, records, scorer, cfg.eval, unet=unet)
        if over or cfg.allow_add:
            clip, current_ms, rows = score_candidates(pipe, unet, records, scorer, cfg.eval, table, op, clip)
        chosen = choose(rows, over, state["budget_ms"], current_ms, cfg.actions_per_step)
        unet, applied = _apply_rows(unet, chosen, table)
        for row in applied:
            _log(run_dir, {"iteration": k, "type": "action", **row})
        _log(run_dir, {"iteration": k, "type": "step", "clip": clip, "latency_ms": current_ms,
                       "budget_ms": state["budget_ms"], "over_budget": over, "candidates": rows,
                       "latency_after_ms": predict_ms(unet.config, table)[0],
                       "config": to_dict(unet.config)})
        folder = f"iter_{k:03d}/unet"
        _save_unet(unet, run_dir / folder)
        state = {**state, "iteration": k + 1, "unet": folder, "done": not over and not applied}
        save_json(state, run_dir / STATE)
        if cfg.max_minutes > 0 and (time.time() - t0) / 60 >= cfg.max_minutes:
            break
    if state["done"] or state["iteration"] >= cfg.iterations:
        _save_unet(unet, run_dir / "final")
        plot_trajectory(run_dir)
    return state


def _device_of(model: UNet) -> torch.device:
    return next(model.parameters()).device


def read_log(run_dir: str | Path) -> list[dict]:
    """Records of an evolution log: a run folder's ``evolve.jsonl``, or a log file itself (a copy kept elsewhere)."""
    path = Path(run_dir)
    path = path if path.is_file() else path / LOG
    if not path.is_file():
        raise SnapFusionError(f"no evolution log at {path}")
    try:
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SnapFusionError(f"{path}: not a valid evolution log ({err})") from None
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise SnapFusionError(f"{path}: not a valid evolution log (record {bad + 1} is not a JSON object)")
    return records


def plot_trajectory(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Latency against CLIP score of each evolution step (SnapFusion Fig. 5-style trajectory)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in read_log(run_dir) if r["type"] == "step"]
    out = Path(out) if out else Path(run_dir) / "trajectory.png"
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["latency_ms"] for r in steps], [r["clip"] for r in steps], "o-")
    for r in steps:
        ax.annotate(str(r["iteration"]), (r["latency_ms"], r["clip"]), fontsize=7)
    if steps:
        ax.axvline(steps[0]["budget_ms"], color="gray", linestyle="--", label="budget")
        ax.legend()
    ax.set_xlabel("predicted UNet latency per forward (ms, lookup table)")
    ax.set_ylabel("CLIP score (search prompts)")
    ax.set_title("architecture evolution trajectory")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def config_of(record: dict) -> UNetConfig:
    """The UNet config stored in a step record."""
    return from_dict(UNetConfig, record["config"], where="evolve.jsonl")


def _steps(log: list[dict]) -> list[dict]:
    """A log's step records (one per finished iteration); ``SnapFusionError`` when there is none."""
    try:
        steps = [r for r in log if r["type"] == "step"]
    except (KeyError, TypeError) as err:
        raise SnapFusionError(f"evolution log: a record lacks a field or has the wrong type ({err!r})") from None
    if not steps:
        raise SnapFusionError("evolution log: no step record (has the run finished an iteration?)")
    return steps


def within_budget(log: list[dict], fraction: float) -> list[dict]:
    """The part of an evolution log that a search to ``fraction`` of the start latency would have returned, on the
    log's own latency table: every record up to the end of the first iteration that ends within the budget, then the
    iterations after it that only add blocks and stay within it (Alg. 1's growing phase). A search to a larger budget
    than the log's own follows the same trajectory until it is under that budget, so a log found at 20 % also gives
    the architectures at 30 % or 60 %. The whole log at its own budget or below, and when no iteration ends within
    the budget (see ``reached_fraction``). ``SnapFusionError`` on a log without step records."""
    steps = _steps(log)
    try:
        if fraction <= own_budget(log) * (1 + 1e-9):
            return list(log)
        budget_ms = fraction * steps[0]["latency_ms"]
        ends = {r["iteration"]: r["latency_after_ms"] for r in steps}
        adds_only = {r["iteration"]: True for r in steps}
        for r in log:
            if r["type"] == "action" and r["applied"] and r["op"] != "add":
                adds_only[r["iteration"]] = False
    except (KeyError, TypeError) as err:
        raise SnapFusionError(f"evolution log: a record lacks a field or has the wrong type ({err!r})") from None
    order = sorted(ends)
    first = next((k for k in order if ends[k] <= budget_ms), None)
    if first is None:
        return list(log)
    last = first
    for k in order[order.index(first) + 1:]:
        if not (adds_only[k] and ends[k] <= budget_ms):
            break
        last = k
    return [r for r in log if r.get("iteration", 0) <= last]


def own_budget(log: list[dict]) -> float:
    """The budget a log's search aimed at, as a fraction of its start latency."""
    first = _steps(log)[0]
    try:
        return float(first["budget_ms"]) / float(first["latency_ms"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
        raise SnapFusionError(f"evolution log: no step record with its budget and latency ({err!r})") from None


def reached_fraction(log: list[dict]) -> float:
    """The latency a log ends at, as a fraction of its start (its own latency table)."""
    steps = _steps(log)
    try:
        return float(steps[-1]["latency_after_ms"]) / float(steps[0]["latency_ms"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
        raise SnapFusionError(f"evolution log: a step record lacks its latency ({err!r})") from None


def replay(log: list[dict], start: UNet) -> tuple[UNet, int]:
    """Apply an evolution log's applied actions, in order, to ``start`` (e.g. the teacher's own weights, or a
    retrained base of the same config): the architecture the run found, with ``start``'s weights carried over as
    the run carried them. Returns the UNet and the number of actions. Actions of an iteration the log has no step
    record for (a run killed mid-iteration, which resumes by redoing it) are left out. ``SnapFusionError`` if an
    action does not apply or the result's config differs from the log's last step (``start`` is not the config the
    run began from)."""
    steps = _steps(log)
    try:
        last = steps[-1]["iteration"]
        actions = [(r["iteration"], r["op"], r["block"]) for r in log
                   if r["type"] == "action" and r["applied"] and r["iteration"] <= last]
        want = config_of(steps[-1])
    except (KeyError, TypeError) as err:
        raise SnapFusionError(f"evolution log: a record lacks a field or has the wrong type ({err!r})") from None
    unet = start
    for k, op, block in actions:
        try:
            unet, _, _ = edited_unet(unet, Action(op, block))
        except ConfigError as err:
            raise SnapFusionError(f"evolution log: iteration {k}'s action '{op} {block}' does not apply to this UNet "
                                  f"({err})") from None
    if unet.config != want:
        raise SnapFusionError(f"evolution log: replaying its {len(actions)} actions on this UNet does not give the "
                              "logged architecture (the run started from another UNet config)")
    return unet, len(actions)
