"""The run folder's ``manifest.json``: per stage its inputs and their sha256, settings, device, wall time,
GPU-minutes, status and metrics. Written atomically (a temporary file, fsync, then ``os.replace``)."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from snapfusion.errors import ConfigError
from snapfusion.fileio import atomic_write_text

MANIFEST = "manifest.json"
STATUSES = ("done", "partial", "failed")
_SKIPPED_PARTS = {"checkpoints", "tensorboard", "samples"}  # run state, not a stage's result


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_path(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder: its files' relative paths and hashes in sorted order (checkpoints, logs
    and temporary files left out)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no file or folder at {path}")
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path)
        if _SKIPPED_PARTS & set(rel.parts) or any(".tmp" in part or part.startswith(".trash-") for part in rel.parts):
            continue
        h.update(f"{rel.as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def settings_sha256(settings: dict[str, Any]) -> str:
    """sha256 of a stage's settings as canonical JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a run folder (an empty one if there is none yet)."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return {"recipe": None, "stages": {}}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
        raise ConfigError(f"{path}: not a recipe manifest (no 'stages' object)")
    return data


@contextlib.contextmanager
def locked(run_dir: str | os.PathLike):
    """Hold an exclusive lock on the run folder's manifest (POSIX ``flock``; elsewhere nothing): two compress
    processes on one run folder with disjoint ``--stages`` (the teacher's v fine-tune beside the student's) never
    lose each other's entries."""
    try:
        import fcntl
    except ImportError:  # not POSIX: one process per run folder
        yield
        return
    path = Path(run_dir) / ".manifest.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write(run_dir: str | os.PathLike, data: dict[str, Any]) -> None:
    """Replace the manifest atomically: a reader sees the old or the new file, never a part."""
    atomic_write_text(Path(run_dir) / MANIFEST, json.dumps({**data, "updated": now()}, indent=1) + "\n")


def is_current(entry: dict[str, Any] | None, inputs: dict[str, dict], settings_hash: str) -> bool:
    """True when a stage's manifest entry was made from these inputs (same hashes) and settings."""
    if not entry:
        return False
    recorded = {k: v.get("sha256") for k, v in entry.get("inputs", {}).items()}
    return recorded == {k: v["sha256"] for k, v in inputs.items()} and entry.get("settings_sha256") == settings_hash


def outputs_exist(entry: dict[str, Any]) -> bool:
    """True when every output a stage recorded is still on disk."""
    return all(Path(o["path"]).exists() for o in entry.get("outputs", {}).values())


def record(run_dir: str | os.PathLike, stage: str, entry: dict[str, Any], *, accumulate: bool = True,
           new_invocation: bool = False) -> dict[str, Any]:
    """Read, update one stage's entry and write the manifest. ``accumulate``: add the wall time and GPU-minutes to
    those of the stage's earlier invocations from the same inputs; ``new_invocation``: count one more."""
    if entry["status"] not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {entry['status']!r}")
    with locked(run_dir):
        data = read(run_dir)
        old = (data["stages"].get(stage) or {}) if accumulate else {}
        entry = {**entry, "wall_s": round(old.get("wall_s", 0.0) + entry["wall_s"], 2),
                 "gpu_minutes": round(old.get("gpu_minutes", 0.0) + entry["gpu_minutes"], 3),
                 "invocations": old.get("invocations", 0) + (1 if new_invocation else 0)}
        data["stages"][stage] = entry
        write(run_dir, data)
    return entry
