"""Tests of ftbook.reward_modeling (chapter 13-07): the Bradley-Terry mathematics of eqs.
(7.1)-(7.5), the last-token read-out under left and right padding, parity with
LlamaForSequenceClassification and TRL's RewardTrainer, best-of-n (7.7)-(7.9), record validation,
the gold reward and the training loop."""
import math
import warnings

import pytest
import tiny_models
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from ftbook.data import DataFormatError
from ftbook.instruction_tuning import transformer_tolerance
from ftbook.reward_modeling import (
    GoldReward,
    RewardModel,
    best_of_n_distribution,
    best_of_n_estimate,
    best_of_n_kl,
    bradley_terry_grad,
    bradley_terry_loss,
    calibration_table,
    collate_pairs,
    draw_preferences,
    encode_preference_pairs,
    evaluate_reward_model,
    expected_calibration_error,
    fit_bradley_terry,
    kl_divergence,
    last_token_index,
    pad_sequences,
    pairwise_accuracy,
    preference_problems,
    reward_model_text,
    score_replies,
    sentiment_prompts,
    train_reward_model,
    validate_preference_records,
)
from ftbook.workbench import binomial_interval, rounding_bound, unit_roundoff

U = unit_roundoff()  # float32
LN2_TOLERANCE = 16 * U  # float32 log1p(1): a few ulp (<= 8 u) of ln 2 < 1, doubled


def reward_tolerance(model, rows: int, rewards: torch.Tensor) -> float:
    """Rounding alone between two computations of these rewards (13-06's transformer tolerance)."""
    return transformer_tolerance(model.config, rows, rewards.abs().max().item())


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    return tiny_models.tiny_llama(100, seed=seed, max_position_embeddings=2048)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2,
                                      n_positions=64, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2, attn_implementation="eager")).eval()


def reward_model(lm, seed: int = 3) -> RewardModel:
    rm = RewardModel.from_causal_lm(lm).eval()
    with torch.no_grad():
        rm.head.weight.normal_(generator=torch.Generator().manual_seed(seed))
    return rm


def random_rows(lengths=(5, 9, 3, 7), seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 100, (n,), generator=generator).tolist() for n in lengths]


def record(**overrides):
    return {"prompt": "Continue this movie review: a fine", "chosen": "film, warm and wise.",
            "rejected": "mess.", **overrides}


# --- Bradley-Terry: eqs. (7.2)-(7.5) -----------------------------------------------------------

