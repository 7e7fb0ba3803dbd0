"""Every relative link in the README, CHANGELOG, docs/, results/ and the model cards points to a file or folder that
exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "results" / "README.md",
                *(ROOT / "docs").glob("*.md"), *(ROOT / "snapfusion" / "assets" / "models").glob("*/README.md")])
LINK = re.compile(r"\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")


def _relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold commands, not links
    links = [a or b for a, b in LINK.findall(text)]
    return [link for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")]


def test_the_pages_exist():
    assert (ROOT / "README.md") in PAGES and len(PAGES) >= 10


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    missing = [link for link in _relative_links(page) if not (page.parent / link.split("#")[0]).exists()]
    assert not missing, f"{page.relative_to(ROOT)}: broken links {missing}"
