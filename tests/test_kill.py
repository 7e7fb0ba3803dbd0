"""kill -9 of a tiny training run at seeded random points, inside checkpoint writes, prunes and final/ exports
included: after every kill each checkpoint folder loads, final/ is the old or the new export, and --resume goes on
from the newest complete checkpoint to the end."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snapfusion import fileio
from snapfusion.train import state as ckpt_io
from snapfusion.weights import load_safetensors

ROOT = Path(__file__).resolve().parents[1]
SLOW = "0.8"  # seconds the save path sleeps inside a write window when the kill must land there


def _launch(run_dir: Path, max_steps: int, log: Path, slow: bool) -> subprocess.Popen:
    # unbuffered: a kill -9 must not take the lines the run already printed (where it resumes) with it
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    env.pop(ckpt_io.SLOW_SAVE_ENV, None)
    if slow:
        env[ckpt_io.SLOW_SAVE_ENV] = SLOW
    argv = [sys.executable, "-m", "snapfusion.cli", "train-text", "--run-dir", str(run_dir), "--resume",
            "--max-steps", str(max_steps), "--batch-size", "2", "--num-workers", "0", "--mixed-precision", "no",
            "--log-every", "1", "--sample-every", "0", "--checkpoint-every", "2", "--warmup-steps", "1"]
    return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _window_paths(run_dir: Path, kind: str) -> set[Path]:
    """The paths that show a run inside the write window ``kind``."""
    ckpts = run_dir / "checkpoints"
    if kind == "checkpoint":  # files written, about to be published (the slow-save sleep)
        return {p for p in ckpts.glob("step_*.tmp-*") if (p / "state.json").is_file()}
    if kind == "prune":  # an old checkpoint moved aside, not yet deleted
        return set(ckpts.glob(".trash-step_*"))
    if kind == "final":  # final/'s replacement written, not yet renamed into place
        return {p for p in run_dir.glob("final.tmp-*") if (p / "step.json").is_file()}
    raise ValueError(kind)


def _window(run_dir: Path, kind: str, logged: int, log: Path, stale: set[Path]) -> bool:
    """True once the run has said where it starts and is inside the write window ``kind`` (a path of that window
    that a killed earlier launch left behind does not count), or, for "random", has trained a new step."""
    text = log.read_text()
    if "resuming at step" not in text and "starting" not in text:
        return False
    if kind == "random":
        return _steps_logged(run_dir) > logged
    return bool(_window_paths(run_dir, kind) - stale)


def _kill_at(proc: subprocess.Popen, run_dir: Path, kind: str, delay: float, logged: int, log: Path,
             stale: set[Path]) -> str:
    deadline = time.time() + 120
    while not _window(run_dir, kind, logged, log, stale):
        if proc.poll() is not None:
            return "finished"
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"the run never reached the {kind} window")
        time.sleep(0.01)
    time.sleep(delay)
    if proc.poll() is not None:
        return "finished"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return "killed"


def _check_folder_loads(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.suffix == ".safetensors":
            load_safetensors(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())


def _check_run(run_dir: Path, finals: set[int]) -> int | None:
    """Every checkpoint-named folder is complete and loads; final/ is one of the exports written; returns the newest
    checkpoint's step."""
    names = [p for p in (run_dir / "checkpoints").glob("step_*") if re.fullmatch(r"step_\d{7}", p.name)]
    for folder in names:
        assert ckpt_io.is_complete(folder), f"{folder.name} looks like a checkpoint but is incomplete"
        _check_folder_loads(folder)
        assert json.loads((folder / "state.json").read_text())["step"] == int(folder.name[5:])
    latest = ckpt_io.latest_checkpoint(run_dir)
    assert (latest is None) == (not names)
    if latest is not None:
        assert latest == max(names, key=lambda p: p.name)
    final = run_dir / "final"
    if not final.exists() and finals:  # killed between publish_dir's two renames: the old one waits aside
        assert list(run_dir.glob(".trash-final-*")), "final/ vanished without its old version aside"
        fileio.recover_dir(final)
    if final.exists():
        step = json.loads((final / "step.json").read_text())["step"]
        assert step in finals, f"final/ holds step {step}, written exports: {sorted(finals)}"
        _check_folder_loads(final)
    return int(latest.name[5:]) if latest is not None else None


