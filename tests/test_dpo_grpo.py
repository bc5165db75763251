"""Tests of ftbook.dpo_grpo (chapter 13-09): the DPO optimum of eqs. (9.2)-(9.5), the DPO loss
against a hand computation and TRL's DPOTrainer, its stability, the GRPO functions with CS336
Assignment 5's contracts on hand-computed tensors, GRPO's convergence to the optimum of a
one-token bandit, the verifiable reward (9.10), and the errors on bad input."""
import copy
import dataclasses
import math
import warnings

import pytest
import torch
from tiny_models import tiny_llama
from transformers import LlamaForCausalLM

from ftbook.dpo_grpo import (
    GRPOConfig,
    TorchChunkedLogProb,
    collate_dpo,
    compute_group_normalized_rewards,
    compute_grpo_clip_loss,
    compute_naive_policy_gradient_loss,
    compute_policy_gradient_loss,
    dpo_loss,
    dpo_train,
    encode_dpo_pair,
    encode_dpo_pairs,
    expert_iteration,
    extract_answer,
    grpo_microbatch_train_step,
    grpo_train,
    masked_mean,
    per_instance_dpo_loss,
    precompute_reference_logps,
    rollout_batch,
    sequence_logps,
    tabular_dpo_fit,
    trl_fused_head_fallback,
    verifiable_reward,
)
from ftbook.rlhf_ppo import forward_tolerance

# Tolerances (Appendix A): float32 checks of a few operations on O(1) numbers use the defaults of
# `allclose` (rtol 1e-5) and `pytest.approx` (rel 1e-6, ~17 unit roundoffs), above the (A.1)
# bound of those operations; float64 checks are far above float64 rounding; forward passes
# compared in float32 use `sequence_tolerance` below.


def sequence_tolerance(models, examples, pad_token_id: int) -> float:
    """How far two float32 computations of a summed reply log-probability of `examples` may
    differ (other batch shapes, other kernels): 13-08's `forward_tolerance` per token, for the
    worst of `models`, times the longest reply."""
    batch = collate_dpo(examples, pad_token_id)
    per_token = max(forward_tolerance(m, {"input_ids": batch["input_ids"][:, :-1]})["logp"]
                    for m in models)
    return per_token * int(batch["response_mask"].sum(1).max())


def perturbed(model: LlamaForCausalLM, scale: float = 0.05, seed: int = 1) -> LlamaForCausalLM:
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return other


@pytest.fixture
def smoke_tokenizer(real_env):
    from ftbook.base_models import load_causal_lm

    return load_causal_lm("smoke")[1]


def table_reward(response: str, ground_truth: str) -> dict[str, float]:
    correct = float(response == ground_truth)
    return {"reward": correct, "format_reward": 1.0, "answer_reward": correct}


# --- DPO: eqs. (9.2)-(9.6) -----------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.1, 1.0, 3.0])
def test_dpo_converges_to_the_closed_form_optimum(beta):
    generator = torch.Generator().manual_seed(0)
    K = 5
    log_ref = torch.log_softmax(torch.randn(K, generator=generator, dtype=torch.float64), 0)
    reward = torch.randn(K, generator=generator, dtype=torch.float64)
    pairs = torch.rand(K, K, generator=generator, dtype=torch.float64) * (1 - torch.eye(K))
    pairs = pairs + pairs.T  # q_ij: how often the unordered pair {i, j} is compared
    weights = pairs / pairs.sum() * torch.sigmoid(reward[:, None] - reward[None, :])
    log_dpo = tabular_dpo_fit(log_ref, weights, beta)
    log_star = torch.log_softmax(log_ref + reward / beta, 0)  # pi_ref exp(r / beta) / Z
    # a known answer: L-BFGS in float64 (gradient tolerance 1e-12) on a smooth convex problem
    assert torch.allclose(log_dpo.exp(), log_star.exp(), atol=1e-7)


