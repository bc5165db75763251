"""Sphinx glue for the book (a Jupyter Book ``local_extensions`` entry in ``_config.yml``).

- ``read_chapter``: the notebook reader myst-nb uses for ``chapters/*.py``. It returns the
  notebook that ``book/execute.py`` executed for this source in the current profile
  (``FTBOOK_PROFILE``, default ``tiny``), with its outputs, and refuses a missing or stale one:
  Jupyter Book executes nothing itself.
- ``setup``: copies MathJax (PyPI ``django-static-mathjax``) into the site's ``_static/mathjax``,
  so formulas typeset offline (``_config.yml`` points ``mathjax_path`` there); and drops the
  scripts of sphinx-thebe, which Jupyter Book loads by default: the book offers no live kernel,
  their configuration points at unpkg.com, and it is added twice (a JavaScript error on every
  page, "Identifier 'THEBE_JS_URL' has already been declared").
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

BOOK = Path(__file__).resolve().parent
MATHJAX_SKIP = ("tex-chtml-full", "tex-svg", "tex-mml-svg", "mml-svg", "node-main", "svg")


def _executor() -> Any:
    spec = importlib.util.spec_from_file_location("ftbook_execute", BOOK / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_chapter(text: str, **kwargs: Any) -> Any:
    """The executed notebook for this chapter source (myst-nb custom format reader)."""
    import nbformat

    executor = _executor()
    profile = os.environ.get("FTBOOK_PROFILE", "tiny")
    digest = hashlib.sha256(text.encode()).hexdigest()
    store = executor.store_dir(profile)
    for path in sorted(store.glob("*.json")) if store.is_dir() else []:
        if path.name == "file-hashes.json":
            continue
        record = json.loads(path.read_text())
        if record.get("key", {}).get("source") != digest:
            continue
        chapter = record["chapter"]
        reason = executor.why_stale(chapter, profile, executor.file_hashes())
        if reason is not None:
            raise RuntimeError(f"chapters/{chapter}.py: the executed notebook of the {profile} "
                               f"profile is stale ({reason}); run `bash book/make.sh build`")
        return nbformat.read(path.with_suffix(".ipynb"), as_version=4)
    names = [p.relative_to(executor.ROOT).as_posix()
             for p in sorted((executor.ROOT / "chapters").glob("*.py"))
             if p.read_text(encoding="utf-8") == text] or ["a chapter"]
    raise RuntimeError(f"{names[0]} has no executed notebook in the {profile} profile for its "
                       f"current source; run `bash book/make.sh build` (or `python "
                       f"book/execute.py --profile {profile}`) before `jupyter-book build`")


def _mathjax_source() -> Path:
    import mathjax  # django-static-mathjax: the MathJax 3 distribution as package data

    return Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"


def _copy_mathjax(app: Any, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    target = Path(app.outdir) / "_static" / "mathjax"
    shutil.copytree(_mathjax_source(), target, dirs_exist_ok=True,
                    ignore=lambda folder, names: [n for n in names if n.startswith(MATHJAX_SKIP)])


def _is_thebe(script: Any) -> bool:
    filename = str(getattr(script, "filename", "") or "")
    body = str(getattr(script, "attributes", {}).get("body", "") or "")
    return "thebe" in filename.lower() or "THEBE" in body


def _drop_thebe(app: Any, pagename: str, templatename: str, context: dict, doctree: Any) -> None:
    if "script_files" in context:
        context["script_files"] = [s for s in context["script_files"] if not _is_thebe(s)]


def setup(app: Any) -> dict[str, Any]:
    app.connect("build-finished", _copy_mathjax)
    app.connect("html-page-context", _drop_thebe)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
