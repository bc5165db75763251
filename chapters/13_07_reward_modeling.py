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
# (reward-modeling)=
# # 13-07 Reward modeling
#
# ```{admonition} At a glance
# :class: tip
# **Prerequisites:** {ref}`instruction-tuning`, 1-07 (maximum likelihood). **Reading time:**
# ~10 min; the tiny profile runs in about 4 minutes on 2 CPU cores, 5½ on the first run (which
# trains the gold classifier).
# **You will build** `ftbook.reward_modeling`: validated preference records; the Bradley-Terry
# likelihood, its gradient and its maximum-likelihood fit, each checked against autograd or a
# closed form; a reward model (an LM backbone with a scalar head read at the last real token,
# under left or right padding) matched against `LlamaForSequenceClassification` and TRL's
# `RewardTrainer`; a training loop with held-out accuracy and a calibration plot; and best-of-$n$
# sampling that measures how much of the learned reward's gain is real against a gold reward.
# The trained reward model is saved for 13-08 and 13-09.
# ```
#
# Supervised fine-tuning (13-06) imitates demonstrations. For many goals it is easier to *judge*
# two answers than to write the best one, and RLHF turns such judgements into a training signal
# in two steps (Christiano et al. 2017, arXiv:1706.03741; Stiennon et al. 2020,
# arXiv:2009.01325; Ouyang et al. 2022, arXiv:2203.02155): fit a **reward model** $r_\phi(x, y)$
# to pairwise preferences, then optimise the policy against it (13-08 with PPO; 13-09 skips the
# explicit reward model). This chapter is the first step. Its last section shows why the second
# step needs a brake: the reward model is a proxy, and optimising a proxy hard enough makes the
# true objective worse (Gao et al. 2022, arXiv:2210.10760).
#
# **The running task of 13-07 to 13-09** is controlled sentiment generation, as in the DPO
# paper's IMDb experiment: the prompt asks the SFT model of 13-06 to continue the opening words of
# an SST-2 movie review, and the goal is a *positive* continuation. Human raters are replaced by
# a known **gold reward** $r^\star$: the positive-minus-negative logit of a sentiment classifier,
# counted only as far as the reply is a well-formed review (eq. 7.1b below), so that we can
# measure what human-feedback pipelines cannot: how well the learned reward
# agrees with the true one, and what happens to the true reward when the learned one is pushed.

# %%
from ftbook.workbench import device_cell, get_device, get_profile, seed_everything

CHAPTER = "13_07_reward_modeling"
PROFILE = get_profile()
SEED = 0
seed_everything(SEED)
DEVICE = get_device()
RUN_INFO = device_cell(PROFILE, SEED, DEVICE)

# %% [markdown]
# ## Configuration
#
# One frozen configuration per profile. The tiny profile samples four replies of at most 32
# tokens to each of 96 training prompts from 13-06's SFT model (SmolLM2-135M-Instruct after
# LoRA SFT) and labels all six pairs of each, as InstructGPT's labellers rank $K$ replies and
# every pair of the ranking becomes a comparison (Ouyang et al. 2022, §3.5). It samples 8
# replies to each of 32 held-out prompts: their disjoint pairs are the held-out comparisons, and
# all 8 feed best-of-$n$. Sampling from a 135M-parameter model is the expensive part on two CPU cores, and
# so is a backward pass through it: the tiny reward model keeps the SFT transformer frozen and
# trains its head on features computed once (`train_backbone=False`), while the full profile
# trains every weight, as InstructGPT does.

# %%
#| export
"""Reward modeling: preference records, the Bradley-Terry model, a reward model with a scalar
head read at the last real token, its training loop, calibration, and best-of-n over-optimisation.

Chapter 13-07. Bradley & Terry 1952 (Biometrika 39); Christiano et al. 2017 (arXiv:1706.03741);
Stiennon et al. 2020 (arXiv:2009.01325); Ouyang et al. 2022 (arXiv:2203.02155, §3.5); Gao et al.
2022 (arXiv:2210.10760) for over-optimisation; Beirami et al. 2024 (arXiv:2401.01879) for the KL
of best-of-n.
"""
import copy
import dataclasses
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# transformers is imported where used: it takes seconds to import
import torch
from torch import nn

from ftbook.base_models import pad_sequences  # Appendix C
from ftbook.prompt_tuning import position_ids_from_mask  # 13-05
from ftbook.workbench import cache_dir, check_finite, pick, progress


@dataclass(frozen=True)
class RewardModelConfig:
    """Budget and hyperparameters of chapter 13-07 (one per profile)."""

    n_train_prompts: int  # SST-2 train openings
    samples_per_prompt: int  # K replies per training prompt, all K(K-1)/2 pairs labelled
    max_new_tokens: int  # reply length cap when sampling from the SFT policy
    temperature: float  # sampling temperature of the SFT policy
    generate_batch_size: int
    max_len: int  # tokens of prompt + reply
    steps: int  # reward-model optimiser steps
    batch_size: int  # pairs per step
    lr: float
    weight_decay: float
    warmup_ratio: float
    eval_every: int  # held-out evaluation interval during training (chapter only)
    score_batch_size: int  # sequences per forward pass when scoring
    calibration_bins: int
    bon_prompts: int  # held-out prompts for best-of-n
    bon_max_n: int  # samples per prompt; n = 1, 2, 4, ..., bon_max_n
    bf16: bool = False  # autocast to bfloat16 (GPU)
    seed: int = 0
    train_backbone: bool = True  # False: train the head on the frozen SFT transformer's features


RM_CONFIGS = {
    "smoke": RewardModelConfig(n_train_prompts=24, samples_per_prompt=2, max_new_tokens=8,
                               temperature=1.0, generate_batch_size=16, max_len=128, steps=4,
                               batch_size=4, lr=1e-3, weight_decay=0.0, warmup_ratio=0.25,
                               eval_every=2, score_batch_size=32, calibration_bins=4,
                               bon_prompts=3, bon_max_n=8, train_backbone=False),
    "tiny": RewardModelConfig(n_train_prompts=96, samples_per_prompt=4, max_new_tokens=32,
                              temperature=1.0, generate_batch_size=64, max_len=256, steps=300,
                              batch_size=32, lr=3e-3, weight_decay=1.0, warmup_ratio=0.1,
                              eval_every=50, score_batch_size=64, calibration_bins=8,
                              bon_prompts=32, bon_max_n=8, train_backbone=False),
    "full": RewardModelConfig(n_train_prompts=2000, samples_per_prompt=4, max_new_tokens=48,
                              temperature=1.0, generate_batch_size=128, max_len=256, steps=500,
                              batch_size=32, lr=1e-5, weight_decay=0.01, warmup_ratio=0.05,
                              eval_every=100, score_batch_size=128, calibration_bins=10,
                              bon_prompts=64, bon_max_n=64, bf16=True),
}
RM_CHAPTER = "13_07_reward_modeling"  # the cache folder of this chapter's artefacts


# %%
cfg = pick(PROFILE, RM_CONFIGS)
print(cfg)

# %% [markdown]
# ## Preference data
#
# A preference record holds a prompt $x$ and two replies, the one the labeller preferred
# (`chosen`, $y_w$) and the other (`rejected`, $y_l$). Our records are dicts with the fields
# `prompt` (the user message), `chosen` and `rejected` (the reply texts, without the chat template
# or EOS), and, for the synthetic pairs, the gold rewards of both replies. Whatever produced them,
# records are checked before anything is trained on them: every field present, a string, not
# empty, and the two replies different. A pair of identical replies carries no preference: its
# two rewards are always equal, so it adds a constant $\ln 2$ to the loss, no gradient, and a tie
# to the accuracy, and it usually means a bug upstream (a sampler that returned the same text
# twice, a join on the wrong key). `validate_preference_records` raises Appendix B's
# `DataFormatError`, naming the record and field of each problem (the first five, and the count).

# %%
#| export
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
GOLD_FIELDS = ("gold_chosen", "gold_rejected")  # optional, numbers
MAX_REPORTED = 5


def preference_problems(records: Sequence[Any]) -> list[tuple[int, str, str]]:
    """(record index, field, what is wrong) for every problem in `records`: a record that is not
    a dict, a missing, non-string or empty `prompt`/`chosen`/`rejected`, chosen equal to
    rejected (after stripping whitespace), or a non-finite gold reward."""
    problems = []
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            problems.append((i, "-", f"is a {type(record).__name__}, expected a dict"))
            continue
        texts_ok = True
        for name in PREFERENCE_FIELDS:
            if name not in record:
                problems.append((i, name, "is missing"))
            elif not isinstance(record[name], str):
                problems.append((i, name, f"must be a string, got {type(record[name]).__name__}"))
            elif not record[name].strip():
                problems.append((i, name, "is empty"))
            else:
                continue
            texts_ok = False
        if texts_ok and record["chosen"].strip() == record["rejected"].strip():
            problems.append((i, "rejected", "equals 'chosen': the pair carries no preference"))
        for name in GOLD_FIELDS:
            if name in record:
                value = record[name]
                if isinstance(value, bool) or not isinstance(value, (int, float)) \
                        or not math.isfinite(value):
                    problems.append((i, name, f"must be a finite number, got {value!r}"))
    return problems


def validate_preference_records(records: Sequence[Any], what: str = "preference records"
                                ) -> list[dict]:
    """`records` as a list if every record is well formed, else Appendix B's `DataFormatError`
    listing the first problems as "record i, field 'name': problem"."""
    from ftbook.data import DataFormatError  # lazy: ftbook.data imports `datasets`

    records = list(records)
    if not records:
        raise DataFormatError(f"{what}: no records")
    problems = preference_problems(records)
    if problems:
        shown = "; ".join(f"record {i}, field {name!r}: {why}"
                          for i, name, why in problems[:MAX_REPORTED])
        more = f" (and {len(problems) - MAX_REPORTED} more)" if len(problems) > MAX_REPORTED else ""
        raise DataFormatError(f"{what}: {len(problems)} problem(s): {shown}{more}")
    return records


# %% [markdown]
# A real sample first: the harmless-base test split of Anthropic's HH-RLHF (Bai et al. 2022,
# arXiv:2204.05862), loaded by Appendix B's `load_hh_rlhf`, which splits each dialogue pair into
# the shared prompt and the two final assistant replies. We convert it to our records, run the
# checks, and measure one property reward models are known to pick up: length (Singhal et al.
# 2023, arXiv:2310.03716, find reward and length strongly correlated on helpfulness data).

# %%
import pandas as pd

from ftbook.data import DATA_SIZES, DataFormatError, load_hh_rlhf, subset
from ftbook.workbench import show_table

hh = subset(load_hh_rlhf(), pick(PROFILE, DATA_SIZES).hh_rlhf, seed=SEED)
hh_records = [{"prompt": r["prompt"], "chosen": r["chosen_response"],
               "rejected": r["rejected_response"]} for r in hh]
hh_problems = preference_problems(hh_records)
for i, name, why in hh_problems[:3]:
    print(f"HH-RLHF record {i}, field {name!r}: {why}")
try:
    validate_preference_records(hh_records, "HH-RLHF harmless-base")
except DataFormatError as error:
    print("rejected:", str(error)[:300])
bad = {i for i, _, _ in hh_problems}
hh_clean = [r for i, r in enumerate(hh_records) if i not in bad]
words = {side: torch.tensor([len(r[side].split()) for r in hh_clean], dtype=torch.float)
         for side in PREFERENCE_FIELDS}
hh_summary = pd.DataFrame({
    "pairs": [len(hh_records)], "invalid": [len(bad)],
    "prompt words (median)": [words["prompt"].median().item()],
    "chosen words (median)": [words["chosen"].median().item()],
    "rejected words (median)": [words["rejected"].median().item()],
    "longer reply is chosen": [(words["chosen"] > words["rejected"]).float().mean().item()],
    "equal length": [(words["chosen"] == words["rejected"]).float().mean().item()],
}, index=["HH-RLHF harmless-base"])
show_table(hh_summary, "hh_rlhf", CHAPTER)
from ftbook.workbench import binomial_interval

n_longer = int((words["chosen"] > words["rejected"]).sum())
longer_low, longer_high = binomial_interval(n_longer, len(hh_clean))
longer_verdict = ("less often than not" if longer_high < 0.5 else
                  "more often than not" if longer_low > 0.5 else
                  "about as often as not (the interval contains one half)")
print(f"{len(bad)} of {len(hh_records)} pairs fail the checks; in the {len(hh_clean)} valid ones "
      f"the longer reply is chosen in {n_longer / len(hh_clean):.1%} (95% Wilson interval "
      f"{longer_low:.1%} to {longer_high:.1%}), so {longer_verdict}; "
      f"{hh_summary['equal length'].item():.1%} of the pairs have replies of equal length")
print(f"median words: prompt {words['prompt'].median():.0f}, chosen "
      f"{words['chosen'].median():.0f}, rejected {words['rejected'].median():.0f}")

# %% [markdown]
# The printed lines read the table for this profile's subset. A few pairs have an empty reply,
# which the checks reject. Whether the longer reply is chosen more or less often than not is
# the second line's verdict, decided by its interval; on harmless-base data the preferred answer
# to a harmful request is often a short refusal, which pulls the share down. Length is a feature
# the labels correlate with, in either direction, and a reward model is free to learn it
# instead of what the labeller meant. The multi-turn HH dialogues (the median prompt length is
# printed) are also much longer than the running task's replies, which is one reason this book
# trains its reward model on the synthetic task below and keeps HH-RLHF for inspection.
#
# ## The Bradley-Terry model
#
# Bradley & Terry (1952) model a comparison of two items by a latent score per item. For two
# replies to the same prompt,
#
# $$
# P(y_w \succ y_l \mid x) = \frac{e^{r(x, y_w)}}{e^{r(x, y_w)} + e^{r(x, y_l)}}
# = \sigma\big(r(x, y_w) - r(x, y_l)\big),
# \tag{7.1}
# $$
#
# with $\sigma$ the logistic function. Fitting $r_\phi$ by maximum likelihood on $N$ labelled
# pairs minimises
#
# $$
# \mathcal{L}(\phi) = -\frac{1}{N} \sum_{i=1}^{N} \log \sigma(\Delta_i), \qquad
# \Delta_i = r_\phi(x_i, y_{w,i}) - r_\phi(x_i, y_{l,i}).
# \tag{7.2}
# $$
#
# **The gradient.** Since $\frac{d}{d\Delta}\log\sigma(\Delta) = 1 - \sigma(\Delta) =
# \sigma(-\Delta)$,
#
# $$
# \frac{\partial \mathcal{L}}{\partial r_{w,i}} = -\frac{\sigma(-\Delta_i)}{N}, \qquad
# \frac{\partial \mathcal{L}}{\partial r_{l,i}} = +\frac{\sigma(-\Delta_i)}{N}, \qquad
# \nabla_\phi \mathcal{L} = -\frac{1}{N}\sum_i \sigma(-\Delta_i)\,
# \big(\nabla_\phi r_{w,i} - \nabla_\phi r_{l,i}\big).
# \tag{7.3}
# $$
#
# Each pair pulls the two rewards apart with a weight equal to the model's current probability of
# ranking it *wrongly*: pairs already ranked with confidence stop contributing. Two facts follow
# from (7.1). The rewards are identified only up to a constant per prompt ($r + c(x)$ has the same
# likelihood), so a reward's absolute value means nothing; TRL's `center_rewards_coefficient`
# adds a penalty on $(r_w + r_l)^2$ to pin it (Eisenstein et al. 2023, arXiv:2312.09244, eq. 2).
# And $-\log\sigma(\Delta) = \operatorname{softplus}(-\Delta)$ must be computed as such:
# `log(sigmoid(Δ))` underflows to $-\infty$ in float32 once $\Delta < -104$.
#
# **A closed form for two items.** Let item $a$ beat item $b$ in $n_{ab}$ of $n_{ab} + n_{ba}$
# comparisons. The log-likelihood of $d = r_a - r_b$ is $n_{ab}\log\sigma(d) + n_{ba}
# \log\sigma(-d)$; setting its derivative $n_{ab}\sigma(-d) - n_{ba}\sigma(d)$ to zero gives
#
# $$
# \sigma(\hat d) = \frac{n_{ab}}{n_{ab} + n_{ba}}, \qquad
# \hat d = \log\frac{n_{ab}}{n_{ba}} = \operatorname{logit}(\hat p_{ab}),
# \tag{7.4}
# $$
#
# the logit of the empirical win rate. With $K$ items and $n_{ij}$ wins of $i$ over $j$, the same
# computation per item gives the score equations of the maximum-likelihood estimate:
#
# $$
# \underbrace{\sum_j n_{ij}}_{\text{observed wins of } i}
# = \underbrace{\sum_j (n_{ij} + n_{ji})\,\sigma(\hat r_i - \hat r_j)}_{\text{expected wins of } i},
# \qquad i = 1, \dots, K.
# \tag{7.5}
# $$
#
# The estimate exists (is finite) when the directed graph "$i$ beat $j$ at least once" is
# strongly connected, which needs in particular that every item has won and lost at least once
# (Zermelo 1929; Hunter 2004). The exported
# `fit_bradley_terry` solves (7.5) by gradient ascent with the gradient of (7.3).