def test_dpo_loss_is_ln2_at_the_reference_and_matches_eq_9_6():
    ref_w, ref_l = torch.randn(4), torch.randn(4)
    losses, chosen, rejected = dpo_loss(ref_w, ref_l, ref_w, ref_l, 0.3)
    assert torch.allclose(losses, torch.full((4,), math.log(2)))
    assert torch.equal(chosen, torch.zeros(4)) and torch.equal(rejected, torch.zeros(4))
    policy_w = torch.randn(4, requires_grad=True)
    losses, chosen, rejected = dpo_loss(policy_w, ref_l, ref_w, ref_l, 0.3)
    losses.sum().backward()
    assert torch.allclose(policy_w.grad, -0.3 * torch.sigmoid(rejected - chosen))


@pytest.mark.parametrize("margin", [-1e5, -200.0, 200.0, 1e5])
def test_dpo_loss_is_finite_with_a_gradient_at_extreme_margins(margin):
    for dtype in (torch.float32, torch.bfloat16):
        policy_w = torch.tensor([margin], dtype=dtype, requires_grad=True)
        zero = torch.zeros(1, dtype=dtype)
        losses, _, _ = dpo_loss(policy_w, zero, zero, zero, 1.0)
        losses.sum().backward()
        assert torch.isfinite(losses).all() and torch.isfinite(policy_w.grad).all()
        expected = abs(margin) if margin < 0 else 0.0  # -log sigmoid(m) -> max(-m, 0)
        # rel 1e-2 > bfloat16's unit roundoff 2^-8 (the margin itself is rounded to bfloat16)
        assert losses.item() == pytest.approx(expected, rel=1e-2, abs=1e-6)


def test_dpo_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), 0.0)
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2), 0.1)


def test_per_instance_dpo_loss_matches_a_hand_computation(smoke_tokenizer):
    tok = smoke_tokenizer
    ref_model = tiny_llama(len(tok), tok.pad_token_id)
    lm = perturbed(ref_model)
    beta, prompt = 0.2, "Continue this movie review: the acting"
    chosen, rejected = "is superb.", "is flat and dull."
    loss = per_instance_dpo_loss(lm, ref_model, tok, beta, prompt, chosen, rejected)

    rendered = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                       add_generation_prompt=True, tokenize=False)
    prompt_len = len(tok(rendered, add_special_tokens=False)["input_ids"])

    def logp(model, reply):  # log pi(reply as templated + EOS | prompt), token by token
        conversation = [{"role": "user", "content": prompt},
                        {"role": "assistant", "content": reply}]
        full = tok.apply_chat_template(conversation, tokenize=False)  # ends with EOS
        ids = tok(full, add_special_tokens=False)["input_ids"]
        assert ids[-1] == tok.eos_token_id
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        return sum(log_probs[t - 1, ids[t]].item() for t in range(prompt_len, len(ids)))

    margin = beta * ((logp(lm, chosen) - logp(ref_model, chosen))
                     - (logp(lm, rejected) - logp(ref_model, rejected)))
    expected = math.log1p(math.exp(-margin))  # -log sigmoid(margin)
    # -log sigmoid is 1-Lipschitz: beta times four summed log-probabilities, each computed by two
    # float32 forward passes (one reply alone, or both in one padded batch)
    example = encode_dpo_pair(tok, prompt, chosen, rejected)
    tol = 4 * beta * sequence_tolerance((lm, ref_model), [example], tok.pad_token_id)
    assert loss.item() == pytest.approx(expected, abs=tol)
    loss.backward()  # the gradient reaches the policy, not the reference
    assert lm.model.embed_tokens.weight.grad is not None
    assert ref_model.model.embed_tokens.weight.grad is None