@pytest.mark.slow
def test_kill_nine_and_resume(tmp_path):
    rng = random.Random(32)
    run_dir = tmp_path / "run"
    # (kind of kill point, the run's --max-steps): first a run to 12 steps killed 8 times, then finished (final/ at
    # 12); then continued to 16 with kills at random, inside a checkpoint write and inside the final/ export
    plan = [("random", 12), ("checkpoint", 12), ("random", 12), ("prune", 12), ("checkpoint", 12), ("random", 12),
            ("prune", 12), ("random", 12), (None, 12),
            ("checkpoint", 16), ("random", 16), ("final", 16), (None, 16)]
    finals: set[int] = set()
    figures = []
    for i, (kind, max_steps) in enumerate(plan):
        before = ckpt_io.latest_checkpoint(run_dir) if run_dir.exists() else None
        stale = _window_paths(run_dir, kind) if kind not in (None, "random") else set()
        log = tmp_path / f"launch_{i}.log"
        proc = _launch(run_dir, max_steps, log, slow=kind not in (None, "random"))
        if kind == "final":
            finals.add(max_steps)  # the export being written may land, or not
        if kind is None:
            assert proc.wait(timeout=300) == 0, log.read_text()[-2000:]
            outcome = "finished"
            finals.add(max_steps)
        else:
            outcome = _kill_at(proc, run_dir, kind, rng.uniform(0, 0.6 if kind == "random" else 0.3),
                               _steps_logged(run_dir), log, stale)
        text = log.read_text()
        if before is not None:  # the launch resumed from the newest complete checkpoint
            assert f"resuming at step {int(before.name[5:])}" in text, text[-2000:]
        newest = _check_run(run_dir, finals)
        figures.append((kind or "none", outcome, int(before.name[5:]) if before else 0, newest))
    assert ckpt_io.latest_checkpoint(run_dir).name == "step_0000016"
    assert json.loads((run_dir / "final" / "step.json").read_text())["step"] == 16
    assert not list(run_dir.glob(".trash-*")) and not list(run_dir.glob("final.tmp-*"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000014", "step_0000016"]
    kills = [f for f in figures if f[1] == "killed"]
    print("\nkill test (kind, outcome, resumed from step, newest checkpoint after):")
    for f in figures:
        print("  ", f)
    assert len(kills) >= 10, figures  # the kill points were reached, not skipped by a run that ended first


# ---- the pieces, without a subprocess ---------------------------------------------------------------------------

def _fake_checkpoint(run_dir: Path, step: int) -> Path:
    return ckpt_io.write_checkpoint(run_dir, step, lambda d: (d / "model").mkdir(), None, {}, keep=10)


def test_folder_without_marker_is_not_a_checkpoint(tmp_path):
    for step in (1, 2, 3):
        _fake_checkpoint(tmp_path, step)
    newest = tmp_path / "checkpoints" / "step_0000003"
    assert ckpt_io.latest_checkpoint(tmp_path) == newest
    (newest / "rng.safetensors").unlink()  # half deleted in place (as an in-place recursive delete leaves it)
    assert ckpt_io.latest_checkpoint(tmp_path).name == "step_0000002"
    (tmp_path / "checkpoints" / "step_0000002" / ckpt_io.COMPLETE).unlink()  # marker gone
    assert ckpt_io.latest_checkpoint(tmp_path).name == "step_0000001"
    ckpt_io.write_checkpoint(tmp_path, 4, lambda d: None, None, {}, keep=2)  # the broken ones are cleaned up
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000001", "step_0000004"]


def test_prune_renames_before_deleting(tmp_path, monkeypatch):
    seen = []
    for step in (1, 2):
        _fake_checkpoint(tmp_path, step)
    monkeypatch.setattr(ckpt_io, "_slow_save_hook", lambda: seen.append(sorted(
        p.name for p in (tmp_path / "checkpoints").iterdir())))
    ckpt_io.write_checkpoint(tmp_path, 3, lambda d: None, None, {}, keep=2)
    pid = os.getpid()
    # the hook ran before publishing (the new one still a .tmp-) and while the pruned one sat at .trash-
    assert any(n.startswith("step_0000003.tmp-") for n in seen[0])
    assert f".trash-step_0000001-{pid}" in seen[1] and "step_0000001" not in seen[1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000002", "step_0000003"]


def test_publish_dir_never_deletes_first(tmp_path):
    final = tmp_path / "final"
    fileio.write_dir(final, lambda d: (d / "a.json").write_text('{"v": 1}'))

    def broken(d):
        (d / "a.json").write_text('{"v": 2}')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        fileio.write_dir(final, broken)
    assert json.loads((final / "a.json").read_text()) == {"v": 1} and len(list(tmp_path.iterdir())) == 1
    # a kill between publish_dir's two renames: the old one is aside, none at final/; recover_dir puts it back
    os.replace(final, tmp_path / ".trash-final-123")
    fileio.recover_dir(final)
    assert json.loads((final / "a.json").read_text()) == {"v": 1} and len(list(tmp_path.iterdir())) == 1
    fileio.write_dir(final, lambda d: (d / "a.json").write_text('{"v": 3}'))
    assert json.loads((final / "a.json").read_text()) == {"v": 3} and len(list(tmp_path.iterdir())) == 1


def test_atomic_write_keeps_old_on_failure(tmp_path):
    path = tmp_path / "manifest.json"
    fileio.atomic_write_text(path, "old")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        fileio.atomic_write_with(path, broken)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    fileio.atomic_write_bytes(path, b"new")
    (tmp_path / "plain").write_bytes(b"")
    assert path.read_bytes() == b"new"
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode  # the usual umask, not mkstemp's 0600


def test_run_from_before_the_marker_resumes_through_latest_json(tmp_path):
    """Checkpoints written before complete.json existed (renamed into place whole) are found through latest.json."""
    for step in (1, 2):
        _fake_checkpoint(tmp_path, step)
    for folder in (tmp_path / "checkpoints").iterdir():
        (folder / ckpt_io.COMPLETE).unlink()
    assert ckpt_io.latest_checkpoint(tmp_path).name == "step_0000002"
    (tmp_path / "latest.json").write_text("{")
    with pytest.raises(ckpt_io.SnapFusionError, match="corrupt checkpoint pointer"):
        ckpt_io.latest_checkpoint(tmp_path)