# %%
#| export
def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
                       ) -> torch.Tensor:
    """Eq. (7.2): mean of -log sigmoid(r_chosen - r_rejected) over the batch, computed with
    `logsigmoid` (stable for any margin). Both inputs (batch,)."""
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.dim() != 1:
        raise ValueError(f"chosen and rejected rewards must both be (batch,), got "
                         f"{tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}")
    return -nn.functional.logsigmoid(chosen_rewards - rejected_rewards).mean()


def bradley_terry_grad(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (7.3): the gradient of `bradley_terry_loss` with respect to the chosen and the
    rejected rewards, -sigmoid(-Delta) / N and +sigmoid(-Delta) / N."""
    weight = torch.sigmoid(rejected_rewards - chosen_rewards) / chosen_rewards.numel()
    return -weight, weight


def pairwise_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    """Fraction of pairs ranked correctly (r_chosen > r_rejected); ties count one half, so a
    constant reward scores 0.5 (TRL's `accuracy` metric counts ties as wrong)."""
    wins = (chosen_rewards > rejected_rewards).float()
    ties = (chosen_rewards == rejected_rewards).float()
    return (wins + 0.5 * ties).mean().item()


def fit_bradley_terry(wins: torch.Tensor, max_steps: int = 100_000, tol: float = 1e-10
                      ) -> torch.Tensor:
    """Maximum-likelihood Bradley-Terry scores for K items from `wins` (K, K), wins[i, j] =
    times i beat j: gradient ascent with the gradient of eq. (7.3) until the score equations
    (7.5) hold to `tol`. Returns (K,) float64 scores that sum to zero (eq. 7.1 fixes them only up
    to a constant)."""
    wins = wins.double()
    if wins.dim() != 2 or wins.shape[0] != wins.shape[1]:
        raise ValueError(f"wins must be a square (K, K) matrix, got {tuple(wins.shape)}")
    won, lost = wins.sum(1), wins.sum(0)
    if bool((won == 0).any() | (lost == 0).any()):
        raise ValueError("every item must win and lose at least once, or its maximum-likelihood "
                         f"score is infinite: wins {won.tolist()}, losses {lost.tolist()}")
    games = wins + wins.T  # (K, K) comparisons between i and j
    step = 2.0 / games.sum(1).max().item()  # 1 / Lipschitz constant of the gradient
    scores = torch.zeros(wins.shape[0], dtype=torch.float64)
    for _ in range(max_steps):
        expected = (games * torch.sigmoid(scores[:, None] - scores[None, :])).sum(1)
        gradient = won - expected  # eq. (7.5): observed minus expected wins
        if gradient.abs().max().item() < tol:
            break
        scores = scores + step * gradient
    else:
        raise RuntimeError(f"no convergence in {max_steps} steps; is the comparison graph "
                           "strongly connected?")
    return scores - scores.mean()


# %% [markdown]
# Checks of (7.2)-(7.5): the analytic gradient against autograd, the stability of the loss at
# extreme margins, the two-item fit against the closed form (7.4), and a ten-item fit on
# simulated comparisons against the score equations and the true scores (within five standard
# errors of the fit, from its Fisher information). Tolerances come from the arithmetic
# (Appendix A); simulations are judged by their standard errors.

# %%
from ftbook.workbench import rounding_bound, unit_roundoff

torch.manual_seed(SEED)
chosen_r = torch.randn(16, dtype=torch.float64, requires_grad=True)
rejected_r = torch.randn(16, dtype=torch.float64, requires_grad=True)
bradley_terry_loss(chosen_r, rejected_r).backward()
grad_w, grad_l = bradley_terry_grad(chosen_r.detach(), rejected_r.detach())
gap = max((grad_w - chosen_r.grad).abs().max().item(), (grad_l - rejected_r.grad).abs().max().item())
print(f"eq. (7.3): max |analytic - autograd| = {gap:.1e}")
# Each entry is sigma(-Delta) / 16 <= 1/16, formed by either side in at most 8 roundings, each
# costing at most u (absolutely, even in 1 - sigma(Delta)) before the division by 16.
assert gap <= 2 * 8 * unit_roundoff(torch.float64) / 16

margins = torch.tensor([-200.0, 0.0, 200.0])
naive = -torch.log(torch.sigmoid(margins))
stable = -nn.functional.logsigmoid(margins)
print(f"-log sigmoid(Δ) at Δ = -200, 0, 200: naive {naive.tolist()}, stable {stable.tolist()}")
# float32 log1p(1) is accurate to a few ulp (<= 4 ulp = 8 u, relative) and ln 2 < 1; doubled
assert torch.isinf(naive[0]) and torch.isfinite(stable).all()
assert abs(stable[1] - math.log(2)) <= 16 * unit_roundoff()

two_items = torch.tensor([[0.0, 37.0], [13.0, 0.0]])  # a beat b 37 times, b beat a 13 times
fitted = fit_bradley_terry(two_items)
closed = math.log(37 / 13)
print(f"eq. (7.4): fitted r_a - r_b = {fitted[0] - fitted[1]:.10f}, logit(37/50) = {closed:.10f}")
# The fit stops once |observed - expected wins| < 1e-10 (its `tol`); near the optimum the
# expected wins move by n p (1 - p) per unit of r_a - r_b, so the score difference is within
# 1e-10 / (n p (1 - p)) of (7.4), doubled for the second-order terms and float64 rounding.
p_ab = 37 / 50
assert abs((fitted[0] - fitted[1]).item() - closed) <= 2 * 1e-10 / (50 * p_ab * (1 - p_ab))

K = 10
true_scores = torch.linspace(-2, 2, K, dtype=torch.float64)
generator = torch.Generator().manual_seed(SEED)
p_win = torch.sigmoid(true_scores[:, None] - true_scores[None, :])  # (K, K), eq. (7.1)
games_per_pair = 200
wins = torch.binomial(torch.full((K, K), float(games_per_pair), dtype=torch.float64).triu(1),
                      p_win.triu(1), generator=generator)
wins = wins + (games_per_pair - wins.T).tril(-1)  # below the diagonal: the games j lost
fitted = fit_bradley_terry(wins)
games = wins + wins.T
expected = (games * torch.sigmoid(fitted[:, None] - fitted[None, :])).sum(1)
# Standard errors of the fitted scores from the Fisher information: the inverse of the
# Laplacian of the comparison graph weighted by games_ij p_ij (1 - p_ij) (pseudo-inverse,
# since (7.1) fixes the scores only up to a constant and the fit centres them).
p_fit = torch.sigmoid(fitted[:, None] - fitted[None, :])
information = games * p_fit * (1 - p_fit)
stderr = torch.linalg.pinv(torch.diag(information.sum(1)) - information).diagonal().sqrt()
print(f"eq. (7.5): max |observed - expected wins| = {(wins.sum(1) - expected).abs().max():.1e}; "
      f"max |fitted - true score| = {(fitted - true_scores).abs().max():.3f} "
      f"({games_per_pair} games per pair; standard errors {stderr.min():.3f} to "
      f"{stderr.max():.3f})")
# (7.5) holds to the fit's tol = 1e-10; recomputing `expected` after centring the scores adds
# float64 rounding of K terms of total size at most the games played
assert (wins.sum(1) - expected).abs().max() <= 1e-10 + 2 * rounding_bound(
    K, games.sum(1).max().item(), torch.float64)
# statistical: every score within 5 standard errors of the truth (chance of failing < 1e-5)
assert ((fitted - true_scores).abs() < 5 * stderr).all()

# %% [markdown]
# ## The reward model
#
# A reward model is a language model whose output is one number per sequence. We take the
# transformer of the SFT model (its `base_model`, without the language-model head), read the last
# layer's hidden state $h_{T^\star} \in \mathbb{R}^d$ at the last real token of prompt plus
# reply, and map it to a scalar:
#
# $$
# r_\phi(x, y) = w^\top h_{T^\star}(x \oplus y), \qquad w \in \mathbb{R}^{d},
# \tag{7.6}
# $$
#
# with no bias, which (7.1) would cancel anyway. InstructGPT initialises its reward model from
# the SFT model in the same way (Ouyang et al. §3.5), so the reward model starts from a network
# that already reads the policy's outputs. The head $w$ starts at zero: every reward is 0 at
# step 0, and the loss starts at exactly $\ln 2$.
#
# The reply is rendered with the chat template and ends with EOS, so $T^\star$ is the EOS after
# the reply: its hidden state has attended to the whole conversation. Finding $T^\star$ must work
# for either padding side. The last position whose attention mask is 1 is
# $T^\star = \arg\max_t\, t \cdot m_t$, right for right padding ($T^\star = \sum_t m_t - 1$) and
# for left padding ($T^\star = T - 1$).
#
# Left padding also moves the real tokens to later positions, since transformers counts positions
# $0, 1, \dots, T-1$ whatever the mask. Whether that matters depends on the position encoding.
# Rotary embeddings (Llama, Qwen) make every attention score depend on the *difference* of two
# positions only, $q_m^\top k_n = f(q, k, m - n)$, so shifting all real tokens by the same amount
# changes nothing, and the masked pads are never attended to. Learned absolute positions (GPT-2,
# OPT) see the shift. The reward model passes position ids that count real tokens only,
# $p_t = \max(0, \sum_{s \le t} m_s - 1)$ (13-05's `position_ids_from_mask`), which is exact for
# both.

# %%
#| export
def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch,) index of the last position whose mask is 1: T* of eq. (7.6), for right and
    left padding alike. A row without any real token is an error."""
    mask = attention_mask.bool()
    if not bool(mask.any(-1).all()):
        raise ValueError("a row of attention_mask has no real token")
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (positions * mask).argmax(-1)


class RewardModel(nn.Module):
    """A transformer backbone and a linear scalar head read at the last real token, eq. (7.6)
    (Stiennon et al. 2020, arXiv:2009.01325, §3.4; Ouyang et al. 2022, arXiv:2203.02155, §3.5).

    `forward(input_ids, attention_mask)` returns rewards (batch,) in float32. Stored as the
    transformers sequence classifier with one label (`save_pretrained`, `from_pretrained`), which
    TRL's trainers and `AutoModelForSequenceClassification` load as they are.
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        if head.out_features != 1:
            raise ValueError("the head must map to one number, got "
                             f"out_features={head.out_features}")
        self.backbone = backbone  # (batch, seq) -> hidden states (batch, seq, d)
        self.head = head  # (d,) -> (1,), no bias

    @classmethod
    def from_causal_lm(cls, causal_lm: nn.Module) -> "RewardModel":
        """A copy of `causal_lm`'s transformer (without its LM head) and a zero head."""
        backbone = copy.deepcopy(causal_lm.base_model)
        reference = backbone.get_input_embeddings().weight
        head = nn.Linear(backbone.config.hidden_size, 1, bias=False)
        nn.init.zeros_(head.weight)
        return cls(backbone, head.to(reference.device, reference.dtype))

    @property
    def config(self) -> Any:
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids_from_mask(attention_mask),
                               use_cache=False).last_hidden_state  # (batch, seq, d)
        last = last_token_index(attention_mask)  # (batch,)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (batch, d)
        return self.head(pooled).squeeze(-1).float()  # (batch,)

    def to_sequence_classifier(self, pad_token_id: int | None = None) -> nn.Module:
        """A transformers `...ForSequenceClassification` (num_labels=1) holding a copy of the
        backbone and the head as its `score`; it reads the last token that is not
        `pad_token_id` (default: the backbone config's)."""
        from transformers import AutoModelForSequenceClassification

        config = copy.deepcopy(self.config)
        config.num_labels = 1
        config.architectures = None
        config.pad_token_id = pad_token_id if pad_token_id is not None else config.pad_token_id
        if config.pad_token_id is None:
            raise ValueError("the sequence classifier needs pad_token_id to find the last token")
        classifier = AutoModelForSequenceClassification.from_config(
            config, attn_implementation=self.config._attn_implementation)
        weight = self.head.weight
        classifier.to(weight.device, weight.dtype)
        classifier.base_model.load_state_dict(self.backbone.state_dict())
        with torch.no_grad():
            classifier.score.weight.copy_(weight)
        return classifier.eval()

    def save_pretrained(self, folder: str | Path, pad_token_id: int | None = None) -> None:
        """Save as a transformers sequence classifier with one label."""
        self.to_sequence_classifier(pad_token_id).save_pretrained(folder)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32,
                        attn_implementation: str | None = None) -> "RewardModel":
        """Load what `save_pretrained` (or any one-label sequence classifier with a `score`
        head, such as TRL's `RewardTrainer` output) saved."""
        from transformers import AutoModelForSequenceClassification

        classifier = AutoModelForSequenceClassification.from_pretrained(
            folder, dtype=dtype, attn_implementation=attn_implementation)
        if classifier.config.num_labels != 1 or not isinstance(
                getattr(classifier, "score", None), nn.Linear):
            raise ValueError(f"{folder}: expected a sequence classifier with num_labels=1 and a "
                             f"`score` head, got num_labels={classifier.config.num_labels}")
        return cls(classifier.base_model, classifier.score)


# %% [markdown]
# Quick checks on random tiny models: the zero head gives the loss $\ln 2$; rewards of sequences
# of different lengths are the same unpadded, right-padded and left-padded; without our position
# ids, left padding is harmless for the rotary Llama and not for an absolute-position GPT-2.

# %%
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

torch.manual_seed(SEED)
toy_lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, pad_token_id=0,
                                      attn_implementation="eager"))
toy_gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2,
                                      n_positions=64, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2, attn_implementation="eager"))
toy_rm = RewardModel.from_causal_lm(toy_lm)
sequences = [torch.randint(1, 64, (n,)).tolist() for n in (5, 9, 3, 7)]
zero_rewards = toy_rm(torch.tensor([sequences[0]]), torch.ones(1, 5, dtype=torch.long))
assert zero_rewards.abs().max() == 0
print(f"zero head: loss {bradley_terry_loss(zero_rewards, zero_rewards).item():.6f} = ln 2")