def test_encoding_appends_eos_inside_the_response_mask_and_refuses_long_pairs(smoke_tokenizer):
    tok = smoke_tokenizer
    prompt_ids, chosen_ids, rejected_ids = encode_dpo_pair(tok, "Continue this movie review: a",
                                                           "fine film", "dud")
    assert chosen_ids[-1] == tok.eos_token_id and rejected_ids[-1] == tok.eos_token_id
    batch = collate_dpo([(prompt_ids, chosen_ids, rejected_ids)], tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 2  # chosen first, then rejected
    assert batch["response_mask"].sum(1).tolist() == [len(chosen_ids), len(rejected_ids)]
    with pytest.raises(ValueError, match="record 0, field 'chosen'.*max_len=5"):
        encode_dpo_pairs(tok, [{"prompt": "a b c", "chosen": "long reply", "rejected": "no"}],
                         max_len=5)


@pytest.mark.parametrize("template", ["book", "chatml"])  # ChatML writes "\n" after a turn
def test_dpo_loss_matches_trl_dpo_trainer_on_its_collated_batch(real_env, template, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from ftbook.base_models import load_causal_lm, load_chat_lm
    from ftbook.instruction_tuning import render_prompt
    from ftbook.reward_modeling import reward_model_text

    tok = (load_causal_lm if template == "book" else load_chat_lm)("smoke")[1]
    ref_model = tiny_llama(len(tok), tok.pad_token_id)
    lm = perturbed(ref_model)
    records = [{"prompt": "Continue this movie review: the film", "chosen": "is a delight.",
                "rejected": "is a mess from start to finish."},
               {"prompt": "Continue this movie review: its story", "chosen": "soars.",
                "rejected": "drags."},
               {"prompt": "Continue this movie review: the cast", "chosen": "shines",
                "rejected": "sleepwalks through it"}]
    examples = encode_dpo_pairs(tok, records)
    with warnings.catch_warnings(), trl_fused_head_fallback(force=True):  # CPU tensors
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(
            model=copy.deepcopy(lm), ref_model=copy.deepcopy(ref_model), processing_class=tok,
            train_dataset=Dataset.from_list([  # the rendered text, as the chapter gives it
                {"prompt": render_prompt(tok, r["prompt"]),
                 **{side: reward_model_text(tok, r["prompt"], r[side])[
                     len(render_prompt(tok, r["prompt"])):] for side in ("chosen", "rejected")}}
                for r in records]),
            args=DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False,
                           beta=0.1, per_device_train_batch_size=3))
        rows = [trainer.train_dataset[i] for i in range(len(records))]
        trl_batch = trainer.data_collator(rows)
        with torch.no_grad():
            trl_loss = trainer.compute_loss(trainer.model, dict(trl_batch)).item()
    for row, example in zip(rows, examples, strict=True):
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == example
    with torch.no_grad():
        policy = sequence_logps(lm, collate_dpo(examples, tok.pad_token_id))
        ref_logps = precompute_reference_logps(ref_model, examples, tok.pad_token_id)
        losses, _, _ = dpo_loss(*policy.chunk(2), *ref_logps, 0.1)
    tol = 4 * 0.1 * sequence_tolerance((lm, ref_model), examples, tok.pad_token_id)  # beta = 0.1
    assert abs(trl_loss - math.log(2)) > 5 * tol  # the models differ by more than rounding
    assert losses.mean().item() == pytest.approx(trl_loss, abs=tol)


def test_torch_chunked_log_prob_is_log_softmax_gather():
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(7, 8, generator=generator), torch.randn(11, 8, generator=generator)
    targets = torch.randint(0, 11, (7,), generator=generator)
    log_probs, entropy, _, _, top = TorchChunkedLogProb.apply(
        hidden, weight, None, targets, 2.0, 64, None, 1.0, ("log_probs", "entropy", "is_top1"))
    reference = torch.log_softmax(hidden @ weight.T / 2.0, -1)
    assert torch.allclose(log_probs, reference.gather(-1, targets[:, None]).squeeze(-1))
    # entropies ~2 from 11 terms: (A.1) gives ~2e-6, allclose's rtol 1e-5 adds 2e-5
    assert torch.allclose(entropy, -(reference.exp() * reference).sum(-1), atol=1e-6)
    assert torch.equal(top, reference.argmax(-1) == targets)
    import trl.trainer.utils as trl_utils

    before = trl_utils._ChunkedLogProbFunction
    with trl_fused_head_fallback(force=True) as patched:
        assert patched and trl_utils._ChunkedLogProbFunction is TorchChunkedLogProb
    assert trl_utils._ChunkedLogProbFunction is before  # restored


def test_dpo_train_learns_and_cached_equals_recomputed(smoke_tokenizer):
    tok = smoke_tokenizer
    ref_model = tiny_llama(len(tok), tok.pad_token_id)
    examples = encode_dpo_pairs(tok, [
        {"prompt": f"Continue this movie review: take {i}", "chosen": c, "rejected": r}
        for i, (c, r) in enumerate([("great.", "bad."), ("a joy.", "a bore."),
                                    ("superb.", "awful."), ("moving.", "dull.")])])
    cache = precompute_reference_logps(ref_model, examples, tok.pad_token_id)
    logs = [dpo_train(copy.deepcopy(ref_model), examples, beta=0.5, steps=12, batch_size=2, lr=3e-3,
                      pad_token_id=tok.pad_token_id, seed=0, **reference)
            for reference in ({"ref_logps": cache}, {"ref_model": ref_model})]
    # at the first step the policy is the reference, and each run's log-probabilities differ
    # from the cached ones only by forward-pass rounding (other batch shapes): -log sigmoid is
    # 1-Lipschitz in beta (two replies) times that
    tol = 2 * 0.5 * sequence_tolerance((ref_model,), examples, tok.pad_token_id)
    assert logs[0].losses[0] == pytest.approx(math.log(2), abs=tol)
    assert logs[1].losses[0] == pytest.approx(logs[0].losses[0], abs=2 * tol)
    # (later steps are not compared: AdamW amplifies rounding in near-zero gradients, 13-08)
    assert logs[0].losses[-1] < 0.6 * math.log(2)  # it learns (seeds 0-7: at most 0.12 ln 2)
    assert logs[1].flops > logs[0].flops  # the recomputed reference costs a forward pass
    with pytest.raises(ValueError, match="exactly one"):
        dpo_train(ref_model, examples, beta=0.5, steps=1, batch_size=2, lr=1e-3,
                  pad_token_id=tok.pad_token_id, seed=0)


# --- GRPO: CS336 A5's contracts ------------------------------------------------------------------

def test_group_normalized_rewards_with_and_without_std():
    responses = ["a", "b", "a", "a", "c", "c", "c", "c"]
    truths = ["a"] * 4 + ["c"] * 4
    advantages, raw, meta = compute_group_normalized_rewards(table_reward, responses, truths, 4,
                                                             1e-6, True)
    assert raw.tolist() == [1, 0, 1, 1, 1, 1, 1, 1]
    std = math.sqrt(((0.25) ** 2 * 3 + 0.75 ** 2) / 3)  # unbiased std of (1, 0, 1, 1)
    expected = torch.tensor([0.25, -0.75, 0.25, 0.25]) / (std + 1e-6)
    assert torch.allclose(advantages[:4], expected)
    assert torch.equal(advantages[4:], torch.zeros(4))  # equal rewards, no NaN
    assert meta["zero_std_groups"] == 0.5
    centred, _, _ = compute_group_normalized_rewards(table_reward, responses, truths, 4, 1e-6,
                                                     False)
    assert torch.allclose(centred[:4], torch.tensor([0.25, -0.75, 0.25, 0.25]))
    with_eps, _, _ = compute_group_normalized_rewards(table_reward, responses, truths, 4, 1.0,
                                                      True)
    assert torch.allclose(with_eps[:4], torch.tensor([0.25, -0.75, 0.25, 0.25]) / (std + 1.0))


def test_group_normalized_rewards_errors():
    with pytest.raises(ValueError, match="group_size 3 must be positive and divide"):
        compute_group_normalized_rewards(table_reward, ["a"] * 4, ["a"] * 4, 3, 1e-6, True)
    with pytest.raises(ValueError, match="ground truths"):
        compute_group_normalized_rewards(table_reward, ["a"] * 4, ["a"] * 3, 2, 1e-6, True)
    with pytest.raises(ValueError, match="group_size >= 2"):
        compute_group_normalized_rewards(table_reward, ["a"] * 4, ["a"] * 4, 1, 1e-6, True)
    with pytest.raises(ValueError, match="response 0 returned no"):
        compute_group_normalized_rewards(lambda r, t: {"reward": 1.0}, ["a"] * 2, ["a"] * 2, 2,
                                         1e-6, True)


def test_naive_policy_gradient_loss():
    log_probs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
    loss = compute_naive_policy_gradient_loss(torch.tensor([[2.0], [-1.0]]), log_probs)
    assert torch.equal(loss, torch.tensor([[2.0, 4.0, 6.0], [-0.5, -0.5, -0.5]]))
    assert torch.equal(compute_naive_policy_gradient_loss(torch.tensor([2.0, -1.0]), log_probs),
                       loss)  # (batch,) broadcasts the same way


def test_grpo_clip_loss_and_clip_fraction():
    log_probs = torch.log(torch.tensor([[0.6, 0.3, 0.5], [0.6, 0.3, 0.5]]))
    old = torch.log(torch.tensor([[0.4, 0.4, 0.5], [0.4, 0.4, 0.5]]))  # ratios 1.5, 0.75, 1
    loss, meta = compute_grpo_clip_loss(torch.tensor([[1.0], [-2.0]]), log_probs, old, 0.2)
    expected = torch.tensor([[-1.2, -0.75, -1.0],  # A > 0: min(rho, clip(rho)) A
                             [3.0, 1.6, 2.0]])  # A < 0: the larger of rho, clip(rho)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert meta["clipped"].tolist() == [[True, False, False], [False, True, False]]
    assert meta["clip_fraction"].item() == pytest.approx(2 / 6)
    same, _ = compute_policy_gradient_loss(log_probs, "grpo_clip", advantages=torch.tensor(
        [[1.0], [-2.0]]), old_log_probs=old, cliprange=0.2)
    assert torch.equal(same, loss)


def test_masked_mean():
    values = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 6.0, 8.0]])
    mask = torch.tensor([[True, True, False], [False, True, True]])
    assert masked_mean(values, mask).item() == pytest.approx((1 + 2 + 6 + 8) / 4)
    assert torch.allclose(masked_mean(values, mask, dim=1), torch.tensor([1.5, 7.0]))
    assert torch.allclose(masked_mean(values, mask, dim=0), torch.tensor([1.0, 4.0, 8.0]))


