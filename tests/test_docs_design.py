"""docs/design.md cannot go stale silently: its module table names every module file of ssd_da/
(``__init__.py`` files aside) with a role, and names nothing that is not there; the test files
it describes follow its naming rule."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ssd_da"
DESIGN = ROOT / "docs" / "design.md"

# A row of the module table: | `models/ssd.py` | role |
ROW = re.compile(r"^\|\s*`([^`]+\.py)`\s*\|(.*)\|\s*$")


def _section(text: str, heading: str) -> str:
    """The text under ``## <heading>`` up to the next ``## `` heading."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def table_rows(text: str) -> dict[str, str]:
    """Module path (relative to ssd_da/) -> its role, from the "Modules" section's table."""
    rows: dict[str, str] = {}
    for line in _section(text, "Modules").splitlines():
        match = ROW.match(line)
        if match:
            assert match[1] not in rows, f"{match[1]} is listed twice"
            rows[match[1]] = match[2].strip()
    return rows


def package_modules() -> set[str]:
    return {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
            if p.name != "__init__.py"}


def test_table_parser_reads_rows_and_roles() -> None:
    text = ("# t\n\n## Modules\n| Module | Role |\n|---|---|\n| `a.py` | one |\n"
            "| `b/c.py` | two, with `code` |\n\n## Next\n| `d.py` | not here |\n")
    assert table_rows(text) == {"a.py": "one", "b/c.py": "two, with `code`"}


def test_design_doc_names_every_module_and_only_those() -> None:
    rows = table_rows(DESIGN.read_text())
    modules = package_modules()
    assert sorted(modules - set(rows)) == [], "modules missing from docs/design.md's table"
    assert sorted(set(rows) - modules) == [], "docs/design.md names modules that do not exist"
    assert [path for path, role in rows.items() if not role] == [], "a module without a role"


def test_test_files_follow_the_naming_rule() -> None:
    """tests/test_<subpackage>_... names a subpackage that exists (or cli, config, docs,
    package), so a test file's name says where its subject lives."""
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    allowed = subpackages | {"config", "docs", "package"}
    files = sorted(p.name for p in (ROOT / "tests").glob("test_*.py"))
    assert files
    assert [f for f in files if f[len("test_"):].split("_")[0].removesuffix(".py")
            not in allowed] == []
