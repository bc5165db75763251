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
# (dpo-grpo)=
# # 13-09 DPO, GRPO and modern alignment
#
# ```{admonition} At a glance
# :class: tip
# **Prerequisites:** {ref}`reward-modeling` (13-07); 13-08 (RLHF with PPO) for the comparison.
# **Reading time:** ~12 min; the tiny profile runs in about 45 minutes on 2 CPU cores (twelve
# training runs of a 135M-parameter model, each with its held-out evaluation; 13-08's PPO runs
# are read from its cache).
# **You will build** `ftbook.dpo_grpo`: Direct Preference Optimization derived from the
# KL-regularised objective and checked against its closed-form optimum, then implemented with a
# cached reference, CS336's `per_instance_dpo_loss`, and parity with TRL's `DPOTrainer`; the GRPO
# losses and microbatch step with the contracts of Stanford CS336 Assignment 5, with the Dr. GRPO
# variants; a verifiable reward with a strict and a lenient check, GRPO (and four variants) and
# expert iteration on sums put to the chat model of Appendix C; DPO placed on 13-08's
# reward-KL frontier, read from 13-08's own runs; and the comparison of SFT, PPO, DPO and GRPO
# with their intervals, FLOPs and wall time.
# ```
#
# 13-08 optimised the learned reward of 13-07 with PPO: a value network, advantages from GAE, a
# per-token KL penalty, four models in memory. This chapter takes two shortcuts that have since
# become the default. **DPO** (Rafailov et al. 2023, arXiv:2305.18290) notices that the optimum of
# the KL-regularised objective is known in closed form, solves it for the reward, and fits the
# preferences *directly* with the policy: no reward model, no sampling, one supervised-looking
# loss. **GRPO** (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300) keeps sampling but drops the
# value network: it samples a *group* of replies per prompt and uses each reply's reward relative
# to its group as the advantage. With a reward that a program can check (the answer of an
# arithmetic problem), GRPO is the engine of *reinforcement learning with verifiable rewards*
# (RLVR) behind recent reasoning models; expert iteration, which keeps the correct samples and
# fine-tunes on them, is its simplest rival.

# %%
from ftbook.workbench import device_cell, get_device, get_profile, pick, seed_everything

CHAPTER = "13_09_dpo_grpo"
PROFILE = get_profile()
SEED = 0
seed_everything(SEED)
DEVICE = get_device()
RUN_INFO = device_cell(PROFILE, SEED, DEVICE)

# %% [markdown]
# ## Configuration
#
# One frozen configuration per profile holds every size of the chapter. The tiny profile trains
# DPO with LoRA on 13-07's preference pairs for three values of $\beta$, two seeds each, and
# places it beside 13-08's PPO runs on the same held-out prompts; and it runs GRPO (two seeds,
# and four variants) and expert iteration on sums of small numbers with the same number of
# sampled replies.

# %%
#| export
"""DPO, GRPO and expert iteration: direct preference optimisation from its derivation to a
training loop with a cached reference, the GRPO losses and microbatch step with the contracts of
Stanford CS336 Assignment 5 (Dr. GRPO variants included), a verifiable reward, expert iteration,
and the evaluation that compares SFT, PPO, DPO and GRPO on the running sentiment task.

Chapter 13-09. Rafailov et al. 2023 (arXiv:2305.18290) for DPO; Shao et al. 2024 (DeepSeekMath,
arXiv:2402.03300) for GRPO; Liu et al. 2025 (arXiv:2503.20783) for Dr. GRPO; Anthony et al. 2017
(arXiv:1705.08439), Zelikman et al. 2022 (arXiv:2203.14465) and Singh et al. 2023
(arXiv:2312.06585) for expert iteration; Lambert et al. 2024 (arXiv:2411.15124) for RLVR.
"""
import contextlib
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

# trl is imported where used (its fused-head fallback): it takes seconds to import
import torch
from torch import nn

from ftbook.instruction_tuning import (
    answer_is_correct,
    get_response_log_probs,
    masked_normalize,
    masked_sum,
    pad_prompt_and_output,
    prompt_and_output_batch,
    render_prompt,
    sample_replies,
    sft_train,
    tokenize_for_sft,
)
from ftbook.reward_modeling import (
    draw_batch,
    pairwise_accuracy,
    reward_model_text,
)
from ftbook.rlhf_ppo import kl_k3
from ftbook.workbench import StepMeter, transformer_flops


@dataclass(frozen=True)
class DPOGRPOConfig:
    """Budget and hyperparameters of chapter 13-09 (one per profile)."""

    generate_batch_size: int
    seeds: tuple[int, ...]  # the runs compared across seeds
    lora_rank: int | None  # LoRA (13-08's `adapter_copy`) for DPO, GRPO and expert iteration
    lora_layers: int | None  # on the last `lora_layers` blocks (None: all)
    # DPO on 13-07's preference pairs, evaluated on 13-08's held-out prompts
    dpo_beta: float  # the beta of the comparison
    dpo_betas: tuple[float, ...]  # the reward-KL frontier, every seed each
    dpo_steps: int
    dpo_batch_size: int  # pairs per step
    dpo_lr: float
    timing_steps: int  # steps timed with the reference cached and recomputed
    # RLVR: GRPO against expert iteration with the same number of samples
    rlvr_task: str  # "arithmetic" (13-06's synthetic problems) or "gsm8k"
    rlvr_from_sft: bool  # start from 13-06's SFT model; False: from the chat LM it started from
    rlvr_reward: str  # "strict" (verifiable_reward) or "lenient" (lenient_reward)
    rlvr_ops: str  # arithmetic operations, "+-" or "+"
    rlvr_min_operand: int
    rlvr_max_operand: int
    rlvr_train: int  # training problems
    rlvr_eval: int  # held-out problems, answered greedily
    rlvr_eval_every: int  # held-out evaluation every so many GRPO steps (and EI rounds)
    rlvr_max_new_tokens: int
    rlvr_prompts_per_step: int
    rlvr_group_size: int
    rlvr_steps: int
    rlvr_lr: float
    rlvr_epochs: int  # optimiser passes per rollout batch in the off-policy variant
    ei_rounds: int
    ei_sft_steps: int  # SFT steps per expert-iteration round
    ei_lr: float
    microbatch_size: int  # rows per backward pass (gradient accumulation)
    bf16: bool = False  # autocast the training forward passes to bfloat16 (GPU)

    def __post_init__(self) -> None:
        if self.rlvr_reward not in ("strict", "lenient"):
            raise ValueError(f"rlvr_reward must be 'strict' or 'lenient', got "
                             f"{self.rlvr_reward!r}")
        if not self.rlvr_ops or set(self.rlvr_ops) - set("+-"):
            raise ValueError(f"rlvr_ops must be made of '+' and '-', got {self.rlvr_ops!r}")
        if self.rlvr_steps % self.ei_rounds or self.rlvr_steps % self.rlvr_eval_every:
            raise ValueError("rlvr_steps must be a multiple of ei_rounds and rlvr_eval_every, "
                             "so that GRPO and expert iteration are compared at equal samples")


DPO_CONFIGS = {
    "smoke": DPOGRPOConfig(
        generate_batch_size=16, seeds=(0, 1), lora_rank=4, lora_layers=1, dpo_beta=0.1,
        dpo_betas=(0.1, 0.5), dpo_steps=3, dpo_batch_size=4, dpo_lr=1e-3, timing_steps=2,
        rlvr_task="arithmetic", rlvr_from_sft=False, rlvr_reward="lenient", rlvr_ops="+",
        rlvr_min_operand=2, rlvr_max_operand=9, rlvr_train=16, rlvr_eval=8, rlvr_eval_every=1,
        rlvr_max_new_tokens=6, rlvr_prompts_per_step=2, rlvr_group_size=4, rlvr_steps=2,
        rlvr_lr=1e-3, rlvr_epochs=2, ei_rounds=2, ei_sft_steps=2, ei_lr=1e-3,
        microbatch_size=4),
    "tiny": DPOGRPOConfig(
        generate_batch_size=64, seeds=(0, 1), lora_rank=16, lora_layers=15, dpo_beta=0.1,
        dpo_betas=(0.1, 0.3, 1.0), dpo_steps=8, dpo_batch_size=16, dpo_lr=5e-4,
        timing_steps=3, rlvr_task="arithmetic", rlvr_from_sft=False, rlvr_reward="lenient",
        rlvr_ops="+", rlvr_min_operand=2, rlvr_max_operand=49, rlvr_train=256, rlvr_eval=200,
        rlvr_eval_every=6, rlvr_max_new_tokens=16, rlvr_prompts_per_step=8, rlvr_group_size=4,
        rlvr_steps=12, rlvr_lr=5e-4, rlvr_epochs=2, ei_rounds=2, ei_sft_steps=8, ei_lr=5e-4,
        microbatch_size=16),
    "full": DPOGRPOConfig(
        generate_batch_size=256, seeds=(0, 1), lora_rank=None, lora_layers=None,
        dpo_beta=0.1, dpo_betas=(0.1, 0.3, 1.0), dpo_steps=250, dpo_batch_size=32,
        dpo_lr=1e-6, timing_steps=10, rlvr_task="gsm8k", rlvr_from_sft=True,
        rlvr_reward="strict", rlvr_ops="+-", rlvr_min_operand=0, rlvr_max_operand=99,
        rlvr_train=7473, rlvr_eval=200, rlvr_eval_every=5, rlvr_max_new_tokens=256,
        rlvr_prompts_per_step=32, rlvr_group_size=8, rlvr_steps=10, rlvr_lr=1e-6,
        rlvr_epochs=2, ei_rounds=2, ei_sft_steps=100, ei_lr=1e-6, microbatch_size=16,
        bf16=True),
}


# %%
cfg = pick(PROFILE, DPO_CONFIGS)
print(cfg)

# %% [markdown]
# ## DPO from first principles
#
# ### The objective and its optimum
#
# RLHF maximises reward while staying close to the reference policy $\pi_\text{ref}$ (the SFT
# model), eq. (8.1) of 13-08:
#
# $$
# \max_{\pi}\; \mathbb{E}_{x \sim \mathcal{D}}\Big[\,\mathbb{E}_{y \sim \pi(\cdot \mid x)}\,
# r(x, y) - \beta\, \mathrm{KL}\big(\pi(\cdot \mid x)\,\|\,\pi_\text{ref}(\cdot \mid x)\big)\Big].
# \tag{9.1}
# $$
#
# 13-08 showed that, prompt by prompt, (9.1) is maximised by a tilted reference policy,
#
# $$
# \pi^*(y \mid x) = \frac{1}{Z(x)}\, \pi_\text{ref}(y \mid x)\, e^{r(x, y) / \beta},
# \qquad Z(x) = \sum_y \pi_\text{ref}(y \mid x)\, e^{r(x, y)/\beta},
# \tag{9.2}
# $$
#
# because the objective equals $\beta \log Z(x) - \beta\,\mathrm{KL}(\pi \,\|\, \pi^*)$, eq. (8.3).
# PPO never computes $Z$: the sum runs over every possible reply. DPO never needs it either, for a
# different reason.
#
# ### The reward reparameterisation
#
# Take the logarithm of (9.2) and solve for the reward:
#
# $$
# r(x, y) = \beta \log \frac{\pi^*(y \mid x)}{\pi_\text{ref}(y \mid x)} + \beta \log Z(x).
# \tag{9.3}
# $$
#
# Every reward function is, up to a term that depends on the prompt alone, $\beta$ times the
# log-ratio of *its own* optimal policy to the reference. The Bradley-Terry model of 13-07,
# eq. (7.1), only ever looks at reward *differences* between two replies to the same prompt, and
# there the unknowable $\beta \log Z(x)$ cancels:
#
# $$
# p^*(y_w \succ y_l \mid x) = \sigma\Big(\beta \log \frac{\pi^*(y_w \mid x)}{\pi_\text{ref}(y_w \mid x)}
# - \beta \log \frac{\pi^*(y_l \mid x)}{\pi_\text{ref}(y_l \mid x)}\Big).
# \tag{9.4}
# $$
#
# ### The DPO loss
#
# Equation (9.4) is a likelihood for the preference data written in terms of a policy. Replace
# $\pi^*$ by the policy $\pi_\theta$ we train and maximise the likelihood of the observed
# preferences, exactly as the reward model of 13-07 did with eq. (7.2):
#
# $$
# \mathcal{L}_\text{DPO}(\theta) = -\,\mathbb{E}_{(x, y_w, y_l) \sim \mathcal{D}}
# \log \sigma\big(\hat r_\theta(x, y_w) - \hat r_\theta(x, y_l)\big),
# \qquad \hat r_\theta(x, y) = \beta \log \frac{\pi_\theta(y \mid x)}{\pi_\text{ref}(y \mid x)}.
# \tag{9.5}
# $$
#
# $\hat r_\theta$ is the *implicit reward*: the reward for which $\pi_\theta$ is optimal. Fitting
# the reward model and solving (9.1) collapse into one maximum-likelihood problem, and the policy
# is the reward model ("your language model is secretly a reward model"). At $\pi_\theta =
# \pi_\text{ref}$ both implicit rewards are 0 and the loss is $\ln 2 = 0.6931$. Its gradient is
#
# $$
# \nabla_\theta \mathcal{L}_\text{DPO} = -\beta\, \mathbb{E}\Big[\sigma\big(\hat r_\theta(x, y_l)
# - \hat r_\theta(x, y_w)\big)\big(\nabla_\theta \log \pi_\theta(y_w \mid x)
# - \nabla_\theta \log \pi_\theta(y_l \mid x)\big)\Big]:
# \tag{9.6}
# $$
#
# raise the chosen reply, lower the rejected one, each pair weighted by how wrongly the implicit
# reward currently ranks it. Pairs it already ranks well barely count, which is what keeps DPO from
# pushing the likelihoods apart forever, and also why it can still drift: nothing in (9.6) keeps
# $\log \pi_\theta(y_w)$ itself from falling, as long as $\log \pi_\theta(y_l)$ falls faster.
#
# A first check, of (9.3) and (9.4): on six replies with a reward that carries an arbitrary
# offset, the reward minus $\beta \log(\pi^* / \pi_\text{ref})$ is one constant, $\beta \log Z$,
# and the preference probabilities computed from $\pi^*$ equal those computed from the reward.
# (The loss at the reference and the gradient (9.6) are checked once `dpo_loss` exists, below.)

# %%
generator = torch.Generator().manual_seed(0)
K, beta_check = 6, 0.5
log_ref = torch.log_softmax(torch.randn(K, generator=generator, dtype=torch.float64), 0)
reward = torch.randn(K, generator=generator, dtype=torch.float64) + 3.0  # any offset
log_opt = torch.log_softmax(log_ref + reward / beta_check, 0)  # eq. (9.2)
implied = beta_check * (log_opt - log_ref)  # eq. (9.3) without beta log Z
gap = (torch.sigmoid(implied[:, None] - implied[None, :])
       - torch.sigmoid(reward[:, None] - reward[None, :])).abs().max().item()
print(f"eq. (9.3): reward - beta log(pi*/pi_ref) = {(reward - implied).min():.6f} .. "
      f"{(reward - implied).max():.6f} (the constant beta log Z = "
      f"{beta_check * torch.logsumexp(log_ref + reward / beta_check, 0):.6f})")
print(f"eq. (9.4): max |P(i > j) from pi* - P(i > j) from r| = {gap:.2e}")
# float64: values below 12 in a few operations, so rounding is ~1e-14 ((A.1)); 1e-9 leaves 1e5
assert torch.allclose(reward - implied, (reward - implied).mean().expand(K), rtol=0, atol=1e-9)
assert gap < 1e-9

# %% [markdown]
# ### DPO converges to the optimum: a problem with every reply enumerated
#
# With a finite set of $K$ replies to one prompt, a *tabular* policy $\pi_\theta = \mathrm{softmax}
# (\theta)$ can represent every distribution, and the expected DPO loss over a preference
# distribution can be written down exactly: if the pair $\{i, j\}$ is shown to the labeller with
# probability proportional to $q_{ij} = q_{ji}$ and $i$ wins with the Bradley-Terry probability
# $\sigma(r_i - r_j)$, the ordered pair (chosen $i$, rejected $j$) has weight
# $w_{ij} \propto q_{ij}\,\sigma(r_i - r_j)$. The loss
# (9.5) is convex in $\theta$ (the implicit-reward differences are linear in $\theta$; the softmax
# normaliser cancels), so minimising it finds the global optimum, and (9.4) says what that is:
# $\pi^* \propto \pi_\text{ref} e^{r/\beta}$ whenever every pair has a chance of being compared.
# `tabular_dpo_fit` minimises the loss with L-BFGS in float64, starting from $\pi_\text{ref}$ as
# DPO does; it calls the same `dpo_loss` the language-model trainer uses (defined below).

