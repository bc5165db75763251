"""Tests of ftbook.full_finetuning (chapter 13-01): layer-wise rates (eq. 1.2), the head,
the training loop, accuracy, forgetting (backbone perplexity) and weight deltas.

Every model is a random tiny BERT or Llama built here; nothing is downloaded.
"""
import copy
import math
import re

import pytest
import torch
from tiny_models import tiny_llama_config
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from ftbook import base_models as bm
from ftbook import full_finetuning as ff
from ftbook.workbench import unit_roundoff

L = 2  # transformer layers of every tiny model below

POSITIVE = ["a good film", "good acting and a good plot", "the story is good", "really good fun",
            "good , simple and warm", "it was good", "so good", "good music"]
NEGATIVE = ["a dull film", "bad acting and a weak plot", "the story is boring", "really awful",
            "tedious , long and cold", "it was bad", "so slow", "poor music"]

LM_TEXTS = [
    "the film is a gripping , funny ride .",
    "a dull and lifeless movie that never finds its feet .",
    "Anarchism is a political philosophy and movement.",
    "What is 12 plus 7? The answer is 19.",
] * 40 + [f"{a} + {b} = {a + b}" for a in range(20) for b in range(10)]


def tiny_bert(vocab_size: int = 100, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=L,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                        num_labels=2, **overrides)
    return BertForSequenceClassification(config)


def llama_config(vocab_size: int = 100, pad_token_id: int = 0, **overrides):
    return tiny_llama_config(vocab_size, pad_token_id, **({
        "num_hidden_layers": L, "num_attention_heads": 2, "num_labels": 2,
        "attn_implementation": None} | overrides))


def tiny_llama_classifier(seed: int = 0, **config_kwargs):
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(llama_config(**config_kwargs))


@pytest.fixture(scope="module")
def encoder_tokenizer():
    return bm.load_encoder_tokenizer("smoke")


@pytest.fixture(scope="module")
def sentiment():
    from datasets import Dataset

    sentences = POSITIVE + NEGATIVE
    return Dataset.from_dict({"sentence": sentences,
                              "label": [int("good" in s.split()) for s in sentences]})


@pytest.fixture
def quiet(monkeypatch):
    monkeypatch.setenv("FTBOOK_NO_PROGRESS", "1")


# --- data ----------------------------------------------------------------------------------------

def test_sentiment_labels_follow_the_word_good(sentiment):
    assert sum(sentiment["label"]) == len(POSITIVE) and len(sentiment) == 16


# --- layer depths and layer-wise groups, eq. (1.2) -----------------------------------------------

@pytest.mark.parametrize("name, depth", [
    ("bert.embeddings.word_embeddings.weight", 0),
    ("bert.embeddings.LayerNorm.bias", 0),
    ("bert.encoder.layer.0.attention.self.query.weight", 1),
    ("bert.encoder.layer.3.output.dense.weight", 4),
    ("bert.encoder.layer.11.attention.output.LayerNorm.weight", 12),
    ("bert.pooler.dense.weight", 13),
    ("classifier.bias", 13),
    ("model.embed_tokens.weight", 0),
    ("model.layers.2.self_attn.q_proj.weight", 3),
    ("model.layers.0.input_layernorm.weight", 1),
    ("model.norm.weight", 13),
    ("score.weight", 13),
])
def test_layer_depth(name, depth):
    assert ff.layer_depth(name, 12) == depth


def expected_bert_depth(name: str) -> int:
    """Depth of a BertForSequenceClassification parameter, written out for L = 2."""
    if name.startswith("bert.embeddings."):
        return 0
    match = re.match(r"bert\.encoder\.layer\.(\d)\.", name)
    if match:
        return int(match.group(1)) + 1
    assert name.startswith(("bert.pooler.", "classifier.")), name
    return 3


def test_layerwise_groups_cover_each_parameter_once_with_eq_1_2_rates():
    model = tiny_bert()
    lr, decay, wd = 1e-3, 0.5, 0.01
    groups = ff.layerwise_param_groups(model, lr, decay, wd)
    by_id = {}
    for group in groups:
        for p in group["params"]:
            assert id(p) not in by_id, "a parameter is in two groups"
            by_id[id(p)] = group
    named = dict(model.named_parameters())
    assert set(by_id) == {id(p) for p in named.values()}
    hand_lr = {0: 1.25e-4, 1: 2.5e-4, 2: 5e-4, 3: 1e-3}  # lr * 0.5 ** (L + 1 - depth), L = 2
    for name, p in named.items():
        group = by_id[id(p)]
        depth = expected_bert_depth(name)
        assert group["depth"] == depth, name
        assert group["lr"] == pytest.approx(hand_lr[depth]), name
        assert group["weight_decay"] == (0.0 if p.ndim == 1 else wd), name
    assert {g["depth"] for g in groups} == {0, 1, 2, 3}
    # one group per (depth, decayed) pair
    assert len(groups) == len({(g["depth"], g["weight_decay"]) for g in groups})


