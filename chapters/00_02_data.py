# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# (data)=
# # Appendix B: The data
#
# ```{admonition} At a glance
# :class: tip
# **Prerequisites:** Python; the Hugging Face `datasets` library at the level of `Dataset`,
# `select` and `map`; {ref}`workbench`. **Reading time:** ~10 min.
# **You will build** `ftbook.data`: one loader per dataset the book uses (SST-2, Alpaca,
# AlpacaEval, HH-RLHF, GSM8K and three small text corpora) that reads a local file when it is there
# and the Hugging Face hub otherwise; validation that names the file, line and field of every
# malformed row instead of skipping it; and seeded, stratified subsets that give each profile its
# share of the data.
# ```
#
# Fine-tuning changes a model to fit data, so a silent change in the data is a silent change in
# every result downstream. A row dropped by a lenient parser, a label read as a string, a trailing
# space that the tokenizer turns into an extra token: none of these fails loudly, and all of them
# move the numbers a chapter reports. This appendix builds the loaders every chapter uses, shows
# what the data looks like, and makes the failure modes loud.
#
# The rule of the loaders is simple. When the file is in the local data folder, it is used; when
# it is not, the loader asks the Hugging Face hub; when that fails too (no network, as in the
# tests), it raises an error that names the file it looked for and how to provide it. Every row is
# validated, and a malformed row stops the load with a message that says where and what.

# %%
from ftbook.workbench import (
    Timer,
    data_dir,
    device_cell,
    get_device,
    get_profile,
    seed_everything,
    show_figure,
    show_table,
)

CHAPTER = "00_02_data"
PROFILE = get_profile()
SEED = 0
seed_everything(SEED)
DEVICE = get_device()
RUN_INFO = device_cell(PROFILE, SEED, DEVICE)
print(f"data    : {data_dir()}")

# %% [markdown]
# ## The layout
#
# `FTBOOK_DATA` points at a folder laid out like the repository's `../shared/data` (its README
# lists the provenance, licence and checksum of every file). The two constants below are the one
# place that knows this layout; nothing else in the book spells a data path.
#
# | dataset | what it is | used in |
# |---|---|---|
# | SST-2 | movie-review sentiment, `sentence`/`label` (GLUE) | classification chapters (13-01 to 13-05) |
# | Alpaca | 2,000 instruction/input/output records | instruction tuning (13-06), Unsloth (13-10) |
# | AlpacaEval | 805 held-out instructions with reference outputs | evaluating instruction-tuned models |
# | HH-RLHF | 2,312 chosen/rejected dialogue pairs (harmless-base test) | reward models, PPO, DPO |
# | GSM8K | grade-school math problems with `#### N` answers | verifiable rewards (13-09) |
# | text corpora | Tiny Shakespeare, 30 Wikipedia articles, 300 C4 documents | pretraining the tiny base LM |
#
# The hub ids are the datasets' homes on the Hugging Face hub. The text corpora are small
# excerpts with no hub file of the same content, so for them the local file is the only source.

# %%
#| export
"""The data: local-first loaders for SST-2, Alpaca, AlpacaEval, HH-RLHF, GSM8K and text corpora.

Defined in Appendix B (`chapters/00_02_data.py`). A loader reads its file under `data_dir()`
(`$FTBOOK_DATA`, a folder laid out like the repository's `../shared/data`) when the file is there,
else the Hugging Face hub; if both fail it raises `MissingDataError`. Every row is validated: a
malformed row raises `DataFormatError` naming the file, line or record, and field. Nothing is
skipped.

Datasets: SST-2 (Socher et al. 2013) in its GLUE version (Wang et al. 2018, arXiv:1804.07461);
Alpaca (Taori et al. 2023; Self-Instruct, arXiv:2212.10560); AlpacaEval (Li et al. 2023;
AlpacaFarm, arXiv:2305.14387); HH-RLHF (Bai et al. 2022, arXiv:2204.05862); GSM8K (Cobbe et al.
2021, arXiv:2110.14168); C4 (Raffel et al. 2020, arXiv:1910.10683).
"""
import gzip
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, Features, Value

from ftbook.workbench import data_dir, pick

# Relative paths under the data folder (see shared/data/README.md).
DATA_FILES = {
    "sst2/train": "sst2/train.tsv",
    "sst2/validation": "sst2/dev.tsv",
    "alpaca": "instruct/alpaca/alpaca_sample_2000.json",
    "alpaca_eval": "instruct/alpaca_eval/alpaca_eval.jsonl",
    "hh_rlhf": "preference/hh-rlhf/harmless-base_test.jsonl.gz",
    "gsm8k/train": "verifiable/gsm8k/train.jsonl",
    "gsm8k/test": "verifiable/gsm8k/test.jsonl",
}
TEXT_CORPORA = {
    "tinyshakespeare": "text/tinyshakespeare/input.txt",
    "wiki": "text/wiki_demo/wiki_demo.txt",
    "c4": "text/c4_demo/c4_demo.jsonl",
}
# How each corpus splits into documents: paragraphs (blank-line separated), lines, or JSONL {text}.
TEXT_CORPUS_UNITS = {"tinyshakespeare": "paragraph", "wiki": "line", "c4": "jsonl"}

# The hub fallback for each DATA_FILES key: `datasets.load_dataset(path, **kwargs)`. The hub
# copies can differ from the local files (the hub's Alpaca has all 52k records, not the 2,000
# sample). AlpacaEval's hub repo has a loading script, which `datasets` 4 no longer runs, so its
# JSON file is read directly.
HUB_DATASETS = {
    "sst2/train": ("stanfordnlp/sst2", {"split": "train"}),
    "sst2/validation": ("stanfordnlp/sst2", {"split": "validation"}),
    "alpaca": ("tatsu-lab/alpaca", {"split": "train"}),
    "alpaca_eval": (
        "json",
        {"data_files": "hf://datasets/tatsu-lab/alpaca_eval/alpaca_eval.json", "split": "train"},
    ),
    "hh_rlhf": ("Anthropic/hh-rlhf", {"data_dir": "harmless-base", "split": "test"}),
    "gsm8k/train": ("openai/gsm8k", {"name": "main", "split": "train"}),
    "gsm8k/test": ("openai/gsm8k", {"name": "main", "split": "test"}),
}

SST2_SPLITS = ("train", "validation")
SST2_LABELS = ("negative", "positive")  # label 0, label 1
SST2_HEADER = "sentence\tlabel"
GSM8K_SPLITS = ("train", "test")
GSM8K_NUMBER = r"[-+]?\d+(?:\.\d+)?"  # a final answer after '####', commas removed
HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
MAX_REPORTED_PROBLEMS = 10


# %% [markdown]
# ## Errors that say what to fix
#
# Two errors cover everything that can go wrong. `MissingDataError` is a `FileNotFoundError`: the
# file is neither in the data folder nor reachable on the hub. Its message names the exact path
# looked for, says how to set `FTBOOK_DATA`, and carries the hub's error on one line.
# `DataFormatError` is a `ValueError`: the file is there but a row is wrong. A parser collects the
# problems of *all* rows, reports the first ten with the total count, and then raises; it never
# returns a dataset with a bad row quietly removed. Lines are counted from 1 as in an editor (the
# TSV header is line 1), records of a JSON array from 0 as in Python (`record [17]`). The later
# chapters raise the same error for the records they check themselves: 13-06's instruction formats
# and 13-07's preference pairs.

