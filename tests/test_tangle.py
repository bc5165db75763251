"""Tests for book/tangle.py, each on a tiny fake book built in a temporary folder."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
TANGLE_PATH = REPO / "book" / "tangle.py"


def _load_tangle() -> ModuleType:
    spec = importlib.util.spec_from_file_location("book_tangle", TANGLE_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


tangle = _load_tangle()

ALPHA = textwrap.dedent(
    '''\
    # ---
    # jupyter:
    #   jupytext:
    #     text_representation:
    #       format_name: percent
    # ---

    # %% [markdown]
    # # Alpha
    #
    # Some introductory prose.

    # %% [markdown]
    # ## Helpers

    # %%
    #| export
    """Alpha helpers."""

    from __future__ import annotations

    GREETING = "hello"


    def greet(name: str) -> str:
        return f"{GREETING}, {name}"


    # %%
    print(greet("world"))

    # %% [markdown]
    # ## Louder

    # %%
    #| export
    def shout(name: str) -> str:
        return greet(name).upper()
    '''
)

UNSLOTH = textwrap.dedent(
    """\
    # %% [markdown]
    # # Unsloth
    #
    # ## Ranks

    # %%
    #| export efficient_finetuning
    import math

    RANKS: tuple[int, ...] = (4, 8, 16)


    def scaled_rank(rank: int) -> float:
        return math.sqrt(rank)


    # %%
    value = scaled_rank(16)

    # %%
    #| export efficient_finetuning
    from __future__ import annotations


    def total_rank() -> float:
        return sum(scaled_rank(r) for r in RANKS)
    """
)

ALPHA_PATH = "chapters/00_01_alpha.py"
UNSLOTH_PATH = "chapters/13_10_unsloth.py"
# Cell numbers in ALPHA: 1 title, 2 "Helpers", 3 export, 4 print, 5 "Louder", 6 export.


def make_book(root: Path) -> Path:
    """Write a tiny book: _config.yml, two chapters, an empty src/ftbook/ and a stray .md."""
    (root / "_config.yml").write_text("title: test book\n")
    (root / "chapters").mkdir()
    (root / ALPHA_PATH).write_text(ALPHA)
    (root / UNSLOTH_PATH).write_text(UNSLOTH)
    (root / "chapters" / "README.md").write_text("# not a chapter\n#| export\n")
    (root / "src" / "ftbook").mkdir(parents=True)
    return root


def run(root: Path, *args: str) -> int:
    return tangle.main(["--root", str(root), *args])


def edit(root: Path, rel: str, old: str, new: str) -> None:
    path = root / rel
    text = path.read_text()
    assert old in text, f"{old!r} not in {rel}"
    path.write_text(text.replace(old, new, 1))


@pytest.fixture
def book(tmp_path: Path) -> Path:
    return make_book(tmp_path)


@pytest.fixture
def tangled(book: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    assert run(book) == 0
    capsys.readouterr()
    return book


def cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TANGLE_PATH), *args, "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
    )


# ---------------------------------------------------------------------------------------------


def test_clean_tree_passes_check(book: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(book, "--check") == 1  # nothing generated yet
    out = capsys.readouterr().out
    assert "missing src/ftbook/alpha.py" in out
    assert out.rstrip().splitlines()[-1].endswith("run `python book/tangle.py`")

    assert run(book) == 0
    out = capsys.readouterr().out
    assert "tangle: wrote src/ftbook/alpha.py" in out
    assert "tangle: wrote src/ftbook/efficient_finetuning.py" in out
    assert "tangle: wrote src/ftbook/__init__.py" in out

    assert run(book, "--check") == 0
    assert capsys.readouterr().out == "tangle: 3 modules in sync\n"
    assert tangle.check(book) == []


def test_cli_exit_codes(book: Path) -> None:
    before = cli(book, "--check")
    assert before.returncode == 1, before.stdout + before.stderr
    assert "missing" in before.stdout
    assert not (book / "src/ftbook/alpha.py").exists()  # --check writes nothing

    written = cli(book)
    assert written.returncode == 0, written.stderr
    after = cli(book, "--check")
    assert after.returncode == 0, after.stdout + after.stderr
    assert after.stdout.strip() == "tangle: 3 modules in sync"

    edit(book, ALPHA_PATH, "#| export\ndef shout", "#| exprot\ndef shout")
    broken = cli(book, "--check")
    assert broken.returncode == 2
    assert "tangle: error: chapters/00_01_alpha.py, cell 6" in broken.stderr


def test_root_found_from_working_directory(
    tangled: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tangled / "chapters")
    assert tangle.main(["--check"]) == 0
    assert "3 modules in sync" in capsys.readouterr().out


def test_generated_code_imports_and_works(tangled: Path) -> None:
    code = textwrap.dedent(
        """\
        import ftbook, ftbook.alpha as a, ftbook.efficient_finetuning as e
        assert ftbook.__version__ == "0.1.0", ftbook.__version__
        assert a.__doc__ == "Alpha helpers.", a.__doc__
        assert a.greet("Ada") == "hello, Ada"
        assert a.shout("Ada") == "HELLO, ADA"
        assert e.__doc__ is None, e.__doc__
        assert e.RANKS == (4, 8, 16)
        assert e.total_rank() == 2 + 8**0.5 + 4
        assert e.total_rank.__annotations__ == {"return": "float"}  # __future__ kept
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(tangled / "src")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_generated_layout(tangled: Path) -> None:
    alpha = (tangled / "src/ftbook/alpha.py").read_text()
    assert alpha.startswith(
        "# AUTOGENERATED by book/tangle.py from chapters/00_01_alpha.py. DO NOT EDIT.\n"
        "# Edit the chapter and run `python book/tangle.py`.\n"
        "\n"
        '"""Alpha helpers."""\n'
        "\n"
        "from __future__ import annotations\n"
        "\n"
        "\n"
        "# --- chapters/00_01_alpha.py :: Helpers ---\n"
        'GREETING = "hello"\n'
    )
    assert "# --- chapters/00_01_alpha.py :: Louder ---\ndef shout" in alpha
    assert alpha.endswith("return greet(name).upper()\n")
    assert "print(" not in alpha and "#|" not in alpha

    eff = (tangled / "src/ftbook/efficient_finetuning.py").read_text()
    assert eff.count("from __future__ import annotations") == 1
    assert eff.index("from __future__") < eff.index("import math")
    assert "value = scaled_rank" not in eff
    assert "chapters/13_10_unsloth.py" in eff.splitlines()[0]

    init = (tangled / "src/ftbook/__init__.py").read_text()
    assert init.startswith("# AUTOGENERATED by book/tangle.py")
    assert '"""ftbook: the package tangled from the chapters of' in init
    assert '__version__ = "0.1.0"' in init
    assert "#   ftbook.alpha\n#   ftbook.efficient_finetuning\n" in init
    assert "import" not in init