# %%
#| export
def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. (9.5) per pair (Rafailov et al. 2023, arXiv:2305.18290, eq. 7): -log sigmoid of the
    difference of the implicit rewards beta (log pi_theta - log pi_ref), with `logsigmoid` (finite
    for any margin). Inputs are summed reply log-probabilities, each (batch,). Returns
    (losses (batch,), chosen_rewards (batch,), rejected_rewards (batch,)), the rewards detached."""
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    shapes = {tuple(t.shape) for t in (policy_chosen_logps, policy_rejected_logps,
                                        ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"the four log-probability tensors must share one (batch,) shape, got "
                         f"{sorted(shapes)}")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)  # (batch,)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    losses = -nn.functional.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def tabular_dpo_fit(ref_logps: torch.Tensor, preference_weights: torch.Tensor, beta: float,
                    max_iter: int = 2000, tol: float = 1e-12) -> torch.Tensor:
    """Minimise the expected DPO loss (9.5) over a tabular policy log pi = log_softmax(theta) on
    K replies, starting at pi_ref. `preference_weights` (K, K): w[i, j] = probability that a
    training pair has chosen reply i and rejected reply j (population or empirical). L-BFGS in
    float64 on u = beta theta (the implicit-reward scale, which keeps the conditioning
    independent of beta); returns log pi (K,)."""
    ref_logps = ref_logps.double()  # (K,)
    weights = preference_weights.double()
    K = ref_logps.shape[0]
    if ref_logps.dim() != 1 or weights.shape != (K, K):
        raise ValueError(f"need ref_logps (K,) and preference_weights (K, K), got "
                         f"{tuple(ref_logps.shape)} and {tuple(weights.shape)}")
    if bool((weights < 0).any()):
        raise ValueError("preference weights must be non-negative")
    chosen, rejected = (i.flatten() for i in torch.meshgrid(torch.arange(K), torch.arange(K),
                                                           indexing="ij"))
    scaled = (beta * ref_logps).requires_grad_(True)  # u = beta theta
    optimizer = torch.optim.LBFGS([scaled], lr=1.0, max_iter=max_iter, tolerance_grad=tol,
                                  tolerance_change=0.0, history_size=50,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        log_pi = torch.log_softmax(scaled / beta, 0)
        losses, _, _ = dpo_loss(log_pi[chosen], log_pi[rejected], ref_logps[chosen],
                                ref_logps[rejected], beta)
        loss = (weights.flatten() * losses).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return torch.log_softmax(scaled.detach() / beta, 0)


# %% [markdown]
# Pairs are shown with probability $q_{ij} \propto \pi_\text{ref}(i)\,\pi_\text{ref}(j)$ (two
# samples of the reference, as in our preference data), for three values of $\beta$:

# %%
import pandas as pd

from ftbook.workbench import show_table

pair_probs = log_ref.exp()[:, None] * log_ref.exp()[None, :]
pair_probs = pair_probs * (1 - torch.eye(K, dtype=torch.float64))  # two different replies
pair_probs = pair_probs / pair_probs.sum()
win = torch.sigmoid(reward[:, None] - reward[None, :])  # Bradley-Terry, eq. (7.1)
toy_rows = []
for beta_toy in (0.1, 0.5, 2.0):
    log_dpo = tabular_dpo_fit(log_ref, pair_probs * win, beta_toy)
    log_star = torch.log_softmax(log_ref + reward / beta_toy, 0)  # eq. (9.2)
    toy_rows.append({"beta": beta_toy,
                     "max |pi_DPO - pi*|": (log_dpo.exp() - log_star.exp()).abs().max().item(),
                     "KL(pi_DPO || pi*)": (log_dpo.exp() * (log_dpo - log_star)).sum().item(),
                     "KL(pi* || pi_ref)": (log_star.exp() * (log_star - log_ref)).sum().item(),
                     "E_pi*[r] - E_ref[r]": ((log_star.exp() - log_ref.exp()) * reward).sum().item()})
toy_table = pd.DataFrame(toy_rows).set_index("beta")
show_table(toy_table, "toy_optimum", CHAPTER, floatfmt="{:.3g}")
# a known answer: L-BFGS in float64 with a gradient tolerance of 1e-12 on a smooth convex
# problem lands within ~1e-11 of it, 1e5 below the threshold
assert (toy_table["max |pi_DPO - pi*|"] < 1e-6).all()

# %% [markdown]
# DPO lands on $\pi^*$ to optimiser precision for every $\beta$, and $\beta$ sets how far $\pi^*$
# moves from the reference: small $\beta$, large KL and reward. With a *finite* sample of pairs the
# minimiser is that of the empirical preferences; it approaches $\pi^*$ as the sample grows, at the
# $1/\sqrt{N}$ rate of a maximum-likelihood estimate:

# %%
finite_rows = []
flat = pair_probs.flatten()
log_star = torch.log_softmax(log_ref + reward / 0.5, 0)
for n_pairs in (1_000, 10_000, 100_000):
    errors = []
    for _ in range(5):  # repetitions with fresh samples
        sample = torch.multinomial(flat, n_pairs, replacement=True, generator=generator)
        first, second = sample // K, sample % K
        first_wins = (torch.rand(n_pairs, generator=generator, dtype=torch.float64)
                      < win[first, second])
        chosen_idx = torch.where(first_wins, first, second)
        rejected_idx = torch.where(first_wins, second, first)
        counts = torch.zeros(K, K, dtype=torch.float64)
        counts.index_put_((chosen_idx, rejected_idx), torch.ones(n_pairs, dtype=torch.float64),
                          accumulate=True)
        log_hat = tabular_dpo_fit(log_ref, counts / n_pairs, 0.5)
        errors.append((log_hat.exp() - log_star.exp()).abs().max().item())
    mean_error = sum(errors) / len(errors)
    finite_rows.append({"pairs N": n_pairs, "mean max |pi_DPO - pi*| (5 samples)": mean_error,
                        "x sqrt(N)": mean_error * math.sqrt(n_pairs)})
show_table(pd.DataFrame(finite_rows).set_index("pairs N"), "toy_finite", CHAPTER, floatfmt="{:.3g}")

# %% [markdown]
# The gradient (9.6) against autograd, and the loss at the reference:

# %%
policy_w = torch.randn(5, dtype=torch.float64, requires_grad=True)  # log pi_theta(y_w), 5 pairs
policy_l = torch.randn(5, dtype=torch.float64, requires_grad=True)  # log pi_theta(y_l)
ref_w, ref_l = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
losses, chosen_rewards, rejected_rewards = dpo_loss(policy_w, policy_l, ref_w, ref_l, beta_check)
losses.sum().backward()
weight = torch.sigmoid(rejected_rewards - chosen_rewards)  # eq. (9.6)
# float64: allclose's default relative tolerance 1e-5 is ~1e10 times the rounding of these few
# operations, and far below a wrong formula
assert torch.allclose(policy_w.grad, -beta_check * weight)
assert torch.allclose(policy_l.grad, beta_check * weight)
at_ref, _, _ = dpo_loss(ref_w, ref_l, ref_w, ref_l, beta_check)
print(f"loss at pi_theta = pi_ref: {at_ref.mean():.4f} (ln 2 = {math.log(2):.4f}); "
      f"eq. (9.6) matches autograd")
assert torch.allclose(at_ref, torch.full_like(at_ref, math.log(2)))

# %% [markdown]
# ## DPO for language models
#
# For a language model, $\log \pi_\theta(y \mid x)$ is the sum of the log-probabilities of the
# reply's tokens given the prompt and the tokens before them, so the loss needs four such sums per
# pair: policy and reference, chosen and rejected. The pieces, bottom-up as in the DPO notebook of
# *LLMs from scratch*:
#
# 1. **Encoding.** A record of 13-07 holds the user message and two reply texts. The prompt is
#    rendered with the book's chat template (13-06's `render_prompt`), each reply gets the EOS token
#    appended, and prompt + reply is tokenized *as one string* (13-07's `reward_model_text`, the very
#    text the reward model read), with the prompt's tokens located at its start, as in 13-06 and
#    TRL. (CS336 formats DPO examples with the Alpaca template; we use the chat template the SFT
#    model was trained with.) The EOS must carry log-probability: a policy that is not rewarded for
#    stopping learns to ramble.
# 2. **Batches.** $B$ pairs become $2B$ right-padded rows, the chosen replies first, then the
#    rejected ones, with a `response_mask` on the reply tokens: the layout of TRL's
#    `DataCollatorForPreference`. One forward pass scores all $2B$.
# 3. **Sequence log-probabilities** with 13-06's `get_response_log_probs` (position $t$ predicts
#    token $t + 1$) and its `masked_sum` over the reply tokens.
# 4. **The reference is frozen**, so its log-probabilities are a property of the data: compute them
#    once before training and store two numbers per pair. That halves the forward passes of a step
#    and frees the reference model's memory (TRL's `precompute_ref_log_probs`).

# %%
#| export
from ftbook.reward_modeling import validate_preference_records


def encode_dpo_pair(tokenizer: Any, prompt: str, chosen: str, rejected: str,
                    max_len: int | None = None, where: str = "pair"
                    ) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids) of one preference pair: the user message `prompt`
    in the chat template (`render_prompt`), each reply stripped and followed by EOS; prompt +
    reply is tokenized as one string (`reward_model_text`) and the prompt's tokens must be its
    prefix. A pair whose longer side exceeds `max_len` tokens is an error naming `where`."""
    prompt_ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    replies = []
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(reply, str) or not reply.strip():
            raise ValueError(f"{where}, field {name!r}: the reply must be a non-empty string")
        full = tokenizer(reward_model_text(tokenizer, prompt, reply),
                         add_special_tokens=False)["input_ids"]
        if full[:len(prompt_ids)] != prompt_ids:
            raise ValueError(f"{where}, field {name!r}: the prompt's tokens change when the reply "
                             "follows; the chat template must end the prompt on a token boundary")
        if max_len is not None and len(full) > max_len:
            raise ValueError(f"{where}, field {name!r}: {len(full)} tokens with the prompt, more "
                             f"than max_len={max_len}")
        replies.append(full[len(prompt_ids):])
    return prompt_ids, replies[0], replies[1]


def encode_dpo_pairs(tokenizer: Any, records: Sequence[dict], max_len: int | None = None
                     ) -> list[tuple[list[int], list[int], list[int]]]:
    """`encode_dpo_pair` for every record {"prompt", "chosen", "rejected"} (13-07's format)."""
    records = validate_preference_records(records, "DPO preference records")
    return [encode_dpo_pair(tokenizer, r["prompt"], r["chosen"], r["rejected"], max_len,
                            f"record {i}") for i, r in enumerate(records)]


def collate_dpo(examples: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
                pad_token_id: int) -> dict[str, torch.Tensor]:
    """(2B, T) right-padded `input_ids`, `attention_mask` and `response_mask` (true on the reply
    tokens): the B chosen sequences, then the B rejected ones (TRL's layout)."""
    if not examples:
        raise ValueError("no preference pairs to collate")
    prompts = [p for p, _, _ in examples] * 2
    replies = [c for _, c, _ in examples] + [r for _, _, r in examples]
    return pad_prompt_and_output(prompts, replies, pad_token_id)  # 13-06


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(rows,) summed log pi(reply | prompt) of a `collate_dpo` batch (right padding, so no
    attention mask is needed: no real token attends to a later pad)."""
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    token_logps = get_response_log_probs(model, input_ids[:, :-1],
                                         input_ids[:, 1:])["log_probs"]  # (rows, T - 1)
    mask = batch["response_mask"][:, 1:].to(device)
    return masked_sum(token_logps, mask, dim=-1)


def per_instance_dpo_loss(lm: nn.Module, lm_ref: nn.Module, tokenizer: Any, beta: float,
                          prompt: str, response_chosen: str, response_rejected: str
                          ) -> torch.Tensor:
    """CS336 A5 (`run_compute_per_instance_dpo_loss`): the DPO loss (9.5) of one pair, a scalar
    with a gradient for `lm`. `prompt` is the user message (rendered with the chat template, not
    CS336's Alpaca template); EOS is appended to both responses. `lm` and `lm_ref` may sit on
    different devices."""
    example = encode_dpo_pair(tokenizer, prompt, response_chosen, response_rejected)
    batch = collate_dpo([example], tokenizer.pad_token_id)
    policy_logps = sequence_logps(lm, batch)  # (2,): chosen, rejected
    with torch.no_grad():
        ref_logps = sequence_logps(lm_ref, batch).to(policy_logps.device)
    losses, _, _ = dpo_loss(policy_logps[:1], policy_logps[1:], ref_logps[:1], ref_logps[1:],
                            beta)
    return losses[0]


def batch_flops(model: nn.Module, lengths: Sequence[int], batch_size: int, training: bool
                ) -> float:
    """Model FLOPs (workbench eqs. A.1-A.3) of passing sequences of `lengths` through `model` in
    consecutive batches of `batch_size`, each padded to its longest sequence."""
    total = 0.0
    for i in range(0, len(lengths), batch_size):
        chunk = lengths[i:i + batch_size]
        total += transformer_flops(model, len(chunk), max(chunk), training=training)
    return total


@torch.no_grad()
def precompute_reference_logps(ref_model: nn.Module,
                               examples: Sequence[tuple[Sequence[int], ...]], pad_token_id: int,
                               batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(ref_chosen_logps, ref_rejected_logps), each (pairs,) float32 on the CPU: one pass of the
    frozen reference over the data, done once before training."""
    ref_model.eval()
    chosen, rejected = [], []
    for i in range(0, len(examples), batch_size):
        logps = sequence_logps(ref_model, collate_dpo(examples[i:i + batch_size],
                                                          pad_token_id)).float().cpu()
        c, r = logps.chunk(2)
        chosen.append(c)
        rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)


# %% [markdown]
# Quick checks on a random tiny Llama and the profile's tokenizer: the encoding ends each reply
# with EOS inside the response mask; `per_instance_dpo_loss` is $\ln 2$ when policy and reference
# coincide and equals the batched computation otherwise; the loss is finite with a gradient at
# margins of $\pm 10^4$ nats, where `-log(sigmoid(.))` overflows.

# %%
import copy

from transformers import LlamaConfig, LlamaForCausalLM

from ftbook.base_models import load_causal_lm_tokenizer
from ftbook.instruction_tuning import REVIEW_PROMPT
from ftbook.rlhf_ppo import forward_tolerance  # 13-08

lm_tokenizer = load_causal_lm_tokenizer(PROFILE)  # the causal LM's tokenizer, pad != EOS
torch.manual_seed(0)
toy_lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(lm_tokenizer), hidden_size=32,
                                      intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      pad_token_id=lm_tokenizer.pad_token_id,
                                      attn_implementation="eager"))
toy_ref_model = copy.deepcopy(toy_lm)
with torch.no_grad():
    for p in toy_lm.parameters():
        p.add_(0.02 * torch.randn_like(p))
prompt_text = REVIEW_PROMPT.format(opening="the acting is")
example = encode_dpo_pair(lm_tokenizer, prompt_text, "superb and moving.", "a chore.")
toy_batch = collate_dpo([example], lm_tokenizer.pad_token_id)
last = int(toy_batch["response_mask"][0].nonzero().max())
assert toy_batch["input_ids"][0, last].item() == lm_tokenizer.eos_token_id
same = per_instance_dpo_loss(toy_ref_model, toy_ref_model, lm_tokenizer, 0.1, prompt_text,
                             "superb and moving.", "a chore.")
loss_one = per_instance_dpo_loss(toy_lm, toy_ref_model, lm_tokenizer, 0.1, prompt_text,
                                 "superb and moving.", "a chore.")
logps, ref_logps = sequence_logps(toy_lm, toy_batch), sequence_logps(toy_ref_model, toy_batch)
batched, _, _ = dpo_loss(logps[:1], logps[1:], ref_logps[:1], ref_logps[1:], 0.1)
print(f"per-instance DPO loss: {same.item():.4f} with pi = pi_ref, {loss_one.item():.6f} after a "
      f"perturbation (batched: {batched.item():.6f})")
# the same float32 arithmetic on the same batch (exact), and ln 2 in float32 (within 1e-7)
assert abs(same.item() - math.log(2)) < 1e-6 and abs(loss_one.item() - batched.item()) < 1e-6
for margin in (-1e4, 1e4):
    logp_w = torch.tensor([margin], requires_grad=True)
    extreme, _, _ = dpo_loss(logp_w, torch.zeros(1), torch.zeros(1), torch.zeros(1), 1.0)
    extreme.sum().backward()
    naive = -torch.log(torch.sigmoid(torch.tensor(margin)))
    print(f"margin {margin:+.0e}: loss {extreme.item() + 0.0:.4g}, gradient "
          f"{logp_w.grad.item() + 0.0:.4g} (-log(sigmoid(.)) gives {naive.item() + 0.0})")
    assert torch.isfinite(extreme).all() and torch.isfinite(logp_w.grad).all()

# %% [markdown]
# ### The training loop
#
# `dpo_train` draws pairs in seeded, reshuffled epochs (13-07's `draw_batch`) and minimises (9.5)
# with AdamW, a linear warmup and decay, and gradient clipping (the recipe of 13-07's reward model). The reference
# enters either as cached log-probabilities or as a model that is run on every batch; the two give
# the same numbers up to rounding, and the second exists only to measure what the cache saves. Beside the loss it
# logs what the DPO literature watches: the implicit rewards of chosen and rejected replies, their
# margin and the fraction of pairs ranked correctly (TRL's `rewards/*` metrics), and the model
# FLOPs of each step. Appendix A's `StepMeter` keeps the books (step time, FLOPs, one row per
# step, the check that the loss is finite), so the loop body shows only the four steps of DPO.

# %%
#| export
from ftbook.base_models import schedule_factor  # Appendix C


@dataclass
class DPOLog:
    """What `dpo_train` measured, one entry per step."""

    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)  # implicit reward ranks the pair right
    margins: list[float] = field(default_factory=list)  # mean chosen - rejected implicit reward
    chosen_rewards: list[float] = field(default_factory=list)
    rejected_rewards: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    flops: float = 0.0  # model FLOPs of the training steps (reference passes included)


def dpo_train(policy: nn.Module, examples: Sequence[tuple[Sequence[int], ...]], *, beta: float,
              steps: int, batch_size: int, lr: float, pad_token_id: int, seed: int,
              ref_logps: tuple[torch.Tensor, torch.Tensor] | None = None,
              ref_model: nn.Module | None = None, warmup_ratio: float = 0.1,
              weight_decay: float = 0.0, max_grad_norm: float = 1.0, bf16: bool = False,
              desc: str = "DPO") -> DPOLog:
    """Minimise eq. (9.5) over `examples` (prompt_ids, chosen_ids, rejected_ids) with AdamW, a
    linear warmup and decay, and gradient clipping (Rafailov et al. 2023, arXiv:2305.18290).
    Pass the reference either as `ref_logps` = (ref_chosen_logps, ref_rejected_logps) from
    `precompute_reference_logps` (cached) or as `ref_model` (recomputed on every batch)."""
    if (ref_logps is None) == (ref_model is None):
        raise ValueError("pass exactly one of ref_logps (cached) and ref_model (recomputed)")
    if not examples:
        raise ValueError("no training pairs")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got {steps} and {batch_size}")
    if ref_logps is not None and any(len(t) != len(examples) for t in ref_logps):
        raise ValueError(f"ref_logps hold {[len(t) for t in ref_logps]} pairs, the data "
                         f"{len(examples)}")
    device = next(policy.parameters()).device
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    warmup = round(warmup_ratio * steps)
    order: list[int] = []
    meter = StepMeter(desc)  # step time, model FLOPs, one row per step (Appendix A)
    for step in meter.steps(steps):
        rows = draw_batch(order, len(examples), batch_size, generator)  # 1. a batch of pairs
        batch = collate_dpo([examples[i] for i in rows], pad_token_id)
        width = batch["input_ids"].shape[1]
        if ref_logps is not None:  # 2. the reference's log-probabilities, cached ...
            ref_chosen = ref_logps[0][rows].to(device)
            ref_rejected = ref_logps[1][rows].to(device)
        else:  # ... or recomputed
            with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                ref_chosen, ref_rejected = sequence_logps(ref_model, batch).float().chunk(2)
            meter.flops += transformer_flops(ref_model, 2 * batch_size, width, training=False)
        for group in optimizer.param_groups:
            group["lr"] = lr * schedule_factor("linear", step, steps, warmup)
        policy.train()
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):  # 3. the policy's too
            policy_chosen, policy_rejected = sequence_logps(policy, batch).float().chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected,
                                                            ref_chosen, ref_rejected, beta)
        loss = losses.mean()  # 4. eq. (9.5); one clipped AdamW step
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.flops += transformer_flops(policy, 2 * batch_size, width, training=True)
        meter.record(step, {"loss": loss.item(),
                            "accuracy": pairwise_accuracy(chosen_rewards, rejected_rewards),
                            "margin": (chosen_rewards - rejected_rewards).mean().item(),
                            "chosen_reward": chosen_rewards.mean().item(),
                            "rejected_reward": rejected_rewards.mean().item()})
    policy.eval()
    return DPOLog(losses=meter.column("loss"), accuracies=meter.column("accuracy"),
                  margins=meter.column("margin"), chosen_rewards=meter.column("chosen_reward"),
                  rejected_rewards=meter.column("rejected_reward"),
                  step_seconds=meter.column("seconds"), flops=meter.flops)