def test_policy_gradient_loss_dispatch_and_errors():
    log_probs = torch.randn(2, 3)
    rewards, advantages = torch.tensor([[1.0], [0.0]]), torch.tensor([[0.5], [-0.5]])
    loss, _ = compute_policy_gradient_loss(log_probs, "no_baseline", raw_rewards=rewards)
    assert torch.equal(loss, -rewards * log_probs)
    loss, _ = compute_policy_gradient_loss(log_probs, "reinforce_with_baseline",
                                           advantages=advantages)
    assert torch.equal(loss, -advantages * log_probs)
    with pytest.raises(ValueError, match="unknown loss_type 'ppo'"):
        compute_policy_gradient_loss(log_probs, "ppo", raw_rewards=rewards)
    with pytest.raises(ValueError, match="'no_baseline' needs raw_rewards"):
        compute_policy_gradient_loss(log_probs, "no_baseline", advantages=advantages)
    with pytest.raises(ValueError, match="needs advantages"):
        compute_policy_gradient_loss(log_probs, "reinforce_with_baseline", raw_rewards=rewards)
    with pytest.raises(ValueError, match="needs old_log_probs, cliprange"):
        compute_policy_gradient_loss(log_probs, "grpo_clip", advantages=advantages)


def test_microbatch_step_loss_and_gradient_scale_with_accumulation():
    base = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-0.5, -1.5, -2.5, -3.5]])
    mask = torch.tensor([[False, True, True, True], [False, True, True, False]])
    advantages = torch.tensor([[1.0], [-2.0]])
    grads, losses = [], []
    for steps in (1, 4):
        log_probs = base.clone().requires_grad_(True)
        loss, _ = grpo_microbatch_train_step(log_probs, mask, steps, "reinforce_with_baseline",
                                             advantages=advantages)
        grads.append(log_probs.grad)
        losses.append(loss.item())
    per_response = [-(1.0) * (-2 - 3 - 4) / 3, 2.0 * (-1.5 - 2.5) / 2]  # masked mean of -A logp
    assert losses[0] == pytest.approx(sum(per_response) / 2)
    assert losses[1] == pytest.approx(losses[0] / 4)
    assert torch.allclose(grads[1], grads[0] / 4)
    expected_grad = torch.tensor([[0, -1 / 3, -1 / 3, -1 / 3], [0, 1.0, 1.0, 0]]) / 2
    assert torch.allclose(grads[0], expected_grad)
    log_probs = base.clone().requires_grad_(True)  # Dr. GRPO: a constant normaliser
    loss, _ = grpo_microbatch_train_step(log_probs, mask, 1, "reinforce_with_baseline",
                                         advantages=advantages, constant_normalize_factor=4.0)
    assert loss.item() == pytest.approx((9.0 + 2.0 * -4.0) / 4 / 2)
    assert torch.allclose(log_probs.grad, mask * -advantages / 4 / 2)