def test_output_is_deterministic(tangled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = tangle.tangle(tangled)
    assert first == tangle.tangle(tangled)
    files = {p.name: p.read_bytes() for p in (tangled / "src/ftbook").glob("*.py")}
    assert run(tangled) == 0
    out = capsys.readouterr().out
    assert "wrote" not in out
    assert "tangle: unchanged src/ftbook/alpha.py" in out
    assert {p.name: p.read_bytes() for p in (tangled / "src/ftbook").glob("*.py")} == files
    assert files["alpha.py"] == first["src/ftbook/alpha.py"].encode()
    assert all(not text.endswith("\n\n") and text.endswith("\n") for text in first.values())


def test_export_override_lands_in_named_module(tangled: Path) -> None:
    assert (tangled / "src/ftbook/efficient_finetuning.py").is_file()
    assert not (tangled / "src/ftbook/unsloth.py").exists()
    assert set(tangle.tangle(tangled)) == {
        "src/ftbook/__init__.py",
        "src/ftbook/alpha.py",
        "src/ftbook/efficient_finetuning.py",
    }


def test_changed_exported_cell_fails_check_with_diff(
    tangled: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit(tangled, ALPHA_PATH, 'GREETING = "hello"', 'GREETING = "howdy"')
    assert run(tangled, "--check") == 1
    out = capsys.readouterr().out
    assert "--- a/src/ftbook/alpha.py\n+++ b/src/ftbook/alpha.py\n" in out
    assert '-GREETING = "hello"\n' in out
    assert '+GREETING = "howdy"\n' in out
    assert out.rstrip().splitlines()[-1] == (
        "tangle: 1 module out of sync; run `python book/tangle.py`"
    )
    assert tangle.check(tangled) == ["src/ftbook/alpha.py differs from what the chapters produce"]
    assert cli(tangled, "--check").returncode == 1


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("# Some introductory prose.", "# Some rewritten prose."),
        ('print(greet("world"))', 'print(greet("reader"))\nx = 1'),
    ],
)
def test_prose_and_unexported_changes_keep_sync(
    tangled: Path, capsys: pytest.CaptureFixture[str], old: str, new: str
) -> None:
    edit(tangled, ALPHA_PATH, old, new)
    assert run(tangled, "--check") == 0
    assert "in sync" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("old", "new", "cell", "section", "fragment"),
    [
        (
            "#| export\ndef shout",
            "#| exprot\ndef shout",
            6,
            "Louder",
            "unknown directive '#| exprot'",
        ),
        ('print(greet("world"))', '#| hide\nprint(greet("world"))', 4, "Helpers", "'#| hide'"),
        (
            "def shout(name: str) -> str:",
            "#| export\ndef shout(name: str) -> str:",
            6,
            "Louder",
            "'#| export' at line 2 of the cell; it must be the first non-empty line",
        ),
        ("#| export\ndef shout", "#| export two words\ndef shout", 6, "Louder", "malformed"),
        ("#| export\ndef shout", "#| export 9lives\ndef shout", 6, "Louder", "'9lives'"),
    ],
)
def test_bad_directives_fail(
    tangled: Path,
    capsys: pytest.CaptureFixture[str],
    old: str,
    new: str,
    cell: int,
    section: str,
    fragment: str,
) -> None:
    edit(tangled, ALPHA_PATH, old, new)
    before = (tangled / "src/ftbook/alpha.py").read_bytes()
    assert run(tangled) == 2
    err = capsys.readouterr().err
    assert f"tangle: error: chapters/00_01_alpha.py, cell {cell} (§ {section}): " in err
    assert fragment in err
    assert (tangled / "src/ftbook/alpha.py").read_bytes() == before  # nothing written
    with pytest.raises(tangle.TangleError):
        tangle.check(tangled)


