#!/usr/bin/env python3
"""Execute the book's chapters, each one only when something its outputs depend on changed.

Jupyter Book then renders the executed notebooks (``book/ftbook_site.py`` hands them to
myst-nb); it executes nothing itself. myst-nb's own cache keys on the code cells alone, so it
would serve a stale page after a change of profile, package, requirements or data. Here a
chapter's **key** holds everything its outputs depend on:

- its source text and the profile;
- the environment: ``requirements*.txt``, ``pyproject.toml``, the Python version, this file;
- the package modules it uses: every ``ftbook.<module>`` the chapter names, and, transitively,
  every module those modules name (imports, lazy imports and strings such as a subprocess's
  ``-c`` code), by content;
- the files it read in its last run: the kernel records every file it opens for reading under
  the data folder, the cache (``$FTBOOK_CACHE`` or ``.cache/``) and ``outputs/`` (a Python
  audit hook), together
  with the weight files beside them that native code reads (``*.safetensors``, ``*.gguf``, ...),
  by content. An upstream chapter that rewrites an artifact with new contents therefore
  re-executes every chapter that read it; one that rewrites it identically does not.
  The hook is a ``sitecustomize`` module put first on ``PYTHONPATH``, so it also records the
  reads of the Python processes a chapter starts (13-08's ``accelerate launch``, 13-10's
  isolated jobs).

A chapter whose key matches its last successful run is served from ``_build/executed/<profile>/``;
any other is executed (in toc order, in ``chapters/``, with ``FTBOOK_PROFILE`` set) and stored.
A fresh clone has no store and executes everything; ``--force`` re-executes all.

Usage::

    python book/execute.py [--profile tiny] [--force] [--timings PATH]

At the end it prints a per-chapter table (seconds, budget, run or cached) and writes it as JSON
(default ``_build/timings.json``). Exit status 1 when a chapter fails (its stored notebook is
removed, so no stale page can be rendered).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORE = "_build/executed"  # under the book's root
EXECUTOR_VERSION = "1"
CELL_TIMEOUT = {"smoke": 600, "tiny": 1800, "full": 7200}  # seconds per cell
ENVIRONMENT_FILES = ("requirements.txt", "requirements-nodeps.txt", "pyproject.toml")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".npy", ".npz", ".model")
MODULE_NAME = re.compile(r"\bftbook\.([a-z_][a-z0-9_]*)")
FROM_PACKAGE = re.compile(r"\bfrom\s+ftbook\s+import\s+\(?([\w\s,]+)\)?")

# Budgets of the tiny profile on 2 CPU cores, in seconds, from the issues that set them (an
# appendix's budget is its share of the whole book's 45 minutes).
BUDGET_SECONDS = {
    "tiny": {
        # the issues' budgets on 2 cores; Appendix C: 1 minute plus the book LM's pretraining
        "00_01_workbench": 60, "00_02_data": 60, "00_03_base_models": 540,
        "13_01_full_finetuning": 300, "13_02_lora": 300, "13_03_qlora": 240,
        "13_04_adapters": 360, "13_05_prompt_tuning": 240, "13_06_instruction_tuning": 300,
        "13_07_reward_modeling": 240, "13_08_rlhf_ppo": 360, "13_09_dpo_grpo": 480,
        "13_10_unsloth": 300,
    },
}

# Installed as `sitecustomize` (first on PYTHONPATH) for the kernel and every Python process it
# starts: records the files they open for reading under the traced roots.
SITECUSTOMIZE = """\
\"\"\"ftbook build: record the files this process reads (book/execute.py).\"\"\"
import os
import sys


def _ftbook_trace_reads(trace_file, roots):
    seen = set()
    roots = tuple(os.path.join(os.path.realpath(r), "") for r in roots if r)

    def hook(event, args):
        if event != "open" or isinstance(args[0], int):
            return
        path, mode, flags = args
        if mode is not None and any(c in mode for c in "wax+"):
            return
        if mode is None and flags is not None and flags & 3:  # O_WRONLY or O_RDWR
            return
        try:
            real = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError, OSError):
            return
        if real in seen or not real.startswith(roots):
            return
        seen.add(real)
        with open(trace_file, "a", encoding="utf-8") as trace:
            trace.write(real + "\\n")

    sys.addaudithook(hook)


if os.environ.get("FTBOOK_TRACE_READS"):
    _ftbook_trace_reads(os.environ["FTBOOK_TRACE_READS"],
                        os.environ.get("FTBOOK_TRACE_ROOTS", "").split(os.pathsep))
"""


# --------------------------------------------------------------------------------------------
# What a chapter depends on
# --------------------------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FileHashes:
    """Content hashes of files, remembered by (size, mtime) so that large model files are read
    once per change, not once per build."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.known: dict[str, list] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.known = {}

    def __call__(self, file: Path) -> str:
        try:
            stat = file.stat()
        except OSError:
            return "missing"
        if not file.is_file():
            return "not a file"
        stamp = [stat.st_size, stat.st_mtime_ns]
        entry = self.known.get(str(file))
        if entry is not None and entry[:2] == stamp:
            return entry[2]
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        self.known[str(file)] = [*stamp, digest.hexdigest()]
        return digest.hexdigest()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.known))


