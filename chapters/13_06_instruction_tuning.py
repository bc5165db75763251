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
# (instruction-tuning)=
# # 13-06 Instruction tuning and dataset construction
#
# ```{admonition} At a glance
# :class: tip
# **Prerequisites:** 10-01 (language modelling), {ref}`full-finetuning`. **Reading time:** ~12 min;
# the tiny profile runs in about 6 minutes on 2 CPU cores.
# **You will build** `ftbook.instruction_tuning`: one conversation schema for Alpaca, Dolly and
# OpenAssistant records; quality filters with MinHash near-duplicate detection; synthetic tasks
# with checkable answers; the SFT helpers with the function contracts of Stanford CS336
# Assignment 5; an SFT loop with sequence packing and correct document boundaries; temperature
# mixing and a curriculum; and the SFT model that 13-07 to 13-10 start from.
# ```
#
# Supervised fine-tuning (SFT) on instruction-response pairs turns a language model that continues
# text into an assistant that answers. It is behavioural cloning for language models (Module 14,
# 14-10): maximise the likelihood of a demonstrated response given its prompt,
#
# $$
# \mathcal{L}_\text{SFT}(\theta) = -\frac{1}{\sum_i |y^{(i)}|} \sum_i \sum_{t=1}^{|y^{(i)}|}
# \log \pi_\theta\big(y^{(i)}_t \mid x^{(i)}, y^{(i)}_{<t}\big),
# \tag{6.1}
# $$
#
# with the loss on response tokens only (the prompt is given, not demonstrated) and normalised by
# the number of response tokens in the batch.

# %%
from ftbook.workbench import device_cell, get_device, get_profile, pick, seed_everything

CHAPTER = "13_06_instruction_tuning"
PROFILE = get_profile()
SEED = 0
seed_everything(SEED)
DEVICE = get_device()
RUN_INFO = device_cell(PROFILE, SEED, DEVICE)

# %% [markdown]
# ## One conversation schema
#
# Instruction datasets come in several shapes. We convert each into a list of messages
# `{"role": "system" | "user" | "assistant", "content": str}`, which is what chat templates
# consume:
#
# - **Alpaca** (Taori et al. 2023): `instruction`, optional `input`, `output`. The input, when
#   present, follows the instruction in the user turn.
# - **Dolly** (Conover et al. 2023): `instruction`, `context`, `response`, `category`.
# - **OpenAssistant** (Köpf et al. 2023, arXiv:2304.07327): a flat list of messages, each with
#   `message_id`, `parent_id`, `role` (`prompter` or `assistant`), `text`, and a `rank` among its
#   siblings (0 is best). A conversation is a path from a root prompt down the tree; we follow the
#   best-ranked reply at every branch.
#
# Every converter validates what it reads and names the record and field it rejects, with
# Appendix B's `DataFormatError`, the error of every malformed record in the book.

# %%
#| export
"""Instruction tuning: conversation formats, the SFT helpers with CS336 Assignment 5's contracts,
and sequence packing.

Chapter 13-06. Ouyang et al. 2022 (arXiv:2203.02155) for SFT as the first stage of RLHF; the
contracts follow Stanford CS336 (Spring 2025) Assignment 5.
"""
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

# transformers and peft are imported where used: they take seconds to import
import torch
from torch import nn

from ftbook.base_models import pad_sequences  # Appendix C

ROLES = ("system", "user", "assistant")


def _text(record: dict, field: str, where: str, required: bool = True) -> str:
    """`record[field]`, stripped; Appendix B's `DataFormatError`, naming `where` and the field,
    if it is missing (when `required`), not a string, or blank (when `required`)."""
    from ftbook.data import DataFormatError  # lazy: ftbook.data imports `datasets`

    value = record.get(field, "" if not required else None)
    if value is None:
        raise DataFormatError(f"{where}: missing field {field!r}")
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: field {field!r} must be a string, got "
                              f"{type(value).__name__}")
    if required and not value.strip():
        raise DataFormatError(f"{where}: field {field!r} is empty")
    return value.strip()


def validate_conversation(messages: Sequence[dict], where: str = "conversation") -> list[dict]:
    """Check a list of messages: known roles, non-empty string content, an optional system
    message first, then user and assistant turns alternating, ending with the assistant;
    Appendix B's `DataFormatError` names `where` and what is wrong."""
    from ftbook.data import DataFormatError  # lazy: ftbook.data imports `datasets`

    if not messages:
        raise DataFormatError(f"{where}: no messages")
    turns = list(messages)
    if turns[0].get("role") == "system":
        turns = turns[1:]
    for i, message in enumerate(messages):
        if message.get("role") not in ROLES:
            raise DataFormatError(f"{where}, message {i}: role {message.get('role')!r} is not "
                                  f"one of {ROLES}")
        _text(message, "content", f"{where}, message {i}")
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise DataFormatError(f"{where}: turn {i} is {message['role']!r}, expected "
                                  f"{expected!r} (user and assistant must alternate, starting "
                                  "with the user)")
    if not turns or turns[-1]["role"] != "assistant":
        raise DataFormatError(f"{where}: the last message must be the assistant's")
    return [{"role": m["role"], "content": m["content"].strip()} for m in messages]


def from_alpaca(record: dict, index: int = 0) -> list[dict]:
    """An Alpaca record (instruction, input, output) as a conversation."""
    where = f"alpaca record {index}"
    instruction = _text(record, "instruction", where)
    extra = _text(record, "input", where, required=False)
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return validate_conversation([{"role": "user", "content": user},
                                  {"role": "assistant",
                                   "content": _text(record, "output", where)}], where)


def from_dolly(record: dict, index: int = 0) -> list[dict]:
    """A Dolly record (instruction, context, response, category) as a conversation."""
    where = f"dolly record {index}"
    instruction = _text(record, "instruction", where)
    context = _text(record, "context", where, required=False)
    _text(record, "category", where)
    user = f"{instruction}\n\n{context}" if context else instruction
    return validate_conversation([{"role": "user", "content": user},
                                  {"role": "assistant",
                                   "content": _text(record, "response", where)}], where)


def from_oasst(messages: Sequence[dict], tree: str = "tree") -> list[dict]:
    """The best-ranked conversation of one OpenAssistant message tree: from the root prompt,
    follow at every branch the reply of lowest `rank` (unranked replies last, deleted ones
    skipped) until a message has no replies."""
    from ftbook.data import DataFormatError  # lazy: ftbook.data imports `datasets`

    by_parent: dict[Any, list[dict]] = {}
    for i, m in enumerate(messages):
        where = f"{tree}, message {i}"
        for key in ("message_id", "role", "text"):
            if key not in m:
                raise DataFormatError(f"{where}: missing field {key!r}")
        if m["role"] not in ("prompter", "assistant"):
            raise DataFormatError(f"{where}: role {m['role']!r} is not 'prompter' or "
                                  "'assistant'")
        if not m.get("deleted", False):
            by_parent.setdefault(m.get("parent_id"), []).append(m)
    roots = by_parent.get(None, [])
    if len(roots) != 1:
        raise DataFormatError(f"{tree}: expected one root message (parent_id None), found "
                              f"{len(roots)}")
    path, node = [], roots[0]
    while node is not None:
        path.append(node)
        replies = by_parent.get(node["message_id"], [])
        ranked = sorted(replies, key=lambda m: (m.get("rank") is None, m.get("rank") or 0))
        node = ranked[0] if ranked else None
    if path[-1]["role"] != "assistant":
        path = path[:-1]  # a trailing prompt has no answer to learn from
    role = {"prompter": "user", "assistant": "assistant"}
    return validate_conversation([{"role": role[m["role"]], "content": m["text"]} for m in path],
                                 tree)


# %% [markdown]
# The three formats on records written exactly as published (Dolly and OpenAssistant records are
# built here; the Alpaca record is the first of the data folder's sample), and the errors for
# broken ones.

# %%
from ftbook.data import DataFormatError, load_alpaca

alpaca = load_alpaca()
print(from_alpaca(alpaca[0], 0))
dolly_record = {"instruction": "Which is a species of fish? Tope or Rope",
                "context": "", "response": "Tope", "category": "classification"}
print(from_dolly(dolly_record))
oasst_tree = [
    {"message_id": "a", "parent_id": None, "role": "prompter", "text": "Name a prime number.",
     "rank": None, "deleted": False},
    {"message_id": "b", "parent_id": "a", "role": "assistant", "text": "9 is prime.", "rank": 1,
     "deleted": False},
    {"message_id": "c", "parent_id": "a", "role": "assistant", "text": "7 is a prime number.",
     "rank": 0, "deleted": False},
    {"message_id": "d", "parent_id": "c", "role": "prompter", "text": "And an even one?",
     "rank": None, "deleted": False},
    {"message_id": "e", "parent_id": "d", "role": "assistant", "text": "2.", "rank": 0,
     "deleted": False},
]
conversation = from_oasst(oasst_tree, "oasst tree 0")
print(conversation)
assert [m["content"] for m in conversation] == ["Name a prime number.", "7 is a prime number.",
                                                "And an even one?", "2."]
for broken, convert in (({"instruction": "Say hi", "output": ""}, from_alpaca),
                        ({"instruction": "Say hi", "context": "", "response": "hi"}, from_dolly)):
    try:
        convert(broken, 7)
    except DataFormatError as error:
        print("rejected:", error)

# %% [markdown]
# ## The SFT helpers: CS336 Assignment 5's contracts
#
# Stanford CS336's fifth assignment builds SFT from five functions. We keep their names, keyword
# arguments and semantics, so a student can check their own implementation against these.
#
# **Tokenization.** Prompt and output are tokenized separately and concatenated; the sequence is
# right-padded, and split into `input_ids` (all but the last token) and `labels` (all but the
# first), so position $t$ of the logits predicts `labels[t]`. `response_mask` marks the label
# positions that hold output tokens:
#
# $$
# m_t = \mathbb{1}\big[\,|x| \le t + 1 < |x| + |y| + 1\,\big] \quad (t = 0, \dots, T - 2).
# \tag{6.2}
# $$
#
# **Entropy** of the next-token distribution, computed stably from the logits $z$:
# $H(p) = \operatorname{logsumexp}(z) - \sum_v p_v z_v$.
#
# **The microbatch step.** With $G$ gradient-accumulation steps and a normalising constant $c$,
# each microbatch contributes
#
# $$
# \ell = -\frac{1}{G\, b} \sum_{i=1}^{b} \frac{1}{c} \sum_t m_{i,t} \log \pi_\theta(y_{i,t}),
# \tag{6.3}
# $$
#
# and calls `backward()`. Summed over the $G$ microbatches, the gradient equals that of one batch
# of $G b$ rows *with the same $c$*. Equation (6.1) normalises by the number of response tokens
# $N$ in the whole batch instead; choosing $c = N / (G b)$ makes (6.3) sum to exactly (6.1), which
# is what "gradient accumulation equals the large batch" requires. Normalising each microbatch by
# its own token count does not: microbatches with short responses would weigh more.

# %%
#| export
def tokenize_prompt_and_output(prompt_strs: Sequence[str], output_strs: Sequence[str],
                               tokenizer: Any) -> dict[str, torch.Tensor]:
    """CS336 A5: tokenize prompts and outputs separately, concatenate, right-pad; return
    `input_ids` and `labels` (batch, max_len - 1), shifted by one, and `response_mask` (batch,
    max_len - 1), true on the label positions holding output tokens, eq. (6.2)."""
    if len(prompt_strs) != len(output_strs):
        raise ValueError(f"{len(prompt_strs)} prompts but {len(output_strs)} outputs")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs a pad token")
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompt_strs]
    output_ids = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in output_strs]
    return prompt_and_output_batch(prompt_ids, output_ids, tokenizer.pad_token_id)


def pad_prompt_and_output(prompt_ids: Sequence[Sequence[int]],
                          output_ids: Sequence[Sequence[int]], pad_token_id: int
                          ) -> dict[str, torch.Tensor]:
    """Each prompt's ids followed by its output's, right-padded (Appendix C's `pad_sequences`):
    `input_ids`, `attention_mask` and `response_mask` (true on the output tokens), (batch,
    max_len)."""
    rows = [list(p) + list(o) for p, o in zip(prompt_ids, output_ids, strict=True)]
    batch = pad_sequences(rows, pad_token_id)
    response_mask = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    for i, (row, prompt) in enumerate(zip(rows, prompt_ids, strict=True)):
        response_mask[i, len(prompt):len(row)] = True
    return {**batch, "response_mask": response_mask}


def prompt_and_output_batch(prompt_ids: Sequence[Sequence[int]],
                            output_ids: Sequence[Sequence[int]], pad_token_id: int
                            ) -> dict[str, torch.Tensor]:
    """`tokenize_prompt_and_output`'s layout from token ids: `pad_prompt_and_output` shifted by
    one, `input_ids` and `labels` (batch, max_len - 1) and `response_mask` true on the label
    positions holding output tokens."""
    batch = pad_prompt_and_output(prompt_ids, output_ids, pad_token_id)
    full, mask = batch["input_ids"], batch["response_mask"]
    return {"input_ids": full[:, :-1], "labels": full[:, 1:], "response_mask": mask[:, 1:]}


def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """CS336 A5: entropy of the next-token distribution, (batch, seq, vocab) -> (batch, seq)."""
    log_z = torch.logsumexp(logits, dim=-1)  # (batch, seq)
    probs = torch.softmax(logits, dim=-1)
    return log_z - (probs * logits).sum(dim=-1)


def get_response_log_probs(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                           return_token_entropy: bool = False) -> dict[str, torch.Tensor]:
    """CS336 A5: per-token log-probabilities log p(labels_t | input_ids_{<=t}), (batch, seq),
    and optionally the per-token entropy."""
    logits = model(input_ids).logits.float()  # (batch, seq, vocab)
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    result = {"log_probs": log_probs}
    if return_token_entropy:
        result["token_entropy"] = compute_entropy(logits)
    return result