@torch.no_grad()
def evaluate_dpo_pairs(policy: nn.Module, examples: Sequence[tuple[Sequence[int], ...]],
                       ref_logps: tuple[torch.Tensor, torch.Tensor], beta: float,
                       pad_token_id: int, batch_size: int = 32) -> dict[str, float]:
    """Held-out DPO `loss`, implicit-reward `accuracy` (ties count one half, as in 13-07) and
    mean `margin` on preference pairs."""
    policy.eval()
    chosen, rejected = [], []
    for i in range(0, len(examples), batch_size):
        c, r = sequence_logps(policy, collate_dpo(examples[i:i + batch_size], pad_token_id)
                                  ).float().cpu().chunk(2)
        chosen.append(c)
        rejected.append(r)
    losses, chosen_rewards, rejected_rewards = dpo_loss(torch.cat(chosen), torch.cat(rejected),
                                                        *ref_logps, beta)
    return {"loss": losses.mean().item(),
            "accuracy": pairwise_accuracy(chosen_rewards, rejected_rewards),
            "margin": (chosen_rewards - rejected_rewards).mean().item()}


# %% [markdown]
# A check that the loop learns: on eight pairs from the tiny random Llama, a few dozen steps drive
# the training loss well below $\ln 2$ and rank every pair correctly. And a check of the cache:
# the cached reference log-probabilities (all pairs in one batch) equal those recomputed in the
# training batches of four pairs, to the rounding of two float32 forward passes over differently
# shaped batches (`forward_tolerance` of 13-08, per token, times the reply length). The cached
# and the recomputed runs therefore start from the same loss; after that, AdamW can turn rounding
# differences in near-zero gradients into steps of order the learning rate (13-08), so the gap
# over all steps is printed, not asserted.

# %%
toy_records = [{"prompt": REVIEW_PROMPT.format(opening=o), "chosen": c, "rejected": r}
               for o, c, r in [("the film", "is a delight.", "is a mess."),
                               ("its story", "soars.", "drags."),
                               ("the cast", "shines throughout.", "sleepwalks."),
                               ("this movie", "is wonderful.", "is awful."),
                               ("the script", "sparkles with wit.", "is lazy."),
                               ("every scene", "glows.", "bores."),
                               ("the director", "has a gift.", "lost the plot."),
                               ("the ending", "moved me.", "fell flat.")]]
toy_examples = encode_dpo_pairs(lm_tokenizer, toy_records)
toy_ref_logps = precompute_reference_logps(toy_ref_model, toy_examples, lm_tokenizer.pad_token_id)
toy_logs = {}
for mode in ("cached", "recomputed"):
    toy_policy = copy.deepcopy(toy_ref_model)
    reference = {"ref_logps": toy_ref_logps} if mode == "cached" else {"ref_model": toy_ref_model}
    toy_logs[mode] = dpo_train(toy_policy, toy_examples, beta=0.5, steps=30, batch_size=4,
                               lr=3e-3, pad_token_id=lm_tokenizer.pad_token_id, seed=0,
                               desc=f"toy DPO ({mode})", **reference)
toy_gap = max(abs(a - b) for a, b in zip(toy_logs["cached"].losses,
                                         toy_logs["recomputed"].losses, strict=True))
toy_eval = evaluate_dpo_pairs(toy_policy, toy_examples, toy_ref_logps, 0.5,
                              lm_tokenizer.pad_token_id)
with torch.no_grad():
    fours = [collate_dpo(toy_examples[i:i + 4], lm_tokenizer.pad_token_id)
             for i in range(0, len(toy_examples), 4)]
    recomputed_ref = [torch.cat(parts) for parts in zip(
        *(sequence_logps(toy_ref_model, b).chunk(2) for b in fours), strict=True)]
    whole = collate_dpo(toy_examples, lm_tokenizer.pad_token_id)
    ref_tol = forward_tolerance(toy_ref_model, {"input_ids": whole["input_ids"][:, :-1]})["logp"] * \
        int(whole["response_mask"].sum(1).max())  # per token, times the longest reply
cache_gap = max((c - r).abs().max().item()
                for c, r in zip(toy_ref_logps, recomputed_ref, strict=True))
print(f"toy DPO: loss {toy_logs['cached'].losses[0]:.4f} -> {toy_logs['cached'].losses[-1]:.4f}; "
      f"accuracy after training {toy_eval['accuracy']:.2f}; max |cached - recomputed| reference "
      f"log-probability {cache_gap:.1e} (tolerance {ref_tol:.1e}); loss at the first step "
      f"{abs(toy_logs['cached'].losses[0] - toy_logs['recomputed'].losses[0]):.1e}, over all "
      f"steps {toy_gap:.1e}")
# it learns, by a wide margin: over seeds 0-7 the last training loss and the loss over all
# pairs stayed below 0.003 (threshold 0.35); one misranked pair alone costs ln 2 / 8 = 0.087
assert toy_logs["cached"].losses[-1] < 0.5 * math.log(2) and toy_eval["accuracy"] == 1.0
assert cache_gap <= ref_tol

# %% [markdown]
# ## Parity with TRL's `DPOTrainer`
#
# We give TRL 1.15's `DPOTrainer` the same pairs as text rendered with the chat template: the
# prompt up to the assistant header (`render_prompt`), and each reply up to and including the end
# of turn (what `reward_model_text` adds to the prompt). Given conversations instead, TRL renders
# whole turns, and a template that writes something after the end of turn (ChatML's newline,
# Qwen2.5's in the full profile) becomes part of TRL's completion, a token we do not train
# (13-06 ends the loss at the end of turn); from the rendered text TRL tokenizes exactly our
# sequences. We compare, on its own tokenized and collated batch: the token ids, the
# precomputed reference log-probabilities (`precompute_ref_log_probs=True`, TRL's cache), and
# the loss of `compute_loss` against ours.
#
# One obstacle: TRL 1.15 computes per-token log-probabilities through a "fused LM head" whose
# kernel (`trl.kernels.ChunkedLogProbFunction`) is written in Triton, which a CPU-only PyTorch does
# not ship; TRL then sets the kernel to `None`, and `compute_loss` fails. `trl_fused_head_fallback`
# swaps in `TorchChunkedLogProb`, the same computation in plain PyTorch (project the selected hidden
# states with the LM head, `log_softmax`, gather); the comparison runs on the CPU, so we swap it in
# even where Triton exists (`force=True`), and a GPU run would leave the real kernel alone. Everything
# else, the data pipeline, the collator, the loss and its metrics, is TRL's own code. (TRL 1.15's
# `DPOConfig` also defaults to `bf16=True`; we switch it off to compare in float32.)

# %%
#| export
class TorchChunkedLogProb:
    """A plain-PyTorch stand-in for TRL's Triton `ChunkedLogProbFunction` (TRL 1.15): per-token
    log-probabilities of `targets` under `hidden @ weight.T (+ bias)`, scaled, soft-capped and
    divided by the temperature, plus the optional outputs TRL's trainers log. Same arguments and
    return tuple (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)."""

    @staticmethod
    def apply(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              targets: torch.Tensor, temperature: float, chunk_size: int,
              final_logit_softcapping: float | None = None, logit_scale: float = 1.0,
              outputs: Sequence[str] = ("log_probs",)) -> tuple[torch.Tensor | None, ...]:
        logits = hidden @ weight.t()  # (N, V)
        if bias is not None:
            logits = logits + bias
        logits = logits * logit_scale
        if final_logit_softcapping is not None:
            logits = final_logit_softcapping * torch.tanh(logits / final_logit_softcapping)
        logits = logits.float() / temperature
        logps_all = torch.log_softmax(logits, dim=-1)
        logps = logps_all.gather(-1, targets[:, None]).squeeze(-1)  # (N,)
        entropy = -(logps_all.exp() * logps_all).sum(-1) if "entropy" in outputs else None
        sum_sq = (torch.logsumexp(2 * logps_all, dim=-1).detach()
                  if "log_sum_sq_probs" in outputs else None)
        mean_logits = logits.mean(-1).detach() if "mean_logits" in outputs else None
        is_top1 = (logits.argmax(-1) == targets) if "is_top1" in outputs else None
        return logps, entropy, sum_sq, mean_logits, is_top1


@contextlib.contextmanager
def trl_fused_head_fallback(force: bool = False) -> Iterator[bool]:
    """Inside this context TRL's fused LM head works without Triton: if TRL found no kernel
    (CPU-only PyTorch), or with `force` (CPU tensors on a machine that has Triton),
    `TorchChunkedLogProb` replaces it. Yields whether it did."""
    import trl.trainer.utils as trl_utils

    previous = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if previous is not None and not force:
        yield False
        return
    trl_utils._ChunkedLogProbFunction = TorchChunkedLogProb
    try:
        yield True
    finally:
        trl_utils._ChunkedLogProbFunction = previous


# %%
import tempfile
import warnings

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings(), \
        trl_fused_head_fallback(force=True) as patched:  # the toy models run on the CPU
    warnings.simplefilter("ignore")
    trainer = DPOTrainer(
        model=copy.deepcopy(toy_lm), ref_model=copy.deepcopy(toy_ref_model), processing_class=lm_tokenizer,
        train_dataset=Dataset.from_list([
            {"prompt": render_prompt(lm_tokenizer, r["prompt"]),
             **{side: reward_model_text(lm_tokenizer, r["prompt"], r[side])[
                 len(render_prompt(lm_tokenizer, r["prompt"])):] for side in ("chosen", "rejected")}}
            for r in toy_records]),
        args=DPOConfig(output_dir=folder, report_to=[], use_cpu=True, bf16=False, beta=0.1,
                       per_device_train_batch_size=8, precompute_ref_log_probs=True))
    trl_rows = [trainer.train_dataset[i] for i in range(len(toy_records))]
    trl_batch = trainer.data_collator(trl_rows)
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(trl_batch)).item()
same_tokens = all((r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) == e
                  for r, e in zip(trl_rows, toy_examples, strict=True))
toy_lm_ref_logps = precompute_reference_logps(toy_ref_model, toy_examples, lm_tokenizer.pad_token_id)
trl_ref = torch.tensor([[r["ref_chosen_logps"], r["ref_rejected_logps"]] for r in trl_rows])
ref_gap = (trl_ref - torch.stack(toy_lm_ref_logps, 1)).abs().max().item()
with torch.no_grad():
    ours_policy = sequence_logps(toy_lm, collate_dpo(toy_examples, lm_tokenizer.pad_token_id))
    ours_losses, _, _ = dpo_loss(*ours_policy.chunk(2), *toy_lm_ref_logps, 0.1)
# two float32 implementations on differently collated batches: per token forward_tolerance,
# times the longest reply; the loss (9.5) is 1-Lipschitz in beta times the four log-probabilities
whole = collate_dpo(toy_examples, lm_tokenizer.pad_token_id)
seq_tol = max(forward_tolerance(m, {"input_ids": whole["input_ids"][:, :-1]})["logp"]
              for m in (toy_lm, toy_ref_model)) * int(whole["response_mask"].sum(1).max())
print(f"TRL kernel replaced by TorchChunkedLogProb: {patched}; token ids identical: {same_tokens}; "
      f"max |ref log-prob TRL - ours| = {ref_gap:.1e} (tolerance {seq_tol:.1e}); loss TRL "
      f"{trl_loss:.6f}, ours {ours_losses.mean().item():.6f}")
assert same_tokens and ref_gap <= seq_tol
assert abs(trl_loss - ours_losses.mean().item()) <= 4 * 0.1 * seq_tol  # beta = 0.1

# %% [markdown]
# ## GRPO: policy gradients with a group baseline
#
# PPO (13-08) estimates each token's advantage with a learned value function. GRPO (Shao et al.
# 2024, arXiv:2402.03300, §4.1) samples a group of $G$ replies $o_1, \dots, o_G$ to the same
# prompt $q$ from the current policy $\pi_{\theta_\text{old}}$, scores each with one outcome
# reward $r_i$, and maximises
#
# $$
# \mathcal{J}_\text{GRPO}(\theta) = \mathbb{E}\Big[\frac{1}{G}\sum_{i=1}^{G}\frac{1}{|o_i|}
# \sum_{t=1}^{|o_i|}\Big\{\min\big(\rho_{i,t}\hat A_{i},\;
# \mathrm{clip}(\rho_{i,t}, 1 - \varepsilon, 1 + \varepsilon)\,\hat A_{i}\big)
# - \beta_\text{KL}\, k_3\big(\pi_\theta, \pi_\text{ref}\big)_{i,t}\Big\}\Big],
# \qquad \rho_{i,t} = \frac{\pi_\theta(o_{i,t} \mid q, o_{i,<t})}{\pi_{\theta_\text{old}}(o_{i,t}
# \mid q, o_{i,<t})},
# \tag{9.7}
# $$
#
# with the same advantage for every token of reply $i$, its reward standardised within its group,
#
# $$
# \hat A_i = \frac{r_i - \operatorname{mean}(r_1, \dots, r_G)}{\operatorname{std}(r_1, \dots, r_G)
# + \epsilon},
# \tag{9.8}
# $$
#
# and the KL to the reference estimated per token by 13-08's $k_3$, eq. (8.5), inside the loss
# rather than inside the reward (DeepSeekMath uses $\beta_\text{KL} = 0.04$). The group mean is a
# baseline: subtracting a quantity that does not depend on the reply leaves the policy gradient
# unbiased and removes the part of the reward that the prompt alone explains, which is what the
# value network was for. (Including $r_i$ in its own baseline shrinks the gradient by
# $(G - 1)/G$; the leave-one-out mean of RLOO avoids even that.) A group whose replies all earn
# the same reward has $\hat A_i = 0$ and teaches nothing.
#
# **Which KL the $k_3$ term pulls on.** The value of $k_3$ on replies sampled from $\pi_\theta$ is
# an unbiased estimate of $\mathrm{KL}(\pi_\theta \,\|\, \pi_\text{ref})$, eq. (8.5). Its
# *gradient*, taken through $\log \pi_\theta$ alone as (9.7)'s loss takes it, is not that KL's
# gradient. With $\rho = \pi_\text{ref} / \pi_\theta$, $\partial k_3 / \partial \log \pi_\theta =
# 1 - \rho$, so for one token
#
# $$
# \mathbb{E}_{y \sim \pi_\theta}\big[(1 - \rho(y))\, \nabla_\theta \log \pi_\theta(y)\big]
# = \underbrace{\textstyle\sum_y \nabla_\theta \pi_\theta(y)}_{0}
# - \textstyle\sum_y \pi_\text{ref}(y)\, \nabla_\theta \log \pi_\theta(y)
# = \nabla_\theta\, \mathrm{KL}(\pi_\text{ref} \,\|\, \pi_\theta):
# \tag{9.8a}
# $$
#
# the penalty descends the *other* KL, the mass-covering one (Tang & Munos 2025,
# arXiv:2506.09477, §3, who also note that over a sequence the per-token form drops the effect of
# a token on the later ones). Near $\pi_\text{ref}$ the two KLs agree to second order, so a small
# $\beta_\text{KL}$ still holds the policy close; our runs use $\beta_\text{KL} = 0$ in every
# profile and are unaffected. On a 5-token distribution, in float64:

# %%
torch.manual_seed(0)  # kl_k3 is 13-08's, eq. (8.5), imported with this chapter's code
theta = torch.randn(5, dtype=torch.float64, requires_grad=True)  # the policy's logits
log_ref = torch.log_softmax(torch.randn(5, dtype=torch.float64), -1)


def kl_gradient(objective) -> torch.Tensor:
    log_pi = torch.log_softmax(theta, -1)
    return torch.autograd.grad(objective(log_pi), theta)[0]


k3_loss = kl_gradient(lambda lp: (lp.exp().detach() * kl_k3(lp, log_ref)).sum())  # E_pi, exact
reverse = kl_gradient(lambda lp: (lp.exp() * (lp - log_ref)).sum())  # KL(pi || pi_ref)
forward = kl_gradient(lambda lp: (log_ref.exp() * (log_ref - lp)).sum())  # KL(pi_ref || pi)
print(f"max |grad k3 loss - grad KL(pi_ref||pi)| = {(k3_loss - forward).abs().max():.1e}; "
      f"max |grad k3 loss - grad KL(pi||pi_ref)| = {(k3_loss - reverse).abs().max():.3f}")
# (9.8a) is an identity: float64 sums of 5 terms of size < 10 agree to ~5 * 10 * 2^-52 < 1e-13
assert (k3_loss - forward).abs().max() < 1e-12