def test_bt_gradient_matches_autograd():
    torch.manual_seed(0)
    chosen = torch.randn(32, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(32, dtype=torch.float64, requires_grad=True)
    bradley_terry_loss(chosen, rejected).backward()
    grad_w, grad_l = bradley_terry_grad(chosen.detach(), rejected.detach())
    # entries sigma(-Delta) / 32: at most 8 roundings a side, each <= u absolutely, then / 32
    tolerance = 2 * 8 * unit_roundoff(torch.float64) / 32
    assert (grad_w - chosen.grad).abs().max().item() <= tolerance
    assert (grad_l - rejected.grad).abs().max().item() <= tolerance
    assert torch.equal(grad_w, -grad_l)  # exact by construction


def test_bt_loss_is_ln2_at_ties_and_stable_at_extreme_margins():
    zeros = torch.zeros(4)
    assert bradley_terry_loss(zeros, zeros).item() == pytest.approx(math.log(2), abs=LN2_TOLERANCE)
    loss = bradley_terry_loss(torch.tensor([-500.0, 500.0]), torch.zeros(2))
    assert torch.isfinite(loss) and loss.item() == 250.0  # (500 + 0) / 2: exact in float32
    with pytest.raises(ValueError, match="batch"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(4))


@pytest.mark.parametrize("n_ab, n_ba", [(37, 13), (1, 1), (2, 98), (500, 3)])
def test_two_item_mle_is_the_logit_of_the_win_rate(n_ab, n_ba):
    scores = fit_bradley_terry(torch.tensor([[0.0, n_ab], [n_ba, 0.0]]))
    # the fit stops at |observed - expected wins| < 1e-10; the score difference then lies within
    # 1e-10 / (n p (1 - p)) of (7.4) (the curvature), doubled for higher order and rounding
    n, p = n_ab + n_ba, n_ab / (n_ab + n_ba)
    tolerance = 2 * 1e-10 / (n * p * (1 - p))
    assert (scores[0] - scores[1]).item() == pytest.approx(math.log(n_ab / n_ba), abs=tolerance)
    # centred: the sum is float64 rounding of the centring, (A.1) over 2 + 1 terms
    bound = rounding_bound(3, 2 * scores.abs().sum().item(), torch.float64)
    assert abs(scores.sum().item()) <= bound


def test_k_item_mle_solves_the_score_equations_and_recovers_the_scores():
    K, games = 6, 400
    true = torch.tensor([-1.5, -0.6, 0.0, 0.4, 1.0, 1.8], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    upper = torch.binomial(torch.full((K, K), float(games), dtype=torch.float64).triu(1),
                           torch.sigmoid(true[:, None] - true[None, :]).triu(1),
                           generator=generator)
    wins = upper + (games - upper.T).tril(-1)
    fitted = fit_bradley_terry(wins)
    games_ij = wins + wins.T
    p_fit = torch.sigmoid(fitted[:, None] - fitted[None, :])
    expected = (games_ij * p_fit).sum(1)
    # eq. (7.5) to the fit's tol, plus float64 rounding of recomputing after centring
    bound = 1e-10 + 2 * rounding_bound(K, games_ij.sum(1).max().item(), torch.float64)
    assert (wins.sum(1) - expected).abs().max().item() <= bound
    # statistical: within 5 standard errors (Fisher information) of the centred truth
    information = games_ij * p_fit * (1 - p_fit)
    stderr = torch.linalg.pinv(torch.diag(information.sum(1)) - information).diagonal().sqrt()
    assert ((fitted - (true - true.mean())).abs() < 5 * stderr).all()


def test_fit_rejects_an_item_that_never_wins():
    with pytest.raises(ValueError, match="win and lose"):
        fit_bradley_terry(torch.tensor([[0.0, 0.0], [5.0, 0.0]]))


def test_pairwise_accuracy_counts_ties_as_half():
    chosen, rejected = torch.tensor([2.0, 1.0, 0.0, 3.0]), torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert pairwise_accuracy(chosen, rejected) == 2.5 / 4  # dyadic: exact


def test_draw_preferences_follows_eq_7_1():
    gaps = torch.tensor([-1.5, 0.0, 2.0])
    wins = torch.stack([draw_preferences(gaps, torch.zeros(3), seed=s)
                        for s in range(3000)]).sum(0)
    for k, p in zip(wins.tolist(), torch.sigmoid(gaps).tolist(), strict=True):
        low, high = binomial_interval(int(k), 3000, level=1 - 1e-6)  # cannot fail by chance
        assert low <= p <= high
    assert torch.equal(draw_preferences(gaps, torch.zeros(3), 5),
                       draw_preferences(gaps, torch.zeros(3), 5))


# --- the read-out, eq. (7.6) ----------------------------------------------------------------------

def test_last_token_index_for_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    assert last_token_index(right).tolist() == [2, 4]
    assert last_token_index(left).tolist() == [4, 4]
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(torch.tensor([[0, 0, 0]]))


@pytest.mark.parametrize("make_lm", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_rewards_with_left_and_right_padding_equal_unpadded(make_lm):
    rm = reward_model(make_lm())
    rows = random_rows()
    with torch.no_grad():
        alone = torch.cat([rm(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))
                           for r in rows])
        tolerance = reward_tolerance(rm, max(len(r) for r in rows), alone)
        for side in ("left", "right"):
            batch = pad_sequences(rows, pad_token_id=0, padding_side=side)
            assert (rm(**batch) - alone).abs().max().item() <= tolerance, side


def test_zero_head_gives_zero_rewards_and_loss_ln2():
    rm = RewardModel.from_causal_lm(tiny_llama())
    batch = collate_pairs([(r, r[::-1]) for r in random_rows()], pad_token_id=0)
    rewards = rm(**batch)
    assert rewards.shape == (8,) and rewards.abs().max() == 0
    assert bradley_terry_loss(*rewards.chunk(2)).item() == pytest.approx(math.log(2),
                                                                         abs=LN2_TOLERANCE)


def test_collate_pairs_puts_chosen_first_like_trl():
    batch = collate_pairs([([5, 6, 7], [8]), ([9], [10, 11])], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0], [8, 0, 0], [10, 11, 0]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 1, 1, 2]


# --- parity ---------------------------------------------------------------------------------------

def test_readout_matches_llama_for_sequence_classification_and_survives_save_load(tmp_path):
    rm = reward_model(tiny_llama())
    pairs = list(zip(random_rows((5, 9, 4), seed=1), random_rows((6, 3, 8), seed=2), strict=True))
    classifier = rm.to_sequence_classifier(pad_token_id=0)
    assert type(classifier).__name__ == "LlamaForSequenceClassification"
    for side in ("right", "left"):
        batch = collate_pairs(pairs, pad_token_id=0, padding_side=side)
        with torch.no_grad():
            ours = rm(**batch)
            pooled = classifier(**batch).logits.squeeze(-1)
        tolerance = reward_tolerance(rm, batch["input_ids"].shape[1], ours)
        assert (ours - pooled).abs().max().item() <= tolerance, side
    rm.save_pretrained(tmp_path / "rm", pad_token_id=0)
    loaded = RewardModel.from_pretrained(tmp_path / "rm", attn_implementation="eager").eval()
    for (name, a), (_, b) in zip(rm.state_dict().items(), loaded.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name  # saving and loading is exact
    batch = collate_pairs(pairs, pad_token_id=0)
    with torch.no_grad():
        ours = rm(**batch)
        tolerance = reward_tolerance(rm, batch["input_ids"].shape[1], ours)
        assert (loaded(**batch) - ours).abs().max().item() <= tolerance


def test_from_pretrained_refuses_a_two_label_classifier(tmp_path):
    from transformers import LlamaForSequenceClassification

    config = tiny_llama().config
    config.num_labels = 2
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "two")
    with pytest.raises(ValueError, match="num_labels=1"):
        RewardModel.from_pretrained(tmp_path / "two")


def test_tokenization_and_loss_match_trl_reward_trainer(real_env, tmp_path):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from ftbook.base_models import load_causal_lm

    lm, tok = load_causal_lm("smoke")
    rm = reward_model(lm)
    records = [record(), record(prompt="Continue this movie review: the plot", chosen="sings.",
                                rejected="drags on and on and on."),
               record(chosen="a joy", rejected="a bore from start to finish")]
    pairs = encode_preference_pairs(tok, records, max_len=128)
    assert all(c[-1] == tok.eos_token_id and r[-1] == tok.eos_token_id for c, r in pairs)
    dataset = Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["prompt"]}],
         "chosen": [{"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in records])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = RewardTrainer(
            model=rm.to_sequence_classifier(tok.pad_token_id), processing_class=tok,
            train_dataset=dataset,
            args=RewardConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True))
    for i, (chosen_ids, rejected_ids) in enumerate(pairs):
        assert trainer.train_dataset[i]["chosen_ids"] == chosen_ids
        assert trainer.train_dataset[i]["rejected_ids"] == rejected_ids
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
    batch = collate_pairs(pairs, tok.pad_token_id)
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(trl_batch)).item()
        pair_rewards = rm(**batch)
        ours = bradley_terry_loss(*pair_rewards.chunk(2)).item()
    # the rewards differ by rounding (moving each margin by twice that); each side's logsigmoid
    # (<= 8 u relative to loss + 1) and mean of 3 (A.1)
    tolerance = reward_tolerance(rm, batch["input_ids"].shape[1], pair_rewards)
    loss_tolerance = 2 * tolerance + 2 * (rounding_bound(3, 1.0) + 8 * U) * (ours + 1)
    assert ours == pytest.approx(trl_loss, abs=loss_tolerance)
    rewards = score_replies(rm, tok, [r["prompt"] for r in records],
                            [r["chosen"] for r in records])
    assert (rewards - pair_rewards[:3]).abs().max().item() <= tolerance