def pad_rows(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    batch = pad_sequences(rows, 0, side)  # Appendix C's padding, pad id 0
    return batch["input_ids"], batch["attention_mask"]


from ftbook.instruction_tuning import transformer_tolerance

padding_rows, padding_tolerance = {}, {}
for name, lm in (("Llama (rotary)", toy_lm), ("GPT-2 (absolute)", toy_gpt2)):
    rm = RewardModel.from_causal_lm(lm).eval()
    torch.nn.init.normal_(rm.head.weight, std=1.0)  # a non-trivial head for the checks
    with torch.no_grad():
        alone = torch.cat([rm(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))
                           for r in sequences])
        ids, mask = pad_rows(sequences, "left")
        hidden = rm.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        padding_rows[name] = {
            "right padding": (rm(*pad_rows(sequences, "right")) - alone).abs().max().item(),
            "left padding": (rm(ids, mask) - alone).abs().max().item(),
            "left, positions 0..T-1": (rm.head(hidden[:, -1]).squeeze(-1) - alone).abs().max()
            .item()}
        # rounding only (13-06's transformer tolerance), for rewards of the size of `alone`
        padding_tolerance[name] = transformer_tolerance(lm.config, ids.shape[1],
                                                        alone.abs().max().item())
padding_check = pd.DataFrame(padding_rows).T
show_table(padding_check, "padding_check", CHAPTER, floatfmt="{:.1e}")
print("rounding tolerances:", {k: f"{v:.1e}" for k, v in padding_tolerance.items()})
for name, row in padding_check.iterrows():
    assert row["right padding"] <= padding_tolerance[name]
    assert row["left padding"] <= padding_tolerance[name]
tolerance = padding_tolerance["Llama (rotary)"]
assert padding_check.loc["Llama (rotary)", "left, positions 0..T-1"] <= tolerance
# shifted absolute positions change the rewards by far more than rounding could
tolerance = padding_tolerance["GPT-2 (absolute)"]
assert padding_check.loc["GPT-2 (absolute)", "left, positions 0..T-1"] > tolerance

# %% [markdown]
# ## Batches and the training loop
#
# A pair is tokenized as two full conversations, the user turn rendered with 13-06's chat
# template and the reply followed by EOS (`reward_model_text`). A batch of $B$ pairs is one tensor
# of $2B$ rows, the chosen sequences first and the rejected ones after them, right-padded: the
# layout of TRL's `DataCollatorForPreference`, so that one forward pass scores both sides.
#
# The loop samples pairs in seeded, reshuffled epochs, warms the learning rate up and decays it
# linearly (Appendix C's `schedule_factor`), clips the gradient norm at 1, and stops with a clear
# error when the loss stops being finite (`bradley_terry_steps`). That loop is written once and
# takes the rewards as a function of the batch's pair indices: `train_reward_model` runs the whole
# model on the collated batch, and `train_reward_head` (below) reads features computed once. The
# metric is the held-out pairwise accuracy, the fraction of pairs the reward model ranks as the
# labeller did.

# %%
#| export
from ftbook.base_models import schedule_factor  # Appendix C
from ftbook.instruction_tuning import (
    REVIEW_PROMPT,
    conversation_to_prompt_and_output,
    generate_responses,
    load_sft_model,
    render_prompt,
    repeat_cache,
    shared_prefix_cache,
)


def reward_model_text(tokenizer: Any, prompt: str, reply: str) -> str:
    """What the reward model reads: the conversation (user turn `prompt`, assistant turn the
    stripped `reply`) in the chat template, as 13-06's `conversation_to_prompt_and_output`
    renders it for SFT, up to and including the EOS that ends the reply."""
    if tokenizer.eos_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError("the tokenizer needs an EOS token distinct from its pad token: the "
                         "reward is read at the EOS that ends the reply")
    if not reply.strip():  # the policy stopped at once: EOS right after the header
        return render_prompt(tokenizer, prompt) + tokenizer.eos_token
    prompt_text, output = conversation_to_prompt_and_output(
        tokenizer, [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": reply.strip()}])
    text = prompt_text + output
    return text[:text.rindex(tokenizer.eos_token) + len(tokenizer.eos_token)]


def encode_preference_pairs(tokenizer: Any, records: Sequence[Mapping[str, Any]], max_len: int
                            ) -> list[tuple[list[int], list[int]]]:
    """(chosen_ids, rejected_ids) per validated record; a side longer than `max_len` tokens is
    an error naming the record (cutting it would drop the EOS the reward is read at)."""
    records = validate_preference_records(records)
    pairs = []
    for i, record in enumerate(records):
        sides = []
        for name in ("chosen", "rejected"):
            text = reward_model_text(tokenizer, record["prompt"], record[name])
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > max_len:
                raise ValueError(f"record {i}, field {name!r}: {len(ids)} tokens with the prompt,"
                                 f" more than max_len={max_len}")
            sides.append(ids)
        pairs.append((sides[0], sides[1]))
    return pairs


def collate_pairs(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int,
                  padding_side: str = "right") -> dict[str, torch.Tensor]:
    """(2B, T) `input_ids` and `attention_mask`: the B chosen sequences, then the B rejected
    ones (the layout of TRL's `DataCollatorForPreference`)."""
    return pad_sequences([c for c, _ in pairs] + [r for _, r in pairs], pad_token_id,
                         padding_side)


@torch.no_grad()
def score_pairs(reward_model: nn.Module, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                pad_token_id: int, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen_rewards, rejected_rewards), each (pairs,) float32 on the CPU: the head applied
    to `last_token_features` (the shared prefix encoded once)."""
    rewards = score_rows(reward_model, [c for c, _ in pairs] + [r for _, r in pairs],
                         pad_token_id, batch_size)
    return rewards[:len(pairs)], rewards[len(pairs):]


@torch.no_grad()
def score_rows(reward_model: nn.Module, rows: Sequence[Sequence[int]], pad_token_id: int,
               batch_size: int = 32) -> torch.Tensor:
    """(n,) float32 rewards on the CPU of token `rows`, eq. (7.6), computed as the head applied
    to `last_token_features`."""
    if not rows:
        return torch.zeros(0)
    features = last_token_features(reward_model, rows, pad_token_id, batch_size)
    head = reward_model.head
    return head(features.to(head.weight.device, head.weight.dtype)).squeeze(-1).float().cpu()


@torch.no_grad()
def score_replies(reward_model: nn.Module, tokenizer: Any, prompts: Sequence[str],
                  replies: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """(n,) float32 rewards on the CPU of `replies` to the user messages `prompts`, eq. (7.6).
    Empty replies are scored too (the reward model then reads the EOS right after the
    assistant header)."""
    if len(prompts) != len(replies):
        raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
    rows = [tokenizer(reward_model_text(tokenizer, p, y), add_special_tokens=False)["input_ids"]
            for p, y in zip(prompts, replies, strict=True)]
    return score_rows(reward_model, rows, tokenizer.pad_token_id, batch_size)


def evaluate_reward_model(reward_model: nn.Module,
                          pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                          pad_token_id: int, batch_size: int = 32) -> dict[str, float]:
    """Held-out `loss` (eq. 7.2) and pairwise `accuracy`."""
    chosen, rejected = score_pairs(reward_model, pairs, pad_token_id, batch_size)
    return {"loss": bradley_terry_loss(chosen, rejected).item(),
            "accuracy": pairwise_accuracy(chosen, rejected)}


@dataclass
class RewardLog:
    """What `train_reward_model` measured."""

    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)  # on each training batch
    evals: list[dict] = field(default_factory=list)  # {"step", "loss", "accuracy"}
    step_seconds: list[float] = field(default_factory=list)
    feature_seconds: float = 0.0  # frozen backbone: computing the features once


def draw_batch(order: list[int], n: int, batch_size: int, generator: torch.Generator
               ) -> list[int]:
    """The next `batch_size` indices of seeded, reshuffled epochs over `n` items: popped from
    `order` (the rest of the current epoch, changed in place), refilled by a fresh permutation
    when it runs out."""
    rows = []
    while len(rows) < batch_size:
        if not order:
            order += torch.randperm(n, generator=generator).tolist()
        rows.append(order.pop())
    return rows


def bradley_terry_steps(params: list[torch.Tensor],
                        rewards_of: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]],
                        num_pairs: int, log: RewardLog, *, steps: int, lr: float,
                        batch_size: int, seed: int, weight_decay: float, warmup_ratio: float,
                        max_grad_norm: float, evaluate: Callable[[int], None], eval_every: int,
                        desc: str) -> None:
    """The loop both reward-model trainers share: `steps` AdamW steps on eq. (7.2) over batches
    of pair indices drawn in seeded, reshuffled epochs (`draw_batch`), with a linear warmup and
    decay (Appendix C) and gradient clipping. `rewards_of(rows)` returns the (chosen, rejected)
    rewards of those pairs, (B,) each; `evaluate(step)` runs at step 0 and every `eval_every`
    steps. Appends to `log`; raises `FloatingPointError` if the loss is not finite."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    warmup = round(warmup_ratio * steps)
    evaluate(0)
    order: list[int] = []
    for step in progress(range(steps), desc=desc):
        start = time.perf_counter()
        rows = draw_batch(order, num_pairs, batch_size, generator)
        for group in optimizer.param_groups:
            group["lr"] = lr * schedule_factor("linear", step, steps, warmup)
        chosen, rejected = rewards_of(rows)  # (B,) each
        loss = bradley_terry_loss(chosen, rejected)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.losses.append(check_finite(loss, f"{desc} loss", step))
        log.accuracies.append(pairwise_accuracy(chosen.detach(), rejected.detach()))
        log.step_seconds.append(time.perf_counter() - start)
        if eval_every and (step + 1) % eval_every == 0:
            evaluate(step + 1)


def train_reward_model(reward_model: nn.Module,
                       pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, steps: int,
                       lr: float, batch_size: int, pad_token_id: int, seed: int,
                       weight_decay: float = 0.0, warmup_ratio: float = 0.1,
                       max_grad_norm: float = 1.0,
                       eval_pairs: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None,
                       eval_every: int = 0, bf16: bool = False, desc: str = "reward model"
                       ) -> RewardLog:
    """Minimise eq. (7.2) over `pairs` (chosen_ids, rejected_ids) with AdamW, a linear warmup and
    decay, and gradient clipping; pairs are drawn in seeded, reshuffled epochs. With
    `eval_pairs` and `eval_every`, held-out loss and accuracy are logged at step 0 and every
    `eval_every` steps. Raises `FloatingPointError` if the loss is not finite."""
    if not pairs:
        raise ValueError("no training pairs")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got {steps} and {batch_size}")
    device = next(reward_model.parameters()).device
    log = RewardLog()

    def rewards_of(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = collate_pairs([pairs[i] for i in rows], pad_token_id)
        reward_model.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            rewards = reward_model(**{k: v.to(device) for k, v in batch.items()})  # (2B,)
        return rewards.float().chunk(2)

    def evaluate(step: int) -> None:
        if eval_pairs and eval_every:
            log.evals.append({"step": step, **evaluate_reward_model(
                reward_model, eval_pairs, pad_token_id, 2 * batch_size)})

    bradley_terry_steps([p for p in reward_model.parameters() if p.requires_grad], rewards_of,
                        len(pairs), log, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                        weight_decay=weight_decay, warmup_ratio=warmup_ratio,
                        max_grad_norm=max_grad_norm, evaluate=evaluate, eval_every=eval_every,
                        desc=desc)
    reward_model.eval()
    return log


@torch.no_grad()
def last_token_features(reward_model: "RewardModel", rows: Sequence[Sequence[int]],
                        pad_token_id: int, batch_size: int = 32) -> torch.Tensor:
    """(n, d) float32 hidden states h_{T*} of eq. (7.6) of token `rows`, from the backbone
    alone: what the head reads when the backbone is frozen. Rows are right-padded in batches
    sorted by length; the token prefix that all rows share (the system prompt) is encoded once
    and its key/value cache reused, which changes the batching and nothing else."""
    if not rows:
        raise ValueError("no rows to score")

    device = next(reward_model.parameters()).device
    reward_model.eval()
    shared, prefix_cache = shared_prefix_cache(  # T* stays in the suffix
        reward_model.backbone, rows, min(len(r) for r in rows) - 1)
    features = torch.zeros(len(rows), reward_model.config.hidden_size)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = pad_sequences([rows[i][shared:] for i in chunk], pad_token_id)
        mask = batch["attention_mask"].to(device)  # (b, L)
        kwargs = {}
        if prefix_cache is not None:
            kwargs["past_key_values"] = repeat_cache(prefix_cache, len(chunk))
            mask = torch.cat([mask.new_ones(len(chunk), shared), mask], dim=1)
        hidden = reward_model.backbone(input_ids=batch["input_ids"].to(device),
                                       attention_mask=mask, **kwargs).last_hidden_state
        last = last_token_index(batch["attention_mask"]).to(device)  # (b,) within the suffix
        features[chunk] = hidden[torch.arange(len(chunk), device=device), last].float().cpu()
    return features


def train_reward_head(reward_model: "RewardModel",
                      pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, steps: int,
                      lr: float, batch_size: int, pad_token_id: int, seed: int,
                      weight_decay: float = 0.0, warmup_ratio: float = 0.1,
                      max_grad_norm: float = 1.0,
                      eval_pairs: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None,
                      eval_every: int = 0, desc: str = "reward head") -> RewardLog:
    """`train_reward_model` with the backbone frozen: the features h_{T*} of every sequence are
    computed once (`last_token_features`), then only the head w of eq. (7.6) is trained, with the
    same loss (7.2), batches, schedule and clipping. A linear head on frozen features is a
    logistic regression on feature differences: r(a) - r(b) = w^T (h_a - h_b)."""
    if not pairs:
        raise ValueError("no training pairs")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got {steps} and {batch_size}")
    start = time.perf_counter()

    def side_features(pair_list: Sequence[tuple[Sequence[int], Sequence[int]]]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of each pair's sides, each distinct sequence computed once (a reply
        compared K - 1 times is encoded once)."""
        index: dict[tuple[int, ...], int] = {}
        for c, r in pair_list:
            index.setdefault(tuple(c), len(index))
            index.setdefault(tuple(r), len(index))
        features = last_token_features(reward_model, [list(k) for k in index], pad_token_id)
        return (features[[index[tuple(c)] for c, _ in pair_list]],
                features[[index[tuple(r)] for _, r in pair_list]])

    h_chosen, h_rejected = side_features(pairs)  # (pairs, d) each
    if eval_pairs:
        eval_chosen, eval_rejected = side_features(eval_pairs)
    log = RewardLog(feature_seconds=time.perf_counter() - start)
    head = reward_model.head
    weight = head.weight.detach().float().cpu().clone().requires_grad_(True)  # (1, d)

    def rewards_of(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return h_chosen[rows] @ weight[0], h_rejected[rows] @ weight[0]  # w^T h, (B,) each

    def evaluate(step: int) -> None:
        if eval_pairs and eval_every:
            with torch.no_grad():
                c, r = eval_chosen @ weight[0], eval_rejected @ weight[0]
            log.evals.append({"step": step, "loss": bradley_terry_loss(c, r).item(),
                              "accuracy": pairwise_accuracy(c, r)})

    bradley_terry_steps([weight], rewards_of, len(pairs), log, steps=steps, lr=lr,
                        batch_size=batch_size, seed=seed, weight_decay=weight_decay,
                        warmup_ratio=warmup_ratio, max_grad_norm=max_grad_norm,
                        evaluate=evaluate, eval_every=eval_every, desc=desc)
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight.device, head.weight.dtype))
    reward_model.eval()
    return log


def fit_reward_model(reward_model: "RewardModel",
                     pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                     cfg: RewardModelConfig, pad_token_id: int,
                     eval_pairs: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None
                     ) -> RewardLog:
    """The chapter's recipe for `cfg`: `train_reward_model` (every weight) or, with
    `cfg.train_backbone` False, `train_reward_head` (the head on frozen features)."""
    args = dict(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
                pad_token_id=pad_token_id, seed=cfg.seed, weight_decay=cfg.weight_decay,
                warmup_ratio=cfg.warmup_ratio, eval_pairs=eval_pairs,
                eval_every=cfg.eval_every if eval_pairs else 0)
    if cfg.train_backbone:
        return train_reward_model(reward_model, pairs, bf16=cfg.bf16, **args)
    return train_reward_head(reward_model, pairs, **args)


# %% [markdown]
# A quick check of the loop on a separable toy problem: in every pair the chosen sequence ends
# with token 7 and the rejected one with token 9. The loss must fall from $\ln 2$ and the
# accuracy reach 1.

# %%
toy_rm = RewardModel.from_causal_lm(toy_lm)
toy_pairs = []
for _ in range(32):
    body = torch.randint(10, 64, (int(torch.randint(3, 8, ())),)).tolist()
    toy_pairs.append((body + [7], body + [9]))
toy_log = train_reward_model(toy_rm, toy_pairs, steps=30, lr=1e-2, batch_size=8, pad_token_id=0,
                             seed=SEED, desc="toy reward model")
toy_eval = evaluate_reward_model(toy_rm, toy_pairs, pad_token_id=0)
print(f"toy problem: loss {toy_log.losses[0]:.3f} -> {toy_log.losses[-1]:.3f}, "
      f"accuracy {toy_eval['accuracy']:.2f}")
# The zero head makes every reward exactly 0: the first loss is float32 ln 2 (see above).
assert abs(toy_log.losses[0] - math.log(2)) <= 16 * unit_roundoff()
# A known answer with a wide margin: over six seeds of model and data, the last loss was 0.0005
# and the smallest reward margin on the 32 pairs about 7.6 (accuracy 1), against 0.3 and 0.
assert toy_log.losses[-1] < 0.3
assert toy_eval["accuracy"] == 1.0

# %% [markdown]
# ## The running task: prompts, gold reward and preference pairs
#
# **Prompts.** `sentiment_prompts` takes seeded SST-2 sentences of at least seven words from the
# requested split, cuts the first three to six words as the opening, and writes 13-06's
# `REVIEW_PROMPT` around it. Training prompts come from SST-2 train, held-out prompts from its
# validation split.
#
# **Gold reward.** A reader asked for a movie review wants a review: a sentence of reasonable
# length, not a fragment, a word list or one word repeated, and among those, the more positive
# the better. The gold reward says exactly that. Its sentiment part is
# $s(y) = z_+(y) - z_-(y)$, the difference of the two logits of an SST-2 classifier on the
# reply: the log-odds of "positive". In the tiny profile the classifier is MiniLM fine-tuned with
# 13-01's `train_classifier` and full fine-tuning recipe (`FT_CONFIGS`); in smoke it is the random
# tiny BERT trained for a few steps; it is trained once and cached. A sentiment classifier alone
# is a poor judge of replies: it scores "great" or "a great film" as very positive, and a policy
# optimised against it learns to say exactly that (the first version of this book's PPO chapter
# did). So the sentiment counts only as far as the reply is a review:
#
# $$
# r^\star(y) = g(y)\, s(y) + \big(1 - g(y)\big)\, r_\text{floor},
# \qquad g(y) = g_\text{len}\, g_\text{rep}\, g_\text{func}\, g_\text{end} \in [0, 1],
# \tag{7.1b}
# $$
#
# where, with $n$ the number of words of $y$: $g_\text{len} = \min(1, n / 8)$ (a sentence, not
# a fragment); $g_\text{rep} = \min(1, d / 0.7)$ with $d$ the share of distinct words (no
# repetition loops); $g_\text{func} = \min(1, f / 0.2)$ with $f$ the share of function words
# such as "the", "of", "is" (running text rather than a list of adjectives; they make up about
# half of English text); and $g_\text{end} = 1$ if the reply ends a sentence (., ! or ?), else
# $1/2$ (cut off mid-sentence). A reply with $g = 0$ gets $r_\text{floor} = -4$, a value on the
# scale of the sentiment log-odds of a clearly negative review: to the reader, a non-answer is
# as bad as a bad review (the cell after the code prints where a fluent negative review lands).
# That cell measures $g$ on real reviews and on degenerate replies.
#
# **Preference pairs.** For each prompt the SFT policy samples two replies $a, b$; a simulated
# labeller prefers $a$ with probability $\sigma(r^\star(a) - r^\star(b))$, eq. (7.1) with the gold
# reward. The labels are therefore noisy in a known way: even a reward model equal to $r^\star$
# cannot predict them all, and its expected accuracy, $\mathbb{E}\,\sigma(|r^\star(a) -
# r^\star(b)|)$, is the ceiling for ours. The DPO paper's IMDb experiment builds its pairs the
# same way, with a RoBERTa sentiment classifier as the gold reward.

# %%
#| export
import random
import re
from itertools import combinations

from ftbook.base_models import load_encoder_classifier
from ftbook.full_finetuning import FT_CONFIGS, evaluate_accuracy, train_classifier

SST2_MIN_WORDS = 7  # a sentence must leave words to continue after the opening
OPENING_WORDS = (3, 6)  # the opening's length in words, drawn uniformly
CACHE_FORMAT = 2  # bump to invalidate the cached gold classifiers and reward models
RECIPE_FILE = "recipe.json"


def sentiment_prompts(split: str, n: int, seed: int) -> list[str]:
    """`n` user messages `REVIEW_PROMPT.format(opening=...)` from distinct, seeded SST-2 `split`
    ("train" or "validation") sentences of at least `SST2_MIN_WORDS` words; the opening is their
    first 3 to 6 words."""
    from ftbook.data import load_sst2  # lazy: ftbook.data imports `datasets`

    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    sentences = [s.strip() for s in load_sst2(split)["sentence"]
                 if len(s.split()) >= SST2_MIN_WORDS]
    if n > len(sentences):
        raise ValueError(f"asked for {n} prompts, SST-2 {split} has {len(sentences)} sentences "
                         f"of at least {SST2_MIN_WORDS} words")
    rng = random.Random(seed)
    prompts = []
    for index in rng.sample(range(len(sentences)), n):
        opening = " ".join(sentences[index].split()[:rng.randint(*OPENING_WORDS)])
        prompts.append(REVIEW_PROMPT.format(opening=opening))
    return prompts


GOLD_MIN_WORDS = 8  # g_len = min(1, n / 8)
GOLD_MIN_DISTINCT = 0.7  # g_rep = min(1, share of distinct words / 0.7)
GOLD_MIN_FUNCTION = 0.2  # g_func = min(1, share of function words / 0.2)
GOLD_FLOOR = -4.0  # r_floor of eq. (7.1b)
FUNCTION_WORDS = frozenset(
    "the a an of to and in is it that this with for as but its was on be by not are at from or "
    "his her their they he she you we i me my your our has have had were been so than too very "
    "all no if what who which when there more most just about into can will would do does "
    "'s n't".split())


def well_formedness(text: str) -> float:
    """g(y) of eq. (7.1b): the product of the length, repetition, function-word and ending
    factors, in [0, 1]; 0 for an empty reply."""
    words = text.lower().split()
    if not words:
        return 0.0
    n = len(words)
    g_len = min(1.0, n / GOLD_MIN_WORDS)
    g_rep = min(1.0, len(set(words)) / n / GOLD_MIN_DISTINCT)
    g_func = min(1.0, sum(w in FUNCTION_WORDS for w in words) / n / GOLD_MIN_FUNCTION)
    g_end = 1.0 if re.search(r"[.!?][\"')]*$", text.strip()) else 0.5
    return g_len * g_rep * g_func * g_end


class GoldReward:
    """The gold reward of the running task, eq. (7.1b): the sentiment log-odds s(y) of an SST-2
    classifier on the reply, counted as far as the reply is a review (`well_formedness`), with
    the floor GOLD_FLOOR for a reply that is none. Calling it on a list of n replies returns an
    (n,) float32 tensor on the CPU; `sentiment` returns s(y) alone. `info` holds what was
    measured when the classifier was trained."""

    def __init__(self, model: nn.Module, tokenizer: Any, max_len: int = 64,
                 batch_size: int = 64, info: dict | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_len, self.batch_size = max_len, batch_size
        self.info = info or {}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("pass a list of replies, not one string")
        g = torch.tensor([well_formedness(t) for t in texts], dtype=torch.float32)
        return g * self.sentiment(texts) + (1 - g) * GOLD_FLOOR

    @torch.no_grad()
    def sentiment(self, texts: Sequence[str]) -> torch.Tensor:
        """s(y) = logit(positive) - logit(negative) of the classifier, (n,) float32."""
        if isinstance(texts, str):
            raise TypeError("pass a list of replies, not one string")
        device = next(self.model.parameters()).device
        self.model.eval()
        scores = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer([t.strip() for t in texts[i:i + self.batch_size]],
                                   padding=True, truncation=True, max_length=self.max_len,
                                   return_tensors="pt").to(device)
            logits = self.model(**batch).logits.float()  # (batch, 2)
            scores.append((logits[:, 1] - logits[:, 0]).cpu())
        return torch.cat(scores) if scores else torch.zeros(0)


def _recipe_matches(folder: Path, recipe: dict) -> bool:
    path = folder / RECIPE_FILE
    return path.is_file() and json.loads(path.read_text()) == json.loads(json.dumps(recipe))


def _save_atomically(folder: Path, write: Callable[[Path], None], recipe: dict) -> None:
    """Write into a temporary sibling folder, add the recipe, then replace `folder` by it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{folder.name}.tmp-", dir=folder.parent))
    try:
        write(tmp)
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=1, sort_keys=True))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def gold_recipe(profile: str) -> dict:
    """What the cached gold classifier of `profile` was trained with (13-01's `FT_CONFIGS`)."""
    return {"format": CACHE_FORMAT, "profile": profile,
            **dataclasses.asdict(pick(profile, FT_CONFIGS))}


def train_gold_classifier(profile: str, folder: Path, device: torch.device | None = None
                          ) -> dict:
    """Fine-tune the profile's encoder on SST-2 train with 13-01's full fine-tuning recipe
    (`FT_CONFIGS[profile]`: `train_classifier` at `lr_full`) and save it with its tokenizer and
    its dev accuracy under `folder`. Returns the info dict."""
    from ftbook.data import load_sst2  # lazy: ftbook.data imports `datasets`
    from ftbook.data import subset as subset_rows

    cfg = pick(profile, FT_CONFIGS)
    model, tokenizer = load_encoder_classifier(profile, seed=cfg.seed)
    model.to(device or torch.device("cpu"))
    train = subset_rows(load_sst2("train"), cfg.n_train, cfg.seed, stratify_by="label")
    dev = subset_rows(load_sst2("validation"), cfg.n_dev, cfg.seed, stratify_by="label")
    start = time.perf_counter()
    train_classifier(model, tokenizer, train, steps=cfg.steps, lr=cfg.lr_full,
                     batch_size=cfg.batch_size, max_len=cfg.max_len, seed=cfg.seed,
                     warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay, bf16=cfg.bf16,
                     desc="gold classifier")
    info = {"dev_accuracy": evaluate_accuracy(model, tokenizer, dev, cfg.max_len),
            "dev_rows": len(dev), "train_rows": len(train),
            "train_seconds": time.perf_counter() - start, "max_len": cfg.max_len}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "info.json").write_text(json.dumps(info, indent=1))

    _save_atomically(folder, write, gold_recipe(profile))
    return info