def test_layerwise_groups_with_decay_one_give_one_rate():
    groups = ff.layerwise_param_groups(tiny_bert(), 3e-4, 1.0, 0.1)
    assert {g["lr"] for g in groups} == {3e-4}


def test_layerwise_groups_skip_frozen_parameters():
    model = tiny_bert()
    model.bert.embeddings.requires_grad_(False)
    model.bert.encoder.layer[0].requires_grad_(False)
    groups = ff.layerwise_param_groups(model, 1.0, 0.5, 0.0)
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}
    assert {g["depth"] for g in groups} == {2, 3}
    model.requires_grad_(False)
    assert ff.layerwise_param_groups(model, 1.0, 0.5, 0.0) == []


# --- the head ------------------------------------------------------------------------------------

def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freeze_backbone_bert_keeps_pooler_and_classifier():
    model = ff.freeze_backbone(tiny_bert())
    assert trainable_names(model) == {"bert.pooler.dense.weight", "bert.pooler.dense.bias",
                                      "classifier.weight", "classifier.bias"}


def test_freeze_backbone_llama_keeps_score():
    model = ff.freeze_backbone(tiny_llama_classifier())
    assert trainable_names(model) == {"score.weight"}
    assert len(list(model.parameters())) > 1


def test_freeze_backbone_unfreezes_a_previously_frozen_head():
    model = tiny_bert().requires_grad_(False)
    assert "classifier.weight" in trainable_names(ff.freeze_backbone(model))


def test_freeze_backbone_without_head_raises():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"Sequential.*classifier.*score.*pooler"):
        ff.freeze_backbone(model)
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen
    # an explicit head name works
    ff.freeze_backbone(model, head_modules=("2",))
    assert trainable_names(model) == {"2.weight", "2.bias"}


# --- the training loop ---------------------------------------------------------------------------

def train(model, tokenizer, dataset, **overrides):
    kwargs = dict(steps=20, lr=3e-3, batch_size=8, max_len=16, seed=0, warmup_ratio=0.1,
                  bf16=False)
    return ff.train_classifier(model, tokenizer, dataset, **{**kwargs, **overrides})


def test_train_classifier_learns_and_logs(quiet, encoder_tokenizer, sentiment):
    model = tiny_bert(vocab_size=encoder_tokenizer.vocab_size, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    evals = []
    log = train(model, encoder_tokenizer, sentiment, steps=80, lr=3e-3, eval_every=20,
                eval_fn=lambda step: evals.append(step) or {"marker": step})
    assert len(log.losses) == len(log.step_seconds) == 80
    assert all(math.isfinite(x) for x in log.losses)
    assert all(s > 0 for s in log.step_seconds)
    assert log.trainable_parameters == n_trainable
    assert log.median_step_seconds == sorted(log.step_seconds)[40]
    assert evals == [0, 20, 40, 60, 80]
    assert log.evals == [{"step": s, "marker": s} for s in (0, 20, 40, 60, 80)]
    # Learns at all, with margins measured over 20 seeds (model init and batch order): the loss
    # ratio last/first stayed <= 0.18 (threshold 0.5) and every sentence was classified with a
    # logit margin >= 2, so neither check can flip on rounding. (At lr 1e-2 for 40 steps, 2 of
    # 6 seeds did not learn: a single-seed pass there would have been luck.)
    first, last = sum(log.losses[:5]) / 5, sum(log.losses[-5:]) / 5
    assert first > 0.5 and last < 0.5 * first, log.losses
    assert ff.evaluate_accuracy(model, encoder_tokenizer, sentiment, max_len=16) == 1.0


def test_train_classifier_counts_only_trainable_parameters(quiet, encoder_tokenizer, sentiment):
    model = ff.freeze_backbone(tiny_bert(vocab_size=encoder_tokenizer.vocab_size))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    log = train(model, encoder_tokenizer, sentiment, steps=3)
    assert log.trainable_parameters == (32 * 32 + 32) + (32 * 2 + 2)  # pooler + classifier
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


def test_train_classifier_is_deterministic(quiet, encoder_tokenizer, sentiment):
    model = tiny_bert(vocab_size=encoder_tokenizer.vocab_size)  # dropout on: the seed fixes it
    twin = copy.deepcopy(model)
    first = train(model, encoder_tokenizer, sentiment, steps=4)
    second = train(twin, encoder_tokenizer, sentiment, steps=4)
    assert first.losses == second.losses
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), name
    other = train(tiny_bert(vocab_size=encoder_tokenizer.vocab_size), encoder_tokenizer,
                  sentiment, steps=4, seed=1)
    assert other.losses != first.losses