def test_reward_model_text_refuses_pad_equal_to_eos():
    class Tok:
        eos_token, eos_token_id, pad_token_id = "</s>", 2, 2

    with pytest.raises(ValueError, match="distinct from its pad"):
        reward_model_text(Tok(), "x", "y")


# --- best-of-n, eqs. (7.7)-(7.9) ----------------------------------------------------------------

def test_best_of_n_kl_formula_is_the_continuous_limit_and_a_discrete_upper_bound():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(64) == pytest.approx(math.log(64) - 63 / 64)
    generator = torch.Generator().manual_seed(0)
    for support, tolerance in ((50_000, 0.005), (5, None)):
        probs = torch.rand(support, generator=generator, dtype=torch.float64)
        probs /= probs.sum()
        rewards = torch.randn(support, generator=generator, dtype=torch.float64)
        for n in (2, 4, 16, 64):
            exact = kl_divergence(best_of_n_distribution(probs, rewards, n), probs)
            # float64 sum over `support` terms: n-th powers (relative error ~ n u), logs <= ln n + 1
            kl_rounding = n * rounding_bound(support + 1, math.log(n) + 1, torch.float64)
            assert exact <= best_of_n_kl(n) + kl_rounding
            # deterministic float64 values, far from both thresholds (gaps below 1e-5 for
            # 50,000 outcomes, above 0.02 for 5)
            if tolerance:
                assert exact == pytest.approx(best_of_n_kl(n), abs=tolerance)
            else:
                assert exact < best_of_n_kl(n) - 0.005  # coarse support: strictly below