@pytest.mark.parametrize(
    ("statement", "kind"),
    [
        ('print("hi")', "Expr: call"),
        ("model = train()", "Assign to non-constant 'model'"),
        ("TOTAL += 1", "AugAssign"),
        ("for _ in range(3):\n    pass", "For"),
    ],
)
def test_side_effects_fail(
    tangled: Path, capsys: pytest.CaptureFixture[str], statement: str, kind: str
) -> None:
    edit(tangled, ALPHA_PATH, 'GREETING = "hello"\n', f'GREETING = "hello"\n{statement}\n')
    assert run(tangled, "--check") == 2
    err = capsys.readouterr().err
    first_line = statement.splitlines()[0]
    assert (
        "tangle: error: chapters/00_01_alpha.py, cell 3 (§ Helpers): "
        f"side-effecting statement ({kind}) at line 7 of the cell: `{first_line}`; "
        "exported cells may only hold imports, def, class, UPPER_CASE constants and docstrings"
    ) in err


def test_allowed_statements_pass(tangled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    extra = (
        '__all__ = ["greet"]\nA, *B_REST = (1, 2, 3)\nLIMIT: int = 3\n"""A bare string."""\n'
        "class Thing:\n    size = 1\nasync def fetch() -> None:\n    return None\n"
        "import os.path as osp\n"
    )
    edit(tangled, ALPHA_PATH, 'GREETING = "hello"\n', f'GREETING = "hello"\n{extra}')
    assert run(tangled) == 0, capsys.readouterr().err


def test_all_errors_are_reported(tangled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit(tangled, ALPHA_PATH, 'GREETING = "hello"\n', 'GREETING = "hello"\nprint("hi")\n')
    edit(tangled, ALPHA_PATH, "#| export\ndef shout", "#| export\nshout = 1\ndef shout")
    edit(tangled, UNSLOTH_PATH, "value = scaled_rank(16)", "#| exprot\nvalue = 1")
    assert run(tangled) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4
    assert all(line.startswith("tangle: error: chapters/") for line in err[:-1])
    assert "cell 3 (§ Helpers)" in err[0] and "Expr: call" in err[0]
    assert "cell 6 (§ Louder)" in err[1] and "'shout'" in err[1]
    assert "chapters/13_10_unsloth.py, cell 3 (§ Ranks)" in err[2]
    assert err[-1] == "tangle: 3 errors; nothing written"


def test_syntax_error_fails(tangled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit(tangled, ALPHA_PATH, "def shout(name: str) -> str:", "def shout(name: str -> str:")
    assert run(tangled, "--check") == 2
    err = capsys.readouterr().err
    assert (
        "tangle: error: chapters/00_01_alpha.py, cell 6 (§ Louder): syntax error at line 2" in err
    )
    assert "def shout(name: str -> str:" in err


def test_compile_time_error_fails(tangled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit(tangled, ALPHA_PATH, "    return greet(name).upper()", "    return await greet(name)")
    assert run(tangled) == 2
    err = capsys.readouterr().err
    assert "cell 6 (§ Louder): syntax error at line 3 of the cell" in err
    assert "'await' outside async function" in err


def test_syntax_error_in_unexported_cell_is_not_checked(
    tangled: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit(tangled, ALPHA_PATH, 'print(greet("world"))', "print(greet(")
    assert run(tangled, "--check") == 0, capsys.readouterr().err


EXPORTED = "imports its own module ftbook.{} at line 2 of the cell"
PLAIN = "imports the chapter's own module ftbook.{} at line 1 of the cell"


@pytest.mark.parametrize(
    ("chapter", "anchor", "line", "cell", "message"),
    [
        (ALPHA_PATH, "def shout", "from ftbook.alpha import greet", 6, EXPORTED.format("alpha")),
        (ALPHA_PATH, "def shout", "from ftbook import alpha", 6, EXPORTED.format("alpha")),
        (UNSLOTH_PATH, "import math", "import ftbook.efficient_finetuning", 2,
         EXPORTED.format("efficient_finetuning")),
        # a demonstration cell that imports its own chapter's module would, run as a script,
        # use whatever was last tangled instead of the cells above it
        (ALPHA_PATH, 'print(greet("world"))', "from ftbook.alpha import greet", 4,
         PLAIN.format("alpha")),
        (UNSLOTH_PATH, "value = scaled_rank(16)", "import ftbook.efficient_finetuning", 3,
         PLAIN.format("efficient_finetuning")),
    ],
)
def test_self_import_fails(
    tangled: Path,
    capsys: pytest.CaptureFixture[str],
    chapter: str,
    anchor: str,
    line: str,
    cell: int,
    message: str,
) -> None:
    edit(tangled, chapter, anchor, f"{line}\n{anchor}")
    assert run(tangled) == 2
    err = capsys.readouterr().err
    assert f"{chapter}, cell {cell} " in err
    assert message in err


def test_importing_another_module_is_fine(
    tangled: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit(tangled, UNSLOTH_PATH, "import math", "import math\n\nfrom ftbook.alpha import greet")
    assert run(tangled) == 0, capsys.readouterr().err


def test_orphaned_generated_module(tangled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit(tangled, UNSLOTH_PATH, "#| export efficient_finetuning\nimport", "import")
    edit(tangled, UNSLOTH_PATH, "#| export efficient_finetuning\nfrom", "from")
    orphan = tangled / "src/ftbook/efficient_finetuning.py"
    assert run(tangled, "--check") == 1
    out = capsys.readouterr().out
    assert "tangle: orphaned src/ftbook/efficient_finetuning.py" in out
    assert orphan.is_file()
    assert cli(tangled, "--check").returncode == 1

    assert run(tangled) == 0
    out = capsys.readouterr().out
    assert "tangle: removed src/ftbook/efficient_finetuning.py" in out
    assert not orphan.exists()
    assert run(tangled, "--check") == 0


def test_hand_written_orphan_is_an_error(tangled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    helper = tangled / "src/ftbook/helper.py"
    helper.write_text('"""Hand-written."""\n')
    for args in ((), ("--check",)):
        assert run(tangled, *args) == 2
        err = capsys.readouterr().err
        assert "tangle: error: src/ftbook/helper.py: hand-written module" in err
        assert "remove it or add a chapter" in err
    assert helper.read_text() == '"""Hand-written."""\n'


def test_shared_module_names_every_chapter(
    tangled: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tangled / "chapters/13_11_x.py").write_text(
        "# %%\n#| export efficient_finetuning\nEXTRA = 1\n"
    )
    assert run(tangled) == 0, capsys.readouterr().err
    text = (tangled / "src/ftbook/efficient_finetuning.py").read_text()
    assert text.splitlines()[:2] == [
        "# AUTOGENERATED by book/tangle.py from chapters/13_10_unsloth.py, "
        "chapters/13_11_x.py. DO NOT EDIT.",
        "# Edit the chapters and run `python book/tangle.py`.",
    ]
    assert text.endswith("# --- chapters/13_11_x.py :: (top) ---\nEXTRA = 1\n")

    # a third chapter would push the header past 100 characters: it wraps, one per line
    (tangled / "chapters/13_12_y.py").write_text("# %%\n#| export efficient_finetuning\nMORE = 2\n")
    assert run(tangled) == 0, capsys.readouterr().err
    header = (tangled / "src/ftbook/efficient_finetuning.py").read_text().split("\n\n")[0]
    assert header.splitlines() == [
        "# AUTOGENERATED by book/tangle.py. DO NOT EDIT. Sources:",
        "#   chapters/13_10_unsloth.py",
        "#   chapters/13_11_x.py",
        "#   chapters/13_12_y.py",
        "# Edit the chapters and run `python book/tangle.py`.",
    ]
    assert all(len(line) <= 100 for line in header.splitlines())


def test_real_repository_is_in_sync() -> None:
    chapters = sorted((REPO / "chapters").glob("[0-9][0-9]_[0-9][0-9]_*.py"))
    if not chapters:
        pytest.skip("the repository has no chapter yet")
    problems = tangle.check(REPO)
    assert problems == [], "src/ftbook/ is out of sync; run `python book/tangle.py`"