def test_on_policy_grpo_loss_is_zero_but_the_gradient_is_not():
    torch.manual_seed(0)
    model = tiny_llama()
    ids = torch.randint(1, 64, (4, 7))
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, 2:] = True
    log_probs = torch.log_softmax(model(ids[:, :-1]).logits, -1).gather(
        -1, ids[:, 1:, None]).squeeze(-1)
    loss, meta = grpo_microbatch_train_step(log_probs, mask, 1, "grpo_clip",
                                            advantages=torch.tensor([1.0, -1.0, 2.0, -2.0]),
                                            old_log_probs=log_probs.detach(), cliprange=0.2)
    assert abs(loss.item()) < 1e-6 and meta["clip_fraction"].item() == 0.0
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_grpo_config_refuses_off_policy_without_clipping_and_bad_sizes():
    with pytest.raises(ValueError, match="off-policy"):
        GRPOConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=4, lr=1e-3,
                   loss_type="reinforce_with_baseline", epochs_per_batch=2, microbatch_size=4)
    with pytest.raises(ValueError, match="unknown loss_type"):
        GRPOConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=4, lr=1e-3,
                   loss_type="dpo", microbatch_size=4)
    with pytest.raises(ValueError, match="does not divide"):
        GRPOConfig(steps=1, prompts_per_step=3, group_size=2, max_new_tokens=4, lr=1e-3,
                   microbatch_size=4)