def toc_chapters(root: Path = ROOT) -> list[str]:
    """Chapter names (``13_02_lora``) in execution order: the appendices (``00_*``), which
    build the models every chapter loads, then the chapters, each group in the order of
    ``_toc.yml``. (Run first, an appendix is charged with its own pretraining in the timings.)"""
    names = re.findall(r"^\s*-?\s*file:\s*chapters/(\S+?)\s*$", (root / "_toc.yml").read_text(),
                       re.M)
    names = [n.removesuffix(".py") for n in names if (root / "chapters" / f"{n}.py").exists()]
    return sorted(names, key=lambda name: not name.startswith("00_"))  # stable: toc order kept


def named_modules(text: str, package_dir: Path) -> set[str]:
    """The ``ftbook`` modules a piece of code names (imports, lazy imports, strings)."""
    names = set(MODULE_NAME.findall(text))
    for group in FROM_PACKAGE.findall(text):
        names.update(n.strip() for n in group.split(",") if n.strip())
    return {n for n in names if (package_dir / f"{n}.py").exists()}


def package_closure(text: str, root: Path = ROOT) -> dict[str, str]:
    """{module: content hash} for every package module the chapter uses, transitively."""
    package_dir = root / "src" / "ftbook"
    todo, seen = named_modules(text, package_dir), {}
    while todo:
        module = todo.pop()
        source = (package_dir / f"{module}.py").read_text(encoding="utf-8")
        seen[module] = sha256_bytes(source.encode())
        todo |= named_modules(source, package_dir) - seen.keys()
    return dict(sorted(seen.items()))


def environment_key(root: Path = ROOT) -> dict[str, str]:
    key = {name: sha256_bytes((root / name).read_bytes()) for name in ENVIRONMENT_FILES
           if (root / name).exists()}
    key["python"] = sys.version.split()[0]
    key["executor"] = EXECUTOR_VERSION + ":" + sha256_bytes(SITECUSTOMIZE.encode())[:16]
    return key


def static_key(chapter: str, profile: str, root: Path = ROOT) -> dict:
    """The part of the key known before running: source, profile, environment, package."""
    text = (root / "chapters" / f"{chapter}.py").read_text(encoding="utf-8")
    return {"source": sha256_bytes(text.encode()), "profile": profile,
            "environment": environment_key(root), "package": package_closure(text, root)}


def traced_roots(root: Path = ROOT) -> list[str]:
    """The folders whose reads are recorded: data, cache, outputs."""
    roots = [root / "outputs", Path(os.environ.get("FTBOOK_CACHE") or root / ".cache")]
    data = os.environ.get("FTBOOK_DATA")
    candidates = [Path(data)] if data else [root / "data", root.parent / "shared" / "data"]
    roots += [c for c in candidates if c.is_dir()]
    return [str(p.resolve()) for p in roots]


def expand_reads(paths: list[str]) -> list[str]:
    """The traced files plus the weight files beside them, which native code reads untraced."""
    files = {p for p in paths if Path(p).is_file()}
    for folder in {Path(p).parent for p in files}:
        files |= {str(f) for f in folder.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file()}
    return sorted(files)


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


def store_dir(profile: str, root: Path = ROOT) -> Path:
    return root / STORE / profile


def file_hashes(root: Path = ROOT) -> FileHashes:
    return FileHashes(root / STORE / "file-hashes.json")


def load_record(chapter: str, profile: str, root: Path = ROOT) -> dict | None:
    path = store_dir(profile, root) / f"{chapter}.json"
    notebook = store_dir(profile, root) / f"{chapter}.ipynb"
    if not (path.exists() and notebook.exists()):
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def why_stale(chapter: str, profile: str, hashes: FileHashes, root: Path = ROOT) -> str | None:
    """None when the stored run of `chapter` is current, else the first reason it is not."""
    record = load_record(chapter, profile, root)
    if record is None:
        return "never executed in this profile"
    key = static_key(chapter, profile, root)
    old = record["key"]
    if old.get("source") != key["source"]:
        return "its source changed"
    if old.get("environment") != key["environment"]:
        return "requirements, Python or the executor changed"
    if old.get("package") != key["package"]:
        changed = sorted(m for m in key["package"].keys() | old.get("package", {}).keys()
                         if key["package"].get(m) != old.get("package", {}).get(m))
        return "package module(s) changed: " + ", ".join(f"ftbook.{m}" for m in changed)
    for path, digest in record["reads"].items():
        if hashes(Path(path)) != digest:
            return f"a file it read changed: {path}"
    return None