# %% [markdown]
# **Dr. GRPO.** Liu et al. (2025, arXiv:2503.20783, §3) point at two normalisations in (9.7)-(9.8)
# that bias the optimisation. Dividing by $|o_i|$ gives each token of reply $i$ the weight
# $\hat A_i / |o_i|$: among correct replies ($\hat A_i > 0$) short ones are pushed up harder, and
# among wrong ones ($\hat A_i < 0$) long ones are pushed down *less*, so wrong answers drift
# longer. Dividing by the group's std up-weights prompts whose rewards barely vary, the nearly
# always solved and the nearly never solved. Dr. GRPO drops both: $\hat A_i = r_i - \operatorname
# {mean}(r)$, and the token sum of each reply is divided by one constant $L$ (the generation
# budget) instead of its length,
#
# $$
# \mathcal{J}_\text{Dr.GRPO}(\theta) = \mathbb{E}\Big[\frac{1}{G\,L}\sum_{i=1}^{G}
# \sum_{t=1}^{|o_i|}\min\big(\rho_{i,t}\hat A_{i},\; \mathrm{clip}(\rho_{i,t}, 1 - \varepsilon,
# 1 + \varepsilon)\,\hat A_{i}\big)\Big].
# \tag{9.9}
# $$
#
# ### The contracts of CS336 Assignment 5
#
# We implement GRPO through the functions of Stanford CS336's fifth assignment, with its names,
# keyword arguments and semantics, so a student can test their own code against these:
#
# - `compute_group_normalized_rewards(reward_fn, rollout_responses, repeated_ground_truths,
#   group_size, advantage_eps, normalize_by_std)` scores each response with `reward_fn(response,
#   ground_truth)`, a dict with `reward`, `format_reward` and `answer_reward`, and returns the
#   advantages (9.8) (or $r - \operatorname{mean}$ without the std), the raw rewards and metadata.
#   The std is the unbiased (Bessel-corrected) one, as `torch.std` computes it.
# - `compute_naive_policy_gradient_loss(raw_rewards_or_advantages, policy_log_probs)`: the
#   per-token loss $-A \log \pi_\theta$, shape (batch, seq); with raw rewards it is REINFORCE
#   without a baseline.
# - `compute_grpo_clip_loss(advantages, policy_log_probs, old_log_probs, cliprange)`: the per-token
#   $-\min(\rho A, \mathrm{clip}(\rho) A)$ of (9.7) and metadata, here the per-token mask of where
#   the clipped term was the smaller (`clipped`) and its mean.
# - `compute_policy_gradient_loss(policy_log_probs, loss_type, raw_rewards, advantages,
#   old_log_probs, cliprange)` dispatches on `loss_type` in `"no_baseline"`,
#   `"reinforce_with_baseline"`, `"grpo_clip"`.
# - `masked_mean(tensor, mask, dim)`: the mean over the entries where `mask` is true (over all
#   of them if `dim` is None), 13-06's `masked_sum` divided by their number. (13-08's losses
#   divide the same sum by a token count of the whole batch instead: that is `masked_normalize`.)
# - `grpo_microbatch_train_step(policy_log_probs, response_mask, gradient_accumulation_steps,
#   loss_type, raw_rewards, advantages, old_log_probs, cliprange)`: the per-token loss, averaged
#   over each reply's tokens (`masked_mean`, the $1/|o_i|$ of 9.7), then over the microbatch,
#   divided by the accumulation steps; calls `backward()`. CS336's docstring mentions a constant
#   normaliser for Dr. GRPO without giving it a keyword; ours is the optional last keyword
#   `constant_normalize_factor`, which switches the per-reply average to 13-06's
#   `masked_normalize` by that constant, eq. (9.9).

# %%
#| export
LOSS_TYPES = ("no_baseline", "reinforce_with_baseline", "grpo_clip")
REWARD_KEYS = ("reward", "format_reward", "answer_reward")


def compute_group_normalized_rewards(reward_fn: Callable[[str, str], dict[str, float]],
                                     rollout_responses: Sequence[str],
                                     repeated_ground_truths: Sequence[str], group_size: int,
                                     advantage_eps: float, normalize_by_std: bool
                                     ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """CS336 A5: rewards of `rollout_responses` (groups of `group_size` consecutive responses to
    one prompt) and their group-normalised advantages, eq. (9.8) (Shao et al. 2024,
    arXiv:2402.03300, §4.1.2): (r - group mean) / (group std + advantage_eps), or r - group mean
    without `normalize_by_std` (Dr. GRPO, arXiv:2503.20783). The std is unbiased (Bessel).
    Returns (advantages (n,), raw_rewards (n,), metadata) with float32 tensors."""
    n = len(rollout_responses)
    if n != len(repeated_ground_truths):
        raise ValueError(f"{n} rollout responses but {len(repeated_ground_truths)} ground truths")
    if group_size < 1 or n == 0 or n % group_size:
        raise ValueError(f"group_size {group_size} must be positive and divide the number of "
                         f"rollout responses {n}")
    if normalize_by_std and group_size < 2:
        raise ValueError("normalize_by_std needs group_size >= 2: the std of one reward is "
                         "undefined")
    scores = []
    for i, (response, truth) in enumerate(zip(rollout_responses, repeated_ground_truths,
                                              strict=True)):
        result = reward_fn(response, truth)
        missing = [k for k in REWARD_KEYS if k not in result]
        if missing:
            raise ValueError(f"reward_fn on rollout response {i} returned no {missing} (it must "
                             f"return a dict with keys {REWARD_KEYS})")
        scores.append([float(result[k]) for k in REWARD_KEYS])
    scores_t = torch.tensor(scores, dtype=torch.float32)  # (n, 3)
    raw_rewards = scores_t[:, 0]
    groups = raw_rewards.view(-1, group_size)  # (prompts, group_size)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    stds = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(groups[:, :1])
    if normalize_by_std:
        advantages = advantages / (stds + advantage_eps)
    metadata = {"reward_mean": raw_rewards.mean().item(), "reward_std": raw_rewards.std().item()
                if n > 1 else 0.0, "reward_max": raw_rewards.max().item(),
                "reward_min": raw_rewards.min().item(),
                "format_reward_mean": scores_t[:, 1].mean().item(),
                "answer_reward_mean": scores_t[:, 2].mean().item(),
                "group_std_mean": stds.mean().item(),
                "zero_std_groups": (stds.squeeze(1) == 0).float().mean().item()}
    return advantages.flatten(), raw_rewards, metadata


def _per_row(values: torch.Tensor, name: str) -> torch.Tensor:
    """(batch,) or (batch, 1) -> (batch, 1), so that it broadcasts over the sequence."""
    if values.dim() == 1:
        return values.unsqueeze(-1)
    if values.dim() == 2 and values.shape[1] == 1:
        return values
    raise ValueError(f"{name} must be (batch, 1) or (batch,), got {tuple(values.shape)}")


def compute_naive_policy_gradient_loss(raw_rewards_or_advantages: torch.Tensor,
                                       policy_log_probs: torch.Tensor) -> torch.Tensor:
    """CS336 A5: the per-token policy-gradient loss -A log pi_theta, (batch, seq); A is (batch, 1)
    (one value per response, broadcast over its tokens)."""
    values = _per_row(raw_rewards_or_advantages, "raw_rewards_or_advantages")
    return -values.to(policy_log_probs.dtype) * policy_log_probs


def compute_grpo_clip_loss(advantages: torch.Tensor, policy_log_probs: torch.Tensor,
                           old_log_probs: torch.Tensor, cliprange: float
                           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CS336 A5: the per-token GRPO-Clip loss -min(rho A, clip(rho, 1 - eps, 1 + eps) A) of
    eq. (9.7), rho = exp(log pi_theta - log pi_old); (batch, seq). Metadata: `clipped` (batch,
    seq) bool, where the clipped term was the smaller, `clip_fraction` (its mean over all
    entries) and `ratio`."""
    if not cliprange > 0:
        raise ValueError(f"cliprange must be positive, got {cliprange}")
    if policy_log_probs.shape != old_log_probs.shape:
        raise ValueError(f"policy_log_probs {tuple(policy_log_probs.shape)} and old_log_probs "
                         f"{tuple(old_log_probs.shape)} differ in shape")
    values = _per_row(advantages, "advantages").to(policy_log_probs.dtype)
    ratio = torch.exp(policy_log_probs - old_log_probs)  # (batch, seq)
    unclipped = ratio * values
    clipped = torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange) * values
    loss = -torch.minimum(unclipped, clipped)
    was_clipped = (clipped < unclipped).detach()
    return loss, {"clipped": was_clipped, "clip_fraction": was_clipped.float().mean(),
                  "ratio": ratio.detach()}


def compute_policy_gradient_loss(policy_log_probs: torch.Tensor, loss_type: str,
                                 raw_rewards: torch.Tensor | None = None,
                                 advantages: torch.Tensor | None = None,
                                 old_log_probs: torch.Tensor | None = None,
                                 cliprange: float | None = None
                                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CS336 A5: the per-token loss (batch, seq) of `loss_type`: "no_baseline" (needs
    `raw_rewards`), "reinforce_with_baseline" (needs `advantages`) or "grpo_clip" (needs
    `advantages`, `old_log_probs`, `cliprange`); and metadata. Arguments a loss type does not
    use are ignored; a missing one is an error naming it."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    needed = {"no_baseline": {"raw_rewards": raw_rewards},
              "reinforce_with_baseline": {"advantages": advantages},
              "grpo_clip": {"advantages": advantages, "old_log_probs": old_log_probs,
                            "cliprange": cliprange}}[loss_type]
    missing = [name for name, value in needed.items() if value is None]
    if missing:
        raise ValueError(f"loss_type {loss_type!r} needs {', '.join(missing)}")
    if loss_type == "no_baseline":
        return compute_naive_policy_gradient_loss(raw_rewards, policy_log_probs), {}
    if loss_type == "reinforce_with_baseline":
        return compute_naive_policy_gradient_loss(advantages, policy_log_probs), {}
    return compute_grpo_clip_loss(advantages, policy_log_probs, old_log_probs, cliprange)


def masked_mean(tensor: torch.Tensor, mask: torch.Tensor, dim: int | None = None
                ) -> torch.Tensor:
    """CS336 A5: the mean of `tensor` over the entries where `mask` is true, along `dim` (over
    all entries if None): 13-06's `masked_sum` over the number of true entries. Masked-out
    entries may hold anything, NaN included; a slice without any true entry gives NaN (0 / 0)."""
    mask = mask.bool()
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(tensor, mask, dim) / count


def grpo_microbatch_train_step(policy_log_probs: torch.Tensor, response_mask: torch.Tensor,
                               gradient_accumulation_steps: int, loss_type: str,
                               raw_rewards: torch.Tensor | None = None,
                               advantages: torch.Tensor | None = None,
                               old_log_probs: torch.Tensor | None = None,
                               cliprange: float | None = None,
                               constant_normalize_factor: float | None = None
                               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CS336 A5: the policy-gradient loss of one microbatch, backpropagated: the per-token loss
    of `loss_type` averaged over each response's tokens (`masked_mean`, eq. 9.7), then over the
    microbatch, divided by `gradient_accumulation_steps`. With `constant_normalize_factor`, each
    response's token sum is divided by that constant instead (`masked_normalize`, Dr. GRPO,
    eq. 9.9). Returns the (scaled, detached) loss and metadata."""
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, "
                         f"got {gradient_accumulation_steps}")
    if response_mask.shape != policy_log_probs.shape:
        raise ValueError(f"response_mask {tuple(response_mask.shape)} and policy_log_probs "
                         f"{tuple(policy_log_probs.shape)} differ in shape")
    per_token, metadata = compute_policy_gradient_loss(policy_log_probs, loss_type, raw_rewards,
                                                       advantages, old_log_probs, cliprange)
    if constant_normalize_factor is None:
        per_response = masked_mean(per_token, response_mask, dim=-1)  # (batch,)
    else:
        per_response = masked_normalize(per_token, response_mask, constant_normalize_factor,
                                         dim=-1)
    loss = per_response.mean() / gradient_accumulation_steps
    loss.backward()
    metadata = dict(metadata)
    if "clipped" in metadata:
        metadata["clip_fraction"] = masked_mean(metadata["clipped"].float(), response_mask)
    metadata["per_response_loss"] = per_response.detach()
    return loss.detach(), metadata

# %% [markdown]
# Checks on hand-made tensors: two groups of four, one with mixed rewards and one where every
# reply earned the same (advantages 0, and no division by zero thanks to $\epsilon$); the clip
# loss and its clipped mask on ratios inside and outside $[1 - \varepsilon, 1 + \varepsilon]$.

# %%
def table_reward(response: str, ground_truth: str) -> dict[str, float]:
    """A toy reward_fn: 1 when the response equals the ground truth."""
    correct = float(response == ground_truth)
    return {"reward": correct, "format_reward": 1.0, "answer_reward": correct}


responses = ["4", "5", "4", "6", "7", "7", "7", "7"]
truths = ["4"] * 4 + ["7"] * 4
advantages, raw, meta = compute_group_normalized_rewards(table_reward, responses, truths, 4, 1e-6,
                                                         True)
std = torch.tensor([1.0, 0.0, 1.0, 0.0]).std().item()  # unbiased: 0.5774
print("raw rewards", raw.tolist(), "| advantages", [round(a, 4) for a in advantages.tolist()],
      f"| zero-std groups {meta['zero_std_groups']}")
# float32, a mean and a std of 4 numbers: (A.1) allows a few 1e-7; allclose's rtol is 1e-5
assert torch.allclose(advantages[:4], torch.tensor([0.5, -0.5, 0.5, -0.5]) / (std + 1e-6))
assert torch.equal(advantages[4:], torch.zeros(4))  # a group with one reward teaches nothing
no_std, _, _ = compute_group_normalized_rewards(table_reward, responses, truths, 4, 1e-6, False)
assert torch.allclose(no_std[:4], torch.tensor([0.5, -0.5, 0.5, -0.5]))

log_probs = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
old = torch.log(torch.tensor([[0.25, 0.5], [0.25, 0.5]]))  # ratios 2 and 1
clip_loss, clip_meta = compute_grpo_clip_loss(torch.tensor([[1.0], [-1.0]]), log_probs, old, 0.2)
print("clip loss", [[round(v, 4) for v in row] for row in clip_loss.tolist()], "| clipped",
      clip_meta["clipped"].tolist())
# exp(log 0.5 - log 0.25) = 2 to a few u: allclose's rtol 1e-5 is far above (A.1) here
assert torch.allclose(clip_loss, torch.tensor([[-1.2, -1.0], [2.0, 1.0]]))  # A > 0: capped at 1.2
assert clip_meta["clipped"].tolist() == [[True, False], [False, False]]

# %% [markdown]
# **The loss that reads zero.** On policy ($\pi_\theta = \pi_{\theta_\text{old}}$, every
# $\rho = 1$) the per-reply loss of (9.7) is $-\hat A_i$, and group-normalised advantages sum to
# zero within each group: the reported GRPO loss is 0 at every first epoch, whatever the policy
# learns. The gradient is not zero. On the tiny random Llama:

# %%
torch.manual_seed(1)
ids = torch.randint(5, 60, (4, 9))
mask = torch.zeros(4, 8, dtype=torch.bool)
mask[:, 3:] = True
mask[1, 6:] = False  # replies of different lengths
adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
toy_lm.zero_grad()
logps = get_response_log_probs(toy_lm, ids[:, :-1], ids[:, 1:])["log_probs"]
loss, step_meta = grpo_microbatch_train_step(logps, mask, 1, "grpo_clip", advantages=adv,
                                             old_log_probs=logps.detach(), cliprange=0.2)
grad_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in toy_lm.parameters())).item()
print(f"on-policy GRPO loss {loss.item():.2e}, gradient norm {grad_norm:.3f}, clip fraction "
      f"{step_meta['clip_fraction'].item():.2f}")
# every ratio is exp(0) = 1 and the advantages (+-1, +-0.5) cancel exactly: the loss is 0 in
# floating point too; the gradient norm of this random model is of order 1, 1000 x the bound
assert abs(loss.item()) < 1e-6 and grad_norm > 1e-3
toy_lm.zero_grad()

# %% [markdown]
# **Dr. GRPO's length bias, in numbers.** One group, a correct reply of 3 tokens and a wrong one
# of 12: the weight on each token's log-probability in the gradient is $\hat A_i / |o_i|$ under
# (9.7), $\hat A_i / L$ under (9.9). Per-sequence normalisation pushes each token of the long
# wrong reply down four times less than each token of the short right one up.

# %%
lengths = torch.tensor([3, 12])
adv_group = torch.tensor([1.0, -1.0])
per_token_grpo = adv_group / lengths
per_token_dr = adv_group / 12
print(f"per-token weight, GRPO: right {per_token_grpo[0]:+.3f}, wrong {per_token_grpo[1]:+.3f}; "
      f"Dr. GRPO (L = 12): right {per_token_dr[0]:+.3f}, wrong {per_token_dr[1]:+.3f}")
assert abs(per_token_grpo[0] / per_token_grpo[1]) == 4.0 and per_token_dr[0] == -per_token_dr[1]

# %% [markdown]
# ### The GRPO loop
#
# One GRPO step, every line of it in `grpo_train` below:
#
# 1. take the next `prompts_per_step` prompts and sample `group_size` replies to each from the
#    current policy (13-06's `sample_replies`, temperature 1, no top-$k$ or top-$p$);
# 2. score them with `reward_fn` and normalise within groups (`compute_group_normalized_rewards`);
# 3. build the batch from the *sampled token ids* (`rollout_batch`: decoding a reply and
#    tokenizing it again need not give back the same ids, and the ratio $\rho$ must be computed on
#    the tokens that were sampled), and compute, without gradients, $\log \pi_\text{ref}$ when
#    there is a KL term and $\log \pi_{\theta_\text{old}}$ when the batch is used for more than
#    one pass. With one pass $\pi_{\theta_\text{old}} = \pi_\theta$: the training pass's own
#    log-probabilities, detached, are the old ones, every $\rho$ is exactly 1 and the clipped loss
#    has the plain policy gradient (TRL's `GRPOTrainer` skips the same forward pass);
# 4. `epochs_per_batch` passes over the batch, each one optimizer step accumulated over
#    microbatches with `grpo_microbatch_train_step` (and the KL term of 9.7, when
#    `kl_coef > 0`). One pass is on-policy; more passes reuse the samples off-policy, which is what
#    the clipping is for.
#
# A reward function may define `prepare(responses, ground_truths)`: the loop calls it once per
# batch before the per-response calls, which lets a reward model score the whole batch in one
# forward pass. Appendix A's `StepMeter` keeps the books: each step's time, the model FLOPs of
# every pass (generation included), one row per step and the check that its loss is finite.

# %%
#| export
def rollout_batch(tokenizer: Any, prompt_strs: Sequence[str], response_ids: Sequence[Sequence[int]]
                  ) -> dict[str, torch.Tensor]:
    """CS336's layout from sampled token ids: rendered prompts (tokenized) + replies (as
    sampled), right-padded; `input_ids` and `labels` (batch, max_len - 1) shifted by one, and
    `response_mask` true on the label positions holding reply tokens (13-06's eq. 6.2)."""
    if len(prompt_strs) != len(response_ids):
        raise ValueError(f"{len(prompt_strs)} prompts but {len(response_ids)} responses")
    cache: dict[str, list[int]] = {}
    for i, (prompt, ids) in enumerate(zip(prompt_strs, response_ids, strict=True)):
        if not len(ids):
            raise ValueError(f"response {i} is empty: a sampled reply has at least one token")
        if prompt not in cache:
            cache[prompt] = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return prompt_and_output_batch([cache[p] for p in prompt_strs], response_ids,
                                   tokenizer.pad_token_id)