def load_gold_reward(profile: str, device: torch.device | None = None) -> GoldReward:
    """The gold reward of `profile`, loaded from cache_dir("13_07_reward_modeling",
    f"gold-{profile}") with `from_pretrained`; trained and saved first if missing or trained with
    another recipe (`train_gold_classifier`)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = cache_dir(RM_CHAPTER) / f"gold-{profile}"
    if not _recipe_matches(folder, gold_recipe(profile)):
        train_gold_classifier(profile, folder, device)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if device is not None:
        model.to(device)
    info = json.loads((folder / "info.json").read_text())
    return GoldReward(model, tokenizer, max_len=info["max_len"], info=info)


def draw_preferences(gold_a: torch.Tensor, gold_b: torch.Tensor, seed: int) -> torch.Tensor:
    """(n,) bool: True where reply a is preferred, drawn with P = sigmoid(gold_a - gold_b),
    eq. (7.1) with the gold reward (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.rand(gold_a.shape, generator=generator, dtype=torch.float64)
    return uniform < torch.sigmoid(gold_a.double() - gold_b.double())


def sample_per_prompt(policy: nn.Module, tokenizer: Any, prompts: Sequence[str], n: int, *,
                      max_new_tokens: int, seed: int, temperature: float = 1.0,
                      batch_size: int = 32) -> list[list[str]]:
    """`n` replies (stripped) sampled from `policy` for each user message in `prompts`: pure
    sampling at `temperature`, 13-06's `generate_responses`. (prompts, n) nested lists."""
    prompt_strs = [render_prompt(tokenizer, p) for p in prompts]
    replies = generate_responses(
        policy, tokenizer, [s for s in prompt_strs for _ in range(n)],
        max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, seed=seed,
        batch_size=batch_size)
    return [[r.strip() for r in replies[i * n:(i + 1) * n]] for i in range(len(prompts))]


def label_pairs(prompts: Sequence[str], replies: Sequence[Sequence[str]],
                gold_reward: Callable[[list[str]], torch.Tensor], seed: int,
                all_pairs: bool = False) -> list[dict]:
    """Preference records from each prompt's `replies`: the disjoint consecutive pairs (0, 1),
    (2, 3), ... or, with `all_pairs`, all K(K-1)/2 pairs of its K replies (InstructGPT's
    comparisons of a ranking, §3.5), each labelled by a Bradley-Terry draw on `gold_reward`
    (`draw_preferences`, seeded). Returns validated records {"prompt", "chosen", "rejected",
    "gold_chosen", "gold_rejected"}; pairs whose replies are empty or identical are dropped
    (they carry no preference)."""
    if len(prompts) != len(replies):
        raise ValueError(f"{len(prompts)} prompts but {len(replies)} lists of replies")
    pairs = []
    for prompt, group in zip(prompts, replies, strict=True):
        indices = (combinations(range(len(group)), 2) if all_pairs
                   else ((k, k + 1) for k in range(0, len(group) - 1, 2)))
        pairs += [(prompt, group[i], group[j]) for i, j in indices]
    flat = [text for _, a, b in pairs for text in (a, b)]
    gold = gold_reward(flat).double() if flat else torch.zeros(0, dtype=torch.float64)
    a_wins = draw_preferences(gold[0::2], gold[1::2], seed)
    records = []
    for i, (prompt, a, b) in enumerate(pairs):
        if not a or not b or a == b:
            continue
        ga, gb = gold[2 * i].item(), gold[2 * i + 1].item()
        (chosen, gold_chosen), (rejected, gold_rejected) = ((a, ga), (b, gb)) if a_wins[i] \
            else ((b, gb), (a, ga))
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                        "gold_chosen": gold_chosen, "gold_rejected": gold_rejected})
    return validate_preference_records(records, "sampled preference pairs")


def preference_pairs(policy: nn.Module, tokenizer: Any, prompts: Sequence[str],
                     gold_reward: Callable[[list[str]], torch.Tensor], *, max_new_tokens: int,
                     seed: int, temperature: float = 1.0, batch_size: int = 32) -> list[dict]:
    """Sample two replies per user message in `prompts` from `policy` and label them
    (`sample_per_prompt`, then `label_pairs`)."""
    replies = sample_per_prompt(policy, tokenizer, prompts, 2, max_new_tokens=max_new_tokens,
                                seed=seed, temperature=temperature, batch_size=batch_size)
    return label_pairs(prompts, replies, gold_reward, seed)


# %% [markdown]
# A check of `draw_preferences`: over many draws, the frequency with which $a$ wins matches
# $\sigma(r^\star(a) - r^\star(b))$ within binomial error.