def test_rollout_batch_uses_the_sampled_ids(smoke_tokenizer):
    tok = smoke_tokenizer
    prompts = ["<p1>", "<p22>"]
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    batch = rollout_batch(tok, prompts, [[7, 8, tok.eos_token_id], [9]])
    assert batch["labels"][0, len(prompt_ids[0]) - 1:len(prompt_ids[0]) + 2].tolist() == \
        [7, 8, tok.eos_token_id]
    assert batch["response_mask"].sum(1).tolist() == [3, 1]
    with pytest.raises(ValueError, match="response 1 is empty"):
        rollout_batch(tok, prompts, [[7], []])


def test_grpo_train_and_expert_iteration_run_and_count_samples(smoke_tokenizer):
    tok = smoke_tokenizer
    prompts, answers = ["What is 1 + 1?", "What is 2 + 3?"], ["2", "5"]
    config = GRPOConfig(steps=2, prompts_per_step=2, group_size=2, max_new_tokens=3, lr=1e-3,
                        microbatch_size=2, kl_coef=0.04, epochs_per_batch=2)
    model = tiny_llama(len(tok), tok.pad_token_id)
    log = grpo_train(model, tok, prompts, answers, verifiable_reward, config,
                     ref_model=copy.deepcopy(model))
    assert log.responses == 8 and len(log.history) == 2 and log.flops > 0
    assert all(math.isfinite(row["loss"]) for row in log.history)
    with pytest.raises(ValueError, match="ref_model"):
        grpo_train(model, tok, prompts, answers, verifiable_reward, config)
    ei = expert_iteration(model, tok, prompts, answers, lambda r, t: {"reward": 1.0,
                          "format_reward": 1.0, "answer_reward": 1.0}, rounds=1,
                          prompts_per_round=2, samples_per_prompt=2, max_new_tokens=3,
                          sft_steps=1, lr=1e-3, seed=0)
    assert ei.responses == 4 and ei.history[0]["kept"] >= 1 and ei.flops > 0
    seen = []
    ei = expert_iteration(model, tok, prompts, answers, verifiable_reward, rounds=2,
                          prompts_per_round=1, samples_per_prompt=2, max_new_tokens=3,
                          sft_steps=1, lr=1e-3, seed=0,
                          callback=lambda r, m: seen.append(r) or {"probe": r})
    assert seen == [1, 2] and [row["probe"] for row in ei.history] == [1, 2]


