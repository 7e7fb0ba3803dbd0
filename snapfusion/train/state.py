"""Training state <-> safetensors + JSON, with no pickle: optimizer state, RNG state, checkpoint folders.

A checkpoint is a folder ``step_0001234/`` holding one sub-folder per saved model (``save_pretrained``
layout), ``optimizer.safetensors`` + ``optimizer.json``, ``rng.safetensors``, ``state.json`` and, written last,
the completion marker ``complete.json`` (the step and every file's size). It is written to ``step_0001234.tmp-*/``,
fsync'd and renamed into place, then ``latest.json`` is replaced atomically; old checkpoints are renamed to
``.trash-*`` before they are deleted. A run killed at any moment leaves the previous checkpoints intact, and a folder
without its marker is never taken for a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from snapfusion import fileio
from snapfusion.errors import SnapFusionError
from snapfusion.weights import load_safetensors, save_safetensors

LATEST = "latest.json"
COMPLETE = "complete.json"                    # the completion marker, written last
NAME = re.compile(r"step_(\d{7,})")            # a checkpoint folder's name; step_N.tmp-* and .trash-* are not
SLOW_SAVE_ENV = "SNAPFUSION_TEST_SLOW_SAVE"   # seconds to sleep inside a checkpoint write (the kill test's window)


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``opt.state_dict()`` into a flat tensor dict and a JSON-ready dict of everything else."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           meta: dict[str, Any]) -> None:
    """Inverse of ``optimizer_to_tensors``: load the state into ``opt`` (tensors follow the params' device)."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, extra in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(extra)
    groups = meta["param_groups"]
    if len(groups) != len(opt.param_groups):
        raise SnapFusionError("checkpoint optimizer has a different number of parameter groups than this run")
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors() -> dict[str, torch.Tensor]:
    """The CPU and (if present) CUDA RNG states as uint8 tensors."""
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["cpu"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def write_checkpoint(run_dir: Path, step: int, save_models, optimizer: torch.optim.Optimizer | None,
                     state: dict[str, Any], *, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically. ``save_models(folder)`` writes the model sub-folders."""
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:07d}"
    fileio.clean_trash(ckpt_root, tmp_of="step_*")  # leftovers of killed writes and prunes (one writer per run)
    tmp = fileio.new_tmp_dir(final)
    try:
        save_models(tmp)
        if optimizer is not None:
            tensors, meta = optimizer_to_tensors(optimizer)
            save_safetensors(tensors, tmp / "optimizer.safetensors", max_shard_bytes=None)
            (tmp / "optimizer.json").write_text(json.dumps(meta))
        save_safetensors(rng_tensors(), tmp / "rng.safetensors", max_shard_bytes=None)
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
        _slow_save_hook()
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / COMPLETE).write_text(json.dumps({"step": step, "files": files}, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fileio.publish_dir(tmp, final)  # fsync'd before it is published; an old step_N is moved aside, never deleted first
    fileio.atomic_write_text(run_dir / LATEST, json.dumps({"step": step, "path": str(final.relative_to(run_dir))}))
    _prune(ckpt_root, keep)
    return final


def _slow_save_hook() -> None:
    """Tests only: sleep SNAPFUSION_TEST_SLOW_SAVE seconds between writing a checkpoint's (or final/'s) files and
    publishing them, and between moving a pruned checkpoint aside and deleting it."""
    delay = os.environ.get(SLOW_SAVE_ENV)
    if delay:
        time.sleep(float(delay))


def _prune(ckpt_root: Path, keep: int) -> None:
    done = checkpoints(ckpt_root.parent)
    broken = [p for p in ckpt_root.iterdir() if NAME.fullmatch(p.name) and p.is_dir() and p not in done]
    for old in (done[:-keep] if keep > 0 else []) + broken:
        fileio.trash(old, pause=_slow_save_hook)  # renamed out of the checkpoint names first: a kill leaves .trash-*
    fileio.clean_trash(ckpt_root)


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a checkpoint's completion marker and every file the marker lists, at its size."""
    try:
        marker = json.loads((folder / COMPLETE).read_text())
        files = marker["files"]
        return all((folder / rel).stat().st_size == size for rel, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoint folders, oldest first (leftovers of killed writes and deletes are not listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := NAME.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if is_complete(p)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of ``run_dir``, or None when the run has none yet.

    Folders without the completion marker are skipped. A run from before the marker existed is found through
    ``latest.json`` (its folders were renamed into place whole)."""
    run_dir = Path(run_dir)
    done = checkpoints(run_dir)
    if done:
        return done[-1]
    pointer = run_dir / LATEST
    if not pointer.is_file():
        return None
    try:
        rel = json.loads(pointer.read_text())["path"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise SnapFusionError(f"corrupt checkpoint pointer {pointer}: {err}") from None
    path = run_dir / rel
    if not (path / "state.json").is_file() or (path / COMPLETE).exists():
        raise SnapFusionError(f"checkpoint named by {pointer} is incomplete: {path}")
    return path


def read_checkpoint_state(ckpt: Path, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore optimizer and RNG state from ``ckpt``; return its ``state.json``."""
    if optimizer is not None and (ckpt / "optimizer.safetensors").is_file():
        tensors = load_safetensors(ckpt / "optimizer.safetensors")
        meta = json.loads((ckpt / "optimizer.json").read_text())
        optimizer_from_tensors(optimizer, tensors, meta)
    if (ckpt / "rng.safetensors").is_file():
        restore_rng(load_safetensors(ckpt / "rng.safetensors"))
    return json.loads((ckpt / "state.json").read_text())


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return getattr(model, "module", model)


def load_weights_into(model: torch.nn.Module, folder: Path) -> None:
    """Fill a (possibly wrapped) model from the weights of a checkpoint's model folder."""
    from snapfusion.weights import WEIGHTS_STEM, load_into, resolve_weights

    load_into(unwrap(model), load_safetensors(resolve_weights(folder, WEIGHTS_STEM)), source=str(folder))