def test_best_of_n_distribution_matches_simulation_and_handles_ties():
    probs = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64)
    rewards = torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    draws = torch.multinomial(probs, 100_000 * 3, replacement=True, generator=generator)
    draws = draws.view(-1, 3)
    picked = draws.gather(1, rewards[draws].argmax(1, keepdim=True)).squeeze(1)
    counts = torch.bincount(picked, minlength=4).tolist()
    for k, p in zip(counts, best_of_n_distribution(probs, rewards, 3).tolist(), strict=True):
        low, high = binomial_interval(k, picked.numel(), level=1 - 1e-6)  # cannot fail by chance
        assert low <= p <= high
    # float64, a few roundings: pytest.approx's relative 1e-6 is far above them
    tied = best_of_n_distribution(probs, torch.tensor([1.0, 0.0, 1.0, 0.0]), 2)
    assert tied.sum().item() == pytest.approx(1.0)
    assert tied[0] / tied[2] == pytest.approx(0.1 / 0.2)  # tied outcomes share by probability
    assert tied[0] + tied[2] == pytest.approx(1 - 0.7 ** 2)


def test_best_of_n_estimate_extremes_and_subset_average():
    generator = torch.Generator().manual_seed(2)
    scores = torch.randn(3, 10, generator=generator, dtype=torch.float64)
    values = torch.randn(3, 10, generator=generator, dtype=torch.float64)
    # float64 sums of 10 terms (error ~1e-15): allclose's defaults are far above
    assert torch.allclose(best_of_n_estimate(scores, values, 1), values.mean(1))
    assert torch.allclose(best_of_n_estimate(scores, values, 10),
                          values.gather(1, scores.argmax(1, keepdim=True)).squeeze(1))
    from itertools import combinations

    exact = torch.stack([
        torch.stack([values[p, list(s)][scores[p, list(s)].argmax()]
                     for s in combinations(range(10), 4)]).mean() for p in range(3)])
    # float64: weights from lgamma and exp (relative error a few u times lgamma(11)), sums of
    # 10 and 210 terms of size up to max |v|, on the two sides
    bound = 2 * values.abs().max().item() * (
        rounding_bound(210 + 10, 1.0, torch.float64)
        + 8 * unit_roundoff(torch.float64) * (math.lgamma(11) + 1))
    assert (best_of_n_estimate(scores, values, 4) - exact).abs().max().item() <= bound
    with pytest.raises(ValueError, match="1..10"):
        best_of_n_estimate(scores, values, 11)


# --- calibration ----------------------------------------------------------------------------------

def test_calibration_of_a_calibrated_predictor_is_near_zero():
    generator = torch.Generator().manual_seed(3)
    p = torch.rand(40_000, generator=generator, dtype=torch.float64)
    outcomes = (torch.rand(40_000, generator=generator, dtype=torch.float64) < p).double()
    table = calibration_table(p, outcomes, n_bins=10, true_probs=p)
    assert table["count"].sum() == 40_000 and len(table) == 10
    # statistical: every bin's frequency within 5 standard errors of its mean prediction (chance
    # of failing < 1e-5), so ECE, their count-weighted mean distance, is below 5 weighted SEs
    weights = table["count"] / table["count"].sum()
    assert expected_calibration_error(table) < 5 * float((weights * table["stderr"]).sum())
    # the same mean of the same numbers, twice: float64 rounding of a mean of values in [0, 1]
    bound = 2 * rounding_bound(int(table["count"].max()), 1.0, torch.float64)
    assert expected_calibration_error(table, "true") <= bound
    # miscalibrated by construction: ECE about 0.2, some 30 standard errors above 0.1
    overconfident = calibration_table((p - 0.5) * 1.8 + 0.5, outcomes, n_bins=10)
    assert expected_calibration_error(overconfident) > 0.1