def test_train_classifier_without_trainable_parameters_raises(quiet, encoder_tokenizer,
                                                              sentiment):
    model = tiny_bert(vocab_size=encoder_tokenizer.vocab_size).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter requires grad"):
        train(model, encoder_tokenizer, sentiment, steps=2)


def test_nan_weight_stops_training_at_step_0(quiet, encoder_tokenizer, sentiment):
    model = tiny_bert(vocab_size=encoder_tokenizer.vocab_size)
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"loss became nan at step 0\b"):
        train(model, encoder_tokenizer, sentiment, steps=3)


def test_non_finite_loss_later_names_its_step(quiet, encoder_tokenizer, sentiment):
    model = tiny_bert(vocab_size=encoder_tokenizer.vocab_size)
    calls = []

    def poison_third_step(module, inputs, output):
        calls.append(1)
        return output * float("inf") if len(calls) == 3 else output

    model.classifier.register_forward_hook(poison_third_step)
    with pytest.raises(FloatingPointError, match=r"became (nan|inf) at step 2\b") as info:
        train(model, encoder_tokenizer, sentiment, steps=5, desc="probe run")
    assert "probe run loss" in str(info.value)
    assert len(calls) == 3  # stopped right there


# --- accuracy ------------------------------------------------------------------------------------

def test_evaluate_accuracy_matches_logits(encoder_tokenizer, sentiment):
    model = tiny_bert(vocab_size=encoder_tokenizer.vocab_size, seed=3).eval()
    sentences = list(sentiment["sentence"])
    with torch.no_grad():
        batch = encoder_tokenizer(sentences, padding=True, return_tensors="pt")
        predictions = model(**batch).logits.argmax(-1).tolist()
    # labels agree with the prediction on exactly the first 5 rows: accuracy 5/16
    labels = [p if i < 5 else 1 - p for i, p in enumerate(predictions)]
    from datasets import Dataset

    rows = Dataset.from_dict({"sentence": sentences, "label": labels})
    model.train()
    assert ff.evaluate_accuracy(model, encoder_tokenizer, rows, max_len=32,
                                batch_size=3) == pytest.approx(5 / 16)
    assert not model.training
    flipped = Dataset.from_dict({"sentence": sentences, "label": [1 - y for y in labels]})
    assert ff.evaluate_accuracy(model, encoder_tokenizer, flipped, max_len=32) == pytest.approx(
        11 / 16)


# --- forgetting: the backbone under the LM head --------------------------------------------------

@pytest.fixture(scope="module")
def lm_tokenizer(tmp_path_factory):
    return bm.train_tokenizer(LM_TEXTS, vocab_size=400, folder=tmp_path_factory.mktemp("tok"))


def test_backbone_perplexity_uses_the_classifier_backbone_and_tied_head(lm_tokenizer):
    config = llama_config(vocab_size=len(lm_tokenizer), pad_token_id=lm_tokenizer.pad_token_id,
                          tie_word_embeddings=True, bos_token_id=lm_tokenizer.bos_token_id,
                          eos_token_id=lm_tokenizer.eos_token_id)
    texts = ["the film is a gripping , funny ride .", "What is 3 plus 4? The answer is 7.",
             "a dull movie ."]
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).eval()  # the backbone we want to score
    torch.manual_seed(1)
    classifier = LlamaForSequenceClassification(config)
    classifier.model.load_state_dict(reference.model.state_dict())
    torch.manual_seed(2)
    scratch = LlamaForCausalLM(config)
    assert not torch.equal(scratch.lm_head.weight, reference.lm_head.weight)
    expected = bm.perplexity(reference, lm_tokenizer, texts)
    # the same weights through the same code in one process: equal to the last bit (PyTorch's
    # CPU kernels are deterministic for fixed shapes and thread count)
    assert ff.backbone_perplexity(classifier, scratch, lm_tokenizer, texts) == expected
    assert torch.equal(scratch.lm_head.weight, classifier.model.embed_tokens.weight)
    # perturbing the classifier's embeddings changes the score
    with torch.no_grad():
        classifier.model.embed_tokens.weight.add_(0.5 * torch.randn_like(
            classifier.model.embed_tokens.weight))
    perturbed = ff.backbone_perplexity(classifier, copy.deepcopy(scratch), lm_tokenizer, texts)
    assert perturbed != pytest.approx(expected, rel=1e-3)  # a large, seeded perturbation


# --- weight deltas -------------------------------------------------------------------------------

