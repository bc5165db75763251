"""Tests of ftbook.prompt_tuning (chapter 13-05): the mathematics of eqs. (5.1)-(5.5), parity with
PEFT's prompt and prefix tuning, the verbalizer harness, and bad input.

Two computations of a network are compared on float64 copies (`float64_copy`: float64, SDPA
attention), to `PARITY_TOLERANCE`; see chapter 13-02 for the derivation."""
import copy
import warnings

import pytest
import tiny_models
import torch
from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
from tiny_models import bert_batch, tiny_bert
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from ftbook.prompt_tuning import (
    PARITY_TOLERANCE,
    PrefixTuning,
    PromptTuning,
    Template,
    attention_modules,
    copy_into_peft,
    encode_prompted,
    float64_copy,
    kv_geometry,
    prefix_attention,
    train_verbalizer,
    verbalizer_accuracy,
    verbalizer_ids,
    verbalizer_margins,
)
from ftbook.workbench import rounding_bound


def tiny_llama_config(kv_heads: int = 2) -> LlamaConfig:
    return tiny_models.tiny_llama_config(100, num_key_value_heads=kv_heads,
                                         max_position_embeddings=2048)


def tiny_llama(seed: int = 0, kv_heads: int = 2) -> LlamaForCausalLM:
    return tiny_models.tiny_llama(100, seed=seed, num_key_value_heads=kv_heads,
                                  max_position_embeddings=2048)


def lm_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 100, (3, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :2], attention_mask[1, :2] = 0, 0  # left padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def perturb(module: torch.nn.Module, seed: int = 3) -> None:
    """Move every trainable tensor off its initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=generator))


def peft_logits(ours, peft_config, base, batch):
    """PEFT's output on a float64 copy of `base`, with `ours` (float64 too) copied in."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(float64_copy(base), peft_config).double()
        copy_into_peft(ours, peft_model)
        with torch.no_grad():
            return peft_model(**batch), peft_model


# --- eq. (5.4): attention with a prefix is a gated mixture --------------------------------------

def test_prefix_attention_is_the_gated_mixture_of_eq_5_4():
    torch.manual_seed(0)
    # float64: softmax-weighted sums of 8 values of size ~3 round at ~1e-15, far below 1e-12
    q = torch.randn(16, dtype=torch.float64)
    keys, values = torch.randn(5, 16, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)
    pk, pv = torch.randn(3, 16, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64)
    s_in, s_pre = keys @ q / 4, pk @ q / 4
    joint = torch.softmax(torch.cat([s_pre, s_in]), 0) @ torch.cat([pv, values])
    lam = s_pre.exp().sum() / (s_pre.exp().sum() + s_in.exp().sum())
    mix = (1 - lam) * torch.softmax(s_in, 0) @ values + lam * torch.softmax(s_pre, 0) @ pv
    assert (joint - mix).abs().max() < 1e-12


def test_prefix_attention_function_matches_explicit_softmax():
    """The registered attention function: explicit softmax over [prefix; keys] with the mask."""
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.is_causal = True
    # float64, as in the test above: SDPA and the explicit softmax agree to ~1e-15
    module.prefix_kv = (torch.randn(1, 2, 3, 8, dtype=torch.float64),
                        torch.randn(1, 2, 3, 8, dtype=torch.float64))
    query, key, value = (torch.randn(1, 2, 4, 8, dtype=torch.float64) for _ in range(3))
    out, _ = prefix_attention(module, query, key, value, None, scaling=8**-0.5, dropout=0.0)
    keys = torch.cat([module.prefix_kv[0], key], 2)
    values = torch.cat([module.prefix_kv[1], value], 2)
    scores = query @ keys.transpose(-1, -2) * 8**-0.5  # (1, 2, 4, 7)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    allowed = torch.cat([torch.ones(4, 3, dtype=torch.bool), causal], 1)
    expected = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ values
    assert (out - expected.transpose(1, 2)).abs().max() < 1e-12


# --- discovery -----------------------------------------------------------------------------------

def test_attention_modules_and_geometry_with_grouped_heads():
    model = tiny_llama(kv_heads=2)
    modules = attention_modules(model)
    assert len(modules) == 2
    assert kv_geometry(modules[0]) == (2, 8)  # 2 kv heads of size 32 / 4
    assert len(attention_modules(tiny_bert())) == 2


def test_model_without_attention_is_a_clear_error():
    with pytest.raises(ValueError, match="no self-attention module"):
        PrefixTuning(torch.nn.Sequential(torch.nn.Linear(4, 4)), 2)


# --- eq. (5.1): prompt tuning --------------------------------------------------------------------

