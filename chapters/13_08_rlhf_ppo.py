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
# (rlhf-ppo)=
# # 13-08 RLHF with PPO
#
# ```{admonition} At a glance
# :class: tip
# **Prerequisites:** {ref}`reward-modeling` (13-07). **Recommended:** 14-07 (PPO in general RL).
# **Reading time:** ~15 min; the tiny profile is budgeted at about 15 minutes on 2 CPU cores
# (eight PPO runs on the 135M-parameter SFT model of 13-06; Experiment 4 prints the time this
# run took).
# **You will build** `ftbook.rlhf_ppo`: PPO for language models in one file, in the spirit of
# CleanRL: a sampling loop with the KV cache that records the behaviour policy's log-probabilities
# and values, the per-token KL penalty against the frozen SFT model, generalised advantage
# estimation, the clipped policy and value losses, an adaptive KL controller, and a PPO update
# that computes the same gradient on two processes (`accelerate launch`) as on one. We check it
# on a problem whose optimum is known in closed form before we point it at the sentiment task of
# 13-07, and trace the reward-versus-KL frontier that 13-09 compares DPO against.
# ```
#
# The SFT model of 13-06 imitates demonstrations; the reward model of 13-07 scores replies. RLHF
# (Ziegler et al. 2019, arXiv:1909.08593; Ouyang et al. 2022, arXiv:2203.02155) turns the second
# into a training signal for the first: sample replies from the policy, score them, and push the
# policy towards the better ones, while a KL penalty keeps it close to the SFT model (the
# *reference*) so that it cannot drift into text the reward model has never seen and scores
# wrongly. Proximal Policy Optimization (Schulman et al. 2017, arXiv:1707.06347) is the optimiser
# of choice of both papers. TRL no longer ships a PPO trainer, so we write every step ourselves.

# %%
from ftbook.workbench import (
    device_cell,
    get_device,
    get_profile,
    pick,
    rehearsing,
    seed_everything,
)

CHAPTER = "13_08_rlhf_ppo"
PROFILE = get_profile()
SEED = 0
seed_everything(SEED)
DEVICE = get_device()
RUN_INFO = device_cell(PROFILE, SEED, DEVICE)

# %% [markdown]
# ## The objective and its optimum
#
# For a prompt $x$ from the prompt distribution $\mathcal{D}$, the policy $\pi_\theta$ samples a
# reply $y$, the reward model scores it $r(x, y)$, and the objective trades reward against the
# divergence from the reference policy $\pi_\text{ref}$ (the SFT model) with a coefficient
# $\beta$:
#
# $$
# \max_{\pi}\; J(\pi) = \mathbb{E}_{x \sim \mathcal{D}}\Big[\,
# \mathbb{E}_{y \sim \pi(\cdot \mid x)}\, r(x, y)
# - \beta\, \mathrm{KL}\big(\pi(\cdot \mid x)\,\|\,\pi_\text{ref}(\cdot \mid x)\big)\Big].
# \tag{8.1}
# $$
#
# For each prompt, (8.1) is maximised over distributions on replies by
#
# $$
# \pi^*(y \mid x) = \frac{1}{Z(x)}\, \pi_\text{ref}(y \mid x)\, e^{r(x, y) / \beta},
# \qquad Z(x) = \sum_y \pi_\text{ref}(y \mid x)\, e^{r(x, y)/\beta}.
# \tag{8.2}
# $$
#
# To see it, write $r = \beta \log(\pi^* / \pi_\text{ref}) + \beta \log Z$ and substitute into the
# inner expectation of (8.1):
#
# $$
# J_x(\pi) = \mathbb{E}_{y \sim \pi}\Big[\beta \log \frac{\pi^*(y \mid x)}{\pi_\text{ref}(y \mid x)}
# + \beta \log Z(x) - \beta \log \frac{\pi(y \mid x)}{\pi_\text{ref}(y \mid x)}\Big]
# = \beta \log Z(x) - \beta\, \mathrm{KL}\big(\pi(\cdot \mid x)\,\|\,\pi^*(\cdot \mid x)\big).
# \tag{8.3}
# $$
#
# The KL is zero only at $\pi = \pi^*$, so $\pi^*$ is the maximiser and $J^* = \beta \log Z$.
# Equation (8.3) also gives us a yardstick: on a problem small enough to enumerate every reply,
# the gap $J^* - J(\pi)$ of a trained policy is $\beta$ times its KL to the optimum. DPO (13-09)
# starts from (8.2) too; PPO never computes $Z$, it climbs $J$ by sampling.

# %%
import torch

torch.manual_seed(0)
n_replies, beta_check = 12, 0.5
# float64, so that the identities below hold to ~1e-15 (sums of 12 terms of size < 10)
log_ref = torch.log_softmax(torch.randn(n_replies).double(), 0)  # log pi_ref(y), 12 replies
reward = torch.randn(n_replies).double()  # r(y)
log_pi = torch.log_softmax(torch.randn(n_replies).double(), 0)  # any policy


def objective(log_p):  # J = E_p[r] - beta KL(p || ref), eq. (8.1) for one prompt
    p = log_p.exp()
    return (p * reward).sum() - beta_check * (p * (log_p - log_ref)).sum()


log_opt = torch.log_softmax(log_ref + reward / beta_check, 0)  # eq. (8.2)
log_z = torch.logsumexp(log_ref + reward / beta_check, 0)
kl_to_opt = (log_pi.exp() * (log_pi - log_opt)).sum()
print(f"J(pi) = {objective(log_pi):.4f}; beta log Z - beta KL(pi || pi*) = "
      f"{beta_check * log_z - beta_check * kl_to_opt:.4f}; J(pi*) = {objective(log_opt):.4f} = "
      f"beta log Z = {beta_check * log_z:.4f}")
assert torch.isclose(objective(log_pi), beta_check * (log_z - kl_to_opt), rtol=0, atol=1e-9)
assert torch.isclose(objective(log_opt), beta_check * log_z, rtol=0, atol=1e-9)  # (8.3)

# %% [markdown]
# ## Tokens as actions
#
# A reply is a sequence $y = (y_1, \dots, y_T)$ ending with EOS (or cut at the length limit), and
# $\pi(y \mid x) = \prod_t \pi(y_t \mid s_t)$ with the *state* $s_t = (x, y_{<t})$. The log-ratio
# of sequences is the sum of per-token log-ratios, so the sample of (8.1) for one reply is the
# sum of per-token rewards
#
# $$
# r_t = -\beta \big(\log \pi(y_t \mid s_t) - \log \pi_\text{ref}(y_t \mid s_t)\big)
# + \mathbb{1}[t = T]\; r(x, y),
# \tag{8.4}
# $$
#
# undiscounted ($\gamma = 1$). This is the RLHF reward of Ziegler et al. (§2.2) and of TRL's
# former `PPOTrainer`: the reward model speaks once, at the last token, and every token pays its
# own KL. A token-level view lets a value function assign credit: a token that makes a good
# ending likely gets a positive advantage long before the reward arrives.
#
# ### Estimating the KL from samples
#
# The penalty in (8.4) is a one-sample estimate of the KL. With $y \sim \pi$ and the ratio
# $\rho = \pi_\text{ref}(y) / \pi(y)$, Schulman's note *Approximating KL divergence* (2020)
# compares three estimators of $\mathrm{KL}(\pi \,\|\, \pi_\text{ref})$:
#
# $$
# k_1 = -\log \rho, \qquad k_2 = \tfrac{1}{2} (\log \rho)^2, \qquad k_3 = (\rho - 1) - \log \rho .
# \tag{8.5}
# $$
#
# $\mathbb{E}_\pi[k_1] = \mathrm{KL}$ by definition. $\mathbb{E}_\pi[\rho] = \sum_y \pi_\text{ref}(y) = 1$,
# so adding the zero-mean control variate $\rho - 1$ keeps $k_3$ unbiased, and because
# $\log \rho \le \rho - 1$, every sample of $k_3$ is non-negative, where $k_1$ is negative
# whenever the sampled token is likelier under the reference. $k_2$ is biased but agrees with the
# KL to second order when the two distributions are close. We measure bias and spread on two
# pairs with a known KL: Schulman's Gaussians $q = \mathcal{N}(0, 1)$, $p = \mathcal{N}(\mu, 1)$
# ($\mathrm{KL} = \mu^2/2$), and two categorical distributions over 50 "tokens" built like a
# policy and its reference (one perturbed logit vector of the other).

# %%
import math

import pandas as pd

from ftbook.workbench import show_table


def kl_estimator_row(name: str, log_rho: torch.Tensor, true_kl: float) -> dict:
    """Bias and relative spread of k1, k2, k3 from samples of log rho = log p/q, x ~ q."""
    rho = log_rho.exp()
    estimates = {"k1": -log_rho, "k2": 0.5 * log_rho**2, "k3": (rho - 1) - log_rho}  # eq. (8.5)
    row = {"pair": name, "true KL": true_kl}
    for key, values in estimates.items():
        row[f"{key} bias"] = values.mean().item() - true_kl
        row[f"{key} std/KL"] = values.std().item() / true_kl
    row["k1 < 0 (share)"] = (-log_rho < 0).double().mean().item()
    return row


generator = torch.Generator().manual_seed(0)
n_samples = 1_000_000
kl_rows = []
for mu in (0.1, 1.0):  # q = N(0, 1), p = N(mu, 1): log p/q = mu x - mu^2 / 2
    x = torch.randn(n_samples, generator=generator, dtype=torch.float64)
    kl_rows.append(kl_estimator_row(f"Gaussians, mu = {mu}", mu * x - mu**2 / 2, mu**2 / 2))
for scale in (0.3, 1.0):  # categorical "policy" q and "reference" p over 50 tokens
    logits_q = 2 * torch.randn(50, generator=generator, dtype=torch.float64)
    log_q = torch.log_softmax(logits_q, 0)
    log_p = torch.log_softmax(logits_q + scale * torch.randn(50, generator=generator,
                                                             dtype=torch.float64), 0)
    tokens = torch.multinomial(log_q.exp(), n_samples, replacement=True, generator=generator)
    exact = (log_q.exp() * (log_q - log_p)).sum().item()
    kl_rows.append(kl_estimator_row(f"categorical, perturbation {scale}",
                                    (log_p - log_q)[tokens], exact))
kl_table = pd.DataFrame(kl_rows).set_index("pair")
show_table(kl_table, "kl_estimators", CHAPTER, floatfmt="{:.3g}")
standard_error = kl_table["k1 std/KL"] * kl_table["true KL"] / math.sqrt(n_samples)
# statistical, with 1e6 samples: a zero bias lies within 5 standard errors except with
# probability 6e-7 (k3's standard error is at most k1's here, so k1's is the looser bound)
assert (kl_table["k1 bias"].abs() < 5 * standard_error).all()  # unbiased
assert (kl_table["k3 bias"].abs() < 5 * standard_error).all()  # unbiased
# and never noisier here: the closest pair differs by over 10% (Gaussians, mu = 1: 1.73 against
# 2 exactly), where a standard deviation from 1e6 samples is uncertain by well under 1%
assert (kl_table["k3 std/KL"] <= kl_table["k1 std/KL"]).all()
spread_ratio = kl_table["k1 std/KL"] / kl_table["k3 std/KL"]
for pair, row in kl_table.iterrows():
    print(f"{pair}: std/KL of k1 {row['k1 std/KL']:.3g}, of k3 {row['k3 std/KL']:.3g} "
          f"({spread_ratio[pair]:.1f} times smaller); k2 bias / KL {row['k2 bias'] / row['true KL']:+.3g};"
          f" a k1 sample is negative {row['k1 < 0 (share)']:.0%} of the time")
closest = kl_table["true KL"].idxmin()
print(f"k3's advantage over k1 is largest for {spread_ratio.idxmax()!r}, "
      + ("the closest pair" if spread_ratio.idxmax() == closest else
         f"not for the closest pair ({closest!r})")
      + "; k2's bias relative to the KL "
      + ("rises" if (kl_table.sort_values("true KL")["k2 bias"] / kl_table.sort_values("true KL")[
          "true KL"]).abs().is_monotonic_increasing else "does not rise monotonically")
      + " with the true KL across the four pairs")

# %% [markdown]
# $k_1$ and $k_3$ are unbiased (their biases are within Monte Carlo error, which the cell
# asserts), and $k_3$ has the smaller spread in every row (asserted too). When the distributions
# are close, a single $k_1$ sample is a small difference of two large log-probabilities, often
# negative (the printed shares), and that is where the printed lines place $k_3$'s advantage.
# $k_2$ is biased: for the Gaussians $\mathbb{E}[k_2] - \mathrm{KL} = \mu^4/8$ exactly, a share
# $\mu^2/4$ of the KL that grows with the divergence; the last printed line says whether the
# categorical pairs follow suit. We use $k_1$ *inside the reward*,
# eq. (8.4), because its sum over tokens is exactly the sequence log-ratio, and report both
# $k_1$ and $k_3$ of the sequences as the KL of a run. (GRPO in 13-09 puts $k_3$ in the loss.)
#
# ## Advantages: generalised advantage estimation
#
# A value function $V(s_t)$ predicts the return still to come from state $s_t$. The temporal
# difference error
#
# $$
# \delta_t = r_t + \gamma V(s_{t+1}) - V(s_t), \qquad V(s_{T+1}) = 0,
# \tag{8.6}
# $$
#
# is a one-step advantage estimate. Chaining $n$ of them telescopes into the $n$-step estimate
#
# $$
# \hat A^{(n)}_t = \sum_{l=0}^{n-1} \gamma^l r_{t+l} + \gamma^n V(s_{t+n}) - V(s_t)
# = \sum_{l=0}^{n-1} \gamma^l \delta_{t+l},
# \tag{8.7}
# $$
#
# from $\hat A^{(1)} = \delta_t$ (low variance, biased by $V$'s errors) to the Monte Carlo return
# minus the baseline (unbiased, noisy). Generalised advantage estimation (Schulman et al. 2015,
# arXiv:1506.02438, §3) averages all of them with weights $(1 - \lambda)\lambda^{n-1}$:
#
# $$
# \hat A^{\text{GAE}}_t = (1 - \lambda) \sum_{n \ge 1} \lambda^{n-1} \hat A^{(n)}_t
# = \sum_{l \ge 0} (\gamma \lambda)^l \delta_{t+l}.
# \tag{8.8}
# $$
#
# (Swap the sums: $\delta_{t+l}$ appears in every $\hat A^{(n)}$ with $n > l$, with total weight
# $(1-\lambda)\sum_{n>l}\lambda^{n-1}\gamma^l = (\gamma\lambda)^l$. In an episode that ends at $T$
# all $\hat A^{(n)}$ with $n > T - t$ equal the full return, and the same sum stops at $l = T - t$.)
# The sum obeys the backward recursion
#
# $$
# \hat A_t = \delta_t + \gamma \lambda\, \hat A_{t+1}, \qquad \hat A_{T+1} = 0,
# \tag{8.9}
# $$
#
# one pass from the last token to the first. The value function's regression target is
# $R_t = \hat A_t + V(s_t)$, the $\lambda$-return. With $\lambda = 0$ we get $\delta_t$; with
# $\lambda = 1$ the return minus the baseline. Replies of different lengths are right-padded in a
# batch: padding positions must carry zero reward and zero value, so that $V(s_{T+1}) = 0$ holds
# at each reply's own end.

# %% [markdown]
# ## The clipped surrogate objective
#
# PPO reuses each batch of samples for several gradient steps. With the probability ratio
# $\rho_t(\theta) = \pi_\theta(y_t \mid s_t) / \pi_{\theta_\text{old}}(y_t \mid s_t)$ between the
# policy being trained and the *behaviour* policy that sampled the tokens, the clipped surrogate
# loss (Schulman et al. 2017, eq. 7) is
#
# $$
# L^\text{CLIP}(\theta) = -\,\mathbb{E}_t\Big[\min\big(\rho_t(\theta)\, \hat A_t,\;
# \operatorname{clip}(\rho_t(\theta), 1 - \varepsilon, 1 + \varepsilon)\, \hat A_t\big)\Big].
# \tag{8.10}
# $$
#
# At $\theta = \theta_\text{old}$ its gradient is the policy gradient. Once a token's ratio has
# moved past $1 + \varepsilon$ in the direction its advantage favours ($\hat A_t > 0$), or below
# $1 - \varepsilon$ for $\hat A_t < 0$, the minimum selects the clipped, constant branch and the
# token's gradient is exactly zero: it cannot be pushed further on this batch. Moves in the
# unfavoured direction are never clipped, so a mistake can always be undone. The value function
# is trained on a clipped loss of the same spirit (as in the PPO baselines and TRL):
#
# $$
# L^V(\theta) = \tfrac{1}{2}\,\mathbb{E}_t \max\Big( \big(V_\theta(s_t) - R_t\big)^2,\;
# \big(V_\text{old}(s_t) + \operatorname{clip}(V_\theta(s_t) - V_\text{old}(s_t), -\varepsilon_V,
# \varepsilon_V) - R_t\big)^2 \Big),
# \tag{8.11}
# $$
#
# and the total loss adds an entropy bonus $\mathcal H$ (usually zero in RLHF, where the KL
# penalty already keeps the policy stochastic):
#
# $$
# L = L^\text{CLIP} + c_V L^V - c_H\, \mathbb{E}_t\, \mathcal{H}\big[\pi_\theta(\cdot \mid s_t)\big].
# \tag{8.12}
# $$
#
# $\mathbb{E}_t$ is the mean over every valid (non-padding) response token of the minibatch.
#
# ## Implementation
#
# ### Masked statistics, the KL estimators, the rewards and GAE
#
# Every tensor below is (batch, response length), right-padded, with a boolean `response_mask`.
# Padding may hold anything, including NaN from fully masked attention rows, so masking uses
# `torch.where` rather than multiplication. The global reductions (`reduce_sum`) are what makes
# the update exact across processes later: a mean over tokens must divide by the token count of
# the *whole* batch, not of one process's share.

# %%
#| export
"""PPO for language models in one file: rollouts with the KV cache, the per-token KL penalty,
GAE, the clipped policy and value losses, an adaptive KL controller, and a PPO update that gives
the same result on several processes as on one.

Chapter 13-08. Schulman et al. 2017 (arXiv:1707.06347) for PPO; Schulman et al. 2015
(arXiv:1506.02438) for GAE; Ziegler et al. 2019 (arXiv:1909.08593) for the RLHF reward, reward
normalisation and the adaptive KL controller; Ouyang et al. 2022 (arXiv:2203.02155); Schulman
(2020), "Approximating KL divergence", for the k1/k3 estimators.
"""
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# transformers and peft are imported where used: they take seconds to import
import torch
from torch import nn

from ftbook.instruction_tuning import compute_entropy, masked_normalize, masked_sum  # 13-06
from ftbook.prompt_tuning import position_ids_from_mask  # 13-05
from ftbook.workbench import rounding_bound, unit_roundoff  # Appendix A


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 if it is in a narrower type (bf16, fp16); float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def reduce_sum(value: torch.Tensor, accelerator: Any = None) -> torch.Tensor:
    """Sum `value` over all processes (identity on one process or without an accelerator)."""
    if accelerator is None or accelerator.num_processes == 1:
        return value
    return accelerator.reduce(value.clone(), reduction="sum")


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, accelerator: Any = None,
                  eps: float = 1e-8) -> torch.Tensor:
    """(values - mean) / std over the masked entries of the whole batch, on every process;
    padding is set to 0."""
    stats = torch.stack([masked_sum(values.double(), mask),
                         masked_sum(values.double() ** 2, mask), mask.sum().double()])
    total, total_sq, count = reduce_sum(stats, accelerator).tolist()
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean**2, 0.0))
    whitened = (values - mean) / (std + eps)
    return torch.where(mask, whitened, torch.zeros_like(whitened))