def masked_sum(tensor: torch.Tensor, mask: torch.Tensor, dim: int | None = None
               ) -> torch.Tensor:
    """Sum of `tensor` where `mask` is true, along `dim` (all if None). Masked-out entries may
    hold anything, NaN and inf included: they are selected away, not multiplied by 0."""
    masked = torch.where(mask.bool(), tensor, torch.zeros_like(tensor))
    return masked.sum() if dim is None else masked.sum(dim=dim)


def masked_normalize(tensor: torch.Tensor, mask: torch.Tensor, normalize_constant: Any,
                     dim: int | None = None) -> torch.Tensor:
    """CS336 A5: `masked_sum` of `tensor` along `dim` (all if None), divided by
    `normalize_constant` (a number or a tensor)."""
    return masked_sum(tensor, mask, dim) / normalize_constant


def sft_microbatch_train_step(policy_log_probs: torch.Tensor, response_mask: torch.Tensor,
                              gradient_accumulation_steps: int, normalize_constant: float = 1.0
                              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CS336 A5: the loss of eq. (6.3) for one microbatch; calls `backward()` and returns the
    (scaled) loss and metadata."""
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, "
                         f"got {gradient_accumulation_steps}")
    per_example = masked_normalize(policy_log_probs, response_mask, normalize_constant, dim=-1)
    loss = -per_example.mean() / gradient_accumulation_steps
    loss.backward()
    return loss.detach(), {"response_tokens": response_mask.sum().detach(),
                           "per_example_loss": -per_example.detach()}


# %% [markdown]
# **Tolerances.** The checks in this chapter compare two float32 computations that agree in exact
# arithmetic, so they differ by rounding only, and each tolerance comes from the arithmetic
# (Appendix A, "Tolerances from the arithmetic"), not from what one machine happened to print.
# Two helpers cover the cases the chapter meets.
#
# A *log-softmax* over $V$ logits $z$ (and so a log-probability, a cross-entropy or an entropy):
# the sum of $V$ exponentials errs by at most $\gamma_{V-1}$ relatively (A.5), which the logarithm
# turns into an absolute error, and the shift by $\max z$, the exponential, the logarithm and the
# final subtraction each cost a few $u$ times the size of their arguments. Counting them, a
# log-sum-exp errs by at most $\gamma_{V-1} + 6u\,(\max|z| + \ln V + 1)$.
#
# A *whole transformer*, run twice on the same tokens but batched, padded or implemented
# differently. No theorem covers a chain of layers, so we extend (A.5) with two stated
# assumptions: each matrix product on a token's path (seven per layer, generously counted:
# queries, keys and values; attention scores; weighted values; output projection; gate and up
# projections, whose product counts twice; down projection; and one head) errs by at most
# $\gamma_n$ times the size of its outputs, $n$ the longest reduction (hidden size, MLP width or
# number of tokens); and these relative errors add up along the residual stream, which
# normalisation scales together with the activations. Under them, twice the sum bounds the gap
# between two computations, and a backward pass has three products for each forward one. The first assumption can fail for a product whose terms cancel heavily; both are
# generous otherwise, since typical rounding errors grow like $\sqrt{n}\,u$ rather than $n u$ and
# the errors of different products partly cancel. Compare the printed gaps with the tolerances:
# the errors the checks look for, a wrong mask or normalisation, move outputs by amounts on the
# scale of the outputs themselves. (Running both computations in float64 would not settle the
# question: transformers computes RMSNorm, the attention softmax and the rotary angles in float32
# whatever the model's dtype.)

# %%
#| export
import math

from ftbook.workbench import pick, rounding_bound, unit_roundoff  # noqa: F811


def log_softmax_tolerance(logits: torch.Tensor) -> float:
    """Bound on the rounding error of a log-sum-exp over the last dimension of `logits`, in
    their dtype, and so of each log-probability: gamma_{V-1} (A.5) for the sum of V exponentials
    plus 6 u (max|z| + ln V + 1) for the shift, exponential, logarithm and subtraction."""
    V = logits.shape[-1]
    low, high = logits.detach().aminmax()
    z_max = max(-low.item(), high.item())
    return (rounding_bound(V, 1.0, logits.dtype)
            + 6 * unit_roundoff(logits.dtype) * (z_max + math.log(V) + 1))


def transformer_tolerance(config: Any, n_tokens: int, scale: float, backward: bool = False,
                          dtype: torch.dtype = torch.float32) -> float:
    """How far rounding alone can move outputs of size up to `scale` between two computations of
    the same transformer (`config`) on at most `n_tokens` tokens that differ in batching, padding
    or implementation: gamma_n of (A.1), n the longest reduction (hidden size, MLP width or
    `n_tokens`), for each of the 7 products per layer and the head, relative to `scale`; doubled
    for two computations, tripled for a backward pass (see the chapter for the assumptions)."""
    hidden = config.hidden_size
    width = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
             or 4 * hidden)
    n = max(hidden, width, n_tokens)
    products = (7 * config.num_hidden_layers + 1) * (3 if backward else 1)
    return 2 * products * rounding_bound(n + 1, scale, dtype)


# %% [markdown]
# Checks on a random tiny Llama: the entropy formula against `torch.distributions`, the mask of
# (6.2) on a hand-made example, and gradient accumulation. Four rows with very different response
# lengths, split into two microbatches of two: with $c = N/(Gb)$ the accumulated gradient equals
# the gradient of (6.1) on all four rows, while normalising each microbatch by its own token count
# does not: the gap it leaves is far above the rounding tolerance.

# %%
import copy

from transformers import LlamaConfig, LlamaForCausalLM

torch.manual_seed(0)
toy = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, pad_token_id=0,
                                   attn_implementation="eager"))
logits = torch.randn(2, 5, 64) * 3
reference = torch.distributions.Categorical(logits=logits).entropy()
entropy_gap = (compute_entropy(logits) - reference).abs().max().item()
# Each side: a log-sum-exp (error <= eps) and a 64-term dot product of probabilities (relative
# error <= 2 eps: an exponential over the sum) with terms of total size at most sum p|z| + H.
eps = log_softmax_tolerance(logits)
size = ((torch.softmax(logits, -1) * logits.abs()).sum(-1) + reference).max().item()
entropy_tolerance = 2 * (eps + (rounding_bound(64 + 1, 1.0) + 2 * eps) * size)
print(f"max |entropy - torch.distributions| = {entropy_gap:.2e} (tolerance {entropy_tolerance:.1e})")
assert entropy_gap <= entropy_tolerance


class CharTokenizer:
    """One token per character (ids 1..63), pad 0: enough to check the contracts."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + (ord(c) % 63) for c in text]}


tok = CharTokenizer()
batch = tokenize_prompt_and_output(["ab", "a"], ["XYZ", "Q"], tok)
print("response_mask:", batch["response_mask"].int().tolist())
assert batch["response_mask"].int().tolist() == [[0, 1, 1, 1], [1, 0, 0, 0]]  # eq. (6.2)

prompts = ["Q: 1+1?", "Name it:", "Say:", "Why?"]
outputs = ["A: 2", "a very long answer that goes on and on", "ok", "because of the rain"]
batch = tokenize_prompt_and_output(prompts, outputs, tok)
N = batch["response_mask"].sum().item()


def sft_gradient(split: list[slice], constant) -> torch.Tensor:
    model = copy.deepcopy(toy)
    for part in split:
        logps = get_response_log_probs(model, batch["input_ids"][part],
                                       batch["labels"][part])["log_probs"]
        mask = batch["response_mask"][part]
        sft_microbatch_train_step(logps, mask, len(split), constant(mask, len(split)))
    return model.model.embed_tokens.weight.grad.clone()


whole = sft_gradient([slice(0, 4)], lambda mask, G: N / 4)  # eq. (6.1) on the large batch
accumulated = sft_gradient([slice(0, 2), slice(2, 4)], lambda mask, G: N / (G * 2))
per_micro = sft_gradient([slice(0, 2), slice(2, 4)], lambda mask, G: mask.sum().item() / 2)
gap_right = (whole - accumulated).abs().max().item()
gap_wrong = (whole - per_micro).abs().max().item()
# rounding of a forward and backward pass over all the tokens of the batch (the gradient of the
# embeddings sums over them)
grad_tolerance = transformer_tolerance(toy.config, batch["input_ids"].numel(),
                                       whole.abs().max().item(), backward=True)
print(f"max |grad(large batch) - grad(accumulated, c = N/(Gb))| = {gap_right:.2e}; "
      f"with per-microbatch token counts: {gap_wrong:.2e} (rounding tolerance {grad_tolerance:.1e})")
assert gap_right <= grad_tolerance < gap_wrong

# %% [markdown]
# ## Packing
#
# SFT examples vary in length; padding each batch to its longest example wastes the compute
# spent on pad tokens. Packing concatenates examples into rows of a fixed length $T$. Done
# naively, an example attends to the tail of the one before it and continues its positions. Done
# correctly, each example keeps its own world inside the row: positions restart at 0, the
# attention mask is block-diagonal (causal within an example, nothing across), and the label of
# an example's first token is not predicted from the previous example. Then the logits of every
# example equal those it would get alone, which we check.
#
# Training reads the examples as a stream and takes a fixed number of rows per step.
# `packed_batches` packs the stream greedily and in order: an example that does not fit in the
# current row opens the next row, or, when the step's rows are all open, the next step's batch.
# No example is split across rows or steps, none is dropped, and the order is kept.

# %%
#| export
def pack_examples(examples: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int,
                  pad_token_id: int) -> dict[str, torch.Tensor]:
    """Greedily pack (input_ids, labels) pairs, in order, into rows of `seq_len` tokens.

    Returns `input_ids`, `labels` (-100 on padding), `position_ids` (restarting at 0 for every
    example) and `document_ids` (the example's index in its row, -1 on padding), each
    (rows, seq_len). An example longer than `seq_len` is an error, not silently cut.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    rows: list[list[tuple[Sequence[int], Sequence[int]]]] = [[]]
    used = 0
    for i, (ids, labels) in enumerate(examples):
        if len(ids) != len(labels):
            raise ValueError(f"example {i}: {len(ids)} input ids but {len(labels)} labels")
        if len(ids) > seq_len:
            raise ValueError(f"example {i} has {len(ids)} tokens, more than seq_len={seq_len}")
        if used + len(ids) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((ids, labels))
        used += len(ids)
    shape = (len(rows), seq_len)
    out = {"input_ids": torch.full(shape, pad_token_id, dtype=torch.long),
           "labels": torch.full(shape, -100, dtype=torch.long),
           "position_ids": torch.zeros(shape, dtype=torch.long),
           "document_ids": torch.full(shape, -1, dtype=torch.long)}
    for r, row in enumerate(rows):
        start = 0
        for d, (ids, labels) in enumerate(row):
            end = start + len(ids)
            out["input_ids"][r, start:end] = torch.tensor(list(ids))
            out["labels"][r, start:end] = torch.tensor(list(labels))
            out["position_ids"][r, start:end] = torch.arange(len(ids))
            out["document_ids"][r, start:end] = d
            start = end
    return out


def packed_batches(examples: Iterable[tuple[Sequence[int], Sequence[int]]], seq_len: int,
                   rows_per_step: int, pad_token_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of packed training: a stream of (input_ids, labels) pairs read in order and
    packed greedily (`pack_examples`) into batches of at most `rows_per_step` rows of `seq_len`
    tokens. An example that does not fit in the current row opens the next row, or, when the
    batch has its `rows_per_step` rows, the next batch. No example is split, dropped or
    reordered; a finite stream ends with a last, partly filled batch."""
    if rows_per_step < 1:
        raise ValueError(f"rows_per_step must be positive, got {rows_per_step}")
    chosen: list[tuple[Sequence[int], Sequence[int]]] = []
    rows, used = 1, 0  # rows opened in this batch, tokens used in the last one
    for i, example in enumerate(examples):
        if used + len(example[0]) > seq_len:  # the example opens a new row ...
            if rows == rows_per_step:  # ... in the next batch when this one is full
                yield pack_examples(chosen, seq_len, pad_token_id)
                chosen, rows = [], 0
            rows, used = rows + 1, 0
        if len(example[0]) > seq_len:
            raise ValueError(f"example {i} of the stream has {len(example[0])} tokens, more than "
                             f"seq_len={seq_len}")
        chosen.append(example)
        used += len(example[0])
    if chosen:
        yield pack_examples(chosen, seq_len, pad_token_id)


def packed_attention_mask(document_ids: torch.Tensor, dtype: torch.dtype = torch.float32
                          ) -> torch.Tensor:
    """(rows, 1, T, T) additive mask: position i may attend to j <= i of the same example;
    padding attends only to itself (so no row of the softmax is empty)."""
    T = document_ids.shape[1]
    same = document_ids.unsqueeze(2) == document_ids.unsqueeze(1)  # (rows, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    allowed = same & causal & (document_ids.unsqueeze(2) >= 0)
    allowed |= torch.eye(T, dtype=torch.bool, device=document_ids.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=document_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def token_utilization(attention_or_labels: torch.Tensor, pad_value: int) -> float:
    """Fraction of the positions in a batch that are not padding."""
    return (attention_or_labels != pad_value).float().mean().item()


# %%
generator = torch.Generator().manual_seed(0)
lengths = [5, 9, 3, 7, 6, 2]
docs = [torch.randint(1, 64, (n,), generator=generator).tolist() for n in lengths]
packed = pack_examples([(d, d) for d in docs], seq_len=16, pad_token_id=0)
print("rows:", packed["input_ids"].shape[0], "| document ids of row 0:",
      packed["document_ids"][0].tolist())
with torch.no_grad():
    packed_logits = toy(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                        attention_mask=packed_attention_mask(packed["document_ids"])).logits
    gap, naive_gap, scale, k = 0.0, 0.0, 0.0, 0
    naive_logits = toy(input_ids=packed["input_ids"]).logits  # no boundaries
    for r in range(packed["input_ids"].shape[0]):
        for d in range(int(packed["document_ids"][r].max()) + 1):
            where = packed["document_ids"][r] == d
            alone = toy(input_ids=torch.tensor([docs[k]])).logits[0]
            gap = max(gap, (packed_logits[r, where] - alone).abs().max().item())
            naive_gap = max(naive_gap, (naive_logits[r, where] - alone).abs().max().item())
            scale = max(scale, alone.abs().max().item())
            k += 1
logit_tolerance = transformer_tolerance(toy.config, packed["input_ids"].shape[1], scale)
print(f"max |logits packed - alone| = {gap:.2e} with boundaries, {naive_gap:.2e} without "
      f"(rounding tolerance {logit_tolerance:.1e})")
assert gap <= logit_tolerance < naive_gap
padded_rows = len(docs) * max(lengths)
print(f"token utilization: packed {token_utilization(packed['labels'], -100):.2f}, padded "
      f"{sum(lengths) / padded_rows:.2f}")
# the training stream in batches of two rows: every example once, whole, in order
batches = list(packed_batches([(d, d) for d in docs], seq_len=16, rows_per_step=2,
                              pad_token_id=0))
streamed = [row[(document == d)].tolist() for batch in batches
            for row, document in zip(batch["input_ids"], batch["document_ids"], strict=True)
            for d in range(int(document.max()) + 1)]
print("packed_batches, rows per batch:", [b["input_ids"].shape[0] for b in batches])
assert streamed == docs and all(b["input_ids"].shape[0] <= 2 for b in batches)

# %% [markdown]
# ## From conversations to SFT examples: the chat template and EOS
#
# A conversation becomes a (prompt, output) pair through the tokenizer's chat template: the prompt
# is everything up to and including the assistant header (`add_generation_prompt=True`), the
# output is the assistant's reply *followed by the end-of-sequence token*. The EOS token must be
# in the labels and in the response mask, or the model never learns to stop. A common way to lose
# it is to use EOS as the pad token: the loss then masks padding by token id and removes every EOS
# with it. The book's chat models keep pad and EOS distinct (Appendix C): for SmolLM2 and Qwen2.5
# the EOS is the end-of-turn token `<|im_end|>` and the pad is `<|endoftext|>`. ChatML writes a
# newline after each `<|im_end|>`; that newline belongs to neither the prompt nor the output, so the
# loss covers the reply and the token that ends it, and generation stops there. The check below
# confirms that the EOS of each reply carries loss.

# %%
#| export
def conversation_to_prompt_and_output(tokenizer: Any, messages: Sequence[dict]) -> tuple[str, str]:
    """(prompt, output) strings of a conversation for SFT: the chat template up to the last
    assistant header, and the last assistant message as the template writes it, up to and
    including its end-of-turn token (the EOS; see `ftbook.base_models.set_chat_special_tokens`).
    Whatever a template writes after the end of a turn (ChatML's newline) is in neither: the
    loss covers exactly the reply and the token that ends it."""
    messages = validate_conversation(messages)
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no EOS token: the model could not learn to stop")
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError("pad and EOS are the same token: masking padding would mask every EOS")
    prompt = tokenizer.apply_chat_template(list(messages[:-1]), add_generation_prompt=True,
                                           tokenize=False)
    rendered = tokenizer.apply_chat_template(list(messages), tokenize=False)
    if not rendered.startswith(prompt) or tokenizer.eos_token not in rendered[len(prompt):]:
        raise ValueError("the chat template must render the prompt as a prefix of the whole "
                         "conversation and end the reply with EOS")
    end = rendered.index(tokenizer.eos_token, len(prompt)) + len(tokenizer.eos_token)
    return prompt, rendered[len(prompt):end]


# %%
from ftbook.base_models import load_chat_lm

lm, lm_tokenizer = load_chat_lm(PROFILE)
conversation = from_alpaca(alpaca[0], 0)
prompt, output = conversation_to_prompt_and_output(lm_tokenizer, conversation)
rendered = lm_tokenizer.apply_chat_template(conversation, tokenize=False)
print(repr(prompt + output)[:400])
# ChatML writes a newline after the end-of-turn token; it belongs to neither part
assert rendered.startswith(prompt + output) and rendered[len(prompt + output):].strip() == ""
example = tokenize_prompt_and_output([prompt], [output], lm_tokenizer)
last_response = int(example["response_mask"][0].nonzero().max())
assert example["labels"][0, last_response].item() == lm_tokenizer.eos_token_id
print(f"{int(example['response_mask'].sum())} response tokens; the last one is EOS "
      f"(id {lm_tokenizer.eos_token_id}), pad is id {lm_tokenizer.pad_token_id}")

# %% [markdown]
# ## Quality filtering
#
# Instruction data collected or generated at scale contains empty answers, placeholders, answers
# that refuse, duplicates and near-duplicates, and toxic text. Each filter below is a function
# from a conversation (or a list of them) to a decision, and each is reported as what it removes
# from the real Alpaca sample.
#
# **Near-duplicates with MinHash.** Represent a text by its set $S$ of word 5-grams
# ("shingles"). For a random hash function $h$, the probability that the minimum hash over two
# sets coincides is their Jaccard similarity (Broder 1997):
#
# $$
# \Pr\big[\min_{s \in S_1} h(s) = \min_{s \in S_2} h(s)\big] = J(S_1, S_2)
# = \frac{|S_1 \cap S_2|}{|S_1 \cup S_2|} .
# \tag{6.4}
# $$
#
# A signature of $k$ such minima estimates $J$ by the fraction of agreeing entries. Locality-
# sensitive hashing splits the signature into $b$ bands of $r$ rows and calls two texts
# candidates when any band agrees entirely, which happens with probability
#
# $$
# P(J) = 1 - \big(1 - J^r\big)^b ,
# \tag{6.5}
# $$
#
# an S-curve with its threshold near $(1/b)^{1/r}$. Candidates are then verified by their
# estimated similarity. The next cells check (6.4) and (6.5) by simulation.

# %%
#| export
import hashlib
import re

_PRIME = (1 << 31) - 1  # a Mersenne prime: a x + b (a, x < p) fits in int64 and wraps


def shingles(text: str, n: int = 5) -> set[str]:
    """The set of word n-grams of a lower-cased text (the whole text if it is shorter)."""
    words = re.findall(r"\w+", text.lower())
    if len(words) <= n:
        return {" ".join(words)}
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def _base_hash(item: str) -> int:
    return int.from_bytes(hashlib.blake2b(item.encode(), digest_size=8).digest(), "little")


def minhash_signature(items: set[str], num_perm: int = 128, seed: int = 0) -> torch.Tensor:
    """(num_perm,) MinHash signature: minima of `num_perm` universal hashes (a x + b mod p)."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randint(1, _PRIME, (num_perm,), generator=generator, dtype=torch.int64)
    b = torch.randint(0, _PRIME, (num_perm,), generator=generator, dtype=torch.int64)
    base = torch.tensor([_base_hash(x) % _PRIME for x in items] or [0], dtype=torch.int64)
    hashed = (a[:, None] * base[None, :] + b[:, None]) % _PRIME  # (num_perm, |items|)
    return hashed.min(dim=1).values


def lsh_candidate_pairs(signatures: torch.Tensor, bands: int) -> set[tuple[int, int]]:
    """Pairs (i, j), i < j, whose signatures agree on every row of at least one band, eq. (6.5)."""
    n, k = signatures.shape
    if k % bands:
        raise ValueError(f"signature length {k} is not divisible by {bands} bands")
    rows = k // bands
    pairs: set[tuple[int, int]] = set()
    for band in range(bands):
        buckets: dict[tuple[int, ...], list[int]] = {}
        for i in range(n):
            key = tuple(signatures[i, band * rows:(band + 1) * rows].tolist())
            buckets.setdefault(key, []).append(i)
        for members in buckets.values():
            pairs.update((members[x], members[y]) for x in range(len(members))
                         for y in range(x + 1, len(members)))
    return pairs


def near_duplicates(texts: Sequence[str], threshold: float = 0.7, num_perm: int = 128,
                    bands: int = 32, seed: int = 0) -> list[tuple[int, int, float]]:
    """(i, j, estimated Jaccard) for the LSH candidate pairs whose MinHash estimate reaches
    `threshold`; the later text of each pair is the one to drop."""
    signatures = torch.stack([minhash_signature(shingles(t), num_perm, seed) for t in texts])
    found = []
    for i, j in sorted(lsh_candidate_pairs(signatures, bands)):
        estimate = (signatures[i] == signatures[j]).float().mean().item()
        if estimate >= threshold:
            found.append((i, j, estimate))
    return found


def exact_duplicates(texts: Sequence[str]) -> list[int]:
    """Indices of texts equal (after lower-casing and collapsing whitespace) to an earlier one."""
    seen: set[str] = set()
    dropped = []
    for i, text in enumerate(texts):
        key = " ".join(text.lower().split())
        if key in seen:
            dropped.append(i)
        seen.add(key)
    return dropped


# %%
import random

from ftbook.workbench import binomial_interval

rng = random.Random(0)
vocabulary = [f"w{i}" for i in range(400)]
rows = []
for _ in range(40):
    s1 = set(rng.sample(vocabulary, 60))
    keep = rng.randint(0, 60)
    s2 = set(rng.sample(sorted(s1), keep)) | set(rng.sample(vocabulary, 60 - keep))
    exact = len(s1 & s2) / len(s1 | s2)
    sig1, sig2 = minhash_signature(s1, 256, seed=1), minhash_signature(s2, 256, seed=1)
    rows.append((exact, (sig1 == sig2).float().mean().item()))
errors = [abs(e - m) for e, m in rows]
se = (0.25 / 256) ** 0.5  # standard error of a mean of 256 agreements, largest at J = 0.5
print(f"eq. (6.4): |MinHash estimate - Jaccard| over 40 pairs, k = 256: mean {sum(errors) / 40:.3f}"
      f", max {max(errors):.3f} (binomial standard error at J = 0.5: {se:.3f})")
# A statistical check that cannot flip by chance: a deviation beyond 5 standard errors has
# probability below 6e-7 per pair (and the hashes are integer arithmetic: nothing to round).
assert max(errors) < 5 * se
bands, r = 32, 4  # 128 hashes
for J in (0.2, 0.4, 0.6):
    flagged = 0
    for trial in range(60):
        # two sets of 50 items sharing m, with m chosen so that J = m / (100 - m)
        m = round(100 * J / (1 + J))
        shared = {f"s{trial}_{i}" for i in range(m)}
        s1 = shared | {f"a{trial}_{i}" for i in range(50 - m)}
        s2 = shared | {f"b{trial}_{i}" for i in range(50 - m)}
        signatures = torch.stack([minhash_signature(s1, bands * r, seed=trial),
                                  minhash_signature(s2, bands * r, seed=trial)])
        flagged += bool(lsh_candidate_pairs(signatures, bands))
    exact_J = m / (100 - m)
    predicted = 1 - (1 - exact_J ** r) ** bands
    low, high = binomial_interval(flagged, 60)
    print(f"eq. (6.5): J = {exact_J:.2f}: candidate in {flagged / 60:.2f} of 60 pairs "
          f"(95% interval [{low:.2f}, {high:.2f}]), predicted {predicted:.2f}")
    # statistical, at a level that cannot flip by chance: (6.5) lies in the 1 - 1e-6 interval
    low, high = binomial_interval(flagged, 60, level=1 - 1e-6)
    assert low <= predicted <= high

# %% [markdown]
# **Rule-based filters.** Length bounds on the user turn and the reply; format rules that catch
# what is known to be broken in Alpaca-style data (placeholders such as `<nooutput>`, replies
# that refuse as "an AI language model", instructions that point at a URL or an image the model
# cannot see); and a lexicon check for toxic language. The lexicon is deliberately small and
# errs on the side of precision: a classifier (Detoxify, Perspective) is what a production
# pipeline would use, and needs a download this book cannot make.

# %%
#| export
PLACEHOLDERS = ("<nooutput>", "<noinput>", "n/a")
REFUSALS = ("as an ai language model", "as an ai, i", "i am an ai", "i'm sorry, but i cannot")
UNSEEABLE = (r"https?://", r"\bthis (image|picture|photo|video)\b", r"\battached\b")
TOXIC_WORDS = ("idiot", "idiots", "stupid", "moron", "morons", "dumb", "retard", "retarded",
               "shut up", "kill yourself", "hate you", "loser", "scum", "trash")


def length_problem(messages: Sequence[dict], min_words: int = 1, max_words: int = 400
                   ) -> str | None:
    """Why the conversation fails the length bounds (words per message), or None."""
    for m in messages:
        n = len(m["content"].split())
        if n < min_words or n > max_words:
            return f"{m['role']} has {n} words (bounds {min_words}..{max_words})"
    return None


def format_problem(messages: Sequence[dict]) -> str | None:
    """Why the conversation fails the format rules, or None."""
    reply = messages[-1]["content"].strip().lower()
    prompt = " ".join(m["content"] for m in messages[:-1]).lower()
    if reply in PLACEHOLDERS or any(p in reply for p in PLACEHOLDERS[:2]):
        return "placeholder reply"
    if any(r in reply for r in REFUSALS):
        return "refusal"
    if any(re.search(u, prompt) for u in UNSEEABLE):
        return "refers to a link or media the model cannot see"
    return None


def toxicity_problem(messages: Sequence[dict]) -> str | None:
    """The first lexicon entry found (as a whole word or phrase) in any message, or None."""
    text = " ".join(m["content"] for m in messages).lower()
    for word in TOXIC_WORDS:
        if re.search(rf"\b{re.escape(word)}\b", text):
            return f"contains {word!r}"
    return None


def filter_conversations(conversations: Sequence[list[dict]], near_threshold: float = 0.7,
                         seed: int = 0) -> tuple[list[int], dict[str, list[tuple[int, str]]]]:
    """Apply every filter in turn; return the indices kept and, per filter, the (index, reason)
    pairs it removed (each conversation is charged to the first filter that removes it)."""
    removed: dict[str, list[tuple[int, str]]] = {
        "length": [], "format": [], "toxicity": [], "exact duplicate": [],
        "near duplicate": []}
    alive = []
    for i, conv in enumerate(conversations):
        for name, check in (("length", length_problem), ("format", format_problem),
                            ("toxicity", toxicity_problem)):
            reason = check(conv)
            if reason:
                removed[name].append((i, reason))
                break
        else:
            alive.append(i)
    texts = [" ".join(m["content"] for m in conversations[i]) for i in alive]
    exact = set(exact_duplicates(texts))
    removed["exact duplicate"] = [(alive[j], "same text as an earlier record") for j in exact]
    survivors = [j for j in range(len(alive)) if j not in exact]
    near = near_duplicates([texts[j] for j in survivors], near_threshold, seed=seed)
    dropped = set()
    for a, b, estimate in near:
        if a not in dropped and b not in dropped:
            dropped.add(b)
            removed["near duplicate"].append(
                (alive[survivors[b]], f"~{estimate:.2f} Jaccard with record {alive[survivors[a]]}"))
    kept = [alive[survivors[j]] for j in range(len(survivors)) if j not in dropped]
    return kept, removed


# %%
import pandas as pd

from ftbook.workbench import show_table

conversations, rejected = [], 0
for i, record in enumerate(alpaca):
    try:
        conversations.append(from_alpaca(record, i))
    except DataFormatError:
        rejected += 1
kept, removed = filter_conversations(conversations, seed=SEED)
report = pd.DataFrame([{
    "filter": name, "removed": len(items),
    "example": (f"#{items[0][0]}: {items[0][1]}; "
                f"{conversations[items[0][0]][0]['content'][:50]!r}") if items else "",
} for name, items in removed.items()]).set_index("filter")
show_table(report, "alpaca_filters", CHAPTER)
print(f"Alpaca sample: {len(alpaca)} records, {rejected} malformed, {len(conversations)} "
      f"converted, {len(kept)} kept ({100 * len(kept) / len(conversations):.1f}%)")

# %% [markdown]
# ## Synthetic instruction data with checkable answers
#
# The tiny profile's chat model, SmolLM2-135M-Instruct, already follows instructions: asked
# whether a review is positive, it answers in a sentence; asked for a sum, it explains the
# calculation. What SFT can add is measured best on tasks whose answers are short and
# checkable, and which the model fails as it is: labelling the sentiment of an SST-2 sentence
# with exactly "positive" or "negative", adding and subtracting numbers below 50, copying a
# phrase, rewriting it in capitals, and continuing the opening words of a review, with or
# without a requested polarity (not checkable exactly; we check that the model stops). The polarity-free continuation, `REVIEW_PROMPT`, is the running task of
# 13-07 to 13-09: there, the SFT model is steered towards positive reviews by a reward. Training
# prompts come from SST-2's training sentences and held-out prompts from its validation
# sentences; held-out arithmetic problems exclude every problem seen in training.

# %%
#| export
import random

SYNTHETIC_TASKS = ("sentiment", "arithmetic", "copy", "uppercase", "review", "continue")
# The running task of 13-07 to 13-09: continue the opening of a movie review.
REVIEW_PROMPT = "Continue this movie review: {opening}"


def synthetic_instructions(sentences: Sequence[str], labels: Sequence[int], n_per_task: int,
                           seed: int, exclude: set[str] | None = None) -> list[dict]:
    """`n_per_task` examples of each task in `SYNTHETIC_TASKS`, as dicts with `category`,
    `messages` (a conversation) and `answer` (the exact expected reply, None for the two review
    tasks, whose replies are the SST-2 sentence the opening was cut from).
    Prompts whose user turn is in `exclude` are skipped (held-out splits)."""
    if len(sentences) != len(labels):
        raise ValueError(f"{len(sentences)} sentences but {len(labels)} labels")
    rng = random.Random(seed)
    exclude = exclude or set()
    pool = [(s.strip(), int(y)) for s, y in zip(sentences, labels, strict=True) if s.strip()]
    examples: list[dict] = []

    def add(category: str, user: str, reply: str, answer: str | None) -> bool:
        if user in exclude:
            return False
        examples.append({"category": category, "answer": answer, "messages": [
            {"role": "user", "content": user}, {"role": "assistant", "content": reply}]})
        return True

    for task in SYNTHETIC_TASKS:
        made, attempts = 0, 0
        while made < n_per_task:
            attempts += 1
            if attempts > 50 * n_per_task:
                raise ValueError(f"could not make {n_per_task} new {task!r} examples")
            sentence, label = rng.choice(pool)
            phrase = " ".join(sentence.split()[:rng.randint(3, 6)])
            if task == "sentiment":
                reply = "positive" if label else "negative"
                made += add(task, "Is this movie review positive or negative?\n\n" + sentence,
                            reply, reply)
            elif task == "arithmetic":
                a, b, op = rng.randint(0, 49), rng.randint(0, 49), rng.choice("+-")
                if op == "-" and b > a:  # non-negative results
                    a, b = b, a
                result = str(a + b if op == "+" else a - b)
                made += add(task, f"What is {a} {op} {b}?", result, result)
            elif task == "copy":
                made += add(task, f"Repeat exactly: {phrase}", phrase, phrase)
            elif task == "uppercase":
                made += add(task, f"Rewrite in capital letters: {phrase}", phrase.upper(),
                            phrase.upper())
            elif task == "review":
                polarity = "positive" if label else "negative"
                made += add(task, f"Write a {polarity} movie review that starts with: {phrase}",
                            sentence, None)
            else:
                made += add(task, REVIEW_PROMPT.format(opening=phrase), sentence, None)
    return examples


def answer_is_correct(generated: str, answer: str) -> bool:
    """Exact match after stripping whitespace (the tasks have single, short answers)."""
    return generated.strip() == answer.strip()


# %%
from ftbook.data import load_sst2

sst2_train, sst2_dev = load_sst2("train"), load_sst2("validation")
n_per_task = pick(PROFILE, {"smoke": 8, "tiny": 300, "full": 2000})
synthetic_train = synthetic_instructions(sst2_train["sentence"], sst2_train["label"],
                                         n_per_task, seed=SEED)
seen = {e["messages"][0]["content"] for e in synthetic_train}
synthetic_heldout = synthetic_instructions(sst2_dev["sentence"], sst2_dev["label"],
                                           max(4, n_per_task // 10), seed=SEED + 1, exclude=seen)
assert not seen & {e["messages"][0]["content"] for e in synthetic_heldout}
for task in SYNTHETIC_TASKS:
    example = next(e for e in synthetic_train if e["category"] == task)
    print(f"{task:>10}: {example['messages'][0]['content'][:60]!r} -> "
          f"{example['messages'][1]['content'][:40]!r}")
# %% [markdown]
# ## Mixing and curriculum
#
# An SFT mix has categories of very different sizes: here the filtered Alpaca sample against far
# fewer examples of each synthetic task (the counts are printed below); in FLAN or Tülu, hundreds of tasks spanning four
# orders of magnitude. Sampling in proportion to size lets the largest categories dominate;
# sampling uniformly upsamples the smallest ones for many epochs. Temperature sampling
# interpolates (Arivazhagan et al. 2019, arXiv:1907.05019, §4.2):
#
# $$
# p_c = \frac{n_c^{1/T}}{\sum_{c'} n_{c'}^{1/T}},
# \tag{6.6}
# $$
#
# $T = 1$ keeps the natural proportions, $T \to \infty$ gives every category the same share.
# `build_mixture` draws a fixed number of examples with these proportions, upsampling a category
# beyond its size when its share demands it.
#
# A *curriculum* orders the examples instead of weighting them: easy before hard (Bengio et al.
# 2009). Our difficulty is the number of response tokens, a proxy that needs no model; the
# experiment below measures whether the order matters at this scale.

# %%
#| export
def mixture_weights(counts: dict[str, int], temperature: float) -> dict[str, float]:
    """Sampling probability of each category, p_c proportional to n_c^(1/T): T = 1 keeps the
    natural proportions, T -> infinity makes them uniform."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if any(n <= 0 for n in counts.values()):
        raise ValueError(f"every category needs at least one example: {counts}")
    scores = {c: n ** (1.0 / temperature) for c, n in counts.items()}
    total = sum(scores.values())
    return {c: v / total for c, v in scores.items()}


def build_mixture(groups: dict[str, Sequence], weights: dict[str, float], n_total: int,
                  seed: int) -> list:
    """`n_total` items, round(n_total * w_c) from each group c, in a seeded shuffled order. A
    group is drawn without replacement while it lasts, then again from a fresh shuffle: a
    category whose weight exceeds its share is upsampled (seen for several epochs)."""
    missing = set(weights) ^ set(groups)
    if missing:
        raise ValueError(f"groups and weights must name the same categories; differ on {missing}")
    rng = random.Random(seed)
    mix = []
    for category in sorted(groups):
        items = list(groups[category])
        if not items:
            raise ValueError(f"category {category!r} has no examples")
        wanted, taken = round(n_total * weights[category]), []
        while len(taken) < wanted:
            shuffled = items[:]
            rng.shuffle(shuffled)
            taken += shuffled[:wanted - len(taken)]
        mix += taken
    rng.shuffle(mix)
    return mix


def curriculum_order(difficulty: Sequence[float], seed: int) -> list[int]:
    """Indices from easiest to hardest (ascending `difficulty`), ties broken by a seeded shuffle:
    the ordering curriculum of Bengio et al. (2009)."""
    tie_break = list(range(len(difficulty)))
    random.Random(seed).shuffle(tie_break)
    return sorted(range(len(difficulty)), key=lambda i: (difficulty[i], tie_break[i]))


# %%
counts = {"alpaca": len(kept)} | {t: n_per_task for t in SYNTHETIC_TASKS}
print(f"categories: {counts['alpaca']:,} Alpaca conversations, {n_per_task:,} of each of the "
      f"{len(SYNTHETIC_TASKS)} synthetic tasks")
weights = {T: mixture_weights(counts, T) for T in (1.0, 2.0, 1e9)}
print("share of Alpaca in the mix at T = 1, 2, inf:",
      ", ".join(f"{w['alpaca']:.3f}" for w in weights.values()))
# T = 1: natural. Both sides are one rounded division of the same integers (n^1 = n, and sums
# of integers are exact in float64): equal up to a few u.
assert abs(weights[1.0]["alpaca"] - len(kept) / sum(counts.values())) <= 4 * unit_roundoff(
    torch.float64)
# T -> inf: uniform, up to (n_max / n_min)^(1/T) - 1 over the categories (exact, from (6.6))
spread = (max(counts.values()) / min(counts.values())) ** (1 / 1e9) - 1
assert abs(weights[1e9]["alpaca"] - 1 / len(counts)) <= spread + 4 * unit_roundoff(torch.float64)
groups = {"alpaca": [("alpaca", i) for i in range(len(kept))]} | {
    t: [(t, i) for i in range(n_per_task)] for t in SYNTHETIC_TASKS}
mix = build_mixture(groups, weights[2.0], 1000, seed=SEED)
drawn = pd.Series([c for c, _ in mix]).value_counts(normalize=True)
print("eq. (6.6) at T = 2, drawn vs target share:",
      ", ".join(f"{c} {drawn[c]:.3f}/{weights[2.0][c]:.3f}" for c in sorted(counts)))
drawn_counts = pd.Series([c for c, _ in mix]).value_counts()
assert all(drawn_counts[c] == round(1000 * weights[2.0][c]) for c in counts)  # rounding only
order = curriculum_order([len(e["messages"][1]["content"]) for e in synthetic_train], SEED)
lengths = [len(synthetic_train[i]["messages"][1]["content"]) for i in order]
assert lengths == sorted(lengths)

# %% [markdown]
# ## The SFT loop, packed and padded
#
# Each conversation becomes one example: the token ids of prompt and output, and labels that are
# the ids on the output (EOS included) and $-100$ on the prompt. A step draws the next examples
# of a seeded shuffle and either pads them to the longest (padded mode, `padded_batches`) or packs
# them into rows of `seq_len` tokens (packed mode, `packed_batches`). The loss is eq. (6.1):
# summed over response tokens, divided by their number in the step. Both modes train on the same
# examples in the same order; packing only removes the pad tokens, so it must give the same loss
# on the same step and process more real tokens per second.

# %%
#| export
import itertools
import time
from dataclasses import dataclass, field

from ftbook.base_models import schedule_factor  # Appendix C
from ftbook.workbench import check_finite, progress


def tokenize_for_sft(tokenizer: Any, conversations: Sequence[Sequence[dict]], max_len: int
                     ) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per conversation: labels are the ids on the final assistant reply
    (EOS included) and -100 elsewhere. The whole rendered conversation is tokenized at once and
    the prompt's tokens located at its start (as TRL does): tokenizing the reply on its own
    would let a SentencePiece tokenizer prepend a word-boundary mark that inference never sees.
    Examples longer than `max_len` keep their first `max_len` tokens."""
    examples = []
    for i, conversation in enumerate(conversations):
        prompt, output = conversation_to_prompt_and_output(tokenizer, conversation)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(prompt + output, add_special_tokens=False)["input_ids"]
        if full_ids[:len(prompt_ids)] != prompt_ids:
            raise ValueError(f"conversation {i}: the prompt's tokens change when the reply "
                             "follows; the chat template must end the prompt on a token boundary")
        labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids):]
        examples.append((full_ids[:max_len], labels[:max_len]))
    return examples


def sft_loss(logits: torch.Tensor, labels: torch.Tensor,
             document_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Eq. (6.1) for one step: the summed negative log-likelihood of the response tokens divided
    by their number, and that number. Position t predicts labels[t + 1]; with `document_ids`,
    no position predicts a token of the next packed example."""
    targets = labels[:, 1:].clone()  # (batch, seq - 1)
    if document_ids is not None:
        targets[document_ids[:, 1:] != document_ids[:, :-1]] = -100
    n_tokens = int((targets != -100).sum())
    nll = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                      ignore_index=-100, reduction="sum")
    return nll / max(n_tokens, 1), n_tokens


def pad_examples(examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int
                 ) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest: `input_ids`, `labels` (-100 on padding),
    `attention_mask`."""
    if any(len(ids) != len(labels) for ids, labels in examples):
        raise ValueError("every example needs as many labels as input ids")
    batch = pad_sequences([ids for ids, _ in examples], pad_token_id)  # Appendix C
    labels = pad_sequences([labels for _, labels in examples], -100)["input_ids"]
    return {"input_ids": batch["input_ids"], "labels": labels,
            "attention_mask": batch["attention_mask"]}


def padded_batches(examples: Iterable[tuple[Sequence[int], Sequence[int]]],
                   examples_per_step: int, pad_token_id: int
                   ) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of padded training: `examples_per_step` examples of a stream at a time, in
    order, each batch padded to its longest (`pad_examples`); a finite stream ends with a
    last, smaller batch."""
    if examples_per_step < 1:
        raise ValueError(f"examples_per_step must be positive, got {examples_per_step}")
    stream = iter(examples)
    while chunk := list(itertools.islice(stream, examples_per_step)):
        yield pad_examples(chunk, pad_token_id)


@dataclass
class SFTLog:
    """What `sft_train` measured."""

    losses: list[float] = field(default_factory=list)
    response_tokens: list[int] = field(default_factory=list)
    real_tokens: list[int] = field(default_factory=list)  # non-pad tokens processed
    slots: list[int] = field(default_factory=list)  # tokens processed, padding included
    step_seconds: list[float] = field(default_factory=list)

    @property
    def utilization(self) -> float:
        return sum(self.real_tokens) / max(1, sum(self.slots))

    @property
    def tokens_per_second(self) -> float:
        """Real tokens per second of step time, the first (warm-up) step excluded."""
        skip = 1 if len(self.step_seconds) > 1 else 0
        return sum(self.real_tokens[skip:]) / max(1e-9, sum(self.step_seconds[skip:]))


def sft_train(model: nn.Module, examples: Sequence[tuple[list[int], list[int]]], *, steps: int,
              lr: float, seq_len: int, pad_token_id: int, packing: bool, seed: int,
              examples_per_step: int = 16, rows_per_step: int = 4, bf16: bool = False,
              warmup: int = 0, schedule_steps: int | None = None,
              order: Sequence[int] | None = None,
              callback: Callable[[int, nn.Module], None] | None = None,
              desc: str = "SFT") -> SFTLog:
    """Train `model` on `examples` with AdamW and eq. (6.1), reading them in `order` (default: a
    seeded shuffle), cycling. Padded: `examples_per_step` examples padded to the longest
    (`padded_batches`). Packed: the stream fills `rows_per_step` rows of `seq_len` tokens
    (`packed_batches`); an example that does not fit opens the next row, or waits for the next
    step. With `warmup` > 0 the learning rate warms up linearly and decays on a cosine to
    lr / 10 over `schedule_steps` (default `steps`; more makes this run the first `steps` steps
    of a longer one). `callback(k, model)` runs after step k = 1, 2, ..."""
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    if order is None:
        order = torch.randperm(len(examples),
                               generator=torch.Generator().manual_seed(seed)).tolist()
    elif sorted(order) != list(range(len(examples))):
        raise ValueError("order must be a permutation of the example indices")
    stream = (examples[i] for i in itertools.cycle(order))
    batches = (packed_batches(stream, seq_len, rows_per_step, pad_token_id) if packing
               else padded_batches(stream, examples_per_step, pad_token_id))
    log = SFTLog()
    for step, batch in zip(progress(range(steps), desc=desc), batches, strict=False):  # cycles
        if packing:  # positions restart and attention stays inside each example
            inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                      "attention_mask": packed_attention_mask(batch["document_ids"])}
            documents = batch["document_ids"].to(device)
            real = int((batch["document_ids"] >= 0).sum())
        else:
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            documents = None
            real = int(batch["attention_mask"].sum())
        inputs = {k: v.to(device) for k, v in inputs.items()}
        model.train()
        if warmup > 0:
            for group in optimizer.param_groups:
                group["lr"] = schedule_factor("cosine", step, schedule_steps or steps, warmup,
                                              min_ratio=0.1, scale=lr)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(**inputs).logits  # (rows, seq, vocab)
        loss, n_tokens = sft_loss(logits, batch["labels"].to(device), documents)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.step_seconds.append(time.perf_counter() - start)
        log.losses.append(check_finite(loss, f"{desc} loss", step))
        log.response_tokens.append(n_tokens)
        log.real_tokens.append(real)
        log.slots.append(batch["input_ids"].numel())
        if callback is not None:
            callback(step + 1, model)
    return log


