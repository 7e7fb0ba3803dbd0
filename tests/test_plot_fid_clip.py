"""scripts/plot_fid_clip.py: one curve per label, joined from several runs, and a clear error for a repeated scale."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(path, scales):
    rows = [{"guidance": w, "clip_score": 60 + w, "domain_fid": 2.0 / w} for w in scales]
    path.write_text(json.dumps({"results": rows}))
    return str(path)


def test_joined_runs_make_one_curve_and_a_repeated_scale_is_refused(tmp_path):
    script = [sys.executable, str(ROOT / "scripts" / "plot_fid_clip.py")]
    a, b = _run(tmp_path / "a.json", [1.5, 7.5]), _run(tmp_path / "b.json", [10.5])
    out = tmp_path / "curve.png"
    ok = subprocess.run(script + ["--out", str(out), f"student={a},{b}", f"base={a}"], capture_output=True, text=True)
    assert ok.returncode == 0 and out.stat().st_size > 0
    bad = subprocess.run(script + ["--out", str(out), f"student={a},{a}"], capture_output=True, text=True)
    assert bad.returncode == 2 and "more than one of its runs" in bad.stderr