def kl_k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k1 = log pi - log pi_ref = -log rho, eq. (8.5); unbiased, can be negative."""
    return logps - ref_logps


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 = (rho - 1) - log rho with rho = pi_ref / pi, eq. (8.5); unbiased, >= 0."""
    log_rho = ref_logps - logps
    return torch.expm1(log_rho) - log_rho


def token_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor,
                  response_mask: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of eq. (8.4): -beta k1 on every token, plus the sequence score on the
    last valid token. Returns (rewards, k1), both (batch, T) and zero on padding."""
    kl = torch.where(response_mask, kl_k1(logps, ref_logps), torch.zeros_like(logps))
    rewards = -beta * kl
    last = response_mask.long().sum(1) - 1  # (batch,) index of each reply's last token
    if (last < 0).any():
        raise ValueError("every reply needs at least one token (response_mask has an empty row)")
    rewards[torch.arange(len(last), device=last.device), last] += scores.to(rewards.dtype)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor,
        gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, eqs. (8.6)-(8.9) (Schulman et al. 2015,
    arXiv:1506.02438, §3), for right-padded replies. Returns (advantages, returns), (batch, T),
    zero on padding; returns = advantages + values are the value targets."""
    rewards = torch.where(response_mask, rewards, torch.zeros_like(rewards))
    values = torch.where(response_mask, values, torch.zeros_like(values))  # V(s_{T+1}) = 0
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # A_{t+1}
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # eq. (8.6)
        running = delta + gamma * lam * running  # eq. (8.9)
        advantages[:, t] = running
    advantages = torch.where(response_mask, advantages, torch.zeros_like(advantages))
    return advantages, advantages + values


# %% [markdown]
# Check (8.8) and (8.9): on random rewards and values with replies of lengths 7, 3 and 1 padded
# to 7, the recursion equals the direct discounted sum of TD errors $\sum_l (\gamma\lambda)^l
# \delta_{t+l}$, the $\lambda$-weighted average of the $n$-step estimates (8.7), and the two
# limits $\lambda \in \{0, 1\}$.

# %%
torch.manual_seed(1)
lengths = torch.tensor([7, 3, 1])
T_max = int(lengths.max())
mask_check = torch.arange(T_max)[None, :] < lengths[:, None]  # (3, 7)
rewards_check = torch.randn(3, T_max).double().masked_fill(~mask_check, float("nan"))  # junk
values_check = torch.randn(3, T_max).double()  # float64: see the tolerance below
gamma_check, lam_check = 0.9, 0.8
adv, ret = gae(rewards_check, values_check, mask_check, gamma_check, lam_check)


def direct_gae(r, v, length, gamma, lam):
    """sum_k (gamma lam)^k delta_{t+k} and the lambda-average of n-step estimates, one reply."""
    v_next = torch.cat([v[1:length], torch.zeros(1)])
    delta = r[:length] + gamma * v_next - v[:length]
    direct = torch.stack([sum((gamma * lam) ** k * delta[t + k] for k in range(length - t))
                          for t in range(length)])

    def n_step(t, n):  # eq. (8.7); past the end every n-step estimate is the full return
        return sum(gamma**k * delta[t + k] for k in range(min(n, length - t)))

    averaged = torch.stack([(1 - lam) * sum(lam ** (n - 1) * n_step(t, n) for n in range(1, 200))
                            for t in range(length)])
    return direct, averaged


# each computation adds at most 199 n-step sums x 7 TD errors x 3 terms, whose magnitudes add up
# to at most 7 x 3 max|r or V| (the weights (1 - lam) lam^(n-1) sum to 1): (A.1), twice
size = max(rewards_check[mask_check].abs().max().item(), values_check.abs().max().item())
gae_tol = 2 * rounding_bound(199 * 7 * 3, 7 * 3 * size, torch.float64)
for i, length in enumerate(lengths.tolist()):
    direct, averaged = direct_gae(rewards_check[i], values_check[i], length, gamma_check, lam_check)
    assert torch.allclose(adv[i, :length], direct, rtol=0, atol=gae_tol)
    assert torch.allclose(adv[i, :length], averaged, rtol=0, atol=gae_tol)
    assert torch.equal(adv[i, length:], torch.zeros(T_max - length))
adv0, _ = gae(rewards_check, values_check, mask_check, gamma_check, 0.0)
adv1, ret1 = gae(rewards_check, values_check, mask_check, gamma_check, 1.0)
mc_return = torch.stack([sum(gamma_check**k * rewards_check[0, t + k] for k in range(7 - t))
                         for t in range(7)])
assert torch.allclose(adv1[0], mc_return - values_check[0], rtol=0, atol=gae_tol)  # MC - V
assert torch.allclose(ret1[0], mc_return, rtol=0, atol=gae_tol)
delta0 = rewards_check[0] + gamma_check * torch.cat([values_check[0, 1:], torch.zeros(1)]) \
    - values_check[0]
assert torch.allclose(adv0[0], delta0, rtol=0, atol=gae_tol)  # lambda = 0: one TD error
print("GAE recursion = direct sum of TD errors = lambda-average of n-step advantages; "
      f"max |diff| = {max((adv[i, :n] - direct_gae(rewards_check[i], values_check[i], n, gamma_check, lam_check)[0]).abs().max().item() for i, n in enumerate(lengths.tolist())):.1e} "
      f"(tolerance {gae_tol:.1e})")

# %% [markdown]
# ### The losses
#
# `clipped_policy_loss` and `clipped_value_loss` implement (8.10) and (8.11) with a normaliser
# `count`: by default the minibatch's own token count; `ppo_update` passes the count of the
# whole batch across processes. They also return the diagnostics every PPO run should log: the
# fraction of tokens whose ratio was clipped, and the $k_3$ estimate of
# $\mathrm{KL}(\pi_\text{old} \,\|\, \pi_\theta)$ between behaviour and current policy (how far
# the optimisation has walked from the data).

# %%
#| export
def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                        response_mask: torch.Tensor, cliprange: float = 0.2, count: Any = None
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate loss of eq. (8.10) (Schulman et al. 2017, arXiv:1707.06347, eq. 7),
    summed over the valid tokens and divided by `count` (default: their number). Returns (loss,
    stats) with the clip fraction and the k3 estimate of KL(pi_old || pi_theta)."""
    count = response_mask.sum() if count is None else count
    log_ratio = logps - old_logps  # (batch, T)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_normalize(torch.maximum(unclipped, clipped), response_mask, count)
    with torch.no_grad():
        clip_frac = masked_normalize((clipped > unclipped).float(), response_mask, count)
        # k3 of KL(pi_old || pi_theta) on tokens sampled from pi_old: rho = pi_theta / pi_old
        approx_kl = masked_normalize(kl_k3(old_logps, logps), response_mask, count)
    return loss, {"clip_frac": clip_frac, "approx_kl": approx_kl}


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       response_mask: torch.Tensor, cliprange_value: float | None = 0.2,
                       count: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped value loss of eq. (8.11); `cliprange_value=None` gives the plain squared error.
    Token sums are divided by `count` (default: the number of valid tokens). Returns (loss,
    stats) with the fraction of tokens where the clipped branch was larger."""
    count = response_mask.sum() if count is None else count
    unclipped = (values - returns) ** 2
    if cliprange_value is None:
        loss = 0.5 * masked_normalize(unclipped, response_mask, count)
        return loss, {"value_clip_frac": torch.zeros((), device=values.device)}
    moved = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    clipped = (moved - returns) ** 2
    loss = 0.5 * masked_normalize(torch.maximum(unclipped, clipped), response_mask, count)
    with torch.no_grad():
        frac = masked_normalize((clipped > unclipped).float(), response_mask, count)
    return loss, {"value_clip_frac": frac}


# %% [markdown]
# Check the clipping logic on the four cases of (8.10): for a positive advantage the gradient
# vanishes once the ratio exceeds $1+\varepsilon$ and not below; for a negative one, once the ratio
# is below $1-\varepsilon$. The value loss likewise has zero gradient when the new value has moved
# more than $\varepsilon_V$ from the old one *and* the clipped prediction is the worse of the two.

# %%
eps = 0.2
ratios = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.1])
advantages_demo = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0])
new_logps = torch.log(ratios).requires_grad_()
loss, info = clipped_policy_loss(new_logps[None], torch.zeros(1, 5), advantages_demo[None],
                                 torch.ones(1, 5, dtype=torch.bool), eps)
loss.backward()
grad = new_logps.grad
print("ratio     ", ratios.tolist(), "\nadvantage ", advantages_demo.tolist(),
      "\nd loss / d log pi", [round(g, 3) for g in grad.tolist()],
      f"\nclip fraction {info['clip_frac']:.2f}")
assert grad[0] == 0 and grad[3] == 0  # A > 0, rho > 1 + eps; A < 0, rho < 1 - eps: clipped
assert grad[1] != 0 and grad[2] != 0 and grad[4] != 0  # unfavoured moves and rho inside: live
terms = -advantages_demo * torch.tensor([1.2, 0.5, 1.5, 0.8, 1.1])  # min(rho A, clip(rho) A)
# exp(log rho) and the products add ~3u per term, the mean's sum gamma_4: (A.1) with n = 8, twice
assert torch.isclose(loss, terms.mean(), rtol=0,
                     atol=2 * rounding_bound(8, terms.abs().mean().item()))

v_new = torch.tensor([2.0, 2.0, 0.1]).requires_grad_()
v_old, v_target = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([1.0, 3.0, 0.0])
v_loss, v_info = clipped_value_loss(v_new[None], v_old[None], v_target[None],
                                    torch.ones(1, 3, dtype=torch.bool), 0.2, count=1.0)
v_loss.backward()
print("value: new", v_new.tolist(), "old", v_old.tolist(), "target", v_target.tolist(),
      "grad", [round(g, 3) for g in v_new.grad.tolist()])
# 1: moved by 2 > 0.2, but the clipped prediction 0.2 is closer to the target 1: live
# 2: the clipped prediction 0.2 is farther from the target 3 than 2.0 is: clipped, no gradient
# 3: moved by 0.1 < 0.2: both branches agree: live
assert v_new.grad[0] != 0 and v_new.grad[1] == 0 and v_new.grad[2] != 0

# %% [markdown]
# In the second value case the network already predicts 2.0 for a target of 3.0, but the
# clipped branch (0.2, the old value moved by at most $\varepsilon_V$) is worse and wins the
# maximum: no gradient, although the prediction is still 1.0 off. Value clipping therefore
# slows the value function down whenever the returns move fast, which is exactly what happens
# when the reward model's scale is large; the reward normalisation below keeps returns of order
# one, where $\varepsilon_V = 0.2$ is a sensible step.
#
# ### The adaptive KL controller and reward normalisation
#
# Ziegler et al. (§2.2) adjust $\beta$ so that the measured KL of the policy's samples tracks a
# target, with a clipped proportional controller:
#
# $$
# e_t = \operatorname{clip}\Big(\frac{\mathrm{KL}_t - \mathrm{KL}_\text{target}}
# {\mathrm{KL}_\text{target}}, -0.2, 0.2\Big), \qquad \beta_{t+1} = \beta_t\,(1 + K_\beta\, e_t),
# \tag{8.13}
# $$
#
# with $K_\beta = 0.1$. The clip bounds the change of $\beta$ per step to 2%, so one noisy batch
# cannot swing it. They also normalise the reward model so that its scores on samples of the
# initial policy have mean 0 and standard deviation 1 (their released code sets a gain and a bias
# before training):
#
# $$
# \tilde r(x, y) = \big(r(x, y) - \mu_0\big) / \sigma_0 .
# \tag{8.14}
# $$
#
# A Bradley-Terry reward model is defined only up to an additive constant, and its scale depends
# on how long it was trained; after (8.14), $\beta$ is measured in standard deviations of the
# initial reward per nat, and means the same thing for every reward model.

# %%
#| export
class KLController:
    """The KL coefficient beta: fixed (`target=None`) or adapted towards `target` nats per reply
    by the clipped proportional controller of eq. (8.13) (Ziegler et al. 2019,
    arXiv:1909.08593, §2.2)."""

    def __init__(self, beta: float, target: float | None = None, k_beta: float = 0.1,
                 max_error: float = 0.2):
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if target is not None and target <= 0:
            raise ValueError(f"target KL must be positive or None, got {target}")
        self.value, self.target, self.k_beta, self.max_error = beta, target, k_beta, max_error

    def update(self, kl: float) -> float:
        """Move beta after a PPO step whose replies had mean KL `kl`; returns the new beta."""
        if self.target is not None:
            error = min(max((kl - self.target) / self.target, -self.max_error), self.max_error)
            self.value *= 1.0 + self.k_beta * error
        return self.value


@dataclass
class RewardNormalizer:
    """Eq. (8.14): scores minus `mean`, divided by `std`, both measured on samples of the initial
    policy (Ziegler et al. 2019, arXiv:1909.08593). The identity until `fit` is called."""

    mean: float = 0.0
    std: float = 1.0

    def fit(self, scores: torch.Tensor) -> "RewardNormalizer":
        if scores.numel() < 2:
            raise ValueError("reward normalisation needs at least two scores")
        self.mean, self.std = scores.float().mean().item(), scores.float().std().item()
        if not self.std > 0:
            raise ValueError(f"reward scores have zero spread (std {self.std}); cannot normalise")
        return self

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores - self.mean) / self.std


# %% [markdown]
# The controller moves $\beta$ up when the KL overshoots the target, down when it undershoots,
# by at most $K_\beta \cdot 0.2 = 2\%$ a step; a fixed controller never moves.

# %%
controller = KLController(0.1, target=6.0)
trace = [controller.update(kl) for kl in (12.0, 12.0, 6.0, 3.0, 5.9)]
print("beta after KL = 12, 12, 6, 3, 5.9 (target 6):", [f"{b:.5f}" for b in trace])
assert trace[0] == 0.1 * 1.02 and trace[1] > trace[0] and trace[2] == trace[1]
assert trace[3] < trace[2] and trace[4] < trace[3]
assert KLController(0.1).update(100.0) == 0.1

# %% [markdown]
# ### Policy and value: one trunk, two heads
#
# The value function needs a network that reads the state $s_t$, a prompt and a partial reply.
# Two designs are common. InstructGPT trains a *separate critic*, a copy of the reward model
# with a scalar head (Ouyang et al. §3.5); TRL's former PPO trainer did the same. The cheaper
# alternative puts a *scalar head on the policy's last hidden state* and shares the trunk.
#
# We share the trunk. On two CPU cores a separate critic doubles the forward and backward passes
# of every minibatch and keeps a fourth model in memory (policy, critic, reference, reward
# model); here that would halve the number of PPO steps that fit in the budget. The price is
# interference: the value loss's gradient flows into the policy's weights. We keep it small with
# $c_V = 0.1$ (TRL's default weight for the value loss), and the head starts at zero, so the
# initial values are 0 and the first update cannot be dominated by a random critic. At scale the
# separate critic is the safer choice, and the exercises ask you to build it.
#
# The wrapper reads the trunk's last hidden state once and applies both heads; during sampling
# it applies them to the last position only. It also switches dropout off: with dropout, the
# behaviour log-probabilities recorded at sampling time and those recomputed in the update come
# from different networks, and the ratio $\rho_t$ is not 1 at the start of the update.

# %%
#| export
def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0, so that sampling and training see one network."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout"):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)
    return model


