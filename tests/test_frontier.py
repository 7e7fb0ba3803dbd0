"""scripts/bench_frontier_cpu.py (row specs) and scripts/plot_frontier.py (eval JSONs joined with CPU seconds: the
table, paired intervals against the reference, the figure, and an error for a row without a CPU time)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_frontier_cpu import parse_row  # noqa: E402


def test_row_specs():
    assert parse_row("sf=snapfusion") == {"label": "sf", "model": "snapfusion", "steps": None, "sampler": None,
                                          "runs": None, "guidance_interval": None}
    assert parse_row("b=base:50:ddim:2") == {"label": "b", "model": "base", "steps": 50, "sampler": "ddim", "runs": 2,
                                             "guidance_interval": None}
    assert parse_row("h=snapfusion-cfg:4")["steps"] == 4
    assert parse_row("c=snapfusion-cfg::::0,0.5")["guidance_interval"] == (0.0, 0.5)
    for bad in ("no-label", "c=snapfusion-cfg::::0.5", "c=snapfusion-cfg::::0.5,0.2"):
        with pytest.raises(SystemExit):
            parse_row(bad)


def _eval(path, right: str, seeds=(0, 1, 2, 3), steps=8, w=7.5):
    """An eval.json of len(right) images ('1' = all attributes right), 2 prompts x 2 seeds."""
    data = {"num_images": len(right), "steps": steps, "seeds_per_prompt": 2, "seeds": list(seeds),
            "results": [{"guidance": w, "clip_score": 80.0 + right.count("1"), "domain_fid": 1.0,
                         "attributes": {"all": right.count("1") / len(right)}, "all_per_image": right}]}
    path.write_text(json.dumps(data))
    return str(path)


def test_table_pairs_rows_with_the_reference_and_refuses_a_row_without_cpu_time(tmp_path):
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps({"rows": [{"label": "base", "median_s": 20.0, "steps": 50},
                                        {"label": "fast", "median_s": 0.5, "steps": 8},
                                        {"label": "other", "median_s": 1.0, "steps": 8}]}))
    base, fast = _eval(tmp_path / "b.json", "1111", steps=50), _eval(tmp_path / "f.json", "1010")
    other = _eval(tmp_path / "o.json", "1100", seeds=(5, 6, 7, 8))  # other seeds: no pairing
    fast_w = _eval(tmp_path / "w.json", "1110", w=4.5)  # the same model at its own w: paired across scales
    script = [sys.executable, str(ROOT / "scripts" / "plot_frontier.py"), "--cpu", str(cpu)]
    out, table = tmp_path / "f.png", tmp_path / "t.md"
    ok = subprocess.run(script + ["--out", str(out), "--table", str(table), f"base={base}", f"fast={fast}",
                                  f"other={other}", f"fast-w4.5:fast={fast_w}"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert out.stat().st_size > 0
    rows = table.read_text().splitlines()
    assert rows[2].startswith("| base | 50 | 7.5 | 20.00 | 100.0 % | reference |")
    assert rows[3].startswith("| fast | 8 | 7.5 | 0.50 | 50.0 % | -50.00 (")
    assert "| not paired |" in rows[4]
    assert rows[5].startswith("| fast-w4.5 | 8 | 4.5 | 0.50 | 75.0 % | -25.00 (")
    bad = subprocess.run(script + ["--out", str(out), f"missing={base}"], capture_output=True, text=True)
    assert bad.returncode != 0 and "has no CPU row" in bad.stderr