# %%
#| export
class DataFormatError(ValueError):
    """Malformed records; the message names where (file and line, or record) and the field.

    The loaders raise it after validating every row: it lists the first `MAX_REPORTED_PROBLEMS`
    problems and the total count (Appendix B, "Errors that say what to fix"). 13-06's format
    converters raise it for one record, 13-07's `validate_preference_records` for a list.
    """


class MissingDataError(FileNotFoundError):
    """The data is neither in the local data folder nor on the hub; the message says how to fix."""


class _Problems:
    """Collects what is wrong with one source: the total count and the first few messages."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.total = 0
        self.messages: list[str] = []

    def add(self, where: str, what: str) -> None:
        self.total += 1
        if len(self.messages) < MAX_REPORTED_PROBLEMS:
            self.messages.append(f"{where}: {what}")

    def raise_if_any(self) -> None:
        if self.total == 0:
            return
        noun = "problem" if self.total == 1 else "problems"
        shown = "all shown"
        if self.total > len(self.messages):
            shown = f"first {len(self.messages)} shown"
        raise DataFormatError(
            f"{self.total} {noun} in {self.source} ({shown}); no row is ever skipped, so fix "
            "the data and load again:\n" + "\n".join(f"  {m}" for m in self.messages)
        )


def _one_line(error: BaseException, limit: int = 300) -> str:
    """`Type: message` of an exception on one line, shortened to `limit` characters."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


# %% [markdown]
# ## Reading and checking rows
#
# Each file format has a reader that takes a path and turns the file into `(where, record)` pairs,
# where `where` is the location used in messages (`sst2/train.tsv line 17`). A per-dataset check
# turns one record into a clean row or a list of what is wrong with it. The same checks run on
# rows that come from the hub, so a hub copy is held to the same standard as a local file.
#
# SST-2 is a GLUE TSV: a header `sentence<TAB>label`, then one row per line. We split each line on
# the tab ourselves rather than use a CSV reader: CSV quoting rules would treat a `"` at the start
# of a field as an opening quote, while in this format a quote is just a character. GLUE leaves a
# space before the tab, which we strip (a tokenizer would otherwise see it).

# %%
#| export
def _read_text(path: Path) -> str:
    """The file's text, gunzipped if it ends in `.gz`; invalid UTF-8 is a `DataFormatError`."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as handle:
                return handle.read()
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as err:
        raise DataFormatError(f"{path}: cannot be read as UTF-8 text ({_one_line(err)})") from err


def _lines(text: str) -> list[str]:
    """Lines split on newline only (not on the other separators `str.splitlines` knows)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    return lines


def _jsonl_records(path: Path, name: str, problems: _Problems) -> Iterator[tuple[str, Any]]:
    """`(where, record)` for each line of a JSONL file; bad lines are recorded in `problems`."""
    for number, line in enumerate(_lines(_read_text(path)), start=1):
        where = f"{name} line {number}"
        if not line.strip():
            problems.add(where, "empty line, expected a JSON object")
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            problems.add(where, f"invalid JSON ({err.msg} at column {err.colno})")
            continue
        yield where, record


def _text(record: Mapping[str, Any], field: str, errors: list[str], nonempty: bool) -> str:
    """`record[field]` if it is a string (non-blank if `nonempty`); else note why in `errors`."""
    if field not in record:
        errors.append(f"field {field!r} is missing")
        return ""
    value = record[field]
    if not isinstance(value, str):
        errors.append(
            f"field {field!r} is {_show(value)} ({type(value).__name__}), expected a string"
        )
        return ""
    if nonempty and not value.strip():
        errors.append(f"field {field!r} is empty")
    return value


def _build(items: Iterable[tuple[str, Any]], check: Callable[[Mapping[str, Any]], tuple],
           problems: _Problems, features: Features) -> Dataset:
    """Check every record; raise `DataFormatError` if any is wrong, else return the Dataset."""
    columns: dict[str, list[Any]] = {name: [] for name in features}
    for where, record in items:
        if not isinstance(record, dict):
            problems.add(where, f"expected a JSON object, found {type(record).__name__}")
            continue
        row, errors = check(record)
        for error in errors:
            problems.add(where, error)
        if not errors:
            for name, values in columns.items():
                values.append(row[name])
    problems.raise_if_any()
    return Dataset.from_dict(columns, features=features)


def _string_features(*names: str) -> Features:
    return Features({name: Value("string") for name in names})


def _sst2_features() -> Features:
    return Features({"sentence": Value("string"), "label": ClassLabel(names=list(SST2_LABELS))})


