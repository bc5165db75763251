"""Tests for book/execute.py: a chapter re-executes exactly when something its outputs depend on
changed, on a tiny fake book in a temporary folder (one real kernel run per test)."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


execute = _load("book_execute", REPO / "book" / "execute.py")

CHAPTER = textwrap.dedent(
    """\
    # %% [markdown]
    # # Fake chapter

    # %%
    import importlib.util
    from pathlib import Path

    # ftbook.helpers, loaded by path (the real ftbook package is installed in this venv)
    spec = importlib.util.spec_from_file_location("helpers", "../src/ftbook/helpers.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)

    value = helpers.double(float(Path({data!r}).read_text()))
    print(f"value = {{value}}")

    # %%
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", "open({other!r}).read()"], check=True)
    """
)


@pytest.fixture
def book(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "book"
    data = tmp_path / "data"
    data.mkdir()
    (data / "x.txt").write_text("21")
    (data / "y.txt").write_text("read by a subprocess")
    (root / "chapters").mkdir(parents=True)
    (root / "src" / "ftbook").mkdir(parents=True)
    (root / "_toc.yml").write_text("root: intro\nchapters:\n  - file: chapters/00_01_fake\n")
    (root / "requirements.txt").write_text("numpy\n")
    (root / "chapters" / "00_01_fake.py").write_text(CHAPTER.format(data=str(data / "x.txt"),
                                                                  other=str(data / "y.txt")))
    (root / "src" / "ftbook" / "helpers.py").write_text(
        '"""Doubling, with the constant of ftbook.arith."""\n\n\ndef double(x):\n'
        "    return 2 * x\n")
    (root / "src" / "ftbook" / "arith.py").write_text("TWO = 2\n")
    (root / "src" / "ftbook" / "unused.py").write_text("X = 1\n")
    monkeypatch.setenv("FTBOOK_DATA", str(data))
    monkeypatch.setenv("FTBOOK_CACHE", str(tmp_path / "cache"))
    return root


def run(root: Path) -> float:
    return execute.execute("00_01_fake", "smoke", execute.file_hashes(root), root)


def stale(root: Path) -> str | None:
    return execute.why_stale("00_01_fake", "smoke", execute.file_hashes(root), root)


def test_toc_and_package_closure(book: Path) -> None:
    assert execute.toc_chapters(book) == ["00_01_fake"]
    text = (book / "chapters" / "00_01_fake.py").read_text()
    # helpers is named by the chapter, arith only by helpers; unused by nobody
    assert list(execute.package_closure(text, book)) == ["arith", "helpers"]


def test_package_closure_of_a_real_chapter() -> None:
    text = (REPO / "chapters" / "13_02_lora.py").read_text()
    closure = execute.package_closure(text, REPO)
    assert {"lora", "workbench", "full_finetuning"} <= closure.keys()
    assert "dpo_grpo" not in closure  # a later chapter's module is not a dependency


@pytest.mark.slow
def test_executes_then_caches_then_reexecutes_on_each_dependency(book: Path) -> None:
    assert stale(book) == "never executed in this profile"
    run(book)
    notebook = json.loads((execute.store_dir("smoke", book) / "00_01_fake.ipynb").read_text())
    outputs = "".join("".join(o.get("text", "")) for c in notebook["cells"]
                      for o in c.get("outputs", []))
    assert "value = 42.0" in outputs
    assert not any("_ftbook_trace_reads" in "".join(c["source"]) for c in notebook["cells"])
    record = json.loads((execute.store_dir("smoke", book) / "00_01_fake.json").read_text())
    data = (book.parent / "data").resolve()  # read by the kernel, and by a process it started
    assert list(record["reads"]) == [str(data / "x.txt"), str(data / "y.txt")]
    assert stale(book) is None

    arith = book / "src" / "ftbook" / "arith.py"  # a module used only transitively
    arith.write_text("TWO = 2  # same value, new text\n")
    assert stale(book) == "package module(s) changed: ftbook.arith"
    run(book)
    assert stale(book) is None

    (book / "src" / "ftbook" / "unused.py").write_text("X = 2\n")  # not a dependency
    assert stale(book) is None

    (book.parent / "data" / "x.txt").write_text("20")  # a data file it read
    assert stale(book).startswith("a file it read changed")
    run(book)

    (book / "requirements.txt").write_text("numpy>=2\n")
    assert stale(book) == "requirements, Python or the executor changed"
    run(book)

    chapter = book / "chapters" / "00_01_fake.py"
    chapter.write_text(chapter.read_text() + "\n# %%\nprint('more')\n")
    assert stale(book) == "its source changed"
    assert execute.why_stale("00_01_fake", "tiny", execute.file_hashes(book), book) == \
        "never executed in this profile"


@pytest.mark.slow
def test_a_failing_chapter_leaves_no_stale_page(book: Path) -> None:
    run(book)
    chapter = book / "chapters" / "00_01_fake.py"
    chapter.write_text(chapter.read_text() + "\n# %%\nraise ValueError('broken cell')\n")
    with pytest.raises(Exception, match="broken cell"):
        run(book)
    assert not (execute.store_dir("smoke", book) / "00_01_fake.ipynb").exists()
    assert stale(book) == "never executed in this profile"