class PolicyWithValue(nn.Module):
    """A causal LM with a scalar value head on its last hidden state (shared trunk).

    `forward(input_ids, attention_mask, position_ids, past_key_values, use_cache, last_only)`
    returns `(logits, values, past_key_values)`: logits (batch, seq, vocab) of the LM's own head,
    values (batch, seq), V(s_t) read at the position that predicts token t. The value head starts
    at zero (Ziegler et al. 2019; a separate critic is the alternative, Ouyang et al. 2022, §3.5).
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = disable_dropout(lm)
        hidden = lm.config.hidden_size
        weight = lm.get_output_embeddings().weight
        self.value_head = torch.nn.utils.skip_init(  # no draw from the global RNG
            nn.Linear, hidden, 1, device=weight.device, dtype=torch.float32)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @property
    def config(self) -> Any:
        return self.lm.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, past_key_values: Any = None,
                use_cache: bool = False, last_only: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        out = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids, past_key_values=past_key_values,
                                 use_cache=use_cache)
        hidden = out.last_hidden_state  # (batch, seq, hidden), after the final norm
        if last_only:
            hidden = hidden[:, -1:]
        logits = self.lm.get_output_embeddings()(hidden)  # (batch, seq, vocab)
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)  # (b, seq)
        return logits, values, out.past_key_values if use_cache else None


# %% [markdown]
# ### Rollouts with the KV cache
#
# Sampling is the expensive half of RLHF. Our loop is the one `model.generate` runs, written out
# so that nothing is hidden:
#
# - **Left padding.** Prompts of different lengths are padded on the left, so that every row's
#   next token is at the last column. Position ids count real tokens only
#   (`cumsum(attention_mask) - 1`); without them a padded row would see its prompt at shifted
#   positions and sample from a different distribution than an unpadded one.
# - **The cache.** The first forward pass (the *prefill*) runs the whole prompt and returns the
#   keys and values of every layer; each later step feeds only the newest token, its position,
#   and the attention mask extended by one column.
# - **Stopping.** A row that has produced EOS keeps receiving the pad token (masked out of the
#   reply); the loop stops when every row has finished or at `max_new_tokens`.
# - **Bookkeeping.** At each step we record the sampled token, its log-probability under the
#   behaviour policy (the distribution we actually sampled from, so with the same temperature),
#   and the value $V(s_t)$ of the state that produced it. These are $\log\pi_{\theta_\text{old}}$
#   and $V_\text{old}$ of (8.10) and (8.11); no second forward pass is needed.

# %%
#| export
@dataclass
class Rollout:
    """A batch of sampled replies. Prompts are left-padded, replies right-padded.

    prompt_ids, prompt_mask: (batch, P); response_ids: (batch, T) (pad after EOS);
    response_mask: (batch, T) bool, true up to and including EOS; logps, values: (batch, T),
    log pi_old(y_t | s_t) and V_old(s_t) of the sampled tokens (0 on padding); ended: (batch,)
    whether the reply produced EOS; prompt_index: (batch,) rows of the prompt set (set by the
    training and evaluation loops, for reward functions that need the prompt's text).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logps: torch.Tensor
    values: torch.Tensor
    ended: torch.Tensor
    prompt_index: torch.Tensor | None = None

    def full_inputs(self) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask and position_ids of prompt + reply, (batch, P + T)."""
        input_ids = torch.cat([self.prompt_ids, self.response_ids], dim=1)
        attention_mask = torch.cat([self.prompt_mask.long(), self.response_mask.long()], dim=1)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "position_ids": position_ids_from_mask(attention_mask)}

    def lengths(self) -> torch.Tensor:
        return self.response_mask.long().sum(1)


def trim_left_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the leading columns that are padding in every row."""
    keep = mask.bool().any(0).nonzero()
    first = int(keep[0]) if len(keep) else ids.shape[1]
    return ids[:, first:], mask[:, first:]


@torch.no_grad()
def generate_rollout(policy: PolicyWithValue, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                     *, max_new_tokens: int, eos_token_id: int, pad_token_id: int,
                     temperature: float = 1.0, generator: torch.Generator | None = None
                     ) -> Rollout:
    """Sample replies to left-padded prompts with the KV cache, recording the behaviour policy's
    per-token log-probabilities and values. With `generator=None` the global RNG is used, in the
    same order as `model.generate(do_sample=True, top_k=0)`, so the tokens match it."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    if (prompt_mask.sum(1) == 0).any():
        raise ValueError("a prompt row is all padding")
    if prompt_mask[:, -1].eq(0).any():
        raise ValueError("prompts must be left-padded: the last column has padding")
    was_training = policy.training
    policy.eval()
    batch = prompt_ids.shape[0]
    attention = prompt_mask.long()
    position = position_ids_from_mask(attention)  # (batch, P)
    logits, values, cache = policy(prompt_ids, attention, position, use_cache=True, last_only=True)
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
    tokens, logps, vals, alive = [], [], [], []
    next_position = position[:, -1:] + 1  # (batch, 1)
    for _ in range(max_new_tokens):
        scores = logits[:, -1].float() / temperature  # (batch, vocab)
        probs = torch.softmax(scores, dim=-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (batch,)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        logp = torch.log_softmax(scores, dim=-1).gather(1, token[:, None]).squeeze(1)
        tokens.append(token)
        logps.append(torch.where(finished, torch.zeros_like(logp), logp))
        vals.append(torch.where(finished, torch.zeros_like(logp), values[:, -1].float()))
        alive.append(~finished)
        finished = finished | (token == eos_token_id)
        if finished.all():
            break
        attention = torch.cat([attention, attention.new_ones(batch, 1)], dim=1)
        logits, values, cache = policy(token[:, None], attention, next_position,
                                       past_key_values=cache, use_cache=True, last_only=True)
        next_position = next_position + 1
    policy.train(was_training)
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask.long(),
                   response_ids=torch.stack(tokens, 1), response_mask=torch.stack(alive, 1),
                   logps=torch.stack(logps, 1), values=torch.stack(vals, 1), ended=finished)


def response_logps(logits: torch.Tensor, response_ids: torch.Tensor, prompt_len: int,
                      temperature: float = 1.0) -> torch.Tensor:
    """log pi(y_t | s_t) of the reply tokens from full-sequence logits (batch, P + T, vocab):
    the logits at position P - 1 + t predict reply token t. Returns (batch, T)."""
    length = response_ids.shape[1]
    scores = at_least_float32(logits[:, prompt_len - 1:prompt_len - 1 + length]) / temperature
    return torch.log_softmax(scores, dim=-1).gather(-1, response_ids[..., None]).squeeze(-1)


@torch.no_grad()
def reference_logps(ref_model: nn.Module, rollout: Rollout, temperature: float = 1.0
                       ) -> torch.Tensor:
    """log pi_ref(y_t | s_t) of the sampled replies, (batch, T), from one full forward pass of
    the frozen reference model (0 on padding)."""
    inputs = rollout.full_inputs()
    logits = ref_model(**inputs).logits  # (batch, P + T, vocab)
    logps = response_logps(logits, rollout.response_ids, rollout.prompt_ids.shape[1],
                              temperature)
    return torch.where(rollout.response_mask, logps, torch.zeros_like(logps))


@torch.no_grad()
def forward_tolerance(model: nn.Module, inputs: dict[str, torch.Tensor],
                      activations: torch.dtype | None = None) -> dict[str, float]:
    """How far two forward passes of `model` (a Llama-style causal LM, or a `PolicyWithValue`)
    over the same tokens (`inputs`: input_ids and optionally attention_mask, position_ids) may
    disagree in a token's log-probability (`"logp"`) and, for a `PolicyWithValue`, a value
    (`"value"`), when they add in different orders (a KV cache, another batch shape, another
    kernel). First-order, from (A.1): each layer chains 9 sums (two norms, q/k/v, scores,
    softmax, probabilities x values, output, gate/up, down), then come the final norm, the head
    and the log-softmax; each adds at most gamma_n of the magnitudes of its terms, n the longest
    sum, in the precision of the weights. RMSNorm keeps those magnitudes at the scale of the
    head's terms, sum_j |W_ij h_j|, which we measure; two computations double the bound, and a
    log-softmax doubles a logit's error. With `activations` (llama.cpp's F16 path rounds the
    input of every matrix product to float16), one of the two computations also rounds the
    inputs of the 7 products per layer and of the head, each by at most that type's unit
    roundoff of the terms' magnitudes."""
    lm = model.lm if isinstance(model, PolicyWithValue) else model
    config = lm.config
    head = lm.get_output_embeddings().weight  # (vocab, hidden)
    dtype = head.dtype
    mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
    hidden = lm.base_model(**inputs).last_hidden_state[mask].abs().float()  # (tokens, hidden)
    n = max(config.hidden_size, config.intermediate_size, mask.shape[1])
    per_unit = 2 * (9 * config.num_hidden_layers + 3) * rounding_bound(n + 1, 1.0, dtype)
    if activations is not None:
        per_unit += (7 * config.num_hidden_layers + 1) * unit_roundoff(activations)
    tolerance = {"logp": 2 * per_unit * (hidden @ head.abs().float().T).max().item()}
    if isinstance(model, PolicyWithValue):
        value_head = model.value_head
        tolerance["value"] = per_unit * ((hidden @ value_head.weight.abs().float().T).max().item()
                                         + value_head.bias.abs().item())
    return tolerance


# %% [markdown]
# Two checks on a random tiny Llama with three prompts of different lengths (so two rows are
# left-padded). First, the log-probabilities and values recorded with the cache equal a full
# forward pass over the same sampled tokens. Second, parity with the reference implementation:
# with the same seed, `transformers`' `model.generate(do_sample=True, top_k=0)` samples exactly
# the same tokens, and its returned logits give the same log-probabilities. Both compare two
# float32 computations of the same network on the same tokens that add in different orders;
# `forward_tolerance` bounds their difference to first order by (A.1), summed over the chain of
# sums of the network, and a wrong position or mask would miss it by orders of magnitude.

# %%
import copy

from transformers import LlamaConfig, LlamaForCausalLM

torch.manual_seed(0)
toy_config = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         attn_implementation="eager")
toy_lm = LlamaForCausalLM(toy_config).eval()
toy_policy = PolicyWithValue(toy_lm)
nn.init.normal_(toy_policy.value_head.weight, std=0.5)  # non-zero values for the check
prompt_rows = [[1, 5, 9, 13, 3], [1, 7, 11], [1, 14]]
width = max(map(len, prompt_rows))
toy_query = torch.tensor([[0] * (width - len(r)) + r for r in prompt_rows])
toy_query_mask = (torch.arange(width)[None] >= torch.tensor(
    [width - len(r) for r in prompt_rows])[:, None]).long()

torch.manual_seed(123)
toy_rollout = generate_rollout(toy_policy, toy_query, toy_query_mask, max_new_tokens=12,
                               eos_token_id=2, pad_token_id=0)
with torch.no_grad():
    full_logits, full_values, _ = toy_policy(**toy_rollout.full_inputs())
P = toy_query.shape[1]
recomputed = response_logps(full_logits, toy_rollout.response_ids, P)
mask = toy_rollout.response_mask
cache_gap = (recomputed - toy_rollout.logps)[mask].abs().max().item()
value_gap = (full_values[:, P - 1:P - 1 + mask.shape[1]] - toy_rollout.values)[mask].abs().max()
toy_tol = forward_tolerance(toy_policy, toy_rollout.full_inputs())
print(f"reply lengths {toy_rollout.lengths().tolist()}, ended {toy_rollout.ended.tolist()}; "
      f"max |log pi cached - full forward| = {cache_gap:.1e}, values {value_gap:.1e} "
      f"(tolerances {toy_tol['logp']:.1e}, {toy_tol['value']:.1e})")
assert cache_gap <= toy_tol["logp"] and value_gap <= toy_tol["value"]

torch.manual_seed(123)
generated = toy_lm.generate(input_ids=toy_query, attention_mask=toy_query_mask, do_sample=True,
                            top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=12,
                            eos_token_id=2, pad_token_id=0, return_dict_in_generate=True,
                            output_logits=True)
hf_tokens = generated.sequences[:, P:]
T_hf = hf_tokens.shape[1]
hf_logps = torch.log_softmax(torch.stack(generated.logits, 1), -1).gather(
    -1, hf_tokens[..., None]).squeeze(-1)
same_tokens = torch.equal(hf_tokens[mask[:, :T_hf]], toy_rollout.response_ids[mask])
hf_gap = (hf_logps - toy_rollout.logps[:, :T_hf])[mask[:, :T_hf]].abs().max().item()
print(f"model.generate with the same seed: same tokens {same_tokens}, "
      f"max |log pi ours - generate| = {hf_gap:.1e}")
assert same_tokens and hf_gap <= toy_tol["logp"]

# %% [markdown]
# ### The PPO update
#
# One PPO step takes a rollout, its rewards and advantages, and runs `ppo_epochs` passes over
# it in `num_minibatches` shuffled minibatches, one optimizer step each. `ppo_update` is written
# so that running it on $N$ processes, each with $1/N$ of the rows, computes the same gradient
# at every optimizer step as one process with all rows, and so, in exact arithmetic, the same
# parameters. Under DDP each process's gradient is averaged with the others, so
#
# - the token mean of (8.10)-(8.12) divides the *local* token sum by the *global* token count
#   over $N$ (the count is an all-reduce); dividing by the local count would weight a process
#   with short replies more, the multi-process form of the gradient-accumulation pitfall of
#   13-06;
# - advantage whitening uses the mean and standard deviation of the whole batch (`masked_whiten`
#   all-reduces its sums);
# - gradient clipping happens after the all-reduce, so every process clips the same global
#   gradient by the same factor.
#
# The equivalence holds for one minibatch per epoch (any number of epochs). With several
# minibatches, each process shuffles its own rows, so a global minibatch is a stratified draw
# rather than the single process's draw: the same algorithm, not the same bits.