def _check_sst2(record: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    errors: list[str] = []
    sentence = _text(record, "sentence", errors, nonempty=True).strip()
    label = record.get("label")
    if "label" not in record:
        errors.append("field 'label' is missing")
    elif isinstance(label, str) and label.strip() in ("0", "1"):
        label = int(label)
    elif not (isinstance(label, int) and not isinstance(label, bool) and label in (0, 1)):
        errors.append(f"field 'label' is {_show(label)}, expected 0 or 1")
    return {"sentence": sentence, "label": label}, errors


def read_sst2_tsv(path: str | Path, name: str | None = None) -> Dataset:
    """Parse a GLUE SST-2 TSV (header `sentence<TAB>label`) into a Dataset.

    Columns: `sentence` (str, stripped of GLUE's space before the tab) and `label` (0 negative,
    1 positive). Lines are split on the single tab with no quoting. A wrong header, a line without
    exactly one tab, an empty sentence or a label other than 0/1 raises `DataFormatError`; `name`
    is how the file is called in messages (default: the path). Appendix B, "Reading and checking".
    """
    path = Path(path)
    name = name or str(path)
    problems = _Problems(str(path))
    lines = _lines(_read_text(path))
    if not lines:
        problems.add(f"{name} line 1", f"the file is empty, expected the header {SST2_HEADER!r}")
    elif lines[0].rstrip() != SST2_HEADER:
        problems.add(f"{name} line 1", f"header is {_show(lines[0])}, expected {SST2_HEADER!r}")

    def items() -> Iterator[tuple[str, dict[str, str]]]:  # lazily, so problems stay in line order
        for number, line in enumerate(lines[1:], start=2):
            where = f"{name} line {number}"
            fields = line.split("\t")
            if len(fields) != 2:
                problems.add(
                    where, f"expected 2 tab-separated fields (sentence, label), found {len(fields)}"
                )
                continue
            yield where, {"sentence": fields[0], "label": fields[1]}

    return _build(items(), _check_sst2, problems, _sst2_features())


# %% [markdown]
# A quick check on a file written on the spot: the parser strips GLUE's trailing space and turns
# the label into an integer class.

# %%
import tempfile

with tempfile.TemporaryDirectory() as tmp:
    good = Path(tmp) / "good.tsv"
    good.write_text("sentence\tlabel\nit 's a charming journey . \t1\nflat and dull \t0\n")
    tiny_sst2 = read_sst2_tsv(good)
print(tiny_sst2.features)
print(tiny_sst2[:])
assert tiny_sst2["sentence"][:] == ["it 's a charming journey .", "flat and dull"]
assert list(tiny_sst2["label"]) == [1, 0]

# %% [markdown]
# The instruction, preference and math datasets are JSON. Alpaca is one JSON array; AlpacaEval,
# HH-RLHF and GSM8K are JSON Lines (HH-RLHF gzipped, as Anthropic ships it). Each check requires
# the fields the book uses to be strings and the ones that carry content to be non-blank
# (Alpaca's `input` may be empty: most instructions have none).
#
# Two datasets need a little parsing beyond the fields.
#
# **HH-RLHF** stores each side of a pair as a whole dialogue, `\n\nHuman: … \n\nAssistant: …`,
# and the two sides differ only at the end. Reward models and DPO need the shared context (the
# *prompt*) and the two final responses separately. We take the prompt to be the longest common
# prefix of `chosen` and `rejected` that ends with `\n\nAssistant:`. For almost every pair this is
# the split at the last `\n\nAssistant:`; a common-prefix split also stays right for the few pairs
# whose response itself continues the dialogue (we count them below). The split is lossless:
# `prompt + chosen_response == chosen`.
#
# **GSM8K** ends each worked answer with a line `#### N`. The final answer `N` is what a verifiable
# reward compares, so we parse it once here, remove thousands separators (`1,080` becomes `1080`),
# and require it to be a number.

# %%
#| export
def split_preference_pair(chosen: str, rejected: str,
                          marker: str = HH_ASSISTANT) -> tuple[str, str, str]:
    """`(prompt, chosen_response, rejected_response)` of an HH-RLHF style pair.

    The prompt is the longest common prefix of the two dialogues that ends with `marker`
    (`"\\n\\nAssistant:"`), so `prompt + chosen_response == chosen`. Raises `ValueError` if the
    two share no such prefix. HH-RLHF: Bai et al. 2022, arXiv:2204.05862; Appendix B.
    """
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(marker)
    if cut < 0:
        raise ValueError(f"chosen and rejected share no prefix ending in {marker!r}")
    end = cut + len(marker)
    return chosen[:end], chosen[end:], rejected[end:]


def parse_gsm8k_answer(answer: str) -> str:
    """The final answer of a GSM8K solution: the number after `####`, commas removed.

    Raises `ValueError` if there is no `#### N` line, more than one, or N is not a number.
    GSM8K: Cobbe et al. 2021, arXiv:2110.14168; Appendix B.
    """
    found = re.findall(r"^####(.*)$", answer, flags=re.MULTILINE)
    if not found:
        raise ValueError("has no '#### <number>' line")
    if len(found) > 1:
        raise ValueError(f"has {len(found)} '####' lines, expected 1")
    value = found[0].strip().replace(",", "")
    if not re.fullmatch(GSM8K_NUMBER, value):
        raise ValueError(f"has final answer {_show(value)} after '####', expected a number")
    return value


def _check_alpaca(record: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    errors: list[str] = []
    row = {
        "instruction": _text(record, "instruction", errors, nonempty=True),
        "input": _text(record, "input", errors, nonempty=False),
        "output": _text(record, "output", errors, nonempty=True),
    }
    return row, errors


def _check_alpaca_eval(record: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    errors: list[str] = []
    fields = ("instruction", "output", "generator", "dataset")
    return {f: _text(record, f, errors, nonempty=True) for f in fields}, errors


def _check_hh(record: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    errors: list[str] = []
    sides = {f: _text(record, f, errors, nonempty=True) for f in ("chosen", "rejected")}
    for field, text in sides.items():
        if text and not text.startswith(HH_HUMAN):
            errors.append(f"field {field!r} starts with {_show(text[:20])}, expected {HH_HUMAN!r}")
        if text and HH_ASSISTANT not in text:
            errors.append(f"field {field!r} has no Assistant turn ({HH_ASSISTANT!r})")
    if errors:
        return {}, errors
    try:
        prompt, chosen_response, rejected_response = split_preference_pair(**sides)
    except ValueError as err:
        return {}, [str(err)]
    row = {**sides, "prompt": prompt, "chosen_response": chosen_response,
           "rejected_response": rejected_response}
    return row, []


def _check_gsm8k(record: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    errors: list[str] = []
    question = _text(record, "question", errors, nonempty=True)
    answer = _text(record, "answer", errors, nonempty=True)
    final_answer = ""
    if answer:
        try:
            final_answer = parse_gsm8k_answer(answer)
        except ValueError as err:
            errors.append(f"field 'answer' {err}")
    return {"question": question, "answer": answer, "final_answer": final_answer}, errors


def read_alpaca_json(path: str | Path, name: str | None = None) -> Dataset:
    """Parse an Alpaca JSON array of `{instruction, input, output}` records (all strings).

    `instruction` and `output` must be non-blank; a malformed record raises `DataFormatError`
    naming `record [i]` (0-based) and the field. Alpaca: Taori et al. 2023; Appendix B.
    """
    path = Path(path)
    name = name or str(path)
    problems = _Problems(str(path))
    try:
        records = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        problems.add(f"{name} line {err.lineno}", f"invalid JSON ({err.msg} at column {err.colno})")
        records = []
    if not isinstance(records, list):
        problems.add(name, f"expected a JSON array of records, found {type(records).__name__}")
        records = []
    items = ((f"{name} record [{i}]", record) for i, record in enumerate(records))
    features = _string_features("instruction", "input", "output")
    return _build(items, _check_alpaca, problems, features)


def read_alpaca_eval_jsonl(path: str | Path, name: str | None = None) -> Dataset:
    """Parse AlpacaEval JSONL `{instruction, output, generator, dataset}` (all non-blank strings).

    `output` is the reference answer of `generator` (text-davinci-003 in AlpacaEval 1); `dataset`
    names the source of the instruction. AlpacaEval: Li et al. 2023; Appendix B.
    """
    path = Path(path)
    name = name or str(path)
    problems = _Problems(str(path))
    features = _string_features("instruction", "output", "generator", "dataset")
    return _build(_jsonl_records(path, name, problems), _check_alpaca_eval, problems, features)


def read_hh_rlhf_jsonl(path: str | Path, name: str | None = None) -> Dataset:
    """Parse HH-RLHF JSONL (optionally `.gz`) `{chosen, rejected}` into a preference Dataset.

    Columns `chosen`, `rejected` (whole dialogues) plus `prompt`, `chosen_response`,
    `rejected_response` from `split_preference_pair`. Both sides must start with `\\n\\nHuman:`
    and contain an Assistant turn. Bai et al. 2022, arXiv:2204.05862; Appendix B.
    """
    path = Path(path)
    name = name or str(path)
    problems = _Problems(str(path))
    features = _string_features(
        "chosen", "rejected", "prompt", "chosen_response", "rejected_response"
    )
    return _build(_jsonl_records(path, name, problems), _check_hh, problems, features)


def read_gsm8k_jsonl(path: str | Path, name: str | None = None) -> Dataset:
    """Parse GSM8K JSONL `{question, answer}`, adding `final_answer` from the `#### N` line.

    A missing or non-numeric final answer raises `DataFormatError`. Cobbe et al. 2021,
    arXiv:2110.14168; Appendix B.
    """
    path = Path(path)
    name = name or str(path)
    problems = _Problems(str(path))
    features = _string_features("question", "answer", "final_answer")
    return _build(_jsonl_records(path, name, problems), _check_gsm8k, problems, features)


# %% [markdown]
# ## Text corpora
#
# The tiny base language model of the next appendix (`00_03_base_models`) is pretrained on three small corpora,
# each returned as a list of documents. What a "document" is depends on the file: Tiny Shakespeare
# is one play-like text, and we split it into paragraphs at blank lines, which makes each document
# one speech with its speaker's name (the first line of the file is `First Citizen:`); the
# Wikipedia excerpt has one article per line; C4 is JSON Lines with a `text` field. An empty
# Wikipedia line or an empty C4 text is an error, as elsewhere.

# %%
#| export
def read_text_corpus(path: str | Path, unit: str, name: str | None = None) -> list[str]:
    """The documents of a text file: `unit` is `"paragraph"` (split at blank lines, each
    stripped), `"line"` (one document per line; an empty line is an error) or `"jsonl"`
    (`{"text": str}` per line). Raises `DataFormatError` for malformed input. Appendix B.
    """
    path = Path(path)
    name = name or str(path)
    problems = _Problems(str(path))
    documents: list[str] = []
    if unit == "paragraph":
        pieces = re.split(r"\n\s*\n", _read_text(path))
        documents = [piece.strip() for piece in pieces if piece.strip()]
    elif unit == "line":
        for number, line in enumerate(_lines(_read_text(path)), start=1):
            if line.strip():
                documents.append(line)
            else:
                problems.add(f"{name} line {number}", "empty line, expected one document per line")
    elif unit == "jsonl":
        for where, record in _jsonl_records(path, name, problems):
            errors: list[str] = []
            if not isinstance(record, dict):
                errors.append(f"expected a JSON object, found {type(record).__name__}")
            else:
                documents.append(_text(record, "text", errors, nonempty=True))
            for error in errors:
                problems.add(where, error)
    else:
        raise ValueError(f"unknown unit {unit!r}; choose paragraph, line or jsonl")
    if not documents and problems.total == 0:
        problems.add(name, "no documents in the file")
    problems.raise_if_any()
    return documents


# %% [markdown]
# ## The loaders
#
# A loader looks for its file under `data_dir()` and, if the file is there, parses it. Otherwise
# it tries the hub, and checks the hub's rows with the same function as the file's rows. If
# `data_dir()` itself fails (for example `FTBOOK_DATA` names a folder that does not exist), that
# counts as "no local file": the hub is tried, and the final error carries both messages.
#
# The hub branch cannot run in the tests or in CI, which have no network; the tests only check
# that its failure becomes a `MissingDataError` with a useful message. It is kept deliberately
# small: one `load_dataset` call per dataset, then the same checks as for a local file.

# %%
#| export
from datasets import load_dataset


def _locate(relative: str) -> tuple[Path | None, str]:
    """The local file for `relative` (None if absent) and what was looked for, for messages."""
    try:
        path = data_dir() / relative
    except FileNotFoundError as err:  # DataDirError (a subclass), or no book root to look under
        return None, f"{relative} (no local data folder: {_one_line(err)})"
    return (path if path.is_file() else None), str(path)


def _missing(looked_for: str, relative: str, hub_note: str) -> MissingDataError:
    return MissingDataError(
        f"no local file {looked_for}; {hub_note}. Set FTBOOK_DATA to a folder laid out like "
        f"shared/data (see its README.md) that holds {relative}, e.g. "
        "`export FTBOOK_DATA=../shared/data`, or go online to use the hub."
    )


def _load_hub(path: str, kwargs: Mapping[str, Any]) -> Dataset:
    """`datasets.load_dataset(path, **kwargs)`: the hub fallback (needs the network).

    Untested here: the tests and CI have no network, so they only exercise its failure.
    """
    return load_dataset(path, **kwargs)


def _load(key: str, read: Callable[[Path, str], Dataset],
          check: Callable[[Mapping[str, Any]], tuple], features: Features) -> Dataset:
    """The local file of `DATA_FILES[key]` if present, else the hub copy, checked row by row."""
    relative = DATA_FILES[key]
    path, looked_for = _locate(relative)
    if path is not None:
        return read(path, relative)
    hub_path, kwargs = HUB_DATASETS[key]
    try:
        rows = _load_hub(hub_path, kwargs)
    except Exception as err:  # offline, unknown id, no access: all mean "not available here"
        note = f"the hub fallback {hub_path!r} failed too ({_one_line(err)})"
        raise _missing(looked_for, relative, note) from err
    source = f"hub {hub_path} {kwargs}"
    items = ((f"{hub_path} record [{i}]", dict(row)) for i, row in enumerate(rows))
    return _build(items, check, _Problems(source), features)


def load_sst2(split: str) -> Dataset:
    """SST-2 (GLUE) `split`: "train" (67,349 rows) or "validation" (872 rows, `sst2/dev.tsv`).

    Columns `sentence` (str) and `label` (0 negative, 1 positive). Local file first, else the hub
    (`stanfordnlp/sst2`). Socher et al. 2013; Wang et al. 2018, arXiv:1804.07461; Appendix B.
    """
    if split not in SST2_SPLITS:
        raise ValueError(f"unknown SST-2 split {split!r}; valid splits: {', '.join(SST2_SPLITS)}")
    return _load(f"sst2/{split}", read_sst2_tsv, _check_sst2, _sst2_features())


def load_alpaca() -> Dataset:
    """The 2,000-record Alpaca sample: columns `instruction`, `input`, `output` (str).

    Hub fallback: `tatsu-lab/alpaca` (all 52k records). Taori et al. 2023; Appendix B.
    """
    features = _string_features("instruction", "input", "output")
    return _load("alpaca", read_alpaca_json, _check_alpaca, features)


def load_alpaca_eval() -> Dataset:
    """AlpacaEval's 805 instructions: `instruction`, `output` (reference), `generator`, `dataset`.

    Hub fallback: `tatsu-lab/alpaca_eval`. Li et al. 2023; arXiv:2305.14387; Appendix B.
    """
    features = _string_features("instruction", "output", "generator", "dataset")
    return _load("alpaca_eval", read_alpaca_eval_jsonl, _check_alpaca_eval, features)


def load_hh_rlhf() -> Dataset:
    """HH-RLHF harmless-base test (2,312 pairs): `chosen`, `rejected`, `prompt`,
    `chosen_response`, `rejected_response` (see `split_preference_pair`).

    Hub fallback: `Anthropic/hh-rlhf`, data_dir harmless-base, split test. Bai et al. 2022,
    arXiv:2204.05862; Appendix B.
    """
    features = _string_features(
        "chosen", "rejected", "prompt", "chosen_response", "rejected_response"
    )
    return _load("hh_rlhf", read_hh_rlhf_jsonl, _check_hh, features)


def load_gsm8k(split: str) -> Dataset:
    """GSM8K `split`: "train" (7,473) or "test" (1,319); `question`, `answer`, `final_answer`.

    `final_answer` is the number after `####` with commas removed (`parse_gsm8k_answer`). Hub
    fallback: `openai/gsm8k`, config main. Cobbe et al. 2021, arXiv:2110.14168; Appendix B.
    """
    if split not in GSM8K_SPLITS:
        raise ValueError(f"unknown GSM8K split {split!r}; valid splits: {', '.join(GSM8K_SPLITS)}")
    features = _string_features("question", "answer", "final_answer")
    return _load(f"gsm8k/{split}", read_gsm8k_jsonl, _check_gsm8k, features)


def load_text_corpus(name: str) -> list[str]:
    """The documents of a text corpus: "tinyshakespeare" (paragraphs), "wiki" (articles, one
    per line) or "c4" (documents). Local files only: these excerpts have no hub equivalent.
    Appendix B, "Text corpora".
    """
    if name not in TEXT_CORPORA:
        raise ValueError(f"unknown text corpus {name!r}; valid names: {', '.join(TEXT_CORPORA)}")
    relative = TEXT_CORPORA[name]
    path, looked_for = _locate(relative)
    if path is None:
        raise _missing(looked_for, relative, "the text corpora have no hub copy of the same file")
    return read_text_corpus(path, TEXT_CORPUS_UNITS[name], relative)


# %% [markdown]
# ## A broken file, loudly
#
# Here is what a malformed file produces. We write a small TSV with four kinds of damage (a label
# that is a word, a line without a tab, an empty sentence, a line with two tabs) and read it with
# the same parser the loader uses.

# %%
with tempfile.TemporaryDirectory() as tmp:
    broken = Path(tmp) / "sst2" / "train.tsv"
    broken.parent.mkdir()
    broken.write_text(
        "sentence\tlabel\n"
        "a gorgeous , witty , seductive movie . \t1\n"
        "quite good , actually \tpositive\n"
        "no tab on this line 0\n"
        " \t1\n"
        "one\ttab\ttoo many\n"
    )
    try:
        read_sst2_tsv(broken, "sst2/train.tsv")
    except DataFormatError as err:
        broken_message = str(err)
print(broken_message)
assert "4 problems" in broken_message
assert "sst2/train.tsv line 3: field 'label' is 'positive', expected 0 or 1" in broken_message
assert "line 4: expected 2 tab-separated fields" in broken_message
assert "line 5: field 'sentence' is empty" in broken_message

# %% [markdown]
# Every problem is reported with its line, so one run finds all of them; the good row on line 2
# does not make the load succeed partially. A missing file is just as explicit. Below, the data
# folder points at an empty temporary folder, and we ask for a text corpus (which, having no hub
# copy, does not touch the network):

# %%
saved_data = os.environ.get("FTBOOK_DATA")
with tempfile.TemporaryDirectory() as tmp:
    os.environ["FTBOOK_DATA"] = tmp
    try:
        load_text_corpus("wiki")
    except MissingDataError as err:
        missing_message = str(err)
    finally:
        if saved_data is None:
            del os.environ["FTBOOK_DATA"]
        else:
            os.environ["FTBOOK_DATA"] = saved_data
print(missing_message)
assert "text/wiki_demo/wiki_demo.txt" in missing_message and "FTBOOK_DATA" in missing_message

# %% [markdown]
# ## Subsets that keep the label balance
#
# The profiles use parts of the data: a few dozen rows in `smoke`, a few thousand SST-2 training
# rows in `tiny`, everything in `full`. A random subset of $n$ rows has the right label balance only
# on average; for small $n$ it can be noticeably off, which shows up as a shifted majority-class
# baseline. A *stratified* subset fixes the count of each class. With $N$ rows in total, $N_k$ of
# class $k$, the exact share of class $k$ in $n$ rows is $q_k = n N_k / N$, usually not an
# integer. Rounding each $q_k$ can miss $n$ (three classes of $q_k = 1.4, 1.3, 1.3$ round to
# $1 + 1 + 1 = 3$ rows, not 4). The largest-remainder rule (Hamilton's method) gives every class
# its floor and hands the $r$ rows still missing to the classes with the largest fractional parts:
#
# $$
# n_k = \lfloor q_k \rfloor + [\,k \in R\,], \qquad
# R = \text{the } r = n - \textstyle\sum_j \lfloor q_j \rfloor \text{ classes with largest }
# q_k - \lfloor q_k \rfloor .
# \tag{B.1}
# $$
#
# Then $\sum_k n_k = n$ exactly and $|n_k - q_k| < 1$ for every class. Ties in the fractional
# part go to the larger class, then to the class seen first, so the result is deterministic. We
# compute $q_k$'s floor and remainder in integers, so no floating-point rounding can flip a tie.

# %%
#| export
def largest_remainder(counts: list[int], n: int) -> list[int]:
    """Integer quotas proportional to `counts` that sum to exactly `n` (eq. B.1).

    Each class gets `floor(n * count / total)`; the rows still missing go to the classes with the
    largest remainders (ties: larger class, then earlier class). Needs `0 <= n <= sum(counts)`.
    Hamilton's method (Balinski and Young 1982); Appendix B, "Subsets".
    """
    total = sum(counts)
    if not 0 <= n <= total:
        raise ValueError(f"n={n} must lie between 0 and the total count {total}")
    quotas = [n * count // total for count in counts]
    remainders = [n * count % total for count in counts]
    order = sorted(range(len(counts)), key=lambda k: (-remainders[k], -counts[k], k))
    for k in order[: n - sum(quotas)]:
        quotas[k] += 1
    return quotas


def subset(ds: Dataset, n: int | None, seed: int, stratify_by: str | None = None) -> Dataset:
    """A seeded random subset of `n` rows of `ds`, in random order.

    `n=None` or `n >= len(ds)`: all rows, shuffled deterministically. With `stratify_by` (a
    column), each value keeps its share of rows by eq. (B.1), so class counts are within one row
    of proportional and sum to exactly `n`. The same `seed` gives the same subset; `n < 1` raises
    `ValueError`. Appendix B, "Subsets that keep the label balance".
    """
    if n is not None and n < 1:
        raise ValueError(f"n must be at least 1 (or None for all rows), got {n}")
    if stratify_by is not None and stratify_by not in ds.column_names:
        raise ValueError(f"no column {stratify_by!r} to stratify by; columns: {ds.column_names}")
    rng = np.random.default_rng(seed)
    total = len(ds)
    if n is None or n >= total or stratify_by is None:
        keep = total if n is None else min(n, total)
        return ds.select(rng.permutation(total)[:keep].tolist())
    groups: dict[Any, list[int]] = {}
    for index, value in enumerate(ds[stratify_by][:]):  # [:] reads the column in one batch
        groups.setdefault(value, []).append(index)  # classes in order of first appearance
    quotas = largest_remainder([len(members) for members in groups.values()], n)
    picked = [
        np.asarray(members)[rng.permutation(len(members))[:quota]]
        for members, quota in zip(groups.values(), quotas, strict=True)
    ]
    indices = np.concatenate(picked)
    return ds.select(indices[rng.permutation(len(indices))].tolist())


# %% [markdown]
# **Check of (B.1).** The example from the text, and a random one against its two guarantees:

# %%
print("q = 1.4, 1.3, 1.3:", largest_remainder([14, 13, 13], 4), "(rounding each gives 1, 1, 1)")
assert largest_remainder([14, 13, 13], 4) == [2, 1, 1]
check_rng = np.random.default_rng(SEED)
for _ in range(200):
    counts = check_rng.integers(1, 500, size=check_rng.integers(1, 8)).tolist()
    n = int(check_rng.integers(0, sum(counts) + 1))
    quotas = largest_remainder(counts, n)
    assert sum(quotas) == n
    assert all(abs(q - n * c / sum(counts)) < 1 for q, c in zip(quotas, counts, strict=True))
print("200 random cases: sums exact, every class within one row of proportional")

# %% [markdown]
# Each profile's sizes live in one frozen dataclass, so a chapter asks for
# `DATA_SIZES[profile].hh_rlhf` instead of inventing its own number; `None` means all rows. For
# SST-2, the only dataset the book classifies, `load_sst2_for_profile` returns the stratified
# training and dev subsets in one call.

# %%
#| export
@dataclass(frozen=True)
class DataSizes:
    """Rows of each dataset a profile uses (`None`: all rows). Appendix B, "Subsets"."""

    sst2_train: int | None = None
    sst2_dev: int | None = None
    alpaca: int | None = None
    alpaca_eval: int | None = None
    hh_rlhf: int | None = None
    gsm8k_train: int | None = None
    gsm8k_test: int | None = None


DATA_SIZES = {
    "smoke": DataSizes(sst2_train=64, sst2_dev=32, alpaca=32, alpaca_eval=16, hh_rlhf=32,
                       gsm8k_train=32, gsm8k_test=16),
    "tiny": DataSizes(sst2_train=4000, sst2_dev=None, alpaca=None, alpaca_eval=100,
                      hh_rlhf=1000, gsm8k_train=1000, gsm8k_test=200),
    "full": DataSizes(),
}


def load_sst2_for_profile(profile: str, seed: int) -> tuple[Dataset, Dataset]:
    """`(train, dev)`: stratified, seeded subsets of SST-2 of the sizes in `DATA_SIZES[profile]`.

    Appendix B, "Subsets that keep the label balance".
    """
    sizes = pick(profile, DATA_SIZES)
    train = subset(load_sst2("train"), sizes.sst2_train, seed, stratify_by="label")
    dev = subset(load_sst2("validation"), sizes.sst2_dev, seed, stratify_by="label")
    return train, dev


# %% [markdown]
# ## A tour of the data
#
# Now the real files. The chapter's own configuration only decides how many rows go into the
# plots and how many seeds the stratification experiment uses; the row counts below are always
# those of the complete files, and each is checked against the size its publisher gives.

# %%
from collections import Counter

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import MaxNLocator


@dataclass(frozen=True)
class TourConfig:
    plot_rows: int | None  # rows per dataset in the histograms (None: all)
    subset_trials: int  # seeds in the stratification experiment


TOUR = pick(PROFILE, {
    "smoke": TourConfig(plot_rows=300, subset_trials=50),
    "tiny": TourConfig(plot_rows=None, subset_trials=300),
    "full": TourConfig(plot_rows=None, subset_trials=1000),
})
print(TOUR)

PUBLISHED_ROWS = {
    "sst2/train": 67_349, "sst2/validation": 872, "alpaca": 2_000, "alpaca_eval": 805,
    "hh_rlhf": 2_312, "gsm8k/train": 7_473, "gsm8k/test": 1_319, "wiki": 30, "c4": 300,
}
LOADERS = {
    "sst2/train": lambda: load_sst2("train"),
    "sst2/validation": lambda: load_sst2("validation"),
    "alpaca": load_alpaca,
    "alpaca_eval": load_alpaca_eval,
    "hh_rlhf": load_hh_rlhf,
    "gsm8k/train": lambda: load_gsm8k("train"),
    "gsm8k/test": lambda: load_gsm8k("test"),
}

loaded: dict[str, Any] = {}
rows = []
for key, relative in [*DATA_FILES.items(), *TEXT_CORPORA.items()]:
    load = LOADERS.get(key, lambda key=key: load_text_corpus(key))
    with Timer() as timer:
        loaded[key] = load()
    data = loaded[key]
    local = (data_dir() / relative).is_file()
    rows.append({
        "dataset": key,
        "rows": len(data),
        "published": PUBLISHED_ROWS.get(key),
        "columns": ", ".join(data.column_names) if hasattr(data, "column_names") else "(text)",
        "source": f"$FTBOOK_DATA/{relative}" if local else f"hub {HUB_DATASETS[key][0]}",
        "load s": timer.seconds,
    })
overview = pd.DataFrame(rows).set_index("dataset")
overview["published"] = overview["published"].astype("Int64")
show_table(overview, "datasets", CHAPTER, floatfmt="{:.2f}")
for key, expected in PUBLISHED_ROWS.items():
    assert len(loaded[key]) == expected, (key, len(loaded[key]), expected)

# %% [markdown]
# Every count matches the published size, so no row was lost on the way in. The `load s` column
# is what parsing and validating every row in pure Python costs on this machine; it is small next
# to any training run, so the loaders cache nothing on disk and a chapter simply calls them again.
# Tiny Shakespeare has no published document count because "paragraph" is our unit, not the
# publisher's.
#
# ### SST-2: labels and lengths
#
# The two SST-2 splits, side by side:

# %%
sst2_train, sst2_dev = loaded["sst2/train"], loaded["sst2/validation"]
balance = pd.DataFrame(
    {split: Counter(ds["label"][:]) for split, ds in (("train", sst2_train), ("dev", sst2_dev))}
).T.rename(columns=dict(enumerate(SST2_LABELS)))[list(SST2_LABELS)]
balance["positive share"] = balance["positive"] / balance.sum(axis=1)
show_table(balance, "sst2_label_balance", CHAPTER, floatfmt="{:.3f}")
assert balance.loc["train", ["positive", "negative"]].tolist() == [37_569, 29_780]
assert balance.loc["dev", ["positive", "negative"]].tolist() == [444, 428]

# %% [markdown]
# Both splits lean positive, the training split more than dev, so a classifier that always says
# "positive" already scores the dev set's positive share in accuracy; that share, not 50%, is the
# baseline every SST-2 accuracy in the book should be read against. A first record of each split:

# %%
for split, ds in (("train", sst2_train), ("dev", sst2_dev)):
    print(f"{split:5s} [0]: {ds[0]}")

# %% [markdown]
# The first training row is a fragment, not a sentence. GLUE's SST-2 training set holds the
# labelled *phrases* of the Stanford Sentiment Treebank's parse trees, while dev holds whole
# sentences. The word counts make this visible:

# %%
def words(texts: list[str]) -> np.ndarray:
    return np.array([len(text.split()) for text in texts])


train_plot = subset(sst2_train, TOUR.plot_rows, SEED, stratify_by="label")
dev_words = words(sst2_dev["sentence"][:])
train_words = words(train_plot["sentence"][:])
train_labels = np.array(train_plot["label"][:])
dev_labels = np.array(sst2_dev["label"][:])
groups = {
    f"{split} {name}": counts[labels == label]
    for split, counts, labels in (("train", train_words, train_labels),
                                  ("dev", dev_words, dev_labels))
    for label, name in enumerate(SST2_LABELS)
}
lengths = pd.DataFrame(
    {"rows": [len(v) for v in groups.values()],
     "mean words": [np.mean(v) for v in groups.values()],
     "median words": [np.median(v) for v in groups.values()]},
    index=list(groups),
)
show_table(lengths, "sst2_lengths", CHAPTER, floatfmt="{:.1f}")
# the claims in the text: word counts of fixed files and of a subset drawn by numpy's PCG64,
# which gives the same rows on every machine, so these are facts of the data, not measurements
assert np.median(train_words) < np.median(dev_words)
assert abs(lengths.loc["train positive", "mean words"] / lengths.loc["train negative", "mean words"]
           - 1) < 0.25

# %% [markdown]
# The median training row is much shorter than the median dev sentence, while within a split the
# two classes have similar lengths (the assert allows a quarter's difference in the mean), so
# length carries little of the label. A classifier is thus trained mostly on phrases and evaluated
# on full sentences; keep this in mind when comparing training and dev accuracy in later chapters.
# Subsets for the `tiny` profile inherit this mix, since they sample rows uniformly within each
# class. (In the `smoke` profile the training rows above are a small stratified sample.)
#
# ### Alpaca, AlpacaEval, HH-RLHF and GSM8K
#
# One record each. HH-RLHF is shown split: the end of the prompt and the two responses.

# %%
def preview(text: str, width: int = 150) -> str:
    text = repr(text)
    return text if len(text) <= width else text[: width - 5] + " ...'"


alpaca = loaded["alpaca"]
with_input = sum(1 for text in alpaca["input"] if text)
for key in ("alpaca", "alpaca_eval", "gsm8k/train"):
    print(f"--- {key} [0]")
    for field, value in loaded[key][0].items():
        print(f"  {field:13s} {preview(value)}")
hh = loaded["hh_rlhf"]
print("--- hh_rlhf [0]")
print(f"  {'prompt':17s} ...{preview(hh[0]['prompt'][-120:])}")
print(f"  {'chosen_response':17s} {preview(hh[0]['chosen_response'])}")
print(f"  {'rejected_response':17s} {preview(hh[0]['rejected_response'])}")
print(f"\nAlpaca records with a non-empty input: {with_input} of {len(alpaca)}")

# %% [markdown]
# Alpaca's `input` is empty for most records; an instruction template therefore needs two forms,
# with and without an input section (chapter 13-06). AlpacaEval's `output` is a *reference*
# answer by the model named in `generator`, not a gold label: evaluation compares a model's answer
# with it. GSM8K's `answer` interleaves the reasoning with calculator annotations `<<48/2=24>>`
# and ends with the `#### N` line that became `final_answer`.
#
# For HH-RLHF we check the split on every pair: it must be lossless, and we count how often the
# common-prefix rule differs from a naive split at each side's last `\n\nAssistant:`, and how many
# responses are empty.

# %%
pairs = pd.DataFrame(hh[:])  # the five columns as Python strings
naive_differs = [
    c[: c.rfind(HH_ASSISTANT)] != r[: r.rfind(HH_ASSISTANT)]
    for c, r in zip(pairs["chosen"], pairs["rejected"], strict=True)
]
continued = [
    HH_ASSISTANT in c or HH_ASSISTANT in r
    for c, r in zip(pairs["chosen_response"], pairs["rejected_response"], strict=True)
]
empty = {side: int((pairs[side].str.strip() == "").sum())
         for side in ("chosen_response", "rejected_response")}
turns = pairs["prompt"].str.count(HH_HUMAN).to_numpy()
assert (pairs["prompt"] + pairs["chosen_response"] == pairs["chosen"]).all()
assert (pairs["prompt"] + pairs["rejected_response"] == pairs["rejected"]).all()
assert all(c for c, d in zip(continued, naive_differs, strict=True) if d)  # the claim below
print(f"pairs: {len(pairs)}; naive last-Assistant split disagrees on {sum(naive_differs)}; "
      f"responses that continue the dialogue: {sum(continued)}; empty responses: {empty}; "
      f"human turns per prompt: median {np.median(turns):.0f}, max {turns.max()}")

# %% [markdown]
# The few pairs where the naive split disagrees are among those whose response itself contains
# another `Assistant:` turn (the assert checks this); the naive split would cut chosen and rejected at different places and
# produce two different "prompts" for one pair. Empty responses, if any are counted above, are
# kept: they are real data (an assistant that said nothing), and dropping them would change the
# published split. Chapter 13-07 decides what a reward model does with them.
#
# ### Length distributions
#
# Three histograms: words per SST-2 training row by label, words of Alpaca instructions and
# outputs, and the number of human turns in each HH-RLHF prompt.

# %%
alpaca_plot = subset(alpaca, TOUR.plot_rows, SEED)
hh_plot_turns = np.array(
    [p.count(HH_HUMAN) for p in subset(hh, TOUR.plot_rows, SEED)["prompt"][:]]
)
fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
bins = np.arange(0, max(train_words.max(), dev_words.max()) + 2)
for label, name in enumerate(SST2_LABELS):
    axes[0].hist(train_words[train_labels == label], bins=bins, alpha=0.55, label=name)
axes[0].set(title="SST-2 train: words per row", xlabel="words", ylabel="rows")
axes[0].legend()
log_bins = np.logspace(0, np.log10(600), 30)
for field in ("instruction", "output"):
    axes[1].hist(words(alpaca_plot[field][:]).clip(1), bins=log_bins, alpha=0.55, label=field)
axes[1].set(title="Alpaca: words per field", xlabel="words (log scale)", xscale="log")
axes[1].legend()
turn_counts = Counter(hh_plot_turns.tolist())
axes[2].bar(list(turn_counts), list(turn_counts.values()))
axes[2].set(title="HH-RLHF: human turns per prompt", xlabel="turns", ylabel="pairs")
axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
fig.tight_layout()
show_figure(fig, "lengths", CHAPTER)
alpaca_words = {f: words(alpaca_plot[f][:]) for f in ("instruction", "output")}
short_outputs = int((alpaca_words["output"] <= 2).sum())
up_to_four = float(np.mean(hh_plot_turns <= 4))
print("Alpaca median words:", {f: float(np.median(w)) for f, w in alpaca_words.items()},
      f"| outputs of at most 2 words: {short_outputs} of {len(alpaca_plot)}")
print(f"HH-RLHF prompts with at most 4 human turns: {up_to_four:.1%}")
assert np.median(alpaca_words["output"]) > np.median(alpaca_words["instruction"])
assert up_to_four > 0.5

# %% [markdown]
# Alpaca outputs are longer than instructions and spread over two orders of magnitude: a cluster
# of one- and two-word answers (classification-style instructions such as "is this post
# appropriate?") next to paragraphs of a hundred words and more. With the loss on response tokens
# only (13-06), the long outputs dominate the token count of a batch, while the short ones give
# the model a few tokens each. Most HH-RLHF prompts have at most four human turns, with a thin
# tail of long conversations that sets the sequence length a preference model has to handle.
#
# ### Stratified subsets, measured
#
# Finally the stratified subset at work. First the guarantee of (B.1) on real data: for a subset of
# an awkward size, each class is within one row of its proportional count. Then the reason to
# bother: over many seeds, the positive share of a plain random subset of 50 dev rows scatters,
# while the stratified one does not.

# %%
n_check = 101
full_share = balance.loc["train", "positive share"]
for seed in (SEED, SEED + 1):
    part = subset(sst2_train, n_check, seed, stratify_by="label")
    counts = Counter(part["label"][:])
    assert len(part) == n_check
    assert abs(counts[1] - n_check * full_share) < 1 and abs(counts[0] - n_check * (1 - full_share)) < 1
    print(f"seed {seed}: {counts[1]} positive, {counts[0]} negative "
          f"(exact share {n_check * full_share:.2f} / {n_check * (1 - full_share):.2f})")
first, again, other = (subset(sst2_train, n_check, seed, stratify_by="label")["sentence"][:]
                       for seed in (SEED, SEED, SEED + 1))
assert first == again and first != other
print(f"same seed twice: identical; seeds {SEED} and {SEED + 1} share "
      f"{len(set(first) & set(other))} of {n_check} sentences")

shares = {"random": [], "stratified": []}
for seed in range(TOUR.subset_trials):
    shares["random"].append(np.mean(subset(sst2_dev, 50, seed)["label"][:]))
    shares["stratified"].append(np.mean(subset(sst2_dev, 50, seed, stratify_by="label")["label"][:]))
spread = pd.DataFrame(
    {kind: [np.mean(v), np.std(v), np.min(v), np.max(v)] for kind, v in shares.items()},
    index=["mean positive share", "std", "min", "max"],
).T
show_table(spread, "subset_spread", CHAPTER, floatfmt="{:.3f}")
dev_share = balance.loc["dev", "positive share"]
dev_rows = len(sst2_dev)
sampling_sd = np.sqrt(dev_share * (1 - dev_share) / 50 * (dev_rows - 50) / (dev_rows - 1))
print(f"hypergeometric sd of a random subset's share: {sampling_sd:.3f}")
assert spread.loc["stratified", "std"] < 0.5 / 50  # every stratified subset has the same counts
# the claim in the text: a standard deviation estimated from m >= 50 seeds has a relative
# standard error of about 1 / sqrt(2 (m - 1)) <= 0.10, so 0.35 is 3.5 standard errors
assert abs(spread.loc["random", "std"] / sampling_sd - 1) < 0.35

# %% [markdown]
# The random subsets' standard deviation is close to the hypergeometric value printed below the
# table, several percentage points of positive share; the stratified subsets all have the same
# class counts, so their spread is zero. On a 50-row evaluation set, a few points of label shift
# is the same size as the accuracy differences later chapters discuss, which is why the book
# stratifies.
#
# The profile's SST-2 subsets, as the classification chapters get them:

# %%
profile_train, profile_dev = load_sst2_for_profile(PROFILE, SEED)
sizes = pick(PROFILE, DATA_SIZES)
print(f"{PROFILE}: {sizes}")
for split, part in (("train", profile_train), ("dev", profile_dev)):
    print(f"{split:5s}: {len(part):6d} rows, positive share {np.mean(part['label'][:]):.3f}")
assert sizes.sst2_train is None or len(profile_train) == sizes.sst2_train
assert len(profile_dev) == (sizes.sst2_dev or len(sst2_dev))

# %% [markdown]
# ## Pitfalls
#
# - **GLUE's trailing space.** Every SST-2 sentence in the GLUE files ends with a space before the
#   tab. Left in, it becomes a token (or changes the last token) in many tokenizers. The loader
#   strips it; a loader that does not will disagree with ours token for token.
# - **CSV quoting on TSV files.** A CSV reader treats a `"` at the start of a field as an opening
#   quote and may swallow the following lines into one field. GLUE's SST-2 writes quotes in PTB
#   style (two backticks and two apostrophes), so the damage is latent here; other TSVs are not
#   so kind. Split on the tab.
# - **Lenient parsers.** `pandas.read_csv(on_bad_lines="skip")`, `try: ... except: continue` and
#   `dropna()` make a load "work" with fewer rows. Our loaders never skip; they stop and say where.
# - **Hub and local copies differ.** The hub's Alpaca has 52k records, the local sample 2,000;
#   the hub's SST-2 has a `test` split whose labels are all -1 (hidden). Compare row counts with
#   the table above before comparing results across machines.
# - **Preference pairs are not "prompt, response, response".** HH-RLHF stores whole dialogues;
#   split them with `split_preference_pair`, which is lossless, rather than at a guessed marker.
#
# ## Summary
#
# - `load_sst2`, `load_alpaca`, `load_alpaca_eval`, `load_hh_rlhf`, `load_gsm8k` and
#   `load_text_corpus` read the local file under `FTBOOK_DATA` when it is there, else the hub,
#   else raise `MissingDataError` naming the path and the fix.
# - Every row is validated; `DataFormatError` lists the file, line or record, field and problem
#   of the first ten problems with the total count. Nothing is skipped, and the row counts above
#   match the published sizes.
# - `subset` draws seeded, optionally stratified subsets whose class counts follow the
#   largest-remainder rule (B.1); `DATA_SIZES` and `load_sst2_for_profile` give every chapter the
#   same profile-sized data.
#
# ## Exercises
#
# 1. Add a loader for another instruction dataset (for example Dolly 15k, one JSON object per
#    line with `instruction`, `context`, `response`, `category`), with a parse function, a check
#    and tests for a missing field and a malformed line.
# 2. Stratify by two columns at once: SST-2 label and a length bucket (short, medium, long).
#    Generalise `subset` so that `stratify_by` accepts a list of columns, and check (B.1) on the
#    joint classes.
# 3. The common-prefix split of HH-RLHF keeps multi-turn continuations inside the response. Write
#    a variant that cuts each response at its first `\n\nHuman:` and measure how many pairs change.
#    Which one would you train a reward model on, and why?
# 4. Compare the SST-2 training phrases with the dev sentences: fine-tune any classifier on
#    training rows longer than 10 words only and compare its dev accuracy with one trained on the
#    same number of random rows.
#
# ## References
#
# - Socher et al. (2013), *Recursive Deep Models for Semantic Compositionality Over a Sentiment
#   Treebank*, EMNLP 2013 (SST).
# - Wang et al. (2018), *GLUE: A Multi-Task Benchmark and Analysis Platform for Natural Language
#   Understanding*, arXiv:1804.07461.
# - Taori et al. (2023), *Stanford Alpaca: An Instruction-following LLaMA Model*,
#   github.com/tatsu-lab/stanford_alpaca; Wang et al. (2022), *Self-Instruct*, arXiv:2212.10560.
# - Li et al. (2023), *AlpacaEval*, github.com/tatsu-lab/alpaca_eval; Dubois et al. (2023),
#   *AlpacaFarm*, arXiv:2305.14387.
# - Bai et al. (2022), *Training a Helpful and Harmless Assistant with Reinforcement Learning from
#   Human Feedback*, arXiv:2204.05862.
# - Cobbe et al. (2021), *Training Verifiers to Solve Math Word Problems*, arXiv:2110.14168.
# - Raffel et al. (2020), *Exploring the Limits of Transfer Learning with a Unified Text-to-Text
#   Transformer*, arXiv:1910.10683 (C4).
# - Balinski and Young (1982), *Fair Representation*, Yale University Press (Hamilton's
#   largest-remainder method).
