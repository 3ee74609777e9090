"""docs/ARCHITECTURE.md stays drawn from the code: every module file of the library (``msxai/``, subpackages
included) and of the MONAI Label app (``apps/msxai/``: main.py, lib/, deploy/) has its row in the module table, and
every row names a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "ARCHITECTURE.md"
ROOTS = ("msxai", "apps/msxai")
ROW = re.compile(r"^\|\s*`(?P<path>[^`]+\.py)`\s*\|")


def module_files() -> list[str]:
    """Every Python file under the library and the app, repository-relative (caches and untracked run folders of
    the app, e.g. apps/msxai/logs, hold no .py files)."""
    out = []
    for root in ROOTS:
        out += [p.relative_to(REPO).as_posix() for p in (REPO / root).rglob("*.py") if "__pycache__" not in p.parts]
    return sorted(out)


def table_rows(text: str) -> list[str]:
    """The module paths of the rows of the doc's module table (first cell, in backticks, ending in .py)."""
    return [m.group("path") for line in text.splitlines() if (m := ROW.match(line))]


def test_table_rows_are_read():
    text = "| module | job |\n|---|---|\n| `msxai/io.py` | reading |\n| **group** | |\nsee `msxai/x.py` in text\n"
    assert table_rows(text) == ["msxai/io.py"]


def test_every_module_has_a_row():
    rows = set(table_rows(DOC.read_text()))
    files = module_files()
    assert "msxai/bundle.py" in files and "apps/msxai/main.py" in files and "msxai/saliency/engine.py" in files
    missing = [f for f in files if f not in rows]
    assert not missing, f"docs/ARCHITECTURE.md has no row for {missing}: add each to the module table"


def test_every_row_names_an_existing_module():
    rows = table_rows(DOC.read_text())
    assert len(rows) == len(set(rows)), "a module has two rows"
    gone = [r for r in rows if not (REPO / r).is_file()]
    assert not gone, f"docs/ARCHITECTURE.md names modules that do not exist: {gone}"