def execute(chapter: str, profile: str, hashes: FileHashes, root: Path = ROOT) -> float:
    """Execute one chapter in a fresh kernel and store the notebook and its key; seconds."""
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    store = store_dir(profile, root)
    store.mkdir(parents=True, exist_ok=True)
    for suffix in (".ipynb", ".json"):  # never leave a stale page behind a failure
        (store / f"{chapter}{suffix}").unlink(missing_ok=True)
    source = root / "chapters" / f"{chapter}.py"
    text = source.read_text(encoding="utf-8")
    key = static_key(chapter, profile, root)
    trace_file = store / f"{chapter}.reads"
    trace_file.unlink(missing_ok=True)
    trace_file.touch()

    notebook = jupytext.reads(text, fmt="py:percent")
    tracer = store / "tracer"
    tracer.mkdir(exist_ok=True)
    (tracer / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {"FTBOOK_PROFILE": profile, "FTBOOK_TRACE_READS": str(trace_file),
           "FTBOOK_TRACE_ROOTS": os.pathsep.join(traced_roots(root)),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tracer),
                                                       os.environ.get("PYTHONPATH")]))}
    saved = {name: os.environ.get(name) for name in [*env, "MPLBACKEND"]}
    os.environ.update(env)  # the kernel and the processes it starts inherit these
    os.environ.pop("MPLBACKEND", None)  # the kernel's own default: inline figures
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT.get(profile, 1800),
                            kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(root / "chapters")}})
    start = time.perf_counter()
    try:
        client.execute()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    seconds = time.perf_counter() - start
    notebook.metadata["ftbook"] = {"chapter": chapter, "profile": profile,
                                   "source_sha256": key["source"]}
    reads = expand_reads(trace_file.read_text().split())
    record = {"chapter": chapter, "key": key, "seconds": round(seconds, 1),
              "executed": time.strftime("%Y-%m-%d %H:%M:%S"),
              "reads": {path: hashes(Path(path)) for path in reads}}
    nbformat.write(notebook, store / f"{chapter}.ipynb")
    (store / f"{chapter}.json").write_text(json.dumps(record, indent=1))
    trace_file.unlink()
    return seconds


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def format_table(rows: list[dict]) -> str:
    lines = [f"{'chapter':28s} {'seconds':>8s} {'budget':>7s}  status",
             f"{'-' * 28} {'-' * 8} {'-' * 7}  {'-' * 30}"]
    for row in rows:
        budget = "" if row["budget"] is None else str(row["budget"])
        seconds = "" if row["seconds"] is None else f"{row['seconds']:.0f}"
        over = " OVER BUDGET" if row["budget"] and row["seconds"] and row["status"] == "run" \
            and row["seconds"] > row["budget"] else ""
        lines.append(f"{row['chapter']:28s} {seconds:>8s} {budget:>7s}  {row['status']}{over}")
    ran = sum(r["seconds"] or 0 for r in rows if r["status"] == "run")
    lines.append(f"executed {sum(r['status'] == 'run' for r in rows)} of {len(rows)} chapters "
                 f"in {ran:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default=os.environ.get("FTBOOK_PROFILE", "tiny"),
                        choices=("smoke", "tiny", "full"))
    parser.add_argument("--force", action="store_true", help="re-execute every chapter")
    parser.add_argument("--timings", type=Path, default=ROOT / "_build" / "timings.json")
    parser.add_argument("--print-timings", type=Path, metavar="JSON",
                        help="print the table of an earlier run's timings file and exit")
    parser.add_argument("--only", nargs="+", metavar="CHAPTER",
                        help="consider only these chapters (e.g. 13_02_lora)")
    args = parser.parse_args(argv)
    if args.print_timings:
        print(format_table(json.loads(args.print_timings.read_text())["chapters"]))
        return 0
    hashes = file_hashes()
    budgets = BUDGET_SECONDS.get(args.profile, {})
    rows, failed = [], None
    for chapter in toc_chapters():
        if args.only and chapter not in args.only:
            continue
        reason = "forced" if args.force else why_stale(chapter, args.profile, hashes)
        row = {"chapter": chapter, "budget": budgets.get(chapter)}
        if reason is None:
            row.update(seconds=load_record(chapter, args.profile)["seconds"], status="cached")
            print(f"== {chapter}: cached", flush=True)
        else:
            print(f"== {chapter}: executing ({reason})", flush=True)
            try:
                row.update(seconds=execute(chapter, args.profile, hashes), status="run")
            except Exception as error:  # noqa: BLE001 - report the chapter, then stop
                print(f"\n!! {chapter} failed in the {args.profile} profile:\n{error}",
                      file=sys.stderr)
                row.update(seconds=None, status="FAILED")
                failed = chapter
            hashes.save()
        rows.append(row)
        if failed:
            break
    print("\n" + format_table(rows))
    args.timings.parent.mkdir(parents=True, exist_ok=True)
    args.timings.write_text(json.dumps({"profile": args.profile, "chapters": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