# --- validation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, field, why", [
    ({"prompt": "p", "rejected": "r"}, "chosen", "is missing"),
    (record(chosen="   "), "chosen", "is empty"),
    (record(rejected=""), "rejected", "is empty"),
    (record(prompt=7), "prompt", "must be a string"),
    (record(rejected=" film, warm and wise. "), "rejected", "equals 'chosen'"),
    (record(gold_chosen=float("nan")), "gold_chosen", "must be a finite number"),
])
def test_validation_names_record_and_field(bad, field, why):
    records = [record(), record(), bad]
    assert preference_problems(records)[0][:2] == (2, field)
    with pytest.raises(DataFormatError, match=rf"record 2, field '{field}': {why}"):
        validate_preference_records(records)


def test_validation_accepts_good_records_and_rejects_non_dicts_and_empty():
    assert validate_preference_records([record(gold_chosen=1.0, gold_rejected=-2)]) == [
        record(gold_chosen=1.0, gold_rejected=-2)]
    with pytest.raises(DataFormatError, match="record 0, field '-': is a list"):
        validate_preference_records([["p", "c", "r"]])
    with pytest.raises(DataFormatError, match="no records"):
        validate_preference_records([])


def test_encode_refuses_to_truncate(real_env):
    from ftbook.base_models import load_causal_lm

    _, tok = load_causal_lm("smoke")
    with pytest.raises(ValueError, match=r"record 0, field 'chosen': \d+ tokens"):
        encode_preference_pairs(tok, [record()], max_len=5)


# --- training -------------------------------------------------------------------------------------

