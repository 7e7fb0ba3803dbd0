"""The bad-input corpus (tests/bad_inputs.py) run in-process through ``snapfusion.cli.main``: exit 2, one line on
stderr starting "snapfusion: error:", no traceback, no file left behind, and no model loaded or work started for the
cases that must fail first."""

import importlib
import signal
import sys
from pathlib import Path

import pytest

from bad_inputs import CASES, Case  # noqa: E402  (tests/ is on sys.path under pytest's rootdir conftest)

# Library entry points that load a model or start work: for cases that must fail first, each raises
WORK = [("snapfusion.loading", "resolve_model"), ("snapfusion.loading", "load"), ("snapfusion.sd15", "load_sd"),
        ("snapfusion.train.loop", "train"), ("snapfusion.bench", "run_bench"),
        ("snapfusion.evolve.latency", "measure_table"), ("snapfusion.evolve.evolution", "evolve"),
        ("snapfusion.models.text", "load_text_encoder"), ("snapfusion.models.autoencoder", "load_autoencoder"),
        ("snapfusion.decoder.io", "load_decoder"), ("snapfusion.eval.runner", "run_eval_command"),
        ("snapfusion.serve", "run"), ("snapfusion.compress.recipe", "run_recipe")]
WORK_METHODS = [("snapfusion.pipeline", "Pipeline", "load"), ("snapfusion.models.unet", "UNet", "load")]
PRELOAD = ["snapfusion.cli", "snapfusion.train.stages", "snapfusion.distill.stages", "snapfusion.evolve.runs",
           "snapfusion.evolve.robust", "snapfusion.decoder.task", "snapfusion.export.onnx_export", "snapfusion.bench",
           "snapfusion.prior", "snapfusion.compress"]
CASE_SECONDS = 60


class WorkStarted(BaseException):
    """Raised by a guarded entry point: the command got past validation (not a SnapFusionError, so never caught)."""


def _guard_work(monkeypatch) -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    originals = {}
    for mod, attr in WORK:
        originals[id(getattr(importlib.import_module(mod), attr))] = f"{mod}.{attr}"
    for mod, cls, attr in WORK_METHODS:
        klass = getattr(importlib.import_module(mod), cls)
        monkeypatch.setattr(klass, attr, classmethod(_raiser(f"{cls}.{attr}")))
    for mod in [m for n, m in list(sys.modules.items()) if n.startswith("snapfusion") and m is not None]:
        for attr, value in list(vars(mod).items()):
            if id(value) in originals:  # the function itself and every module that imported it by name
                monkeypatch.setattr(mod, attr, _raiser(originals[id(value)]))


def _raiser(what: str):
    def work(*args, **kwargs):
        raise WorkStarted(f"{what} was called: the input was not refused before work")
    return work


def _fixtures(tmp: Path) -> None:
    (tmp / "dir").mkdir()
    (tmp / "empty").mkdir()
    (tmp / "file.txt").write_text("not a folder\n")
    (tmp / "bad.safetensors").write_bytes(b"\x00garbage" * 16)
    (tmp / "trunc.safetensors").write_bytes((1000).to_bytes(8, "little") + b'{"w": {"dtype": "F32", "sha')
    (tmp / "bad.json").write_text("{")
    (tmp / "bad.jsonl").write_text('{"prompt": "a cat"\nnot json\n')
    (tmp / "badmodel").mkdir()
    (tmp / "badmodel" / "model_index.json").write_text("{")


def _tree(tmp: Path) -> set[str]:
    return {str(p.relative_to(tmp)) for p in tmp.rglob("*")}


def _timeout(signum, frame):
    raise WorkStarted(f"still running after {CASE_SECONDS} s")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, monkeypatch, capsys):
    from snapfusion.cli import main

    _fixtures(tmp_path)
    before = _tree(tmp_path)
    if not case.loads:
        _guard_work(monkeypatch)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in case.argv]
    old = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(CASE_SECONDS)
    try:
        rc = main(argv)
    except SystemExit as stop:  # argparse's own refusals
        rc = stop.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("snapfusion: warning:")]
    assert rc == 2, f"exit {rc}; stderr: {err[-800:]}"
    assert "Traceback" not in err
    assert len(lines) == 1, f"expected one line, got {len(lines)}: {err[-800:]}"
    assert lines[0].startswith("snapfusion: error:"), lines[0]
    expect = case.expect.replace("{tmp}", str(tmp_path))
    assert expect.lower() in lines[0].lower(), f"{expect!r} not in {lines[0]!r}"
    assert _tree(tmp_path) == before, f"left behind: {sorted(_tree(tmp_path) - before)}"


def test_corpus_is_large_and_unique():
    """The table itself stays sound: ids unique, every command covered."""
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 120
    commands = {c.argv[0] for c in CASES if c.argv}
    assert {"generate", "eval", "export", "bench", "convert-sd", "train-text", "train-unet", "train-autoencoder",
            "train-prior", "distill", "finetune-v", "evolve", "serve", "compress"} <= commands
