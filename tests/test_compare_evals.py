"""scripts/compare_evals.py: paired differences of two eval runs, clustered by prompt."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compare_evals", ROOT / "scripts" / "compare_evals.py")
compare_evals = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_evals)


def test_paired_difference_by_hand():
    r = compare_evals.paired_difference("1100", "0101")            # differences +1, 0, 0, -1
    assert r["diff"] == 0 and r["only_a"] == 1 and r["only_b"] == 1 and r["a"] == 0.5 and r["b"] == 0.5
    assert r["se"] == pytest.approx(math.sqrt(4 / 3 * 2 / 16))      # 4 prompts, one image each


def test_clustering_by_prompt_widens_the_interval_when_a_prompt_repeats_its_result():
    # 2 seeds per prompt, and each prompt's two images agree: 4 independent draws, not 8
    a, b = "1010" * 2, "0000" * 2
    one = compare_evals.paired_difference(a, b, 1)
    two = compare_evals.paired_difference(a, b, 2)
    assert one["diff"] == two["diff"] == 0.5 and two["prompts"] == 4
    assert two["se"] == pytest.approx(math.sqrt(4 / 3 * (4 * 1.0 ** 2) / 64))
    assert two["se"] > one["se"]
    with pytest.raises(ValueError, match="copies"):
        compare_evals.paired_difference("101", "000", 2)
    with pytest.raises(ValueError, match="length"):
        compare_evals.paired_difference("10", "100")


def _run(path, prompts, seeds, per_image, k=1):
    path.write_text(json.dumps({"prompts": prompts, "seeds": seeds, "seeds_per_prompt": k,
                                "results": [{"guidance": 7.5, "all_per_image": per_image}]}))
    return str(path)


def test_cli_table_and_one_line_errors(tmp_path):
    script = [sys.executable, str(ROOT / "scripts" / "compare_evals.py")]
    a = _run(tmp_path / "a.json", ["p", "q"] * 2, [1, 2, 3, 4], "1101", k=2)
    b = _run(tmp_path / "b.json", ["p", "q"] * 2, [1, 2, 3, 4], "0101", k=2)
    out = subprocess.run(script + [a, b, "--names", "A", "B"], capture_output=True, text=True)
    assert out.returncode == 0 and "| 7.5 | 4 (2) | 75.0 % | 50.0 % | +25.00" in out.stdout
    other = _run(tmp_path / "c.json", ["p", "q"] * 2, [9, 2, 3, 4], "0101", k=2)
    for args, message in (([a, other], "differ in prompts or seeds"), ([a, str(tmp_path / "none.json")], "none.json"),
                          ([a, str(ROOT / "pyproject.toml")], "pyproject.toml")):
        bad = subprocess.run(script + args, capture_output=True, text=True)
        assert bad.returncode != 0 and message in bad.stderr and bad.stderr.count("\n") == 1


def test_pooled_halves_compare_as_the_whole_set(tmp_path):
    script = [sys.executable, str(ROOT / "scripts" / "compare_evals.py")]
    whole_a = _run(tmp_path / "a.json", ["p", "q", "r", "s"], [1, 2, 3, 4], "1101")
    whole_b = _run(tmp_path / "b.json", ["p", "q", "r", "s"], [1, 2, 3, 4], "0101")
    a1, a2 = _run(tmp_path / "a1.json", ["p", "q"], [1, 2], "11"), _run(tmp_path / "a2.json", ["r", "s"], [3, 4], "01")
    b1, b2 = _run(tmp_path / "b1.json", ["p", "q"], [1, 2], "01"), _run(tmp_path / "b2.json", ["r", "s"], [3, 4], "01")
    whole = subprocess.run(script + [whole_a, whole_b], capture_output=True, text=True)
    halves = subprocess.run(script + [f"{a1}+{a2}", f"{b1}+{b2}"], capture_output=True, text=True)
    assert whole.returncode == halves.returncode == 0 and "+25.00" in whole.stdout
    assert halves.stdout == whole.stdout
    # the halves in another order are other images: refused as unpaired
    swapped = subprocess.run(script + [f"{a2}+{a1}", f"{b1}+{b2}"], capture_output=True, text=True)
    assert swapped.returncode != 0 and "differ in prompts or seeds" in swapped.stderr
    two_seeds = _run(tmp_path / "k.json", ["p", "q"] * 2, [1, 2, 3, 4], "1101", k=2)
    with pytest.raises(ValueError, match="one seed per prompt"):
        compare_evals.pool([json.loads(open(two_seeds).read())] * 2)
    no_seeds = {k: v for k, v in json.loads(open(a1).read()).items() if k != "seeds"}
    with pytest.raises(ValueError, match="per-image seeds"):
        compare_evals.pool([no_seeds, json.loads(open(a2).read())])


def test_a_docs_copy_without_its_prompt_list_pairs_by_seeds(tmp_path):
    """results/ copies drop the prompts (prompts_note): the per-image seeds still pair the images, and other
    seeds or other prompts are still refused."""
    full = json.loads(open(_run(tmp_path / "a.json", ["p", "q"], [1, 2], "10")).read())
    copy = {k: v for k, v in full.items() if k != "prompts"} | {"prompts_note": "dropped"}
    assert compare_evals.compare(full, copy)[0]["diff"] == 0.0
    with pytest.raises(ValueError, match="differ in prompts or seeds"):
        compare_evals.compare(full, copy | {"seeds": [1, 3]})
    with pytest.raises(ValueError, match="differ in prompts or seeds"):
        compare_evals.compare(full, full | {"prompts": ["p", "r"]})
