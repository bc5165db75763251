"""The book's text files hold no control characters.

An edit that writes LaTeX through a string with Python escapes turns `\\frac` into a form feed
and `\\tag`, `\\to` into tabs; the page then shows "rac..." instead of a fraction. Tabs and
other control characters (all of C0 but the newline and carriage return) are rejected in every
chapter, book page, bibliography and configuration file.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONTROL = re.compile(r"[\x00-\x09\x0b\x0c\x0e-\x1f\x7f]")
FILES = sorted(
    [*REPO.glob("chapters/*.py"), *REPO.glob("chapters/*.md"), *REPO.glob("book/*.md"),
     *REPO.glob("book/*.bib"), *REPO.glob("book/*.py"), REPO / "_config.yml", REPO / "_toc.yml",
     REPO / "README.md"]
)


def control_characters(text: str) -> list[tuple[int, int, str]]:
    """(line, column, character name) of every control character in `text` (1-based)."""
    found = []
    for number, line in enumerate(text.split("\n"), start=1):
        for match in CONTROL.finditer(line.rstrip("\r")):
            found.append((number, match.start() + 1, repr(match.group())))
    return found


def test_detector_finds_eaten_escapes() -> None:
    assert control_characters("p = \x0crac{a}{b}\n\x09ag{6.6}") == [(1, 5, "'\\x0c'"),
                                                                     (2, 1, "'\\t'")]
    assert control_characters("p = \\frac{a}{b}\r\n\\tag{6.6}\n") == []


@pytest.mark.parametrize("path", FILES, ids=[p.relative_to(REPO).as_posix() for p in FILES])
def test_no_control_characters(path: Path) -> None:
    found = control_characters(path.read_text(encoding="utf-8"))
    assert not found, f"{path.relative_to(REPO)}: control characters at (line, column): {found}"