@dataclass(frozen=True)
class GRPOConfig:
    """Hyperparameters of `grpo_train` (defaults: CS336 A5's GRPO recipe, scaled down)."""

    steps: int  # rollout batches
    prompts_per_step: int
    group_size: int  # G, replies per prompt
    max_new_tokens: int  # also L, the constant of eq. (9.9)
    lr: float
    loss_type: str = "grpo_clip"
    epochs_per_batch: int = 1  # optimizer steps per rollout batch; > 1 is off-policy
    microbatch_size: int = 16
    cliprange: float = 0.2
    advantage_eps: float = 1e-6
    normalize_by_std: bool = True  # eq. (9.8); False: Dr. GRPO
    length_normalization: str = "sequence"  # "sequence": 1/|o_i| (9.7); "constant": 1/L (9.9)
    kl_coef: float = 0.0  # beta_KL of eq. (9.7), on the k3 estimate; needs a reference model
    temperature: float = 1.0
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.0
    generate_batch_size: int = 64
    bf16: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; expected one of {LOSS_TYPES}")
        if self.length_normalization not in ("sequence", "constant"):
            raise ValueError(f"length_normalization must be 'sequence' or 'constant', got "
                             f"{self.length_normalization!r}")
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens",
                     "epochs_per_batch", "microbatch_size", "generate_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        rows = self.prompts_per_step * self.group_size
        if rows % self.microbatch_size:
            raise ValueError(f"microbatch_size {self.microbatch_size} does not divide the "
                             f"{rows} replies of a step (prompts_per_step x group_size)")
        if self.epochs_per_batch > 1 and self.loss_type != "grpo_clip":
            raise ValueError("epochs_per_batch > 1 reuses samples off-policy and needs "
                             "loss_type='grpo_clip' (the other losses ignore pi_old)")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")


@dataclass
class GRPOLog:
    """What `grpo_train` recorded: one row per step, the wall time, the model FLOPs of the policy
    and reference passes (generation included) and the number of sampled responses."""

    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    flops: float = 0.0
    responses: int = 0


def _token_logps(model: nn.Module, batch: dict[str, torch.Tensor], rows: int, bf16: bool
                     ) -> torch.Tensor:
    """log pi(labels) of a rollout batch, (batch, seq) float32, in chunks of `rows`."""
    device = next(model.parameters()).device
    parts = []
    for i in range(0, batch["input_ids"].shape[0], rows):
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            parts.append(get_response_log_probs(model, batch["input_ids"][i:i + rows],
                                                batch["labels"][i:i + rows])["log_probs"].float())
    return torch.cat(parts)


def grpo_train(policy: nn.Module, tokenizer: Any, prompts: Sequence[str],
               ground_truths: Sequence[str], reward_fn: Callable[[str, str], dict[str, float]],
               config: GRPOConfig, *, ref_model: nn.Module | None = None, desc: str = "GRPO",
               callback: Callable[[int, nn.Module], dict] | None = None) -> GRPOLog:
    """GRPO (Shao et al. 2024, arXiv:2402.03300, Algorithm 1; CS336 A5's loop) on the user
    messages `prompts` with `ground_truths` for `reward_fn(response, ground_truth)`: `steps`
    rollout batches of `prompts_per_step` x `group_size` sampled replies, each trained on for
    `epochs_per_batch` optimizer steps with `grpo_microbatch_train_step`. `callback(step,
    policy)` may add entries to a step's log row."""
    if len(prompts) != len(ground_truths) or not prompts:
        raise ValueError(f"need as many ground truths as prompts (at least one), got "
                         f"{len(prompts)} and {len(ground_truths)}")
    if config.kl_coef > 0 and ref_model is None:
        raise ValueError("kl_coef > 0 needs ref_model")
    device = next(policy.parameters()).device
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(config.seed)
    G, rows = config.group_size, config.prompts_per_step * config.group_size
    accumulation = rows // config.microbatch_size
    constant = config.max_new_tokens if config.length_normalization == "constant" else None
    prompt_strs = [render_prompt(tokenizer, p) for p in prompts]
    order: list[int] = []
    meter = StepMeter(desc, callback)  # step time, model FLOPs, one row per step (Appendix A)
    for step in meter.steps(config.steps):
        picked = draw_batch(order, len(prompts), config.prompts_per_step, generator)
        rollout_prompts = [prompt_strs[i] for i in picked for _ in range(G)]
        truths = [ground_truths[i] for i in picked for _ in range(G)]
        replies = sample_replies(policy, tokenizer, rollout_prompts,
                                 max_new_tokens=config.max_new_tokens, do_sample=True,
                                 temperature=config.temperature,
                                 seed=config.seed * 1_000_003 + step,
                                 batch_size=config.generate_batch_size)  # 1.
        texts = [r["text"] for r in replies]
        if hasattr(reward_fn, "prepare"):
            reward_fn.prepare(texts, truths)
        advantages, raw_rewards, reward_meta = compute_group_normalized_rewards(
            reward_fn, texts, truths, G, config.advantage_eps, config.normalize_by_std)  # 2.
        batch = {k: v.to(device) for k, v in rollout_batch(
            tokenizer, rollout_prompts, [r["ids"] for r in replies]).items()}  # 3.
        mask = batch["response_mask"]
        width = batch["input_ids"].shape[1]
        lengths = mask.float().argmax(1) + 1 + mask.sum(1)  # prompt + reply tokens
        meter.flops += batch_flops(policy, lengths.tolist(), config.generate_batch_size,
                                   training=False)
        clip = config.loss_type == "grpo_clip"
        with torch.no_grad():
            old_logps = ref_logps = None  # one pass: pi_old = pi_theta, its log-probs detached
            if clip and config.epochs_per_batch > 1:
                old_logps = _token_logps(policy, batch, config.microbatch_size, config.bf16)
                meter.flops += transformer_flops(policy, rows, width, training=False)
            if config.kl_coef > 0:
                ref_logps = _token_logps(ref_model, batch, config.microbatch_size,
                                             config.bf16)
                meter.flops += transformer_flops(ref_model, rows, width, training=False)
        advantages, raw_rewards = advantages.to(device)[:, None], raw_rewards.to(device)[:, None]
        policy.train()
        losses, clip_fractions, kls, grad_norms = [], [], [], []
        for _ in range(config.epochs_per_batch):  # 4.
            perm = torch.randperm(rows, generator=generator).to(device)
            for m in range(accumulation):
                index = perm[m * config.microbatch_size:(m + 1) * config.microbatch_size]
                with torch.autocast(device.type, torch.bfloat16, enabled=config.bf16):
                    logps = get_response_log_probs(policy, batch["input_ids"][index],
                                                   batch["labels"][index])["log_probs"].float()
                if ref_logps is not None:
                    k3 = kl_k3(logps, ref_logps[index])  # eq. (8.5), per token
                    per_response = (masked_mean(k3, mask[index], dim=-1) if constant is None
                                    else masked_normalize(k3, mask[index], constant, dim=-1))
                    kl_loss = config.kl_coef * per_response.mean() / accumulation
                    kl_loss.backward(retain_graph=True)
                    kls.append(masked_mean(k3.detach(), mask[index]).item())
                loss, meta = grpo_microbatch_train_step(
                    logps, mask[index], accumulation, config.loss_type,
                    raw_rewards=raw_rewards[index], advantages=advantages[index],
                    old_log_probs=(None if not clip else logps.detach() if old_logps is None
                                   else old_logps[index]),
                    cliprange=config.cliprange, constant_normalize_factor=constant)
                losses.append(loss.item() * accumulation)
                if "clip_fraction" in meta:
                    clip_fractions.append(meta["clip_fraction"].item())
            max_norm = config.max_grad_norm if config.max_grad_norm is not None else math.inf
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, max_norm)))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            meter.flops += transformer_flops(policy, rows, width, training=True)
        policy.eval()
        meter.record(step, {
            "step": step + 1, "reward": reward_meta["reward_mean"],
            "format_reward": reward_meta["format_reward_mean"],
            "answer_reward": reward_meta["answer_reward_mean"],
            "zero_std_groups": reward_meta["zero_std_groups"], "loss": sum(losses) / len(losses),
            "clip_fraction": sum(clip_fractions) / len(clip_fractions) if clip_fractions else 0.0,
            "kl_k3_per_token": sum(kls) / len(kls) if kls else float("nan"),
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "length": mask.sum(1).float().mean().item(),
            "eos_rate": sum(r["finished"] for r in replies) / rows}, policy)
    return GRPOLog(history=meter.history, seconds=meter.seconds, flops=meter.flops,
                   responses=config.steps * rows)

# %% [markdown]
# ## RLVR: verifiable rewards and expert iteration
#
# When a program can check an answer, the reward model, its training data and its
# exploitability all disappear: the reward *is* the check. Tülu 3 (Lambert et al. 2024,
# arXiv:2411.15124) calls this reinforcement learning with verifiable rewards; DeepSeek-R1
# (arXiv:2501.12948) trains reasoning with GRPO on such rewards. A verifiable reward has two
# parts:
#
# - **answer extraction**: find the final answer in the reply. The tiny SFT model of 13-06 answers
#   "What is 17 + 25?" with the bare number and EOS; a GSM8K solution (Cobbe et al. 2021,
#   arXiv:2110.14168) ends with a line `#### 42`. A reply in neither format has no answer.
# - **the format reward** says whether an answer could be extracted, the **answer reward** whether
#   it equals the ground truth (as numbers: `1,234` and `1234.0` are `1234`).
#
# Following CS336's `r1_zero_reward_fn`, the reward is the answer reward, which requires the
# format:
#
# $$
# r(y, a^\star) = \mathbb{1}\big[\text{format}(y)\big]\;\mathbb{1}\big[\text{answer}(y) = a^\star\big]
# \;+\; w_\text{format}\,\mathbb{1}\big[\text{format}(y)\big],
# \tag{9.10}
# $$
#
# with an optional bonus $w_\text{format}$ for a well-formed reply (0 unless stated), which can
# help a model that has not learned the format yet.

# %%
#| export
import random
from decimal import Decimal, InvalidOperation

ANSWER_NUMBER = r"[-+]?\d[\d,]*(?:\.\d+)?"
GSM8K_PROMPT = ("{question}\nSolve the problem step by step. Give the final answer on a last line "
                "of the form '#### <number>'.")


def extract_answer(response: str) -> str | None:
    """The final answer of a reply, commas removed: the number of a '#### <number>' line (GSM8K
    format, `ftbook.data.parse_gsm8k_answer`), or the whole reply if it is one number (the
    arithmetic task of 13-06). None when the reply has neither format."""
    from ftbook.data import parse_gsm8k_answer  # lazy: ftbook.data imports `datasets`

    text = response.strip()
    if "####" in text:
        try:
            return parse_gsm8k_answer(text)
        except ValueError:
            return None
    if re.fullmatch(ANSWER_NUMBER, text):
        return text.replace(",", "")
    return None


def _canonical_number(text: str) -> str:
    try:
        return format(Decimal(text.replace(",", "").strip()).normalize(), "f")
    except InvalidOperation as error:
        raise ValueError(f"not a number: {text!r}") from error


def verifiable_reward(response: str, ground_truth: str, format_weight: float = 0.0
                      ) -> dict[str, float]:
    """Eq. (9.10) with CS336's contract: `format_reward` 1 if an answer can be extracted
    (`extract_answer`), `answer_reward` 1 if it also equals `ground_truth` as a number
    (13-06's `answer_is_correct` on canonical forms), `reward` = answer_reward + format_weight *
    format_reward. A ground truth that is not a number is an error."""
    truth = _canonical_number(ground_truth)
    answer = extract_answer(response)
    well_formed = answer is not None
    correct = well_formed and answer_is_correct(_canonical_number(answer), truth)
    return {"format_reward": float(well_formed), "answer_reward": float(correct),
            "reward": float(correct) + format_weight * float(well_formed)}


def lenient_reward(response: str, ground_truth: str) -> dict[str, float]:
    """The lenient check, CS336's contract: `answer_reward` 1 if the *last* number in the reply
    equals `ground_truth` as a number, whatever surrounds it ("17 + 25 = 42." counts, and so
    does a reply cut after its answer); `format_reward` 1 if the reply contains a number;
    `reward` = answer_reward."""
    truth = _canonical_number(ground_truth)
    numbers = re.findall(ANSWER_NUMBER, response)
    correct = bool(numbers) and answer_is_correct(_canonical_number(numbers[-1]), truth)
    return {"format_reward": float(bool(numbers)), "answer_reward": float(correct),
            "reward": float(correct)}


def arithmetic_problems(n: int, seed: int, exclude: set[str] | None = None,
                        max_operand: int = 99, min_operand: int = 0, ops: str = "+-"
                        ) -> list[dict]:
    """`n` distinct problems in the format of 13-06's arithmetic task ("What is a + b?" /
    "What is a - b?", differences non-negative, answered by the bare number), operands
    `min_operand`..`max_operand`, operations drawn from `ops`, as {"prompt", "answer"}; none of
    the prompts is in `exclude`."""
    if not ops or set(ops) - set("+-"):
        raise ValueError(f"ops must be made of '+' and '-', got {ops!r}")
    rng = random.Random(seed)
    exclude = set(exclude or ())
    problems, seen = [], set()
    for _ in range(100 * n):
        a, b = rng.randint(min_operand, max_operand), rng.randint(min_operand, max_operand)
        op = rng.choice(ops)
        if op == "-" and b > a:
            a, b = b, a
        prompt = f"What is {a} {op} {b}?"
        if prompt in exclude or prompt in seen:
            continue
        seen.add(prompt)
        problems.append({"prompt": prompt, "answer": str(a + b if op == "+" else a - b)})
        if len(problems) == n:
            return problems
    raise ValueError(f"only {len(problems)} distinct arithmetic problems with operands up to "
                     f"{max_operand} of the {n} asked for")


def gsm8k_problems(split: str, n: int | None, seed: int) -> list[dict]:
    """`n` seeded GSM8K problems of `split` (all if None) as {"prompt" (`GSM8K_PROMPT`),
    "answer" (the number after '####')}."""
    from ftbook.data import load_gsm8k  # lazy: ftbook.data imports `datasets`
    from ftbook.data import subset as subset_rows

    rows = subset_rows(load_gsm8k(split), n, seed)
    return [{"prompt": GSM8K_PROMPT.format(question=q), "answer": a}
            for q, a in zip(rows["question"], rows["final_answer"], strict=True)]


@torch.no_grad()
def evaluate_verifiable(policy: nn.Module, tokenizer: Any, problems: Sequence[dict], *,
                        max_new_tokens: int, batch_size: int = 64,
                        reward_fn: Callable[[str, str], dict[str, float]] = verifiable_reward
                        ) -> dict[str, float]:
    """Greedy replies to `problems` ({"prompt", "answer"}): `accuracy` (mean answer reward of
    `reward_fn`, the strict check by default), `lenient_accuracy` (`lenient_reward`),
    `format_rate`, `eos_rate`, the mean reply length in tokens, overall and of the wrong
    replies, and `n`."""
    replies = sample_replies(policy, tokenizer, [render_prompt(tokenizer, p["prompt"])
                                                 for p in problems],
                             max_new_tokens=max_new_tokens, do_sample=False,
                             batch_size=batch_size)
    scores = [reward_fn(r["text"], p["answer"]) for r, p in zip(replies, problems, strict=True)]
    lengths = [len(r["ids"]) for r in replies]
    wrong = [n for n, s in zip(lengths, scores, strict=True) if not s["answer_reward"]]
    lenient = [lenient_reward(r["text"], p["answer"])["answer_reward"]
               for r, p in zip(replies, problems, strict=True)]
    return {"accuracy": sum(s["answer_reward"] for s in scores) / len(scores),
            "lenient_accuracy": sum(lenient) / len(lenient), "n": len(problems),
            "format_rate": sum(s["format_reward"] for s in scores) / len(scores),
            "eos_rate": sum(r["finished"] for r in replies) / len(replies),
            "length": sum(lengths) / len(lengths),
            "length_wrong": sum(wrong) / len(wrong) if wrong else float("nan")}


# %% [markdown]
# The reward on well-formed, malformed and wrong replies:

# %%
cases = [("42", "42"), (" 42 ", "42"), ("The answer is 42.", "42"), ("41", "42"),
         ("Step one...\n#### 1,234", "1234"), ("#### 12.0", "12"), ("#### twelve", "12"), ("", "0")]
reward_rows = [{"response": repr(r), "ground truth": a, **verifiable_reward(r, a)}
               for r, a in cases]
show_table(pd.DataFrame(reward_rows).set_index("response"), "verifiable_reward", CHAPTER,
           floatfmt="{:.0f}")
assert [row["reward"] for row in reward_rows] == [1, 1, 0, 0, 1, 1, 0, 0]
assert [row["format_reward"] for row in reward_rows] == [1, 1, 0, 1, 1, 1, 0, 0]

# %% [markdown]
# ### Expert iteration
#
# Expert iteration (Anthony et al. 2017, arXiv:1705.08439; for language models STaR, Zelikman
# et al. 2022, arXiv:2203.14465, and ReST$^{EM}$, Singh et al. 2023, arXiv:2312.06585) is the
# simplest use of a verifier: sample several replies per prompt, keep those the verifier accepts,
# fine-tune on them with the SFT loss, repeat. Keeping only replies with reward 1 and maximising
# their likelihood is a policy-gradient step with the raw binary reward and no baseline,
#
# $$
# \nabla_\theta \sum_{i:\, r_i = 1} \log \pi_\theta(y_i \mid x_i)
# = \nabla_\theta \sum_{i} r_i \log \pi_\theta(y_i \mid x_i),
# \tag{9.11}
# $$
#
# taken many times on the same samples (several SFT steps per round, off-policy and unclipped)
# and normalised by the number of kept replies rather than sampled ones. The check below confirms
# (9.11) with 13-06's SFT step and this chapter's `"no_baseline"` loss: on the same samples, the
# two gradients differ exactly by the factor $n / n_\text{kept}$. What expert iteration cannot
# use is a *wrong* answer: GRPO pushes those down, expert iteration ignores them.

# %%
from ftbook.instruction_tuning import sft_microbatch_train_step

rewards_01 = torch.tensor([1.0, 0.0, 1.0, 0.0])
grads = {}
for name in ("SFT on the kept replies", "no-baseline policy gradient"):
    toy_lm.zero_grad()
    logps = get_response_log_probs(toy_lm, ids[:, :-1], ids[:, 1:])["log_probs"]
    if name.startswith("SFT"):
        kept = rewards_01.bool()
        sft_microbatch_train_step(logps[kept], mask[kept], 1, normalize_constant=8.0)
    else:
        grpo_microbatch_train_step(logps, mask, 1, "no_baseline", raw_rewards=rewards_01[:, None],
                                   constant_normalize_factor=8.0)
    grads[name] = torch.cat([p.grad.flatten() for p in toy_lm.parameters()])