def test_on_policy_grpo_clip_skips_the_old_forward_and_is_the_policy_gradient(smoke_tokenizer):
    """With one pass per batch pi_old = pi_theta: `grpo_train` takes the old log-probs from the
    training pass (no extra forward, so fewer FLOPs than with two passes) and every ratio is
    exp(0) = 1, so the clipped loss's gradient is REINFORCE-with-baseline's exactly: d/d log p of
    -min(rho A, clip(rho) A) at rho = 1 is -A (halving at the tie and doubling are exact in binary
    floating point), the same floats, so one step lands on the same weights bit for bit."""
    tok = smoke_tokenizer
    prompts, answers = ["What is 1 + 1?", "What is 2 + 3?"], ["2", "5"]
    config = GRPOConfig(steps=1, prompts_per_step=2, group_size=4, max_new_tokens=4, lr=1e-2,
                        microbatch_size=4)
    models, logs = {}, {}
    for loss_type in ("grpo_clip", "reinforce_with_baseline"):
        models[loss_type] = tiny_llama(len(tok), tok.pad_token_id)
        logs[loss_type] = grpo_train(models[loss_type], tok, prompts, answers,
                                     lambda r, t: {"reward": float(len(r)),
                                                   "format_reward": 1.0, "answer_reward": 0.0},
                                     dataclasses.replace(config, loss_type=loss_type))
    assert logs["grpo_clip"].flops == logs["reinforce_with_baseline"].flops
    assert logs["grpo_clip"].history[0]["clip_fraction"] == 0.0
    assert logs["grpo_clip"].history[0]["grad_norm"] > 0  # the step moved the weights
    for (name, a), b in zip(models["grpo_clip"].named_parameters(),
                            models["reinforce_with_baseline"].parameters(), strict=True):
        assert torch.equal(a, b), name
    two_pass = grpo_train(tiny_llama(len(tok), tok.pad_token_id), tok, prompts, answers,
                          verifiable_reward, dataclasses.replace(config, epochs_per_batch=2))
    assert two_pass.flops > logs["grpo_clip"].flops  # the old log-probs' forward, and a pass


