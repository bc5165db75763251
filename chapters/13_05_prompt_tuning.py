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
# (prompt-tuning)=
# # 13-05 Prompt tuning and prefix tuning
#
# ```{admonition} At a glance
# :class: tip
# **Prerequisites:** 8-04 (attention), 10-02 (prompting). **Reading time:** ~8 min; the tiny
# profile runs in about 2½ minutes on 2 CPU cores.
# **You will build** `ftbook.prompt_tuning`: soft prompts prepended to the input embeddings (three
# initialisations), prefix tuning with learned keys and values in every attention layer and the
# reparameterisation MLP of Li & Liang, a verbalizer harness that scores a causal LM as a
# classifier, and a discrete prompt search as the baseline; matched against PEFT to the last bit
# and working on encoders where PEFT refuses.
# ```
#
# LoRA (13-02) changes the weights. The methods of this chapter leave every weight alone and change
# what the frozen network *sees*. Prompt tuning (Lester et al. 2021, arXiv:2104.08691) learns $P$
# vectors that are prepended to the input like the embeddings of $P$ extra tokens. Prefix tuning
# (Li & Liang 2021, arXiv:2101.00190) learns $P$ extra keys and values in *every* attention layer.
# Per task, both store one small table ($P d$ or $2 L P d_{kv}$ numbers, kilobytes where a full
# fine-tune stores the whole model), and one batch can serve many tasks at once, each row with
# its own prompt.

# %%
from ftbook.workbench import device_cell, get_device, get_profile, pick, seed_everything

CHAPTER = "13_05_prompt_tuning"
PROFILE = get_profile()
SEED = 0
seed_everything(SEED)
DEVICE = get_device()
RUN_INFO = device_cell(PROFILE, SEED, DEVICE)

# %% [markdown]
# ## Prompt tuning: a soft prompt in the input
#
# A frozen model with token embeddings $e(\cdot)$ reads the sequence $e(x_1), \dots, e(x_T)$.
# Prompt tuning prepends a matrix $E \in \mathbb{R}^{P \times d}$ of free vectors:
#
# $$
# h^{(0)} = \big[\, E_1, \dots, E_P,\; e(x_1), \dots, e(x_T) \,\big] \in \mathbb{R}^{(P+T) \times d},
# \qquad \theta = E,\; |\theta| = P d .
# \tag{5.1}
# $$
#
# Everything else is unchanged: the attention mask gets $P$ ones in front, a causal LM's labels get
# $P$ ignored positions (`-100`), and the model's own loss is used. For a classifier, the head is
# trained too (it is new); for a causal LM we read the answer from the vocabulary (below), so $E$
# is all there is.
#
# **Initialisation.** Lester et al. (§3.2, Fig. 3b) compare three starts: random; embeddings of
# tokens sampled from the vocabulary; and embeddings of the class labels' words. Random vectors
# lie off the manifold of token embeddings, the other two start on it. We draw random vectors with
# the standard deviation of the embedding matrix, so that all three starts have the same scale.
#
# ## Prefix tuning: keys and values in every layer
#
# An attention head at layer $l$ maps queries $Q$ against keys $K = X^{(l)} W_K$ and values
# $V = X^{(l)} W_V$ of the $T$ positions. Prefix tuning puts $P$ learned key/value pairs in front,
# in every layer and head:
#
# $$
# K^{(l)} \leftarrow \big[K_P^{(l)};\, X^{(l)} W_K^{(l)}\big], \qquad
# V^{(l)} \leftarrow \big[V_P^{(l)};\, X^{(l)} W_V^{(l)}\big], \qquad
# K_P^{(l)}, V_P^{(l)} \in \mathbb{R}^{P \times d_{kv}},
# \tag{5.2}
# $$
#
# where $d_{kv}$ is the width of one layer's keys (the number of key/value heads times the head
# size; $d$ without grouped-query attention). Trained directly, the $2 L P d_{kv}$ numbers are
# unstable (Li & Liang §4.3, where performance drops without the trick). Li & Liang reparameterise
# them through a small MLP applied to a shorter table $E' \in \mathbb{R}^{P \times d_{kv}}$:
#
# $$
# \big[K_P^{(1)}, V_P^{(1)}, \dots, K_P^{(L)}, V_P^{(L)}\big] = W_2 \tanh(W_1 E' + b_1) + b_2,
# \qquad W_1 \in \mathbb{R}^{h \times d_{kv}},\; W_2 \in \mathbb{R}^{2 L d_{kv} \times h}.
# \tag{5.3}
# $$
#
# After training the MLP is evaluated once and thrown away: only the $P \times 2 L d_{kv}$ table is
# kept ("folding").
#
# ### Why every layer conditions more strongly than the input
#
# Split the softmax of one query $q$ over prefix positions $p$ and input positions $j$. With
# $s_i = q^\top k_i / \sqrt{d_h}$ and
# $\lambda(q) = \sum_p e^{s_p} / \big(\sum_p e^{s_p} + \sum_j e^{s_j}\big)$,
#
# $$
# \operatorname{head}(q) = (1 - \lambda(q))\, \underbrace{\sum_j \operatorname{softmax}_j(s)\, v_j}_{\text{attention over the input}}
# \;+\; \lambda(q)\, \underbrace{\sum_p \operatorname{softmax}_p(s)\, v_p}_{\text{attention over the prefix}}
# \tag{5.4}
# $$
#
# (He et al. 2022, arXiv:2110.04366, §3.1). The prefix adds a learned vector to every head's
# output, gated by how much the query attends to it, *at every layer*. Prompt tuning gets the same
# form only at the layers above the input through keys and values that the frozen layers compute
# from $E$: in a causal LM the prompt positions come first, so their keys and values at layer $l$
# are a fixed function $f_l(E)$ of the prompt alone. Prompt tuning is therefore prefix tuning
# restricted to prefixes of the form
#
# $$
# \big(K_P^{(l)}, V_P^{(l)}\big) = f_l(E), \quad l = 1, \dots, L,
# \tag{5.5}
# $$
#
# a $Pd$-dimensional family inside the $2LPd_{kv}$-dimensional space that prefix tuning searches.
# Both claims are checked numerically below: (5.4) on one attention head, and (5.5) by feeding
# the keys and values a prompt produces as a prefix and getting the same logits.

# %%
import torch

torch.manual_seed(0)
d_h, T, P = 16, 7, 3
# drawn in float32, computed in float64: both sides then agree to float64 rounding, which for
# softmax-weighted sums of 10 values of size ~3 (a few dozen roundings) is below 1e-14
q = torch.randn(d_h).double()
keys, values = torch.randn(T, d_h).double(), torch.randn(T, d_h).double()
prefix_keys, prefix_values = torch.randn(P, d_h).double(), torch.randn(P, d_h).double()

s_input, s_prefix = keys @ q / d_h**0.5, prefix_keys @ q / d_h**0.5
joint = torch.softmax(torch.cat([s_prefix, s_input]), 0) @ torch.cat([prefix_values, values])
lam = s_prefix.exp().sum() / (s_prefix.exp().sum() + s_input.exp().sum())
split = ((1 - lam) * torch.softmax(s_input, 0) @ values
         + lam * torch.softmax(s_prefix, 0) @ prefix_values)
print(f"lambda(q) = {lam:.3f}; max |joint - eq. (5.4)| = {(joint - split).abs().max():.2e}")
assert (joint - split).abs().max() < 1e-12

# %% [markdown]
# ## Implementation
#
# ### Finding the attention layers
#
# Prefix tuning needs a handle on every self-attention module. Transformers models route attention
# through a registered attention function (`ALL_ATTENTION_FUNCTIONS`), called with the module, the
# queries, keys and values (after rotary embeddings) and the mask. We register one more function,
# `ftbook_prefix`, that concatenates the module's prefix in front of the keys and values and opens
# the mask for it, then calls scaled dot-product attention. This works for encoders and decoders
# alike and never touches the KV-cache API. PEFT instead passes the prefix as
# `past_key_values`, so it depends on the model accepting a cache (the pitfall listed in the
# conventions); we measure the consequence below.

