"""Tests of `ftbook.data` (Appendix B, `chapters/00_02_data.py`).

Real-data tests read `FTBOOK_DATA` (CI sets it to ../shared/data), else `<repo>/../shared/data`
(the `data_root` fixture of conftest.py); they skip with a reason when neither exists.
Malformed-file tests write small files into `tmp_path` and point `FTBOOK_DATA` there. No test
touches the network: the hub fallback is replaced by a function that raises, and the one test of
the real fallback runs with the hub libraries set offline.
"""

import gzip
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

import ftbook.data as data
from ftbook.data import (
    DATA_FILES,
    DATA_SIZES,
    MAX_REPORTED_PROBLEMS,
    TEXT_CORPORA,
    DataFormatError,
    DataSizes,
    MissingDataError,
    largest_remainder,
    load_alpaca,
    load_alpaca_eval,
    load_gsm8k,
    load_hh_rlhf,
    load_sst2,
    load_sst2_for_profile,
    load_text_corpus,
    parse_gsm8k_answer,
    read_sst2_tsv,
    split_preference_pair,
    subset,
)

# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def hub_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the hub fallback with one that records the call and raises, as offline."""
    calls: list[str] = []

    def offline(path: str, kwargs: dict) -> Dataset:
        calls.append(path)
        raise ConnectionError("hub disabled in tests (no network)")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(data, "_load_hub", offline)
    return calls


@pytest.fixture
def real_data(monkeypatch: pytest.MonkeyPatch, data_root: Path, hub_calls: list[str]) -> Path:
    """The shared data folder (conftest's `data_root`, which skips if there is none), exported
    as FTBOOK_DATA, with the hub disabled."""
    monkeypatch.setenv("FTBOOK_DATA", str(data_root))
    return data_root


@pytest.fixture
def fake_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub_calls: list[str]) -> Path:
    """An empty data folder in tmp_path, exported as FTBOOK_DATA (the hub is disabled)."""
    monkeypatch.setenv("FTBOOK_DATA", str(tmp_path))
    return tmp_path


def write(root: Path, key: str, text: str) -> Path:
    """Write `text` as the file of DATA_FILES[key] (or TEXT_CORPORA[key]) under `root`."""
    relative = DATA_FILES.get(key) or TEXT_CORPORA[key]
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def jsonl(*records: object) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def load_error(root: Path, key: str, text: str, load: Callable[..., object], *args: object) -> str:
    """The message of the `DataFormatError` that `load(*args)` raises once the file of `key`
    under `root` holds `text`."""
    write(root, key, text)
    with pytest.raises(DataFormatError) as caught:
        load(*args)
    return str(caught.value)


HH_OK = {
    "chosen": "\n\nHuman: hi\n\nAssistant: hello",
    "rejected": "\n\nHuman: hi\n\nAssistant: go",
}


# ------------------------------------------------------------------------------------------------
# Real data: sizes and first rows as in shared/data/*/PROVENANCE.md
# ------------------------------------------------------------------------------------------------


def test_sst2_real(real_data: Path, hub_calls: list[str]) -> None:
    train, dev = load_sst2("train"), load_sst2("validation")
    assert (len(train), len(dev)) == (67_349, 872)
    assert train.column_names == ["sentence", "label"]
    assert Counter(train["label"][:]) == {1: 37_569, 0: 29_780}
    assert Counter(dev["label"][:]) == {1: 444, 0: 428}
    assert train[0] == {"sentence": "hide new secretions from the parental units", "label": 0}
    assert dev[0] == {"sentence": "it 's a charming and often affecting journey .", "label": 1}
    for ds in (train, dev):
        sentences = ds["sentence"][:]
        assert all(s == s.strip() and s for s in sentences)
    assert hub_calls == []


def test_instruction_data_real(real_data: Path) -> None:
    alpaca = load_alpaca()
    assert len(alpaca) == 2_000
    assert alpaca.column_names == ["instruction", "input", "output"]
    assert alpaca[0]["instruction"] == "Check if the following Facebook post is appropriate"
    assert sum(1 for text in alpaca["input"][:] if text) == 753
    evals = load_alpaca_eval()
    assert len(evals) == 805
    assert evals.column_names == ["instruction", "output", "generator", "dataset"]
    assert evals[0]["generator"] == "text_davinci_003"