def bandit_tokenizer():
    """Eight tokens: four specials (pad, eos, the two chat markers) and four words, one token
    each; a prompt renders as `<user> {content} <assistant>`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<user>", "<assistant>",
                                         "a", "b", "c", "d"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                  additional_special_tokens=["<user>", "<assistant>"],
                                  padding_side="left")
    tok.chat_template = ("{% for m in messages %}<user> {{ m['content'] }} {% endfor %}"
                         "<assistant>")
    return tok


@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_converges_to_the_optimum_of_a_one_token_bandit(seed):
    """One prompt, one-token replies over a vocabulary of V = 8, reward 1 for the reply "a" and 0
    for the 7 others (specials decode to "" and earn 0). Without a KL term the optimum is pi(a) =
    1, and GRPO approaches it: a group of G replies with mixed rewards pushes up the logit of "a"
    and down the others it sampled; only groups that are all rewarded (or all not) give no
    gradient (zero std). So the policy must end where nearly every group is all rewarded: we
    assert pi(a) > 1 - 1/G, i.e. fewer than one unrewarded reply expected in a group, against
    G (1 - pi(a)) ~ 7 at the start. pi(a) is computed exactly (a softmax, not a sample). A random
    init gives all V logits ~0 (std ~0.1), so pi(a) starts near 1/V = 0.125, about 6 sampling
    sds of a group's reward rate, sqrt(p (1 - p) / G) ~ 0.12, below the bound. Over seeds 0-15
    the final 1 - pi(a) was 0.0004-0.002, 60x below 1/G; an inverted reward or lr = 0 fails."""
    from ftbook.instruction_tuning import render_prompt

    tok = bandit_tokenizer()
    prompt_ids = torch.tensor([tok(render_prompt(tok, "b c"), add_special_tokens=False)
                               ["input_ids"]])
    a = tok.convert_tokens_to_ids("a")

    def prob_a(model: LlamaForCausalLM) -> float:
        with torch.no_grad():
            return torch.softmax(model(prompt_ids).logits[0, -1].double(), -1)[a].item()

    G = 8
    config = GRPOConfig(steps=30, prompts_per_step=1, group_size=G, max_new_tokens=1, lr=1e-2,
                        microbatch_size=G, seed=seed)  # on-policy grpo_clip, kl_coef = 0
    model = tiny_llama(len(tok), tok.pad_token_id, seed=seed)
    start = prob_a(model)
    assert start < 1 / 2  # near 1/V: the bound below is far from where it starts
    log = grpo_train(model, tok, ["b c"], ["a"], table_reward, config)
    assert len(log.history) == 30 and log.responses == 30 * G
    assert prob_a(model) > 1 - 1 / G


# --- The verifiable reward (9.10) ----------------------------------------------------------------

@pytest.mark.parametrize("response, truth, expected", [
    ("42", "42", (1, 1, 1)),  # well formed, right
    ("  -7\n", "-7", (1, 1, 1)),
    ("41", "42", (1, 0, 0)),  # well formed, wrong
    ("The answer is 42", "42", (0, 0, 0)),  # malformed: no answer can be extracted
    ("42 apples", "42", (0, 0, 0)),
    ("Half of 10 is 5.\n#### 1,005", "1005", (1, 1, 1)),  # GSM8K format
    ("#### 12.50", "12.5", (1, 1, 1)),
    ("#### 3\n#### 4", "3", (0, 0, 0)),  # two answers
    ("", "0", (0, 0, 0)),
])
def test_verifiable_reward(response, truth, expected):
    result = verifiable_reward(response, truth)
    assert (result["format_reward"], result["answer_reward"], result["reward"]) == expected


def test_verifiable_reward_format_bonus_and_bad_ground_truth():
    assert verifiable_reward("41", "42", format_weight=0.1)["reward"] == pytest.approx(0.1)
    assert verifiable_reward("42", "42", format_weight=0.1)["reward"] == pytest.approx(1.1)
    assert extract_answer("no number here") is None
    with pytest.raises(ValueError, match="not a number"):
        verifiable_reward("42", "forty-two")


@pytest.mark.parametrize("response, truth, expected", [
    ("42", "42", (1, 1)),
    ("17 + 25 = 42.", "42", (1, 1)),  # the last number counts, whatever surrounds it
    ("42 is wrong, it is 41", "42", (1, 0)),
    ("To add 17 and 25, we", "42", (1, 0)),  # cut before the answer: its last number is 25
    ("1,005 apples", "1005", (1, 1)),
    ("no number", "3", (0, 0)),
    ("", "0", (0, 0)),
])
def test_lenient_reward_reads_the_last_number(response, truth, expected):
    from ftbook.dpo_grpo import lenient_reward

    result = lenient_reward(response, truth)
    assert (result["format_reward"], result["answer_reward"]) == expected
    assert result["reward"] == result["answer_reward"]


def test_arithmetic_problems_respect_operations_operands_and_exclusions():
    from ftbook.dpo_grpo import arithmetic_problems

    sums = arithmetic_problems(50, seed=0, max_operand=20, min_operand=2, ops="+")
    assert len({p["prompt"] for p in sums}) == 50
    for p in sums:
        a, op, b = p["prompt"].removeprefix("What is ").removesuffix("?").split()
        assert op == "+" and 2 <= int(a) <= 20 and 2 <= int(b) <= 20
        assert int(p["answer"]) == int(a) + int(b)
    again = arithmetic_problems(20, seed=1, max_operand=20, min_operand=2, ops="+",
                                exclude={p["prompt"] for p in sums})
    assert not {p["prompt"] for p in again} & {p["prompt"] for p in sums}
    with pytest.raises(ValueError, match="ops"):
        arithmetic_problems(5, seed=0, ops="*")
    with pytest.raises(ValueError, match="distinct"):
        arithmetic_problems(10, seed=0, max_operand=2, min_operand=2, ops="+")


def test_experiment_config_rejects_bad_values():
    import dataclasses

    from ftbook.dpo_grpo import DPO_CONFIGS

    tiny = DPO_CONFIGS["tiny"]
    for change, match in (({"rlvr_reward": "loose"}, "rlvr_reward"), ({"rlvr_ops": "*"}, "ops"),
                          ({"ei_rounds": 5}, "multiple")):
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(tiny, **change)