# %%
#| export
"""Prompt tuning and prefix tuning from scratch, with a verbalizer harness for causal LMs.

Chapter 13-05. Lester et al. 2021 (arXiv:2104.08691), Li & Liang 2021 (arXiv:2101.00190),
He et al. 2022 (arXiv:2110.04366) for the attention decomposition.
"""
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# transformers is imported where used (prefix attention): it takes seconds to import
import torch
from torch import nn

from ftbook.base_models import pad_sequences, schedule_factor  # Appendix C

PREFIX_ATTENTION = "ftbook_prefix"  # name of the registered attention function
PROMPT_INITS = ("random", "vocab", "text")
KEY_PROJECTIONS = {"k_proj": 1, "key": 1, "k_lin": 1, "Wqkv": 3, "qkv_proj": 3}  # name: fused parts


def _key_projection(module: nn.Module) -> tuple[nn.Linear, int] | None:
    for name, parts in KEY_PROJECTIONS.items():
        child = getattr(module, name, None)
        if isinstance(child, nn.Linear):
            return child, parts
    return None


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of `model` in layer order: modules named `...Attention` that own
    a key projection (or a fused q, k, v projection) and a head size."""
    found = [m for m in model.modules()
             if type(m).__name__.endswith("Attention") and _key_projection(m) is not None
             and (hasattr(m, "head_dim") or hasattr(m, "attention_head_size"))]
    if not found:
        raise ValueError(f"{type(model).__name__}: no self-attention module with a key projection "
                         f"({', '.join(KEY_PROJECTIONS)}) found; prefix tuning needs one per layer")
    return found


def kv_geometry(module: nn.Module) -> tuple[int, int]:
    """(key/value heads, head size) of one attention module; their product is d_kv of eq. (5.2)."""
    projection, parts = _key_projection(module)
    head_dim = getattr(module, "head_dim", None) or module.attention_head_size
    if parts == 1:
        return projection.out_features // head_dim, head_dim
    return module.config.num_attention_heads, head_dim  # fused q, k, v: no grouped heads


def prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any):
    """Scaled dot-product attention in which every query may also attend to the learned prefix
    `module.prefix_kv` = (keys, values), each (batch, kv_heads, P, head_dim): eq. (5.2)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    prefix = getattr(module, "prefix_kv", None)
    if prefix is not None:
        prefix_k, prefix_v = prefix
        batch, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
        num_prefix = prefix_k.shape[2]
        key = torch.cat([prefix_k.to(key.dtype), key], dim=2)  # (batch, kv_heads, P + kv, head_dim)
        value = torch.cat([prefix_v.to(value.dtype), value], dim=2)
        if attention_mask is None:  # the model relied on is_causal, or attends everywhere
            allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device)
            if getattr(module, "is_causal", False) and q_len > 1:
                allowed = allowed.tril(kv_len - q_len)
            attention_mask = allowed.expand(batch, 1, q_len, kv_len)
        attention_mask = attention_mask[..., :kv_len].expand(batch, -1, q_len, kv_len)
        if attention_mask.dtype == torch.bool:  # True = attend
            open_columns = attention_mask.new_ones(batch, 1, q_len, num_prefix)
        else:  # additive: 0 = attend
            open_columns = attention_mask.new_zeros(batch, 1, q_len, num_prefix)
        attention_mask = torch.cat([open_columns, attention_mask], dim=-1)  # (batch, 1, q, P + kv)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_prefix_attention() -> None:
    """Register `prefix_attention` (and the eager mask builder) under `PREFIX_ATTENTION`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(PREFIX_ATTENTION, prefix_attention)
    AttentionMaskInterface.register(PREFIX_ATTENTION, eager_mask)


def freeze_all_but(model: nn.Module, modules_to_save: Sequence[str] = ()) -> None:
    """Freeze every parameter of `model` except those inside a module named in `modules_to_save`
    (a new classification head, for instance)."""
    for name, p in model.named_parameters():
        p.requires_grad_(any(part in modules_to_save for part in name.split(".")))


# %% [markdown]
# ### The two wrappers
#
# `PromptTuning` implements (5.1), `PrefixTuning` (5.2) and (5.3). Both wrap a transformers model,
# freeze it (except the modules the caller names, such as a new classifier head) and forward the
# usual keyword arguments, so the training loop of 13-01 runs on them unchanged.
#
# Positions need a decision. A soft prompt occupies positions $0, \dots, P-1$ and the text follows.
# A prefix is a *past*: in a causal LM we give the text positions $P, P+1, \dots$, exactly as if
# the prefix had been produced by running the model (PEFT does the same, through the cache). In a
# bidirectional encoder with absolute position embeddings the prefix has no position and the text
# keeps $0, 1, \dots$: `[CLS]` stays where pretraining put it. `offset_positions` overrides the
# choice. With left padding, callers pass `position_ids` (counting only real tokens) and both
# wrappers shift them; PEFT drops `position_ids` for prompt tuning with a warning.

# %%
#| export
def _check_virtual_tokens(num_virtual_tokens: int) -> None:
    if not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise ValueError("num_virtual_tokens must be a positive integer, "
                         f"got {num_virtual_tokens!r}")


class PromptTuning(nn.Module):
    """A soft prompt E (P, d) prepended to the input embeddings of a frozen model, eq. (5.1)
    (Lester et al. 2021, arXiv:2104.08691, §2 and §3.2 for the initialisations).

    `init`: "random" (normal, with the embedding matrix's standard deviation), "vocab" (embeddings
    of uniformly sampled token ids) or "text" (the embeddings of `init_text`'s tokens, repeated to
    fill P, as PEFT's TEXT init; pass the label words for Lester's class-label init).
    """

    def __init__(self, model: nn.Module, num_virtual_tokens: int, init: str = "random",
                 init_text: str | None = None, tokenizer: Any = None,
                 modules_to_save: Sequence[str] = (), seed: int = 0):
        super().__init__()
        _check_virtual_tokens(num_virtual_tokens)
        if init not in PROMPT_INITS:
            raise ValueError(f"init={init!r} is unknown; choose one of {PROMPT_INITS}")
        self.model = model
        self.num_virtual_tokens = num_virtual_tokens
        freeze_all_but(model, modules_to_save)
        table = model.get_input_embeddings().weight.detach()  # (vocab, d)
        generator = torch.Generator().manual_seed(seed)
        if init == "random":
            prompt = torch.randn(num_virtual_tokens, table.shape[1], generator=generator)
            prompt = prompt * table.float().std().cpu()
        elif init == "vocab":
            ids = torch.randint(0, table.shape[0], (num_virtual_tokens,), generator=generator)
            prompt = table[ids.to(table.device)].float().cpu()
        else:
            if not init_text or tokenizer is None:
                raise ValueError("init='text' needs a non-empty init_text and its tokenizer")
            ids = tokenizer(init_text, add_special_tokens=False)["input_ids"]
            ids = (ids * math.ceil(num_virtual_tokens / len(ids)))[:num_virtual_tokens]
            prompt = table[torch.tensor(ids, device=table.device)].float().cpu()
        self.prompt = nn.Parameter(prompt.to(table.device, table.dtype))  # (P, d)

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        batch, P = input_ids.shape[0], self.num_virtual_tokens
        embeds = self.model.get_input_embeddings()(input_ids)  # (batch, T, d)
        prompt = self.prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # (batch, P, d)
        inputs_embeds = torch.cat([prompt, embeds], dim=1)  # (batch, P + T, d)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(batch, P), attention_mask], dim=1)
        if token_type_ids is not None:
            kwargs["token_type_ids"] = torch.cat([token_type_ids.new_zeros(batch, P),
                                                  token_type_ids], dim=1)
        if position_ids is not None:  # the prompt takes 0..P-1, the text follows
            prompt_positions = torch.arange(P, device=position_ids.device).expand(batch, -1)
            kwargs["position_ids"] = torch.cat([prompt_positions, position_ids + P], dim=1)
        if labels is not None and labels.dim() == 2:  # causal LM: no loss on the prompt
            labels = torch.cat([labels.new_full((batch, P), -100), labels], dim=1)
        return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                          labels=labels, **kwargs)


class PrefixTuning(nn.Module):
    """Learned keys and values in every attention layer, eq. (5.2), optionally reparameterised
    by the MLP of eq. (5.3) (Li & Liang 2021, arXiv:2101.00190, §4.2-4.3).

    The parameter layout equals PEFT's `PrefixEncoder` (`embedding`, `transform.0`,
    `transform.2`; the table's columns are layer 1 keys, layer 1 values, layer 2 keys, ...), so
    weights copy across. `projection_dim=None` trains the table directly; `fold()` evaluates the
    MLP once and keeps only the table.
    """

    def __init__(self, model: nn.Module, num_virtual_tokens: int,
                 projection_dim: int | None = None, modules_to_save: Sequence[str] = (),
                 offset_positions: bool | None = None, seed: int = 0):
        super().__init__()
        _check_virtual_tokens(num_virtual_tokens)
        if projection_dim is not None and projection_dim < 1:
            raise ValueError(f"projection_dim must be None or >= 1, got {projection_dim}")
        register_prefix_attention()
        self.model = model
        self.num_virtual_tokens = num_virtual_tokens
        self.attention = attention_modules(model)
        geometry = {kv_geometry(m) for m in self.attention}
        if len(geometry) != 1:
            raise ValueError("attention layers differ in (kv heads, head size): "
                             f"{sorted(geometry)}")
        ((self.kv_heads, self.head_dim),) = geometry
        self.num_layers = len(self.attention)
        kv_width = self.kv_heads * self.head_dim  # d_kv
        freeze_all_but(model, modules_to_save)
        torch.manual_seed(seed)
        width = self.num_layers * 2 * kv_width
        if projection_dim:
            self.embedding = nn.Embedding(num_virtual_tokens, kv_width)  # E' of eq. (5.3)
            self.transform = nn.Sequential(nn.Linear(kv_width, projection_dim), nn.Tanh(),
                                           nn.Linear(projection_dim, width))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, width)  # the table itself
            self.transform = None
        if offset_positions is None:  # a past for causal models; no position in an encoder
            offset_positions = bool(getattr(self.attention[0], "is_causal", False))
        self.offset_positions = offset_positions
        self.to(model.get_input_embeddings().weight.device)
        model.set_attn_implementation(PREFIX_ATTENTION)

    @property
    def config(self) -> Any:
        return self.model.config

    def prefix_table(self) -> torch.Tensor:
        """(P, 2 L d_kv): eq. (5.3), or the directly trained table."""
        table = self.embedding.weight
        return self.transform(table) if self.transform is not None else table

    def prefix_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (K_P, V_P), each (kv_heads, P, head_dim)."""
        P = self.num_virtual_tokens
        kv = self.prefix_table().view(P, 2 * self.num_layers, self.kv_heads, self.head_dim)
        kv = kv.permute(1, 2, 0, 3)  # (2 L, kv_heads, P, head_dim)
        return [(kv[2 * layer], kv[2 * layer + 1]) for layer in range(self.num_layers)]

    @torch.no_grad()
    def fold(self) -> "PrefixTuning":
        """Replace the MLP of eq. (5.3) by the table it produces (Li & Liang keep only that)."""
        table = self.prefix_table().detach().clone()
        self.embedding = nn.Embedding.from_pretrained(table, freeze=False)
        self.transform = None
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        batch, seq = input_ids.shape
        if self.offset_positions:
            if position_ids is None:
                position_ids = torch.arange(seq, device=input_ids.device).expand(batch, -1)
            position_ids = position_ids + self.num_virtual_tokens
        for module, (k, v) in zip(self.attention, self.prefix_kv(), strict=True):
            module.prefix_kv = (k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
        try:
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids, **kwargs)
        finally:
            for module in self.attention:
                del module.prefix_kv


