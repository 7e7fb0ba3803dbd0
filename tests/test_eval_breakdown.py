"""scripts/eval_breakdown.py: an eval run's all-attribute accuracy by layout and background."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from snapfusion.data.prompts import load_prompt_set
from snapfusion.errors import SnapFusionError
from snapfusion.eval.runner import with_seeds_per_prompt

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("eval_breakdown", ROOT / "scripts" / "eval_breakdown.py")
eval_breakdown = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eval_breakdown)


def _scene(objects, direction=None):
    colors = ["red"] if direction is None else ["red", "blue"]
    return {"objects": objects, "background": {"colors": colors, "direction": direction}}


def test_groups_by_layout_and_background_by_hand():
    one = {"name": "cat", "count": 1}
    records = [{"scene": _scene([one])}, {"scene": _scene([{"name": "dog", "count": 3}], "horizontal")},
               {"scene": _scene([one, one], "vertical")}, {"scene": _scene([one])}]
    out = eval_breakdown.breakdown({"results": [{"guidance": 7.5, "all_per_image": "1010"}]}, records)["7.5"]
    assert out["layout"] == {"group": {"n": 1, "all": 0.0}, "pair": {"n": 1, "all": 1.0},
                             "single": {"n": 2, "all": 0.5}}
    assert out["background"] == {"gradient left to right": {"n": 1, "all": 0.0},
                                 "gradient top to bottom": {"n": 1, "all": 1.0}, "solid": {"n": 2, "all": 0.5}}
    with pytest.raises(SnapFusionError, match="4 images, the prompt set gives 3"):
        eval_breakdown.breakdown({"results": [{"guidance": 7.5, "all_per_image": "1010"}]}, records[:3])


def test_the_command_on_a_seeds_per_prompt_report(tmp_path):
    records = load_prompt_set("val", num_emoji=40)[:6]
    bits = "110000" + "111111"  # 6 prompts x 2 seeds: the first copy then the second
    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"num_images": 12, "seeds_per_prompt": 2,
                                  "results": [{"guidance": 7.5, "all_per_image": bits}]}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "eval_breakdown.py"), str(report), "--prompts", "val",
                          "--num-emoji", "40", "--out", str(tmp_path / "b.json")], capture_output=True, text=True,
                         env=env)
    assert run.returncode == 0, run.stderr
    out = json.loads((tmp_path / "b.json").read_text())["7.5"]
    expected = eval_breakdown.breakdown(json.loads(report.read_text()), with_seeds_per_prompt(records, 2))["7.5"]
    assert out == expected and sum(g["n"] for g in out["layout"].values()) == 12
    report.write_text("{")
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "eval_breakdown.py"), str(report)],
                         capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and bad.stderr.startswith("eval_breakdown:") and "Traceback" not in bad.stderr
