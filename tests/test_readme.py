"""The README's quick start: exactly two commands, the second is what CI runs (.ci/run), the first uses the
embedded default model."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quick_start_is_two_commands_and_ci_runs_the_second():
    install_and_generate, install_and_test = _quick_start()
    assert install_and_generate.startswith("pip install torch==2.13.0 -e . && snapfusion generate ")
    assert "--model" not in install_and_generate  # the embedded default
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install_and_test in ci
    assert "pytest" in install_and_test and "HF_HUB_OFFLINE=1" in install_and_test