# %% [markdown]
# Quick checks on a random tiny Llama with grouped-query attention: prompt tuning trains only the
# $P \times d$ prompt; the prefix encoder has exactly the parameters that (5.3) counts; and
# folding the MLP into its table changes no output, bit for bit.

# %%
import copy

from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

torch.manual_seed(0)
toy_lm = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, pad_token_id=0,
                                      attn_implementation="eager")).eval()
toy_ids = torch.randint(1, 100, (3, 7))
toy_mask = torch.ones_like(toy_ids)
toy_ids[1, :2], toy_mask[1, :2] = 0, 0  # one left-padded row

soft = PromptTuning(copy.deepcopy(toy_lm), num_virtual_tokens=5, init="vocab")
trainable = [n for n, p in soft.named_parameters() if p.requires_grad]
print("prompt tuning trains", trainable, tuple(soft.prompt.shape))
assert trainable == ["prompt"]

prefix = PrefixTuning(copy.deepcopy(toy_lm), num_virtual_tokens=5, projection_dim=16)
d_kv, L, h = prefix.kv_heads * prefix.head_dim, prefix.num_layers, 16
expected = 5 * d_kv + (d_kv * h + h) + (h * 2 * L * d_kv + 2 * L * d_kv)  # eq. (5.3)
counted = sum(p.numel() for p in prefix.parameters() if p.requires_grad)
print(f"prefix tuning (P=5, h=16, L={L}, d_kv={d_kv}): {counted} trainable, eq. (5.3) gives "
      f"{expected}; after folding {5 * 2 * L * d_kv}")
assert counted == expected
before = prefix(input_ids=toy_ids, attention_mask=toy_mask).logits
after = prefix.fold()(input_ids=toy_ids, attention_mask=toy_mask).logits
# exact: the folded table is the MLP's output, computed by the same operations as before
assert torch.equal(before, after) and prefix.transform is None

# %% [markdown]
# ### Prompt tuning is prefix tuning with tied layers, eq. (5.5)
#
# Run the frozen causal LM on the soft prompt alone with a cache: the cache holds, for every layer,
# the keys and values $f_l(E)$ the prompt produces. Install them as a prefix (with the text at
# positions $P, P+1, \dots$) and the logits of the text must equal those of prompt tuning. Two
# computations of the same network differ by rounding only; as in 13-02 we compare them in
# float64, where that rounding is far below the parity tolerance of $10^{-9}$. `float64_copy`
# also switches to SDPA attention: transformers' eager Llama attention takes its softmax in
# float32 even in a float64 model.

# %%
#| export
import copy

PARITY_TOLERANCE = 1e-9  # max |logits ours - PEFT| in float64 (13-02 derives it)


def float64_copy(model: nn.Module) -> nn.Module:
    """A float64 deep copy of `model` for parity checks, with PyTorch's SDPA attention wherever
    it used transformers' eager attention: eager Llama attention computes its softmax in float32
    whatever the model's dtype, which would limit a comparison to float32 rounding. (Our prefix
    attention already calls SDPA.)"""
    copied = copy.deepcopy(model).double()
    for module in copied.modules():
        config = getattr(module, "config", None)
        if (hasattr(module, "set_attn_implementation")
                and getattr(config, "_attn_implementation", None) == "eager"):
            module.set_attn_implementation("sdpa")
    return copied


# %%
with torch.no_grad():
    toy_lm64, soft64 = float64_copy(toy_lm), float64_copy(soft)
    cache = toy_lm64(inputs_embeds=soft64.prompt.unsqueeze(0), use_cache=True).past_key_values
    as_prefix = PrefixTuning(copy.deepcopy(toy_lm64), num_virtual_tokens=5).double()
    table = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
    # (L, 2, kv_heads, P, head_dim) -> (P, 2 L kv_heads head_dim), the layout of prefix_table()
    as_prefix.embedding.weight.copy_(table.permute(3, 0, 1, 2, 4).reshape(5, -1))
    full_ids = torch.randint(1, 100, (2, 6))
    via_prompt = soft64(input_ids=full_ids).logits[:, 5:]  # drop the prompt positions
    via_prefix = as_prefix(input_ids=full_ids).logits