def test_hh_rlhf_real(real_data: Path) -> None:
    hh = load_hh_rlhf()
    assert len(hh) == 2_312
    assert hh.column_names == [
        "chosen", "rejected", "prompt", "chosen_response", "rejected_response"
    ]
    columns = hh[:]
    for prompt, chosen, rejected, chosen_response, rejected_response in zip(
        columns["prompt"], columns["chosen"], columns["rejected"],
        columns["chosen_response"], columns["rejected_response"], strict=True,
    ):
        assert prompt.startswith("\n\nHuman:") and prompt.endswith("\n\nAssistant:")
        assert prompt + chosen_response == chosen
        assert prompt + rejected_response == rejected
    assert hh[0]["prompt"].startswith("\n\nHuman: what are some pranks with a pen i can do?")
    assert hh[0]["chosen_response"].startswith(" No, sorry!")


def test_gsm8k_real(real_data: Path) -> None:
    train, test = load_gsm8k("train"), load_gsm8k("test")
    assert (len(train), len(test)) == (7_473, 1_319)
    assert train[0]["final_answer"] == "72"
    assert test[0]["final_answer"] == "18"
    for ds in (train, test):
        answers = ds["final_answer"][:]
        assert all(answer and "," not in answer for answer in answers)
        assert all(np.isfinite(float(answer)) for answer in answers)
    assert "1080" in train["final_answer"][:]  # written '#### 1,080' in the file


def test_text_corpora_real(real_data: Path) -> None:
    shakespeare = load_text_corpus("tinyshakespeare")
    assert shakespeare[0].startswith("First Citizen:")
    assert all(paragraph == paragraph.strip() and paragraph for paragraph in shakespeare)
    raw = (real_data / TEXT_CORPORA["tinyshakespeare"]).read_text(encoding="utf-8").split("\n")
    assert len(raw) == 40_000 + 1  # 40,000 lines, each ending in a newline
    kept = [line.strip() for paragraph in shakespeare for line in paragraph.split("\n")]
    assert kept == [line.strip() for line in raw if line.strip()]  # every non-blank line, in order
    assert len(load_text_corpus("wiki")) == 30
    c4 = load_text_corpus("c4")
    assert len(c4) == 300 and all(isinstance(doc, str) and doc for doc in c4)


def test_sst2_for_profile_smoke(real_data: Path) -> None:
    train, dev = load_sst2_for_profile("smoke", seed=0)
    sizes = DATA_SIZES["smoke"]
    assert (len(train), len(dev)) == (sizes.sst2_train, sizes.sst2_dev)
    positive_share = 37_569 / 67_349
    assert abs(sum(train["label"][:]) - sizes.sst2_train * positive_share) < 1
    again, _ = load_sst2_for_profile("smoke", seed=0)
    assert again["sentence"][:] == train["sentence"][:]


def test_data_sizes() -> None:
    assert set(DATA_SIZES) == {"smoke", "tiny", "full"}
    assert DATA_SIZES["full"] == DataSizes()  # None everywhere: all rows
    assert DATA_SIZES["tiny"].sst2_dev is None
    assert 1_000 <= DATA_SIZES["tiny"].sst2_train <= 10_000
    assert all(v is not None and v <= 100 for v in vars(DATA_SIZES["smoke"]).values())
    with pytest.raises(KeyError, match="huge"):
        load_sst2_for_profile("huge", seed=0)


# ------------------------------------------------------------------------------------------------
# Malformed files: every problem named with file, line or record, and field
# ------------------------------------------------------------------------------------------------

SST2_OK = "sentence\tlabel\na fine film \t1\na dull film \t0\n"


def test_sst2_small_file(fake_data: Path, hub_calls: list[str]) -> None:
    write(fake_data, "sst2/train", SST2_OK)
    ds = load_sst2("train")
    assert ds[:] == {"sentence": ["a fine film", "a dull film"], "label": [1, 0]}
    assert ds.features["label"].names == ["negative", "positive"]
    assert hub_calls == []


def test_sst2_wrong_label(fake_data: Path) -> None:
    text = SST2_OK + "quite good \tpositive\n"
    message = load_error(fake_data, "sst2/train", text, load_sst2, "train")
    assert "sst2/train.tsv line 4: field 'label' is 'positive', expected 0 or 1" in message
    assert "1 problem " in message