# %%
from ftbook.workbench import binomial_interval, mean_interval

gaps = torch.tensor([-2.0, 0.0, 1.0, 3.0])
draws = torch.stack([draw_preferences(gaps, torch.zeros(4), seed=s) for s in range(4000)])
print("P(a preferred): empirical", [round(x, 3) for x in draws.double().mean(0).tolist()],
      "| sigmoid(gap)", [round(x, 3) for x in torch.sigmoid(gaps).tolist()])
# statistical, at a level that cannot flip by chance: each sigma(gap) lies in the 1 - 1e-6
# Wilson interval of its 4000 draws
for wins_a, p_a in zip(draws.sum(0).tolist(), torch.sigmoid(gaps).tolist(), strict=True):
    low, high = binomial_interval(int(wins_a), len(draws), level=1 - 1e-6)
    assert low <= p_a <= high

# %% [markdown]
# Now the real pieces: the gold classifier (trained on the first run, then cached), the SFT
# policy of 13-06, and preference pairs for training and for held-out evaluation.

# %%
from ftbook.workbench import Timer

timings = {}
with Timer(DEVICE) as timer:
    gold = load_gold_reward(PROFILE, DEVICE)
timings["gold classifier (load or train)"] = timer.seconds
print(f"gold classifier: SST-2 dev accuracy {gold.info['dev_accuracy']:.3f} on "
      f"{gold.info['dev_rows']} rows")

# %% [markdown]
# How the gold reward (7.1b) judges replies: a few written by hand, degenerate ones among them,
# and the SST-2 validation sentences of eight words or more, which are real reviews.

# %%
from ftbook.data import load_sst2

by_hand = {
    "fluent, positive": "a moving , beautifully acted film that stays with you long after it "
                        "ends .",
    "fluent, negative": "the plot is thin , the jokes are stale and the whole thing drags on "
                        "far too long .",
    "one word": "great",
    "two words": "great film",
    "a fragment": "a great film that",
    "a list of adjectives": "great wonderful amazing brilliant superb fantastic excellent "
                            "beautiful .",
    "a repetition loop": "great great great great great great great great great great .",
    "cut off mid-sentence": "the film is a beautifully acted and moving story about a family "
                            "that",
    "empty": "",
}
gold_table = pd.DataFrame({
    "g(y)": [well_formedness(t) for t in by_hand.values()],
    "s(y)": gold.sentiment(list(by_hand.values())).tolist(),
    "gold r*(y)": gold(list(by_hand.values())).tolist()}, index=list(by_hand))
show_table(gold_table, "gold_on_degenerate", CHAPTER, floatfmt="{:.2f}")
reviews = [t.strip() for t in load_sst2("validation")["sentence"] if len(t.split()) >= 8]
review_g = torch.tensor([well_formedness(t) for t in reviews])
print(f"SST-2 validation sentences of >= 8 words ({len(reviews)}): mean g {review_g.mean():.3f}, "
      f"g = 1 for {(review_g == 1).float().mean():.1%}")
# by construction: one word, two words and the empty reply are far from reviews
assert gold_table.loc[["one word", "two words", "empty"], "g(y)"].max() <= 2 / GOLD_MIN_WORDS
floored = [name for name, row in gold_table.iterrows() if row["g(y)"] == 0 and name != "empty"]
degenerate_s = gold_table.loc[floored, "s(y)"]
negative_gold = gold_table.loc["fluent, negative", "gold r*(y)"]
positive_s = gold_table.loc["fluent, positive", "s(y)"]
print(f"the classifier alone: s(y) {degenerate_s.min():+.2f} to {degenerate_s.max():+.2f} for "
      f"{', '.join(repr(n) for n in floored)}, against {positive_s:+.2f} for the fluent positive "
      f"review: {'all of them' if degenerate_s.min() >= positive_s else 'not all of them'} "
      f"at least as positive")
print(f"the gate gives them g = 0, so r* = {GOLD_FLOOR:+.1f}, "
      f"{'below' if GOLD_FLOOR < negative_gold else 'not below'} the fluent negative review "
      f"({negative_gold:+.2f}); the fragment keeps g = "
      f"{gold_table.loc['a fragment', 'g(y)']:.2f} of its sentiment, the reply cut off "
      f"mid-sentence g = {gold_table.loc['cut off mid-sentence', 'g(y)']:.2f}")
with Timer(DEVICE) as timer:
    policy, tokenizer = load_sft_model(PROFILE, DEVICE)  # 13-06; trained first if not cached
timings["SFT policy (load or train)"] = timer.seconds
print(repr(render_prompt(tokenizer, REVIEW_PROMPT.format(opening="the film is"))))

# %% [markdown]
# The training and held-out records come from `reward_data`, the recipe that
# `train_and_save_reward_model` (below) runs too, so the reward model trained here is the one
# 13-08 and 13-09 load.

# %%
#| export
import hashlib

from ftbook.base_models import build_once
from ftbook.instruction_tuning import sft_model_path


def heldout_samples(profile: str, policy: nn.Module, tokenizer: Any
                    ) -> tuple[list[str], list[list[str]]]:
    """The held-out prompts (`bon_prompts` SST-2 validation openings) and `bon_max_n` replies
    sampled for each: the samples of the best-of-n experiment, whose disjoint pairs are also
    the held-out preference pairs."""
    cfg = pick(profile, RM_CONFIGS)
    prompts = sentiment_prompts("validation", cfg.bon_prompts, cfg.seed + 1)
    return prompts, sample_per_prompt(
        policy, tokenizer, prompts, cfg.bon_max_n, max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed + 1, temperature=cfg.temperature, batch_size=cfg.generate_batch_size)


def reward_data(profile: str, policy: nn.Module, tokenizer: Any,
                gold_reward: Callable[[list[str]], torch.Tensor], split: str,
                samples: tuple[list[str], list[list[str]]] | None = None) -> list[dict]:
    """The chapter's preference records, labelled by the gold reward (`label_pairs`): `split`
    "train" samples `samples_per_prompt` replies to each of `n_train_prompts` SST-2 train
    openings and labels all their pairs; "validation" labels disjoint pairs of the held-out
    samples (`heldout_samples`, or `samples` when already drawn), so that held-out pairs share
    no reply."""
    cfg = pick(profile, RM_CONFIGS)
    if split == "train":
        prompts = sentiment_prompts("train", cfg.n_train_prompts, cfg.seed)
        replies = sample_per_prompt(
            policy, tokenizer, prompts, cfg.samples_per_prompt,
            max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, temperature=cfg.temperature,
            batch_size=cfg.generate_batch_size)
        return label_pairs(prompts, replies, gold_reward, cfg.seed, all_pairs=True)
    if split == "validation":
        prompts, replies = samples or heldout_samples(profile, policy, tokenizer)
        return label_pairs(prompts, replies, gold_reward, cfg.seed + 1)
    raise ValueError(f"split must be 'train' or 'validation', got {split!r}")


def rm_recipe(profile: str) -> dict:
    """What the cached reward model of `profile` was trained with: this chapter's configuration,
    the gold classifier's recipe and 13-06's SFT model (its cache folder is keyed by its recipe)."""
    return {"format": CACHE_FORMAT, "profile": profile, "sft": sft_model_path(profile).name,
            "gold": gold_recipe(profile), **dataclasses.asdict(pick(profile, RM_CONFIGS))}


def preference_data(profile: str, device: torch.device | None = None) -> dict[str, Any]:
    """The chapter's data, drawn once and cached under `rm_recipe(profile)` (so keyed by the
    SFT model, the gold reward and the configuration): {"train": records, "validation":
    records, "heldout_prompts": prompts, "heldout_samples": replies per prompt}, as
    `reward_data` and `heldout_samples` make them. The reward model trains on these pairs, and
    13-09's DPO trains on the same ones."""
    digest = hashlib.sha256(json.dumps(rm_recipe(profile), sort_keys=True).encode())
    folder = cache_dir(RM_CHAPTER) / f"pairs-{profile}-{digest.hexdigest()[:12]}"

    def build(tmp: Path) -> None:
        gold = load_gold_reward(profile, device)
        policy, tokenizer = load_sft_model(profile, device)
        policy.eval()
        prompts, samples = heldout_samples(profile, policy, tokenizer)
        data = {"train": reward_data(profile, policy, tokenizer, gold, "train"),
                "validation": reward_data(profile, policy, tokenizer, gold, "validation",
                                          samples=(prompts, samples)),
                "heldout_prompts": prompts, "heldout_samples": samples}
        (tmp / "data.json").write_text(json.dumps(data))

    return json.loads((build_once(folder, build) / "data.json").read_text())


# %%
with Timer(DEVICE) as timer:
    data = preference_data(PROFILE, DEVICE)  # drawn here with `policy` and `gold`, then cached
train_records, eval_records = data["train"], data["validation"]
bon_prompts, bon_samples = data["heldout_prompts"], data["heldout_samples"]
timings["sample and label pairs"] = timer.seconds
print(f"{len(train_records)} training pairs ({cfg.samples_per_prompt} replies to each of "
      f"{cfg.n_train_prompts} prompts, all pairs); "
      f"{len(eval_records)} held-out pairs from {cfg.bon_max_n} samples of each of "
      f"{cfg.bon_prompts} held-out prompts")
for record in train_records[:3]:
    print(f"{record['prompt']!r}\n  chosen   ({record['gold_chosen']:+.2f}): "
          f"{record['chosen'][:80]!r}\n  rejected ({record['gold_rejected']:+.2f}): "
          f"{record['rejected'][:80]!r}")
train_pairs = encode_preference_pairs(tokenizer, train_records, cfg.max_len)
eval_pairs = encode_preference_pairs(tokenizer, eval_records, cfg.max_len)
lengths = [len(c) for c, _ in train_pairs] + [len(r) for _, r in train_pairs]
print(f"tokens per sequence (prompt + reply + EOS): median {sorted(lengths)[len(lengths) // 2]}, "
      f"max {max(lengths)}")

# %% [markdown]
# ## Parity with transformers and TRL
#
# **The read-out.** `LlamaForSequenceClassification` applies its `score` layer to every position
# and picks the last token that is not the pad token; `to_sequence_classifier` builds one with our
# backbone and head. Its pooled logits must equal our rewards on right-padded pairs, and, since
# the backbone is rotary, on left-padded ones. The third row is the pitfall of a tokenizer whose
# pad token is its EOS (common for base models, and TRL's fallback when no pad token is set): the
# batch is padded with EOS, and "the last token that is not the pad token" becomes the last
# token *before* the EOS that ends the reply.
#
# **The loss.** TRL 1.15's `RewardTrainer` tokenizes a conversational record (prompt, chosen,
# rejected as messages) with the chat template, collates the chosen and then the rejected
# sequences right-padded, runs the one-label classifier and computes
# `-logsigmoid(rewards_chosen - rewards_rejected).mean()` in `compute_loss`. Its loss is pure
# PyTorch (no fused kernel), so we call `compute_loss` itself on its collated batch, on the CPU.

# %%
import warnings

from datasets import Dataset
from trl import RewardConfig, RewardTrainer

from ftbook.instruction_tuning import transformer_tolerance

rm_init = RewardModel.from_causal_lm(policy)
with torch.no_grad():  # a non-zero head, so that the comparison is not 0 = 0
    rm_init.head.weight.normal_(std=rm_init.config.hidden_size ** -0.5,
                                generator=torch.Generator(device=rm_init.head.weight.device)
                                .manual_seed(SEED))
classifier = rm_init.to_sequence_classifier(tokenizer.pad_token_id)
parity_records, parity_pairs = train_records[:8], train_pairs[:8]


