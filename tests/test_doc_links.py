"""Every relative link in README.md and docs/*.md points to a file of the repository and, with a
#anchor, to a heading of that file (GitHub's heading ids). Moving a section between pages is how
such links usually break; the commands on those pages are checked by test_shown_commands.py."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# [text](target) and ![alt](target); the target ends at the first space or ")".
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)


def heading_id(heading: str) -> str:
    """GitHub's id for a Markdown heading's text: lower case, markup and punctuation other than
    '-' and '_' dropped, spaces to '-' (a repeated heading gets -1, -2, ...: see anchors_of)."""
    text = re.sub(r"`|\*\*?|__", "", heading.strip()).lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors_of(path: Path) -> set[str]:
    """The ids of every heading of a Markdown file, fenced code blocks left out."""
    seen: dict[str, int] = {}
    anchors = set()
    for line in _FENCE.sub("", path.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = heading_id(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        anchors.add(base if count == 0 else f"{base}-{count}")
    return anchors


def links_of(path: Path) -> list[str]:
    """The link targets of a Markdown file, outside fenced code blocks and inline code."""
    text = re.sub(r"`[^`\n]*`", "", _FENCE.sub("", path.read_text()))
    return _LINK.findall(text)


def test_heading_id_by_hand() -> None:
    assert heading_id("The VOC evaluator (`ssd_da/evaluation/voc.py`)") == \
        "the-voc-evaluator-ssd_daevaluationvocpy"
    assert heading_id("Table II: ours beside the paper's") == "table-ii-ours-beside-the-papers"
    assert heading_id("Reruns, moved runs, crashes") == "reruns-moved-runs-crashes"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in links_of(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not checked here
            continue
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists() or ROOT not in (linked, *linked.parents):
            broken.append(f"{target}: no such file in the repository")
        elif anchor and linked.suffix == ".md" and anchor not in anchors_of(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    assert broken == [], f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_pages_link_somewhere() -> None:
    """The README links to every page of docs/, so none is orphaned."""
    readme = {(ROOT / t.partition("#")[0]).resolve() for t in links_of(ROOT / "README.md")}
    missing = [p.name for p in PAGES[1:] if p.resolve() not in readme]
    assert missing == []