def test_sst2_missing_tab(fake_data: Path) -> None:
    write(fake_data, "sst2/validation", SST2_OK + "no tab here 1\n")
    with pytest.raises(DataFormatError, match=r"sst2/dev\.tsv line 4: expected 2 tab-separated"):
        load_sst2("validation")


def test_sst2_empty_sentence_and_header(fake_data: Path) -> None:
    message = load_error(fake_data, "sst2/train", "text\tlabel\n \t1\nok \t0\n", load_sst2, "train")
    assert "line 1: header is 'text\\tlabel'" in message
    assert "line 2: field 'sentence' is empty" in message
    assert "2 problems" in message


def test_sst2_reports_all_problems_with_total(fake_data: Path) -> None:
    bad = "".join(f"bad row {i} \t{i + 2}\n" for i in range(25))
    message = load_error(fake_data, "sst2/train", SST2_OK + bad, load_sst2, "train")
    assert "25 problems" in message and f"first {MAX_REPORTED_PROBLEMS} shown" in message
    assert message.count("field 'label'") == MAX_REPORTED_PROBLEMS
    assert "line 4:" in message and f"line {3 + MAX_REPORTED_PROBLEMS}:" in message
    assert f"line {4 + MAX_REPORTED_PROBLEMS}:" not in message


def test_read_sst2_tsv_does_not_use_csv_quoting(tmp_path: Path) -> None:
    path = tmp_path / "quotes.tsv"
    path.write_text('sentence\tlabel\n"a quote opens here \t1\nand here it ends" \t0\n')
    ds = read_sst2_tsv(path)
    assert ds["sentence"][:] == ['"a quote opens here', 'and here it ends"']


def test_gsm8k_malformed_json_line(fake_data: Path) -> None:
    good = {"question": "1+1?", "answer": "1+1=2\n#### 2"}
    text = jsonl(good) + '{"question": "2+2?", "answer": \n' + jsonl(good)
    message = load_error(fake_data, "gsm8k/train", text, load_gsm8k, "train")
    assert "verifiable/gsm8k/train.jsonl line 2: invalid JSON" in message
    assert "1 problem " in message


def test_gsm8k_answer_without_final_line(fake_data: Path) -> None:
    records = [
        {"question": "1+1?", "answer": "1+1=2\n#### 2"},
        {"question": "2+2?", "answer": "2+2=4, so the answer is 4"},
        {"question": "big?", "answer": "#### a lot"},
    ]
    message = load_error(fake_data, "gsm8k/test", jsonl(*records), load_gsm8k, "test")
    assert "test.jsonl line 2: field 'answer' has no '#### <number>' line" in message
    assert "test.jsonl line 3: field 'answer' has final answer 'a lot'" in message


def test_parse_gsm8k_answer() -> None:
    assert parse_gsm8k_answer("so 1,080 in all\n#### 1,080") == "1080"
    assert parse_gsm8k_answer("#### -3.5") == "-3.5"
    with pytest.raises(ValueError, match="2 '####' lines"):
        parse_gsm8k_answer("#### 1\n#### 2")
    with pytest.raises(ValueError, match="no '####"):
        parse_gsm8k_answer("the answer is 4")


def test_alpaca_missing_field(fake_data: Path) -> None:
    records = [
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Say bye.", "input": ""},
        {"instruction": "", "input": 3, "output": "x"},
    ]
    message = load_error(fake_data, "alpaca", json.dumps(records, indent=2), load_alpaca)
    assert "alpaca_sample_2000.json record [1]: field 'output' is missing" in message
    assert "record [2]: field 'instruction' is empty" in message
    assert "record [2]: field 'input' is 3 (int), expected a string" in message
    assert "3 problems" in message


def test_alpaca_invalid_json_names_line(fake_data: Path) -> None:
    write(fake_data, "alpaca", '[\n  {"instruction": "a",\n   "output": }\n]\n')
    with pytest.raises(DataFormatError, match=r"alpaca_sample_2000\.json line 3: invalid JSON"):
        load_alpaca()


def test_alpaca_eval_missing_field_in_jsonl(fake_data: Path) -> None:
    ok = {"instruction": "a", "output": "b", "generator": "g", "dataset": "d"}
    missing = {"instruction": "a", "output": "b", "dataset": "d"}
    message = load_error(fake_data, "alpaca_eval", jsonl(ok, missing, [1, 2]), load_alpaca_eval)
    assert "alpaca_eval.jsonl line 2: field 'generator' is missing" in message
    assert "alpaca_eval.jsonl line 3: expected a JSON object, found list" in message