def test_prompt_tuning_trains_only_the_prompt_and_the_named_head():
    model = PromptTuning(tiny_bert(), 4, modules_to_save=["classifier"])
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"prompt", "model.classifier.weight", "model.classifier.bias"}
    assert model.prompt.shape == (4, 32)


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_number_of_virtual_tokens(bad):
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PromptTuning(tiny_bert(), bad)
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PrefixTuning(tiny_bert(), bad)


def test_bad_init_names_the_options():
    with pytest.raises(ValueError, match="random"):
        PromptTuning(tiny_bert(), 4, init="zeros")
    with pytest.raises(ValueError, match="init_text"):
        PromptTuning(tiny_bert(), 4, init="text")


def test_text_init_repeats_the_tokens_like_peft():
    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [int(w) for w in text.split()]}

    model = PromptTuning(tiny_bert(), 5, init="text", init_text="7 9", tokenizer=Tok())
    table = model.model.get_input_embeddings().weight
    assert torch.equal(model.prompt.data, table[[7, 9, 7, 9, 7]])


def test_random_init_has_the_embedding_scale_and_is_seeded():
    a = PromptTuning(tiny_bert(), 64, init="random", seed=1)
    b = PromptTuning(tiny_bert(), 64, init="random", seed=1)
    assert torch.equal(a.prompt, b.prompt)
    scale = a.model.get_input_embeddings().weight.std()
    # a standard deviation from 64 x 32 draws has a relative standard error of 1/sqrt(2 n) = 1.6%:
    # 0.3 is 19 of them
    assert 0.7 < float(a.prompt.detach().std() / scale) < 1.3


def test_prompt_tuning_causal_lm_ignores_the_prompt_in_the_loss():
    model = PromptTuning(tiny_llama(), 3)
    batch = lm_batch()
    out = model(**batch)
    assert out.logits.shape == (3, 3 + 7, 100)
    manual = torch.nn.functional.cross_entropy(
        out.logits[:, 2:-1].reshape(-1, 100), batch["labels"].reshape(-1), ignore_index=-100)
    # the same per-token losses, averaged in other orders: each mean is within gamma_{n+1} of
    # the exact one (n terms, then a division), the two within twice that (Appendix A)
    n = int((batch["labels"] != -100).sum())
    assert abs(out.loss.item() - manual.item()) <= 2 * rounding_bound(n + 2, manual.item())


# --- parity with PEFT ----------------------------------------------------------------------------

def test_prompt_tuning_classifier_matches_peft():
    ours = PromptTuning(tiny_bert(), 4, modules_to_save=["classifier"])
    perturb(ours)
    ours = float64_copy(ours)
    batch = {**bert_batch(), "labels": torch.tensor([0, 1, 1, 0])}
    theirs, peft_model = peft_logits(
        ours, PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4), tiny_bert(),
        batch)
    mine = ours(**batch)
    assert (mine.logits - theirs.logits).abs().max() < PARITY_TOLERANCE
    assert abs(mine.loss.item() - theirs.loss.item()) < PARITY_TOLERANCE
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == \
        peft_model.get_nb_trainable_parameters()[0]


def test_prompt_tuning_causal_lm_matches_peft_logits_loss_and_gradient():
    base = tiny_llama()
    ours = PromptTuning(copy.deepcopy(base), 5, init="vocab")
    perturb(ours)
    ours = float64_copy(ours)
    batch = lm_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(float64_copy(base), PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5)).double()
    copy_into_peft(ours, peft_model)
    mine, theirs = ours(**batch), peft_model(**batch)
    assert (mine.logits - theirs.logits).abs().max() < PARITY_TOLERANCE
    mine.loss.backward()
    theirs.loss.backward()
    peft_grad = peft_model.prompt_encoder.default.embedding.weight.grad
    assert (ours.prompt.grad - peft_grad).abs().max() < PARITY_TOLERANCE


@pytest.mark.parametrize("projection", [None, 16])
def test_prefix_tuning_causal_lm_matches_peft(projection):
    base = tiny_llama()
    ours = PrefixTuning(copy.deepcopy(base), 5, projection_dim=projection)
    perturb(ours)
    ours = float64_copy(ours)
    batch = lm_batch()
    config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5,
                                prefix_projection=projection is not None,
                                encoder_hidden_size=projection or 32)
    theirs, peft_model = peft_logits(ours, config, base, batch)
    with torch.no_grad():
        mine = ours(**batch)
    real = batch["attention_mask"].bool()
    assert (mine.logits - theirs.logits)[real].abs().max() < PARITY_TOLERANCE
    assert abs(mine.loss.item() - theirs.loss.item()) < PARITY_TOLERANCE
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == \
        peft_model.get_nb_trainable_parameters()[0]