gap = (via_prompt - via_prefix).abs().max().item()
print(f"max |logits(prompt tuning) - logits(prefix = f_l(E))| (float64) = {gap:.2e}")
assert gap < PARITY_TOLERANCE

# %% [markdown]
# ## Parity with PEFT
#
# Same frozen model, same trained vectors, PEFT's wrappers: we copy our soft prompt into
# `prompt_encoder.default.embedding.weight` and our prefix encoder's state dict into PEFT's
# `PrefixEncoder`, and compare logits and losses. The three settings PEFT supports are prompt
# tuning of a sequence classifier, prompt tuning of a causal LM, and prefix tuning of a causal LM
# (with and without the MLP). As in 13-02 the two run on float64 copies, so that their rounding
# is far below the tolerance.

# %%
#| export
def copy_into_peft(ours: nn.Module, peft_model: nn.Module) -> None:
    """Copy our trained prompt (or prefix encoder) into a PEFT prompt-learning model."""
    encoder = peft_model.prompt_encoder[peft_model.active_adapter]
    with torch.no_grad():
        if isinstance(ours, PromptTuning):
            encoder.embedding.weight.copy_(ours.prompt)
        else:
            encoder.load_state_dict({k: v for k, v in ours.state_dict().items()
                                     if not k.startswith("model.")})
        head = [n for n, p in ours.model.named_parameters() if p.requires_grad]
        if head:  # a trained head lives in PEFT's modules_to_save copy
            ours_params = dict(ours.model.named_parameters())
            for name, p in peft_model.named_parameters():
                if "modules_to_save.default." in name:
                    plain = name.replace("modules_to_save.default.", "")
                    for wrapper in ("base_model.model.", "base_model."):  # PEFT's outer names
                        plain = plain.removeprefix(wrapper)
                    p.copy_(ours_params[plain])


# %%
import warnings

import pandas as pd
from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

from ftbook.workbench import show_table

toy_bert = BertForSequenceClassification(BertConfig(
    vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0)).eval()
bert_ids = torch.randint(1, 100, (4, 9))
bert_mask = torch.ones_like(bert_ids)
bert_mask[1, 6:] = 0
labels_lm = toy_ids.masked_fill(toy_mask == 0, -100)


def parity_row(setting, ours, peft_config, base, batch):
    """Ours against PEFT, both in float64 (so that rounding is far below PARITY_TOLERANCE)."""
    peft_model = get_peft_model(float64_copy(base), peft_config).double()
    ours = float64_copy(ours)
    copy_into_peft(ours, peft_model)
    with torch.no_grad():
        a, b = ours(**batch), peft_model(**batch)
    ours_count = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    peft_count = peft_model.get_nb_trainable_parameters()[0]
    row = {"setting": setting, "max |logits diff|": (a.logits - b.logits).abs().max().item(),
           "trainable (ours)": ours_count, "trainable (PEFT)": peft_count}
    if getattr(a, "loss", None) is not None:
        row["|loss diff|"] = (a.loss - b.loss).abs().item()
    return row


torch.manual_seed(1)
cls_prompt = PromptTuning(copy.deepcopy(toy_bert), 4, modules_to_save=["classifier"])
lm_prompt = PromptTuning(copy.deepcopy(toy_lm), 5, init="random")
lm_prefix = PrefixTuning(copy.deepcopy(toy_lm), 5)
lm_prefix_mlp = PrefixTuning(copy.deepcopy(toy_lm), 5, projection_dim=16)
for module in (cls_prompt, lm_prompt, lm_prefix, lm_prefix_mlp):  # move off the init
    for p in module.parameters():
        if p.requires_grad:
            p.data.add_(torch.randn_like(p) * 0.5)
lm_batch = {"input_ids": toy_ids, "attention_mask": toy_mask, "labels": labels_lm}
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    parity = pd.DataFrame([
        parity_row("prompt tuning, BERT classifier", cls_prompt,
                   PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4), toy_bert,
                   {"input_ids": bert_ids, "attention_mask": bert_mask,
                    "labels": torch.tensor([0, 1, 1, 0])}),
        parity_row("prompt tuning, causal LM", lm_prompt,
                   PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5),
                   toy_lm, lm_batch),
        parity_row("prefix tuning, causal LM", lm_prefix,
                   PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5),
                   toy_lm, lm_batch),
        parity_row("prefix tuning + MLP, causal LM", lm_prefix_mlp,
                   PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5,
                                      prefix_projection=True, encoder_hidden_size=16),
                   toy_lm, lm_batch),
    ]).set_index("setting")
show_table(parity, "peft_parity", CHAPTER, floatfmt="{:.2e}")
assert (parity["max |logits diff|"] < PARITY_TOLERANCE).all()
assert (parity["trainable (ours)"] == parity["trainable (PEFT)"]).all()

# %% [markdown]
# Every row agrees to float64 rounding (the comparison runs on float64 copies), with the same number of trainable parameters (the BERT
# row counts the classifier head in both). The toy causal LM uses grouped-query attention (4 query
# heads, 2 key/value heads), so the prefix width is $d_{kv} = 16$, not $d = 32$; PEFT sizes its
# prefix the same way.
#
# ### Where PEFT's route through the cache breaks
#
# PEFT hands the prefix to the model as `past_key_values`. Two consequences, measured. A model
# whose forward has no cache argument is refused (ModernBERT here; DistilBERT asks for
# `token_dim` and then fails the same way). And a BERT encoder, which does accept a cache in
# current transformers, *shifts its absolute positions by $P$*: `[CLS]` moves to position $P$, a
# position it never held in pretraining. Ours runs on all three, and reproduces PEFT exactly when
# asked to shift (`offset_positions=True`).

# %%
from transformers import (
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ModernBertConfig,
    ModernBertForSequenceClassification,
)

encoders = {
    "BERT": toy_bert,
    "DistilBERT": DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64)).eval(),
    "ModernBERT": ModernBertForSequenceClassification(ModernBertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
        sep_token_id=2)).eval(),
}
rows = []
for name, encoder in encoders.items():
    batch = {"input_ids": bert_ids, "attention_mask": bert_mask}
    ours = PrefixTuning(copy.deepcopy(encoder), 4, projection_dim=8)
    with torch.no_grad():
        ours_logits = ours(**batch).logits
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(copy.deepcopy(encoder), PrefixTuningConfig(
                task_type=TaskType.SEQ_CLS, num_virtual_tokens=4, prefix_projection=True,
                encoder_hidden_size=8))
            copy_into_peft(ours, peft_model)
            with torch.no_grad():
                peft_logits = peft_model(**batch).logits
        shifted = copy.deepcopy(ours)
        shifted.offset_positions = True
        with torch.no_grad():
            gap = (shifted(**batch).logits - peft_logits).abs().max().item()
        peft_result = f"runs; equals ours with offset_positions=True to {gap:.1e}"
    except (ValueError, TypeError) as error:
        peft_result = f"refused: {str(error).splitlines()[0][:70]}"
    rows.append({"encoder": name, "ours": f"runs, logits {tuple(ours_logits.shape)}",
                 "PEFT prefix tuning": peft_result})
show_table(pd.DataFrame(rows).set_index("encoder"), "prefix_encoders", CHAPTER)

# %% [markdown]
# ## A causal LM as a classifier: verbalizers and discrete prompts
#
# To use a causal LM on SST-2 without a new head, we let it *say* the label. A template wraps the
# sentence $x$, for example `Review: {x} Sentiment:`, and a verbalizer maps each class to one
# token (` bad`, ` good`). The classifier's logits are the LM's next-token logits of those two
# tokens at the last position; training minimises the cross-entropy over the two.
#
# A discrete prompt is a choice of template and verbalizer. Searching over token sequences is a
# combinatorial problem ($|V|^P$ candidates); in practice one searches a handful of human-written
# templates on training data (Jiang et al. 2020, Shin et al. 2020 search more cleverly). A soft
# prompt relaxes the same choice to the continuum: any discrete prefix $t_1 \dots t_P$ is the
# soft prompt $E = [e(t_1); \dots; e(t_P)]$, so the best soft prompt of length $P$ is at least as
# good on the training objective as the best discrete prefix of that length. We check the
# inclusion numerically once we have the tiny LM.