@dataclass(frozen=True)
class SFTRecipe:
    """Sizes and hyperparameters of one profile's SFT run."""

    n_per_task: int  # synthetic training examples per task
    n_heldout_per_task: int
    n_alpaca_heldout: int
    mix_size: int  # examples in the temperature-sampled mixture
    temperature: float  # mixture temperature T (eq. 6.6)
    steps: int
    ablation_steps: int  # the mixing, curriculum and filtering runs: the first steps of a run
    lr: float
    warmup: int
    seq_len: int  # packed row length
    rows_per_step: int
    max_new_tokens: int
    bf16: bool
    lora_rank: int | None  # None: full fine-tuning; else LoRA (13-02) on every linear layer
    lora_alpha: float = 32.0


SFT_RECIPES = {
    "smoke": SFTRecipe(n_per_task=8, n_heldout_per_task=4, n_alpaca_heldout=8, mix_size=64,
                       temperature=2.0, steps=4, ablation_steps=2, lr=1e-3, warmup=1, seq_len=128,
                       rows_per_step=2, max_new_tokens=8, bf16=False, lora_rank=4),
    "tiny": SFTRecipe(n_per_task=300, n_heldout_per_task=200, n_alpaca_heldout=24,
                      mix_size=3000, temperature=2.0, steps=24, ablation_steps=5, lr=1e-3,
                      warmup=3, seq_len=256, rows_per_step=2, max_new_tokens=32, bf16=False,
                      lora_rank=16),
    "full": SFTRecipe(n_per_task=2000, n_heldout_per_task=500, n_alpaca_heldout=200,
                      mix_size=20000, temperature=2.0, steps=1200, ablation_steps=150, lr=2e-5,
                      warmup=50, seq_len=1024, rows_per_step=8, max_new_tokens=64, bf16=True,
                      lora_rank=None),
}