def test_linear_weight_deltas_are_after_minus_before():
    model = tiny_bert()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    linear_names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert len(linear_names) == 6 * L + 2  # q, k, v, attn out, ffn in, ffn out; pooler, classifier
    torch.manual_seed(5)
    added = {}
    with torch.no_grad():
        for name in sorted(linear_names):
            module = model.get_submodule(name)
            added[name] = torch.randn_like(module.weight)
            module.weight.add_(added[name])
        model.bert.embeddings.word_embeddings.weight.add_(1.0)  # not a Linear: ignored
    deltas = ff.linear_weight_deltas(before, model)
    assert set(deltas) == linear_names
    for name, delta in deltas.items():
        assert delta.dtype == torch.float32 and delta.device.type == "cpu"
        assert delta.shape == model.get_submodule(name).weight.shape
        # (w + a) - w rounds twice: |delta - a| <= u |w + a| + u |delta| <= 3 u (|w| + |a|)
        bound = 3 * unit_roundoff() * (before[f"{name}.weight"].abs() + added[name].abs())
        assert ((delta - added[name]).abs() <= bound).all(), name
    # a Linear whose weight is not in `before` is skipped
    del before["classifier.weight"]
    assert set(ff.linear_weight_deltas(before, model)) == linear_names - {"classifier"}


# --- the encoder runs of Experiment 1, cached for 13-02 ------------------------------------------

@pytest.mark.slow
def test_encoder_runs_make_both_methods_cache_them_and_read_them_back(real_env, monkeypatch,
                                                                       tmp_path):
    monkeypatch.setenv("FTBOOK_CACHE", str(tmp_path))  # a fresh cache: the runs are made here
    cfg = ff.FT_CONFIGS["smoke"]
    rng = torch.get_rng_state()
    runs = ff.encoder_runs("smoke")
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random state is untouched
    assert runs.folder == ff.encoder_runs_folder("smoke")
    assert runs.folder.parent == tmp_path / "13_01_full_finetuning"
    assert (len(runs.train), len(runs.dev)) == (cfg.n_train, cfg.n_dev)

    table = runs.table()
    assert list(table.index) == list(ff.ENCODER_METHODS) == list(runs.runs)
    assert list(table.columns) == ["dev accuracy", "trainable params", "trainable %",
                                   "s / step (median)", "GFLOP / step", "peak memory MiB",
                                   "train time s"]
    model, _ = bm.load_encoder_classifier("smoke")
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for n, p in model.named_parameters()
               if n in ff.head_parameter_names(model))
    fe, ft = runs.runs["feature extraction"], runs.runs["full fine-tuning"]
    assert fe.total_parameters == ft.total_parameters == total
    assert table["trainable params"].tolist() == [head, total]
    assert table.loc["full fine-tuning", "trainable %"] == 100.0
    for run in (fe, ft):
        assert len(run.log.losses) == len(run.log.step_seconds) == cfg.steps
        assert [e["step"] for e in run.log.evals] == [0, cfg.steps // 2, cfg.steps]
        assert all(0 <= e["dev_accuracy"] <= 1 for e in run.log.evals)
        assert run.seconds > 0 and run.padded_len <= cfg.max_len
    assert fe.padded_len == ft.padded_len  # the same counted batch (seed + 99)
    assert 0 < fe.flops < ft.flops  # a frozen backbone needs no weight gradients
    assert table["GFLOP / step"].tolist() == [fe.flops / 1e9, ft.flops / 1e9]

    # ΔW of full fine-tuning: every nn.Linear of the encoder, in its weight's shape, and moved
    linear = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(runs.delta_w) == set(linear)
    for name, delta in runs.delta_w.items():
        assert delta.dtype == torch.float32 and delta.shape == linear[name].weight.shape
    assert all(delta.abs().max() > 0 for delta in runs.delta_w.values())

    # the second call reads the cache: nothing is trained, nothing is rewritten
    stored = {p.name: p.stat().st_mtime_ns for p in runs.folder.iterdir()}
    assert set(stored) == {"runs.json", "delta_w.safetensors"}

    def no_training(*args, **kwargs):
        raise AssertionError("encoder_runs trained although its cache was there")

    monkeypatch.setattr(ff, "train_classifier", no_training)
    again = ff.encoder_runs("smoke")
    assert {p.name: p.stat().st_mtime_ns for p in again.folder.iterdir()} == stored
    assert again.runs == runs.runs  # TrainLogs and counts, bit for bit through JSON
    assert again.table().equals(table)
    assert list(again.delta_w) == list(runs.delta_w)
    assert all(torch.equal(again.delta_w[k], runs.delta_w[k]) for k in runs.delta_w)
    # another seed is another experiment, in another folder
    assert ff.encoder_runs_folder("smoke", seed=1) != runs.folder


def test_kept_random_state_restores_every_generator():
    import random

    import numpy as np

    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    expected = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    with ff.kept_random_state():
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        torch.rand(5), random.random(), np.random.rand(5)
    assert torch.equal(torch.rand(2), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]