def batch_on_device(pad_token_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    batch = collate_pairs(parity_pairs, pad_token_id, side)
    return {k: v.to(DEVICE) for k, v in batch.items()}


right_batch = batch_on_device(tokenizer.pad_token_id)
left_batch = batch_on_device(tokenizer.pad_token_id, "left")
eos_batch = batch_on_device(tokenizer.eos_token_id)  # padded with EOS
classifier_pad_eos = rm_init.to_sequence_classifier(tokenizer.eos_token_id)
with torch.no_grad():
    ours_right, ours_left = rm_init(**right_batch), rm_init(**left_batch)
    ours_eos = rm_init(**eos_batch)  # reads the attention mask, not the token ids
    gaps = {"right padding": (ours_right - classifier(**right_batch).logits.squeeze(-1)),
            "left padding": (ours_left - classifier(**left_batch).logits.squeeze(-1)),
            "pad token = EOS (pitfall)": (
                ours_eos - classifier_pad_eos(**eos_batch).logits.squeeze(-1))}
readout = pd.DataFrame({"max |ours - LlamaForSequenceClassification|": {
    k: v.abs().max().item() for k, v in gaps.items()}})
readout.loc["ours: left vs right padding"] = (ours_left - ours_right).abs().max().item()
readout.loc["ours: padded with EOS vs pad"] = (ours_eos - ours_right).abs().max().item()
show_table(readout, "parity_readout", CHAPTER, floatfmt="{:.2e}")
# what rounding alone can do to rewards of this size (13-06's transformer tolerance)
parity_tolerance = transformer_tolerance(rm_init.config, right_batch["input_ids"].shape[1],
                                         ours_right.abs().max().item())
print(f"rounding tolerance for the rewards: {parity_tolerance:.1e}")
assert (readout.drop("pad token = EOS (pitfall)") <= parity_tolerance).all().all()
assert readout.loc["pad token = EOS (pitfall)"].item() > parity_tolerance  # a different token
del classifier_pad_eos

conversational = Dataset.from_list([
    {"prompt": [{"role": "user", "content": r["prompt"]}],
     "chosen": [{"role": "assistant", "content": r["chosen"]}],
     "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in parity_records])
with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
    warnings.simplefilter("ignore")
    trainer = RewardTrainer(
        model=classifier, processing_class=tokenizer, train_dataset=conversational,
        args=RewardConfig(output_dir=folder, report_to=[], use_cpu=DEVICE.type == "cpu",
                          per_device_train_batch_size=8, max_length=cfg.max_len))
    trl_rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    same_ids = [(row["chosen_ids"], row["rejected_ids"]) == (list(c), list(r))
                for row, (c, r) in zip(trl_rows, parity_pairs, strict=True)]
    # TRL's loss on TRL's collation of the same tokenized pairs (ours, in case the ids differ)
    trl_batch = trainer.data_collator([{"chosen_ids": list(c), "rejected_ids": list(r)}
                                       for c, r in parity_pairs])
    trl_batch = {k: v.to(trainer.model.device) for k, v in trl_batch.items()}
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(trl_batch)).item()
ours_loss = bradley_terry_loss(*ours_right.chunk(2)).item()
print(f"TRL tokenization equals ours on {sum(same_ids)} of {len(same_ids)} pairs")
print(f"loss on the same 8 pairs: ours {ours_loss:.7f}, TRL RewardTrainer.compute_loss "
      f"{trl_loss:.7f}, |difference| {abs(ours_loss - trl_loss):.1e}")
# (7.2) moves by at most max |change of r_chosen - r_rejected| <= 2 x the rewards' tolerance;
# each side's logsigmoid (a few ulp: <= 8 u relative to loss + 1) and mean of 8 (A.1), twice
loss_tolerance = 2 * parity_tolerance + 2 * (rounding_bound(8, 1.0) + 8 * unit_roundoff()) * (
    ours_loss + 1)
assert abs(ours_loss - trl_loss) <= loss_tolerance
ends_with_eos = tokenizer.apply_chat_template(
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    tokenize=False).endswith(tokenizer.eos_token)
assert all(same_ids) or not ends_with_eos, "the chat template ends with EOS, ids should agree"
del rm_init, classifier, trainer

# %% [markdown]
# The read-out table in words: the transformers classifier and our reward model agree up to
# rounding with either padding side (within the printed tolerance, 13-06's bound for two
# float32 computations of a transformer), and the loss agrees with TRL's. With EOS as the pad token
# the classifier reads the wrong token and returns a different reward; our reward model, which
# locates the token through the attention mask, is unaffected, and `reward_model_text` refuses
# such a tokenizer anyway, because generation would then be masked at every EOS (13-06). Where
# a chat template appends text after the final EOS (Qwen2.5 ends every turn with
# `<|im_end|>` and a newline), TRL's conversational tokenization ends the sequence one token
# later than ours and reads the reward at the newline: the printed count of identical pairs says
# which case this profile is in.
#
# ## Experiment: training the reward model
#
# The reward model starts as a copy of the SFT model's transformer with a zero head. The full
# profile trains all its parameters on the training pairs (`train_reward_model`). The tiny
# profile trains the head alone (`train_reward_head`): with the transformer frozen, the feature
# $h_{T^\star}$ of each sequence never changes, so it is computed once, and (7.2) becomes a
# logistic regression on feature differences, $r_\phi(a) - r_\phi(b) = w^\top(h_a - h_b)$,
# with the same batches, schedule and clipping. The head has $d$ weights, about as many as
# there are training pairs in the tiny profile (both printed below), enough to fit the training
# labels closely, so weight decay carries the regularisation. The held-out pairs are scored along
# the way.

# %%
seed_everything(SEED)
reward_model = RewardModel.from_causal_lm(policy).to(DEVICE)
with Timer(DEVICE) as timer:
    rm_log = fit_reward_model(reward_model, train_pairs, cfg, tokenizer.pad_token_id,
                              eval_pairs=eval_pairs)
timings["train reward model"] = timer.seconds
print(f"{cfg.steps} steps in {timer.seconds:.1f} s; training loss {rm_log.losses[0]:.3f} -> "
      f"{sum(rm_log.losses[-5:]) / len(rm_log.losses[-5:]):.3f} (mean of the last 5 steps)")
print(pd.DataFrame(rm_log.evals).to_string(index=False))
print(f"{reward_model.head.weight.numel()} head weights (d), {len(train_pairs)} training pairs")
best_eval = min(rm_log.evals, key=lambda e: e["loss"])
final_eval = rm_log.evals[-1]
if best_eval["step"] < final_eval["step"]:
    print(f"held-out loss is lowest at step {best_eval['step']} ({best_eval['loss']:.3f}, "
          f"accuracy {best_eval['accuracy']:.3f}) and ends "
          f"{final_eval['loss'] - best_eval['loss']:.3f} above it at step {final_eval['step']} "
          f"(accuracy {final_eval['accuracy']:.3f}), while "
          f"the training loss falls to the end: the held-out loss stops improving before training "
          f"ends")
else:
    print(f"held-out loss is lowest at the last step, {final_eval['step']} "
          f"({final_eval['loss']:.3f}, accuracy {final_eval['accuracy']:.3f}): it improves "
          f"until training ends")

# %% [markdown]
# ### Held-out accuracy against its ceiling
#
# Accuracy on noisy labels needs context. The table puts next to the reward model: the gold
# reward itself (the best any reward model can do on these labels, up to sampling noise), its
# expected accuracy $\mathbb{E}\,\sigma(|\Delta r^\star|)$, a constant reward (0.5), and the
# "longer reply wins" heuristic. The last column asks a different question: how often the
# reward model orders the two replies as the gold reward does, which is what a policy optimised
# against it will care about.

# %%
chosen_rm, rejected_rm = score_pairs(reward_model, eval_pairs, tokenizer.pad_token_id,
                                     cfg.score_batch_size)
gold_chosen = torch.tensor([r["gold_chosen"] for r in eval_records])
gold_rejected = torch.tensor([r["gold_rejected"] for r in eval_records])
gold_order = gold_chosen > gold_rejected  # (pairs,) the gold reward's ranking
words_chosen = torch.tensor([len(r["chosen"].split()) for r in eval_records], dtype=torch.float)
words_rejected = torch.tensor([len(r["rejected"].split()) for r in eval_records],
                              dtype=torch.float)


def agreement(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """How often a scorer orders the pair as the gold reward does."""
    return ((chosen > rejected) == gold_order).float().mean().item()


n_eval = len(eval_records)


def with_interval(accuracy: float) -> str:
    low, high = binomial_interval(round(accuracy * n_eval), n_eval)
    return f"{accuracy:.3f} [{low:.3f}, {high:.3f}]"


print(f"held-out accuracy with 95% Wilson intervals on {n_eval} pairs: reward model "
      f"{with_interval(pairwise_accuracy(chosen_rm, rejected_rm))}, gold reward (ceiling) "
      f"{with_interval(pairwise_accuracy(gold_chosen, gold_rejected))}")
accuracy = pd.DataFrame({
    "held-out accuracy": {
        "reward model": pairwise_accuracy(chosen_rm, rejected_rm),
        "gold reward (ceiling)": pairwise_accuracy(gold_chosen, gold_rejected),
        "gold reward, expected": torch.sigmoid((gold_chosen - gold_rejected).abs()).mean().item(),
        "longer reply wins": pairwise_accuracy(words_chosen, words_rejected),
        "constant reward": 0.5},
    "agreement with the gold ranking": {
        "reward model": agreement(chosen_rm, rejected_rm), "gold reward (ceiling)": 1.0,
        "gold reward, expected": float("nan"),
        "longer reply wins": agreement(words_chosen, words_rejected),
        "constant reward": 0.5}})
show_table(accuracy, "rm_accuracy", CHAPTER, floatfmt="{:.3f}")


def wilson(accuracy: float) -> tuple[float, float]:
    return binomial_interval(round(accuracy * n_eval), n_eval)


rm_low, rm_high = wilson(accuracy.loc["reward model", "held-out accuracy"])
ceiling_low, ceiling_high = wilson(accuracy.loc["gold reward (ceiling)", "held-out accuracy"])
if rm_high < ceiling_low:
    print("the reward model's interval lies below the ceiling's: it is measurably worse than the "
          "gold reward on these labels")
else:
    print(f"the two intervals overlap ({rm_low:.3f} to {rm_high:.3f} and {ceiling_low:.3f} to "
          f"{ceiling_high:.3f}): this run does not resolve how far below the ceiling the reward "
          f"model is")
if rm_low > 0.5:
    print(f"the reward model is above chance: its interval starts {rm_low - 0.5:.3f} above 0.5")
else:
    print("the reward model's interval contains 0.5: this run does not show it above chance")
rm_agree = accuracy.loc["reward model", "agreement with the gold ranking"]
length_agree = accuracy.loc["longer reply wins", "agreement with the gold ranking"]
print(f"agreement with the gold ranking (95% Wilson intervals): reward model "
      f"{with_interval(rm_agree)}, longer reply wins {with_interval(length_agree)}")
(rm_agree_low, rm_agree_high), (length_low, length_high) = wilson(rm_agree), wilson(length_agree)
if rm_agree_high < length_low:
    print("'the longer reply wins' agrees with the gold ranking more often than the reward model, "
          "beyond both intervals: the reward model has not learned even length")
elif length_high < rm_agree_low:
    print("the reward model agrees with the gold ranking more often than 'the longer reply wins',"
          " beyond both intervals: it has learned more than length")
else:
    print(f"the reward model agrees with the gold ranking "
          f"{'less' if rm_agree < length_agree else 'more'} often than 'the longer reply wins' in "
          f"this run, but the intervals overlap: the difference is not resolved")

# %% [markdown]
# ### Calibration
#
# A Bradley-Terry reward model makes a probabilistic claim, $P(y_a \succ y_b) =
# \sigma(r_\phi(y_a) - r_\phi(y_b))$. It is calibrated if, among pairs it gives probability
# about $p$, the first reply wins a fraction $p$ of the time. Every held-out pair enters in both
# orders (so the diagram is symmetric about $(0.5, 0.5)$); predictions are binned; each bin's mean
# prediction is plotted against the empirical frequency of the first reply having been chosen
# (with its binomial standard error) and against the *true* probability of that event,
# $\sigma(r^\star(y_a) - r^\star(y_b))$, which only the synthetic setting knows and which is far
# less noisy than the empirical frequency. The expected calibration error (ECE) is the
# bin-weighted mean gap, $\sum_b \frac{n_b}{n}\,|\bar p_b - \bar o_b|$.

# %%
#| export
import pandas as pd


def calibration_table(predicted: torch.Tensor, outcomes: torch.Tensor, n_bins: int = 10,
                      true_probs: torch.Tensor | None = None) -> Any:
    """A pandas DataFrame with one row per non-empty equal-width bin of `predicted`
    probabilities: `count`, `predicted` (mean), `empirical` (mean outcome), `stderr`
    (binomial standard error of the empirical frequency) and, given `true_probs`, `true`
    (their mean)."""
    predicted, outcomes = predicted.double().flatten(), outcomes.double().flatten()
    if predicted.shape != outcomes.shape:
        raise ValueError(f"{predicted.numel()} predictions but {outcomes.numel()} outcomes")
    if n_bins < 1:
        raise ValueError(f"n_bins must be positive, got {n_bins}")
    bins = (predicted * n_bins).long().clamp(0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        where = bins == b
        n = int(where.sum())
        if n == 0:
            continue
        freq = outcomes[where].mean().item()
        row = {"bin": f"[{b / n_bins:.2f}, {(b + 1) / n_bins:.2f})", "count": n,
               "predicted": predicted[where].mean().item(), "empirical": freq,
               "stderr": math.sqrt(max(freq * (1 - freq), 1e-12) / n)}
        if true_probs is not None:
            row["true"] = true_probs.double().flatten()[where].mean().item()
        rows.append(row)
    return pd.DataFrame(rows).set_index("bin")


def expected_calibration_error(table: Any, target: str = "empirical") -> float:
    """Eq. ECE: sum over bins of count / total * |mean predicted - mean `target`|."""
    weights = table["count"] / table["count"].sum()
    return float((weights * (table["predicted"] - table[target]).abs()).sum())


# %%
import matplotlib.pyplot as plt

from ftbook.workbench import show_figure

margin_rm = chosen_rm - rejected_rm  # (pairs,)
margin_gold = gold_chosen - gold_rejected
predicted = torch.sigmoid(torch.cat([margin_rm, -margin_rm]))
outcomes = torch.cat([torch.ones_like(margin_rm), torch.zeros_like(margin_rm)])
true_probs = torch.sigmoid(torch.cat([margin_gold, -margin_gold]))
calibration = calibration_table(predicted, outcomes, cfg.calibration_bins, true_probs)
show_table(calibration, "calibration", CHAPTER, floatfmt="{:.3f}")
ece = {"vs empirical frequency": expected_calibration_error(calibration),
       "vs true probability": expected_calibration_error(calibration, "true")}
print(f"ECE: {ece['vs empirical frequency']:.3f} against the empirical frequency, "
      f"{ece['vs true probability']:.3f} against the true BT probability")
# the diagram is symmetric about (0.5, 0.5): the bins above 0.5 tell the whole story
upper = calibration[calibration["predicted"] > 0.5]
if len(upper):
    upper_weights = upper["count"] / upper["count"].sum()
    mean_predicted = float((upper_weights * upper["predicted"]).sum())
    mean_true = float((upper_weights * upper["true"]).sum())
    confidence = ("overconfident: its confident predictions are too confident, the usual shape "
                  "of an overfitted scorer" if mean_predicted > mean_true else
                  "not overconfident: its predictions are no more extreme than the truth")
    print(f"on the pairs where it predicts more than 0.5, the reward model predicts "
          f"{mean_predicted:.3f} on average, the true BT probability is {mean_true:.3f}: "
          f"{confidence}")
else:
    print("the reward model predicts 0.5 for every pair: no confidence to calibrate")

fig, ax = plt.subplots(figsize=(4.8, 4.2))
ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfect calibration")
ax.errorbar(calibration["predicted"], calibration["empirical"], yerr=calibration["stderr"],
            marker="o", ls="none", capsize=3, label="empirical frequency")
ax.plot(calibration["predicted"], calibration["true"], marker="s", label="true BT probability")
ax.set(xlabel=r"predicted $\sigma(r_\phi(a) - r_\phi(b))$", ylabel="P(a chosen)",
       xlim=(0, 1), ylim=(0, 1), title="Reward-model calibration (held-out pairs)")
ax.legend(loc="upper left", fontsize=8)
show_figure(fig, "calibration", CHAPTER)

# %% [markdown]
# ## Saving the reward model for 13-08 and 13-09
#
# We store the reward model as what it is to transformers and TRL: a
# `LlamaForSequenceClassification` (in the full profile a `Qwen2ForSequenceClassification`) with
# one label, written by `save_pretrained` with the tokenizer beside it. That beats a backbone
# folder plus a loose head file: `AutoModelForSequenceClassification.from_pretrained` loads it
# with nothing from this book, TRL's trainers accept it as a reward model, and the head cannot be
# forgotten, which is the classic way of losing a trained classifier (the conventions' "head not
# saved with the adapter"). The price is one rule, checked above: the classifier finds the last
# token through `pad_token_id`, so it is saved in the config. A `recipe.json` marks a complete
# folder; it records this chapter's configuration, the gold classifier's recipe and which SFT
# model the pairs came from, and a folder trained with anything else is retrained.
#
# `load_reward_model(profile)` is what the next chapters call. If this chapter has not run, it
# runs the same recipe, `train_and_save_reward_model`, first.

# %%
#| export
from ftbook.base_models import attention_implementation
from ftbook.workbench import seed_everything


def rm_folder(profile: str) -> Path:
    """cache_dir("13_07_reward_modeling") / f"rm-{profile}": where the reward model lives."""
    return cache_dir(RM_CHAPTER) / f"rm-{profile}"


def save_reward_model(reward_model: RewardModel, tokenizer: Any, profile: str,
                      log: RewardLog | None = None) -> Path:
    """Save `reward_model` (as a one-label sequence classifier) and `tokenizer` to
    `rm_folder(profile)`, atomically, with the recipe and the training log."""
    folder = rm_folder(profile)

    def write(tmp: Path) -> None:
        reward_model.save_pretrained(tmp, pad_token_id=tokenizer.pad_token_id)
        tokenizer.save_pretrained(tmp)
        if log is not None:
            (tmp / "training_log.json").write_text(json.dumps(dataclasses.asdict(log)))

    _save_atomically(folder, write, rm_recipe(profile))
    return folder


def train_and_save_reward_model(profile: str, device: torch.device | None = None) -> Path:
    """The chapter's recipe: the SFT policy, the training pairs of `preference_data`, a reward
    model initialised from the policy and trained with
    `RM_CONFIGS[profile]`, saved by `save_reward_model`. Returns the folder."""
    cfg = pick(profile, RM_CONFIGS)
    device = device or torch.device("cpu")
    policy, tokenizer = load_sft_model(profile, device)
    policy.eval()
    pairs = encode_preference_pairs(tokenizer, preference_data(profile, device)["train"],
                                    cfg.max_len)
    seed_everything(cfg.seed)
    reward_model = RewardModel.from_causal_lm(policy).to(device)
    log = fit_reward_model(reward_model, pairs, cfg, tokenizer.pad_token_id)
    return save_reward_model(reward_model, tokenizer, profile, log)


def load_reward_model(profile: str, device: torch.device | None = None
                      ) -> tuple[RewardModel, Any]:
    """(reward_model, tokenizer) from `rm_folder(profile)`, loaded with `from_pretrained`, in
    eval mode; trained and saved first (`train_and_save_reward_model`) if missing or trained
    with another configuration."""
    from transformers import AutoTokenizer

    folder = rm_folder(profile)
    if not _recipe_matches(folder, rm_recipe(profile)):
        train_and_save_reward_model(profile, device)
    reward_model = RewardModel.from_pretrained(
        folder, attn_implementation=attention_implementation(profile))
    if device is not None:
        reward_model.to(device)
    return reward_model.eval(), AutoTokenizer.from_pretrained(folder)


# %%
folder = save_reward_model(reward_model, tokenizer, PROFILE, rm_log)
loaded_rm, loaded_tokenizer = load_reward_model(PROFILE, DEVICE)
reloaded_chosen, _ = score_pairs(loaded_rm, eval_pairs[:16], loaded_tokenizer.pad_token_id)
gap = (reloaded_chosen - chosen_rm[:16]).abs().max().item()
print(f"saved to {folder.name}/ ({', '.join(sorted(p.name for p in folder.iterdir()))}); "
      f"max |reward after reload - before| = {gap:.1e}")
# the same weights (saving is exact), scored in batches of another width: rounding only
reload_tolerance = transformer_tolerance(
    loaded_rm.config, max(len(x) for pair in eval_pairs for x in pair), chosen_rm.abs().max().item())
assert gap <= reload_tolerance
del loaded_rm

# %% [markdown]
# ## Reward hacking and over-optimisation
#
# The reward model is a proxy for the gold reward, fitted on noisy labels of replies the SFT
# policy writes. Optimising against it moves the policy to replies where the two
# may disagree. The simplest optimiser is **best-of-$n$**: sample $n$ replies from the SFT policy
# and keep the one with the highest proxy reward. Its strength is set by $n$ alone, and its
# distance from the SFT policy has a formula.
#
# **The KL of best-of-$n$.** Let $F$ be the distribution function of the proxy reward $r(y)$
# under the SFT policy $\pi$, continuous, so that rewards never tie. The best of $n$ independent
# draws has reward distribution $F^n$, so its density over replies is
# $\pi_n(y) = n\,F(r(y))^{n-1}\,\pi(y)$ and
#
# $$
# \mathrm{KL}(\pi_n \,\|\, \pi) = \mathbb{E}_{\pi_n}\big[\log n + (n-1)\log F(r(y))\big]
# = \log n - \frac{n-1}{n},
# \tag{7.7}
# $$
#
# because $U = F(r(y))$ has density $n u^{n-1}$ on $[0, 1]$ under $\pi_n$ and
# $\mathbb{E}[\log U] = -1/n$ (Stiennon et al. 2020, Appendix; Gao et al. 2022, §2). For a
# discrete policy, sort the replies by reward with cumulative probabilities $F_i$; the best of $n$
# draws is reply $i$ with probability
#
# $$
# \pi_n(y_i) = F_i^{\,n} - F_{i-1}^{\,n},
# \tag{7.8}
# $$
#
# and the KL is *at most* (7.7), with equality only in the continuous limit: repeated draws of the
# same reply waste some of the $n$ (Beirami et al. 2024, arXiv:2401.01879). Language-model replies
# are discrete but so many that (7.7) is the standard $x$-axis, which we use.
#
# **Estimating best-of-$n$ for every $n$ at once.** Draw $N$ replies per prompt, sort them by
# proxy reward, $r_{(1)} \le \dots \le r_{(N)}$. Averaged over all $\binom{N}{n}$ subsets of size
# $n$, the subset's maximum is the $i$-th sample with probability $\binom{i-1}{n-1} / \binom{N}{n}$,
# so
#
# $$
# \widehat{\mathbb{E}}\big[v(\text{best of } n)\big]
# = \sum_{i=n}^{N} \frac{\binom{i-1}{n-1}}{\binom{N}{n}}\; v_{(i)}
# \tag{7.9}
# $$
#
# is an unbiased estimate for any value $v$ of the sample (the proxy reward itself, or the gold
# reward of the sample the proxy picked), from one set of $N$ draws.

# %%
#| export
def best_of_n_kl(n: int) -> float:
    """Eq. (7.7): log n - (n - 1) / n, the KL from the base policy of best-of-n for a continuous
    reward (an upper bound for discrete ones; Beirami et al. 2024, arXiv:2401.01879)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_distribution(probs: torch.Tensor, rewards: torch.Tensor, n: int) -> torch.Tensor:
    """Eq. (7.8): the exact distribution (K,) of the best of n draws from the discrete `probs`
    (K,) ranked by `rewards` (K,); tied outcomes split their share in proportion to `probs`."""
    probs = probs.double()
    if probs.shape != rewards.shape or probs.dim() != 1:
        raise ValueError("probs and rewards must both be (K,)")
    if bool((probs < 0).any()) or abs(probs.sum().item() - 1) > 1e-9:
        raise ValueError("probs must be a probability vector")
    _, level = torch.unique(rewards, return_inverse=True)  # (K,) rank of each reward level
    mass = torch.zeros(int(level.max()) + 1, dtype=torch.float64).index_add_(0, level, probs)
    cdf = mass.cumsum(0)
    best_level = cdf ** n - (cdf - mass).clamp(min=0) ** n
    return torch.where(mass[level] > 0, best_level[level] * probs / mass[level],
                       torch.zeros_like(probs))


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """KL(p || q) of two discrete distributions (0 log 0 = 0)."""
    p, q = p.double(), q.double()
    where = p > 0
    return (p[where] * (p[where] / q[where]).log()).sum().item()


def best_of_n_estimate(selector: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """Eq. (7.9): per prompt, the expected `values` (prompts, N) of the sample that best-of-n
    by `selector` (prompts, N) picks, averaged over all n-subsets of the N samples. (prompts,)"""
    if selector.shape != values.shape or selector.dim() != 2:
        raise ValueError("selector and values must both be (prompts, N)")
    N = selector.shape[1]
    if not 1 <= n <= N:
        raise ValueError(f"n must lie in 1..{N}, got {n}")
    sorted_values = values.double().gather(1, selector.argsort(dim=1, stable=True))
    i = torch.arange(1, N + 1, dtype=torch.float64)
    log_weight = (torch.lgamma(i) - torch.lgamma(i - n + 1).where(i >= n, torch.tensor(0.0))
                  - math.lgamma(n) - (math.lgamma(N + 1) - math.lgamma(n + 1)
                                      - math.lgamma(N - n + 1)))
    weight = torch.where(i >= n, log_weight.exp(), torch.zeros_like(i))  # (N,), sums to 1
    return (sorted_values * weight).sum(1)


# %% [markdown]
# Numerical checks of (7.7)-(7.9). On a discrete distribution with many outcomes the exact KL of
# (7.8) approaches the formula; with four outcomes it stays below it (the upper bound), by the
# printed shares.
# A simulation of best-of-$n$ reproduces the distribution (7.8), and (7.9) agrees with averaging
# over random subsets, both within their sampling error.

# %%
generator = torch.Generator().manual_seed(SEED)
rows = []
for support in (4, 100, 20_000):
    probs = torch.rand(support, generator=generator, dtype=torch.float64)
    probs /= probs.sum()
    rewards = torch.randn(support, generator=generator, dtype=torch.float64)
    for n in (2, 8, 64):
        exact = kl_divergence(best_of_n_distribution(probs, rewards, n), probs)
        rows.append({"outcomes": support, "n": n, "exact KL (7.8)": exact,
                     "formula (7.7)": best_of_n_kl(n)})
kl_check = pd.DataFrame(rows).set_index(["outcomes", "n"])
show_table(kl_check, "bon_kl_check", CHAPTER)
for support in (4, 20_000):
    ratio = kl_check.loc[support, "exact KL (7.8)"] / kl_check.loc[support, "formula (7.7)"]
    print(f"{support} outcomes: the exact KL is {ratio.min():.1%} to {ratio.max():.1%} of (7.7)")
for (support, n), row in kl_check.iterrows():
    # (7.7) is an upper bound; the exact KL is a float64 sum over `support` outcomes of terms
    # whose n-th powers carry a relative error of about n u and whose logs are at most ln n + 1
    kl_rounding = n * rounding_bound(support + 1, math.log(n) + 1, torch.float64)
    assert row["exact KL (7.8)"] <= row["formula (7.7)"] + kl_rounding
# the continuous limit: with 20,000 outcomes the gap is a deterministic float64 number more
# than 10^4 times below 0.01 for every n here
fine = kl_check.loc[20_000]
assert ((fine["exact KL (7.8)"] - fine["formula (7.7)"]).abs() < 0.01).all()

probs = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64)
rewards = torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64)
draws = torch.multinomial(probs, 200_000 * 4, replacement=True, generator=generator).view(-1, 4)
picked = draws.gather(1, rewards[draws].argmax(1, keepdim=True)).squeeze(1)
simulated = torch.bincount(picked, minlength=4).double() / picked.numel()
print("best of 4, simulated:", [round(x, 4) for x in simulated.tolist()], "| eq. (7.8):",
      [round(x, 4) for x in best_of_n_distribution(probs, rewards, 4).tolist()])
# statistical, at a level that cannot flip by chance: each probability of (7.8) lies in the
# 1 - 1e-6 Wilson interval of its count among the picks
counts = torch.bincount(picked, minlength=4).tolist()
for k, p_k in zip(counts, best_of_n_distribution(probs, rewards, 4).tolist(), strict=True):
    low, high = binomial_interval(k, picked.numel(), level=1 - 1e-6)
    assert low <= p_k <= high

scores = torch.randn(2, 12, generator=generator, dtype=torch.float64)
values = torch.randn(2, 12, generator=generator, dtype=torch.float64)
subsets = torch.rand(50_000, 12, generator=generator).argsort(1)[:, :5]  # random 5-subsets
best = scores[:, subsets].argmax(-1)  # (2, 50000) position of the max within each subset
picked_values = values[:, subsets].gather(-1, best.unsqueeze(-1)).squeeze(-1)  # (2, 50000)
mc = picked_values.mean(1)
mc_stderr = picked_values.std(1) / math.sqrt(subsets.shape[0])
print(f"eq. (7.9) with n = 5 of N = 12: {best_of_n_estimate(scores, values, 5).tolist()} | "
      f"random subsets: {mc.tolist()} (standard errors "
      f"{[round(x, 4) for x in mc_stderr.tolist()]})")
# statistical: the exact average lies within 5 standard errors of the Monte Carlo mean
assert ((best_of_n_estimate(scores, values, 5) - mc).abs() < 5 * mc_stderr).all()

# %% [markdown]
# ### Experiment: best-of-$n$ against the learned reward
#
# For each of a few held-out prompts we sample $N$ replies from the SFT policy (the same sampler
# that made the training pairs: 13-06's `generate_responses`, pure sampling without top-$k$ or
# top-$p$, so the reference of (7.7) is the SFT model itself) and score every reply with the
# reward model (the proxy) and the gold reward. For $n = 1, 2, 4, \dots, N$, eq. (7.9) gives the expected proxy reward of the
# best-of-$n$ reply, its expected gold reward, and, for reference, the gold reward that
# best-of-$n$ would reach if it selected by the gold reward itself: the frontier of a perfect
# reward model. Rewards are shown as gains over $n = 1$ (the SFT policy), because (7.1) fixes
# neither reward's offset.

# %%
N = cfg.bon_max_n
with Timer(DEVICE) as timer:
    bon_replies = [reply for group in bon_samples for reply in group]  # drawn above
    proxy = score_replies(reward_model, tokenizer, [p for p in bon_prompts for _ in range(N)],
                          bon_replies, cfg.score_batch_size).view(len(bon_prompts), N)
    gold_scores = gold(bon_replies).view(len(bon_prompts), N)
timings["best-of-n: score"] = timer.seconds

ns = [2 ** k for k in range(int(math.log2(N)) + 1)]
selections = {"proxy reward": (proxy, proxy), "gold reward": (proxy, gold_scores),
              "gold reward, selected by gold": (gold_scores, gold_scores)}
rows = []
for n in ns:
    row = {"n": n, "KL (7.7)": best_of_n_kl(n)}
    for column, (selector, values) in selections.items():
        per_prompt = best_of_n_estimate(selector, values, n)  # (prompts,)
        row[column] = per_prompt.mean().item()
        # the gain over n = 1, per prompt, and its 95% interval over the prompts
        gain = (per_prompt - best_of_n_estimate(selector, values, 1)).tolist()
        row[f"{column} gain"], row[f"{column} gain +-"] = mean_interval(gain)
    rows.append(row)
bon = pd.DataFrame(rows).set_index("n")
show_table(bon, "best_of_n", CHAPTER, floatfmt="{:.3f}")
print(f"gains with 95% Student-t intervals over {len(bon_prompts)} prompts, {N} samples each")
# Selecting by a score raises it: E max of n is non-decreasing in n, up to float64 rounding of
# (7.9): weights from four lgammas (each up to lgamma(N + 1)) and exp, then sums over N samples
# and the prompts, for rewards up to max |proxy|; twice that for two values of n.
bon_rounding = 2 * proxy.abs().max().item() * (
    rounding_bound(N + len(bon_prompts), 1.0, torch.float64)
    + 8 * unit_roundoff(torch.float64) * (math.lgamma(N + 1) + 1))
assert (bon["proxy reward"].diff().dropna() >= -bon_rounding).all()

fig, ax = plt.subplots(figsize=(6.2, 3.8))
for column, marker, label, style in (
        ("proxy reward", "o", "proxy (reward model)", "-"),
        ("gold reward", "s", "gold, selected by proxy", "-"),
        ("gold reward, selected by gold", "^", "gold, selected by gold", "--")):
    ax.errorbar(bon["KL (7.7)"], bon[f"{column} gain"], yerr=bon[f"{column} gain +-"],
                marker=marker, ls=style, capsize=3, label=label)
for n, row in bon.iterrows():
    ax.annotate(f"n={n}", (row["KL (7.7)"], row["proxy reward gain"]), fontsize=7,
                textcoords="offset points", xytext=(2, 4))
ax.set(xlabel=r"KL$(\pi_n \| \pi_\mathrm{SFT})$ = log n - (n-1)/n  (nats)",
       ylabel="reward gain over the SFT policy",
       title="Best-of-n: proxy and gold reward against KL")
ax.legend(fontsize=8)
show_figure(fig, "best_of_n", CHAPTER)

sample_g = torch.tensor([well_formedness(t) for t in bon_replies])
below_zero = (gold_scores < 0).float().mean().item()
sample_pass, review_pass = (sample_g == 1).float().mean().item(), (review_g == 1).float().mean()
print(f"the SFT policy's {gold_scores.numel()} samples: g = 1 for {sample_pass:.1%} (mean g "
      f"{sample_g.mean():.3f}), {'less' if sample_pass < review_pass else 'not less'} often than "
      f"the SST-2 reviews ({review_pass:.1%}); {below_zero:.1%} have a gold reward below zero "
      f"({'a majority' if below_zero > 0.5 else 'not a majority'})")
last = bon.loc[N]
gold_gain, gold_pm = last["gold reward gain"], last["gold reward gain +-"]
frontier_gain = last["gold reward, selected by gold gain"]
print(f"at n = {N} (KL {last['KL (7.7)']:.2f} nats): proxy gain {last['proxy reward gain']:.2f} "
      f"± {last['proxy reward gain +-']:.2f}, gold gain {gold_gain:.2f} ± {gold_pm:.2f}, gold "
      f"gain selecting by gold {frontier_gain:.2f} ± "
      f"{last['gold reward, selected by gold gain +-']:.2f}")
if gold_gain - gold_pm > 0:
    print(f"the gold gain's interval excludes zero: optimising the proxy still helps at this KL, "
          f"and it captures {gold_gain / frontier_gain:.0%} of the gold-selected gain")
elif gold_gain + gold_pm < 0:
    print("the gold gain's interval lies below zero: optimising the proxy hurts the gold reward")
else:
    print("the gold gain's interval contains zero: this run does not show that optimising the "
          "proxy helps the gold reward")
gold_curve = bon["gold reward gain"]
# a dip smaller than the float64 rounding of (7.9) (as for the proxy above) is no dip
gold_rounding = bon_rounding * gold_scores.abs().max().item() / max(proxy.abs().max().item(),
                                                                   1e-30)
drops = [(n_a, n_b) for n_a, n_b in zip(ns, ns[1:], strict=False)
         if gold_curve[n_b] < gold_curve[n_a] - gold_rounding]
if drops:
    n_a, n_b = drops[0]
    print(f"the gold gain is lower at n = {n_b} than at n = {n_a} ({gold_curve[n_a]:.2f} -> "
          f"{gold_curve[n_b]:.2f}): a turn down, beyond noise only if the table's intervals say so")
else:
    print(f"the gold gain does not turn down at any n <= {N}: no over-optimisation is visible")

# %% [markdown]
# **What does the proxy pay for?** Reward hacking shows in *which* replies the proxy ranks first.
# Three diagnostics on the $N$ samples per prompt: the correlation of each reward with the
# reply's length (the gold reward (7.1b) pays for length only up to eight words), per prompt
# the proxy's favourite next to the gold reward's favourite, and the reward model's scores of
# the degenerate replies written by hand above, next to their gold rewards.

# %%
lengths = torch.tensor([len(r.split()) for r in bon_replies], dtype=torch.float).view_as(proxy)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


hacking = pd.DataFrame({"Pearson correlation": {
    "proxy vs gold reward": correlation(proxy, gold_scores),
    "proxy reward vs reply length (words)": correlation(proxy, lengths),
    "gold reward vs reply length (words)": correlation(gold_scores, lengths)}})
show_table(hacking, "hacking", CHAPTER, floatfmt="{:.3f}")


def fisher_interval(r: float, n: int) -> tuple[float, float]:
    """95% interval of a Pearson correlation by Fisher's z, for n independent samples."""
    z, half = math.atanh(max(min(r, 1 - 1e-12), -1 + 1e-12)), 1.96 / math.sqrt(n - 3)
    return math.tanh(z - half), math.tanh(z + half)


def compare(a: float, b: float) -> str:
    """How correlation a compares with b, beyond their intervals or not."""
    (a_low, a_high), (b_low, b_high) = (fisher_interval(x, proxy.numel()) for x in (a, b))
    return ("more strongly than" if a_low > b_high else "less strongly than" if a_high < b_low
            else "about as strongly as (the intervals overlap)")


r_gold, r_proxy_len, r_gold_len = hacking["Pearson correlation"].tolist()
for name, r in hacking["Pearson correlation"].items():
    low, high = fisher_interval(r, proxy.numel())
    print(f"{name}: {r:.3f} [{low:.3f}, {high:.3f}]")
print(f"(95% Fisher intervals over {proxy.numel()} samples, taken as independent; replies to the "
      f"same prompt are not, so the intervals are if anything too narrow)")
if all(math.isfinite(r) for r in (r_gold, r_proxy_len, r_gold_len)) and r_proxy_len:
    print(f"the proxy correlates with length {compare(r_proxy_len, r_gold)} with the gold "
          f"reward; the gold reward correlates with length {compare(r_gold_len, r_proxy_len)} "
          f"the proxy ({r_gold_len / r_proxy_len:.2f} times)")
else:
    print("the correlations are undefined or zero (a reward or the length is constant): no "
          "comparison")
top_proxy, top_gold = proxy.argmax(1), gold_scores.argmax(1)
for j in range(min(3, len(bon_prompts))):
    i, k = top_proxy[j].item(), top_gold[j].item()
    print(f"{bon_prompts[j]!r}\n  proxy's best (proxy {proxy[j, i]:+.2f}, gold "
          f"{gold_scores[j, i]:+.2f}): {bon_replies[j * N + i][:90]!r}\n  gold's best  (proxy "
          f"{proxy[j, k]:+.2f}, gold {gold_scores[j, k]:+.2f}): {bon_replies[j * N + k][:90]!r}")

degenerate_rewards = score_replies(reward_model, tokenizer, [bon_prompts[0]] * len(by_hand),
                                   list(by_hand.values()))
gold_table["reward model"] = degenerate_rewards.tolist()
print(f"the by-hand replies as answers to {bon_prompts[0]!r}:")
show_table(gold_table, "rm_on_degenerate", CHAPTER, floatfmt="{:.2f}")
rm_order = gold_table["reward model"].sort_values(ascending=False)
print("the reward model's order, best first:", " > ".join(rm_order.index))
# how far each scorer separates the two fluent reviews (sentiment) and the fluent positive
# review from the replies with g = 0 (form), as a share of its own range over these replies
shares = {}
for column in ("gold r*(y)", "reward model"):
    scores_by_hand = gold_table[column]
    spread = scores_by_hand.max() - scores_by_hand.min()
    shares[column] = ((scores_by_hand["fluent, positive"]
                       - scores_by_hand["fluent, negative"]) / spread,
                      (scores_by_hand["fluent, positive"]
                       - scores_by_hand[gold_table["g(y)"] == 0].mean()) / spread)
    print(f"{column}: fluent positive - fluent negative = {shares[column][0]:.0%} of its range, "
          f"fluent positive - mean of the g = 0 replies = {shares[column][1]:.0%}")
# each separation of the reward model relative to the gold reward's
if min(shares["gold r*(y)"]) > 0.05:  # the gold reward separates both, by 5% of its range
    sentiment_kept, form_kept = (shares["reward model"][k] / shares["gold r*(y)"][k]
                                 for k in (0, 1))
    learned_better = ("form better than sentiment" if form_kept > sentiment_kept
                      else "sentiment at least as well as form")
    print(f"relative to the gold reward, the reward model keeps {sentiment_kept:.0%} of the "
          f"sentiment separation and {form_kept:.0%} of the form separation: on these replies "
          f"it has learned {learned_better}")
else:
    print("the gold reward hardly separates these replies here: no comparison of what the "
          "reward model has learned")
negative_rank = list(rm_order.index).index("fluent, negative") + 1
gold_rank = list(gold_table["gold r*(y)"].sort_values(ascending=False).index).index(
    "fluent, negative") + 1
print(f"the fluent negative review ranks {negative_rank} of {len(rm_order)} by the reward model, "
      f"{gold_rank} by the gold reward; by the reward model it is "
      f"{rm_order['fluent, positive'] - rm_order['fluent, negative']:.2f} below the fluent "
      f"positive one (gold: "
      f"{gold_table.loc['fluent, positive', 'gold r*(y)'] - negative_gold:.2f})")

timings_table = pd.DataFrame({"seconds": timings})
show_table(timings_table, "timings", CHAPTER, floatfmt="{:.1f}")

# %% [markdown]
# ## Results and discussion
#
# **The gold reward.** On the hand-written replies, (7.1b) behaves as a reader would. The lines
# under the gold-reward table show it. The sentiment classifier alone scores "great", "great
# film", a list of adjectives and a repetition loop next to a fluent, warm review, and the first
# line says whether all of them come out at least as positive. The gate gives them $g = 0$ and so
# the floor of $-4$; the second line says whether that lies below the fluent negative review. A
# fragment keeps a quarter of its sentiment and a reply cut off mid-sentence half of it
# ($g_\text{len}$ and $g_\text{end}$ by definition).
#
# Real reviews pass the gate: the next line gives the share of SST-2 validation sentences of
# eight words or more with $g = 1$. A line under the best-of-$n$ figure says whether the SFT
# policy's own samples pass it less often and whether most of them score below zero; the samples
# printed after it show how they fail (rambling, stopping mid-sentence, drifting off topic).
# That leaves a policy optimised against this gold (13-08, 13-09) room to improve by writing
# complete, positive review sentences, and none by collapsing its replies to one word.
#
# **Accuracy.** The data cell prints how many comparisons the reward model trained on (all
# pairs of the replies to each training prompt) and how many held-out pairs it is judged on.
# The accuracy line gives its held-out accuracy and the gold reward's, the ceiling on the same
# noisy labels, each with its 95% Wilson interval; the table adds the ceiling's expected value
# $\mathbb{E}\,\sigma(|\Delta r^\star|)$. The lines under the table decide, from the intervals,
# whether this run resolves the gap to the ceiling and whether the reward model is above chance.
# Against the gold *ranking*, the number that matters for optimisation, the next line compares
# the reward model with the "longer reply wins" heuristic: the gold reward's length gate makes
# length a strong feature, and whether the reward model has learned more or less than length is
# resolved only if the two intervals separate. The training log shows why a linear head on
# frozen features, with about as many weights as comparisons, is fragile: the line under it
# reports where the held-out loss is lowest and whether it stops improving while the training
# loss keeps falling. We report the final model rather than pick the step by the held-out pairs.
#
# **Calibration.** The two expected calibration errors are printed under the table, against the
# empirical frequencies and against the true Bradley-Terry probabilities. The line after them
# reads the diagram: averaged over the pairs it favours, does the reward model predict more
# extreme probabilities than the true ones (overconfident, the usual shape of an overfitted
# scorer) or not.
#
# **Best-of-$n$.** The proxy reward of the chosen reply rises with $n$ by construction (the cell
# asserts it). The lines under the figure give, at the largest $n$ and its KL, the proxy gain,
# the gold gain of the replies the proxy picks, and the gold gain of selecting by the gold reward
# itself, the frontier a perfect reward model would reach on the same samples, each with its 95%
# interval over the prompts. If the gold gain's interval excludes zero, the proxy captures part
# of what the gold reward pays for (the printed share of the frontier) and at this KL budget
# optimising it still helps. Over-optimisation is the gold reward turning down as $n$ grows; the
# last line says whether it does anywhere in this range. Gao et al. see the peak of best-of-$n$
# at a few nats of KL; the printed KL of the largest $n$ says how far this experiment reaches.
#
# The correlations show what the proxy pays for. The lines under the correlation table compare,
# with Fisher intervals, how strongly the proxy follows reply length and the gold reward, and how
# strongly the gold reward follows length. The by-hand replies, scored by the reward model as
# answers to one held-out prompt, are an illustration rather than a measurement: the printed
# order shows where the fluent reviews, the fragments and the one- and two-word replies land,
# and the last lines measure, as shares of each scorer's range, how much of the gold reward's
# separation between the two fluent reviews (sentiment) and between a review and the $g = 0$
# replies (form) the reward model keeps, and which it has learned better. A reward model that
# has learned form and length better than sentiment is what PPO in 13-08 will exploit, and the
# gold reward is what will tell.

# ## Pitfalls
#
# - **Reading the reward at the wrong token.** A classifier head on a causal LM must read the
#   last real token. Left padding moves it; a pad token equal to EOS makes "the last non-pad
#   token" the last token *before* the EOS; truncation can remove it. `last_token_index` reads
#   the mask, the tokenizer check refuses pad = EOS, and `encode_preference_pairs` refuses to
#   truncate.
# - **Left padding without position ids.** Llama's positions ignore the mask, so a left-padded
#   sequence is scored at shifted rotary positions (measured above). Pass position ids, or
#   right-pad.
# - **`log(sigmoid(Δ))`.** It underflows to $-\infty$ for margins below about $-104$ in float32;
#   use `logsigmoid`.
# - **Reading absolute rewards.** The likelihood (7.1) ignores a per-prompt offset, so "the
#   reward of this reply is 2.3" means nothing; compare differences on the same prompt, or center
#   the rewards (TRL's `center_rewards_coefficient`).
# - **Accuracy without a ceiling.** With noisy labels, 70% can be excellent or poor; report the
#   accuracy of a known-good scorer, or the agreement between labellers, next to it.
# - **Trusting the proxy.** The learned reward rises under any optimisation pressure, including
#   when the true objective does not. Keep a held-out gold measure (in practice: human or
#   strong-model evaluations) and a KL budget.
#
# ## Summary
#
# - Pairwise preferences are modelled by Bradley-Terry, eq. (7.1); the reward model minimises
#   the logistic loss (7.2), whose gradient (7.3) weights each pair by the model's probability of
#   ranking it wrongly. The MLE is the logit of the win rate for two items (7.4) and balances
#   observed and expected wins in general (7.5); all checked numerically.
# - The reward model is the SFT transformer plus a zero-initialised linear head read at the last
#   real token, eq. (7.6), with position ids that make left and right padding agree. It matches
#   `LlamaForSequenceClassification`'s pooled logits and TRL's `RewardTrainer` loss to float
#   precision, and is saved in that format for 13-08 and 13-09.
# - The gold reward (7.1b) scores a reply's sentiment only as far as the reply is a review:
#   one word, a fragment, a word list or a loop gets the floor. A reward that a policy can
#   satisfy by collapsing its replies is not a test of alignment.
# - In the tiny profile the reward model trains its head on frozen SFT features (a logistic
#   regression on feature differences); InstructGPT's $K$-wise comparisons give six labelled
#   pairs per four samples.
# - Held-out accuracy is read against the gold reward's ceiling, with intervals; calibration
#   against the true Bradley-Terry probability, which the synthetic task makes available.
# - Best-of-$n$ moves $\log n - (n-1)/n$ nats from the SFT policy, eq. (7.7) (an upper bound for
#   discrete policies, 7.8); it raises the learned reward by construction, and only the gold
#   reward, measured next to it, says how much of that gain is real.
#
# ## Exercises
#
# 1. Train the reward model with TRL's `center_rewards_coefficient = 0.01` added to (7.2). Does
#    the held-out accuracy change? What happens to the mean reward of the SFT policy's replies?
# 2. Fit Gao et al.'s functional form for best-of-$n$, $R(d) = d(\alpha - \beta d)$ with
#    $d = \sqrt{\mathrm{KL}}$, to the gold curve above. Where does it predict the gold reward to
#    peak, and how does that point move when you train the reward model on half the pairs?
# 3. Replace the Bradley-Terry draw by a deterministic label (the higher gold reward always
#    wins). Show that the maximum-likelihood reward differences then diverge, and watch the
#    calibration plot as training goes on.
# 4. Make the simulated labeller biased towards longer replies (add $0.1 \times$ the word count to
#    the gold reward when drawing labels). Does the reward model learn the bias, and does
#    best-of-$n$ exploit it?
#
# ## References
#
# - Bradley & Terry (1952), *Rank Analysis of Incomplete Block Designs: I. The Method of Paired
#   Comparisons*, Biometrika 39; Zermelo (1929); Hunter (2004), *MM algorithms for generalized
#   Bradley-Terry models*, Annals of Statistics 32.
# - Christiano et al. (2017), *Deep reinforcement learning from human preferences*,
#   arXiv:1706.03741.
# - Stiennon et al. (2020), *Learning to summarize from human feedback*, arXiv:2009.01325, §3.4
#   and Appendix (best-of-$N$ KL).
# - Ouyang et al. (2022), *Training language models to follow instructions with human
#   feedback*, arXiv:2203.02155, §3.5 (reward model).
# - Bai et al. (2022), *Training a Helpful and Harmless Assistant with Reinforcement Learning
#   from Human Feedback*, arXiv:2204.05862.
# - Gao, Schulman & Hilton (2022), *Scaling Laws for Reward Model Overoptimization*,
#   arXiv:2210.10760, §2 and Fig. 1.
# - Beirami et al. (2024), *Theoretical guarantees on the best-of-n alignment policy*,
#   arXiv:2401.01879.
# - Singhal, Goyal, Xu & Durrett (2023), *A Long Way to Go: Investigating Length Correlations in
#   RLHF*, arXiv:2310.03716.
# - Eisenstein et al. (2023), *Helping or Herding? Reward Model Ensembles Mitigate but do not
#   Eliminate Reward Hacking*, arXiv:2312.09244.
# - Rafailov et al. (2023), *Direct Preference Optimization*, arXiv:2305.18290, §6.1 (the IMDb
#   controlled-sentiment task).
# - TRL documentation: `RewardTrainer`, `RewardConfig` (version 1.15).