def separable_pairs(n: int, seed: int = 4) -> list[tuple[list[int], list[int]]]:
    """`n` pairs of random bodies of 3 to 7 tokens that differ only in the last token: chosen
    ends in 7, rejected in 9, so one direction of the last hidden state separates them."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        body = torch.randint(10, 100, (int(torch.randint(3, 8, (), generator=generator)),),
                             generator=generator).tolist()
        pairs.append((body + [7], body + [9]))
    return pairs


def test_training_reduces_the_loss_on_a_separable_problem():
    pairs = separable_pairs(24)
    rm = RewardModel.from_causal_lm(tiny_llama())
    log = train_reward_model(rm, pairs, steps=25, lr=1e-2, batch_size=8, pad_token_id=0, seed=0,
                             eval_pairs=pairs, eval_every=25)
    assert log.losses[0] == pytest.approx(math.log(2), abs=LN2_TOLERANCE)  # zero head
    # learns at all, with a wide margin: over 5 seeds the last losses averaged 0.001 (against
    # 0.35) and the smallest reward margin was about 6.9 (accuracy 1)
    assert sum(log.losses[-5:]) / 5 < 0.5 * log.losses[0]
    assert log.evals[0]["accuracy"] == 0.5 and log.evals[-1]["accuracy"] == 1.0  # ties: 0.5
    assert evaluate_reward_model(rm, pairs, pad_token_id=0)["accuracy"] == 1.0


def test_training_stops_on_a_non_finite_loss():
    rm = RewardModel.from_causal_lm(tiny_llama())
    with torch.no_grad():
        rm.head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="reward model loss"):
        train_reward_model(rm, [([1, 2], [3, 4])], steps=2, lr=1e-3, batch_size=1,
                           pad_token_id=0, seed=0)


# --- the running task -----------------------------------------------------------------------------

def test_sentiment_prompts_are_seeded_openings(real_env):
    prompts = sentiment_prompts("validation", 12, seed=0)
    assert prompts == sentiment_prompts("validation", 12, seed=0)
    assert prompts != sentiment_prompts("validation", 12, seed=1)
    assert len(set(prompts)) == 12
    for p in prompts:
        assert p.startswith("Continue this movie review: ")
        assert 3 <= len(p.removeprefix("Continue this movie review: ").split()) <= 6


def test_gold_sentiment_is_the_logit_difference_and_gold_follows_eq_7_1b():
    from ftbook.base_models import load_encoder_classifier
    from ftbook.reward_modeling import GOLD_FLOOR, well_formedness

    model, tok = load_encoder_classifier("smoke", seed=0)
    gold = GoldReward(model, tok, max_len=16, batch_size=2)
    texts = ["a lovely film", "dull", "the worst movie of the year, truly .",
             "it is a film that i will not forget for a long time ."]
    sentiment = gold.sentiment(texts)
    with torch.no_grad():
        logits = model(**tok(texts, padding=True, truncation=True, max_length=16,
                             return_tensors="pt")).logits
    # batches of 2 vs 4 (other padding): each logit moves by rounding only, the difference twice
    tolerance = 2 * transformer_tolerance(model.config, 16, logits.abs().max().item())
    difference = logits[:, 1] - logits[:, 0]
    assert sentiment.shape == (4,) and (sentiment - difference).abs().max().item() <= tolerance
    g = torch.tensor([well_formedness(t) for t in texts])
    expected = g * sentiment + (1 - g) * GOLD_FLOOR
    # three float32 operations on numbers of size <= max(|s|, |floor|): a few u
    scale = max(sentiment.abs().max().item(), abs(GOLD_FLOOR))
    assert (gold(texts) - expected).abs().max().item() <= 8 * U * scale
    assert g[-1] == 1.0 and g[0] < 1.0  # a full sentence vs a fragment
    with pytest.raises(TypeError):
        gold("one string")
    with pytest.raises(TypeError):
        gold.sentiment("one string")


@pytest.mark.parametrize("text, expected", [
    ("", 0.0),
    ("great", 0.0),  # no function word at all: g_func = 0
    ("a great film", 3 / 8 * 0.5),  # 3 of 8 words, "a" is 1/3 of them (>= 0.2), no ending
    ("it is a film that i will not forget for a long time .", 1.0),
    ("it is a film that i will not forget for a long time", 0.5),  # cut off
    ("it is a film that i will not forget for a long time !\"", 1.0),  # closing quote
    ("great great great great great great great great great great .", None),
])
def test_well_formedness_factors(text, expected):
    from ftbook.reward_modeling import well_formedness

    g = well_formedness(text)
    assert 0.0 <= g <= 1.0
    if expected is not None:
        assert g == pytest.approx(expected, rel=1e-12)
    else:  # 11 words, 2 distinct ("great", "."), no function word: g_func = 0
        assert g == 0.0


def test_well_formedness_penalises_repetition_by_the_distinct_share():
    from ftbook.reward_modeling import GOLD_MIN_DISTINCT, well_formedness

    sentence = "the film is a story about a family and the town where it lives ."
    looped = " ".join([sentence.removesuffix(" .")] * 3) + " ."
    words = looped.split()
    distinct = len(set(words)) / len(words)
    assert well_formedness(sentence) == 1.0
    assert well_formedness(looped) == pytest.approx(distinct / GOLD_MIN_DISTINCT, rel=1e-12)


def test_last_token_features_equal_the_reward_models_own_read_out():
    """Shared-prefix cache, sorted batches: the head applied to the features gives the rewards
    of the full forward pass, up to rounding."""
    from ftbook.reward_modeling import last_token_features

    rm = reward_model(tiny_llama())
    prefix = [5, 6, 7, 8]
    rows = [prefix + r for r in random_rows((5, 9, 3, 7, 1))]
    features = last_token_features(rm, rows, pad_token_id=0, batch_size=2)
    with torch.no_grad():
        direct = torch.cat([rm(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))
                            for r in rows])
        via_features = rm.head(features).squeeze(-1)
    assert features.shape == (5, 32)
    assert (via_features - direct).abs().max().item() <= reward_tolerance(rm, 13, direct)


def test_train_reward_head_equals_training_the_head_alone_with_a_frozen_backbone():
    """Same loss, batches, schedule and clipping: the head trained on cached features equals
    the head trained by `train_reward_model` with the backbone's gradients switched off."""
    from ftbook.reward_modeling import train_reward_head

    pairs = separable_pairs(16)
    lm = tiny_llama()
    frozen = RewardModel.from_causal_lm(lm)
    for p in frozen.backbone.parameters():
        p.requires_grad_(False)
    cached = RewardModel.from_causal_lm(lm)
    args = dict(steps=12, lr=1e-2, batch_size=4, pad_token_id=0, seed=0, weight_decay=0.1)
    log_frozen = train_reward_model(frozen, pairs, **args)
    log_cached = train_reward_head(cached, pairs, eval_pairs=pairs, eval_every=6, **args)
    assert log_cached.losses[0] == pytest.approx(math.log(2), abs=LN2_TOLERANCE)
    assert [e["step"] for e in log_cached.evals] == [0, 6, 12]
    # features differ by rounding (other batching), which Adam's normalised steps can amplify
    # near zero gradients: compare the learned rewards' ordering and size, not bits
    w_frozen, w_cached = frozen.head.weight, cached.head.weight
    cosine = torch.nn.functional.cosine_similarity(w_frozen, w_cached).item()
    assert cosine > 0.999
    assert all(abs(a - b) <= 1e-3 * max(1.0, abs(a)) for a, b in
               zip(log_frozen.losses, log_cached.losses, strict=True))