def test_prefix_tuning_llama_classifier_matches_peft():
    torch.manual_seed(0)
    base = LlamaForSequenceClassification(tiny_llama_config()).eval()
    ours = PrefixTuning(copy.deepcopy(base), 3, modules_to_save=["score"])
    perturb(ours)
    ours = float64_copy(ours)
    batch = {k: v for k, v in lm_batch().items() if k != "labels"}
    theirs, _ = peft_logits(ours, PrefixTuningConfig(task_type=TaskType.SEQ_CLS,
                                                     num_virtual_tokens=3), base, batch)
    with torch.no_grad():
        assert (ours(**batch).logits - theirs.logits).abs().max() < PARITY_TOLERANCE


def test_bert_prefix_equals_peft_only_with_shifted_positions():
    base = tiny_bert()
    ours = PrefixTuning(copy.deepcopy(base), 4, modules_to_save=["classifier"])
    perturb(ours)
    ours = float64_copy(ours)
    batch = bert_batch()
    theirs, _ = peft_logits(ours, PrefixTuningConfig(task_type=TaskType.SEQ_CLS,
                                                     num_virtual_tokens=4), base, batch)
    with torch.no_grad():
        kept = ours(**batch).logits
        ours.offset_positions = True
        shifted = ours(**batch).logits
    assert (shifted - theirs.logits).abs().max() < PARITY_TOLERANCE
    assert (kept - theirs.logits).abs().max() > 1e-4  # PEFT moves [CLS] to position P


# --- eq. (5.3) and (5.5) -------------------------------------------------------------------------

def test_reparameterisation_parameter_count_and_fold():
    model = PrefixTuning(tiny_llama(), 5, projection_dim=16)
    d_kv, L, h = 16, 2, 16
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == \
        5 * d_kv + d_kv * h + h + h * 2 * L * d_kv + 2 * L * d_kv
    batch = lm_batch()
    with torch.no_grad():
        before = model(**batch).logits
        after = model.fold()(**batch).logits
    assert torch.equal(before, after)  # the table is the MLP's output, by the same operations
    assert model.embedding.weight.shape == (5, 2 * L * d_kv) and model.transform is None


def test_prompt_tuning_is_prefix_tuning_with_the_prompts_keys_and_values():
    """Eq. (5.5): the keys and values the frozen LM computes for E, used as a prefix."""
    lm = tiny_llama()
    soft = PromptTuning(copy.deepcopy(lm), 4, init="vocab")
    perturb(soft)
    lm, soft = float64_copy(lm), float64_copy(soft)  # two computations of one network: float64
    with torch.no_grad():
        cache = lm(inputs_embeds=soft.prompt.unsqueeze(0), use_cache=True).past_key_values
        prefix = PrefixTuning(copy.deepcopy(lm), 4).double()
        table = torch.stack([torch.stack([c.keys[0], c.values[0]]) for c in cache.layers])
        prefix.embedding.weight.copy_(table.permute(3, 0, 1, 2, 4).reshape(4, -1))
        ids = torch.randint(1, 100, (2, 6))
        gap = (soft(input_ids=ids).logits[:, 4:] - prefix(input_ids=ids).logits).abs().max()
    assert gap < PARITY_TOLERANCE


def test_prefix_changes_the_output_and_attributes_are_cleaned_up():
    model = PrefixTuning(tiny_llama(), 3)
    perturb(model)
    batch = lm_batch()
    plain = tiny_llama()(**batch).logits
    with torch.no_grad():
        out = model(**batch).logits
    assert (out - plain).abs().max() > 1e-3
    assert not any(hasattr(m, "prefix_kv") for m in model.attention)


def test_prefix_gradients_reach_the_mlp():
    model = PrefixTuning(tiny_llama(), 3, projection_dim=8)
    model(**lm_batch()).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.model.parameters())


# --- verbalizer harness --------------------------------------------------------------------------

class WordTokenizer:
    """Whitespace tokenizer over a fixed word list (id 0 = pad)."""

    pad_token_id = 0

    def __init__(self):
        self.words = ["<pad>", "it", "was", "good", "bad", "movie", "a", "fine", "review:",
                      "dull", "very"]

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.words.index(w) for w in text.split()]}

    def convert_ids_to_tokens(self, ids):
        return [self.words[i] for i in ids]


def test_encode_prompted_left_pads_and_counts_positions_of_real_tokens():
    tok = WordTokenizer()
    t = Template("review:", " it was", (" bad", " good"))
    batch = encode_prompted(tok, ["a fine movie", "dull"], t)
    assert batch["input_ids"].tolist() == [[8, 6, 7, 5, 1, 2], [0, 0, 8, 9, 1, 2]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [0, 0, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]]
    no_prefix = encode_prompted(tok, ["dull"], t, with_prefix=False)
    assert no_prefix["input_ids"].tolist() == [[9, 1, 2]]