def test_hh_rlhf_small_file(fake_data: Path) -> None:
    write(fake_data, "hh_rlhf", jsonl(HH_OK))
    row = load_hh_rlhf()[0]
    assert row["prompt"] == "\n\nHuman: hi\n\nAssistant:"
    assert (row["chosen_response"], row["rejected_response"]) == (" hello", " go")


def test_hh_rlhf_without_assistant_turn(fake_data: Path) -> None:
    no_assistant = {"chosen": "\n\nHuman: hi there", "rejected": "\n\nHuman: hi\n\nAssistant: go"}
    no_human = {"chosen": "Assistant: x", "rejected": "\n\nHuman: hi\n\nAssistant: go"}
    message = load_error(fake_data, "hh_rlhf", jsonl(HH_OK, no_assistant, no_human), load_hh_rlhf)
    assert "harmless-base_test.jsonl.gz line 2: field 'chosen' has no Assistant turn" in message
    assert "line 3: field 'chosen' starts with 'Assistant: x'" in message


def test_hh_rlhf_pair_without_shared_prompt(fake_data: Path) -> None:
    pair = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: b"}
    write(fake_data, "hh_rlhf", jsonl(pair))
    with pytest.raises(DataFormatError, match="line 1: chosen and rejected share no prefix"):
        load_hh_rlhf()


def test_split_preference_pair_keeps_continued_dialogue() -> None:
    prompt = "\n\nHuman: q\n\nAssistant:"
    chosen = prompt + " fine.\n\nHuman: and?\n\nAssistant: more"
    rejected = prompt + " no."
    assert split_preference_pair(chosen, rejected) == (
        prompt, " fine.\n\nHuman: and?\n\nAssistant: more", " no."
    )


def test_text_corpus_errors(fake_data: Path) -> None:
    write(fake_data, "wiki", "Article one.\n\nArticle three.\n")
    with pytest.raises(DataFormatError, match=r"wiki_demo\.txt line 2: empty line"):
        load_text_corpus("wiki")
    write(fake_data, "c4", jsonl({"text": "a document"}, {"txt": "typo"}))
    with pytest.raises(DataFormatError, match=r"c4_demo\.jsonl line 2: field 'text' is missing"):
        load_text_corpus("c4")
    write(fake_data, "tinyshakespeare", "A:\nHello.\n\n\n\nB:\nBye.\n")
    assert load_text_corpus("tinyshakespeare") == ["A:\nHello.", "B:\nBye."]


def test_invalid_utf8(fake_data: Path) -> None:
    path = write(fake_data, "sst2/train", SST2_OK)
    path.write_bytes(path.read_bytes() + b"caf\xe9 \t1\n")
    with pytest.raises(DataFormatError, match="UTF-8"):
        load_sst2("train")


# ------------------------------------------------------------------------------------------------
# Missing data: the message names the path looked for and FTBOOK_DATA
# ------------------------------------------------------------------------------------------------


def test_missing_file(fake_data: Path, hub_calls: list[str]) -> None:
    with pytest.raises(MissingDataError) as caught:
        load_sst2("train")
    message = str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)
    assert str(fake_data / "sst2" / "train.tsv") in message
    assert "FTBOOK_DATA" in message
    assert "stanfordnlp/sst2" in message and "hub disabled in tests" in message
    assert "\n" not in message
    assert hub_calls == ["stanfordnlp/sst2"]


def test_missing_file_every_loader_tries_its_hub_id(fake_data: Path, hub_calls: list[str]) -> None:
    for load in (load_alpaca, load_alpaca_eval, load_hh_rlhf, lambda: load_gsm8k("test")):
        with pytest.raises(MissingDataError):
            load()
    assert hub_calls == ["tatsu-lab/alpaca", "json", "Anthropic/hh-rlhf", "openai/gsm8k"]


def test_missing_text_corpus_never_tries_the_hub(fake_data: Path, hub_calls: list[str]) -> None:
    with pytest.raises(MissingDataError) as caught:
        load_text_corpus("c4")
    assert str(fake_data / "text" / "c4_demo" / "c4_demo.jsonl") in str(caught.value)
    assert "FTBOOK_DATA" in str(caught.value)
    assert hub_calls == []