# %% [markdown]
# Packing changes which tokens share a forward pass, never what each token sees: the loss of a
# packed batch equals the loss of the same examples padded (checked first, on one batch). Then
# throughput: a few steps of each mode on the profile's chat LM, counting only real tokens.

# %%
RECIPE = pick(PROFILE, SFT_RECIPES)
conversations_mix = [e["messages"] for e in synthetic_train] + [conversations[i] for i in kept]
seq_len = RECIPE.seq_len  # the longest example kept
sft_examples = tokenize_for_sft(lm_tokenizer, conversations_mix, max_len=seq_len)
same = sft_examples[:12]
with torch.no_grad():
    padded = pad_examples(same, lm_tokenizer.pad_token_id)
    padded_logits = lm(input_ids=padded["input_ids"],
                       attention_mask=padded["attention_mask"]).logits
    padded_loss, n_same = sft_loss(padded_logits, padded["labels"])
    low, high = padded_logits.aminmax()
    # Each cross-entropy moves by at most twice the logits' rounding (log-sum-exp and the target
    # logit), plus its own log-softmax rounding; the mean of n_same of them adds (A.1). Twice
    # that for two computations.
    loss_tolerance = 2 * (transformer_tolerance(lm.config, seq_len, max(-low.item(), high.item()))
                          + log_softmax_tolerance(padded_logits)
                          + rounding_bound(n_same, float(padded_loss)))
    del padded_logits
    packed = pack_examples(same, seq_len, lm_tokenizer.pad_token_id)
    packed_loss, _ = sft_loss(lm(input_ids=packed["input_ids"],
                                 position_ids=packed["position_ids"],
                                 attention_mask=packed_attention_mask(packed["document_ids"])
                                 ).logits, packed["labels"], packed["document_ids"])