@pytest.mark.slow
def test_load_reward_model_trains_saves_and_reloads_the_smoke_recipe(real_env):
    from ftbook.reward_modeling import load_gold_reward, load_reward_model, rm_folder

    reward_model, tok = load_reward_model("smoke")  # trains gold, SFT and reward model if needed
    folder = rm_folder("smoke")
    assert (folder / "recipe.json").is_file() and (folder / "config.json").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    again, _ = load_reward_model("smoke")
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # loaded, not retrained
    prompts = sentiment_prompts("validation", 2, seed=0)
    rewards = score_replies(reward_model, tok, prompts, ["a lovely film", "a dull film"])
    again_rewards = score_replies(again, tok, prompts, ["a lovely film", "a dull film"])
    tolerance = reward_tolerance(reward_model, 128, rewards)  # the same weights: rounding only
    assert rewards.shape == (2,) and (rewards - again_rewards).abs().max().item() <= tolerance
    gold = load_gold_reward("smoke")
    assert gold(["great", "awful", ""]).shape == (3,)
    assert 0.0 <= gold.info["dev_accuracy"] <= 1.0


def test_label_pairs_uses_disjoint_consecutive_pairs_and_drops_empty_or_identical():
    from ftbook.reward_modeling import label_pairs

    def gold(texts):  # a deterministic gold: the number of "good" in the reply
        return torch.tensor([float(t.count("good")) for t in texts])

    prompts = ["p1", "p2"]
    replies = [["good good", "bad", "good", "good", "x"],  # pairs (0,1), (2,3); "x" unpaired
               ["", "good"]]  # an empty reply: dropped
    records = label_pairs(prompts, replies, gold, seed=0)
    assert [(r["prompt"], {r["chosen"], r["rejected"]}) for r in records] == [
        ("p1", {"good good", "bad"})]  # (2, 3) are identical replies: dropped
    r = records[0]
    # the label is the Bradley-Terry draw of eq. (7.1) on the gold difference
    a_wins = draw_preferences(torch.tensor([2.0]), torch.tensor([0.0]), seed=0)[0].item()
    assert (r["chosen"] == "good good") == a_wins
    assert {r["gold_chosen"], r["gold_rejected"]} == {2.0, 0.0}
    with pytest.raises(ValueError, match="2 prompts but 1"):
        label_pairs(prompts, replies[:1], gold, seed=0)


def test_label_pairs_all_pairs_compares_every_two_replies_of_a_prompt():
    from ftbook.reward_modeling import label_pairs

    def gold(texts):
        return torch.tensor([float(len(t)) for t in texts])

    records = label_pairs(["p"], [["a", "bb", "ccc", "dddd"]], gold, seed=1, all_pairs=True)
    assert len(records) == 6  # K(K-1)/2 with K = 4
    assert {frozenset((r["chosen"], r["rejected"])) for r in records} == {
        frozenset(x) for x in [("a", "bb"), ("a", "ccc"), ("a", "dddd"), ("bb", "ccc"),
                               ("bb", "dddd"), ("ccc", "dddd")]}