def test_multi_token_verbalizer_is_an_error_naming_the_word():
    class Tok(WordTokenizer):
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1, 2] if "great" in text else [3]}

    with pytest.raises(ValueError, match="great"):
        verbalizer_ids(Tok(), Template("", " it was", (" bad", " great")))


def test_soft_prompt_equals_discrete_prompt_when_initialised_from_it():
    lm = float64_copy(tiny_llama())  # two computations of one network: float64
    tok = WordTokenizer()
    t = Template("review: very", " it was", (" bad", " good"))
    soft = PromptTuning(lm, 2, init="text", init_text="review: very", tokenizer=tok)
    sentences = ["a fine movie", "dull"]
    with torch.no_grad():
        discrete = lm(**encode_prompted(tok, sentences, t)).logits[:, -1]
        relaxed = soft(**encode_prompted(tok, sentences, t, with_prefix=False)).logits[:, -1]
    assert (discrete - relaxed).abs().max() < PARITY_TOLERANCE


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_train_verbalizer_learns_a_constant_answer(method):
    """A frozen random LM answers at chance; a soft prompt or prefix can push it towards
    " good": the loop must find that. Measured over 12 seeds (LM, prompt and batch order), the
    loss on all rows fell to at most 0.89 (prompt) and 0.64 (prefix) of its start, and the prefix
    answered every row with a margin of at least 0.54; the prompt's smallest margin went down to
    0.01, so its accuracy is not checked (2 soft tokens barely steer this random LM)."""
    from datasets import Dataset

    tok = WordTokenizer()
    t = Template("", " it was", (" bad", " good"))
    data = Dataset.from_dict({"sentence": ["a fine movie", "dull", "very bad movie"] * 4,
                              "label": [1, 1, 1] * 4})
    lm = tiny_llama()
    lm.requires_grad_(False)
    model = PromptTuning(lm, 2, init="vocab") if method == "prompt" else PrefixTuning(lm, 2)

    def loss_on_all_rows():  # every label is 1: the cross-entropy is softplus(-margin)
        margins = verbalizer_margins(model, tok, data, t, with_prefix=False)
        return torch.nn.functional.softplus(-margins).mean().item()

    start = loss_on_all_rows()
    log = train_verbalizer(model, tok, data, t, steps=40, lr=0.1, batch_size=4, seed=0)
    assert len(log.losses) == 40
    assert loss_on_all_rows() < 0.97 * start
    if method == "prefix":
        assert verbalizer_accuracy(model, tok, data, t, with_prefix=False) == 1.0


def test_train_verbalizer_refuses_a_model_without_trainable_parameters():
    from datasets import Dataset

    lm = tiny_llama()
    lm.requires_grad_(False)
    data = Dataset.from_dict({"sentence": ["dull"], "label": [0]})
    with pytest.raises(ValueError, match="nothing to train"):
        train_verbalizer(lm, WordTokenizer(), data, Template("", " it was", (" bad", " good")),
                         steps=1, lr=0.1, batch_size=1, seed=0)


def test_calibrated_threshold_removes_a_constant_prior():
    from ftbook.prompt_tuning import calibrated_threshold

    margins = torch.tensor([3.0, 4.0, 5.0, 6.0])  # every row says class 1 at threshold 0
    assert calibrated_threshold(margins, [0, 0, 1, 1]) == 5.0
    assert calibrated_threshold(-margins, [1, 1, 0, 0]) == -4.0
    flipped = calibrated_threshold(torch.tensor([1.0, 2.0]), [1, 0])  # no threshold is right
    assert flipped in (1.0, 2.0, 3.0)


def test_verbalizer_margins_are_the_logit_difference():
    from datasets import Dataset

    from ftbook.prompt_tuning import class_logits

    lm = tiny_llama()
    tok = WordTokenizer()
    t = Template("", " it was", (" bad", " good"))
    data = Dataset.from_dict({"sentence": ["a fine movie", "dull"], "label": [1, 0]})
    margins = verbalizer_margins(lm, tok, data, t)
    with torch.no_grad():
        logits = class_logits(lm, encode_prompted(tok, data["sentence"], t), [4, 3])
    assert torch.equal(margins, logits[:, 1] - logits[:, 0])  # the same operations
    with pytest.raises(ValueError, match="two classes"):
        verbalizer_margins(lm, tok, data, Template("", " it was", (" bad", " good", " dull")))