toy_lm.zero_grad()
factor = len(rewards_01) / rewards_01.sum()
gap = (grads["SFT on the kept replies"] - factor * grads["no-baseline policy gradient"]).abs().max()
print(f"eq. (9.11): max |grad SFT(kept) - (n / n_kept) grad PG(no baseline)| = {gap:.2e}")
# exact in floating point: the same forward pass, and upstream gradients that differ by the
# factor n / n_kept = 2, a power of two, which every (linear) backward operation carries exactly
assert gap < 1e-6

# %%
#| export
@dataclass
class EILog:
    """What `expert_iteration` recorded: one row per round, wall time, model FLOPs (generation
    and SFT) and the number of sampled responses."""

    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    flops: float = 0.0
    responses: int = 0


def expert_iteration(policy: nn.Module, tokenizer: Any, prompts: Sequence[str],
                     ground_truths: Sequence[str],
                     reward_fn: Callable[[str, str], dict[str, float]], *, rounds: int,
                     prompts_per_round: int, samples_per_prompt: int, max_new_tokens: int,
                     sft_steps: int, lr: float, seed: int, examples_per_step: int = 16,
                     temperature: float = 1.0, generate_batch_size: int = 64,
                     bf16: bool = False, desc: str = "expert iteration",
                     callback: Callable[[int, nn.Module], dict] | None = None) -> EILog:
    """Expert iteration (Anthony et al. 2017, arXiv:1705.08439; Singh et al. 2023,
    arXiv:2312.06585): each round samples `samples_per_prompt` replies to `prompts_per_round`
    prompts, keeps the distinct replies whose `answer_reward` is 1, and trains `policy` on them
    with 13-06's `sft_train` (`tokenize_for_sft`, padded batches, `sft_steps` steps).
    `callback(round, policy)` may add entries to a round's log row."""
    if len(prompts) != len(ground_truths) or not prompts:
        raise ValueError(f"need as many ground truths as prompts (at least one), got "
                         f"{len(prompts)} and {len(ground_truths)}")
    if min(rounds, prompts_per_round, samples_per_prompt, sft_steps) < 1:
        raise ValueError("rounds, prompts_per_round, samples_per_prompt and sft_steps must be "
                         ">= 1")
    generator = torch.Generator().manual_seed(seed)
    max_len = getattr(policy.config, "max_position_embeddings", None) or 1024
    order: list[int] = []
    meter = StepMeter(desc, callback, loss_key=None)  # sft_train checks its losses itself
    for round_index in meter.steps(rounds, bar=False):  # sft_train shows a bar for each round
        picked = draw_batch(order, len(prompts), prompts_per_round, generator)
        users = [prompts[i] for i in picked for _ in range(samples_per_prompt)]
        truths = [ground_truths[i] for i in picked for _ in range(samples_per_prompt)]
        prompt_strs = [render_prompt(tokenizer, u) for u in users]
        replies = sample_replies(policy, tokenizer, prompt_strs, max_new_tokens=max_new_tokens,
                                 do_sample=True, temperature=temperature,
                                 seed=seed * 1_000_003 + round_index,
                                 batch_size=generate_batch_size)  # 1. sample
        prompt_lengths = {s: len(tokenizer(s, add_special_tokens=False)["input_ids"])
                          for s in set(prompt_strs)}
        meter.flops += batch_flops(policy, [prompt_lengths[s] + len(r["ids"])
                                            for s, r in zip(prompt_strs, replies, strict=True)],
                                   generate_batch_size, training=False)
        scores = [reward_fn(r["text"], t) for r, t in zip(replies, truths, strict=True)]  # 2.
        kept = sorted({(u, r["text"]) for u, r, s in zip(users, replies, scores, strict=True)
                       if s["answer_reward"] > 0 and r["text"].strip()})  # 3. keep
        row = {"round": round_index + 1, "sampled": len(replies),
               "reward": sum(s["reward"] for s in scores) / len(scores), "kept": len(kept),
               "sft_loss": float("nan")}
        if kept:  # 4. fine-tune on the kept replies
            examples = tokenize_for_sft(tokenizer, [[{"role": "user", "content": u},
                                                     {"role": "assistant", "content": y}]
                                                    for u, y in kept], max_len)
            rows = min(examples_per_step, len(examples))
            sft_log = sft_train(policy, examples, steps=sft_steps, lr=lr, seq_len=max_len,
                                pad_token_id=tokenizer.pad_token_id, packing=False,
                                seed=seed + round_index, examples_per_step=rows, bf16=bf16,
                                desc=f"{desc}, round {round_index + 1}")
            meter.flops += sum(transformer_flops(policy, rows, slots // rows, training=True)
                               for slots in sft_log.slots)
            row["sft_loss"] = sft_log.losses[-1]
        policy.eval()
        meter.record(round_index, row, policy)
    return EILog(history=meter.history, seconds=meter.seconds, flops=meter.flops,
                 responses=sum(meter.column("sampled")))

# %% [markdown]
# ## Experiments
#
# ### Experiment 1: RLVR on arithmetic, GRPO against expert iteration
#
# The task is 13-06's arithmetic (GSM8K in the full profile). In the tiny profile the problems
# are sums of two numbers from 2 to 49 and the policy starts from the chat LM of Appendix C
# (`rlvr_from_sft=False`): a chat model is trained to answer in sentences rather than with the
# bare number, and may run out of `rlvr_max_new_tokens` before it reaches the answer, so both
# the *strict* check (the reply is the bare number, eq. 9.10) and the *lenient* one (the last
# number of the reply is right, `lenient_reward`) can start low (the start model's accuracies
# are printed below); GRPO is trained on the lenient one. Held-out problems
# are answered greedily and are disjoint from the training problems (and, in the full profile,
# from what the SFT model saw).
#
# GRPO and expert iteration start from the same model, train LoRA adapters of the same shape,
# and draw the same number of sampled replies: GRPO `rlvr_steps` batches of
# `rlvr_prompts_per_step` prompts times `rlvr_group_size` replies; expert iteration
# `ei_rounds` rounds with the same number of prompts in total and the same group size, each
# round followed by `ei_sft_steps` SFT steps on the verified replies. Every `rlvr_eval_every`
# steps (at the same number of samples for expert iteration) the held-out accuracy is measured.

# %%
import dataclasses

import matplotlib.pyplot as plt

from ftbook.base_models import load_chat_lm
from ftbook.data import load_sst2
from ftbook.instruction_tuning import SFT_RECIPES, load_sft_model, synthetic_instructions
from ftbook.rlhf_ppo import adapter_copy  # 13-08
from ftbook.workbench import Timer, binomial_interval, mean_interval, show_figure

timings = {}
with Timer(DEVICE) as timer:
    sft_model, tokenizer = load_sft_model(PROFILE, DEVICE)  # 13-06; trained first if not cached
timings["SFT model (load or train)"] = timer.seconds
if cfg.rlvr_from_sft:
    rlvr_start, rlvr_tokenizer = sft_model, tokenizer
else:
    rlvr_start, rlvr_tokenizer = load_chat_lm(PROFILE, DEVICE)  # Appendix C
    rlvr_tokenizer.padding_side = "left"  # for generation
rlvr_start.requires_grad_(False).eval()

if cfg.rlvr_task == "arithmetic":
    sst2_train = load_sst2("train")
    sft_seen = {e["messages"][0]["content"] for e in synthetic_instructions(
        sst2_train["sentence"], sst2_train["label"], pick(PROFILE, SFT_RECIPES).n_per_task, seed=0)}
    problem_space = dict(max_operand=cfg.rlvr_max_operand, min_operand=cfg.rlvr_min_operand,
                         ops=cfg.rlvr_ops)
    rlvr_train = arithmetic_problems(cfg.rlvr_train, seed=11, exclude=sft_seen, **problem_space)
    rlvr_eval = arithmetic_problems(cfg.rlvr_eval, seed=12,
                                    exclude=sft_seen | {p["prompt"] for p in rlvr_train},
                                    **problem_space)
else:
    rlvr_train = gsm8k_problems("train", cfg.rlvr_train, seed=11)
    rlvr_eval = gsm8k_problems("test", cfg.rlvr_eval, seed=12)
train_reward = verifiable_reward if cfg.rlvr_reward == "strict" else lenient_reward
print(f"{len(rlvr_train)} training and {len(rlvr_eval)} held-out problems, e.g. "
      f"{rlvr_train[0]['prompt']!r} -> {rlvr_train[0]['answer']!r}; trained on the "
      f"{cfg.rlvr_reward} reward")


def evaluate_rlvr(model) -> dict:
    return evaluate_verifiable(model, rlvr_tokenizer, rlvr_eval,
                               max_new_tokens=cfg.rlvr_max_new_tokens,
                               batch_size=cfg.generate_batch_size)


start_name = "SFT model" if cfg.rlvr_from_sft else "chat LM"
with Timer(DEVICE) as timer:
    start_eval = evaluate_rlvr(rlvr_start)
print(f"{start_name}: held-out strict accuracy {start_eval['accuracy']:.3f}, lenient "
      f"{start_eval['lenient_accuracy']:.3f}, EOS rate {start_eval['eos_rate']:.2f} "
      f"({timer.seconds:.0f} s for {len(rlvr_eval)} greedy replies)")

# %% [markdown]
# The GRPO runs share one configuration and change one thing each: the baseline is CS336's GRPO
# (group std, per-reply length normalisation, one on-policy step per batch, no KL term), with
# two seeds; then, with the first seed, without the std (the first half of Dr. GRPO), Dr. GRPO
# (no std, constant normaliser $L$ = `rlvr_max_new_tokens`), several optimizer steps per batch
# with clipping (off-policy), and REINFORCE without a baseline on the raw reward. Expert
# iteration runs with both seeds too.

# %%
rlvr_grpo = GRPOConfig(steps=cfg.rlvr_steps, prompts_per_step=cfg.rlvr_prompts_per_step,
                       group_size=cfg.rlvr_group_size, max_new_tokens=cfg.rlvr_max_new_tokens,
                       lr=cfg.rlvr_lr, microbatch_size=cfg.microbatch_size,
                       generate_batch_size=cfg.generate_batch_size, bf16=cfg.bf16)
rlvr_variants = {
    "GRPO": rlvr_grpo,
    "GRPO, no std": dataclasses.replace(rlvr_grpo, normalize_by_std=False),
    "Dr. GRPO": dataclasses.replace(rlvr_grpo, normalize_by_std=False,
                                    length_normalization="constant"),
    f"GRPO, {cfg.rlvr_epochs} epochs/batch": dataclasses.replace(
        rlvr_grpo, epochs_per_batch=cfg.rlvr_epochs),
    "no baseline": dataclasses.replace(rlvr_grpo, loss_type="no_baseline"),
}
replies_per_step = cfg.rlvr_prompts_per_step * cfg.rlvr_group_size
rlvr_runs = []  # one row per (method, seed)
rlvr_curves = [{"method": start_name, "seed": "-", "sampled replies": 0,
                "accuracy": start_eval["accuracy"],
                "lenient accuracy": start_eval["lenient_accuracy"]}]  # and every checkpoint


def checkpoint(method: str, seed: int, replies: int, model) -> dict:
    result = evaluate_rlvr(model)
    rlvr_curves.append({"method": method, "seed": seed, "sampled replies": replies,
                        "accuracy": result["accuracy"],
                        "lenient accuracy": result["lenient_accuracy"]})
    return result


plan = [("GRPO", seed) for seed in cfg.seeds] + [(name, cfg.seeds[0]) for name in
                                                   list(rlvr_variants)[1:]]
for name, seed in plan:
    config = dataclasses.replace(rlvr_variants[name], seed=seed)
    seed_everything(seed)
    policy = adapter_copy(rlvr_start, cfg.lora_rank, cfg.lora_layers)
    results = {}

    def evaluate_every(step: int, model, name=name, seed=seed, results=results) -> dict:
        if step % cfg.rlvr_eval_every == 0:
            results["final"] = checkpoint(name, seed, step * replies_per_step, model)
        return {}

    log = grpo_train(policy, rlvr_tokenizer, [p["prompt"] for p in rlvr_train],
                     [p["answer"] for p in rlvr_train], train_reward, config,
                     callback=evaluate_every, desc=f"{name} seed={seed}")
    rlvr_runs.append({"method": name, "seed": seed, **results["final"],
                      "sampled replies": log.responses, "train seconds": log.seconds,
                      "TFLOPs": log.flops / 1e12,
                      "zero-std groups": sum(r["zero_std_groups"] for r in log.history)
                      / len(log.history), "log": log})
    del policy

ei_prompts_per_round = cfg.rlvr_steps * cfg.rlvr_prompts_per_step // cfg.ei_rounds
replies_per_round = ei_prompts_per_round * cfg.rlvr_group_size
for seed in cfg.seeds:
    seed_everything(seed)
    policy = adapter_copy(rlvr_start, cfg.lora_rank, cfg.lora_layers)
    results = {}

    def evaluate_rounds(round_index: int, model, seed=seed, results=results) -> dict:
        replies = round_index * replies_per_round
        if replies % (cfg.rlvr_eval_every * replies_per_step) == 0:
            results["final"] = checkpoint("expert iteration", seed, replies, model)
        return {}

    log = expert_iteration(policy, rlvr_tokenizer, [p["prompt"] for p in rlvr_train],
                           [p["answer"] for p in rlvr_train], train_reward,
                           rounds=cfg.ei_rounds, prompts_per_round=ei_prompts_per_round,
                           samples_per_prompt=cfg.rlvr_group_size,
                           max_new_tokens=cfg.rlvr_max_new_tokens, sft_steps=cfg.ei_sft_steps,
                           lr=cfg.ei_lr, seed=seed, bf16=cfg.bf16,
                           generate_batch_size=cfg.generate_batch_size,
                           callback=evaluate_rounds, desc=f"expert iteration seed={seed}")
    rlvr_runs.append({"method": "expert iteration", "seed": seed, **results["final"],
                      "sampled replies": log.responses, "train seconds": log.seconds,
                      "TFLOPs": log.flops / 1e12, "zero-std groups": float("nan"), "log": log})
    del policy
assert len({r["sampled replies"] for r in rlvr_runs}) == 1, "every method sees as many samples"
timings["RLVR runs"] = sum(r["train seconds"] for r in rlvr_runs)

# %%
def wilson(rate: float, n: int) -> tuple[float, float]:
    """95% Wilson interval of an accuracy `rate` measured on `n` problems."""
    return binomial_interval(round(rate * n), n)


def with_interval(column: str, row: dict) -> str:
    low, high = wilson(row[column], row["n"])
    return f"{row[column]:.3f} [{low:.3f}, {high:.3f}]"


rlvr_rows = [{"method": start_name, "seed": "-", **start_eval, "sampled replies": 0,
              "train seconds": 0.0, "TFLOPs": 0.0, "zero-std groups": float("nan")}]
rlvr_rows += [{k: v for k, v in r.items() if k != "log"} for r in rlvr_runs]
rlvr_table = pd.DataFrame([{
    "method": r["method"], "seed": r["seed"],
    "strict accuracy [95%]": with_interval("accuracy", r),
    "lenient accuracy [95%]": with_interval("lenient_accuracy", r),
    "format rate": r["format_rate"], "EOS rate": r["eos_rate"], "length": r["length"],
    "zero-std groups": r["zero-std groups"], "sampled replies": r["sampled replies"],
    "train seconds": r["train seconds"], "TFLOPs": r["TFLOPs"]} for r in rlvr_rows])
show_table(rlvr_table.set_index(["method", "seed"]), "rlvr", CHAPTER, floatfmt="{:.3f}")

curves = pd.DataFrame(rlvr_curves)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
for ax, column in zip(axes, ("lenient accuracy", "accuracy"), strict=True):
    start_point = curves[curves["seed"] == "-"]
    for (method, seed), part in curves[curves["seed"] != "-"].groupby(["method", "seed"]):
        part = pd.concat([start_point, part])  # every run starts at the start model's point
        style = dict(marker="s", color="k") if method == "expert iteration" else dict(marker=".")
        ax.plot(part["sampled replies"], part[column], label=f"{method}, seed {seed}",
                ls="-" if seed == cfg.seeds[0] else "--", **style)
    ax.set(xlabel="sampled replies", ylabel=f"held-out {column}",
           title=f"{'lenient' if column != 'accuracy' else 'strict'} check, "
                 f"{len(rlvr_eval)} problems, greedy")
axes[0].legend(fontsize=7)
fig.tight_layout()
show_figure(fig, "rlvr_accuracy", CHAPTER)

# %% [markdown]
# Two of the curves should nearly coincide: GRPO and GRPO without the std. With binary
# rewards, a group of $G$ replies of which $k$ are right has a standard deviation that depends
# on $k$ only, and for $G = 4$ it takes two values that differ by 15%;
# so dividing by it rescales every informative group's advantages by almost the same factor,
# and Adam's update is invariant to a constant factor on the gradient (up to its $\epsilon$).
# The check below prints the ratio, the two runs' accuracies at each checkpoint, and whether
# they stay within the Wilson interval of the held-out sampling.

# %%
G = cfg.rlvr_group_size
group_std = {k: torch.tensor([1.0] * k + [0.0] * (G - k)).std().item() for k in range(1, G)}
print(f"std of {G} binary rewards with k right (eq. 9.8, unbiased): "
      + ", ".join(f"k={k}: {v:.3f}" for k, v in group_std.items())
      + f"; largest / smallest = {max(group_std.values()) / min(group_std.values()):.3f}")
pivot = curves[curves["seed"] == cfg.seeds[0]].pivot_table(
    index="sampled replies", columns="method", values="lenient accuracy")
print(pivot[["GRPO", "GRPO, no std"]].to_string(float_format="{:.3f}".format))
std_gap = (pivot["GRPO"] - pivot["GRPO, no std"]).abs()
std_half = max((high - low) / 2 for low, high in (
    binomial_interval(round(a * len(rlvr_eval)), len(rlvr_eval)) for a in pivot["GRPO"]))
print(f"largest |GRPO - GRPO, no std| over checkpoints: {std_gap.max():.3f} (95% Wilson "
      f"half-width up to {std_half:.3f}): the two runs "
      + ("stay within the interval at every checkpoint" if std_gap.max() <= std_half
         else "separate by more than the interval"))

# %% [markdown]
# ### Experiment 2: DPO on the running task, against PPO
#
# DPO trains on exactly the preferences the reward model of 13-07 was trained on
# (`preference_data`: the SFT model's samples, labelled by the gold reward's Bradley-Terry
# draws) and is measured exactly as 13-08 measured PPO: `evaluate_task` on 13-08's held-out
# prompts, one sampled reply per prompt, its gold reward and its KL from the SFT model. The
# policy trains LoRA adapters of the same shape as 13-08's. The reference log-probabilities of
# all pairs are computed once; then we time a few steps with the reference cached and a few
# with it recomputed on every batch, and compare their losses. (The toy check above asserts
# that the cache equals the recomputation; here the recomputation runs in other batches, and
# AdamW can amplify rounding differences from step to step, so the gap is printed.)

# %%
from ftbook.reward_modeling import RM_CONFIGS, preference_data
from ftbook.rlhf_ppo import (  # 13-08
    PPO_CONFIGS,
    PolicyWithValue,
    evaluate_task,
    load_running_task,
    rlhf_runs,
)

rm_cfg, ppo_cfg = pick(PROFILE, RM_CONFIGS), pick(PROFILE, PPO_CONFIGS)
with Timer(DEVICE) as timer:
    task = load_running_task(PROFILE, ppo_cfg, SEED, DEVICE)  # 13-08's prompts, RM and gold
    ppo = rlhf_runs(PROFILE, DEVICE, SEED)  # 13-08's runs, from its cache
timings["13-08's task and PPO runs (load)"] = timer.seconds
with Timer(DEVICE) as timer:
    pairs = preference_data(PROFILE, DEVICE)  # 13-07's pairs, from its cache
timings["preference pairs (13-07's preference_data)"] = timer.seconds
dpo_train_examples = encode_dpo_pairs(tokenizer, pairs["train"], rm_cfg.max_len)
dpo_heldout_examples = encode_dpo_pairs(tokenizer, pairs["validation"], rm_cfg.max_len)
pair_lengths = [len(p) + len(c) for p, c, _ in dpo_train_examples] + \
    [len(p) + len(r) for p, _, r in dpo_train_examples]
print(f"{len(dpo_train_examples)} training pairs, {len(dpo_heldout_examples)} held-out pairs; "
      f"gold reward gap chosen - rejected: "
      f"{sum(r['gold_chosen'] - r['gold_rejected'] for r in pairs['train']) / len(pairs['train']):+.3f}")

with Timer(DEVICE) as timer:
    ref_cache = precompute_reference_logps(sft_model, dpo_train_examples,
                                           tokenizer.pad_token_id, cfg.dpo_batch_size)
precompute_seconds = timer.seconds
heldout_ref_cache = precompute_reference_logps(sft_model, dpo_heldout_examples,
                                               tokenizer.pad_token_id, cfg.dpo_batch_size)
precompute_flops = batch_flops(sft_model, pair_lengths, cfg.dpo_batch_size, False)
timing_logs = {}
for mode in ("cached", "recomputed"):
    seed_everything(0)
    policy = adapter_copy(sft_model, cfg.lora_rank, cfg.lora_layers)
    reference = {"ref_logps": ref_cache} if mode == "cached" else {"ref_model": sft_model}
    timing_logs[mode] = dpo_train(policy, dpo_train_examples, beta=cfg.dpo_beta,
                                  steps=cfg.timing_steps, batch_size=cfg.dpo_batch_size,
                                  lr=cfg.dpo_lr, pad_token_id=tokenizer.pad_token_id, seed=0,
                                  bf16=cfg.bf16, desc=f"DPO timing ({mode})", **reference)
    del policy
per_step = {m: sorted(log.step_seconds)[len(log.step_seconds) // 2] for m, log in
            timing_logs.items()}
loss_gap = max(abs(a - b) for a, b in zip(timing_logs["cached"].losses,
                                          timing_logs["recomputed"].losses, strict=True))
timing_table = pd.DataFrame({
    "median seconds / step": per_step,
    "FLOPs / step": {m: log.flops / cfg.timing_steps for m, log in timing_logs.items()},
    "one-off precompute seconds": {"cached": precompute_seconds, "recomputed": 0.0}})
show_table(timing_table, "reference_cache", CHAPTER, floatfmt="{:.3g}")
saving = per_step["recomputed"] - per_step["cached"]
print(f"the cache saves {100 * saving / per_step['recomputed']:.0f}% of a step's time and "
      f"{100 * (1 - timing_table['FLOPs / step']['cached'] / timing_table['FLOPs / step']['recomputed']):.0f}%"
      f" of its FLOPs; " + (f"the one-off precompute is repaid after "
                           f"{precompute_seconds / saving:.1f} steps; " if saving > 0 else
                           "no time saving measurable at this size; ")
      + f"max |loss cached - recomputed| = {loss_gap:.1e} (first step "
      f"{abs(timing_logs['cached'].losses[0] - timing_logs['recomputed'].losses[0]):.1e})")

# %% [markdown]
# Now the DPO runs: every $\beta$ of the frontier with every seed (the seed changes the order
# of the pairs and the evaluation's samples). Each trained policy is evaluated on 13-08's
# held-out prompts, and on the held-out pairs by its implicit reward.

# %%
dpo_runs, dpo_logs, dpo_samples = [], {}, {}
for beta in cfg.dpo_betas:
    for seed in cfg.seeds:
        seed_everything(seed)
        policy = adapter_copy(sft_model, cfg.lora_rank, cfg.lora_layers)
        log = dpo_train(policy, dpo_train_examples, beta=beta, steps=cfg.dpo_steps,
                        batch_size=cfg.dpo_batch_size, lr=cfg.dpo_lr,
                        pad_token_id=tokenizer.pad_token_id, seed=seed, ref_logps=ref_cache,
                        bf16=cfg.bf16, desc=f"DPO beta={beta} seed={seed}")
        with Timer(DEVICE) as timer:
            columns, rollouts = evaluate_task(PolicyWithValue(policy), task, ppo_cfg, seed)
        heldout = evaluate_dpo_pairs(policy, dpo_heldout_examples, heldout_ref_cache, beta,
                                     tokenizer.pad_token_id, cfg.dpo_batch_size)
        dpo_runs.append({"method": "DPO", "beta": beta, "seed": seed,
                         **{k: v.mean().item() for k, v in columns.items()},
                         "heldout pair accuracy": heldout["accuracy"],
                         "seconds": sum(log.step_seconds) + precompute_seconds,
                         "flops": log.flops + precompute_flops})
        dpo_logs[(beta, seed)] = log
        dpo_samples[(beta, seed)] = [r for rollout in rollouts for r in task.replies(rollout)]
        del policy
timings["DPO runs (training)"] = sum(sum(log.step_seconds) for log in dpo_logs.values())
dpo_table = pd.DataFrame(dpo_runs)
show_table(dpo_table.set_index(["beta", "seed"])[
    ["gold_reward", "sentiment", "well_formed", "proxy_reward", "kl", "heldout pair accuracy",
     "length", "eos_rate"]], "dpo_runs", CHAPTER, floatfmt="{:.3f}")

main_log = dpo_logs[(cfg.dpo_beta, cfg.seeds[0])]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
axes[0].plot(main_log.losses, label="loss (9.5)")
axes[0].plot(main_log.accuracies, label="pair accuracy (batch)")
axes[0].axhline(math.log(2), color="grey", lw=0.8, ls=":")
axes[0].set(xlabel="step", title=f"DPO, beta = {cfg.dpo_beta}")
axes[0].legend(fontsize=8)
axes[1].plot(main_log.chosen_rewards, label="chosen")
axes[1].plot(main_log.rejected_rewards, label="rejected")
axes[1].plot(main_log.margins, label="margin")
axes[1].axhline(0, color="grey", lw=0.8, ls=":")
axes[1].set(xlabel="step", ylabel=r"implicit reward $\beta \log \pi_\theta / \pi_{ref}$",
            title="implicit rewards on the training batch")
axes[1].legend(fontsize=8)
fig.tight_layout()
show_figure(fig, "dpo_training", CHAPTER)

# %% [markdown]
# **The reward-KL frontier** (the DPO paper's Figure 2, scaled down): the held-out gold reward
# against the KL from the SFT model, for DPO at each $\beta$ and for 13-08's PPO at each of its
# $\beta$, the mean over seeds with 95% intervals over seeds on both axes, and the SFT policy at
# the origin with its sampling interval. A method whose points lie up and to the left achieves
# more gold reward for the same divergence.
#
# To compare at *equal* KL we read PPO's frontier at each DPO point's KL, interpolating
# linearly between the SFT point and PPO's points sorted by KL; the difference of gold rewards
# has a standard error from the seed spreads of both (8.15 for each).

# %%
ppo_table = ppo.table()
ppo_recipe = ppo_table[ppo_table["arm"] == "recipe"]
sft_eval = pd.DataFrame(ppo.sft)
n_eval = len(sft_eval)
sft_gold, sft_se = sft_eval["gold_reward"].mean(), sft_eval["gold_reward"].std() / math.sqrt(n_eval)


def frontier_points(runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for beta, group in runs.groupby("beta"):
        kl, kl_half = mean_interval(group["kl"].tolist())
        gold_mean, gold_half = mean_interval(group["gold_reward"].tolist())
        rows.append({"beta": beta, "seeds": len(group), "kl": kl, "kl ±": kl_half,
                     "gold": gold_mean, "gold ±": gold_half,
                     "gold SE": group["gold_reward"].std(ddof=1) / math.sqrt(len(group))})
    return pd.DataFrame(rows).sort_values("kl")


ppo_points, dpo_points = frontier_points(ppo_recipe), frontier_points(dpo_table)
ppo_kls = [0.0] + ppo_points["kl"].tolist()
ppo_golds = [sft_gold] + ppo_points["gold"].tolist()
ppo_ses = [sft_se] + ppo_points["gold SE"].tolist()
equal_kl = []
for _, row in dpo_points.iterrows():
    kl = min(row["kl"], ppo_kls[-1])  # beyond PPO's farthest point: compare with that point
    j = next(i for i in range(1, len(ppo_kls)) if ppo_kls[i] >= kl or i == len(ppo_kls) - 1)
    w = (kl - ppo_kls[j - 1]) / (ppo_kls[j] - ppo_kls[j - 1]) if ppo_kls[j] > ppo_kls[j - 1] else 1.0
    ppo_gold = (1 - w) * ppo_golds[j - 1] + w * ppo_golds[j]
    ppo_se = math.hypot((1 - w) * ppo_ses[j - 1], w * ppo_ses[j])
    difference = row["gold"] - ppo_gold
    se = math.hypot(row["gold SE"], ppo_se)
    equal_kl.append({"DPO beta": row["beta"], "KL (DPO)": row["kl"], "gold (DPO)": row["gold"],
                     "gold (PPO at that KL)": ppo_gold, "DPO - PPO": difference, "SE": se,
                     "difference / SE": difference / se})
show_table(pd.DataFrame(equal_kl).set_index("DPO beta"), "equal_kl", CHAPTER,
           floatfmt="{:.3f}")

fig, ax = plt.subplots(figsize=(6.6, 4.4))
ax.errorbar([0.0], [sft_gold], yerr=[1.96 * sft_se], marker="*", ms=12, color="k",
            capsize=3, label="SFT")
for points, label, marker in ((ppo_points, "PPO (13-08)", "s"), (dpo_points, "DPO", "o")):
    ax.errorbar(points["kl"], points["gold"], xerr=points["kl ±"], yerr=points["gold ±"],
                marker=marker, capsize=3, label=f"{label}, mean over seeds")
    for _, row in points.iterrows():
        ax.annotate(rf"$\beta$={row['beta']:g}", (row["kl"], row["gold"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 3))
ax.set(xlabel=r"KL$(\pi_\theta \| \pi_\mathrm{SFT})$ per reply (nats, $k_1$, held-out)",
       ylabel="gold reward (held-out)", title="Reward vs KL on the running task")
ax.legend(fontsize=8)
show_figure(fig, "frontier", CHAPTER)

# %% [markdown]
# ### The comparison: SFT, PPO, DPO and GRPO
#
# One table per task, one row per method: the mean over seeds of what the task measures, its
# spread over seeds (max - min), the KL from the start model where it is measured, and the
# cost: wall time of training and model FLOPs (workbench eqs. A.1-A.3). PPO's cost includes
# sampling, the reference and reward-model passes and the value head's training, but not the
# training of the reward model in 13-07 (printed below the table); DPO's includes the
# reference pass over the pairs but not sampling them (the same samples trained the reward
# model). On arithmetic, GRPO and expert iteration see the same number of sampled replies.

# %%
main_ppo = ppo_recipe[ppo_recipe["beta"] == ppo_cfg.main_beta]
main_dpo = dpo_table[dpo_table["beta"] == cfg.dpo_beta]


def summary(name: str, runs: pd.DataFrame, column: str, kl: bool = True) -> dict:
    return {"method": name, "seeds": len(runs), column: runs[column].mean(),
            f"{column} spread (seeds)": runs[column].max() - runs[column].min(),
            "KL (k1)": runs["kl"].mean() if kl else float("nan"),
            "train seconds": runs["seconds"].mean(), "TFLOPs": runs["flops"].mean() / 1e12}


sentiment_rows = [
    {"method": "SFT", "seeds": 1, "gold_reward": sft_gold, "KL (k1)": 0.0},
    summary(f"PPO (beta = {ppo_cfg.main_beta:g}, 13-08)", main_ppo, "gold_reward"),
    summary(f"DPO (beta = {cfg.dpo_beta:g})", main_dpo, "gold_reward")]
show_table(pd.DataFrame(sentiment_rows).set_index("method"), "comparison_sentiment", CHAPTER,
           floatfmt="{:.3f}")
distinct_replies = ({(r["prompt"], r["chosen"]) for r in pairs["train"]}
                    | {(r["prompt"], r["rejected"]) for r in pairs["train"]})
rm_feature_flops = len(distinct_replies) * transformer_flops(
    sft_model, 1, round(sum(pair_lengths) / len(pair_lengths)), False)
print(f"standard error of one gold-reward mean: ~{sft_se:.3f}; 13-07's reward model (a head on "
      f"frozen features, which PPO needs): one forward pass over {len(distinct_replies)} "
      f"distinct replies, ~{rm_feature_flops / 1e12:.2f} TFLOPs")

rlvr_frame = pd.DataFrame([{k: v for k, v in r.items() if k != "log"} for r in rlvr_runs])
rlvr_frame = rlvr_frame.rename(columns={"train seconds": "seconds"})
rlvr_frame["flops"] = rlvr_frame["TFLOPs"] * 1e12
arithmetic_rows = [{"method": start_name, "seeds": 1, "accuracy": start_eval["accuracy"],
                    "lenient_accuracy": start_eval["lenient_accuracy"]}]
for method in ("GRPO", "expert iteration"):
    part = rlvr_frame[rlvr_frame["method"] == method]
    arithmetic_rows.append({**summary(method, part, "lenient_accuracy", kl=False),
                            "accuracy": part["accuracy"].mean()})
show_table(pd.DataFrame(arithmetic_rows).set_index("method").drop(columns=["KL (k1)"]),
           "comparison_arithmetic", CHAPTER, floatfmt="{:.3f}")

# %% [markdown]
# One held-out prompt of the running task, answered by each policy (first seed):

# %%
main_ppo_run = next(r for r in ppo.runs if r["arm"] == "recipe"
                    and r["beta"] == ppo_cfg.main_beta)
sample_rows = []
for i in range(min(3, n_eval)):
    sample_rows.append({"prompt": ppo.eval_messages[i].split(": ", 1)[-1],
                        "SFT": ppo.sft_replies[i][:70],
                        f"PPO (beta = {ppo_cfg.main_beta:g})": main_ppo_run["replies"][i][:70],
                        f"DPO (beta = {cfg.dpo_beta:g})":
                            dpo_samples[(cfg.dpo_beta, cfg.seeds[0])][i][:70]})
show_table(pd.DataFrame(sample_rows).set_index("prompt"), "samples", CHAPTER)
show_table(pd.DataFrame({"seconds": timings}), "timings", CHAPTER, floatfmt="{:.1f}")

# %% [markdown]
# ## Results and discussion
#
# The numbers below are printed by the run; the lines that start with a claim ("so ...") are
# chosen by a condition on those numbers, and the prose after each block says only what holds
# whatever they turn out to be.
#
# **RLVR: what GRPO changes.** The start model and each GRPO seed on the held-out problems,
# with 95% Wilson intervals (they hold the sampling of the problems, not the training):

# %%
def pct_interval(rate: float, n: int) -> str:
    low, high = wilson(rate, n)
    return f"{100 * rate:.0f}% [{100 * low:.0f}, {100 * high:.0f}]"


n_rlvr = start_eval["n"]
grpo_seeds = [r for r in rlvr_runs if r["method"] == "GRPO"]
ei_seeds = [r for r in rlvr_runs if r["method"] == "expert iteration"]
print(f"{start_name}: on {n_rlvr} held-out problems, lenient accuracy "
      f"{pct_interval(start_eval['lenient_accuracy'], n_rlvr)}, strict "
      f"{pct_interval(start_eval['accuracy'], n_rlvr)}; format rate "
      f"{start_eval['format_rate']:.2f}, EOS rate {start_eval['eos_rate']:.2f}, mean length "
      f"{start_eval['length']:.1f} tokens (limit {cfg.rlvr_max_new_tokens})")
for r in grpo_seeds:
    print(f"GRPO seed {r['seed']} ({cfg.rlvr_steps} steps of {replies_per_step} sampled replies): "
          f"lenient {pct_interval(r['lenient_accuracy'], r['n'])}, strict "
          f"{pct_interval(r['accuracy'], r['n'])}; EOS rate {r['eos_rate']:.2f}, mean length "
          f"{r['length']:.1f} tokens")
start_high = wilson(start_eval["lenient_accuracy"], n_rlvr)[1]
start_low = wilson(start_eval["lenient_accuracy"], n_rlvr)[0]
above = [wilson(r["lenient_accuracy"], r["n"])[0] > start_high for r in grpo_seeds]
below = [wilson(r["lenient_accuracy"], r["n"])[1] < start_low for r in grpo_seeds]
print("so: " + ("every GRPO seed's lenient interval lies above the start model's: GRPO raises "
                "the accuracy beyond the sampling of the problems" if all(above) else
                "every GRPO seed's lenient interval lies below the start model's: GRPO lowers "
                "the accuracy" if all(below) else
                f"{sum(above)} of {len(grpo_seeds)} GRPO seeds lie above the start model beyond "
                "the intervals: no consistent gain"))
shorter = all(r["length"] < start_eval["length"] and r["eos_rate"] > start_eval["eos_rate"]
              for r in grpo_seeds)
print("so: " + ("in every seed the replies are shorter and end before the limit more often "
                "than the start model's" if shorter else
                "the replies are not shorter with more EOS in every seed"))
best_strict = max(rlvr_runs, key=lambda r: r["accuracy"])
print("so: " + ("the strict accuracy is 0 in every run, the start model's included: no run "
                "learned to answer with the bare number"
                if best_strict["accuracy"] == 0 and start_eval["accuracy"] == 0 else
                f"the strict accuracy reaches {pct_interval(best_strict['accuracy'], n_rlvr)} "
                f"at most ({best_strict['method']}, seed {best_strict['seed']})"))

# %% [markdown]
# GRPO is trained on the lenient check, so the strict one measures only what the lenient reward
# did not ask for; whatever the two columns show, an RLVR result is a result about its checker.
# The lengths and EOS rates say whether the policy learned to state the sum and stop, or to
# be right some other way.
#
# **Seeds and variants.** The two GRPO seeds against each other, and each variant (first seed)
# against the band the GRPO seeds span: a variant is called distinguishable when its distance
# from that band exceeds the combined half-widths of the Wilson intervals.

# %%
def half_width(rate: float, n: int) -> float:
    low, high = wilson(rate, n)
    return (high - low) / 2


grpo_acc = [r["lenient_accuracy"] for r in grpo_seeds]
seed_gap = max(grpo_acc) - min(grpo_acc)
largest_half = max(half_width(a, n_rlvr) for a in grpo_acc)
print(f"GRPO seeds: lenient {', '.join(f'{100 * a:.0f}%' for a in grpo_acc)}; they differ by "
      f"{100 * seed_gap:.0f} points, interval half-widths up to +-{100 * largest_half:.0f} points")
print("so: " + ("the seed-to-seed spread is larger than either seed's interval: training "
                "noise, not only the sampling of the problems, sets the uncertainty"
                if seed_gap > largest_half else
                "the seed-to-seed spread is within the intervals"))
grpo_band = (min(grpo_acc), max(grpo_acc))
grpo_first = next(r for r in grpo_seeds if r["seed"] == cfg.seeds[0])
variants = [r for r in rlvr_runs if r["method"] not in ("GRPO", "expert iteration")]
distinguishable = []
for r in variants:
    distance = max(0.0, grpo_band[0] - r["lenient_accuracy"], r["lenient_accuracy"] - grpo_band[1])
    limit = math.hypot(half_width(r["lenient_accuracy"], r["n"]), largest_half)
    if distance > limit:
        distinguishable.append(r["method"])
    print(f"{r['method']} (seed {r['seed']}): lenient {pct_interval(r['lenient_accuracy'], r['n'])}"
          f", EOS rate {r['eos_rate']:.2f}, mean length {r['length']:.1f}; distance from GRPO's "
          f"band {100 * distance:.0f} points (limit {100 * limit:.0f})")
print("so: " + ("none of the variants is distinguishable from GRPO in accuracy"
                if not distinguishable else
                f"distinguishable from GRPO in accuracy: {', '.join(distinguishable)}"))
dr = next(r for r in variants if r["method"] == "Dr. GRPO")
dr_high = wilson(dr["eos_rate"], dr["n"])[1]
grpo_eos_low = wilson(grpo_first["eos_rate"], grpo_first["n"])[0]
dr_low = wilson(dr["eos_rate"], dr["n"])[0]
grpo_eos_high = wilson(grpo_first["eos_rate"], grpo_first["n"])[1]
print(f"EOS rate, Dr. GRPO {pct_interval(dr['eos_rate'], dr['n'])} against GRPO (same seed) "
      f"{pct_interval(grpo_first['eos_rate'], grpo_first['n'])}")
print("so: " + ("Dr. GRPO's replies run to the length limit more often than GRPO's, beyond both "
                "intervals" if dr_high < grpo_eos_low else
                "Dr. GRPO's replies end before the limit more often than GRPO's, beyond both "
                "intervals" if dr_low > grpo_eos_high else
                "Dr. GRPO's and GRPO's EOS rates are not distinguishable"))

# %% [markdown]
# The Wilson intervals do not contain the training's randomness; with two seeds, the spread
# between them is the only measure of it we have, and a variant run with one seed can only be
# told apart from GRPO by more than that. Dr. GRPO differs from the `GRPO, no std` run only in
# the length normaliser of (9.9), so where their EOS rates and lengths differ, that normaliser
# is the cause.
#
# **DPO against PPO.** The DPO runs (every $\beta$ and seed), their held-out gold reward
# against the SFT policy's, the comparison at equal KL (the `equal_kl` table), how far PPO's
# own runs went, and DPO's held-out pair accuracy against 13-07's reward model on the same
# held-out pairs (its held-out accuracy, computed here with one pass over them):

# %%
from ftbook.reward_modeling import encode_preference_pairs, evaluate_reward_model

gains = dpo_table["gold_reward"] - sft_gold
seen_pairs = min(cfg.dpo_steps * cfg.dpo_batch_size, len(pairs["train"]))


def in_se(value: float, se: float) -> float:
    return value / se if se > 0 else float("nan")  # nan: no spread measured


print(f"DPO: {cfg.dpo_steps} steps of {cfg.dpo_batch_size} pairs ({seen_pairs} of the "
      f"{len(pairs['train'])} pairs) at beta = "
      f"{', '.join(f'{b:g}' for b in cfg.dpo_betas)}: KL {dpo_table['kl'].min() + 0.0:.2f} to "
      f"{dpo_table['kl'].max() + 0.0:.2f} nats per reply; gold reward {sft_gold:.2f} (SFT) changed by "
      f"{gains.min():+.2f} to {gains.max():+.2f} run by run, at most "
      f"{in_se(gains.abs().max(), sft_se):.1f} standard errors ({sft_se:.2f}) of the SFT mean")
equal = pd.DataFrame(equal_kl)
ratios = equal["difference / SE"]
print(f"at equal KL, DPO - PPO = {equal['DPO - PPO'].min():+.2f} to {equal['DPO - PPO'].max():+.2f}"
      f" (difference / SE {ratios.min():+.1f} to {ratios.max():+.1f})")
finite = ratios[ratios.apply(math.isfinite)]
if finite.empty:
    verdict = "no equal-KL difference has a measured standard error: nothing to distinguish"
elif (finite.abs() < 2).all():
    verdict = ("at equal KL the two methods are not distinguishable here (every difference "
               "under two standard errors); this run neither confirms nor contradicts the DPO "
               "paper's frontier")
elif (finite > 2).all():
    verdict = "at equal KL DPO's gold reward is above PPO's by more than two standard errors"
elif (finite < -2).all():
    verdict = "at equal KL DPO's gold reward is below PPO's by more than two standard errors"
else:
    verdict = "at equal KL the sign of DPO - PPO beyond two standard errors depends on beta"
print("so: " + verdict)
for points, name in ((ppo_points, "PPO (13-08)"), (dpo_points, "DPO")):
    far = points.loc[points["kl"].idxmax()]
    se = math.hypot(far["gold SE"], sft_se) if math.isfinite(far["gold SE"]) else sft_se
    print(f"{name}, farthest point (beta = {far['beta']:g}): KL {far['kl']:.2f}, gold "
          f"{far['gold'] - sft_gold:+.2f} over SFT ({in_se(far['gold'] - sft_gold, se):+.1f} "
          f"standard errors)")
rm_heldout = evaluate_reward_model(
    task.reward_model, encode_preference_pairs(task.rm_tokenizer, pairs["validation"],
                                               rm_cfg.max_len),
    task.rm_tokenizer.pad_token_id)["accuracy"]
n_pairs_heldout = len(pairs["validation"])
dpo_acc = dpo_table["heldout pair accuracy"]
print(f"held-out pair accuracy ({n_pairs_heldout} pairs): DPO {dpo_acc.min():.2f} to "
      f"{dpo_acc.max():.2f} over runs; 13-07's reward model "
      f"{rm_heldout:.2f} [{wilson(rm_heldout, n_pairs_heldout)[0]:.2f}, "
      f"{wilson(rm_heldout, n_pairs_heldout)[1]:.2f}]")
inside = all(wilson(a, n_pairs_heldout)[0] <= rm_heldout <= wilson(a, n_pairs_heldout)[1]
             for a in dpo_acc)
print("so: " + ("the reward model's accuracy lies inside every DPO run's interval: the implicit "
                "reward learned about as much as the explicit one" if inside else
                "the reward model's accuracy lies outside some DPO run's interval"))

# %% [markdown]
# Where the equal-KL differences are within their standard errors, what separates the methods
# in this budget is how far each got from the reference, not the trade each makes. The DPO
# paper's Figure 2 places DPO's frontier above PPO's on IMDb, with models and step counts far
# beyond ours. The held-out pairs are labelled by Bradley-Terry draws of the gold reward, so no
# ranker reaches 100% on them; the reward model is the natural yardstick for the implicit
# reward.
#
# **Cost.** What the reference cache saves, and each method's cost per run (the comparison
# tables above):

# %%
repay = precompute_seconds / saving if saving > 0 else math.inf
print(f"the cache saves {saving:.2f} s of a {per_step['recomputed']:.2f} s step; its precompute "
      f"over all {len(dpo_train_examples)} pairs takes {precompute_seconds:.1f} s, repaid after "
      f"{repay:.1f} steps; the runs take {cfg.dpo_steps}")
print("so: " + (f"the cache pays within the {cfg.dpo_steps} steps" if repay <= cfg.dpo_steps
                else "at this size the cache does not pay within the run"))
grpo_part = rlvr_frame[rlvr_frame["method"] == "GRPO"]
ei_part = rlvr_frame[rlvr_frame["method"] == "expert iteration"]
per_run = {f"PPO (beta = {ppo_cfg.main_beta:g})": (main_ppo["flops"].mean(),
                                                  main_ppo["seconds"].mean()),
           f"DPO (beta = {cfg.dpo_beta:g}, precompute included)": (main_dpo["flops"].mean(),
                                                                   main_dpo["seconds"].mean()),
           "GRPO": (grpo_part["flops"].mean(), grpo_part["seconds"].mean()),
           "expert iteration": (ei_part["flops"].mean(), ei_part["seconds"].mean())}
print("per run: " + "; ".join(f"{name} {flops / 1e12:.3g} TFLOPs, {seconds:.0f} s"
                              for name, (flops, seconds) in per_run.items()))

# %% [markdown]
# PPO's figure leaves out 13-07's reward model, which it needs and DPO does not (printed below
# the comparison table); GRPO and expert iteration need neither, only the checker. Wall times
# are those of this machine; the FLOPs are a property of the runs.
#
# **Expert iteration against GRPO**, at the same number of sampled replies, with the share of
# GRPO's groups whose rewards were all equal (the `zero-std groups` column), which give no
# gradient:

# %%
ei_acc = [r["lenient_accuracy"] for r in ei_seeds]
grpo_mean, ei_mean = sum(grpo_acc) / len(grpo_acc), sum(ei_acc) / len(ei_acc)
zero_std = sum(r["zero-std groups"] for r in grpo_seeds) / len(grpo_seeds)
flops_ratio = ei_part["flops"].mean() / grpo_part["flops"].mean()
time_ratio = ei_part["seconds"].mean() / grpo_part["seconds"].mean()
print(f"lenient accuracy on the same {grpo_seeds[0]['sampled replies']} sampled replies: expert "
      f"iteration {', '.join(f'{100 * a:.0f}%' for a in ei_acc)} (mean {100 * ei_mean:.0f}%), "
      f"GRPO {', '.join(f'{100 * a:.0f}%' for a in grpo_acc)} (mean {100 * grpo_mean:.0f}%); "
      f"expert iteration at {flops_ratio:.2f} x GRPO's FLOPs and {time_ratio:.2f} x its wall time;"
      f" zero-std groups in GRPO: {100 * zero_std:.0f}%")
ei_band = (min(wilson(a, n_rlvr)[0] for a in ei_acc), max(wilson(a, n_rlvr)[1] for a in ei_acc))
grpo_span = (min(wilson(a, n_rlvr)[0] for a in grpo_acc),
             max(wilson(a, n_rlvr)[1] for a in grpo_acc))
overlap = ei_band[0] <= grpo_span[1] and grpo_span[0] <= ei_band[1]
cheaper = flops_ratio < 1
print("so: " + (("expert iteration is not distinguishable from GRPO (the seeds' intervals "
                 "overlap)") if overlap else
                "expert iteration is above GRPO beyond every seed's interval"
                if ei_band[0] > grpo_span[1] else
                "expert iteration is below GRPO beyond every seed's interval")
      + (f", at {flops_ratio:.2f} x the FLOPs" if cheaper else
         f", and costs {flops_ratio:.2f} x the FLOPs"))

# %% [markdown]
# A group whose replies are all right or all wrong has zero advantages, eq. (9.8), and
# contributes nothing to GRPO's gradient; expert iteration spends no backward pass on the wrong
# replies at all. So the larger the zero-std share, the more of GRPO's backward passes carry no
# signal, and the more a cheaper filter-and-imitate loop can keep up. With a
# reward that is right far more or less often, or with more steps, the balance may change; a
# budget of this size does not tell.
#
# ## Pitfalls
#
# - **`log(sigmoid(.))` in the DPO loss.** It overflows to infinity for margins below about
#   $-104$ nats in float32 (shown above); `logsigmoid` is exact. A DPO loss that goes to 0 is not
#   success either: the implicit-reward margins have diverged, which with a finite preference set
#   means overfitting; watch the held-out pair accuracy and the KL.
# - **Both likelihoods falling.** (9.6) only asks the chosen reply to gain on the rejected one;
#   the chosen reply's own log-probability often falls too (the "chosen" implicit reward in the
#   training figure), moving mass to replies nobody compared (Pal et al. 2024, arXiv:2402.13228).
#   The tabular example makes the reason exact: DPO pins down log-ratios only on replies that
#   appear in pairs.
# - **A reference that drifts.** The reference must be the frozen SFT model. Recomputing it from a
#   model that shares weights with the policy (an adapter left enabled, a `deepcopy` forgotten)
#   silently turns DPO into a different objective; the cache makes the reference immutable.
# - **Re-tokenizing samples.** GRPO's ratio and the KL must use the sampled token ids;
#   decoding and tokenizing again can merge or split tokens differently.
# - **The GRPO loss reads 0.** On policy, the reported loss is exactly 0 whatever is learned
#   (shown above); watch the reward, the KL and the gradient norm instead.
# - **All-equal groups.** Prompts that are always or never solved give zero advantages; the
#   `zero_std_groups` column of the training log says how much of each batch was wasted.
#   Without the $\epsilon$ of (9.8) they would divide by zero.
# - **Off-policy without clipping.** Several optimizer steps on one batch need the importance
#   ratio and its clip; `GRPOConfig` refuses `epochs_per_batch > 1` with the other loss types.
#
# ## Summary
#
# - The KL-regularised objective (9.1) has the closed-form optimum (9.2); solving it for the reward
#   (9.3) turns the Bradley-Terry likelihood into a likelihood of the policy (9.4), and its
#   negative log is the DPO loss (9.5). On an enumerable problem, minimising (9.5) lands on
#   $\pi^* \propto \pi_\text{ref} e^{r / \beta}$ to optimiser precision.
# - `dpo_train` caches the reference's log-probabilities once; `per_instance_dpo_loss` keeps
#   CS336's contract with the book's chat template; token ids, reference log-probabilities and the
#   loss match TRL's `DPOTrainer` exactly.
# - GRPO replaces the value network by the group mean (9.8); its six CS336 functions are checked on
#   hand-made tensors, and the Dr. GRPO variants (9.9) remove the std and length normalisations.
# - A verifiable reward (9.10) makes RL on arithmetic need no reward model; expert iteration is
#   the binary-reward policy gradient without a baseline (9.11), checked exactly.
#
# ## Exercises
#
# 1. Add the IPO loss (Azar et al. 2023, arXiv:2310.12036), $(\hat r_\theta(y_w) - \hat r_\theta(y_l)
#    - 1/(2\beta))^2$ with implicit rewards averaged over tokens, to `dpo_loss`, and show on the
#    tabular problem that with deterministic preferences ($r_i - r_j \to \infty$) IPO's optimum
#    stays at a finite distance from $\pi_\text{ref}$ while DPO's does not.
# 2. Replace the group mean of (9.8) by the leave-one-out mean (RLOO) and show that the
#    advantages change by the factor $G / (G - 1)$ exactly.
# 3. On the arithmetic task, give expert iteration the wrong replies too, with SFT weight $-0.1$
#    (unlikelihood). Does it close the gap to GRPO?
# 4. Run DPO on pairs sampled from the DPO policy itself every few steps (online DPO) with the
#    reward model as the labeller. Where do its points fall on the frontier?
#
# ## References
#
# - Rafailov, Sharma, Mitchell, Ermon, Manning & Finn (2023), *Direct Preference Optimization:
#   Your Language Model is Secretly a Reward Model*, arXiv:2305.18290, §4 (derivation and
#   gradient), §5 (the implicit reward), §6.1 and Fig. 2 (IMDb sentiment frontier).
# - Shao et al. (2024), *DeepSeekMath*, arXiv:2402.03300, §4.1 (GRPO, eq. 3 and Algorithm 1).
# - Liu et al. (2025), *Understanding R1-Zero-Like Training: A Critical Perspective*,
#   arXiv:2503.20783, §3 (the biases of GRPO, Dr. GRPO).
# - DeepSeek-AI (2025), *DeepSeek-R1*, arXiv:2501.12948.
# - Lambert et al. (2024), *Tülu 3: Pushing Frontiers in Open Language Model Post-Training*,
#   arXiv:2411.15124 (RLVR).
# - Anthony, Tian & Barber (2017), *Thinking Fast and Slow with Deep Learning and Tree Search*,
#   arXiv:1705.08439; Zelikman et al. (2022), *STaR*, arXiv:2203.14465; Singh et al. (2023),
#   *Beyond Human Data* (ReST$^{EM}$), arXiv:2312.06585.
# - Azar et al. (2023), *A General Theoretical Paradigm to Understand Learning from Human
#   Preferences* (IPO), arXiv:2310.12036.
# - Pal et al. (2024), *Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive*,
#   arXiv:2402.13228.
# - Cobbe et al. (2021), *Training Verifiers to Solve Math Word Problems* (GSM8K),
#   arXiv:2110.14168.
# - Stanford CS336 (Spring 2025), Assignment 5: alignment and reasoning RL, §§4-7 (expert
#   iteration, GRPO) and the DPO part of its RLHF supplement.
# - TRL documentation: `DPOTrainer`, `DPOConfig` (version 1.15).