# %%
#| export
@dataclass(frozen=True)
class Template:
    """A discrete prompt: `prefix {sentence}suffix`, answered by one verbalizer token per class."""

    prefix: str
    suffix: str
    verbalizer: tuple[str, ...]  # class 0, class 1, ... (each one token, with its leading space)


def verbalizer_ids(tokenizer: Any, template: Template) -> list[int]:
    """The token id of each verbalizer word; a word that is not a single token is an error."""
    ids = []
    for word in template.verbalizer:
        tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise ValueError(f"verbalizer word {word!r} of template {template} is {len(tokens)} "
                             f"tokens {tokenizer.convert_ids_to_tokens(tokens)}; use one token")
        ids.append(tokens[0])
    return ids


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq) positions counting real tokens only, so that left padding does not shift
    the rotary positions; padding positions get 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def encode_prompted(tokenizer: Any, sentences: Sequence[str], template: Template,
                    with_prefix: bool = True, max_len: int = 96) -> dict[str, torch.Tensor]:
    """Token ids of `prefix + sentence + suffix`, left-padded, with position ids that count only
    real tokens. The prefix and the rest are tokenized separately, so that a soft prompt
    initialised from the prefix's tokens sees exactly the discrete prompt's ids."""
    prefix_ids = tokenizer(template.prefix, add_special_tokens=False)["input_ids"] \
        if with_prefix and template.prefix else []
    rows = [prefix_ids + tokenizer(s + template.suffix, add_special_tokens=False)["input_ids"]
            for s in sentences]
    rows = [r[-max_len:] for r in rows]  # keep the end: the answer is read at the last token
    batch = pad_sequences(rows, tokenizer.pad_token_id, "left")  # Appendix C
    return {**batch, "position_ids": position_ids_from_mask(batch["attention_mask"])}


def class_logits(model: nn.Module, batch: dict[str, torch.Tensor], label_ids: Sequence[int]
                 ) -> torch.Tensor:
    """(batch, classes): next-token logits of the verbalizer tokens at the last position."""
    logits = model(**batch).logits  # (batch, seq, vocab); the sequence is left-padded
    return logits[:, -1, list(label_ids)].float()


@torch.no_grad()
def verbalizer_margins(model: nn.Module, tokenizer: Any, dataset: Any, template: Template,
                       with_prefix: bool = True, batch_size: int = 64, bf16: bool = False
                       ) -> torch.Tensor:
    """(rows,): logit of the class-1 word minus logit of the class-0 word (two classes only)."""
    model.eval()
    device = next(model.parameters()).device
    label_ids = verbalizer_ids(tokenizer, template)
    if len(label_ids) != 2:
        raise ValueError(f"margins need exactly two classes, template has {len(label_ids)}")
    margins = []
    for i in range(0, len(dataset), batch_size):
        rows = dataset[i:i + batch_size]
        batch = encode_prompted(tokenizer, rows["sentence"], template, with_prefix)
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = class_logits(model, batch, label_ids)  # (batch, 2)
        margins.append((logits[:, 1] - logits[:, 0]).cpu())
    return torch.cat(margins)


def calibrated_threshold(margins: torch.Tensor, labels: Sequence[int]) -> float:
    """The threshold on the margin that maximises accuracy on (margins, labels): a one-number
    calibration of the verbalizer's prior (cf. Zhao et al. 2021, arXiv:2102.09690)."""
    labels_t = torch.tensor(list(labels))
    candidates = torch.cat([margins.sort().values, margins.max().reshape(1) + 1])
    accuracies = torch.stack([((margins >= c).long() == labels_t).float().mean()
                              for c in candidates])
    return float(candidates[int(accuracies.argmax())])


@torch.no_grad()
def verbalizer_accuracy(model: nn.Module, tokenizer: Any, dataset: Any, template: Template,
                        with_prefix: bool = True, batch_size: int = 64, bf16: bool = False
                        ) -> float:
    """Accuracy of the argmax verbalizer token on `dataset` (columns `sentence`, `label`)."""
    model.eval()
    device = next(model.parameters()).device
    label_ids = verbalizer_ids(tokenizer, template)
    correct = 0
    for i in range(0, len(dataset), batch_size):
        rows = dataset[i:i + batch_size]
        batch = encode_prompted(tokenizer, rows["sentence"], template, with_prefix)
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            predicted = class_logits(model, batch, label_ids).argmax(-1).cpu()
        correct += int((predicted == torch.tensor(rows["label"])).sum())
    return correct / len(dataset)


# %% [markdown]
# ### The training loop
#
# One loop serves every method of this chapter on the verbalizer task (and LoRA, for the
# comparison): it optimises whatever requires grad with AdamW, linear warmup and decay, the loss
# of the verbalizer logits, a NaN guard and a progress bar.

# %%
#| export
import time

from ftbook.workbench import check_finite, progress


@dataclass
class PromptRunLog:
    """What `train_verbalizer` records."""

    trainable_parameters: int
    losses: list[float]
    step_seconds: list[float]
    evals: list[dict]


