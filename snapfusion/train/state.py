"""Training state <-> safetensors + JSON, with no pickle: optimizer state, RNG state, checkpoint folders.

A checkpoint is a folder ``step_0001234/`` holding one sub-folder per saved model (``save_pretrained``
layout), ``optimizer.safetensors`` + ``optimizer.json``, ``rng.safetensors`` and ``state.json``. It is written
to ``step_0001234.tmp/`` and renamed into place, then ``latest.json`` is replaced atomically: a run killed at
any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from snapfusion.errors import SnapFusionError
from snapfusion.weights import load_safetensors, save_safetensors

LATEST = "latest.json"


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
    tmp = ckpt_root / f"step_{step:07d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_models(tmp)
    if optimizer is not None:
        tensors, meta = optimizer_to_tensors(optimizer)
        save_safetensors(tensors, tmp / "optimizer.safetensors", max_shard_bytes=None)
        (tmp / "optimizer.json").write_text(json.dumps(meta))
    save_safetensors(rng_tensors(), tmp / "rng.safetensors", max_shard_bytes=None)
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = run_dir / (LATEST + ".tmp")
    latest_tmp.write_text(json.dumps({"step": step, "path": str(final.relative_to(run_dir))}))
    os.replace(latest_tmp, run_dir / LATEST)
    _prune(ckpt_root, keep)
    return final


def _prune(ckpt_root: Path, keep: int) -> None:
    done = sorted(p for p in ckpt_root.glob("step_*") if not p.name.endswith(".tmp"))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder named by ``run_dir/latest.json``, or None when the run has no checkpoint yet."""
    pointer = run_dir / LATEST
    if not pointer.is_file():
        return None
    try:
        rel = json.loads(pointer.read_text())["path"]
    except (json.JSONDecodeError, KeyError) as err:
        raise SnapFusionError(f"corrupt checkpoint pointer {pointer}: {err}") from None
    path = run_dir / rel
    if not (path / "state.json").is_file():
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