def test_data_dir_that_does_not_exist(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub_calls: list[str]
) -> None:
    nowhere = tmp_path / "no" / "such" / "folder"
    monkeypatch.setenv("FTBOOK_DATA", str(nowhere))
    with pytest.raises(MissingDataError) as caught:
        load_gsm8k("train")
    message = str(caught.value)
    assert "verifiable/gsm8k/train.jsonl" in message
    assert str(nowhere) in message and "FTBOOK_DATA" in message
    assert "hub disabled in tests" in message
    assert hub_calls == ["openai/gsm8k"]


def test_real_hub_fallback_offline_becomes_missing_data_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The unpatched hub path, with the hub libraries forced offline and an empty cache."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("FTBOOK_DATA", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_CACHE_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(MissingDataError) as caught:
        load_sst2("validation")
    message = str(caught.value)
    assert str(tmp_path / "sst2" / "dev.tsv") in message and "stanfordnlp/sst2" in message


def test_unknown_names() -> None:
    with pytest.raises(ValueError, match="train, validation"):
        load_sst2("test")
    with pytest.raises(ValueError, match="train, test"):
        load_gsm8k("dev")
    with pytest.raises(ValueError, match="tinyshakespeare, wiki, c4"):
        load_text_corpus("books")


# ------------------------------------------------------------------------------------------------
# subset and the largest-remainder rule (B.1)
# ------------------------------------------------------------------------------------------------


def labelled(counts: dict[str, int]) -> Dataset:
    labels = [label for label, count in counts.items() for _ in range(count)]
    return Dataset.from_dict({"id": list(range(len(labels))), "label": labels})


def test_largest_remainder() -> None:
    assert largest_remainder([14, 13, 13], 4) == [2, 1, 1]  # rounding each would give 3 rows
    assert largest_remainder([1, 1], 1) == [1, 0]  # a tie goes to the earlier class
    assert largest_remainder([1, 3], 2) == [0, 2]
    assert largest_remainder([5, 5], 0) == [0, 0]
    with pytest.raises(ValueError):
        largest_remainder([2, 2], 5)


@pytest.mark.parametrize("n", [1, 7, 50, 99, 100])
def test_subset_exact_size(n: int) -> None:
    ds = labelled({"a": 70, "b": 20, "c": 10})
    assert len(subset(ds, n, seed=0)) == n
    assert len(subset(ds, n, seed=0, stratify_by="label")) == n
    assert len(set(subset(ds, n, seed=0, stratify_by="label")["id"][:])) == n  # no repeats


@pytest.mark.parametrize("n", [3, 10, 37, 333, 999])
def test_subset_stratified_proportions_within_one_row(n: int) -> None:
    counts = {"a": 700, "b": 201, "c": 99, "d": 1}
    ds = labelled(counts)
    got = Counter(subset(ds, n, seed=3, stratify_by="label")["label"][:])
    total = sum(counts.values())
    for label, count in counts.items():
        assert abs(got[label] - n * count / total) < 1, (label, got[label], n * count / total)
    assert sum(got.values()) == n


def test_subset_is_deterministic_and_seed_dependent() -> None:
    ds = labelled({"a": 300, "b": 200})
    for stratify in (None, "label"):
        first = subset(ds, 40, seed=7, stratify_by=stratify)["id"][:]
        assert subset(ds, 40, seed=7, stratify_by=stratify)["id"][:] == first
        assert subset(ds, 40, seed=8, stratify_by=stratify)["id"][:] != first


def test_subset_all_rows_shuffled() -> None:
    ds = labelled({"a": 30, "b": 20})
    for n in (None, 50, 500):
        ids = subset(ds, n, seed=1, stratify_by="label")["id"][:]
        assert sorted(ids) == list(range(50)) and ids != list(range(50))
        assert ids == subset(ds, n, seed=1, stratify_by="label")["id"][:]


def test_subset_mixes_classes() -> None:
    ids = subset(labelled({"a": 500, "b": 500}), 20, seed=0, stratify_by="label")["label"][:]
    assert ids != sorted(ids)  # shuffled after stratified sampling, not grouped by class


def test_subset_rejects_bad_arguments() -> None:
    ds = labelled({"a": 5})
    for n in (0, -3):
        with pytest.raises(ValueError, match="at least 1"):
            subset(ds, n, seed=0)
    with pytest.raises(ValueError, match="no column 'sentiment'"):
        subset(ds, 3, seed=0, stratify_by="sentiment")