print(f"loss of the same 12 examples: padded {padded_loss:.6f}, packed {packed_loss:.6f} "
      f"(rounding tolerance {loss_tolerance:.1e})")
assert abs(padded_loss - packed_loss) <= loss_tolerance



def trainable_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` with what the recipe trains: LoRA adapters (13-02) or every weight."""
    model = copy.deepcopy(model).to(DEVICE)
    if RECIPE.lora_rank is None:
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=RECIPE.lora_rank, lora_alpha=RECIPE.lora_alpha,
                                            lora_dropout=0.0, target_modules="all-linear"))


probe_steps = pick(PROFILE, {"smoke": 3, "tiny": 3, "full": 20})
runs = {}
for packing in (False, True):
    runs["packed" if packing else "padded"] = sft_train(
        trainable_copy(lm), sft_examples, steps=probe_steps, lr=0.0, seq_len=seq_len,
        pad_token_id=lm_tokenizer.pad_token_id, packing=packing, seed=SEED,
        examples_per_step=4 * RECIPE.rows_per_step, rows_per_step=RECIPE.rows_per_step,
        bf16=RECIPE.bf16, desc="packed" if packing else "padded")
speed = pd.DataFrame({name: {"token utilization": log.utilization,
                             "real tokens / s": log.tokens_per_second}
                      for name, log in runs.items()}).T
show_table(speed, "packing", CHAPTER)
print(f"packing: utilization {runs['padded'].utilization:.2f} -> {runs['packed'].utilization:.2f}"
      f", real-token throughput x{runs['packed'].tokens_per_second / runs['padded'].tokens_per_second:.2f}")

# %% [markdown]
# ### Parity with TRL's `SFTTrainer` data pipeline
#
# TRL's `SFTTrainer` with a prompt-completion dataset and `completion_only_loss=True` tokenizes
# prompt and completion, appends EOS when the completion lacks it, and masks the prompt with
# $-100$. We give it the same (prompt, output) strings and compare its input ids and labels with
# `tokenize_for_sft`, then compare our loss, eq. (6.1), with the mean next-token cross-entropy
# over TRL's labels that its loss computes. (TRL 1.15 computes that loss with a fused Triton
# kernel that needs a GPU: `SFTTrainer.compute_loss` fails on a CPU-only PyTorch, so the last
# step of the comparison uses transformers' loss on the same batch instead.)

# %%
import tempfile
import warnings

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

pairs = [conversation_to_prompt_and_output(lm_tokenizer, c) for c in conversations_mix[:8]]
with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
    warnings.simplefilter("ignore")
    trainer = SFTTrainer(
        model=copy.deepcopy(lm), processing_class=lm_tokenizer,
        train_dataset=Dataset.from_dict({"prompt": [p for p, _ in pairs],
                                         "completion": [o for _, o in pairs]}),
        args=SFTConfig(output_dir=folder, completion_only_loss=True, report_to=[],
                       max_length=seq_len, use_cpu=True, per_device_train_batch_size=8))
    trl_rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
ours_rows = tokenize_for_sft(lm_tokenizer, conversations_mix[:8], max_len=seq_len)
same_ids = all(r["input_ids"] == ids for r, (ids, _) in zip(trl_rows, ours_rows, strict=True))
same_labels = all(r["labels"] == labels for r, (_, labels) in zip(trl_rows, ours_rows, strict=True))
trl_batch = trainer.data_collator(trl_rows)
with torch.no_grad():
    out = lm(input_ids=trl_batch["input_ids"], attention_mask=trl_batch["attention_mask"],
             labels=trl_batch["labels"])
    ours_loss, n_trl = sft_loss(out.logits, trl_batch["labels"])
# the same cross-entropies of the same logits by two code paths: a log-softmax's rounding and
# (A.1) for the mean of n_trl tokens, on each side
ce_tolerance = 2 * (log_softmax_tolerance(out.logits) + rounding_bound(n_trl, float(ours_loss)))
print(f"TRL vs ours on 8 conversations: input ids identical {same_ids}, labels identical "
      f"{same_labels}; loss {ours_loss:.6f} (ours) vs {out.loss:.6f} (mean CE over TRL's labels, "
      f"rounding tolerance {ce_tolerance:.1e})")
assert same_ids and same_labels and abs(ours_loss - out.loss) <= ce_tolerance

# %% [markdown]
# ## Generation and evaluation
#
# To evaluate, the model answers held-out prompts: the chat template renders the user turn up to
# the assistant header (`render_prompt`), `generate` continues it, and we record the reply, whether
# it ended with EOS within the token budget, and, for tasks with a single answer, whether it is
# exactly right. Sampling (for 13-07 to 13-09) draws from the model's distribution itself:
# temperature 1 with top-k and top-p switched off, so that sampled log-probabilities are the
# policy's.

# %%
#| export
import copy


def render_prompt(tokenizer: Any, user_text: str) -> str:
    """The chat-template string of one user turn, up to and including the assistant header."""
    return tokenizer.apply_chat_template([{"role": "user", "content": user_text}],
                                         add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def sample_replies(model: nn.Module, tokenizer: Any, prompt_strs: Sequence[str], *,
                   max_new_tokens: int, do_sample: bool, temperature: float = 1.0, seed: int = 0,
                   batch_size: int = 32) -> list[dict]:
    """One reply per rendered prompt: `text` (special tokens removed), `ids` (the generated ids,
    EOS included when produced) and `finished` (True when the reply ended with EOS). Greedy or
    pure sampling (no top-k, no top-p); the tokenizer pads on the left."""
    if tokenizer.padding_side != "left":
        raise ValueError("generation needs a tokenizer that pads on the left")
    device = next(model.parameters()).device
    model.eval()
    torch.manual_seed(seed)
    eos, replies = tokenizer.eos_token_id, []
    for start in range(0, len(prompt_strs), batch_size):
        batch = tokenizer(list(prompt_strs[start:start + batch_size]), return_tensors="pt",
                          padding=True, add_special_tokens=False).to(device)
        sampling = {"temperature": temperature, "top_k": 0, "top_p": 1.0} if do_sample else {}
        generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                                   **sampling)  # (batch, prompt + new)
        for row in generated[:, batch["input_ids"].shape[1]:].tolist():
            ids = row[:row.index(eos) + 1] if eos in row else row
            replies.append({"text": tokenizer.decode(ids, skip_special_tokens=True).strip(),
                            "ids": ids, "finished": eos in row})
    return replies


def generate_responses(model: nn.Module, tokenizer: Any, prompt_strs: Sequence[str], *,
                       max_new_tokens: int, do_sample: bool, temperature: float = 1.0,
                       seed: int = 0, batch_size: int = 32) -> list[str]:
    """The decoded replies of `sample_replies`."""
    return [r["text"] for r in sample_replies(
        model, tokenizer, prompt_strs, max_new_tokens=max_new_tokens, do_sample=do_sample,
        temperature=temperature, seed=seed, batch_size=batch_size)]


def evaluate_tasks(model: nn.Module, tokenizer: Any, examples: Sequence[dict], *,
                   max_new_tokens: int, batch_size: int = 32) -> list[dict]:
    """Greedy replies to held-out synthetic examples: per example its `category`, `reply`,
    `finished` (ended with EOS) and `correct` (exact answer; None for the review tasks)."""
    prompts = [render_prompt(tokenizer, e["messages"][0]["content"]) for e in examples]
    replies = sample_replies(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                             do_sample=False, batch_size=batch_size)
    return [{"category": e["category"], "reply": r["text"], "finished": r["finished"],
             "correct": None if e["answer"] is None else answer_is_correct(r["text"], e["answer"])}
            for e, r in zip(examples, replies, strict=True)]


@torch.no_grad()
def heldout_loss(model: nn.Module, examples: Sequence[tuple[list[int], list[int]]],
                 pad_token_id: int, batch_size: int = 32) -> float:
    """Eq. (6.1) over all `examples` (response tokens only), in padded batches."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = pad_examples(examples[start:start + batch_size], pad_token_id)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        loss, n = sft_loss(logits, batch["labels"].to(device))
        total, count = total + float(loss) * n, count + n
    return total / max(count, 1)


@torch.no_grad()
def shared_prefix_cache(model: nn.Module, rows: Sequence[Sequence[int]], limit: int
                        ) -> tuple[int, Any]:
    """(k, cache): the length k <= `limit` of the token prefix that all `rows` share, and the
    key/value cache of `model` (a causal LM or its transformer) on it, batch 1; (0, None) when
    nothing is shared."""
    shared, head = 0, rows[0]
    while shared < limit and all(r[shared] == head[shared] for r in rows):
        shared += 1
    if shared == 0:
        return 0, None
    device = next(model.parameters()).device
    prefix = torch.tensor([list(head[:shared])], device=device)  # (1, shared)
    return shared, model(input_ids=prefix, use_cache=True).past_key_values


def repeat_cache(cache: Any, batch_size: int) -> Any:
    """A copy of a batch-1 key/value `cache` repeated `batch_size` times (the forward pass
    extends the cache it is given, so every batch needs its own)."""
    cache = copy.deepcopy(cache)
    cache.batch_repeat_interleave(batch_size)
    return cache


@torch.no_grad()
def teacher_forced_scores(model: nn.Module, tokenizer: Any,
                          conversations: Sequence[Sequence[dict]], *, max_len: int = 512,
                          batch_size: int = 32, share_prefix: bool = True) -> list[dict]:
    """Teacher-forced scores of each conversation's final reply, its end-of-turn token included:
    `nll` (summed over the reply's tokens), `tokens` (their number) and `greedy` (True when each
    reply token is the model's arg-max given everything before it: greedy decoding would write
    exactly this reply, in this tokenization, and stop). One forward pass per batch of
    conversations sorted by length; with `share_prefix`, the longest token prefix that all
    conversations share (the system prompt and headers) is encoded once and its key/value cache
    reused by every batch."""
    examples = tokenize_for_sft(tokenizer, conversations, max_len)
    first_label = [next(t for t, y in enumerate(labels) if y != -100) for _, labels in examples]
    model.eval()
    # stop one token before the earliest reply: its logit predicts the reply
    shared, prefix_cache = shared_prefix_cache(
        model, [ids for ids, _ in examples], min(first_label) - 1 if share_prefix else 0)
    device = next(model.parameters()).device
    scores: list[dict] = [{}] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = pad_examples([(examples[i][0][shared:], examples[i][1][shared:]) for i in rows],
                             tokenizer.pad_token_id)
        mask = batch["attention_mask"].to(device)  # (b, L)
        kwargs = {}
        if prefix_cache is not None:
            kwargs["past_key_values"] = repeat_cache(prefix_cache, len(rows))
            mask = torch.cat([mask.new_ones(len(rows), shared), mask], dim=1)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=mask,
                       **kwargs).logits[:, :-1].float()  # (b, L - 1, vocab)
        targets = batch["labels"][:, 1:].to(device)  # (b, L - 1)
        on_reply = targets != -100
        nll = nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100,
                                          reduction="none")  # (b, L - 1), 0 off the reply
        greedy = ((logits.argmax(-1) == targets) | ~on_reply).all(dim=1)
        for row, i in enumerate(rows):
            scores[i] = {"nll": float(nll[row].sum()), "tokens": int(on_reply[row].sum()),
                         "greedy": bool(greedy[row])}
    return scores


# %% [markdown]
# ## The SFT recipe
#
# One function builds the training data of a profile: synthetic tasks from SST-2's training
# sentences, the filtered Alpaca records (a held-out slice set aside), drawn into a mixture of
# `mix_size` examples with temperature $T$; another trains the chat LM on it; a third saves the
# result where 13-07 to 13-10 load it (`load_sft_model`, which trains and saves first when the
# cache is empty). The cache folder is keyed by the recipe, so a changed recipe never loads a stale
# model.

# %%
#| export
import json

from ftbook.base_models import attention_implementation, build_once, chat_lm_name, load_chat_lm
from ftbook.workbench import cache_dir, seed_everything


def build_sft_data(recipe: SFTRecipe, seed: int = 0) -> dict[str, Any]:
    """The profile's SFT data: `synthetic_train` / `synthetic_heldout` (dicts of
    `synthetic_instructions`), `alpaca_train` / `alpaca_heldout` (conversations that passed every
    filter), and `alpaca_removed` (what each filter removed) and `alpaca_malformed` (count)."""
    from ftbook.data import (  # lazy: ftbook.data imports `datasets`
        DataFormatError,
        load_alpaca,
        load_sst2,
    )

    train, dev = load_sst2("train"), load_sst2("validation")
    synthetic_train = synthetic_instructions(train["sentence"], train["label"], recipe.n_per_task,
                                             seed=seed)
    seen = {e["messages"][0]["content"] for e in synthetic_train}
    synthetic_heldout = synthetic_instructions(dev["sentence"], dev["label"],
                                               recipe.n_heldout_per_task, seed=seed + 1,
                                               exclude=seen)
    conversations, malformed = [], 0
    for i, record in enumerate(load_alpaca()):
        try:
            conversations.append(from_alpaca(record, i))
        except DataFormatError:
            malformed += 1
    kept, removed = filter_conversations(conversations, seed=seed)
    random.Random(seed).shuffle(kept)
    held = kept[:recipe.n_alpaca_heldout]
    return {"synthetic_train": synthetic_train, "synthetic_heldout": synthetic_heldout,
            "alpaca_train": [conversations[i] for i in kept[recipe.n_alpaca_heldout:]],
            "alpaca_heldout": [conversations[i] for i in held], "alpaca_removed": removed,
            "alpaca_malformed": malformed}


def sft_mixture(data: dict[str, Any], recipe: SFTRecipe, temperature: float, seed: int = 0
                ) -> list[list[dict]]:
    """`recipe.mix_size` training conversations drawn with `mixture_weights(temperature)` over
    the synthetic tasks and Alpaca (each one category)."""
    groups: dict[str, list] = {"alpaca": data["alpaca_train"]}
    for e in data["synthetic_train"]:
        groups.setdefault(e["category"], []).append(e["messages"])
    weights = mixture_weights({c: len(g) for c, g in groups.items()}, temperature)
    return build_mixture(groups, weights, recipe.mix_size, seed)


def train_sft_model(profile: str, conversations: Sequence[Sequence[dict]], *,
                    device: torch.device | None = None, steps: int | None = None, seed: int = 0,
                    curriculum: bool = False,
                    callback: Callable[[int, nn.Module], None] | None = None,
                    start: tuple[nn.Module, Any] | None = None,
                    desc: str = "SFT") -> tuple[nn.Module, Any, SFTLog]:
    """SFT of the profile's chat LM (or of a copy of `start` = (model, tokenizer)) on
    `conversations` (packed, eq. 6.1), reading them in a seeded shuffle or, with `curriculum`,
    from the fewest response tokens to the most. With `recipe.lora_rank`, LoRA adapters on every
    linear layer are trained and merged at the end. `steps` below the recipe's makes this the
    first `steps` steps of the recipe's run (same learning-rate schedule)."""
    recipe = pick(profile, SFT_RECIPES)
    seed_everything(seed)
    if start is None:
        model, tokenizer = load_chat_lm(profile, device)
    else:
        model, tokenizer = copy.deepcopy(start[0]).to(device or torch.device("cpu")), start[1]
    if recipe.lora_rank is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=recipe.lora_rank, lora_alpha=recipe.lora_alpha, lora_dropout=0.0,
            target_modules="all-linear"))
    examples = tokenize_for_sft(tokenizer, conversations, max_len=recipe.seq_len)
    order = None
    if curriculum:
        order = curriculum_order([sum(t != -100 for t in labels) for _, labels in examples], seed)
    log = sft_train(model, examples, steps=steps or recipe.steps, lr=recipe.lr,
                    seq_len=recipe.seq_len, pad_token_id=tokenizer.pad_token_id, packing=True,
                    seed=seed, rows_per_step=recipe.rows_per_step, bf16=recipe.bf16,
                    warmup=recipe.warmup, schedule_steps=recipe.steps, order=order,
                    callback=callback, desc=desc)
    if recipe.lora_rank is not None:
        model = model.merge_and_unload()  # W + (alpha / r) B A, a plain model again
    tokenizer.padding_side = "left"  # for generation
    return model.eval(), tokenizer, log


SFT_FORMAT = 2  # bump to invalidate every cached SFT model


def sft_model_path(profile: str) -> Any:
    """The cache folder of the profile's SFT model, keyed by its recipe and chat LM."""
    recipe = pick(profile, SFT_RECIPES)
    key = hashlib.sha256(f"{recipe}|{chat_lm_name(profile)}|{SFT_FORMAT}".encode())
    return cache_dir("13_06_instruction_tuning") / f"sft-{profile}-{key.hexdigest()[:12]}"


def save_sft_model(model: nn.Module, tokenizer: Any, profile: str, log: SFTLog) -> Any:
    """Save with `save_pretrained` (model, tokenizer) plus the training log, where
    `load_sft_model` finds it; written to a temporary folder and renamed, so that an interrupted
    save leaves no half-written model."""
    def write(folder: Any) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "sft_log.json").write_text(json.dumps({
            "losses": log.losses, "response_tokens": log.response_tokens,
            "utilization": log.utilization, "tokens_per_second": log.tokens_per_second}))

    return build_once(sft_model_path(profile), write)


def load_sft_model(profile: str, device: torch.device | None = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of the profile's SFT model, loaded with `from_pretrained` from the
    cache; trained with the chapter's recipe and saved first when the cache has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = sft_model_path(profile)
    if not folder.is_dir():
        recipe = pick(profile, SFT_RECIPES)
        mixture = sft_mixture(build_sft_data(recipe), recipe, recipe.temperature)
        model, tokenizer, log = train_sft_model(profile, mixture, device=device)
        save_sft_model(model, tokenizer, profile, log)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation=attention_implementation(profile))
    return model.to(device or torch.device("cpu")).eval(), tokenizer


# %% [markdown]
# ## Experiments
#
# **SFT of the chat LM.** The profile's recipe: the mixture at $T = 2$, packed rows, AdamW with
# a warmup and a cosine decay. In the tiny profile the model is SmolLM2-135M-Instruct
# (Appendix C), already instruction-tuned by its authors, and the update is LoRA (13-02, rank 16
# on every linear layer), merged into the weights at the end; the full profile fine-tunes every
# weight of Qwen2.5-0.5B. We evaluate the chat LM before and after SFT on the same held-out
# prompts (SST-2 validation sentences; arithmetic problems not seen in training):
#
# - *exact match* on the four tasks with a single answer, scored teacher-forced with
#   `teacher_forced_scores`: a reply counts as right when greedy decoding would write exactly the
#   answer and stop. One forward pass per prompt instead of a decoding loop; the check below
#   compares it with real greedy generation;
# - eq. (6.1) on the held-out replies of those tasks and of held-out Alpaca records;
# - from real greedy generation on a probe of review prompts: the share of replies that end
#   with the end-of-turn token within the token budget, and the share that are junk
#   (a placeholder or a refusal, `format_problem`).

# %%
import matplotlib.pyplot as plt

from ftbook.workbench import Timer, binomial_interval, show_figure

data = build_sft_data(RECIPE, SEED)
mixture = sft_mixture(data, RECIPE, RECIPE.temperature, SEED)
CHECKABLE = ("sentiment", "arithmetic", "copy", "uppercase")
heldout = [e for e in data["synthetic_heldout"] if e["category"] in CHECKABLE]
lm_tokenizer.padding_side = "left"  # generation pads on the left
n_probe = pick(PROFILE, {"smoke": 4, "tiny": 16, "full": 64})
probe = [e for e in data["synthetic_heldout"] if e["category"] == "review"][:n_probe] + [
    e for e in data["synthetic_heldout"] if e["category"] == "continue"][:n_probe]
samples_of = {t: next(e for e in data["synthetic_heldout"] if e["category"] == t)
              for t in SYNTHETIC_TASKS}
print(f"held-out: {len(heldout)} prompts with an exact answer "
      f"({RECIPE.n_heldout_per_task} per task), {len(data['alpaca_heldout'])} Alpaca records, "
      f"{len(probe)} review prompts for generation")


def evaluate(model, tokenizer, per_task: int, n_alpaca: int, n_generate: int,
             max_new_tokens: int) -> dict:
    """Held-out exact match per task (teacher-forced), eq. (6.1) on the synthetic and Alpaca
    replies, and the EOS and junk rates of greedy replies to `n_generate` probe prompts."""
    examples, scores = [], []
    for task in CHECKABLE:  # one call per task: its instruction joins the shared prefix
        of_task = [e for e in heldout if e["category"] == task][:per_task]
        examples += of_task
        scores += teacher_forced_scores(model, tokenizer, [e["messages"] for e in of_task],
                                max_len=RECIPE.seq_len)
    alpaca_scores = teacher_forced_scores(model, tokenizer, data["alpaca_heldout"][:n_alpaca],
                                  max_len=RECIPE.seq_len)
    prompts = [render_prompt(tokenizer, e["messages"][0]["content"])
               for e in probe[:n_generate]]
    replies = sample_replies(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                             do_sample=False)
    junk = [format_problem([{"role": "assistant", "content": r["text"]}]) is not None
            for r in replies]
    rows = pd.DataFrame({"category": [e["category"] for e in examples],
                         "correct": [x["greedy"] for x in scores],
                         "nll": [x["nll"] for x in scores], "tokens": [x["tokens"] for x in scores]})
    return {"correct": rows.groupby("category")["correct"].sum().astype(int),
            "n": rows.groupby("category")["correct"].size(),
            "held-out loss (synthetic)": rows["nll"].sum() / rows["tokens"].sum(),
            "held-out loss (Alpaca)": sum(x["nll"] for x in alpaca_scores)
            / sum(x["tokens"] for x in alpaca_scores),
            "EOS rate": sum(r["finished"] for r in replies) / len(replies),
            "junk rate": sum(junk) / len(junk), "n generated": len(replies),
            "greedy": {e["messages"][0]["content"]: x["greedy"]
                       for e, x in zip(examples, scores, strict=True)}}


def full_evaluation(model, tokenizer) -> dict:
    return evaluate(model, tokenizer, RECIPE.n_heldout_per_task, RECIPE.n_alpaca_heldout,
                    len(probe), RECIPE.max_new_tokens)


# %% [markdown]
# Two checks of the scorer before we rely on it. Sharing the prefix's key/value cache changes
# how the forward pass is batched, never what a token sees, so the losses must agree with an
# unshared pass to rounding. And teacher-forced exact match must agree with the replies that
# greedy generation actually writes. It can disagree in two ways: generation may reach the
# answer through another tokenization of the same string, or stop after trailing white space
# that `answer_is_correct` strips. We count both directions.

# %%
check_set = [e["messages"] for e in heldout[:: max(1, len(heldout) // 24)]][:24]
with Timer() as scorer_time:
    shared_scores = teacher_forced_scores(lm, lm_tokenizer, check_set, max_len=RECIPE.seq_len)
unshared_scores = teacher_forced_scores(lm, lm_tokenizer, check_set, max_len=RECIPE.seq_len,
                                share_prefix=False)
gap = max(abs(a["nll"] / a["tokens"] - b["nll"] / b["tokens"])
          for a, b in zip(shared_scores, unshared_scores, strict=True))
# per token: two computations of the same logits (transformer_tolerance, logits of size up to
# 30) and a log-softmax each
prefix_tolerance = transformer_tolerance(lm.config, RECIPE.seq_len, 30.0) + 2 * \
    log_softmax_tolerance(torch.zeros(1, lm.config.vocab_size))
print(f"shared vs unshared prefix: largest per-token loss gap {gap:.2e} "
      f"(tolerance {prefix_tolerance:.1e}); {scorer_time.seconds:.1f} s for {len(check_set)}")
assert gap <= prefix_tolerance
assert [a["tokens"] for a in shared_scores] == [b["tokens"] for b in unshared_scores]

# %%
base_eval = full_evaluation(lm, lm_tokenizer)
snapshots = {}


def snapshot_at_ablation_length(step: int, model) -> None:
    """The T = 2 ablation run is the main run's first `ablation_steps` steps."""
    if step == RECIPE.ablation_steps:
        snapshots["T = 2"] = evaluate(model, lm_tokenizer, *ABLATION_EVAL)


ABLATION_EVAL = pick(PROFILE, {"smoke": (2, 4, 4, 8), "tiny": (20, 8, 8, 12),
                               "full": (100, 100, 64, 32)})
with Timer() as sft_time:
    sft_model, sft_tokenizer, sft_log = train_sft_model(
        PROFILE, mixture, device=DEVICE, seed=SEED, callback=snapshot_at_ablation_length,
        desc="SFT (T = 2)")
sft_eval = full_evaluation(sft_model, sft_tokenizer)
sft_folder = save_sft_model(sft_model, sft_tokenizer, PROFILE, sft_log)
print(f"SFT: {len(sft_log.losses)} steps in {sft_time.seconds:.0f} s, "
      f"{sum(sft_log.real_tokens):,} tokens, utilization {sft_log.utilization:.2f}, "
      f"{sft_log.tokens_per_second:,.0f} tokens/s; saved to {sft_folder.name}")


def exact_match(result: dict, task: str) -> tuple[int, int, float, float]:
    """(right, prompts, 95% interval) of one task's held-out exact match."""
    k, n = int(result["correct"][task]), int(result["n"][task])
    return (k, n, *binomial_interval(k, n))


def accuracy_cell(result: dict, task: str) -> str:
    k, n, low, high = exact_match(result, task)
    return f"{k / n:.2f} [{low:.2f}, {high:.2f}]"


summary_keys = ("held-out loss (synthetic)", "held-out loss (Alpaca)", "EOS rate", "junk rate")
before_after = pd.DataFrame({
    name: {f"exact match: {t}": accuracy_cell(result, t) for t in CHECKABLE}
    | {k: f"{result[k]:.3f}" for k in summary_keys}
    for name, result in (("chat LM", base_eval), ("after SFT", sft_eval))})
show_table(before_after, "before_after", CHAPTER)
print(f"exact match with 95% Wilson intervals on {RECIPE.n_heldout_per_task} held-out prompts "
      f"per task; EOS and junk rates on {base_eval['n generated']} greedy review replies")

fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot(sft_log.losses, lw=1)
ax.set(xlabel="step", ylabel="eq. (6.1), training batch", title=f"SFT of the chat LM ({PROFILE})")
show_figure(fig, "sft_loss", CHAPTER)

# %% [markdown]
# The scorer against real generation, on held-out prompts of the four tasks answered greedily by
# the SFT model:

# %%
agreement_set = [e for t in CHECKABLE for e in [x for x in heldout if x["category"] == t][:12]]
generated = sample_replies(
    sft_model, sft_tokenizer,
    [render_prompt(sft_tokenizer, e["messages"][0]["content"]) for e in agreement_set],
    max_new_tokens=RECIPE.max_new_tokens, do_sample=False)
generated_right = [answer_is_correct(r["text"], e["answer"])
                   for r, e in zip(generated, agreement_set, strict=True)]
forced_right = [sft_eval["greedy"][e["messages"][0]["content"]] for e in agreement_set]
agreement = pd.DataFrame({
    f"teacher-forced: {f_name}": {
        f"generated: {g_name}": sum(g == g_value and f == f_value
                                    for g, f in zip(generated_right, forced_right, strict=True))
        for g_name, g_value in (("right", True), ("wrong", False))}
    for f_name, f_value in (("right", True), ("wrong", False))})
show_table(agreement, "scorer_agreement", CHAPTER)

# %% [markdown]
# One held-out prompt per task, answered greedily by the chat LM and by the SFT model:

# %%
sample_prompts = [render_prompt(lm_tokenizer, e["messages"][0]["content"])
                  for e in samples_of.values()]
samples = pd.DataFrame({
    "prompt": [e["messages"][0]["content"][:70] for e in samples_of.values()],
    "chat LM": [r["text"][:70] for r in sample_replies(
        lm, lm_tokenizer, sample_prompts, max_new_tokens=RECIPE.max_new_tokens,
        do_sample=False)],
    "after SFT": [r["text"][:70] for r in sample_replies(
        sft_model, sft_tokenizer, sample_prompts, max_new_tokens=RECIPE.max_new_tokens,
        do_sample=False)]}, index=list(samples_of))
show_table(samples, "samples", CHAPTER)

# %% [markdown]
# **Mixing, curriculum and filtering.** Shorter runs, each the first `ablation_steps` steps of
# the recipe's run (same learning-rate schedule), all from the same chat LM with the same seed,
# each changing one thing:
#
# - the mixture temperature, $T = 1$ (natural: Alpaca dominates), $2$ and $\infty$ (uniform);
#   the $T = 2$ run is the main run itself, evaluated when it reaches `ablation_steps`;
# - the order: at $T = 2$, the curriculum (fewest response tokens first) against the shuffle;
# - the data: the $T = 2$ mixture with 30% of its conversations corrupted the way scraped
#   instruction data is (a placeholder reply, a refusal, or one record copied over and over),
#   trained on as is and after `filter_conversations`.
#
# They are evaluated on fewer held-out prompts (`ABLATION_EVAL`), so their intervals are wider.

# %%
import random


def corrupt(conversations: list, fraction: float, seed: int) -> list:
    """Replace `fraction` of the conversations by junk: a placeholder or refusal reply to the
    same prompt, or a copy of one fixed record (a duplicate cluster)."""
    rng = random.Random(seed)
    spam = conversations[0]
    noisy = []
    for conversation in conversations:
        u = rng.random()
        if u < fraction / 3:
            conversation = conversation[:-1] + [{"role": "assistant", "content": "<nooutput>"}]
        elif u < 2 * fraction / 3:
            conversation = conversation[:-1] + [{"role": "assistant", "content":
                                                 "As an AI language model, I cannot do that."}]
        elif u < fraction:
            conversation = spam
        noisy.append(conversation)
    return noisy


noisy_mixture = corrupt(mixture, 0.3, SEED)
filtered_idx, noisy_removed = filter_conversations(noisy_mixture, seed=SEED)
print(f"corrupted mixture: {len(noisy_mixture)} conversations; the filters remove "
      + ", ".join(f"{len(v)} ({k})" for k, v in noisy_removed.items() if v)
      + f"; {len(filtered_idx)} kept")
ablations = {
    "T = 1": dict(conversations=sft_mixture(data, RECIPE, 1.0, SEED)),
    "T = 2": dict(conversations=mixture),
    "T = inf": dict(conversations=sft_mixture(data, RECIPE, 1e9, SEED)),
    "T = 2, curriculum": dict(conversations=mixture, curriculum=True),
    "T = 2, 30% junk": dict(conversations=noisy_mixture),
    "T = 2, 30% junk, filtered": dict(conversations=[noisy_mixture[i] for i in filtered_idx]),
}
ablation_results = {}
alpaca_ids = {id(c) for c in data["alpaca_train"]}
for name, run in ablations.items():
    if name in snapshots:
        result = snapshots[name]
    else:
        model, tokenizer, _ = train_sft_model(
            PROFILE, run["conversations"], device=DEVICE, steps=RECIPE.ablation_steps,
            seed=SEED, curriculum=run.get("curriculum", False), start=(lm, lm_tokenizer),
            desc=name)
        result = evaluate(model, tokenizer, *ABLATION_EVAL)
        del model
    alpaca_share = sum(id(c) in alpaca_ids for c in run["conversations"]) / len(run["conversations"])
    ablation_results[name] = {"Alpaca share": alpaca_share} | {
        k: result[k] for k in summary_keys} | {
        f"exact match: {t}": result["correct"][t] / result["n"][t] for t in CHECKABLE}
ablation_table = pd.DataFrame(ablation_results).T
show_table(ablation_table, "ablations", CHAPTER, floatfmt="{:.3f}")
n_ablation = ABLATION_EVAL[0]
half_width = max(binomial_interval(round(n_ablation / 2), n_ablation)[1] - 0.5, 0.0)
print(f"exact match on {n_ablation} prompts per task: a 95% interval is up to "
      f"+-{half_width:.2f} wide")

fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
ablation_table[[f"exact match: {t}" for t in CHECKABLE]].plot.barh(ax=axes[0])
axes[0].set(xlabel="held-out exact match", xlim=(0, 1))
axes[0].invert_yaxis()
ablation_table[["held-out loss (synthetic)", "held-out loss (Alpaca)"]].plot.barh(ax=axes[1])
axes[1].set(xlabel="eq. (6.1), held out")
axes[1].invert_yaxis()
axes[1].set_yticklabels([])
fig.tight_layout()
show_figure(fig, "ablations", CHAPTER)


# %% [markdown]
# ## Results and discussion
#
# **Two starting points.** The tiny profile starts from an *instruct* model: SmolLM2-135M-Instruct
# has already been through SFT and DPO by its authors, and no base model of this size installs
# offline. The full profile starts from the *base* Qwen2.5-0.5B, as InstructGPT starts from a
# pretrained GPT-3. So in the tiny profile SFT adapts an assistant to new tasks and formats; in
# the full profile it makes an assistant out of a language model.
#
# **What SFT changed.** The lines below read the before-and-after table and the samples: exact
# match before SFT, the tasks whose exact match rose beyond both 95% intervals, the form of the
# sentiment sample, the EOS rate of the review replies, and the held-out loss of eq. (6.1).

# %%
def reply_form(text: str) -> str:
    """How a sentiment reply looks: a bare label, an empty reply, or its number of words."""
    if text.strip() in ("positive", "negative"):
        return "a bare label"
    return f"{len(text.split())} words" if text.strip() else "an empty reply"


base_right = sum(exact_match(base_eval, t)[0] for t in CHECKABLE)
base_prompts = sum(exact_match(base_eval, t)[1] for t in CHECKABLE)
print(f"chat LM: {base_right} of {base_prompts} held-out answers exactly right (largest upper "
      f"end of a task's 95% interval: {max(exact_match(base_eval, t)[3] for t in CHECKABLE):.1%})")
gains = {t: exact_match(sft_eval, t) for t in CHECKABLE
         if exact_match(sft_eval, t)[2] > exact_match(base_eval, t)[3]}
print("after SFT, exact match rises beyond both intervals on: " + (", ".join(
    f"{t} {k / n:.0%} [{lo:.0%}, {hi:.0%}]" for t, (k, n, lo, hi) in gains.items()) or "no task"))
print(f"sentiment sample: the chat LM writes {reply_form(samples.loc['sentiment', 'chat LM'])}, "
      f"the SFT model {reply_form(samples.loc['sentiment', 'after SFT'])}")
print(f"review replies ending with EOS within {RECIPE.max_new_tokens} tokens: "
      f"{round(base_eval['EOS rate'] * base_eval['n generated'])} -> "
      f"{round(sft_eval['EOS rate'] * sft_eval['n generated'])} of {sft_eval['n generated']}")
loss_before, loss_after = (base_eval["held-out loss (Alpaca)"], sft_eval["held-out loss (Alpaca)"])
print(f"held-out loss, nats per token: synthetic "
      f"{base_eval['held-out loss (synthetic)']:.2f} -> {sft_eval['held-out loss (synthetic)']:.2f}"
      f"; Alpaca ({RECIPE.n_alpaca_heldout} records) {loss_before:.2f} -> {loss_after:.2f} "
      f"({'falls' if loss_after < loss_before else 'does not fall'})")

# %% [markdown]
# The first line is the chat model before SFT; when a task's count is zero, its interval's upper
# end is what the number of prompts per task can resolve. A low count does not mean the model
# cannot read the prompts: the chat LM column of the samples table shows what it writes instead,
# and a sentence or a worked line counts as wrong however sensible it is. Exact match measures
# the form of the answer first. The EOS line says the same of the review continuations: a reply
# that runs past the token budget has not learned where the turn ends.
#
# SFT here is the short run of the line printed after training (steps, tokens, seconds). The
# tasks named in the second line gained beyond both intervals; a bare-label sentiment sample and
# a higher EOS count mean the model learned the asked-for form and when to stop. The synthetic
# held-out loss measures the new tasks. The Alpaca loss measures general instruction following,
# on few records and without an interval: if it does not rise, the new tasks did not cost the
# model that, as far as this loss can tell, and a small change either way is no evidence.
#
# **What it did not change.** Exact match on sentiment is compared with the majority-label rate
# of its held-out prompts (what answering always the more frequent label would score), and
# arithmetic and uppercase with copying: the same format, but a skill on top of it.

# %%
sentiment_answers = [e["answer"] for e in heldout
                     if e["category"] == "sentiment"][:RECIPE.n_heldout_per_task]
majority = max(sentiment_answers.count(a) for a in ("positive", "negative")) / len(sentiment_answers)
k, n, lo, hi = exact_match(sft_eval, "sentiment")
verdict = ("includes it: no better than chance" if lo <= majority <= hi
           else "lies above it" if lo > majority else "lies below it")
print(f"sentiment after SFT: {k / n:.2f} [{lo:.2f}, {hi:.2f}]; majority-label rate "
      f"{majority:.2f}: the interval {verdict}")
copy_low = exact_match(sft_eval, "copy")[2]
for task in ("arithmetic", "uppercase"):
    k, n, lo, hi = exact_match(sft_eval, task)
    print(f"{task} after SFT: {k / n:.2f} [{lo:.2f}, {hi:.2f}], "
          f"{'below' if hi < copy_low else 'not below'} copy's interval")
disagree = int(agreement.loc["generated: right", "teacher-forced: wrong"]
               + agreement.loc["generated: wrong", "teacher-forced: right"])
print(f"scorer check: teacher-forced and generated exact match disagree on {disagree} of "
      f"{len(agreement_set)} held-out prompts")

# %% [markdown]
# An interval that includes the majority-label rate means the model learned the label format,
# not how to read reviews better than chance. An arithmetic or uppercase interval below copy's
# means the short run taught the format (a bare number, a line in capitals) without the skill:
# computing the result, spelling every word in capitals. The scorer check counts the prompts on
# which teacher-forced exact match and the replies that greedy generation actually wrote
# disagree (the agreement table); at zero, the exact-match numbers above are what generation
# would score.
#
# **Mixing, curriculum and filtering** ran for `ablation_steps` steps each and were scored on
# fewer prompts per task, so an exact-match difference needs to be large to mean anything (the
# printed half-width of a 95% interval near one half). The lines below state, for each
# comparison, what holds beyond the intervals; the losses have no interval and are compared by
# rank only.

# %%
def ablation_match(name: str, task: str) -> tuple[int, float, float]:
    """(right, 95% interval) of one ablation's exact match on `n_ablation` prompts."""
    k = round(ablation_table.loc[name, f"exact match: {task}"] * n_ablation)
    return (k, *binomial_interval(k, n_ablation))


def apart(a: str, b: str, task: str) -> bool:
    """Whether the exact-match intervals of runs a and b on `task` do not overlap."""
    _, lo_a, hi_a = ablation_match(a, task)
    _, lo_b, hi_b = ablation_match(b, task)
    return hi_a < lo_b or hi_b < lo_a


print(f"ablations: {RECIPE.ablation_steps} steps each, exact match on {n_ablation} prompts "
      "per task")
temperatures = ["T = 1", "T = 2", "T = inf"]
synthetic_loss = ablation_table.loc[temperatures, "held-out loss (synthetic)"]
alpaca_loss = ablation_table.loc[temperatures, "held-out loss (Alpaca)"]
print(f"T = 1: Alpaca is {ablation_table.loc['T = 1', 'Alpaca share']:.0%} of the mixture; "
      f"sentiment {ablation_match('T = 1', 'sentiment')[0]}/{n_ablation} against "
      f"{ablation_match('T = 2', 'sentiment')[0]}/{n_ablation} at T = 2 (intervals "
      f"{'apart' if apart('T = 1', 'T = 2', 'sentiment') else 'overlap'}); of the three "
      f"temperatures, highest synthetic loss at {synthetic_loss.idxmax()}, lowest Alpaca loss at "
      f"{alpaca_loss.idxmin()}")
differ = [t for t in CHECKABLE if apart("T = 2", "T = inf", t)]
print(f"T = 2 against T = inf: exact match differs beyond the intervals on "
      f"{', '.join(differ) or 'no task'}")
loss_rank = ablation_table[["held-out loss (synthetic)", "held-out loss (Alpaca)"]].rank(
    ascending=False).loc["T = 2, curriculum"].astype(int)
print(f"curriculum: held-out loss rank {loss_rank.iloc[0]} (synthetic) and {loss_rank.iloc[1]} "
      f"(Alpaca) of {len(ablation_table)}, 1 the highest")
junk_runs = [name for name in ablation_table.index if ablation_table.loc[name, "junk rate"] > 0]
print(f"sentiment: {ablation_match('T = 2, 30% junk', 'sentiment')[0]}/{n_ablation} with 30% "
      f"junk, {ablation_match('T = 2, 30% junk, filtered', 'sentiment')[0]}/{n_ablation} after "
      f"filtering (intervals "
      f"{'apart' if apart('T = 2, 30% junk', 'T = 2, 30% junk, filtered', 'sentiment') else 'overlap'}"
      f"); junk replies generated in: {', '.join(junk_runs) or 'no run'}")

# %% [markdown]
# - At $T = 1$ Alpaca keeps its natural, largest share (printed), so in a few steps the
#   synthetic formats get the smallest part of the budget. If $T = 1$ has the highest synthetic
#   loss and the lowest Alpaca loss, that is the trade-off of eq. (6.6); its sentiment difference
#   from $T = 2$ means something only where the intervals are apart. Between $T = 2$ and $T = \infty$, the second line names the tasks that
#   differ beyond the noise of the few prompts, if any.
# - The curriculum's first steps see only the shortest answers (labels and numbers), so it has
#   not yet met a copy, an uppercase phrase or a review; high held-out losses (rank 1 is the
#   worst of the table) are what that predicts. A curriculum cut short by the budget is a
#   different mixture; Bengio et al. (2009) train to convergence.
# - 30% junk replaces almost a third of the real data, and the filters remove it. If no run
#   generates a junk reply, the model has not learned to answer with a placeholder or a refusal
#   in these few steps, and the damage is the lost data, not learned junk.
#
# **Packing** raised the share of real tokens in the batch (the packing line and table above).
# Whether real-token throughput rises by more or less than that ratio depends on the machine: a
# padded batch pays for the longest reply in every row, while a packed row is full and its dense
# block-diagonal mask is computed whole on a CPU.

# %%
utilization_gain = runs["packed"].utilization / runs["padded"].utilization
throughput_gain = runs["packed"].tokens_per_second / runs["padded"].tokens_per_second
print(f"packing: real-token throughput x{throughput_gain:.2f}, "
      f"{'more' if throughput_gain > utilization_gain else 'less'} than the utilization gain "
      f"x{utilization_gain:.2f}; measured over {probe_steps} steps per mode, the first excluded")

# %% [markdown]
# The throughput comes from a few short steps on a shared CPU and is noisy. On a GPU with a
# varlen attention kernel (FlashAttention's `cu_seqlens`), the masked blocks are skipped and the
# speedup approaches the utilisation ratio.

# %% [markdown]
# ## Pitfalls
#
# - **Pad equal to EOS.** Masking padding by token id then masks every EOS, and the model never
#   learns to stop; `conversation_to_prompt_and_output` refuses such a tokenizer.
# - **Loss on the prompt.** Without `response_mask` the model is also trained to produce user
#   turns; eq. (6.1) sums over response tokens only.
# - **Tokenizing the reply on its own.** A SentencePiece tokenizer that adds a prefix space
#   turns the reply's first "hi" into "▁hi", a token the model never produces after the
#   assistant header at inference. CS336's `tokenize_prompt_and_output` tokenizes the two parts
#   separately by contract (fine for Qwen's byte-level BPE); `tokenize_for_sft` tokenizes the
#   whole conversation, as TRL does, and the parity check above compares the two pipelines.
# - **The reply's first token.** With a SentencePiece tokenizer, a reply that follows a bare
#   newline starts with a continuation piece: "positive" becomes `p`, `os`, `itive` instead of
#   the one token `▁positive` the pretrained model knows. Our first SFT runs on this template
#   answered with word fragments; the book's template now puts a space after each header
#   (Appendix C).
# - **Per-microbatch normalisation.** Dividing each microbatch by its own token count makes
#   gradient accumulation differ from the large batch (checked above); normalise by the batch's
#   response tokens.
# - **Packing without boundaries.** Concatenated examples that attend to each other, or continue
#   each other's positions, train on contexts that never occur at inference (checked above).
#
# ## Summary
#
# - Alpaca, Dolly and OpenAssistant records convert to one validated conversation schema; the
#   OpenAssistant converter follows the best-ranked path through the message tree.
# - The SFT helpers keep CS336 Assignment 5's contracts; with the normalising constant
#   $c = N / (G b)$, gradient accumulation reproduces the large batch exactly.
# - Packing with restarted positions and a block-diagonal mask gives every example the logits it
#   would have alone, and the loss of a packed batch equals that of the same examples padded.
# - MinHash estimates Jaccard similarity, eq. (6.4), and banded LSH turns it into an S-shaped
#   candidate probability, eq. (6.5); both checked by simulation.
# - SFT is measured before and after on held-out prompts: exact match with Wilson intervals,
#   held-out loss, and whether replies stop. A format (a bare label, a copy) can be learned in a
#   short run; a skill the model lacks does not come with it, and the results section says, from
#   the intervals, which tasks gained. Exact match is scored teacher-forced, one forward pass per
#   prompt, and checked against greedy generation.
# - Temperature sampling, eq. (6.6), sets each category's share of the budget, and so which
#   held-out loss falls; a curriculum truncated by the budget is a different mixture, of the
#   easiest examples; junk replaces real data, and the filters remove it.
# - The SFT model is saved with `save_pretrained`, keyed by its recipe; `load_sft_model` gives
#   13-07 to 13-10 the same model (and trains it when the cache is empty).
#
# ## Exercises
#
# 1. Pack with a best-fit instead of a greedy first-fit order. How much does the token
#    utilisation improve on the Alpaca sample?
# 2. Show that with $c$ fixed to 1, gradient accumulation equals the large batch exactly when
#    every row has the same number of response tokens, and only then.
# 3. Run the curriculum ablation for as many steps as it takes to consume the whole ordered
#    stream once. Does the order still hurt?
# 4. Replace the exact-duplicate filter by MinHash at threshold 0.9 on the corrupted mixture:
#    what does it remove that the exact filter misses, and what does it remove wrongly?
#
# ## References
#
# - Ouyang et al. (2022), *Training language models to follow instructions with human
#   feedback*, arXiv:2203.02155, §3.5 (SFT).
# - Taori et al. (2023), *Stanford Alpaca*; Conover et al. (2023), *Free Dolly*; Köpf et al.
#   (2023), *OpenAssistant Conversations*, arXiv:2304.07327.
# - Stanford CS336 (Spring 2025), Assignment 5: alignment and reasoning RL, §3 (SFT).
# - Arivazhagan et al. (2019), *Massively multilingual neural machine translation in the wild*,
#   arXiv:1907.05019, §4.2 (temperature sampling).
# - Bengio et al. (2009), *Curriculum learning*, ICML.
# - Broder (1997), *On the resemblance and containment of documents* (MinHash); Leskovec,
#   Rajaraman and Ullman, *Mining of Massive Datasets*, §3.4 (banded LSH).