# %%
#| export
@dataclass(frozen=True)
class PPOConfig:
    """Hyperparameters of PPO for language models (defaults follow the text of chapter 13-08)."""

    batch_size: int = 16  # prompts (replies) per PPO step
    ppo_epochs: int = 2  # passes over each batch
    num_minibatches: int = 2  # optimizer steps per pass
    max_new_tokens: int = 32
    temperature: float = 1.0  # sampling temperature; log-probabilities use the same one
    lr: float = 1e-4
    lr_schedule: str = "linear"  # "linear" decay to 0 over the run, or "constant"
    max_grad_norm: float | None = 1.0  # None: no clipping
    cliprange: float = 0.2  # epsilon of eq. (8.10)
    cliprange_value: float | None = 0.2  # epsilon_V of eq. (8.11); None: no value clipping
    vf_coef: float = 0.1  # c_V of eq. (8.12)
    ent_coef: float = 0.0  # c_H of eq. (8.12)
    gamma: float = 1.0
    lam: float = 0.95
    beta: float = 0.1  # KL coefficient (initial value when target_kl is set)
    target_kl: float | None = None  # nats per reply for the adaptive controller, eq. (8.13)
    k_beta: float = 0.1  # K_beta of eq. (8.13)
    whiten_advantages: bool = True
    normalize_rewards: bool = True  # eq. (8.14), fitted on samples of the initial policy
    norm_batches: int = 2  # rollout batches used to fit the normalisation
    missing_eos_penalty: float | None = None  # subtracted from replies cut before EOS
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("ppo_epochs", "num_minibatches", "max_new_tokens", "batch_size",
                     "norm_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"PPOConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.num_minibatches:
            raise ValueError(f"PPOConfig.batch_size {self.batch_size} is not divisible by "
                             f"num_minibatches {self.num_minibatches}")
        if self.lr_schedule not in ("linear", "constant"):
            raise ValueError(f"PPOConfig.lr_schedule must be 'linear' or 'constant', got "
                             f"{self.lr_schedule!r}")
        for name in ("lr", "cliprange", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"PPOConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.beta < 0:
            raise ValueError(f"PPOConfig.beta must be >= 0, got {self.beta}")


@dataclass
class PPOBatch:
    """Everything one PPO step trains on, row-aligned: full sequences (batch, P + T) and
    per-token tensors (batch, T) of the replies; `prompt_len` = P."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    old_logps: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    prompt_len: int

    @classmethod
    def from_rollout(cls, rollout: Rollout, advantages: torch.Tensor, returns: torch.Tensor
                     ) -> "PPOBatch":
        return cls(**rollout.full_inputs(), response_ids=rollout.response_ids,
                   response_mask=rollout.response_mask, old_logps=rollout.logps,
                   old_values=rollout.values, advantages=advantages, returns=returns,
                   prompt_len=rollout.prompt_ids.shape[1])

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: Any) -> "PPOBatch":
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return PPOBatch(**{k: v if k == "prompt_len" else v[index] for k, v in fields.items()})

    def shard(self, process_index: int, num_processes: int) -> "PPOBatch":
        """The contiguous block of rows of one process."""
        if len(self) % num_processes:
            raise ValueError(f"{len(self)} rows cannot be split evenly over {num_processes} "
                             "processes")
        size = len(self) // num_processes
        return self.rows(slice(process_index * size, (process_index + 1) * size))

    def state(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def ppo_update(policy: nn.Module, optimizer: torch.optim.Optimizer, batch: PPOBatch,
               config: PPOConfig, *, accelerator: Any = None, scheduler: Any = None,
               generator: torch.Generator | None = None) -> dict[str, float]:
    """One PPO step, eqs. (8.10)-(8.12): `ppo_epochs` passes of `num_minibatches` shuffled
    minibatches over `batch`, one optimizer step each (Schulman et al. 2017, arXiv:1707.06347).

    `policy` is a `PolicyWithValue`, possibly wrapped by `accelerator.prepare` (DDP); with an
    accelerator, `batch` is this process's share of the rows, and token means, advantage
    whitening and gradient clipping use the whole batch across processes. Returns the mean of
    the per-minibatch statistics (averaged over processes)."""
    num_processes = 1 if accelerator is None else accelerator.num_processes
    advantages = batch.advantages
    if config.whiten_advantages:
        advantages = masked_whiten(advantages, batch.response_mask, accelerator)
    rows_per_minibatch = len(batch) // config.num_minibatches
    if rows_per_minibatch < 1:
        raise ValueError(f"{len(batch)} rows on this process cannot make "
                         f"{config.num_minibatches} minibatches")
    params = [p for p in policy.parameters() if p.requires_grad]
    history: list[torch.Tensor] = []
    policy.train()
    for _ in range(config.ppo_epochs):
        order = torch.randperm(len(batch), generator=generator).to(batch.input_ids.device)
        for m in range(config.num_minibatches):
            index = order[m * rows_per_minibatch:(m + 1) * rows_per_minibatch]
            mb = batch.rows(index)
            mb_adv = advantages[index]
            # tokens of this minibatch over all processes; / N because DDP averages gradients
            count = reduce_sum(mb.response_mask.sum().float(), accelerator) / num_processes
            logits, values, _ = policy(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                                       position_ids=mb.position_ids)
            logps = response_logps(logits, mb.response_ids, mb.prompt_len, config.temperature)
            length = mb.response_ids.shape[1]
            values = values[:, mb.prompt_len - 1:mb.prompt_len - 1 + length]  # V(s_t), (b, T)
            pg_loss, pg_stats = clipped_policy_loss(logps, mb.old_logps, mb_adv, mb.response_mask,
                                                    config.cliprange, count)
            vf_loss, vf_stats = clipped_value_loss(values, mb.old_values, mb.returns,
                                                   mb.response_mask, config.cliprange_value, count)
            entropy = masked_normalize(compute_entropy(at_least_float32(  # 13-06's, in float32
                logits[:, mb.prompt_len - 1:mb.prompt_len - 1 + length])), mb.response_mask, count)
            loss = pg_loss + config.vf_coef * vf_loss - config.ent_coef * entropy
            if accelerator is not None:
                accelerator.backward(loss)
            else:
                loss.backward()
            max_norm = config.max_grad_norm if config.max_grad_norm is not None else math.inf
            if accelerator is not None:
                grad_norm = accelerator.clip_grad_norm_(params, max_norm)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            history.append(torch.stack([
                loss.detach(), pg_loss.detach(), vf_loss.detach(), entropy.detach(),
                pg_stats["clip_frac"], pg_stats["approx_kl"], vf_stats["value_clip_frac"],
                torch.as_tensor(grad_norm, dtype=torch.float32, device=loss.device)]).float())
    stats = reduce_sum(torch.stack(history).mean(0), accelerator) / num_processes
    names = ("loss", "pg_loss", "vf_loss", "entropy", "clip_frac", "approx_kl",
             "value_clip_frac", "grad_norm")
    # each local loss was divided by (global count / N): the process mean is the global mean
    result = dict(zip(names, stats.tolist(), strict=True))
    result["lr"] = optimizer.param_groups[0]["lr"]
    return result


# %% [markdown]
# ### The training loop
#
# One PPO step of RLHF, every line of it in `ppo_train` below:
#
# 1. take the next `batch_size` prompts (seeded, reshuffled epochs over the training prompts:
#    13-07's `draw_batch`) and sample replies with the cache (`generate_rollout`), recording
#    $\log \pi_{\theta_\text{old}}$ and $V_\text{old}$;
# 2. one forward pass of the frozen reference model gives $\log \pi_\text{ref}$;
# 3. the reward model scores the replies, the scores are normalised, eq. (8.14);
# 4. per-token rewards (8.4) with the current $\beta$, and GAE (8.8) for advantages and returns;
# 5. `ppo_update`: epochs over shuffled minibatches of (8.10)-(8.12), clipping the gradient norm,
#    stepping the optimizer and the learning-rate schedule;
# 6. the KL controller sees the batch's KL, eq. (8.13).
#
# Before the first step, `norm_batches` batches of replies of the initial policy fit the reward
# normalisation (they are not trained on). The loop logs what the literature says to watch:
# reward, KL (the sum of $k_1$ and of $k_3$ over the reply), entropy, clip fraction, the value
# loss, the gradient norm before clipping and the reply length. Appendix A's `StepMeter` keeps the
# books (one row per step, the check that the loss is finite, the callback, the run's time).

# %%
#| export
from ftbook.base_models import schedule_factor  # Appendix C
from ftbook.reward_modeling import draw_batch  # 13-07
from ftbook.workbench import StepMeter


@dataclass
class PPOLog:
    """What `ppo_train` records: one row per PPO step, the fitted reward normalisation, time."""

    history: list[dict]
    normalizer: RewardNormalizer
    seconds: float


def sequence_kl(logps: torch.Tensor, ref_logps: torch.Tensor, response_mask: torch.Tensor
                ) -> dict[str, torch.Tensor]:
    """Per-reply KL estimates, (batch,): the sums of k1 and k3 over the reply's tokens."""
    k1 = torch.where(response_mask, kl_k1(logps, ref_logps), torch.zeros_like(logps))
    k3 = torch.where(response_mask, kl_k3(logps, ref_logps), torch.zeros_like(logps))
    return {"kl": k1.sum(1), "kl_k3": k3.sum(1)}


def sample_rollout(policy: PolicyWithValue, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                   index: torch.Tensor, config: PPOConfig, *, eos_token_id: int,
                   pad_token_id: int, generator: torch.Generator | None = None) -> Rollout:
    """Replies to the prompts `index` of the left-padded (prompt_ids, prompt_mask), sampled with
    `config`'s length and temperature; the rollout records `index` as its `prompt_index`."""
    ids, mask = trim_left_padding(prompt_ids[index], prompt_mask[index])
    rollout = generate_rollout(policy, ids, mask, max_new_tokens=config.max_new_tokens,
                               eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                               temperature=config.temperature, generator=generator)
    rollout.prompt_index = index
    return rollout


def ppo_train(policy: PolicyWithValue, ref_model: nn.Module, prompt_ids: torch.Tensor,
              prompt_mask: torch.Tensor, reward_fn: Callable[[Rollout], torch.Tensor],
              config: PPOConfig, *, steps: int, eos_token_id: int, pad_token_id: int,
              monitor_fn: Callable[[Rollout], dict[str, torch.Tensor]] | None = None,
              callback: Callable[[int, PolicyWithValue], dict] | None = None,
              normalizer: RewardNormalizer | None = None, desc: str = "PPO") -> PPOLog:
    """RLHF with PPO (Ziegler et al. 2019, arXiv:1909.08593; Ouyang et al. 2022,
    arXiv:2203.02155): `steps` PPO steps on the left-padded prompts (prompt_ids, prompt_mask),
    rewarded by `reward_fn(rollout) -> (batch,)` raw scores. `monitor_fn(rollout)` (optional)
    returns per-reply tensors (the gold reward, say) that are logged as means and never trained
    on; `callback(step, policy)` may add entries to a step's log row. With
    `config.normalize_rewards`, `normalizer` (if given) replaces the one fitted on samples."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    meter = StepMeter(desc, callback, step_seconds=False)  # run time, one row per step (App. A)
    generator = torch.Generator().manual_seed(config.seed)  # prompt order and minibatches
    sampler = torch.Generator(prompt_ids.device).manual_seed(config.seed + 1)  # sampling
    order: list[int] = []  # the rest of the current epoch over the prompts
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    total_updates = steps * config.ppo_epochs * config.num_minibatches
    scheduler = None
    if config.lr_schedule == "linear":
        scheduler = torch.optim.lr_scheduler.LambdaLR(  # linear decay over the updates
            optimizer, lambda update: schedule_factor("linear", update, total_updates, 0))

    def rollout_for_next_prompts() -> Rollout:  # prompts in seeded epochs (13-07's draw_batch)
        index = torch.tensor(draw_batch(order, prompt_ids.shape[0], config.batch_size, generator))
        return sample_rollout(policy, prompt_ids, prompt_mask, index, config,
                              eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                              generator=sampler)

    if not config.normalize_rewards:
        normalizer = RewardNormalizer()
    elif normalizer is None:
        normalizer = RewardNormalizer().fit(torch.cat([
            reward_fn(rollout_for_next_prompts()).float().cpu()
            for _ in range(config.norm_batches)]))
    controller = KLController(config.beta, config.target_kl, config.k_beta)
    for step in meter.steps(steps):
        rollout = rollout_for_next_prompts()  # 1. sample with the cache
        ref_logps = reference_logps(ref_model, rollout, config.temperature)  # 2.
        raw = reward_fn(rollout).float().to(rollout.logps.device)  # 3. score ...
        scores = normalizer(raw)  # ... and normalise, eq. (8.14)
        if config.missing_eos_penalty is not None:
            scores = scores - config.missing_eos_penalty * (~rollout.ended).float()
        beta = controller.value
        rewards, _ = token_rewards(scores, rollout.logps, ref_logps, rollout.response_mask,
                                   beta)  # 4. eq. (8.4)
        advantages, returns = gae(rewards, rollout.values, rollout.response_mask, config.gamma,
                                  config.lam)
        batch = PPOBatch.from_rollout(rollout, advantages, returns)
        stats = ppo_update(policy, optimizer, batch, config, scheduler=scheduler,
                           generator=generator)  # 5.
        kls = sequence_kl(rollout.logps, ref_logps, rollout.response_mask)
        row = {"step": step + 1, "beta": beta, "proxy_reward": raw.mean().item(),
               "score": scores.mean().item(), "kl": kls["kl"].mean().item(),
               "kl_k3": kls["kl_k3"].mean().item(),
               "length": rollout.lengths().float().mean().item(),
               "eos_rate": rollout.ended.float().mean().item(),
               "tokens": int(batch.attention_mask.sum()),  # prompt + reply, for FLOP counts
               **stats}
        if monitor_fn is not None:
            row.update({k: v.float().mean().item() for k, v in monitor_fn(rollout).items()})
        controller.update(row["kl"])  # 6. eq. (8.13)
        meter.record(step, row, policy)
    return PPOLog(meter.history, normalizer, meter.seconds)


@torch.no_grad()
def evaluate_policy(policy: PolicyWithValue, ref_model: nn.Module, prompt_ids: torch.Tensor,
                    prompt_mask: torch.Tensor, reward_fn: Callable[[Rollout], torch.Tensor], *,
                    max_new_tokens: int, eos_token_id: int, pad_token_id: int,
                    monitor_fn: Callable[[Rollout], dict[str, torch.Tensor]] | None = None,
                    batch_size: int = 64, seed: int = 0
                    ) -> tuple[dict[str, torch.Tensor], list[Rollout]]:
    """Sample one reply per prompt at temperature 1; return per reply, as (n,) float tensors on
    the CPU, the proxy reward, whatever `monitor_fn` measures (the gold reward, say), the KL to
    the reference (k1 and k3 sums, unbiased for the sequence KL because the replies are samples
    of the policy), the length and whether the reply ended with EOS; and the rollouts."""
    sampler = torch.Generator(prompt_ids.device).manual_seed(seed)
    columns: dict[str, list[torch.Tensor]] = {}
    rollouts = []
    for i in range(0, prompt_ids.shape[0], batch_size):
        ids, mask = trim_left_padding(prompt_ids[i:i + batch_size], prompt_mask[i:i + batch_size])
        rollout = generate_rollout(policy, ids, mask, max_new_tokens=max_new_tokens,
                                   eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                   generator=sampler)
        rollout.prompt_index = torch.arange(i, i + ids.shape[0])
        ref_logps = reference_logps(ref_model, rollout)
        parts = {"proxy_reward": reward_fn(rollout),
                 **sequence_kl(rollout.logps, ref_logps, rollout.response_mask),
                 "length": rollout.lengths(), "eos_rate": rollout.ended,
                 **(monitor_fn(rollout) if monitor_fn is not None else {})}
        for key, value in parts.items():
            columns.setdefault(key, []).append(value.float().cpu())
        rollouts.append(rollout)
    return {k: torch.cat(v) for k, v in columns.items()}, rollouts


# %% [markdown]
# ## A problem with a known answer
#
# Before the language task we need evidence that the whole machinery, sampling, rewards, GAE,
# the update, converges to the right thing. Equation (8.2) gives the right thing in closed form
# whenever we can enumerate every reply. `ToyTask` is such a problem, built from the same parts
# as the real one:
#
# - the prompt is one *context* token $c \in \{1, \dots, C\}$; a reply is a sequence of content
#   tokens $1, \dots, K$ ended by EOS (token 0) or cut at `max_len` tokens; there are
#   $\sum_{k<L} K^k + K^L$ replies per context ($L$ = `max_len`);
# - the reference policy is a random tiny Llama, so the policy is a real transformer sampled by
#   `generate_rollout` with the cache, with a value head on its trunk;
# - the reward is $R(c, y) = \sum_t w_{c, y_t}$ with a fixed random table $w$ (EOS earns 0).
#
# Scoring all replies with a full forward pass gives $\log \pi(y \mid c)$ exactly, hence the
# exact $\mathrm{KL}(\pi \,\|\, \pi^*)$, which by (8.3) is the gap to the optimal objective over
# $\beta$. With `max_len=1` the task is a contextual bandit: one token, then the end.

# %%
#| export
import itertools


class ToyTask:
    """A token-level problem whose KL-regularised optimum, eq. (8.2), is computable (chapter
    13-08): prompt = one context token c in 1..C; reply = content tokens 1..K ended by EOS (0)
    or cut at `max_len`; reward R(c, y) = offset + sum_t w[c, y_t] with w ~ N(0, scale^2) and
    w[c, EOS] = 0 (an offset does not change the optimum). `max_len=1` is a contextual bandit."""

    eos_token_id = 0
    pad_token_id = 0

    def __init__(self, num_contexts: int = 3, num_tokens: int = 3, max_len: int = 3,
                 reward_scale: float = 1.0, reward_offset: float = 0.0, seed: int = 0):
        if not 1 <= num_contexts <= num_tokens:
            raise ValueError(f"need 1 <= num_contexts <= num_tokens (contexts are content "
                             f"tokens), got {num_contexts} and {num_tokens}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.num_contexts, self.num_tokens, self.max_len = num_contexts, num_tokens, max_len
        generator = torch.Generator().manual_seed(seed)
        weights = reward_scale * torch.randn(num_contexts, num_tokens + 1, generator=generator)
        weights[:, self.eos_token_id] = 0.0
        self.weights = weights  # (C, K + 1)
        self.offset = reward_offset

    @property
    def vocab_size(self) -> int:
        return self.num_tokens + 1

    def prompts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, 1) context tokens and their attention mask."""
        ids = torch.arange(1, self.num_contexts + 1)[:, None]
        return ids, torch.ones_like(ids)

    def score(self, contexts: torch.Tensor, response_ids: torch.Tensor,
              response_mask: torch.Tensor) -> torch.Tensor:
        """R(c, y) for contexts (batch,) and right-padded replies (batch, T) -> (batch,)."""
        weights = self.weights.to(response_ids.device)[contexts - 1]  # (batch, K + 1)
        per_token = weights.gather(1, response_ids)  # (batch, T)
        per_token = torch.where(response_mask.bool(), per_token, torch.zeros_like(per_token))
        return self.offset + per_token.sum(1)

    def reward(self, rollout: Rollout) -> torch.Tensor:
        return self.score(rollout.prompt_ids[:, -1], rollout.response_ids, rollout.response_mask)

    def replies(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every possible reply, (N, max_len) right-padded with EOS, and its mask."""
        rows, masks = [], []
        for k in range(self.max_len + 1):
            for body in itertools.product(range(1, self.num_tokens + 1), repeat=k):
                ended = k < self.max_len  # shorter replies end with EOS
                reply = list(body) + ([self.eos_token_id] if ended else [])
                rows.append(reply + [self.pad_token_id] * (self.max_len - len(reply)))
                masks.append([True] * len(reply) + [False] * (self.max_len - len(reply)))
        return torch.tensor(rows), torch.tensor(masks)

    def reference_model(self, seed: int = 0, hidden_size: int = 32, num_layers: int = 1,
                        logit_std: float = 1.5) -> nn.Module:
        """A random Llama over the task's vocabulary; its output layer is drawn so that the
        next-token logits have a standard deviation of about `logit_std`."""
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=self.vocab_size, hidden_size=hidden_size,
                             intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                             num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64, pad_token_id=self.pad_token_id,
                             eos_token_id=self.eos_token_id, bos_token_id=None,
                             attn_implementation="eager")
        model = LlamaForCausalLM(config)
        with torch.no_grad():  # the final norm makes hidden states of RMS 1
            model.lm_head.weight.normal_(0.0, logit_std / math.sqrt(hidden_size))
        return model.eval()

    @torch.no_grad()
    def logps(self, model: nn.Module) -> torch.Tensor:
        """Exact log pi(y | c) of every reply for every context, (C, N)."""
        replies, mask = self.replies()
        device = next(model.parameters()).device
        C, N = self.num_contexts, replies.shape[0]
        contexts = torch.arange(1, C + 1).repeat_interleave(N)[:, None]  # (C N, 1)
        rollout = Rollout(prompt_ids=contexts, prompt_mask=torch.ones_like(contexts),
                          response_ids=replies.repeat(C, 1), response_mask=mask.repeat(C, 1),
                          logps=torch.zeros(C * N, self.max_len),
                          values=torch.zeros(C * N, self.max_len),
                          ended=torch.zeros(C * N, dtype=torch.bool))
        inputs = {k: v.to(device) for k, v in rollout.full_inputs().items()}
        out = model(**inputs)
        logits = out[0] if isinstance(out, tuple) else out.logits
        logps = response_logps(logits, rollout.response_ids.to(device), 1).cpu()
        logps = torch.where(rollout.response_mask, logps, torch.zeros_like(logps))
        return logps.sum(1).view(C, N)

    def rewards(self) -> torch.Tensor:
        """R(c, y) of every reply for every context, (C, N)."""
        replies, mask = self.replies()
        C, N = self.num_contexts, replies.shape[0]
        contexts = torch.arange(1, C + 1).repeat_interleave(N)
        return self.score(contexts, replies.repeat(C, 1), mask.repeat(C, 1)).view(C, N)


def optimal_log_policy(ref_logps: torch.Tensor, rewards: torch.Tensor, beta: float
                       ) -> torch.Tensor:
    """log pi*(y | x) = log pi_ref(y | x) + r(x, y) / beta - log Z(x), eq. (8.2); inputs and
    output (prompts, replies) over an enumeration of all replies."""
    if beta <= 0:
        raise ValueError(f"the KL-regularised optimum needs beta > 0, got {beta}")
    return torch.log_softmax(ref_logps + rewards / beta, dim=-1)


def exact_metrics(logps: torch.Tensor, ref_logps: torch.Tensor, rewards: torch.Tensor,
                  beta: float) -> dict[str, float]:
    """Exact quantities of a policy over an enumeration (prompts, replies), averaged over
    prompts: reward, KL to the reference, the objective J of eq. (8.1), its optimum
    J* = beta log Z, and KL(pi || pi*) = (J* - J) / beta, eq. (8.3)."""
    p = logps.exp()
    log_opt = optimal_log_policy(ref_logps, rewards, beta)
    reward = (p * rewards).sum(-1)
    kl_ref = (p * (logps - ref_logps)).sum(-1)
    optimum = beta * torch.logsumexp(ref_logps + rewards / beta, dim=-1)
    return {"reward": reward.mean().item(), "kl_ref": kl_ref.mean().item(),
            "objective": (reward - beta * kl_ref).mean().item(),
            "optimum": optimum.mean().item(),
            "kl_to_optimum": (p * (logps - log_opt)).sum(-1).mean().item()}


# %% [markdown]
# Checks of the enumeration: the reference model's probabilities over all replies sum to 1 for
# every context (the enumeration is complete and each reply is counted once), and the exact
# objective of $\pi^*$ equals $\beta \log Z$, eq. (8.3).

# %%
check_task = ToyTask(num_contexts=3, num_tokens=3, max_len=3, seed=0)
# float64: the identities below then hold to ~1e-14 (sums of <= 40 terms of size < 10; (A.1))
check_ref_model = check_task.reference_model(seed=0).double()
ref_table = check_task.logps(check_ref_model)  # (3, 40)
reward_table = check_task.rewards().double()
total = ref_table.exp().sum(-1)
print(f"{ref_table.shape[1]} replies per context; sum_y pi_ref(y | c) = {total.tolist()}")
assert torch.allclose(total, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-9)
opt_metrics = exact_metrics(optimal_log_policy(ref_table, reward_table, 0.5), ref_table,
                            reward_table, 0.5)
assert abs(opt_metrics["objective"] - opt_metrics["optimum"]) < 1e-9
assert abs(opt_metrics["kl_to_optimum"]) < 1e-9

# %% [markdown]
# ### Multi-process: the same update on two processes
#
# `accelerate launch` starts the processes; in the script, `Accelerator(cpu=True)` joins them
# through the gloo backend, and `accelerator.prepare` wraps the policy in
# DistributedDataParallel. One detail of accelerate (1.15 and 1.16): `accelerate launch --cpu
# --num_processes 2` runs a *single* process unless an MPI hostfile is given (its simple
# launcher ignores the count), so we launch through torchrun with `--multi_gpu
# --num_processes 2` and let the script choose the CPU. The helpers below save a policy, a batch
# and a configuration to a folder, and run one `ppo_update` on it, in a given floating-point
# type, either in this process or, through `accelerate launch`, with the rows split over two
# processes (the whole script is `ACCELERATE_SCRIPT`). Both record the gradient of the first
# optimizer step (after the all-reduce and the clipping) and the parameters after the update.

# %%
#| export
import os
import socket
import subprocess
import sys

ACCELERATE_SCRIPT = """\
import sys

import torch
from accelerate import Accelerator

from ftbook.rlhf_ppo import run_update_case

accelerator = Accelerator(cpu=True)
for dtype in sys.argv[2:]:
    run_update_case(sys.argv[1], accelerator, getattr(torch, dtype))
"""


def save_update_case(folder: str | Path, policy: PolicyWithValue, batch: PPOBatch,
                     config: PPOConfig) -> Path:
    """Save what one `ppo_update` needs (policy, batch, config) to `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    policy.lm.save_pretrained(folder / "lm")
    torch.save(policy.value_head.state_dict(), folder / "value_head.pt")
    torch.save(batch.state(), folder / "batch.pt")
    (folder / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    return folder


def run_update_case(folder: str | Path, accelerator: Any = None,
                    dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Load a saved case in `dtype`, run one `ppo_update` (with `accelerator`: on this process's
    share of the rows, under DDP) and return, and save as `after-<processes>-<dtype>.pt`: the
    parameters after the update (`state`), the gradient the optimizer's first step used, after
    the all-reduce and clipping (`grad`), `stats`, `processes` and `backend`. In float64 the
    attention is PyTorch's SDPA (transformers' eager attention rounds its softmax to float32)."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    config = PPOConfig(**json.loads((folder / "config.json").read_text()))
    torch.manual_seed(config.seed)
    sdpa = {"attn_implementation": "sdpa"} if dtype == torch.float64 else {}
    lm = AutoModelForCausalLM.from_pretrained(folder / "lm", dtype=dtype, **sdpa)
    policy = PolicyWithValue(lm)
    policy.value_head.load_state_dict(torch.load(folder / "value_head.pt"))
    policy.to(dtype)  # the value head too (a no-op in float32)
    batch = PPOBatch(**{k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                        for k, v in torch.load(folder / "batch.pt").items()})
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=0.0)
    names = {p: n for n, p in policy.named_parameters()}
    grad: dict[str, torch.Tensor] = {}

    def keep_first_gradient(*_: Any) -> None:  # runs before every optimizer step
        if not grad:
            grad.update({n: p.grad.detach().clone() for p, n in names.items()
                         if p.grad is not None})

    optimizer.register_step_pre_hook(keep_first_gradient)
    processes = 1
    if accelerator is not None:
        policy, optimizer = accelerator.prepare(policy, optimizer)
        processes = accelerator.num_processes
        batch = batch.shard(accelerator.process_index, processes)
    generator = torch.Generator().manual_seed(config.seed)
    stats = ppo_update(policy, optimizer, batch, config, accelerator=accelerator,
                       generator=generator)
    model = accelerator.unwrap_model(policy) if accelerator is not None else policy
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    backend = getattr(accelerator.state, "backend", None) if accelerator is not None else None
    result = {"state": state, "grad": grad, "stats": stats, "processes": processes,
              "backend": backend}
    if accelerator is None or accelerator.is_main_process:
        torch.save(result, folder / f"after-{processes}-{str(dtype).removeprefix('torch.')}.pt")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return result


def launch_update_case(folder: str | Path, num_processes: int = 2,
                       dtypes: Sequence[torch.dtype] = (torch.float32,), timeout: float = 300.0
                       ) -> dict[torch.dtype, dict[str, Any]]:
    """Run `ACCELERATE_SCRIPT` on a saved case, once per dtype, on `num_processes` CPU processes
    with `accelerate launch --multi_gpu --num_processes N` (torchrun; the script's
    `Accelerator(cpu=True)` selects gloo) in a subprocess; returns, per dtype, what the main
    process saved (`state`, `grad`, `stats`, `processes`, `backend`)."""
    folder = Path(folder)
    script = folder / "ppo_step.py"
    script.write_text(ACCELERATE_SCRIPT)
    with socket.socket() as probe:  # a free port, so that concurrent launches do not collide
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    names = [str(dtype).removeprefix("torch.") for dtype in dtypes]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", str(num_processes), "--num_machines", "1",
               "--main_process_port", str(port), "--mixed_precision", "no",
               "--dynamo_backend", "no", str(script), str(folder), *names]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"accelerate launch failed ({result.returncode}):\n"
                           f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return {dtype: torch.load(folder / f"after-{num_processes}-{name}.pt")
            for dtype, name in zip(dtypes, names, strict=True)}


# %% [markdown]
# The check: four prompts of the tiny Llama, a rollout, rewards and GAE; one PPO step (two
# epochs of one minibatch, AdamW) in this process on all four rows, and under
# `accelerate launch` on two processes with two rows each. What data parallelism promises is
# that the all-reduced gradient equals the gradient of one process with all rows, so that is
# what we compare: the gradient of the first optimizer step (both runs start from the same
# parameters), after the all-reduce and the clipping, entry by entry.
#
# Which tolerance? The two runs add the same terms in different groupings (four rows in one
# batch, or two and two and then the all-reduce) in every sum of the forward and backward pass,
# so in float32 their gradients differ by rounding that a bound (A.1) would have to follow
# through the whole network. In float64 we need no such bookkeeping: the longest sum here is a
# dot product of 64 terms, for which (A.1) allows $\gamma_{64} \approx 7 \cdot 10^{-15}$ of the
# sum of the terms' magnitudes, and a forward and backward pass chain a few dozen such sums. A
# tolerance of $10^{-9}$ of the largest gradient entry of each parameter tensor leaves a factor
# of about $10^4$ for terms larger than the sum they cancel into, and lies many orders of
# magnitude below the error of a wrong normaliser (measured below). So the check runs the case
# in float64 (with PyTorch's SDPA attention: transformers' eager attention rounds its softmax to
# float32), and in float32 as well, whose result we report.

# %%
import shutil
import tempfile
from pathlib import Path

from ftbook.workbench import Timer

torch.manual_seed(7)
case_policy = PolicyWithValue(copy.deepcopy(toy_lm))
nn.init.normal_(case_policy.value_head.weight, std=0.1)
case_rows = [[1, 4, 9, 13, 3], [1, 7, 11], [1, 14], [1, 6, 6, 8]]
case_width = max(map(len, case_rows))
case_query = torch.tensor([[0] * (case_width - len(r)) + r for r in case_rows])
case_mask = (case_query != 0).long()
case_rollout = generate_rollout(case_policy, case_query, case_mask, max_new_tokens=10,
                                eos_token_id=2, pad_token_id=0)
case_ref = reference_logps(toy_lm, case_rollout)
case_rewards, _ = token_rewards(torch.randn(4), case_rollout.logps, case_ref,
                                case_rollout.response_mask, beta=0.1)
case_adv, case_ret = gae(case_rewards, case_rollout.values, case_rollout.response_mask)
case_config = PPOConfig(batch_size=4, ppo_epochs=2, num_minibatches=1, lr=1e-3)
case_dir = Path(tempfile.mkdtemp(prefix="ppo-case-"))
save_update_case(case_dir, case_policy, PPOBatch.from_rollout(case_rollout, case_adv, case_ret),
                 case_config)
CASE_DTYPES = (torch.float64, torch.float32)
one_process = {dtype: run_update_case(case_dir, dtype=dtype) for dtype in CASE_DTYPES}  # all rows
with Timer() as launch_timer:
    two_processes = launch_update_case(case_dir, 2, CASE_DTYPES)  # accelerate launch, gloo
shutil.rmtree(case_dir)
# float64, relative to each tensor's largest |g|: (A.1) for a few dozen chained sums of <= 64
# terms is ~1e-13 of the terms' magnitudes; 1e-9 leaves a factor 1e4 for cancellation (text)
GRAD_TOL = 1e-9
case_gaps = {}  # per dtype: what the lines below print
print(f"accelerate launch, {two_processes[torch.float32]['processes']} processes, backend "
      f"{two_processes[torch.float32]['backend']}: {launch_timer.seconds:.1f} s")
for dtype in CASE_DTYPES:
    one, two = one_process[dtype], two_processes[dtype]
    assert two["processes"] == 2 and two["backend"] == "gloo"
    assert one["grad"].keys() == two["grad"].keys() == dict(case_policy.named_parameters()).keys()
    grad_gap = max(((one["grad"][k] - two["grad"][k]).abs().max()
                    / one["grad"][k].abs().max()).item() for k in one["grad"])
    param_gap = {k: (one["state"][k] - two["state"][k]).abs().flatten() for k in one["grad"]}
    worst = max(param_gap, key=lambda k: param_gap[k].max().item())
    g_there = one["grad"][worst].flatten()[param_gap[worst].argmax()].abs().item()
    moved = max((one["state"][k] - case_policy.state_dict()[k].to(dtype)).abs().max().item()
                for k in one["state"])
    case_gaps[dtype] = {"grad": grad_gap, "param": param_gap[worst].max().item(),
                        "g_there": g_there, "moved": moved}
    print(f"{str(dtype).removeprefix('torch.')}: parameters moved by up to {moved:.1e}; one vs "
          f"two processes: first gradient max |diff| / max |g| = {grad_gap:.1e}; parameters "
          f"after the update max |diff| = {param_gap[worst].max():.1e} (an entry with "
          f"|g| = {g_there:.1e})")
    # two AdamW steps move the entry with the largest |g| (>> eps) by >= (1 - 0.744) lr
    assert moved > 0.1 * case_config.lr
    if dtype == torch.float64:
        assert grad_gap <= GRAD_TOL
print("statistics on two processes (float32):",
      {k: round(v, 4) for k, v in two_processes[torch.float32]["stats"].items()})
ADAM_EPS = 1e-8  # torch.optim.AdamW's default
f32 = case_gaps[torch.float32]
print(f"the update moved the parameters by up to {f32['moved'] / case_config.lr:.1f} times the "
      f"learning rate {case_config.lr:g}")
print("float32: the parameters after the update differ by "
      f"{f32['param'] / case_config.lr:.1e} of the learning rate, the first gradients by "
      f"{f32['grad']:.1e} of their largest entry: "
      + (f"the parameters differ by more, at an entry whose |g| is "
         f"{f32['g_there'] / ADAM_EPS:.1f} times Adam's epsilon"
         if f32["param"] / case_config.lr > f32["grad"] else
         "the parameters differ by no more than the gradients (this run's rounding hit no "
         "entry with a tiny gradient)"))

# %% [markdown]
# The update moves the parameters by the multiple of the learning rate printed above. In
# float64 the first gradient of two processes agrees with that of one process to float64
# rounding (asserted): the token count, the whitening and the clipping are global, as the
# algorithm requires. In float32 the gradients agree to float32 rounding, and the last printed
# line compares the parameters after the update with them. Where the parameters differ by more,
# at an entry whose gradient is tiny, that is AdamW, not DDP. With learning rate
# $\eta$ and Adam's $\epsilon_\text{A} = 10^{-8}$, its first step is
# $-\eta\, g / (|g| + \epsilon_\text{A})$ (after bias correction $\hat m = g$, $\hat v = g^2$),
# whose slope in $g$ is $\eta\, \epsilon_\text{A} / (|g| + \epsilon_\text{A})^2$, up to
# $\eta / \epsilon_\text{A} = 10^5$ near $g = 0$: an entry whose $|g|$ is of order
# $\epsilon_\text{A}$ turns a rounding difference $\delta$ of its gradient into a step difference
# of order $\eta\, \delta / \epsilon_\text{A} = 10^5 \delta$ (and an entry whose sign the
# rounding flips, into one of up to $2\eta$). A comparison of
# parameters after AdamW measures this amplification, which depends on the machine's rounding,
# so we report it and assert on the gradients. (The check that the update moved at all is safe:
# an entry with $|g| \gg \epsilon_\text{A}$ moves by $\approx \eta$ at the first step, and the
# second step, whatever its gradient, takes back at most
# $\sqrt{1 + \beta_2} / (1 + \beta_1) \approx 0.744$ of that, with Adam's $\beta_1 = 0.9$,
# $\beta_2 = 0.999$.) What the global token count buys is visible without launching
# anything: DDP averages the processes' gradients, so we can average the gradients of the two
# halves of the batch ourselves, once with each half's loss divided by the global count over 2
# (what `ppo_update` does) and once by its own count, in float64 as above.

# %%
half_batch = PPOBatch.from_rollout(case_rollout, case_adv, case_ret)
print("reply lengths per process:", [half_batch.shard(i, 2).response_mask.sum(1).tolist()
                                     for i in range(2)])


def policy_grad(batch: PPOBatch, count) -> torch.Tensor:
    """Gradient of eq. (8.10) w.r.t. the LM head for `batch`, with normaliser `count`, in
    float64."""
    model = copy.deepcopy(case_policy).double()
    model.lm.set_attn_implementation("sdpa")  # eager attention rounds its softmax to float32
    logits, _, _ = model(batch.input_ids, batch.attention_mask, batch.position_ids)
    logps = response_logps(logits, batch.response_ids, batch.prompt_len)
    shifted = batch.old_logps - 0.1  # ratio e^0.1: inside the clip range, gradient alive
    loss, _ = clipped_policy_loss(logps, shifted, batch.advantages, batch.response_mask, 0.2,
                                  count)
    loss.backward()
    return model.lm.lm_head.weight.grad


whole_grad = policy_grad(half_batch, None)  # one process, token mean over all rows
total_tokens = half_batch.response_mask.sum()
shards = [half_batch.shard(i, 2) for i in range(2)]
global_count = sum(policy_grad(b, total_tokens / 2) for b in shards) / 2  # DDP average
local_count = sum(policy_grad(b, None) for b in shards) / 2
global_gap = ((global_count - whole_grad).abs().max() / whole_grad.abs().max()).item()
local_gap = ((local_count - whole_grad).abs().max() / whole_grad.abs().max()).item()
print(f"max |grad| {whole_grad.abs().max():.2e}; DDP average, max |diff| / max |grad|: with the "
      f"global count {global_gap:.1e}, with local counts {local_gap:.1e} "
      f"({local_gap / GRAD_TOL:.0e} times the tolerance of the two-process check)")
assert global_gap <= GRAD_TOL
assert local_gap > 1e3 * GRAD_TOL  # the check above would catch local counts, by far

# %% [markdown]
# With local counts, the tokens of the process with the shorter replies weigh more, and the
# gradient is not the batch's. The same reasoning applies to the whitening statistics and to any
# other mean over tokens.
#
# ## Experiments
#
# ### Budget per profile
#
# The language-model runs use the SFT model of 13-06 as initial policy and reference, and the
# reward model and gold reward of 13-07. The toy problem runs with the same sizes in every
# profile except smoke (the seconds of its runs are in the first table of Experiment 1).

# %%
#| export
@dataclass(frozen=True)
class RLHFExperimentConfig:
    """Budget of chapter 13-08 (one per profile)."""

    ppo: PPOConfig  # the language-model runs (beta and seed are set per run)
    steps: int  # PPO steps per language-model run
    frontier_betas: tuple[float, ...]  # the middle one is the main run
    main_seeds: int  # seeds at the main beta
    frontier_seeds: int  # seeds at every other beta
    lora_rank: int | None  # None: every weight of the policy trains
    lora_layers: int | None  # LoRA on the last `lora_layers` blocks only (None: all)
    n_train_prompts: int
    n_eval_prompts: int
    eval_batch_size: int
    toy_ppo: PPOConfig  # the toy problem
    toy_steps: int  # PPO steps of a toy run
    toy_eval_every: int  # exact evaluation of the toy policy
    toy_seeds: int  # seeds per ablation arm

    def __post_init__(self) -> None:
        if len(self.frontier_betas) < 1 or min(self.main_seeds, self.frontier_seeds) < 1:
            raise ValueError("RLHFExperimentConfig needs at least one beta and one seed per beta")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"RLHFExperimentConfig.lora_rank must be >= 1 or None, got "
                             f"{self.lora_rank}")
        if self.lora_layers is not None and self.lora_layers < 1:
            raise ValueError(f"RLHFExperimentConfig.lora_layers must be >= 1 or None, got "
                             f"{self.lora_layers}")

    @property
    def main_beta(self) -> float:
        return self.frontier_betas[len(self.frontier_betas) // 2]


TOY_PPO = PPOConfig(batch_size=64, ppo_epochs=2, num_minibatches=1, max_new_tokens=3, lr=3e-3,
                    vf_coef=0.5, beta=0.5, normalize_rewards=False)
PPO_CONFIGS = {
    "smoke": RLHFExperimentConfig(
        ppo=PPOConfig(batch_size=4, ppo_epochs=2, num_minibatches=2, max_new_tokens=8, lr=1e-3),
        steps=2, frontier_betas=(0.05, 0.2), main_seeds=2, frontier_seeds=1, lora_rank=4,
        lora_layers=1, n_train_prompts=16, n_eval_prompts=8, eval_batch_size=8,
        toy_ppo=dataclasses.replace(TOY_PPO, batch_size=16), toy_steps=6, toy_eval_every=3,
        toy_seeds=1),
    "tiny": RLHFExperimentConfig(
        ppo=PPOConfig(batch_size=16, ppo_epochs=2, num_minibatches=2, max_new_tokens=32,
                      lr=5e-4, lr_schedule="constant"),
        steps=4, frontier_betas=(0.02, 0.1, 0.5), main_seeds=3, frontier_seeds=2,
        lora_rank=16, lora_layers=15, n_train_prompts=512, n_eval_prompts=64,
        eval_batch_size=64, toy_ppo=TOY_PPO, toy_steps=100, toy_eval_every=10, toy_seeds=2),
    "full": RLHFExperimentConfig(
        ppo=PPOConfig(batch_size=64, ppo_epochs=4, num_minibatches=2, max_new_tokens=48,
                      lr=1e-6),
        steps=40, frontier_betas=(0.02, 0.1, 0.5), main_seeds=2, frontier_seeds=1,
        lora_rank=None, lora_layers=None, n_train_prompts=12_800, n_eval_prompts=512,
        eval_batch_size=128, toy_ppo=TOY_PPO, toy_steps=100, toy_eval_every=10, toy_seeds=2),
}


# %% [markdown]
# ### Experiment 1: PPO converges to the closed-form optimum
#
# Two runs on `ToyTask` with $\beta = 0.5$ and no reward normalisation (so that $\beta$ is in the
# reward's own units and (8.2) is the exact target): a contextual bandit (3 contexts, 4 actions:
# three tokens or EOS) and the token-level problem (replies of up to 3 tokens, 40 replies per
# context). Every few steps we score every reply and compute $\mathrm{KL}(\pi \,\|\, \pi^*)$,
# averaged over contexts; by (8.3) it is the gap $(J^* - J(\pi))/\beta$.

# %%
import matplotlib.pyplot as plt

from ftbook.workbench import show_figure

cfg = pick(PROFILE, PPO_CONFIGS)
toy_cfg = cfg.toy_ppo


def toy_run(task: ToyTask, config: PPOConfig, *, label: str, steps: int | None = None,
            reward_fn=None, exact_normalizer: bool = False) -> dict:
    """PPO on a toy task from its reference model; the exact gap to the optimum every few steps.
    With `exact_normalizer`, rewards are normalised with their exact moments under pi_ref."""
    steps = steps or cfg.toy_steps
    ref_model = task.reference_model(seed=0)
    ref_table, reward_table = task.logps(ref_model), task.rewards()
    normalizer = None
    if exact_normalizer and config.normalize_rewards:
        p = ref_table.exp() / task.num_contexts  # joint over (context, reply), contexts uniform
        mean = (p * reward_table).sum()
        normalizer = RewardNormalizer(mean.item(),
                                      (p * (reward_table - mean) ** 2).sum().sqrt().item())
    beta_raw = config.beta * (normalizer.std if normalizer is not None else 1.0)
    curve = []

    def exact(step: int, policy: PolicyWithValue) -> dict:
        if step % cfg.toy_eval_every and step != steps:
            return {}
        metrics = exact_metrics(task.logps(policy), ref_table, reward_table, beta_raw)
        curve.append({"step": step, **metrics})
        return {"kl_to_optimum": metrics["kl_to_optimum"]}

    seed_everything(config.seed)
    policy = PolicyWithValue(copy.deepcopy(ref_model))
    prompt_ids, prompt_mask = task.prompts()
    start = exact_metrics(ref_table, ref_table, reward_table, beta_raw)
    curve.append({"step": 0, **start})
    log = ppo_train(policy, ref_model, prompt_ids, prompt_mask, reward_fn or task.reward, config,
                    steps=steps, eos_token_id=task.eos_token_id, pad_token_id=task.pad_token_id,
                    callback=exact, normalizer=normalizer, desc=label)
    return {"label": label, "curve": pd.DataFrame(curve), "history": pd.DataFrame(log.history),
            "seconds": log.seconds, "final": curve[-1]}


bandit = toy_run(ToyTask(max_len=1), dataclasses.replace(toy_cfg, max_new_tokens=1),
                 label="bandit")
tokens = toy_run(ToyTask(max_len=3), toy_cfg, label="token-level")
convergence = pd.DataFrame([
    {"problem": run["label"], "KL(pi_ref || pi*) start": run["curve"]["kl_to_optimum"].iloc[0],
     "KL(pi || pi*) end": run["final"]["kl_to_optimum"],
     "J end": run["final"]["objective"], "J* = beta log Z": run["final"]["optimum"],
     "KL(pi || pi_ref) end": run["final"]["kl_ref"], "seconds": run["seconds"]}
    for run in (bandit, tokens)]).set_index("problem")
show_table(convergence, "toy_convergence", CHAPTER)

fig, ax = plt.subplots(figsize=(6, 3.5))
for run in (bandit, tokens):
    ax.plot(run["curve"]["step"], run["curve"]["kl_to_optimum"], marker="o", label=run["label"])
ax.set(yscale="log", xlabel="PPO step", ylabel=r"KL($\pi \,\|\, \pi^*$) = gap / $\beta$",
       title=r"PPO on problems with a known optimum ($\beta$ = 0.5)")
ax.legend()
show_figure(fig, "toy_convergence", CHAPTER)
for run in (bandit, tokens):
    start_gap, end_gap = run["curve"]["kl_to_optimum"].iloc[0], run["final"]["kl_to_optimum"]
    print(f"{run['label']}: KL(pi || pi*) {start_gap:.3f} -> {end_gap:.4f} nats after "
          f"{run['final']['step']} steps ({end_gap / start_gap:.1%} of the initial gap left); "
          f"J* - J = {run['final']['optimum'] - run['final']['objective']:.2e} "
          f"= beta x KL(pi || pi*) = {toy_cfg.beta * end_gap:.2e}")
gap_curves = {run["label"]: run["curve"]["kl_to_optimum"] for run in (bandit, tokens)}
left = {label: gaps.iloc[1] / gaps.iloc[0] for label, gaps in gap_curves.items()}  # share left
print(f"at the first evaluation (step {int(tokens['curve']['step'].iloc[1])}) the token-level "
      f"problem has {left['token-level']:.0%} of its gap left, the bandit {left['bandit']:.0%}: "
      "the token-level problem converges "
      + ("more slowly" if left["token-level"] > left["bandit"] else "no more slowly")
      + " than the bandit")
if PROFILE != "smoke" and not rehearsing():  # a known answer at the real sizes: over 8 seeds
    # at most 4% of the gap remained (sd 0.8%)
    for run in (bandit, tokens):  # at least 90% of the initial gap closed
        assert run["final"]["kl_to_optimum"] < 0.1 * run["curve"]["kl_to_optimum"].iloc[0]

# %% [markdown]
# Both runs close the gap to the optimum of (8.2) from where the reference policy starts; the
# printed lines give the share that remains (at the tiny and full sizes the cell asserts that at
# least 90% of it is closed). PPO with the per-token KL penalty, GAE and the clipped losses solves
# the KL-regularised problem (8.1), not some nearby one, and the objective reaches
# $\beta \log Z$ up to $\beta$ times the remaining KL, eq. (8.3). Where the token-level problem
# converges more slowly than the bandit (the last printed line), the reason is credit
# assignment: the reward for the reply must travel back through the value function to the first
# token.
#
# ### Experiment 2: the adaptive KL controller
#
# Choosing $\beta$ is choosing a point on the reward-KL frontier, but the mapping from $\beta$
# to the KL that results is unknown before training. Ziegler et al. instead fix the KL and let
# (8.13) find $\beta$. On the token-level problem we know the answer: the optimum for
# $\beta = 0.5$ has a KL from the reference that we compute exactly, and we give the controller
# that number as its target. Starting from $\beta_0 = 0.25$ and from $\beta_0 = 1$, it should
# find $\beta \approx 0.5$ by itself. A fixed $\beta$ started at either value would instead
# converge to its own optimum, whose KL the dashed lines show.

# %%
kl_task = ToyTask(max_len=3)
kl_ref_model = kl_task.reference_model(seed=0)
kl_ref_table, kl_rewards = kl_task.logps(kl_ref_model), kl_task.rewards()


def optimum_kl(beta: float) -> float:
    """KL(pi* || pi_ref) of the optimum (8.2) for `beta`, exactly."""
    log_opt = optimal_log_policy(kl_ref_table, kl_rewards, beta)
    return exact_metrics(log_opt, kl_ref_table, kl_rewards, beta)["kl_ref"]


kl_target = optimum_kl(0.5)
adaptive = {beta0: toy_run(kl_task, dataclasses.replace(toy_cfg, beta=beta0, target_kl=kl_target),
                           label=f"adaptive, beta0 = {beta0}", steps=int(1.5 * cfg.toy_steps))
            for beta0 in (0.25, 1.0)}
fig, (ax_beta, ax_kl) = plt.subplots(1, 2, figsize=(10, 3.5))
for beta0, run in adaptive.items():
    history = run["history"]
    ax_beta.plot(history["step"], history["beta"], label=rf"$\beta_0$ = {beta0}")
    ax_kl.plot(history["step"], history["kl"].rolling(5, min_periods=1).mean(),
               label=rf"$\beta_0$ = {beta0} (batch KL, 5-step mean)")
    ax_kl.axhline(optimum_kl(beta0), ls="--", lw=1, color=ax_kl.lines[-1].get_color())
ax_beta.axhline(0.5, color="k", lw=1, ls=":")
ax_kl.axhline(kl_target, color="k", lw=1, ls=":", label="target")
ax_beta.set(xlabel="PPO step", ylabel=r"$\beta$", title=r"$\beta$ found by eq. (8.13)")
ax_kl.set(xlabel="PPO step", ylabel="KL(pi || pi_ref), nats per reply",
          title="KL: dashed = optimum of a fixed beta0")
ax_beta.legend()
ax_kl.legend(fontsize=8)
show_figure(fig, "adaptive_kl", CHAPTER)
adaptive_table = pd.DataFrame([
    {"start": f"beta0 = {beta0}", "KL of the fixed-beta0 optimum": optimum_kl(beta0),
     "target KL": kl_target, "final beta": run["history"]["beta"].iloc[-1],
     "exact KL(pi || pi_ref) at the end": run["final"]["kl_ref"]}
    for beta0, run in adaptive.items()]).set_index("start")
show_table(adaptive_table, "adaptive_kl", CHAPTER)
for start, row in adaptive_table.iterrows():
    end_off = abs(math.log(row["exact KL(pi || pi_ref) at the end"] / kl_target))
    fixed_off = abs(math.log(row["KL of the fixed-beta0 optimum"] / kl_target))
    print(f"{start}: beta ends at {row['final beta']:.3f} ({row['final beta'] / 0.5:.2f} times "
          f"0.5); the exact KL ends at {row['exact KL(pi || pi_ref) at the end']:.3f}, "
          f"{row['exact KL(pi || pi_ref) at the end'] / kl_target:.2f} times the target "
          f"{kl_target:.3f}, where a fixed beta0 would settle at "
          f"{row['KL of the fixed-beta0 optimum'] / kl_target:.2f} times it: "
          + ("closer to the target" if end_off < fixed_off else "not closer to the target"))
if PROFILE != "smoke" and not rehearsing():  # a known answer at the real sizes: over 8
    # seeds the final beta was 0.47-0.54 (sd 0.02)
    assert all(0.4 < run["history"]["beta"].iloc[-1] < 0.625 for run in adaptive.values())

# %% [markdown]
# The printed lines say, for each start, where $\beta$ ends relative to 0.5 and whether the
# policy's exact KL ends closer to the target than a fixed $\beta_0$ would have settled (at the
# tiny and full sizes the cell asserts that $\beta$ ends between 0.4 and 0.625, from either
# side). The controller's step is bounded (2% per PPO step with
# $K_\beta = 0.1$), so it needs a few dozen steps to correct a factor of two; the batch KL it
# reacts to is noisy, which the clip of (8.13) absorbs.
#
# ### Experiment 3: the stability recipe, knob by knob
#
# **Reward normalisation, what $\beta$ means.** A reward model's scale is arbitrary (13-07's
# Bradley-Terry model is identified only up to a constant, and its scale grows with training).
# Multiply the toy's reward by $s$ and keep $\beta = 0.5$: the optimum's KL from the reference,
# computed exactly from (8.2), changes by an order of magnitude across $s \in [0.25, 4]$ (the cell
# prints the factor and asserts that it exceeds ten).
# With (8.14), the reward is divided by its standard deviation under $\pi_\text{ref}$, and the
# KL budget that $\beta$ buys no longer depends on $s$. No training is needed to see this; it is
# a property of (8.2).

# %%
scales = [0.25, 0.5, 1.0, 2.0, 4.0]
p_ref = kl_ref_table.exp() / kl_task.num_contexts  # joint over (context, reply)
sigma_ref = (p_ref * (kl_rewards - (p_ref * kl_rewards).sum()) ** 2).sum().sqrt().item()
scale_rows = []
for s in scales:
    raw = optimal_log_policy(kl_ref_table, s * kl_rewards, 0.5)
    normed = optimal_log_policy(kl_ref_table, kl_rewards / sigma_ref, 0.5)  # s cancels in (8.14)
    scale_rows.append({
        "reward scale s": s,
        "KL of pi*, raw reward": exact_metrics(raw, kl_ref_table, s * kl_rewards, 0.5)["kl_ref"],
        "KL of pi*, normalised reward": exact_metrics(normed, kl_ref_table, kl_rewards,
                                                      0.5 * sigma_ref)["kl_ref"]})
scale_table = pd.DataFrame(scale_rows).set_index("reward scale s")
show_table(scale_table, "reward_scale_vs_kl", CHAPTER)
raw_spread = scale_table["KL of pi*, raw reward"].max() / scale_table["KL of pi*, raw reward"].min()
print(f"beta = 0.5: across reward scales {scales[0]}..{scales[-1]} the optimum's KL varies "
      f"{raw_spread:.0f}-fold without normalisation, not at all with it")
assert raw_spread > 10  # exact computation (no sampling): the spread is ~50, far from 10

# %% [markdown]
# **The recipe under a realistic reward model.** Next the optimisation itself. The toy's reward
# now comes with an offset of 10 and a scale of 3, as an unnormalised reward model's scores might
# (the optimum is unchanged by the offset; we set $\beta = 0.5\,\sigma_0$ in raw units, the same
# problem as $\beta = 0.5$ after normalisation). Arms, each over `toy_seeds` seeds: the full
# recipe (normalisation, whitening, gradient clipping at norm 1, linear learning-rate decay);
# without reward normalisation; with a constant learning rate.

# %%
realistic = ToyTask(max_len=3, reward_scale=3.0, reward_offset=10.0)
recipe = dataclasses.replace(toy_cfg, normalize_rewards=True)
sigma0 = 3.0 * sigma_ref  # the same reference policy and reward table, scaled by 3
arms = {
    "full recipe": recipe,
    "no reward normalisation": dataclasses.replace(recipe, normalize_rewards=False,
                                                   beta=recipe.beta * sigma0),
    "constant learning rate": dataclasses.replace(recipe, lr_schedule="constant"),
}
from ftbook.workbench import mean_interval


def paired_differences(values: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Per arm (a column of `values`; rows are seeds): the mean over seeds of the arm's value
    minus the baseline's on the same seed, and the half-width of its 95% Student-t interval
    (NaN with one seed); `resolved` when the interval excludes 0."""
    rows = []
    for arm in values.columns.drop(baseline):
        mean, half = mean_interval((values[arm] - values[baseline]).tolist())
        rows.append({"arm": arm, f"minus {baseline}": mean, "+/- (95%)": half,
                     "resolved": bool(abs(mean) > half)})
    return pd.DataFrame(rows).set_index("arm")


arm_rows = []
for arm, arm_config in arms.items():
    for seed in range(cfg.toy_seeds):
        run = toy_run(realistic, dataclasses.replace(arm_config, seed=seed), label=arm,
                      exact_normalizer=True)
        arm_rows.append({"arm": arm, "seed": seed, "KL(pi || pi*) end": run["final"][
            "kl_to_optimum"], "max grad norm": run["history"]["grad_norm"].max()})
arm_table = pd.DataFrame(arm_rows).groupby("arm", sort=False).agg(
    gap_mean=("KL(pi || pi*) end", "mean"), gap_min=("KL(pi || pi*) end", "min"),
    gap_max=("KL(pi || pi*) end", "max"), max_grad_norm=("max grad norm", "max"))
arm_table = arm_table.join(paired_differences(pd.DataFrame(arm_rows).pivot(
    index="seed", columns="arm", values="KL(pi || pi*) end"), "full recipe"))
show_table(arm_table, "recipe_arms", CHAPTER)
print(f"final KL(pi || pi*) minus the full recipe's on the same seed, {cfg.toy_seeds} seed(s): "
      + "; ".join(f"{arm} {row['minus full recipe']:+.3f} +/- {row['+/- (95%)']:.3f}"
                  for arm, row in arm_table.dropna(subset=["minus full recipe"]).iterrows()))


def resolved_arms(table: pd.DataFrame) -> str:
    """The arms whose difference from the full recipe is resolved, with its sign, as a line."""
    worse = [arm for arm, row in table.dropna(subset=["minus full recipe"]).iterrows()
             if row["resolved"] and row["minus full recipe"] > 0]
    better = [arm for arm, row in table.dropna(subset=["minus full recipe"]).iterrows()
              if row["resolved"] and row["minus full recipe"] < 0]
    return (f"established by this run (95% interval excludes 0): worse than the full recipe: "
            f"{', '.join(worse) or 'none'}; better: {', '.join(better) or 'none'}")


print(resolved_arms(arm_table))

# %% [markdown]
# The last columns compare each arm with the full recipe seed by seed: the mean difference of
# the final gap, the half-width of its 95% interval over the seeds, and whether that interval
# excludes zero (with one seed, as in the smoke profile, there is no interval). Two mechanisms
# predict the signs. Without normalisation the value head starts at 0 and must learn returns
# around 10, at most $\varepsilon_V = 0.2$ per PPO step because of value clipping, and until it
# has, the advantages carry the offset: the same problem should be solved worse in the same
# number of steps. With a constant learning rate, the noise of each minibatch's gradient keeps
# the policy moving around the optimum at the end of training, where a decaying rate lets it
# settle: a larger final gap, but a smaller effect, which a few seeds may not resolve. A
# difference whose interval includes zero is not established by this run, whatever its sign.
#
# **Whitening and gradient clipping under a faulty reward.** On this toy, with Adam, whitening
# and gradient clipping have little to do while the reward behaves (Adam already rescales each
# parameter's step; we do not run that comparison here). Both earn their place when something
# goes wrong. A reward model queried
# far from its training data can return an extreme score, and a policy finds such inputs. We
# inject one: at PPO step 30, a single reply of the batch scores $10^4$ instead of its true
# reward. Whitening bounds the advantage any one token can get (after whitening,
# $|\hat A| \le \sqrt{N}$ for $N$ tokens), and gradient clipping bounds the step.

# %%
FAULT_STEP, FAULT_SIZE = max(1, 3 * cfg.toy_steps // 10), 1e4  # step 30 of 100


def faulty_reward(task: ToyTask, config: PPOConfig):
    """The task's reward, except that one reply of the batch at PPO step FAULT_STEP scores
    FAULT_SIZE (the reward normalisation is exact here, so no call precedes step 1)."""
    calls = {"n": 0}

    def reward(rollout: Rollout) -> torch.Tensor:
        calls["n"] += 1
        scores = task.reward(rollout)
        if calls["n"] == FAULT_STEP:
            scores = scores.clone()
            scores[0] = FAULT_SIZE
        return scores

    return reward


fault_arms = {
    "full recipe": recipe,
    "no whitening": dataclasses.replace(recipe, whiten_advantages=False),
    "no gradient clipping": dataclasses.replace(recipe, max_grad_norm=None),
    "neither": dataclasses.replace(recipe, whiten_advantages=False, max_grad_norm=None),
}
fault_runs = {arm: [toy_run(realistic, dataclasses.replace(arm_config, seed=seed), label=arm,
                            exact_normalizer=True, reward_fn=faulty_reward(realistic, arm_config))
                    for seed in range(cfg.toy_seeds)]
              for arm, arm_config in fault_arms.items()}
fig, ax = plt.subplots(figsize=(6.5, 3.5))
for arm, runs in fault_runs.items():  # the first seed
    ax.plot(runs[0]["curve"]["step"], runs[0]["curve"]["kl_to_optimum"], marker=".", label=arm)
ax.axvline(FAULT_STEP, color="k", lw=1, ls=":")
ax.set(yscale="log", xlabel="PPO step", ylabel=r"KL($\pi \,\|\, \pi^*$)",
       title=f"One reward of {FAULT_SIZE:.0e} at step {FAULT_STEP} (seed 0)")
ax.legend(fontsize=8)
show_figure(fig, "reward_fault", CHAPTER)

def fault_row(arm: str, seed: int, run: dict) -> dict:
    curve = run["curve"].set_index("step")["kl_to_optimum"]
    return {"arm": arm, "seed": seed, "max grad norm": run["history"]["grad_norm"].max(),
            "KL(pi || pi*) before the fault": curve[curve.index < FAULT_STEP].iloc[-1],
            "worst after": curve[curve.index >= FAULT_STEP].max(),
            "end": run["final"]["kl_to_optimum"]}


fault_rows = pd.DataFrame([fault_row(arm, seed, run) for arm, runs in fault_runs.items()
                           for seed, run in enumerate(runs)])
fault_table = fault_rows.groupby("arm", sort=False).agg(  # means over seeds, the largest norm
    **{"max grad norm": ("max grad norm", "max"),
       "KL(pi || pi*) before the fault": ("KL(pi || pi*) before the fault", "mean"),
       "worst after": ("worst after", "mean"), "end": ("end", "mean")})
fault_table = fault_table.join(paired_differences(
    fault_rows.pivot(index="seed", columns="arm", values="end"), "full recipe"))
show_table(fault_table, "reward_fault", CHAPTER)
print(f"final KL(pi || pi*) minus the full recipe's on the same seed, {cfg.toy_seeds} seed(s): "
      + "; ".join(f"{arm} {row['minus full recipe']:+.3f} +/- {row['+/- (95%)']:.3f}"
                  for arm, row in fault_table.dropna(subset=["minus full recipe"]).iterrows()))
for arm, runs in fault_runs.items():  # the gradient norm at the fault over its usual size
    norms = [run["history"].set_index("step")["grad_norm"] for run in runs]
    ratio = max(n[FAULT_STEP] / n.drop(FAULT_STEP).median() for n in norms)
    row = fault_table.loc[arm]
    print(f"{arm}: gradient norm at the fault up to {ratio:.0f} times its median over the other "
          f"steps; KL(pi || pi*) {row['KL(pi || pi*) before the fault']:.3f} before, "
          f"{row['worst after']:.3f} at worst after, {row['end']:.3f} at the end")
print(resolved_arms(fault_table))

# %% [markdown]
# The gradient norms show the fault (the printed ratios to each run's usual norm). With either
# defence, a bounded advantage or a bounded step, the fault can move the policy only so far, and
# the run can recover; without both, we expect the policy to be thrown away from the optimum and
# then to stall: Adam's second-moment estimate has absorbed the huge gradient, and with
# $\beta_2 = 0.999$ it remembers it for hundreds of steps, shrinking every later update. The
# printed lines give, per arm, the gap before the fault, at its worst after it and at the end,
# and which arms differ from the full recipe beyond their interval. The figure shows one seed;
# the table's last columns give each arm's final gap minus the full recipe's on the same seed,
# with its 95% interval over the seeds, and only a difference whose interval excludes zero is
# established by this run (the tiny profile has two seeds, so only a large and consistent
# effect clears that bar). Such
# faults are not exotic in RLHF, where the policy actively searches for the inputs on which the
# reward model is wrong.

# %% [markdown]
# ### The running task
#
# The sentiment task of 13-07: prompts are openings of SST-2 reviews in the chat template
# ("Continue this movie review: ..."), the policy is the SFT model of 13-06, the *proxy* reward
# is 13-07's reward model, trained on preferences labelled by the *gold* reward (7.1b), which
# scores a reply's sentiment as far as the reply is a well-formed review. PPO sees only the
# proxy; we log the gold reward alongside, which is the only way to see over-optimisation (Gao
# et al. 2022, arXiv:2210.10760): proxy reward that keeps rising while the gold reward stalls
# or falls. We also log the gold's two ingredients, the sentiment $s(y)$ and the
# well-formedness $g(y)$, and the reply length and EOS rate: these are where a policy that
# exploits the proxy shows it.
#
# The reward model reads the prompt in the chat template, the reply and EOS (`score_replies` of
# 13-07); the gold reads the reply alone. Replies are decoded without special tokens.
#
# The policy is a trainable copy of the SFT model. In the smoke and tiny profiles it trains
# LoRA adapters (13-02) on the last blocks only, a budget choice: backpropagation then stops at
# the first adapted block, which saves the backward pass through the blocks below it (the FLOP
# count of each run accounts for it); the full profile trains every weight, as Ouyang et al.
# (2022) did. The
# reference is the SFT model itself, frozen.

# %%
#| export
import copy

from ftbook.instruction_tuning import load_sft_model, render_prompt
from ftbook.reward_modeling import (
    load_gold_reward,
    load_reward_model,
    score_replies,
    sentiment_prompts,
    well_formedness,
)


def adapter_copy(model: nn.Module, rank: int | None, layers: int | None = None) -> nn.Module:
    """A trainable copy of the causal LM `model`. `rank=None`: every weight trains. Otherwise
    LoRA (13-02, through PEFT) of rank `rank` and alpha 2 * rank on every linear layer of the
    last `layers` transformer blocks (None: all of them); the copy's other weights are frozen.
    The copy stays the model's own class (PEFT's layers are injected in place), so everything
    that takes the model takes the copy."""
    from peft import LoraConfig, get_peft_model

    lm = copy.deepcopy(model)
    if rank is None:
        return lm.requires_grad_(True)
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    blocks = lm.get_decoder().layers
    if layers is not None and not 1 <= layers <= len(blocks):
        raise ValueError(f"layers must be in 1..{len(blocks)} (the model's blocks), got {layers}")
    names = sorted({name.rsplit(".", 1)[-1] for name, module in blocks[0].named_modules()
                    if isinstance(module, nn.Linear)})  # q_proj, k_proj, ..., down_proj
    first = 0 if layers is None else len(blocks) - layers
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=names,
                        layers_to_transform=list(range(first, len(blocks))))
    return get_peft_model(lm, config).get_base_model()


def adapter_policy(sft_model: nn.Module, rank: int | None, layers: int | None = None
                   ) -> PolicyWithValue:
    """`adapter_copy` of the SFT model with a zero value head: the policy PPO trains."""
    return PolicyWithValue(adapter_copy(sft_model, rank, layers))


@dataclass
class RunningTask:
    """13-07's sentiment task as PPO sees it: the SFT model (initial policy and reference), the
    reward model (proxy), the gold reward, and the training and held-out user messages."""

    sft_model: nn.Module
    tokenizer: Any
    reward_model: nn.Module
    rm_tokenizer: Any
    gold: Any  # 13-07's GoldReward
    train_messages: list[str]
    eval_messages: list[str]

    def encode(self, messages: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and mask of the rendered prompts (the template brings its BOS)."""
        batch = self.tokenizer([render_prompt(self.tokenizer, m) for m in messages],
                               return_tensors="pt", padding=True, add_special_tokens=False)
        device = next(self.sft_model.parameters()).device
        return batch["input_ids"].to(device), batch["attention_mask"].to(device)

    def replies(self, rollout: Rollout) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(rollout.response_ids,
                                                               skip_special_tokens=True)]

    def proxy_fn(self, messages: Sequence[str]) -> Callable[[Rollout], torch.Tensor]:
        """The reward model's scores of a rollout's replies to `messages[prompt_index]`."""
        def proxy(rollout: Rollout) -> torch.Tensor:
            prompts = [messages[i] for i in rollout.prompt_index.tolist()]
            return score_replies(self.reward_model, self.rm_tokenizer, prompts,
                                 self.replies(rollout))
        return proxy

    def monitor(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """The gold reward (7.1b) of each reply and its ingredients, s(y) and g(y)."""
        texts = self.replies(rollout)
        g = torch.tensor([well_formedness(t) for t in texts])
        s = self.gold.sentiment(texts)
        return {"gold_reward": self.gold(texts), "sentiment": s, "well_formed": g}


def load_running_task(profile: str, cfg: RLHFExperimentConfig, seed: int,
                      device: torch.device | None = None) -> RunningTask:
    """The running task of `profile`: 13-06's SFT model, 13-07's reward model and gold reward
    (each trained first if its cache is empty), `cfg.n_train_prompts` training and
    `cfg.n_eval_prompts` held-out (SST-2 validation) user messages."""
    sft_model, tokenizer = load_sft_model(profile, device)
    reward_model, rm_tokenizer = load_reward_model(profile, device)
    return RunningTask(sft_model.requires_grad_(False).eval(), tokenizer, reward_model,
                       rm_tokenizer, load_gold_reward(profile, device),
                       sentiment_prompts("train", cfg.n_train_prompts, seed),
                       sentiment_prompts("validation", cfg.n_eval_prompts, seed))


# %% [markdown]
# ### One run, and every run of the chapter
#
# `rlhf_run` trains one policy from a fresh copy of the SFT model for `steps` PPO steps at a
# fixed $\beta$ (normalised reward units) and evaluates it on the held-out prompts: one reply
# per prompt at temperature 1, its proxy and gold reward, and its KL from the reference (the
# sum of $k_1$ over the reply, unbiased for the sequence KL because the replies are the
# policy's own samples). The reward normalisation (8.14) is fitted once, on replies of the SFT
# policy to training prompts, and shared by every run, so that $\beta$ means the same in all of
# them. It also counts model FLOPs, eqs. (A.1)-(A.3): per step one forward pass per sampled
# token, one reference and one reward-model pass over prompt and reply, and `ppo_epochs`
# forward-backward passes; with frozen weights below the adapters, the backward pass computes
# only activation gradients, about one forward pass, and only through the adapted blocks.
#
# `rlhf_runs` makes every run of the chapter: each $\beta$ of the frontier over its seeds, and
# one ablation on the real task (the main $\beta$ without reward normalisation). It caches the
# result under the configuration, the SFT model and the reward model it used, so that 13-09
# reads *these* runs (and 13-08 and 13-09 can never disagree about them).

# %%
#| export
import hashlib

import pandas as pd

from ftbook.base_models import build_once
from ftbook.instruction_tuning import sft_model_path
from ftbook.reward_modeling import rm_recipe
from ftbook.workbench import cache_dir, pick, progress, seed_everything, transformer_flops


def policy_flops(policy: PolicyWithValue, tokens: int, reply_tokens: int, epochs: int,
                 trained_fraction: float) -> float:
    """Model FLOPs of one PPO step, eqs. (A.1)-(A.3) at the batch's mean sequence length
    folded into `tokens` (prompt + reply tokens of the batch): sampling (one forward per reply
    token), the reference and reward-model passes (one forward each over all tokens), and
    `epochs` training passes, each a forward plus a backward through `trained_fraction` of the
    network (2 forwards' worth when every weight trains, 1 when only activations need
    gradients)."""
    forward_per_token = transformer_flops(policy.lm, 1, 1, training=False)
    return forward_per_token * (reply_tokens + 2 * tokens
                                + epochs * tokens * (1 + trained_fraction))


def rlhf_run(task: RunningTask, cfg: RLHFExperimentConfig, *, beta: float, seed: int,
             normalizer: RewardNormalizer, arm: str = "recipe", **ppo_changes: Any) -> dict:
    """One PPO run on the running task and its held-out evaluation, as a JSON-ready dict:
    arm, beta, seed, `history` (one row per step), `eval` (per-prompt columns of
    `evaluate_policy`), `replies` (its held-out replies), `seconds`, `flops`."""
    seed_everything(seed)
    policy = adapter_policy(task.sft_model, cfg.lora_rank, cfg.lora_layers)
    n_blocks = len(policy.lm.get_decoder().layers)
    trained_fraction = 2.0 if cfg.lora_rank is None else (cfg.lora_layers or n_blocks) / n_blocks
    config = dataclasses.replace(cfg.ppo, beta=beta, seed=seed, **ppo_changes)
    train_ids, train_mask = task.encode(task.train_messages)
    log = ppo_train(policy, task.sft_model, train_ids, train_mask,
                    task.proxy_fn(task.train_messages), config, steps=cfg.steps,
                    eos_token_id=task.tokenizer.eos_token_id,
                    pad_token_id=task.tokenizer.pad_token_id, monitor_fn=task.monitor,
                    normalizer=normalizer, desc=f"PPO {arm} beta={beta} seed={seed}")
    columns, rollouts = evaluate_task(policy, task, cfg, seed)
    flops = sum(policy_flops(policy, row["tokens"], round(row["length"] * config.batch_size),
                             config.ppo_epochs, trained_fraction) for row in log.history)
    return {"arm": arm, "beta": beta, "seed": seed, "history": log.history,
            "eval": {k: v.tolist() for k, v in columns.items()},
            "replies": [r for rollout in rollouts for r in task.replies(rollout)],
            "seconds": log.seconds, "flops": flops}


def evaluate_task(policy: PolicyWithValue, task: RunningTask, cfg: RLHFExperimentConfig,
                  seed: int) -> tuple[dict[str, torch.Tensor], list[Rollout]]:
    """`evaluate_policy` on the held-out prompts of the running task, with the gold monitor."""
    eval_ids, eval_mask = task.encode(task.eval_messages)
    return evaluate_policy(policy, task.sft_model, eval_ids, eval_mask,
                           task.proxy_fn(task.eval_messages),
                           max_new_tokens=cfg.ppo.max_new_tokens,
                           eos_token_id=task.tokenizer.eos_token_id,
                           pad_token_id=task.tokenizer.pad_token_id, monitor_fn=task.monitor,
                           batch_size=cfg.eval_batch_size, seed=seed)


@dataclass
class RLHFRuns:
    """Every language-model run of chapter 13-08 and the SFT policy's evaluation on the same
    held-out prompts (`sft`: per-prompt columns; `sft_replies`)."""

    profile: str
    eval_messages: list[str]
    normalizer: dict[str, float]
    sft: dict[str, list[float]]
    sft_replies: list[str]
    runs: list[dict]
    seconds: float

    def table(self) -> Any:
        """One row per run: arm, beta, seed, the held-out means, seconds and FLOPs."""
        return pd.DataFrame([{"arm": r["arm"], "beta": r["beta"], "seed": r["seed"],
                              **{k: sum(v) / len(v) for k, v in r["eval"].items()},
                              "seconds": r["seconds"], "flops": r["flops"]} for r in self.runs])

    def history(self) -> Any:
        """The training logs of all runs, one row per step, with arm, beta and seed."""
        return pd.DataFrame([{"arm": r["arm"], "beta": r["beta"], "seed": r["seed"], **row}
                             for r in self.runs for row in r["history"]])


RUNS_FORMAT = 2  # bump to invalidate the cached runs


def rlhf_runs_folder(profile: str) -> Path:
    """The cache folder of the runs of `profile`, keyed by the chapter's configuration, the SFT
    model (its folder name is keyed by its recipe) and the reward model's recipe."""
    key = json.dumps({"format": RUNS_FORMAT, "config": repr(pick(profile, PPO_CONFIGS)),
                      "sft": sft_model_path(profile).name, "rm": rm_recipe(profile)},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir("13_08_rlhf_ppo") / f"runs-{profile}-{digest}"


def rlhf_runs(profile: str, device: torch.device | None = None, seed: int = 0) -> RLHFRuns:
    """All runs of chapter 13-08 for `profile`, from the cache, or made and cached first: each
    beta of `frontier_betas` over `frontier_seeds` seeds (`main_seeds` at the main beta), and
    the main beta without reward normalisation (seed `seed`)."""
    cfg = pick(profile, PPO_CONFIGS)

    def build(folder: Path) -> None:
        start = time.perf_counter()
        task = load_running_task(profile, cfg, seed, device)
        seed_everything(seed)  # the normalisation: SFT replies to training prompts
        sft_policy = PolicyWithValue(task.sft_model)
        train_ids, train_mask = task.encode(task.train_messages)
        proxy = task.proxy_fn(task.train_messages)
        sampler = torch.Generator(train_ids.device).manual_seed(seed)
        index = torch.randperm(len(task.train_messages), generator=sampler)
        raw = []
        for i in range(cfg.ppo.norm_batches):
            rows = index[i * cfg.ppo.batch_size:(i + 1) * cfg.ppo.batch_size]
            rollout = sample_rollout(sft_policy, train_ids, train_mask, rows, cfg.ppo,
                                     eos_token_id=task.tokenizer.eos_token_id,
                                     pad_token_id=task.tokenizer.pad_token_id,
                                     generator=sampler)
            raw.append(proxy(rollout).float().cpu())
        normalizer = RewardNormalizer().fit(torch.cat(raw))
        sft_columns, sft_rollouts = evaluate_task(sft_policy, task, cfg, seed)
        plan = [("recipe", beta, s) for beta in cfg.frontier_betas
                for s in range(seed, seed + (cfg.main_seeds if beta == cfg.main_beta
                                             else cfg.frontier_seeds))]
        plan.append(("no reward normalisation", cfg.main_beta, seed))
        runs = []
        for arm, beta, run_seed in progress(plan, desc="PPO runs"):
            changes = {"normalize_rewards": False} if arm != "recipe" else {}
            runs.append(rlhf_run(task, cfg, beta=beta, seed=run_seed, normalizer=normalizer,
                                 arm=arm, **changes))
        result = {"profile": profile, "eval_messages": task.eval_messages,
                  "normalizer": {"mean": normalizer.mean, "std": normalizer.std},
                  "sft": {k: v.tolist() for k, v in sft_columns.items()},
                  "sft_replies": [r for rollout in sft_rollouts for r in task.replies(rollout)],
                  "runs": runs, "seconds": time.perf_counter() - start}
        (folder / "runs.json").write_text(json.dumps(result))

    folder = build_once(rlhf_runs_folder(profile), build)
    return RLHFRuns(**json.loads((folder / "runs.json").read_text()))


# %% [markdown]
# ### Experiment 4: RLHF on the running task
#
# Every run of the chapter, made by `rlhf_runs` (or read from its cache): the frontier's
# $\beta$s over their seeds, with more seeds at the main $\beta$, and the ablation.

# %%
import math

import pandas as pd

from ftbook.workbench import show_table

runs = rlhf_runs(PROFILE, DEVICE, SEED)
table, history = runs.table(), runs.history()
main_beta = cfg.main_beta
n_eval = len(runs.eval_messages)
print(f"{len(runs.runs)} runs of {cfg.steps} PPO steps x {cfg.ppo.batch_size} replies, "
      f"{runs.seconds:.0f} s in all (training {table['seconds'].sum():.0f} s); held-out "
      f"prompts: {n_eval}, e.g. {runs.eval_messages[0]!r}")
print(f"reward normalisation (8.14), fitted on SFT replies: mean {runs.normalizer['mean']:.3f}, "
      f"std {runs.normalizer['std']:.3f}")

# %% [markdown]
# **Did PPO raise the gold reward?** For each $\beta$, the gain of the gold reward over the SFT
# policy on the held-out prompts, averaged over seeds. Its standard error has two parts: the
# spread of the per-seed gains (which contains both the training noise and the sampling noise
# of each run's evaluation) divided by the number of seeds, and the SFT policy's own sampling
# error, which every seed shares:
#
# $$
# \mathrm{SE}(\bar d) = \sqrt{\frac{s_d^2}{S} + \frac{s_\text{SFT}^2}{n}},
# \qquad d_j = \bar r^\star_{\text{PPO}, j} - \bar r^\star_\text{SFT},
# \tag{8.15}
# $$
#
# with $S$ seeds, $n$ held-out prompts, $s_d$ the standard deviation of the $d_j$ and
# $s_\text{SFT}$ that of the SFT policy's per-prompt gold rewards.

# %%
sft_eval = pd.DataFrame(runs.sft)
sft_means = sft_eval.mean()
se_sft = sft_eval["gold_reward"].std() / math.sqrt(n_eval)
recipe = table[table["arm"] == "recipe"]
rows = []
for beta, group in recipe.groupby("beta"):
    gains = group["gold_reward"] - sft_means["gold_reward"]
    se = math.sqrt(gains.var(ddof=1) / len(gains) + se_sft**2)
    kl, kl_half = mean_interval(group["kl"].tolist())
    rows.append({"beta": beta, "seeds": len(group), "KL (nats/reply)": kl, "KL ±": kl_half,
                 "gold": group["gold_reward"].mean(), "gold gain": gains.mean(),
                 "SE of gain (8.15)": se, "gain / SE": gains.mean() / se,
                 "proxy": group["proxy_reward"].mean(), "sentiment s": group["sentiment"].mean(),
                 "well-formed g": group["well_formed"].mean(), "length": group["length"].mean(),
                 "EOS rate": group["eos_rate"].mean()})
frontier = pd.DataFrame(rows).set_index("beta")
sft_row = {"seeds": 1, "KL (nats/reply)": 0.0, "gold": sft_means["gold_reward"],
           "proxy": sft_means["proxy_reward"], "sentiment s": sft_means["sentiment"],
           "well-formed g": sft_means["well_formed"], "length": sft_means["length"],
           "EOS rate": sft_means["eos_rate"]}
show_table(pd.concat([pd.DataFrame([sft_row], index=pd.Index(["SFT"], name="beta")),
                      frontier]), "frontier", CHAPTER, floatfmt="{:.3f}")
headline = frontier.loc[main_beta]
print(f"main run, beta = {main_beta}, {int(headline['seeds'])} seeds: gold "
      f"{sft_means['gold_reward']:.2f} -> {headline['gold']:.2f}, gain "
      f"{headline['gold gain']:+.2f} +- {headline['SE of gain (8.15)']:.2f} (SE), "
      f"{headline['gain / SE']:.1f} standard errors; KL {headline['KL (nats/reply)']:.2f} "
      f"+- {headline['KL ±']:.2f} nats per reply")

# %% [markdown]
# **This run.** What the table supports, in sentences written from its numbers: each change
# over the SFT policy with its standard error (8.15), counted as established only beyond two
# standard errors.

# %%
def gain_and_se(column: str, beta: float = main_beta) -> tuple[float, float]:
    """Gain of `column` over the SFT policy at `beta`, averaged over the seeds, and its standard
    error (8.15) (nan with one seed)."""
    group = recipe[recipe["beta"] == beta]
    gains = group[column] - sft_means[column]
    return gains.mean(), math.sqrt(gains.var(ddof=1) / len(gains)
                                   + sft_eval[column].var() / n_eval)


def change(gain: float, se: float, up: str = "rises", down: str = "falls") -> str:
    """How a change reads: beyond two standard errors one way or the other, or not resolved."""
    if gain > 2 * se:
        return f"{up} by more than two standard errors"
    if gain < -2 * se:
        return f"{down} by more than two standard errors"
    return "does not move by more than two standard errors"


gold_gain, gold_se = headline["gold gain"], headline["SE of gain (8.15)"]
print(f"At the main beta = {main_beta} ({int(headline['seeds'])} seeds) the held-out gold reward "
      f"{change(gold_gain, gold_se)}: {sft_means['gold_reward']:.2f} (SFT) -> "
      f"{headline['gold']:.2f}, a gain of {gold_gain:+.2f} +- {gold_se:.2f} (SE), "
      f"{gold_gain / gold_se:.1f} standard errors")
main_kls = recipe[recipe["beta"] == main_beta]["kl"]
print(f"its KL from the reference: {headline['KL (nats/reply)']:.2f} +- {headline['KL ±']:.2f} "
      f"nats per reply (95% over seeds); per seed "
      + ", ".join(f"{kl:.2f}" for kl in main_kls))
for beta, row in frontier.drop(main_beta).iterrows():
    print(f"beta = {beta:g} ({int(row['seeds'])} seed(s)): gold gain {row['gold gain']:+.2f} +- "
          f"{row['SE of gain (8.15)']:.2f}, {row['gain / SE']:.1f} standard errors: the gold "
          f"reward {change(row['gold gain'], row['SE of gain (8.15)'])}")
for column, name in (("sentiment", "the sentiment s(y)"), ("well_formed", "the well-formedness g(y)"),
                     ("proxy_reward", "the proxy reward (raw RM score)"),
                     ("length", "the reply length (tokens)"), ("eos_rate", "the EOS rate")):
    gain, se = gain_and_se(column)
    print(f"at beta = {main_beta}, {name} {change(gain, se)}: {sft_means[column]:.3g} (SFT) -> "
          f"{sft_means[column] + gain:.3g}, {gain:+.3g} +- {se:.2g}")
proxy_gain, _ = gain_and_se("proxy_reward")
print(f"the proxy gain is {proxy_gain / sft_eval['proxy_reward'].std():.2f} standard deviations "
      f"of the reward model's scores of SFT replies, after {cfg.steps} PPO steps")
length_gain, length_se = gain_and_se("length")
length_r = sft_eval["proxy_reward"].corr(sft_eval["length"])
if length_gain > 2 * length_se and length_r > 0:
    print(f"the replies grew, the way the reward model's score rises with length (correlation "
          f"{length_r:.2f} on the SFT replies): the reward model's length bias at work")
elif length_gain > 2 * length_se:
    print(f"the replies grew, although the reward model's score does not rise with length on "
          f"the SFT replies (correlation {length_r:.2f})")
else:
    print(f"the replies did not grow beyond two standard errors: no sign of a length exploit "
          f"(the reward model's score correlates with length at {length_r:.2f} on SFT replies)")

# %% [markdown]
# How to read these lines. The gold gain is the measurement the chapter is after; a $\beta$
# whose gain lies within two standard errors of zero is not shown to help by this run,
# whatever its sign. The interval of the KL is over seeds, and the per-seed values show how
# evenly the seeds travelled: in a run this short, one seed can move much farther than the
# others. The gold's sentiment ingredient $s(y)$ is what the reward model learned to see; its
# well-formedness $g(y)$ is what it sees poorly; so a gain carried by $s(y)$ is the expected
# shape. The proxy is a weak signal (13-07 reports how often the reward model agrees with the
# gold on held-out pairs, far from always), and a few PPO steps follow it only a little way
# (the proxy gain, in standard deviations of its scores). Length and EOS rate are the hack
# indicators: replies that grow while fewer of them end with EOS before the limit are the
# reward model's length bias at work (the last line decides whether this run shows it). That
# is an exploit the gold penalises rather than rewards: its ending factor halves the credit of a
# reply cut mid-sentence, eq. (7.1b).

# %% [markdown]
# The training curves of the main $\beta$, one thin line per seed and their mean in bold. The
# top row is what PPO optimises and pays; the bottom row is where exploitation of the proxy
# would show: the gold reward and its two ingredients, the reply length and the EOS rate.

# %%
main_history = history[(history["arm"] == "recipe") & (history["beta"] == main_beta)]
panels = [("proxy_reward", "proxy reward (raw RM score)"), ("kl", "KL to reference (nats/reply)"),
          ("entropy", "entropy (nats/token)"), ("clip_frac", "clip fraction"),
          ("vf_loss", "value loss"), ("gold_reward", "gold reward (7.1b)"),
          ("sentiment", "gold: sentiment s(y)"), ("well_formed", "gold: well-formedness g(y)"),
          ("length", "reply length (tokens)"), ("eos_rate", "EOS rate")]
fig, axes = plt.subplots(2, 5, figsize=(15, 5.5))
for ax, (column, title) in zip(axes.flat, panels, strict=True):
    for _, run in main_history.groupby("seed"):
        ax.plot(run["step"], run[column], lw=0.8, alpha=0.5, color="C0")
    mean = main_history.groupby("step")[column].mean()
    ax.plot(mean.index, mean.values, lw=2, color="C0", marker=".")
    if column in sft_means:
        ax.axhline(sft_means[column], color="k", lw=1, ls=":", label="SFT (held-out)")
    ax.set(title=title, xlabel="PPO step")
axes[0, 0].legend(fontsize=8)
fig.suptitle(rf"PPO on the sentiment task, $\beta$ = {main_beta}: training batches of "
             f"{cfg.ppo.batch_size} replies, {int(headline['seeds'])} seeds")
fig.tight_layout()
show_figure(fig, "training_curves", CHAPTER)
step_means = main_history.groupby("step")[[c for c, _ in panels]].mean()  # over seeds
first_step, last_step = step_means.index.min(), step_means.index.max()
print(f"training batches, mean over seeds, step {first_step} -> step {last_step}: "
      + "; ".join(f"{column} {step_means.loc[first_step, column]:.3g} -> "
                  f"{step_means.loc[last_step, column]:.3g}" for column, _ in panels))
length_move = step_means.loc[last_step, "length"] - step_means.loc[first_step, "length"]
eos_move = step_means.loc[last_step, "eos_rate"] - step_means.loc[first_step, "eos_rate"]
print("over training, reply length and EOS rate "
      + ("moved in opposite directions, the signature of the length bias"
         if length_move * eos_move < 0 else "did not move in opposite directions"))

# %% [markdown]
# What to read in the curves. They are the training batches (the batch size is in the title),
# so they are noisy; the held-out lines above are the measurement, and the printed lines give
# each curve's first and last step. The KL starts at 0, where the policy is the reference, and
# grows as it leaves it; the clip fraction (how often a token's ratio left
# $[1-\varepsilon, 1+\varepsilon]$ during the update) measures how far each update pushes; the
# value loss should fall as the value head learns the returns. In the bottom row, length and
# EOS rate drifting in opposite directions is the signature of the length bias (the last
# printed line says whether they did), and the gold reward and its ingredients show, noisily,
# where the held-out changes above come from.

# %% [markdown]
# Samples before and after, on held-out prompts (the main $\beta$, first seed):

# %%
main_run = next(r for r in runs.runs if r["arm"] == "recipe" and r["beta"] == main_beta)
sample_table = pd.DataFrame({
    "prompt": [m.split(": ", 1)[-1] for m in runs.eval_messages[:4]],
    "SFT reply": runs.sft_replies[:4], "gold (SFT)": runs.sft["gold_reward"][:4],
    f"PPO reply (beta {main_beta})": main_run["replies"][:4],
    "gold (PPO)": main_run["eval"]["gold_reward"][:4]})
show_table(sample_table, "samples", CHAPTER, floatfmt="{:.2f}")
sft_sentiment = torch.tensor(runs.sft["sentiment"])
flips = []  # per seed: (SFT negative and PPO positive, the reverse)
for run in runs.runs:
    if run["arm"] == "recipe" and run["beta"] == main_beta:
        ppo_sentiment = torch.tensor(run["eval"]["sentiment"])
        flips.append((int(((sft_sentiment < 0) & (ppo_sentiment > 0)).sum()),
                      int(((sft_sentiment > 0) & (ppo_sentiment < 0)).sum())))
        print(f"seed {run['seed']}: of {n_eval} held-out prompts, SFT negative and PPO positive "
              f"{flips[-1][0]}, the reverse {flips[-1][1]}")
print(f"negative-to-positive outnumbers the reverse in {sum(up > down for up, down in flips)} "
      f"of {len(flips)} seeds, the reverse outnumbers it in "
      f"{sum(up < down for up, down in flips)}")

# %% [markdown]
# Read the samples for what the means above summarise: replies cut at the limit, word salad
# that the gold's well-formedness factors only partly catch, and the sentiment of the reply to
# the same opening before and after. The counts compare, per seed, the prompts whose reply
# turned from negative to positive with those that turned the other way; both replies are
# single samples, so each count carries sampling noise, and a direction that holds in every
# seed (the last line) is the stronger evidence.

# %% [markdown]
# ### Experiment 5: the reward-KL frontier
#
# Each $\beta$ buys a different trade: small $\beta$ moves far from the reference for more
# proxy reward, large $\beta$ stays close. Plotting the held-out gold reward against the KL for
# every $\beta$ traces the frontier that 13-09 compares DPO against (Rafailov et al. 2023,
# arXiv:2305.18290, Fig. 2, do the same on IMDb). Error bars are 95% intervals over seeds; the
# SFT policy's bar is its sampling interval.

# %%
fig, (ax_gold, ax_proxy) = plt.subplots(1, 2, figsize=(10, 3.8))
by_beta = recipe.groupby("beta")
for ax, column, title in ((ax_gold, "gold_reward", "gold reward"),
                          (ax_proxy, "proxy_reward", "proxy reward")):
    sft_half = 1.96 * sft_eval[column].std() / math.sqrt(n_eval)
    ax.errorbar([0.0], [sft_means[column]], yerr=[sft_half], color="k", marker="s",
                capsize=3, label="SFT (reference)")
    points = []
    for beta, group in by_beta:
        kl, kl_half = mean_interval(group["kl"].tolist())
        y, y_half = mean_interval(group[column].tolist())
        points.append({"beta": beta, "kl": kl, "kl_half": kl_half, "y": y, "y_half": y_half})
    points = pd.DataFrame(points).sort_values("kl")
    ax.errorbar(points["kl"], points["y"], xerr=points["kl_half"], yerr=points["y_half"],
                marker="o", capsize=3, label="PPO (mean over seeds)")
    for _, row in points.iterrows():
        ax.annotate(rf"$\beta$={row['beta']:g}", (row["kl"], row["y"]), fontsize=8,
                    textcoords="offset points", xytext=(4, 3))
    ax.set(xlabel="KL(pi || pi_ref), nats per reply (held-out)", ylabel=title,
           title=f"{title} vs KL")
    ax.legend(fontsize=8)
show_figure(fig, "frontier", CHAPTER)
for beta, row in frontier.iterrows():
    print(f"beta = {beta:g}: KL {row['KL (nats/reply)']:.2f} +- {row['KL ±']:.2f} nats per "
          f"reply (95% over {int(row['seeds'])} seed(s)), gold gain {row['gold gain']:+.2f} +- "
          f"{row['SE of gain (8.15)']:.2f} (SE)")
smallest = frontier.index.min()
binds = [beta for beta, row in frontier.drop(smallest).iterrows()  # intervals apart
         if frontier.loc[smallest, "KL (nats/reply)"] - row["KL (nats/reply)"]
         > frontier.loc[smallest, "KL ±"] + row["KL ±"]]
print("the KL " + ("falls" if frontier["KL (nats/reply)"].is_monotonic_decreasing
                  else "does not fall steadily") + " as beta grows; "
      f"largest gold gain at beta = {frontier['gold gain'].idxmax():g}, smallest at beta = "
      f"{frontier['gold gain'].idxmin():g}")
print(f"ends closer to the reference than beta = {smallest:g}, with the two 95% intervals apart: "
      + (", ".join(f"beta = {beta:g}" for beta in binds) if binds else "no beta")
      + "; not resolved from it: "
      + (", ".join(f"beta = {beta:g}" for beta in frontier.index
                   if beta != smallest and beta not in binds) or "no beta"))

# %% [markdown]
# Read the frontier from left to right, with the printed lines. A larger $\beta$ should stay
# closer to the reference and gain less. The last line asks where the penalty binds: a
# $\beta$ that ends measurably closer to the reference than the smallest one (intervals apart)
# is held back by its penalty; one that is not resolved from it travelled about as far, and
# then in this short run the distance travelled is limited by the number of steps (and the
# learning rate) more than by the penalty. With few seeds the intervals are wide, so "not
# resolved" is the cautious reading, not a finding of equal KLs. With longer runs the
# small-$\beta$ policies keep moving, and Gao et al. (2022) predict where that leads: the proxy
# keeps rising and the gold turns down. The runs are stored by `rlhf_runs`, and 13-09 reads them
# to place DPO on the same axes.

# %% [markdown]
# ### Experiment 6: one stability knob on the real task
#
# The toy ablations of Experiment 3 switch off one technique at a time. On the real task we
# repeat the one whose absence matters most for a reward model with an arbitrary offset:
# reward normalisation (8.14). Without it, $\beta$ is in the reward model's raw units and the
# value head must first learn the offset of the scores. Same seed, same $\beta$, same prompts;
# the intervals are over the held-out prompts (one run each, so they hold the evaluation's
# sampling noise, not the training noise).

# %%
ablation_rows = []
for arm in ("recipe", "no reward normalisation"):
    run = next(r for r in runs.runs
               if r["arm"] == arm and r["beta"] == main_beta and r["seed"] == SEED)
    row = {"arm": arm}
    for column in ("gold_reward", "proxy_reward", "kl", "length", "eos_rate"):
        values = torch.tensor(run["eval"][column])
        row[column] = values.mean().item()
        row[column + " ±"] = 1.96 * values.std().item() / math.sqrt(len(values))
    row["final value loss"] = run["history"][-1]["vf_loss"]
    ablation_rows.append(row)
show_table(pd.DataFrame(ablation_rows).set_index("arm"), "ablation_real", CHAPTER,
           floatfmt="{:.3f}")
with_norm, without_norm = ablation_rows
print(f"without normalisation, beta = {main_beta} is in raw units, where the scores of SFT "
      f"replies to training prompts average {runs.normalizer['mean']:.3g} (std {runs.normalizer['std']:.3g}) instead of 0")
print(f"value loss at the last step: {without_norm['final value loss']:.3g} without "
      f"normalisation, {with_norm['final value loss']:.3g} with it "
      f"({without_norm['final value loss'] / with_norm['final value loss']:.2g} times)")
for column in ("gold_reward", "proxy_reward", "length", "eos_rate"):
    diff = without_norm[column] - with_norm[column]
    half = math.hypot(without_norm[column + " ±"], with_norm[column + " ±"])
    print(f"{column}: {without_norm[column]:.3g} without normalisation, {with_norm[column]:.3g} "
          f"with it (SFT {sft_means[column]:.3g}); difference {diff:+.3g} +- {half:.2g} (95%, "
          "evaluation sampling only): "
          + (("higher" if diff > 0 else "lower") + " without normalisation"
             if abs(diff) > half else "not resolved"))
gold_diff = without_norm["gold_reward"] - with_norm["gold_reward"]
gold_half = math.hypot(without_norm["gold_reward ±"], with_norm["gold_reward ±"])
print("on this seed the gold reward without normalisation is "
      + (f"{'lower' if gold_diff < 0 else 'higher'} than the recipe's beyond the evaluation's "
         "sampling error: the knob matters on the real task" if abs(gold_diff) > gold_half
         else "within the evaluation's sampling error of the recipe's"))

# %% [markdown]
# Without normalisation, the main $\beta$ is in raw reward units, where the scores have the
# offset printed above instead of 0; the value head, which starts at zero, must first learn
# that offset (the printed ratio of the last value losses). The other lines say which way the
# policy went without normalisation: its length and EOS rate, its proxy reward against the SFT
# policy's, and its gold reward against the recipe's on the same seed. The intervals are the
# evaluation's sampling error only; with one training seed per arm, a resolved difference shows
# that the knob matters on the real task, not by how much on average.
#
# ## Pitfalls
#
# - **The behaviour log-probabilities must be those of the sampling distribution.** With a
#   temperature other than 1, top-$k$ or top-$p$, the sampled tokens come from a modified
#   distribution; the ratio in (8.10) must use the same one, or it is not 1 at the start of the
#   update. We sample at temperature 1 and apply any temperature in both places.
# - **Dropout.** With dropout active, sampling and training see different networks and the
#   ratio starts away from 1; `PolicyWithValue` switches it off.
# - **Left padding without position ids.** A left-padded prompt must count positions from its
#   first real token; otherwise padded rows see shifted rotary positions and their samples (and
#   log-probabilities) differ from unpadded ones. The KV-cache check above covers this.
# - **Padding that is not masked.** Tokens after EOS must carry zero reward, zero value and no
#   loss; a value that leaks into the padding breaks $V(s_{T+1}) = 0$ in GAE. Mask with
#   `torch.where`: fully masked attention rows can produce NaN, and $0 \times$ NaN is NaN.
# - **Token means across processes or microbatches.** Divide by the token count of the whole
#   batch (the check with `accelerate launch` above); the same holds for the whitening
#   statistics.
# - **The reward model's scale.** Without normalisation, $\beta$ means a different KL budget for
#   every reward model (Experiment 3), and the value head has to chase the reward's offset.
# - **Missing EOS.** A reply cut at `max_new_tokens` is scored by a reward model that was trained
#   on complete replies. `PPOConfig.missing_eos_penalty` subtracts a constant from such replies
#   (TRL's former PPO trainer had the same option); watch the EOS rate in the log.
# - **$k_3$ is for estimating, not for free.** Its samples are non-negative and low-variance,
#   but the gradient of a $k_3$ term in the loss is not the gradient of the KL; we put $k_1$ in
#   the reward (8.4), where its sum is exactly the sequence log-ratio. 13-09 discusses GRPO's
#   choice.
#
# ## Summary
#
# - RLHF maximises reward minus $\beta$ times the KL from the reference, eq. (8.1); its optimum
#   tilts the reference by $e^{r/\beta}$, eq. (8.2), and the gap to it is $\beta$ times a KL,
#   eq. (8.3).
# - Per token, the reward is $-\beta$ times the log-ratio plus the reward model's score at the
#   last token, eq. (8.4); $k_1$ and $k_3$ are unbiased estimators of the KL, $k_3$ with less
#   variance.
# - GAE, eqs. (8.8)-(8.9), trades bias for variance with $\lambda$; the clipped surrogate (8.10)
#   and the clipped value loss (8.11) allow several epochs on one batch.
# - Our PPO converges to the closed-form optimum of a token-level problem; the adaptive
#   controller (8.13) finds the $\beta$ for a KL target; normalisation, whitening, gradient
#   clipping and a decaying learning rate each address a failure we set up, and the ablation
#   tables give each effect with its interval over seeds.
# - The update computes the same gradient on two processes as on one, because every mean and
#   every statistic is taken over the whole batch; we check the gradients in float64, since
#   AdamW amplifies float32 rounding in near-zero gradients into parameter differences.
#
# ## Exercises
#
# 1. Replace the shared trunk by a separate critic: a copy of the reward model with a value head
#    (Ouyang et al. §3.5). Compare the value loss and the gold reward at the same number of
#    steps, and the time per step.
# 2. Set $\lambda = 1$ and $\lambda = 0$ on the token-level toy problem. Which converges faster,
#    and why does the answer depend on how good the value function is?
# 3. Put $k_3$ instead of $k_1$ in the per-token reward (8.4). Does PPO still converge to the
#    optimum (8.2) of the toy problem? Compute what it converges to instead.
# 4. Give `ppo_update` several minibatches and two processes, and show that the result differs
#    from one process only through the composition of the minibatches: make both draw the same
#    global minibatches and recover equality.
# 5. Train with the gold reward itself as the reward (no reward model) and add its frontier to
#    the plot: how much of the gap between proxy and gold is due to the reward model?
#
# ## References
#
# - Schulman, Wolski, Dhariwal, Radford & Klimov (2017), *Proximal Policy Optimization
#   Algorithms*, arXiv:1707.06347, §3 (eq. 7) and §5.
# - Schulman, Moritz, Levine, Jordan & Abbeel (2015), *High-Dimensional Continuous Control Using
#   Generalized Advantage Estimation*, arXiv:1506.02438, §3.
# - Ziegler, Stiennon, Wu, Brown, Radford, Amodei, Christiano & Irving (2019), *Fine-Tuning
#   Language Models from Human Preferences*, arXiv:1909.08593, §2.2 (KL reward, adaptive
#   controller).
# - Ouyang et al. (2022), *Training language models to follow instructions with human
#   feedback*, arXiv:2203.02155, §3.5 (PPO objective, $\beta = 0.02$, value model from the
#   reward model).
# - Schulman (2020), *Approximating KL Divergence*, blog note (joschu.net), the $k_1$, $k_2$,
#   $k_3$ estimators.
# - Gao, Schulman & Hilton (2022), *Scaling Laws for Reward Model Overoptimization*,
#   arXiv:2210.10760.
# - Huang et al. (2024), *The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR
#   Summarization*, arXiv:2403.17031.
# - Huang, Dossa, Raffin, Kanervisto & Wang (2022), *The 37 Implementation Details of Proximal
#   Policy Optimization*, ICLR Blog Track; CleanRL (Huang et al. 2022, JMLR 23(274)).
# - Rafailov et al. (2023), *Direct Preference Optimization*, arXiv:2305.18290, Fig. 2.