def train_verbalizer(model: nn.Module, tokenizer: Any, train: Any, template: Template, *,
                     steps: int, lr: float, batch_size: int, seed: int, with_prefix: bool = False,
                     warmup_ratio: float = 0.1, bf16: bool = False, eval_every: int = 0,
                     eval_fn: Any = None, desc: str = "prompt tuning") -> PromptRunLog:
    """Train the parameters of `model` that require grad to answer `template`'s verbalizer on
    `train` (SST-2 rows). `with_prefix=False` drops the template's prefix text (the soft prompt
    replaces it); `eval_fn(step)` runs before training and every `eval_every` steps."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no parameter requires grad: nothing to train")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, round(warmup_ratio * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warmup and decay (Appendix C)
        optimizer, lambda s: schedule_factor("linear", s, steps, warmup))
    label_ids = verbalizer_ids(tokenizer, template)
    log = PromptRunLog(sum(p.numel() for p in params), [], [], [])
    if eval_fn is not None:
        log.evals.append({"step": 0, **eval_fn(0)})
    generator = torch.Generator().manual_seed(seed)
    for step in progress(range(steps), desc=desc):
        model.train()
        start = time.perf_counter()
        index = torch.randint(0, len(train), (batch_size,), generator=generator).tolist()
        rows = train[index]
        batch = encode_prompted(tokenizer, rows["sentence"], template, with_prefix)
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = torch.tensor(rows["label"], device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = class_logits(model, batch, label_ids)  # (batch, classes)
        loss = nn.functional.cross_entropy(logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        log.step_seconds.append(time.perf_counter() - start)
        log.losses.append(check_finite(loss, f"{desc} loss", step))
        if eval_fn is not None and eval_every and (step + 1) % eval_every == 0:
            log.evals.append({"step": step + 1, **eval_fn(step + 1)})
    return log


# %% [markdown]
# ## Experiments
#
# The budget per profile. The causal-LM experiments use the book's tiny LM (Appendix C) in the
# tiny profile and Qwen2.5-0.5B-Instruct in the full profile (the instruction-tuned version, as
# prompt tuning steers what a model can already do: see the discussion of the results); the
# classifier experiment uses the encoder and data of 13-01.

# %%
#| export
@dataclass(frozen=True)
class PromptExperimentConfig:
    """Budget of chapter 13-05 (one per profile)."""

    n_train: int | None  # SST-2 rows to train on
    n_select: int  # training rows that rank the discrete templates
    n_dev: int | None  # SST-2 dev rows (None = all 872)
    num_virtual_tokens: int  # P
    batch_size: int
    lm_steps: int  # causal-LM runs (verbalizer)
    lm_lr_prompt: float  # soft prompts want large rates (Lester et al.: 0.3 with Adafactor)
    lm_lr_prefix: float
    encoder_steps: int  # classifier runs (encoder + new head)
    lr_prompt: float
    lr_prefix: float
    lr_lora: float
    prefix_projection: int  # h of eq. (5.3)
    lora_rank: int
    bf16: bool = True


PT_CONFIGS = {
    "smoke": PromptExperimentConfig(n_train=64, n_select=16, n_dev=32, num_virtual_tokens=4,
                                    batch_size=8, lm_steps=3, lm_lr_prompt=3e-2,
                                    lm_lr_prefix=1e-3, encoder_steps=2, lr_prompt=1e-2,
                                    lr_prefix=1e-3, lr_lora=1e-3, prefix_projection=16,
                                    lora_rank=2),
    "tiny": PromptExperimentConfig(n_train=4000, n_select=256, n_dev=400, num_virtual_tokens=8,
                                   batch_size=16, lm_steps=60, lm_lr_prompt=3e-2,
                                   lm_lr_prefix=1e-3, encoder_steps=35, lr_prompt=1e-2,
                                   lr_prefix=1e-3, lr_lora=3e-3, prefix_projection=256,
                                   lora_rank=8),
    "full": PromptExperimentConfig(n_train=None, n_select=1000, n_dev=None,
                                   num_virtual_tokens=20, batch_size=32, lm_steps=600,
                                   lm_lr_prompt=3e-2, lm_lr_prefix=5e-4, encoder_steps=500,
                                   lr_prompt=3e-2, lr_prefix=5e-4, lr_lora=5e-4,
                                   prefix_projection=512, lora_rank=8),
}


# %% [markdown]
# ### Experiment 1: a discrete prompt search
#
# Six human-written templates with single-token verbalizers, ranked by accuracy on a held-out
# slice of the training set (never the dev set), then reported on dev. The LM is frozen; this is
# zero-shot prompting.

# %%
from ftbook.base_models import load_causal_lm
from ftbook.data import load_sst2, subset

cfg = pick(PROFILE, PT_CONFIGS)
lm, lm_tokenizer = load_causal_lm(PROFILE, device=DEVICE, instruct=True)  # full: -Instruct
lm.requires_grad_(False)
train_ds = subset(load_sst2("train"), cfg.n_train, seed=SEED, stratify_by="label")
select_ds = subset(train_ds, cfg.n_select, seed=SEED + 1, stratify_by="label")
dev_ds = subset(load_sst2("validation"), cfg.n_dev, seed=SEED, stratify_by="label")

TEMPLATES = [
    Template("", " It was", (" terrible", " great")),
    Template("Review:", " Sentiment:", (" bad", " good")),
    Template("", " Overall, the movie was", (" bad", " good")),
    Template("Is this review positive or negative?", " Answer:", (" bad", " good")),
    Template("", " I thought it was", (" awful", " wonderful")),
    Template("Movie review:", " In short, it is", (" boring", " fun")),
]
usable = []
for template in TEMPLATES:
    try:
        verbalizer_ids(lm_tokenizer, template)
        usable.append(template)
    except ValueError as error:  # the smoke profile's 640-token vocabulary splits some words
        print("skipped:", error)
if not usable and PROFILE == "smoke":  # the random smoke LM's tokenizer has 640 tokens
    usable = [Template("", " It was", (" not", " a"))]
assert usable, "no template has single-token verbalizer words in this tokenizer"

def discrete_row(t: Template) -> dict:
    select_margins = verbalizer_margins(lm, lm_tokenizer, select_ds, t, bf16=cfg.bf16)
    dev_margins = verbalizer_margins(lm, lm_tokenizer, dev_ds, t, bf16=cfg.bf16)
    threshold = calibrated_threshold(select_margins, select_ds["label"])
    dev_labels = torch.tensor(dev_ds["label"])
    return {"template": f"{t.prefix} {{x}}{t.suffix}".strip(),
            "verbalizer": "/".join(w.strip() for w in t.verbalizer),
            "selection accuracy": ((select_margins > 0).long() == torch.tensor(
                select_ds["label"])).float().mean().item(),
            "dev accuracy": ((dev_margins > 0).long() == dev_labels).float().mean().item(),
            "predicted class 1 (dev)": (dev_margins > 0).float().mean().item(),
            "calibrated dev accuracy": ((dev_margins >= threshold).long() == dev_labels)
            .float().mean().item()}


discrete = pd.DataFrame([discrete_row(t) for t in usable])
best_index = int(discrete["selection accuracy"].idxmax())
best_template = usable[best_index]
show_table(discrete.set_index("template"), "discrete_prompts", CHAPTER, floatfmt="{:.3f}")
print(f"best template on the selection rows: {discrete.loc[best_index, 'template']!r} "
      f"(selection {discrete.loc[best_index, 'selection accuracy']:.3f}, "
      f"dev {discrete.loc[best_index, 'dev accuracy']:.3f}); dev accuracy ranges from "
      f"{discrete['dev accuracy'].min():.3f} to {discrete['dev accuracy'].max():.3f}; the "
      f"templates answer class 1 for {discrete['predicted class 1 (dev)'].min():.0%} to "
      f"{discrete['predicted class 1 (dev)'].max():.0%} of dev; calibrated, "
      f"{discrete['calibrated dev accuracy'].min():.3f} to "
      f"{discrete['calibrated dev accuracy'].max():.3f}")

# %% [markdown]
# Two lessons, both visible in the table. First, a frozen LM's verbalizer has a *prior*: the
# column "predicted class 1" shows how often each template says the positive word regardless of
# the review, and a template's raw accuracy mostly measures that prior against the label balance
# of the data. Second, once the prior is removed by a single threshold fitted on the selection
# rows (the calibrated column; Zhao et al. 2021 call this contextual calibration), what remains
# is the evidence the model actually extracts from the review through that template. Wording
# that a person would call equivalent moves both numbers.
#
# The soft prompt contains the discrete one. Initialise $E$ from the prefix's own token
# embeddings ($P$ equal to its length) and feed the rest of the template: the class logits are
# those of the discrete prompt, up to rounding (compared on float64 copies of the LM, to the
# parity tolerance).

# %%
prefix_text = best_template.prefix or "Review:"
n_prefix = len(lm_tokenizer(prefix_text, add_special_tokens=False)["input_ids"])
lm64 = float64_copy(lm)
relaxed = PromptTuning(lm64, n_prefix, init="text", init_text=prefix_text, tokenizer=lm_tokenizer)
probe = dev_ds[:8]["sentence"]
label_ids = verbalizer_ids(lm_tokenizer, best_template)


def class_logits64(model, template, **encode):
    """class_logits without its float32 cast: (batch, classes) in float64."""
    batch = {k: v.to(DEVICE) for k, v in encode_prompted(lm_tokenizer, probe, template,
                                                         **encode).items()}
    return model(**batch).logits[:, -1, list(label_ids)]


with torch.no_grad():
    as_discrete = class_logits64(lm64, Template(prefix_text, best_template.suffix,
                                                best_template.verbalizer))
    as_soft = class_logits64(relaxed, best_template, with_prefix=False)
gap = (as_discrete - as_soft).abs().max().item()
print(f"{n_prefix}-token prefix {prefix_text!r}: max |class logits discrete - soft| = {gap:.2e} "
      "(float64)")
assert gap < PARITY_TOLERANCE
del lm64, relaxed

# %% [markdown]
# ### Experiment 2: the continuous relaxation on the causal LM
#
# $P$ soft tokens replace the template's prefix, initialised from the best discrete prompt's own
# tokens, so the run starts where the discrete search ended; the suffix and verbalizer of the best
# template stay. Prefix tuning (with the MLP) gets the same budget. Everything in the LM is frozen.

# %%
import matplotlib.pyplot as plt

from ftbook.workbench import binomial_interval, count_parameters, show_figure

P = cfg.num_virtual_tokens
lm_total = count_parameters(lm)


def lm_run(label: str, model: nn.Module, lr: float) -> dict:
    """Train `model` on the best template's verbalizer; dev accuracy at the start and the end."""
    seed_everything(SEED)
    log = train_verbalizer(
        model, lm_tokenizer, train_ds, best_template, steps=cfg.lm_steps, lr=lr,
        batch_size=cfg.batch_size, seed=SEED, bf16=cfg.bf16, eval_every=cfg.lm_steps,
        eval_fn=lambda step: {"dev_accuracy": verbalizer_accuracy(
            model, lm_tokenizer, dev_ds, best_template, with_prefix=False, bf16=cfg.bf16)},
        desc=label)
    k = min(10, len(log.losses) // 2)  # two windows that do not overlap
    first, last = pd.Series(log.losses[:k]), pd.Series(log.losses[-k:])
    return {"method": label, "dev accuracy at step 0": log.evals[0]["dev_accuracy"],
            "dev accuracy": log.evals[-1]["dev_accuracy"],
            "trainable params": log.trainable_parameters,
            "loss, first steps": float(first.mean()), "loss, last steps": float(last.mean()),
            "steps per mean": k,
            # standard error of the difference of the two means (batches drawn independently);
            # NaN below two steps per window
            "loss change SE": math.sqrt(first.var() / k + last.var() / k)}


lm_runs = pd.DataFrame([
    {"method": "best discrete template (frozen LM)",
     "dev accuracy": discrete.loc[best_index, "dev accuracy"], "trainable params": 0},
    lm_run(f"prompt tuning (from {prefix_text!r})",
           PromptTuning(lm, P, init="text", init_text=prefix_text, tokenizer=lm_tokenizer),
           cfg.lm_lr_prompt),
    lm_run(f"prefix tuning (MLP h={cfg.prefix_projection})",
           PrefixTuning(copy.deepcopy(lm), P, projection_dim=cfg.prefix_projection, seed=SEED),
           cfg.lm_lr_prefix),
]).set_index("method")
show_table(lm_runs, "causal_lm_runs", CHAPTER, floatfmt="{:.3f}")
best_trained, discrete_acc = lm_runs["dev accuracy"].iloc[1:].max(), lm_runs["dev accuracy"].iloc[0]
low, high = binomial_interval(round(discrete_acc * len(dev_ds)), len(dev_ds))
inside = "inside" if low <= best_trained <= high else "outside"
print(f"causal LM ({lm_total / 1e6:.1f}M parameters), {cfg.lm_steps} steps: best trained "
      f"{best_trained:.3f} vs discrete {discrete_acc:.3f} ({100 * (best_trained - discrete_acc):+.1f}"
      f" points), {inside} the discrete template's 95% interval [{low:.3f}, {high:.3f}] on "
      f"{len(dev_ds)} dev rows")
for name, (_, row) in zip(("prompt", "prefix"), lm_runs.iloc[1:].iterrows(), strict=True):
    first, last = row["loss, first steps"], row["loss, last steps"]
    se = row["loss change SE"]
    moved = ("too few steps to tell" if not math.isfinite(se) else
             "moved beyond its batch noise" if abs(last - first) > 2 * se else
             "stayed within its batch noise")
    print(f"  {name} tuning, training loss (mean of {int(row['steps per mean'])} steps) "
          f"{first:.3f} -> {last:.3f} ({last - first:+.3f} ± {2 * se:.3f}, 2 SE): {moved}; "
          f"ln 2 = {math.log(2):.3f}")

# %% [markdown]
# ### Experiment 3: the classifier, initialisations, prefix and LoRA at one budget
#
# The same machinery on the SST-2 encoder of 13-01 (MiniLM in the tiny profile), whose sentence
# representations learn this task within a few dozen steps. Each run trains the new head (pooler
# and classifier) plus: a soft prompt from each of the three initialisations; a prefix with the
# MLP, with the text's positions kept (ours) and shifted by $P$ (PEFT's convention); and, for
# reference, LoRA on the attention queries and values (13-02). Same data, steps, batch and seed;
# one learning rate per method family (configuration).

# %%
from ftbook.base_models import load_encoder_classifier
from ftbook.full_finetuning import FT_CONFIGS, HEAD_MODULES, evaluate_accuracy, train_classifier
from ftbook.lora import apply_lora, encoder_target_modules

ft_cfg = pick(PROFILE, FT_CONFIGS)
label_words = "terrible great"  # class-label initialisation (Lester et al. §3.2)


def encoder_run(label: str, wrap, lr: float) -> dict:
    encoder, encoder_tokenizer = load_encoder_classifier(PROFILE, seed=SEED)
    model = wrap(encoder, encoder_tokenizer).to(DEVICE)
    log = train_classifier(model, encoder_tokenizer, train_ds, steps=cfg.encoder_steps, lr=lr,
                           batch_size=cfg.batch_size, max_len=ft_cfg.max_len, seed=SEED,
                           weight_decay=0.0, bf16=cfg.bf16, desc=label)
    return {"method": label,
            "dev accuracy": evaluate_accuracy(model, encoder_tokenizer, dev_ds, ft_cfg.max_len,
                                              bf16=cfg.bf16),
            "trainable params": log.trainable_parameters,
            "loss, last 10 steps": float(pd.Series(log.losses[-10:]).mean()),
            "s / step": log.median_step_seconds}


encoder_runs = [
    encoder_run(f"prompt tuning, {init} init", lambda m, t, init=init, text=text: PromptTuning(
        m, P, init=init, init_text=text, tokenizer=t, modules_to_save=HEAD_MODULES, seed=SEED),
        cfg.lr_prompt)
    for init, text in (("random", None), ("vocab", None), ("text", label_words))]
encoder_runs += [
    encoder_run(f"prefix tuning, {name}", lambda m, t, shifted=shifted: PrefixTuning(
        m, P, projection_dim=cfg.prefix_projection, modules_to_save=HEAD_MODULES,
        offset_positions=shifted, seed=SEED), cfg.lr_prefix)
    for name, shifted in (("positions kept (ours)", False), ("shifted by P (PEFT)", True))]
encoder_runs.append(encoder_run(
    f"LoRA q,v r={cfg.lora_rank}", lambda m, t: apply_lora(
        m, encoder_target_modules(m, "attention q,v"), cfg.lora_rank, 2 * cfg.lora_rank,
        modules_to_save=list(HEAD_MODULES)), cfg.lr_lora))
encoder_table = pd.DataFrame(encoder_runs).set_index("method")
encoder_table.index = encoder_table.index.str.replace("text init", "label-word init")
show_table(encoder_table, "encoder_methods", CHAPTER, floatfmt="{:.4g}")

fig, ax = plt.subplots(figsize=(6.5, 3.8))
for method, row in encoder_table.iterrows():
    ax.scatter(row["trainable params"], row["dev accuracy"])
    ax.annotate(method, (row["trainable params"], row["dev accuracy"]), fontsize=7,
                textcoords="offset points", xytext=(4, 3))
ax.set(xscale="log", xlabel="trainable parameters, head included (log)",
       ylabel="SST-2 dev accuracy", title=f"Encoder classifier, {cfg.encoder_steps} steps")
show_figure(fig, "encoder_methods", CHAPTER)

# %%
acc = encoder_table["dev accuracy"]
prompts = acc[acc.index.str.startswith("prompt")]
kept, shifted = acc["prefix tuning, positions kept (ours)"], acc["prefix tuning, shifted by P (PEFT)"]
lora_acc = acc[acc.index.str.startswith("LoRA")].iloc[0]
inits = [f"{name.split(', ')[1]} {value:.3f}" for name, value in prompts.items()]
print("soft prompts:", ", ".join(inits))
verdict = "within" if abs(kept - shifted) < 0.02 else "beyond"
print(f"prefix tuning {kept:.3f} with positions kept, {shifted:.3f} shifted by P = {P} "
      f"({100 * (kept - shifted):+.1f} points, {verdict} single-seed noise of 2 points); "
      f"LoRA {lora_acc:.3f}")
print(f"best soft prompt {prompts.max():.3f} vs prefix {kept:.3f} vs LoRA {lora_acc:.3f}")
intervals = {}
for label, value in (("best soft prompt", prompts.max()), ("prefix, positions kept", kept),
                     ("LoRA", lora_acc)):
    intervals[label] = binomial_interval(round(value * len(dev_ds)), len(dev_ds))
    low, high = intervals[label]
    print(f"  {label}: {value:.3f}, 95% interval [{low:.3f}, {high:.3f}] on {len(dev_ds)} dev rows"
          " (one seed)")


def separated(a: str, b: str) -> str:
    """Whether the dev-set intervals of two rows are disjoint."""
    (low_a, high_a), (low_b, high_b) = intervals[a], intervals[b]
    return "disjoint" if high_a < low_b or high_b < low_a else "overlapping"


init_spread = prompts.max() - prompts.min()
half_width = (intervals["best soft prompt"][1] - intervals["best soft prompt"][0]) / 2
print(f"prefix vs best soft prompt: intervals {separated('prefix, positions kept', 'best soft prompt')}"
      f"; LoRA vs prefix: {separated('LoRA', 'prefix, positions kept')}; the three soft-prompt "
      f"initialisations span {100 * init_spread:.1f} points, "
      f"{'less' if init_spread < half_width else 'more'} than the half-width of one interval "
      f"({100 * half_width:.1f} points)")

# %% [markdown]
# ## Results and discussion
#
# **The causal LM.** The book's tiny LM is a poor zero-shot classifier. The templates lean
# towards one verbalizer word (the printed share of class-1 answers), raw accuracies sit near
# the label balance of the data, and calibration shows how little evidence about the review
# survives underneath. A training loss near $\ln 2 \approx 0.693$ is what a two-way classifier
# scores when it cannot tell the classes apart. The lines under Experiment 2 say, for this run,
# whether the training loss moved beyond the noise of the means of its first and last ten steps
# (two standard errors of their difference) and whether the best trained dev accuracy left the
# discrete template's interval. Where neither happens, the budget bought nothing measurable.
# That is Lester et al.'s scale effect seen from the bottom: prompt tuning only steers what the
# frozen model can already compute, and their Fig. 1 shows the gap to full fine-tuning closing
# only past a billion parameters. The full profile runs the same cells on
# Qwen2.5-0.5B-Instruct, where the templates work zero-shot and the soft prompt has something to
# steer.
#
# **The classifier.** On the encoder, whose pooled representation already separates sentiment,
# every method learns within the budget, and the table ranks them. Three readings:
#
# - *Depth.* At the same $P$, the prefix conditions every layer (eq. 5.4), every soft prompt
#   only the input. The last printed line says whether the prefix's and the best soft prompt's
#   intervals are disjoint, that is, whether the gap clears the sampling noise of the dev set;
#   the training seed adds to that noise (13-04 measures the spread), so overlapping intervals
#   are not a finding. 13-04 also trains the new head alone in the same harness, the baseline a
#   soft prompt has to beat. The prefix pays in parameters: $2 L P d_{kv}$ numbers after folding
#   against $P d$, and during training the MLP of eq. (5.3), which is why its trainable count is
#   the largest in the table.
# - *Initialisation.* The same line compares the spread of the three soft-prompt starts with the
#   half-width of one dev interval; a spread below it cannot rank them. Lester et al. (§3.2,
#   Fig. 3b) find class-label initialisation best for small models, and the differences vanish
#   at scale.
# - *Positions.* Shifting the encoder's positions by $P$, as PEFT does through the cache, moves
#   `[CLS]` and every token to positions pretraining did not put them at. The printed line says
#   whether the two prefix rows differ by more than single-seed noise (about 2 points, 13-04).
#   When they do not, the learned prefix and head absorb the shift, and the difference is a
#   question of correctness (the shifted model is not the one that was pretrained) rather than
#   of accuracy at this budget.
#
# LoRA, with its update inside the weights, is the reference; whether its lead over the prefix
# clears the dev-set noise is in the same printed line. It also merges away at inference, which
# neither prompt nor prefix can.
# Prompt tuning wins on a different axis: the base stays bit-identical, so one batch can serve
# many tasks, each row with its own $P \times d$ prompt, and a task costs kilobytes. Chapter
# 13-04 puts all of these in one table with several seeds.
#
# ## Pitfalls
#
# - **Prefix tuning through the cache.** A library that passes the prefix as `past_key_values`
#   only works for models that accept a cache, and silently shifts an encoder's absolute
#   positions (measured above). Our attention function needs neither.
# - **Positions under left padding.** A causal LM scored at the last token must be left-padded;
#   then the position ids must count real tokens only, or the soft prompt's distance to the text
#   varies with the amount of padding. `encode_prompted` passes them, and both wrappers shift
#   them; PEFT's prompt tuning drops `position_ids` with a warning.
# - **Learning rates.** Soft prompts need rates one to two orders of magnitude above LoRA's
#   (Lester et al. use 0.3 with Adafactor). Prefixes trained directly, without the MLP of
#   eq. (5.3), are unstable (Li & Liang §4.3); keep the MLP for training and fold it afterwards.
# - **Multi-token verbalizers.** Scoring the first token of a multi-token word silently changes
#   the task; `verbalizer_ids` refuses.
# - **Tokenizing a template in one piece.** Tokenizers merge across the boundary between prompt
#   and text; tokenize the parts separately, as `encode_prompted` does, so that the discrete and
#   the soft prompt see the same ids.
#
# ## Summary
#
# - Prompt tuning learns $P$ input vectors, eq. (5.1); prefix tuning learns keys and values in
#   every layer, eq. (5.2), through an MLP that is folded away after training, eq. (5.3).
# - A prefix adds a gated, learned term to every head's output, eq. (5.4); prompt tuning of a
#   causal LM is prefix tuning with the prefix tied to what the frozen layers compute from the
#   prompt, eq. (5.5), checked to float precision.
# - Our implementation matches PEFT's logits, losses and gradients where PEFT supports the
#   setting, and runs on encoders PEFT refuses or shifts.
# - A soft prompt contains every discrete prompt of its length; how much the relaxation gains
#   depends on what the frozen model can do, and small models gain little.
#
# ## Exercises
#
# 1. Train the causal-LM soft prompt five times longer. Does the dev accuracy follow the
#    training loss, or does the prompt overfit the 4,000 sentences?
# 2. Vary $P$ in $\{1, 4, 16, 64\}$ for prompt and prefix tuning on the encoder. Which saturates
#    first?
# 3. Project a trained soft prompt onto its nearest vocabulary embeddings (Lester et al. §7) and
#    evaluate the resulting discrete prompt. How much accuracy survives the projection?
# 4. Implement P-Tuning v2 (Liu et al. 2021): prefix tuning without the MLP but with a
#    classification head on every token. Compare with the table above.
#
# ## References
#
# - Lester, Al-Rfou & Constant (2021), *The Power of Scale for Parameter-Efficient Prompt
#   Tuning*, arXiv:2104.08691, §2, §3.2, Fig. 1 and Fig. 3.
# - Li & Liang (2021), *Prefix-Tuning: Optimizing Continuous Prompts for Generation*,
#   arXiv:2101.00190, §4.
# - He, Zhou, Ma, Berg-Kirkpatrick & Neubig (2022), *Towards a Unified View of
#   Parameter-Efficient Transfer Learning*, arXiv:2110.04366, §3.1.
# - Liu et al. (2021), *P-Tuning v2*, arXiv:2110.07602.
# - Jiang, Xu, Araki & Neubig (2020), *How Can We Know What Language Models Know?*,
#   arXiv:1911.12543; Shin et al. (2020), *AutoPrompt*, arXiv:2010.15980.
# - PEFT documentation: `PromptTuningConfig`, `PrefixTuningConfig`.
